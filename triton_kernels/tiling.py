"""How the kernels walk a dense tensor, shared by every kernel family.

A dense tensor (no gaps, no overlaps, any dim order: contiguous, channels_last, permuted) is
processed in place of its memory, viewed as a matrix of ``rows`` x ``cols`` in tiles of
``block_r`` x ``block_l``, so that a per-channel (or per-sample) parameter costs one index per
row or column instead of a division per element:

* no parameter: one row of ``numel`` columns (plain 1-D blocks, ``flat``);
* ROWS: channels outer to a contiguous run (NCHW): a row is a run of ``inner = stride(1)``
  elements, its channel is ``row % C`` and, when N is outermost, its sample ``row // (R / N)``;
* COLS: channels innermost (channels_last, (N, C) after a Linear): a row holds the ``C``
  channels of one position, the channel is the column.  With per-sample parameters the rows of
  each of the ``samples`` samples are tiled apart, so no tile straddles two samples.

Per-tile partial sums (parameter gradients) go to one slot per (column block, row) in ROWS and
per (row block, column) in COLS; every slot is written on every call, and the caller sums the
small buffer in a fixed order: deterministic, no atomics, nothing to zero.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .math import opmath

BLOCK = 2048  # elements per program: 16 (bf16) or 8 (fp32) a thread at 4 warps (bench/NOTES.md)
NUM_WARPS = 4
MAX_COLS_BLOCK = 64  # COLS tiles: at least BLOCK // 64 rows reduced into each partial
INT64_THRESHOLD = 2**31  # numel from which offsets are computed in 64 bits

ROWS, COLS = 1, 2


@dataclass(frozen=True)
class Plan:
    """An R x L matrix in ``block_r`` x ``block_l`` tiles, rows split evenly into ``samples``."""

    rows: int
    cols: int
    channels: int
    layout: int
    block_r: int
    block_l: int
    samples: int = 1

    @property
    def flat(self) -> bool:
        return self.rows == 1 and self.block_r == 1

    @property
    def row_blocks(self) -> int:
        return self.samples * triton.cdiv(self.rows // self.samples, self.block_r)

    @property
    def col_blocks(self) -> int:
        return triton.cdiv(self.cols, self.block_l)

    @property
    def grid(self) -> tuple[int]:
        return (self.row_blocks * self.col_blocks,)

    @property
    def partials(self) -> int:
        """Partial-sum slots per reduced quantity."""
        if self.layout == ROWS:
            return self.col_blocks * self.rows
        return self.row_blocks * self.cols


def flat(n: int) -> Plan:
    """One row of ``n`` elements."""
    return Plan(1, n, 1, ROWS, 1, BLOCK)


def channel_plan(x: torch.Tensor, channels: int, per_sample: bool = False) -> Plan:
    """Tile a dense ``x`` of shape (N, C, *) for parameters of ``channels`` (1 or C) values per
    channel, or per (sample, channel) when ``per_sample`` (then N must be outermost in memory)."""
    n = x.numel()
    if channels == 1:
        if not per_sample:
            return flat(n)
        inner = n // x.shape[0]
        block_l = min(triton.next_power_of_2(inner), BLOCK)
        return Plan(x.shape[0], inner, 1, ROWS, BLOCK // block_l, block_l)
    inner = x.stride(1)
    if inner == 1:
        samples = x.shape[0] if per_sample else 1
        rows_per_sample = triton.next_power_of_2(n // channels // samples)
        # few rows per sample (an (N, C) input with a per-sample beta): wide, short tiles
        block_l = min(triton.next_power_of_2(channels),
                      max(MAX_COLS_BLOCK, BLOCK // rows_per_sample))
        block_r = min(BLOCK // block_l, rows_per_sample)
        return Plan(n // channels, channels, channels, COLS, block_r, block_l, samples)
    block_l = min(triton.next_power_of_2(inner), BLOCK)
    return Plan(n // inner, inner, channels, ROWS, BLOCK // block_l, block_l)


def int64(x: torch.Tensor) -> bool:
    """Whether offsets into ``x`` need 64 bits."""
    return x.numel() >= INT64_THRESHOLD


@triton.jit
def tile(pid, R, L, S, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
         INT64: tl.constexpr):
    """This program's tile: (sample, row block, column block, rows, cols, offsets, mask,
    row mask); the row block counts across samples."""
    if INT64:
        pid = pid.to(tl.int64)
    rows_per_sample = R // S
    n_l = tl.cdiv(L, BLOCK_L)
    n_r = tl.cdiv(rows_per_sample, BLOCK_R)
    pid_l = pid % n_l
    t = pid // n_l
    sample = t // n_r
    pid_r = t % n_r
    r_in = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = sample * rows_per_sample + r_in
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    if FLAT:
        # one row (R == 1, BLOCK_R == 1): offsets without the row multiply, which the compiler
        # sees as contiguous and aligned (16-byte accesses) whatever L is
        offs = cols[None, :]
    else:
        offs = rows[:, None] * L + cols[None, :]
    row_mask = r_in < rows_per_sample
    mask = row_mask[:, None] & (cols[None, :] < L)
    return sample, sample * n_r + pid_r, pid_l, rows, cols, offs, mask, row_mask


@triton.jit
def store_partial(partial_ptr, v, block_r_id, pid_l, rows, cols, row_mask, R, L,
                  LAYOUT: tl.constexpr):
    """Reduce the tile ``v`` to one partial per row (ROWS) or per column (COLS) and store it."""
    acc = partial_ptr.dtype.element_ty
    if LAYOUT == 1:
        tl.store(partial_ptr + pid_l * R + rows, tl.sum(v, axis=1).to(acc), mask=row_mask)
    else:
        tl.store(partial_ptr + block_r_id * L + cols, tl.sum(v, axis=0).to(acc), mask=cols < L)


@triton.jit
def load_channel(ptr, rows, cols, C, LAYOUT: tl.constexpr):
    """A per-channel parameter, broadcastable against the tile, upcast like the data."""
    if LAYOUT == 1:
        v = tl.load(ptr + rows % C)[:, None]
    else:
        v = tl.load(ptr + cols, mask=cols < C, other=1.0)[None, :]
    return opmath(v)
