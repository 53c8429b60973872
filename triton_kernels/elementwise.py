"""Generic forward and backward kernels for the elementwise activations.

One forward and one backward kernel serve every activation (``ACT`` selects the math in
``math.py``) and every dtype (loads are upcast by ``opmath``).  They walk the tensor as
``fused_act/plan.py`` lays it out: flat without a beta tensor, by rows or columns with a
per-channel one.  The backward kernel reduces d(loss)/d(beta) inside each tile into per-tile
partials, summed in a fixed order (``plan.channel_sums``: deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from .. import plan
from .math import act_bwd, act_fwd, opmath
from .tiling import NUM_WARPS, load_channel, store_partial, tile


@triton.jit
def _beta(beta_ptr, beta_value, rows, cols, C, BETA_MODE: tl.constexpr):
    if BETA_MODE == 0:
        b = beta_value
    else:
        b = load_channel(beta_ptr, rows, cols, C, BETA_MODE)
    return b


@triton.jit
def act_fwd_kernel(x_ptr, y_ptr, beta_ptr, beta_value, R, L, C,
                   ACT: tl.constexpr, BETA_MODE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_L: tl.constexpr, FLAT: tl.constexpr, INT64: tl.constexpr):
    _, _, _, rows, cols, offs, mask, _ = tile(tl.program_id(0), R, L, 1, BLOCK_R, BLOCK_L,
                                              FLAT, INT64)
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    b = _beta(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    y = act_fwd(x, b, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_bwd_kernel(g_ptr, x_ptr, dx_ptr, beta_ptr, beta_value, partial_ptr, R, L, C,
                   ACT: tl.constexpr, BETA_MODE: tl.constexpr, NEED_DBETA: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                   INT64: tl.constexpr):
    _, rb, pid_l, rows, cols, offs, mask, row_mask = tile(tl.program_id(0), R, L, 1, BLOCK_R,
                                                          BLOCK_L, FLAT, INT64)
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    b = _beta(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    dydx, dydb = act_bwd(x, b, ACT)
    tl.store(dx_ptr + offs, (g * dydx).to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DBETA:
        store_partial(partial_ptr, tl.where(mask, g * dydb, 0.0), rb, pid_l, rows, cols,
                      row_mask, R, L, BETA_MODE)


def _plan(x: torch.Tensor, beta: torch.Tensor | None) -> plan.Plan:
    if beta is None:
        return plan.flat(x.numel(), plan.SCALAR)
    return plan.channel_plan(x, beta.numel())


def forward(x: torch.Tensor, y: torch.Tensor, act: int, beta: torch.Tensor | None,
            beta_value: float) -> None:
    """Write f(x) into ``y``; both dense with identical strides, ``beta`` flat (1 or C values)."""
    p = _plan(x, beta)
    act_fwd_kernel[p.grid](
        x, y, x if beta is None else beta, beta_value, p.rows, p.cols, p.channels,
        ACT=act, BETA_MODE=p.layout, BLOCK_R=p.block_r, BLOCK_L=p.block_l, FLAT=p.flat,
        INT64=plan.int64(x), num_warps=NUM_WARPS)


def backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, act: int,
             beta: torch.Tensor | None, beta_value: float, need_dbeta: bool
             ) -> torch.Tensor | None:
    """Write grad * f'(x) into ``dx``; return d/dbeta per channel (C values, fp32 or fp64).

    ``g``, ``x`` and ``dx`` are dense with identical strides; ``beta`` is flat (1 or C values).
    """
    p = _plan(x, beta)
    acc = plan.accumulator(x)
    # without d/dbeta the partials are never touched: any valid pointer will do
    partial = torch.empty(p.partials, dtype=acc, device=x.device) if need_dbeta else dx
    act_bwd_kernel[p.grid](
        g, x, dx, x if beta is None else beta, beta_value, partial, p.rows, p.cols, p.channels,
        ACT=act, BETA_MODE=p.layout, NEED_DBETA=need_dbeta, BLOCK_R=p.block_r,
        BLOCK_L=p.block_l, FLAT=p.flat, INT64=plan.int64(x), num_warps=NUM_WARPS)
    if not need_dbeta:
        return None
    return plan.channel_sums(partial, p)
