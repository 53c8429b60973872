"""Fused FReLU max step: y = max(x, t) in one pass, writing a one-byte win code for backward,
and the backward in one pass over (grad, code); plus the eval-mode step max(x, a t + b) with
BatchNorm's running statistics folded into per-channel a, b, so BatchNorm costs no pass."""

import torch
import triton
import triton.language as tl

from .math import max_bits, max_bwd, max_fwd, opmath, settle_cache_keys
from .tiling import Plan, launch, load_channel, num_warps, store_rounded, tail_apart, tile, whole


@triton.jit
def _max_fwd(x_ptr, t_ptr, y_ptr, code_ptr, offs, mask, WRITE_CODE: tl.constexpr):
    xs = tl.load(x_ptr + offs, mask=mask)
    ts = tl.load(t_ptr + offs, mask=mask)
    # compared in opmath: exact, and the interpreter holds bf16 as raw integers
    y, code = max_fwd(opmath(xs), opmath(ts))
    if xs.dtype.primitive_bitwidth == 16:
        # the same values (upcast, they round back exactly), selected without the spills
        y = opmath(max_bits(xs, ts))
    store_rounded(y_ptr + offs, y, mask)
    if WRITE_CODE:
        store_rounded(code_ptr + offs, code, mask)


@triton.jit
def max_fwd_kernel(x_ptr, t_ptr, y_ptr, code_ptr, N, WRITE_CODE: tl.constexpr,
                   BLOCK: tl.constexpr, INT64: tl.constexpr, SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    _, _, _, _, _, offs, mask, _ = tile(pid, 1, N, 1, 1, BLOCK, True, INT64)
    if whole(pid, N, BLOCK, INT64, SPLIT):
        _max_fwd(x_ptr, t_ptr, y_ptr, code_ptr, offs, None, WRITE_CODE)
    else:
        _max_fwd(x_ptr, t_ptr, y_ptr, code_ptr, offs, mask, WRITE_CODE)


@triton.jit
def _max_bwd(g_ptr, code_ptr, dx_ptr, dt_ptr, offs, mask):
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    code = tl.load(code_ptr + offs, mask=mask)
    dx, dt = max_bwd(g, code)
    store_rounded(dx_ptr + offs, dx, mask)
    store_rounded(dt_ptr + offs, dt, mask)


@triton.jit
def max_bwd_kernel(g_ptr, code_ptr, dx_ptr, dt_ptr, N, BLOCK: tl.constexpr,
                   INT64: tl.constexpr, SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    _, _, _, _, _, offs, mask, _ = tile(pid, 1, N, 1, 1, BLOCK, True, INT64)
    if whole(pid, N, BLOCK, INT64, SPLIT):
        _max_bwd(g_ptr, code_ptr, dx_ptr, dt_ptr, offs, None)
    else:
        _max_bwd(g_ptr, code_ptr, dx_ptr, dt_ptr, offs, mask)


@triton.jit
def _max_affine(x_ptr, t_ptr, a_ptr, b_ptr, y_ptr, rows, cols, offs, C, mask,
                LAYOUT: tl.constexpr):
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    t = opmath(tl.load(t_ptr + offs, mask=mask))
    a = load_channel(a_ptr, rows, cols, C, LAYOUT)
    b = load_channel(b_ptr, rows, cols, C, LAYOUT)
    y, _ = max_fwd(x, t * a + b)
    store_rounded(y_ptr + offs, y, mask)


@triton.jit
def max_affine_kernel(x_ptr, t_ptr, a_ptr, b_ptr, y_ptr, R, L, C, LAYOUT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                      INT64: tl.constexpr, SPLIT: tl.constexpr = False):
    pid = tl.program_id(0)
    _, _, _, rows, cols, offs, mask, _ = tile(pid, R, L, 1, BLOCK_R, BLOCK_L, FLAT, INT64)
    if whole(pid, L, BLOCK_L, INT64, SPLIT):
        _max_affine(x_ptr, t_ptr, a_ptr, b_ptr, y_ptr, rows, cols, offs, C, None, LAYOUT)
    else:
        _max_affine(x_ptr, t_ptr, a_ptr, b_ptr, y_ptr, rows, cols, offs, C, mask, LAYOUT)


def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, code: torch.Tensor | None,
            p: Plan) -> None:
    """y = max(x, t), and the win code if ``code`` is given; all dense with x's strides; ``p``
    is flat."""
    launch(max_fwd_kernel)[p.grid](x, t, y, y if code is None else code, p.cols,
                                   WRITE_CODE=code is not None, BLOCK=p.block_l, INT64=p.int64,
                                   SPLIT=tail_apart(p), num_warps=num_warps(x.dtype))


def backward(g: torch.Tensor, code: torch.Tensor, dx: torch.Tensor, dt: torch.Tensor,
             p: Plan) -> None:
    """dx, dt from the incoming gradient and the win code (all with the same strides)."""
    launch(max_bwd_kernel)[p.grid](g, code, dx, dt, p.cols, BLOCK=p.block_l, INT64=p.int64,
                                   SPLIT=tail_apart(p), num_warps=num_warps(g.dtype))


def forward_affine(x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   y: torch.Tensor, p: Plan) -> None:
    """y = max(x, a t + b) with a, b per channel (C values, fp32)."""
    launch(max_affine_kernel)[p.grid](
        x, t, a, b, y, p.rows, p.cols, p.channels, LAYOUT=p.layout, BLOCK_R=p.block_r,
        BLOCK_L=p.block_l, FLAT=p.flat, INT64=p.int64, SPLIT=tail_apart(p),
        num_warps=num_warps(x.dtype))


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
