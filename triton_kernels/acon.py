"""Fused ACON-C / Meta-ACON: forward in one pass over x, backward in one pass over (grad, x).

The backward writes dx and, per tile, partial sums of the three parameter gradients
(dp1 = sum g x S, dp2 = sum g x (1 - S), dbeta = sum g d^2 q; ``math.acon_c_bwd``), finished
with one small deterministic sum (``fused_act/plan.py``).  A per-sample beta (Meta-ACON,
(N, C)) is read per (sample, channel) and its gradient summed over the spatial positions only.
"""

import torch
import triton
import triton.language as tl

from .math import acon_c_bwd, acon_c_fwd, opmath, settle_cache_keys
from .tiling import (
    Plan,
    keep,
    launch,
    load_channel,
    num_warps,
    store_partial,
    store_rounded,
    tail_apart,
    tile,
    whole,
)


@triton.jit
def _params(p1_ptr, p2_ptr, beta_ptr, sample, rows, cols, row_mask, R, C, NB,
            LAYOUT: tl.constexpr, PER_SAMPLE: tl.constexpr):
    p1 = load_channel(p1_ptr, rows, cols, C, LAYOUT)
    p2 = load_channel(p2_ptr, rows, cols, C, LAYOUT)
    if not PER_SAMPLE:
        b = load_channel(beta_ptr, rows, cols, C, LAYOUT)
    elif LAYOUT == 1:
        # a row is one (sample, channel) run; N is outermost, so the sample is row // (R / N)
        n = rows // (R // NB)
        b = opmath(tl.load(beta_ptr + n * C + rows % C, mask=row_mask, other=1.0))[:, None]
    else:
        # the tile lies inside one sample (plan.py), so beta is one row of C values
        b = opmath(tl.load(beta_ptr + sample * C + cols, mask=cols < C, other=1.0))[None, :]
    return p1 - p2, p2, b


@triton.jit
def _acon_fwd(x_ptr, y_ptr, p1_ptr, p2_ptr, beta_ptr, sample, rows, cols, offs, R, C, NB, mask,
              row_mask, LAYOUT: tl.constexpr, PER_SAMPLE: tl.constexpr):
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    a, p2, b = _params(p1_ptr, p2_ptr, beta_ptr, sample, rows, cols, row_mask, R, C, NB, LAYOUT,
                       PER_SAMPLE)
    store_rounded(y_ptr + offs, acon_c_fwd(x, a, p2, b), mask)


@triton.jit
def acon_fwd_kernel(x_ptr, y_ptr, p1_ptr, p2_ptr, beta_ptr, R, L, C, NB, S,
                    LAYOUT: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_L: tl.constexpr, FLAT: tl.constexpr, INT64: tl.constexpr,
                    SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    sample, _, _, rows, cols, offs, mask, row_mask = tile(pid, R, L, S, BLOCK_R, BLOCK_L, FLAT,
                                                          INT64)
    if whole(pid, L, BLOCK_L, INT64, SPLIT):
        _acon_fwd(x_ptr, y_ptr, p1_ptr, p2_ptr, beta_ptr, sample, rows, cols, offs, R, C, NB,
                  None, row_mask, LAYOUT, PER_SAMPLE)
    else:
        _acon_fwd(x_ptr, y_ptr, p1_ptr, p2_ptr, beta_ptr, sample, rows, cols, offs, R, C, NB,
                  mask, row_mask, LAYOUT, PER_SAMPLE)


@triton.jit
def _acon_bwd(g_ptr, x_ptr, dx_ptr, p1_ptr, p2_ptr, beta_ptr, dp1_ptr, dp2_ptr, dbeta_ptr,
              sample, rb, pid_l, rows, cols, offs, R, L, C, NB, mask, row_mask,
              LAYOUT: tl.constexpr, PER_SAMPLE: tl.constexpr, NEED_PARAMS: tl.constexpr):
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    a, p2, b = _params(p1_ptr, p2_ptr, beta_ptr, sample, rows, cols, row_mask, R, C, NB, LAYOUT,
                       PER_SAMPLE)
    dydx, dp1, dp2, dbeta = acon_c_bwd(x, a, p2, b)
    store_rounded(dx_ptr + offs, g * dydx, mask)
    if NEED_PARAMS:
        # three pointers, not one plus k * P: an offset of 2 P computed in the 32 bits Triton
        # gives an int below 2^31 wraps from 2^30 partials and writes far below the buffer
        store_partial(dp1_ptr, keep(g * dp1, mask), rb, pid_l, rows, cols, row_mask, R, L,
                      LAYOUT)
        store_partial(dp2_ptr, keep(g * dp2, mask), rb, pid_l, rows, cols, row_mask, R, L,
                      LAYOUT)
        store_partial(dbeta_ptr, keep(g * dbeta, mask), rb, pid_l, rows, cols, row_mask, R, L,
                      LAYOUT)


@triton.jit
def acon_bwd_kernel(g_ptr, x_ptr, dx_ptr, p1_ptr, p2_ptr, beta_ptr, dp1_ptr, dp2_ptr, dbeta_ptr,
                    R, L, C, NB, S, LAYOUT: tl.constexpr, PER_SAMPLE: tl.constexpr,
                    NEED_PARAMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
                    FLAT: tl.constexpr, INT64: tl.constexpr, SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    sample, rb, pid_l, rows, cols, offs, mask, row_mask = tile(pid, R, L, S, BLOCK_R, BLOCK_L,
                                                               FLAT, INT64)
    if whole(pid, L, BLOCK_L, INT64, SPLIT):
        _acon_bwd(g_ptr, x_ptr, dx_ptr, p1_ptr, p2_ptr, beta_ptr, dp1_ptr, dp2_ptr, dbeta_ptr,
                  sample, rb, pid_l, rows, cols, offs, R, L, C, NB, None, row_mask, LAYOUT,
                  PER_SAMPLE, NEED_PARAMS)
    else:
        _acon_bwd(g_ptr, x_ptr, dx_ptr, p1_ptr, p2_ptr, beta_ptr, dp1_ptr, dp2_ptr, dbeta_ptr,
                  sample, rb, pid_l, rows, cols, offs, R, L, C, NB, mask, row_mask, LAYOUT,
                  PER_SAMPLE, NEED_PARAMS)


def _launch_args(p: Plan, per_sample: bool, dtype: torch.dtype) -> dict:
    # one channel and no per-sample beta is a flat plan, tiled like the parameterless ops
    return dict(LAYOUT=p.layout, PER_SAMPLE=per_sample, BLOCK_R=p.block_r, BLOCK_L=p.block_l,
                FLAT=p.flat, INT64=p.int64, SPLIT=tail_apart(p),
                num_warps=num_warps(dtype))


def forward(x: torch.Tensor, y: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
            beta: torch.Tensor, per_sample: bool, p: Plan) -> None:
    """Write ACON-C of ``x`` into ``y`` (dense, same strides; N outermost if ``per_sample``).
    p1, p2 hold C values, beta C or N * C (sample-major)."""
    launch(acon_fwd_kernel)[p.grid](x, y, p1, p2, beta, p.rows, p.cols, p1.numel(), x.shape[0],
                                    p.samples, **_launch_args(p, per_sample, x.dtype))


def backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, p1: torch.Tensor,
             p2: torch.Tensor, beta: torch.Tensor, per_sample: bool,
             partial: torch.Tensor | None, p: Plan) -> None:
    """Write grad * dy/dx into ``dx``, and the dp1, dp2, dbeta partials (3 x ``p.partials``)
    into ``partial`` if given."""
    # without parameter gradients the partials are never touched: any valid pointer will do
    slots = (dx,) * 3 if partial is None else partial.view(3, p.partials).unbind()
    launch(acon_bwd_kernel)[p.grid](g, x, dx, p1, p2, beta, *slots, p.rows, p.cols, p1.numel(),
                                    x.shape[0], p.samples, NEED_PARAMS=partial is not None,
                                    **_launch_args(p, per_sample, x.dtype))


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
