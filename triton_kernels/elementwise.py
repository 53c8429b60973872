"""Generic forward and backward kernels for the elementwise activations.

One forward and one backward kernel serve every activation (``ACT`` selects the math in
``math.py``) and every dtype (loads are upcast by ``opmath``).  They walk the tensor as
the host's plan lays it out (``fused_act/plan.py``): flat without a beta tensor, by rows or
columns with a per-channel one.  The backward kernel reduces d(loss)/d(beta) inside each tile into
per-tile partials, which the host sums in a fixed order (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from .math import act_bwd, act_fwd, opmath, settle_cache_keys
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
def beta_at(beta_ptr, beta_value, rows, cols, C, BETA_MODE: tl.constexpr):
    """The activation's beta over the tile: the scalar ``beta_value`` (BETA_MODE 0), else read
    per channel as the plan's layout says."""
    if BETA_MODE == 0:
        b = beta_value
    else:
        b = load_channel(beta_ptr, rows, cols, C, BETA_MODE)
    return b


@triton.jit
def _act_fwd(x_ptr, y_ptr, beta_ptr, beta_value, rows, cols, offs, C, mask,
             ACT: tl.constexpr, BETA_MODE: tl.constexpr):
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    b = beta_at(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    y = act_fwd(x, b, ACT)
    store_rounded(y_ptr + offs, y, mask)


@triton.jit
def act_fwd_kernel(x_ptr, y_ptr, beta_ptr, beta_value, R, L, C,
                   ACT: tl.constexpr, BETA_MODE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_L: tl.constexpr, FLAT: tl.constexpr, INT64: tl.constexpr,
                   SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    _, _, _, rows, cols, offs, mask, _ = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT, INT64)
    if whole(pid, L, BLOCK_L, INT64, SPLIT):
        _act_fwd(x_ptr, y_ptr, beta_ptr, beta_value, rows, cols, offs, C, None, ACT, BETA_MODE)
    else:
        _act_fwd(x_ptr, y_ptr, beta_ptr, beta_value, rows, cols, offs, C, mask, ACT, BETA_MODE)


@triton.jit
def _act_bwd(g_ptr, x_ptr, dx_ptr, beta_ptr, beta_value, partial_ptr, rb, pid_l, rows, cols,
             offs, R, L, C, mask, row_mask, ACT: tl.constexpr, BETA_MODE: tl.constexpr,
             NEED_DBETA: tl.constexpr):
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    b = beta_at(beta_ptr, beta_value, rows, cols, C, BETA_MODE)
    dydx, dydb = act_bwd(x, b, ACT)
    store_rounded(dx_ptr + offs, g * dydx, mask)
    if NEED_DBETA:
        store_partial(partial_ptr, keep(g * dydb, mask), rb, pid_l, rows, cols, row_mask, R, L,
                      BETA_MODE)


@triton.jit
def act_bwd_kernel(g_ptr, x_ptr, dx_ptr, beta_ptr, beta_value, partial_ptr, R, L, C,
                   ACT: tl.constexpr, BETA_MODE: tl.constexpr, NEED_DBETA: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                   INT64: tl.constexpr, SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    _, rb, pid_l, rows, cols, offs, mask, row_mask = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT,
                                                          INT64)
    if whole(pid, L, BLOCK_L, INT64, SPLIT):
        _act_bwd(g_ptr, x_ptr, dx_ptr, beta_ptr, beta_value, partial_ptr, rb, pid_l, rows, cols,
                 offs, R, L, C, None, row_mask, ACT, BETA_MODE, NEED_DBETA)
    else:
        _act_bwd(g_ptr, x_ptr, dx_ptr, beta_ptr, beta_value, partial_ptr, rb, pid_l, rows, cols,
                 offs, R, L, C, mask, row_mask, ACT, BETA_MODE, NEED_DBETA)


def forward(x: torch.Tensor, y: torch.Tensor, act: int, beta: torch.Tensor | None,
            beta_value: float, p: Plan) -> None:
    """Write f(x) into ``y``; both dense with identical strides, ``beta`` flat (1 or C values)."""
    launch(act_fwd_kernel)[p.grid](
        x, y, x if beta is None else beta, beta_value, p.rows, p.cols, p.channels,
        ACT=act, BETA_MODE=p.layout, BLOCK_R=p.block_r, BLOCK_L=p.block_l, FLAT=p.flat,
        INT64=p.int64, SPLIT=tail_apart(p), num_warps=num_warps(x.dtype))


def backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, act: int,
             beta: torch.Tensor | None, beta_value: float, partial: torch.Tensor | None,
             p: Plan) -> None:
    """Write grad * f'(x) into ``dx``, and grad * df/dbeta into ``partial`` if given."""
    # without d/dbeta the partials are never touched: any valid pointer will do
    launch(act_bwd_kernel)[p.grid](
        g, x, dx, x if beta is None else beta, beta_value, dx if partial is None else partial,
        p.rows, p.cols, p.channels, ACT=act, BETA_MODE=p.layout, NEED_DBETA=partial is not None,
        BLOCK_R=p.block_r, BLOCK_L=p.block_l, FLAT=p.flat, INT64=p.int64,
        SPLIT=tail_apart(p), num_warps=num_warps(x.dtype))


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
