"""Generic forward and backward kernels for the elementwise activations.

One forward and one backward kernel serve every activation (``ACT`` selects the math in
``math.py``) and every dtype (loads are upcast by ``opmath``).  Both walk a dense tensor's memory
as a matrix of ``R`` rows by ``L`` columns so that a per-channel beta costs one index per row or
column instead of a division per element:

* no beta or a float beta: one row of ``numel`` columns (plain 1-D blocks);
* a beta tensor with channels outer to a contiguous run (NCHW, or a scalar beta): rows are runs
  of ``inner = stride(1)`` elements and the channel of a row is ``row % C``;
* channels innermost (channels_last, (N, C) after a Linear): rows of ``C`` columns and the
  channel is the column.

The backward kernel also reduces d(loss)/d(beta) inside its tile and writes one fp32 partial per
(tile, channel) slot; the caller sums that small buffer.  Every slot is written on every call and
the summation order is fixed, so the gradient is deterministic with no atomics and no zeroing.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .math import act_bwd, act_fwd, opmath

BLOCK = 2048  # elements per program: 16 (bf16) or 8 (fp32) a thread at 4 warps (bench/NOTES.md)
NUM_WARPS = 4
MAX_COLS_BLOCK = 64  # channels-innermost tiles: at least BLOCK // 64 rows reduced per partial
INT64_THRESHOLD = 2**31  # numel from which offsets are computed in 64 bits

BETA_VALUE, BETA_ROWS, BETA_COLS = 0, 1, 2


@dataclass(frozen=True)
class Plan:
    """How a dense tensor is tiled: an R x L matrix in ``BLOCK_R`` x ``BLOCK_L`` tiles."""

    rows: int
    cols: int
    channels: int
    beta_mode: int
    block_r: int
    block_l: int

    @property
    def flat(self) -> bool:
        return self.rows == 1 and self.block_r == 1

    @property
    def grid(self) -> tuple[int]:
        return (triton.cdiv(self.rows, self.block_r) * triton.cdiv(self.cols, self.block_l),)


def plan(x: torch.Tensor, beta: torch.Tensor | None) -> Plan:
    """Tile a dense (non-overlapping, gap-free) ``x`` for a beta of 1 or ``x.shape[1]`` values."""
    n = x.numel()
    if beta is None:
        return Plan(1, n, 1, BETA_VALUE, 1, BLOCK)
    channels = beta.numel()
    if channels == 1:
        return Plan(1, n, 1, BETA_ROWS, 1, BLOCK)
    inner = x.stride(1)
    if inner == 1:
        block_l = min(triton.next_power_of_2(channels), MAX_COLS_BLOCK)
        return Plan(n // channels, channels, channels, BETA_COLS, BLOCK // block_l, block_l)
    block_l = min(triton.next_power_of_2(inner), BLOCK)
    return Plan(n // inner, inner, channels, BETA_ROWS, BLOCK // block_l, block_l)


@triton.jit
def _tile(pid, R, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
          INT64: tl.constexpr):
    if INT64:
        pid = pid.to(tl.int64)
    n_l = tl.cdiv(L, BLOCK_L)
    pid_r = pid // n_l
    pid_l = pid % n_l
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    if FLAT:
        # a single row (R == 1, BLOCK_R == 1): offsets without the row multiply, which the
        # compiler sees as contiguous and aligned (16-byte accesses) whatever L is
        offs = cols[None, :]
    else:
        offs = rows[:, None] * L + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < L)
    return pid_r, pid_l, rows, cols, offs, mask


@triton.jit
def _beta(beta_ptr, beta_value, rows, cols, C, BETA_MODE: tl.constexpr):
    if BETA_MODE == 0:
        b = beta_value
    elif BETA_MODE == 1:
        b = opmath(tl.load(beta_ptr + rows % C))[:, None]
    else:
        b = opmath(tl.load(beta_ptr + cols, mask=cols < C, other=1.0))[None, :]
    return b


@triton.jit
def act_fwd_kernel(x_ptr, y_ptr, beta_ptr, beta_value, R, L, C,
                   ACT: tl.constexpr, BETA_MODE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_L: tl.constexpr, FLAT: tl.constexpr, INT64: tl.constexpr):
    _, _, rows, cols, offs, mask = _tile(tl.program_id(0), R, L, BLOCK_R, BLOCK_L, FLAT, INT64)
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    b = _beta(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    y = act_fwd(x, b, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_bwd_kernel(g_ptr, x_ptr, dx_ptr, beta_ptr, beta_value, partial_ptr, R, L, C,
                   ACT: tl.constexpr, BETA_MODE: tl.constexpr, NEED_DBETA: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                   INT64: tl.constexpr):
    tile = _tile(tl.program_id(0), R, L, BLOCK_R, BLOCK_L, FLAT, INT64)
    pid_r, pid_l, rows, cols, offs, mask = tile
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    b = _beta(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    dydx, dydb = act_bwd(x, b, ACT)
    tl.store(dx_ptr + offs, (g * dydx).to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DBETA:
        db = tl.where(mask, g * dydb, 0.0)
        acc = partial_ptr.dtype.element_ty
        if BETA_MODE == 1:
            tl.store(partial_ptr + pid_l * R + rows, tl.sum(db, axis=1).to(acc), mask=rows < R)
        else:
            tl.store(partial_ptr + pid_r * L + cols, tl.sum(db, axis=0).to(acc), mask=cols < L)


def _int64(x: torch.Tensor) -> bool:
    return x.numel() >= INT64_THRESHOLD


def forward(x: torch.Tensor, y: torch.Tensor, act: int, beta: torch.Tensor | None,
            beta_value: float) -> None:
    """Write f(x) into ``y``; both dense with identical strides, ``beta`` flat (1 or C values)."""
    p = plan(x, beta)
    act_fwd_kernel[p.grid](
        x, y, x if beta is None else beta, beta_value, p.rows, p.cols, p.channels,
        ACT=act, BETA_MODE=p.beta_mode, BLOCK_R=p.block_r, BLOCK_L=p.block_l, FLAT=p.flat,
        INT64=_int64(x), num_warps=NUM_WARPS)


def backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, act: int,
             beta: torch.Tensor | None, beta_value: float, need_dbeta: bool
             ) -> torch.Tensor | None:
    """Write grad * f'(x) into ``dx``; return d/dbeta per channel (C values, fp32 or fp64).

    ``g``, ``x`` and ``dx`` are dense with identical strides; ``beta`` is flat (1 or C values).
    """
    p = plan(x, beta)
    if need_dbeta:
        if p.beta_mode == BETA_ROWS:
            n_part = triton.cdiv(p.cols, p.block_l) * p.rows
        else:
            n_part = triton.cdiv(p.rows, p.block_r) * p.cols
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        partial = torch.empty(n_part, dtype=acc, device=x.device)
    else:
        partial = dx
    act_bwd_kernel[p.grid](
        g, x, dx, x if beta is None else beta, beta_value, partial, p.rows, p.cols, p.channels,
        ACT=act, BETA_MODE=p.beta_mode, NEED_DBETA=need_dbeta, BLOCK_R=p.block_r,
        BLOCK_L=p.block_l, FLAT=p.flat, INT64=_int64(x), num_warps=NUM_WARPS)
    if not need_dbeta:
        return None
    return partial.view(-1, p.channels).sum(0)
