"""BatchNorm + activation: per-channel statistics, and y = f((x - c) a + b) forward and backward.

Three kernels serve training and eval (``fused_act/ops/batchnorm.py`` composes them):

* ``stats``: per tile and channel, the count, the sum and the sum of squared distances from the
  tile's own mean, which the host merges into the mean and variance (Chan et al.'s pairwise
  update: nothing cancels), one read of x;
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
from .math import acon_c_bwd, acon_c_fwd, act_bwd, act_fwd, opmath, settle_cache_keys
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
def stats_kernel(x_ptr, n_ptr, s_ptr, m2_ptr, R, L, C, LAYOUT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                 INT64: tl.constexpr):
    pid = tl.program_id(0)
    _, rb, pid_l, rows, cols, offs, mask, row_mask = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT,
                                                          INT64)
    x = keep(opmath(tl.load(x_ptr + offs, mask=mask)), mask)
    ones = keep(x * 0.0 + 1.0, mask)
    # the tile's own mean of each channel, from the values it holds: the squares are summed
    # about it, so nothing cancels however far the channel's values lie from 0
    if LAYOUT == 1:
        n = tl.sum(ones, axis=1)[:, None]
        mean = tl.sum(x, axis=1)[:, None] / tl.maximum(n, 1.0)
    else:
        n = tl.sum(ones, axis=0)[None, :]
        mean = tl.sum(x, axis=0)[None, :] / tl.maximum(n, 1.0)
    d = keep(x - mean, mask)
    store_partial(n_ptr, ones, rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)
    store_partial(s_ptr, x, rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)
    store_partial(m2_ptr, d * d, rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)


@triton.jit
def _z(x_ptr, c_ptr, a_ptr, b_ptr, rows, cols, offs, C, mask, LAYOUT: tl.constexpr):
    """(x - c, a, z = (x - c) a + b) over the tile."""
    xc = opmath(tl.load(x_ptr + offs, mask=mask)) - load_channel(c_ptr, rows, cols, C, LAYOUT)
    a = load_channel(a_ptr, rows, cols, C, LAYOUT)
    return xc, a, xc * a + load_channel(b_ptr, rows, cols, C, LAYOUT)


@triton.jit
def _act(z, beta, p1_ptr, p2_ptr, rows, cols, C, ACT: tl.constexpr, LAYOUT: tl.constexpr,
         ACON: tl.constexpr):
    """f(z): the activation ACT, or with ACON ACON-C of per-channel p1, p2 and beta."""
    if ACON:
        p2 = load_channel(p2_ptr, rows, cols, C, LAYOUT)
        y = acon_c_fwd(z, load_channel(p1_ptr, rows, cols, C, LAYOUT) - p2, p2, beta)
    else:
        y = act_fwd(z, beta, ACT)
    return y


@triton.jit
def _act_grads(z, beta, p1_ptr, p2_ptr, rows, cols, C, ACT: tl.constexpr,
               LAYOUT: tl.constexpr, ACON: tl.constexpr):
    """(f'(z), then df/dbeta, or with ACON df/dp1, df/dp2, df/dbeta)."""
    if ACON:
        p2 = load_channel(p2_ptr, rows, cols, C, LAYOUT)
        dydz, d1, d2, d3 = acon_c_bwd(z, load_channel(p1_ptr, rows, cols, C, LAYOUT) - p2, p2,
                                      beta)
    else:
        dydz, d1 = act_bwd(z, beta, ACT)
        d2, d3 = d1, d1
    return dydz, d1, d2, d3


@triton.jit
def affine_act_fwd_kernel(x_ptr, y_ptr, c_ptr, a_ptr, b_ptr, beta_ptr, beta_value, p1_ptr,
                          p2_ptr, R, L, C, ACT: tl.constexpr, ACON: tl.constexpr,
                          LAYOUT: tl.constexpr, BETA_MODE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                          INT64: tl.constexpr):
    pid = tl.program_id(0)
    _, _, _, rows, cols, offs, mask, _ = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT, INT64)
    _, _, z = _z(x_ptr, c_ptr, a_ptr, b_ptr, rows, cols, offs, C, mask, LAYOUT)
    beta = beta_at(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    store_rounded(y_ptr + offs, _act(z, beta, p1_ptr, p2_ptr, rows, cols, C, ACT, LAYOUT, ACON),
                  mask)


@triton.jit
def affine_act_bwd_kernel(g_ptr, x_ptr, dx_ptr, c_ptr, a_ptr, b_ptr, beta_ptr, beta_value,
                          p1_ptr, p2_ptr, k1_ptr, k0_ptr, s1_ptr, s2_ptr, r3_ptr, r4_ptr,
                          r5_ptr, R, L, C, ACT: tl.constexpr, ACON: tl.constexpr,
                          LAYOUT: tl.constexpr, BETA_MODE: tl.constexpr,
                          WRITE_DX: tl.constexpr, CORRECT: tl.constexpr,
                          NEED_SUMS: tl.constexpr, EXTRA: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                          INT64: tl.constexpr):
    pid = tl.program_id(0)
    _, rb, pid_l, rows, cols, offs, mask, row_mask = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT,
                                                          INT64)
    xc, a, z = _z(x_ptr, c_ptr, a_ptr, b_ptr, rows, cols, offs, C, mask, LAYOUT)
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    beta = beta_at(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    dydz, d1, d2, d3 = _act_grads(z, beta, p1_ptr, p2_ptr, rows, cols, C, ACT, LAYOUT, ACON)
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
    # the activation's own parameters: beta (EXTRA 1), or ACON-C's p1, p2, beta (EXTRA 3)
    if EXTRA >= 1:
        store_partial(r3_ptr, keep(g * d1, mask), rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)
    if EXTRA == 3:
        store_partial(r4_ptr, keep(g * d2, mask), rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)
        store_partial(r5_ptr, keep(g * d3, mask), rb, pid_l, rows, cols, row_mask, R, L, LAYOUT)


def _tiling(p: Plan, dtype: torch.dtype) -> dict:
    return dict(LAYOUT=p.layout, BLOCK_R=p.block_r, BLOCK_L=p.block_l, FLAT=p.flat,
                INT64=p.int64, num_warps=num_warps(dtype))


def stats(x: torch.Tensor, partial: torch.Tensor, p: Plan) -> None:
    """Store, per tile and channel, the count of x's values, their sum, and the sum of their
    squared distances from the tile's own mean of them (3 x ``p.partials`` slots), which
    the host merges (``fused_act/ops/batchnorm.py``)."""
    n, s, m2 = partial.view(3, p.partials).unbind()
    launch(stats_kernel)[p.grid](x, n, s, m2, p.rows, p.cols, p.channels, **_tiling(p, x.dtype))


def affine_act_forward(x: torch.Tensor, y: torch.Tensor, act: int, c: torch.Tensor,
                       a: torch.Tensor, b: torch.Tensor, beta: torch.Tensor | None,
                       beta_value: float, p: Plan,
                       acon: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Write f((x - c) a + b) into ``y``; c, a, b (and a tensor beta) hold C values.  With
    ``acon`` = (p1, p2) of C values, f is ACON-C of p1, p2 and beta (``act`` unused)."""
    p1, p2 = (x, x) if acon is None else acon
    launch(affine_act_fwd_kernel)[p.grid](
        x, y, c, a, b, x if beta is None else beta, beta_value, p1, p2, p.rows, p.cols,
        p.channels, ACT=act, ACON=acon is not None, BETA_MODE=0 if beta is None else p.layout,
        **_tiling(p, x.dtype))


def affine_act_backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor | None, act: int,
                        c: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        beta: torch.Tensor | None, beta_value: float,
                        k: tuple[torch.Tensor, torch.Tensor] | None,
                        partial: torch.Tensor | None, p: Plan,
                        acon: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """With ``dx``: write dx = a g f'(z) (+ k1 (x - c) + k0 where ``k`` = (k1, k0)); with
    ``partial``: store the partials of g f'(z) and g f'(z) (x - c), then of the activation's
    parameter gradients in the rows after them: g df/dbeta (3 rows), or with ``acon`` g df/dp1,
    g df/dp2, g df/dbeta (5 rows)."""
    # rows of partials not asked for are never touched: any valid pointer will do
    rows = () if partial is None else partial.view(-1, p.partials).unbind()
    k1, k0 = (x, x) if k is None else k
    p1, p2 = (x, x) if acon is None else acon
    launch(affine_act_bwd_kernel)[p.grid](
        g, x, x if dx is None else dx, c, a, b, x if beta is None else beta, beta_value, p1, p2,
        k1, k0, *(*rows, x, x, x, x, x)[:5], p.rows, p.cols, p.channels, ACT=act,
        ACON=acon is not None, BETA_MODE=0 if beta is None else p.layout,
        WRITE_DX=dx is not None, CORRECT=k is not None, NEED_SUMS=partial is not None,
        EXTRA=max(len(rows) - 2, 0), **_tiling(p, x.dtype))


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
