"""BatchNorm + activation: per-channel statistics, and y = f((x - c) a + b) forward and backward.

Three kernels serve training and eval (``fused_act/ops/batchnorm.py`` composes them):

* ``stats``: per tile, the partial sums of d and d^2 with d = x - shift (a value of the same
  channel, so that the variance E[d^2] - E[d]^2 does not cancel), one read of x;
* ``affine_act_fwd``: y = f(z), z = (x - c) a + b with per-channel c, a, b (training: the batch
  mean, weight / std, bias; eval: the running statistics folded the same way);
* ``affine_act_bwd``: dz = g f'(z); writes dx = a dz (+ k1 (x - c) + k0 per channel: the
  training backward's terms through the batch statistics) and/or stores per-tile partials of
  dz, dz (x - c) and, for a learnable beta, g df/dbeta.  Training runs it twice (sums, then dx);
  eval once.
"""

import torch
import triton
import triton.language as tl

from .elementwise import beta_at
from .math import act_bwd, act_fwd, opmath, settle_cache_keys
from .tiling import (
    Plan,
    keep,
    launch,
    load_channel,
    num_warps,
    store_partial,
    store_rounded,
    tile,
)


@triton.jit
def stats_kernel(x_ptr, shift_ptr, s1_ptr, s2_ptr, R, L, C, LAYOUT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                 INT64: tl.constexpr):
    pid = tl.program_id(0)
    _, rb, pid_l, rows, cols, offs, mask, row_mask = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT,
                                                          INT64)
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    d = keep(x - load_channel(shift_ptr, rows, cols, C, LAYOUT), mask)
    store_partial(s1_ptr, d, rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)
    store_partial(s2_ptr, d * d, rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)


@triton.jit
def _z(x_ptr, c_ptr, a_ptr, b_ptr, rows, cols, offs, C, mask, LAYOUT: tl.constexpr):
    """(x - c, a, z = (x - c) a + b) over the tile."""
    xc = opmath(tl.load(x_ptr + offs, mask=mask)) - load_channel(c_ptr, rows, cols, C, LAYOUT)
    a = load_channel(a_ptr, rows, cols, C, LAYOUT)
    return xc, a, xc * a + load_channel(b_ptr, rows, cols, C, LAYOUT)


@triton.jit
def affine_act_fwd_kernel(x_ptr, y_ptr, c_ptr, a_ptr, b_ptr, beta_ptr, beta_value, R, L, C,
                          ACT: tl.constexpr, LAYOUT: tl.constexpr, BETA_MODE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                          INT64: tl.constexpr):
    pid = tl.program_id(0)
    _, _, _, rows, cols, offs, mask, _ = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT, INT64)
    _, _, z = _z(x_ptr, c_ptr, a_ptr, b_ptr, rows, cols, offs, C, mask, LAYOUT)
    beta = beta_at(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    store_rounded(y_ptr + offs, act_fwd(z, beta, ACT), mask)


@triton.jit
def affine_act_bwd_kernel(g_ptr, x_ptr, dx_ptr, c_ptr, a_ptr, b_ptr, beta_ptr, beta_value,
                          k1_ptr, k0_ptr, s1_ptr, s2_ptr, sb_ptr, R, L, C, ACT: tl.constexpr,
                          LAYOUT: tl.constexpr, BETA_MODE: tl.constexpr,
                          WRITE_DX: tl.constexpr, CORRECT: tl.constexpr,
                          NEED_SUMS: tl.constexpr, NEED_DBETA: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                          INT64: tl.constexpr):
    pid = tl.program_id(0)
    _, rb, pid_l, rows, cols, offs, mask, row_mask = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT,
                                                          INT64)
    xc, a, z = _z(x_ptr, c_ptr, a_ptr, b_ptr, rows, cols, offs, C, mask, LAYOUT)
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    beta = beta_at(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    dydz, dydb = act_bwd(z, beta, ACT)
    dz = g * dydz
    if WRITE_DX:
        dx = dz * a
        if CORRECT:
            dx = dx + xc * load_channel(k1_ptr, rows, cols, C, LAYOUT) + load_channel(
                k0_ptr, rows, cols, C, LAYOUT)
        store_rounded(dx_ptr + offs, dx, mask)
    if NEED_SUMS:
        store_partial(s1_ptr, keep(dz, mask), rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)
        store_partial(s2_ptr, keep(dz * xc, mask), rb, pid_l, rows, cols, row_mask, R, L,
                      LAYOUT)
    if NEED_DBETA:
        store_partial(sb_ptr, keep(g * dydb, mask), rb, pid_l, rows, cols, row_mask, R, L,
                      LAYOUT)


def _tiling(p: Plan, dtype: torch.dtype) -> dict:
    return dict(LAYOUT=p.layout, BLOCK_R=p.block_r, BLOCK_L=p.block_l, FLAT=p.flat,
                INT64=p.int64, num_warps=num_warps(dtype))


def stats(x: torch.Tensor, shift: torch.Tensor, partial: torch.Tensor, p: Plan) -> None:
    """Store the partials of sum(x - shift) and sum((x - shift)^2) per channel into
    ``partial`` (2 x ``p.partials`` slots); ``shift`` holds C values."""
    s1, s2 = partial.view(2, p.partials).unbind()
    launch(stats_kernel)[p.grid](x, shift, s1, s2, p.rows, p.cols, p.channels,
                                 **_tiling(p, x.dtype))


def affine_act_forward(x: torch.Tensor, y: torch.Tensor, act: int, c: torch.Tensor,
                       a: torch.Tensor, b: torch.Tensor, beta: torch.Tensor | None,
                       beta_value: float, p: Plan) -> None:
    """Write f((x - c) a + b) into ``y``; c, a, b (and a tensor beta) hold C values."""
    launch(affine_act_fwd_kernel)[p.grid](
        x, y, c, a, b, x if beta is None else beta, beta_value, p.rows, p.cols, p.channels,
        ACT=act, BETA_MODE=0 if beta is None else p.layout, **_tiling(p, x.dtype))


def affine_act_backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor | None, act: int,
                        c: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        beta: torch.Tensor | None, beta_value: float,
                        k: tuple[torch.Tensor, torch.Tensor] | None,
                        partial: torch.Tensor | None, p: Plan) -> None:
    """With ``dx``: write dx = a g f'(z) (+ k1 (x - c) + k0 where ``k`` = (k1, k0)); with
    ``partial``: store the partials of g f'(z) and g f'(z) (x - c), and of g df/dbeta where
    ``partial`` has a third row (2 or 3 x ``p.partials`` slots)."""
    # rows of partials not asked for are never touched: any valid pointer will do
    rows = () if partial is None else partial.view(-1, p.partials).unbind()
    slots = (*rows, x, x, x)[:3]
    k1, k0 = (x, x) if k is None else k
    launch(affine_act_bwd_kernel)[p.grid](
        g, x, x if dx is None else dx, c, a, b, x if beta is None else beta, beta_value, k1, k0,
        *slots, p.rows, p.cols, p.channels, ACT=act,
        BETA_MODE=0 if beta is None else p.layout, WRITE_DX=dx is not None,
        CORRECT=k is not None, NEED_SUMS=partial is not None,
        NEED_DBETA=len(rows) == 3, **_tiling(p, x.dtype))


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
