"""Gated activations, act(gate) * up (SwiGLU, GeGLU, ...): forward in one pass over (gate, up),
backward in one pass over (grad, gate, up) writing dgate and dup.

The activation is ``math.py``'s, picked by the ``ACT`` selector as in ``elementwise.py``.  Each
tensor is walked as rows of contiguous elements with its own row stride (``fused_act/plan.py``
``row_plan``), so the two halves of a packed gate_up tensor, and the two halves of its gradient,
are read and written in place.  A beta tensor (one value) gets per-tile partial sums of its
gradient, which the host finishes (deterministic, no atomics).
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
    num_warps,
    store_partial,
    store_rounded,
    tail_apart,
    tile,
    whole,
)

INT32_MAX = 2**31 - 1


@triton.jit
def _at(ptr, rows, cols, stride, FLAT: tl.constexpr):
    """The tile's addresses in a tensor whose rows lie ``stride`` elements apart."""
    if FLAT:
        p = ptr + cols[None, :]
    else:
        p = ptr + rows[:, None] * stride + cols[None, :]
    return p


@triton.jit
def _glu_fwd(gate_ptr, up_ptr, out_ptr, beta_ptr, beta_value, s_gate, s_up, s_out, rows, cols,
             mask, ACT: tl.constexpr, BETA_MODE: tl.constexpr, FLAT: tl.constexpr):
    x = opmath(tl.load(_at(gate_ptr, rows, cols, s_gate, FLAT), mask=mask))
    u = opmath(tl.load(_at(up_ptr, rows, cols, s_up, FLAT), mask=mask))
    b = beta_at(beta_ptr, beta_value, rows, cols, 1, BETA_MODE)
    y = act_fwd(x, b, ACT) * u
    store_rounded(_at(out_ptr, rows, cols, s_out, FLAT), y, mask)


@triton.jit
def glu_fwd_kernel(gate_ptr, up_ptr, out_ptr, beta_ptr, beta_value, s_gate, s_up, s_out, R, L,
                   ACT: tl.constexpr, BETA_MODE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_L: tl.constexpr, FLAT: tl.constexpr, INT64: tl.constexpr,
                   SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    _, _, _, rows, cols, _, mask, _ = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT, INT64)
    if whole(pid, L, BLOCK_L, INT64, SPLIT):
        _glu_fwd(gate_ptr, up_ptr, out_ptr, beta_ptr, beta_value, s_gate, s_up, s_out, rows, cols,
                 None, ACT, BETA_MODE, FLAT)
    else:
        _glu_fwd(gate_ptr, up_ptr, out_ptr, beta_ptr, beta_value, s_gate, s_up, s_out, rows, cols,
                 mask, ACT, BETA_MODE, FLAT)


@triton.jit
def _glu_bwd(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, beta_ptr, beta_value, partial_ptr,
             s_g, s_gate, s_up, s_dgate, s_dup, rb, pid_l, rows, cols, R, L, mask, row_mask,
             ACT: tl.constexpr, BETA_MODE: tl.constexpr, NEED_DBETA: tl.constexpr,
             FLAT: tl.constexpr):
    g = opmath(tl.load(_at(g_ptr, rows, cols, s_g, FLAT), mask=mask))
    x = opmath(tl.load(_at(gate_ptr, rows, cols, s_gate, FLAT), mask=mask))
    u = opmath(tl.load(_at(up_ptr, rows, cols, s_up, FLAT), mask=mask))
    b = beta_at(beta_ptr, beta_value, rows, cols, 1, BETA_MODE)
    dfdx, dfdb = act_bwd(x, b, ACT)
    gu = g * u
    store_rounded(_at(dgate_ptr, rows, cols, s_dgate, FLAT), gu * dfdx, mask)
    store_rounded(_at(dup_ptr, rows, cols, s_dup, FLAT), g * act_fwd(x, b, ACT), mask)
    if NEED_DBETA:
        store_partial(partial_ptr, keep(gu * dfdb, mask), rb, pid_l, rows, cols, row_mask, R, L,
                      BETA_MODE)


@triton.jit
def glu_bwd_kernel(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, beta_ptr, beta_value,
                   partial_ptr, s_g, s_gate, s_up, s_dgate, s_dup, R, L, ACT: tl.constexpr,
                   BETA_MODE: tl.constexpr, NEED_DBETA: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_L: tl.constexpr, FLAT: tl.constexpr, INT64: tl.constexpr,
                   SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    _, rb, pid_l, rows, cols, _, mask, row_mask = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT,
                                                       INT64)
    if whole(pid, L, BLOCK_L, INT64, SPLIT):
        _glu_bwd(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, beta_ptr, beta_value, partial_ptr,
                 s_g, s_gate, s_up, s_dgate, s_dup, rb, pid_l, rows, cols, R, L, None, row_mask,
                 ACT, BETA_MODE, NEED_DBETA, FLAT)
    else:
        _glu_bwd(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, beta_ptr, beta_value, partial_ptr,
                 s_g, s_gate, s_up, s_dgate, s_dup, rb, pid_l, rows, cols, R, L, mask, row_mask,
                 ACT, BETA_MODE, NEED_DBETA, FLAT)


def _launch_args(act: int, p: Plan, strides: tuple[int, ...], dtype: torch.dtype) -> dict:
    # the plan's rows cover every element, but a row stride wider than a row reaches further
    int64 = p.int64 or (p.rows - 1) * max(strides) + p.cols > INT32_MAX
    return dict(ACT=act, BETA_MODE=p.layout, BLOCK_R=p.block_r, BLOCK_L=p.block_l, FLAT=p.flat,
                INT64=int64, SPLIT=tail_apart(p), num_warps=num_warps(dtype))


def forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, strides: tuple[int, ...],
            act: int, beta: torch.Tensor | None, beta_value: float,
            p: Plan) -> None:
    """Write act(gate) * up into ``out``; ``strides`` are the three tensors' row strides."""
    launch(glu_fwd_kernel)[p.grid](
        gate, up, out, gate if beta is None else beta, beta_value, *strides, p.rows, p.cols,
        **_launch_args(act, p, strides, gate.dtype))


def backward(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor,
             dup: torch.Tensor, strides: tuple[int, ...], act: int,
             beta: torch.Tensor | None, beta_value: float, partial: torch.Tensor | None,
             p: Plan) -> None:
    """Write g up act'(gate) into ``dgate`` and g act(gate) into ``dup`` (``strides``: the five
    tensors' row strides), and g up d act/d beta into ``partial`` if given."""
    # without d/dbeta the partials are never touched: any valid pointer will do
    launch(glu_bwd_kernel)[p.grid](
        g, gate, up, dgate, dup, gate if beta is None else beta, beta_value,
        dgate if partial is None else partial, *strides, p.rows, p.cols,
        NEED_DBETA=partial is not None, **_launch_args(act, p, strides, gate.dtype))


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
