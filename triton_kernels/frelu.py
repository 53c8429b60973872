"""Fused FReLU max step: y = max(x, t) in one pass, writing a one-byte win code for backward,
and the backward in one pass over (grad, code); plus the eval-mode step max(x, a t + b) with
BatchNorm's running statistics folded into per-channel a, b, so BatchNorm costs no pass."""

import torch
import triton
import triton.language as tl

from .math import max_bwd, max_fwd, opmath
from .tiling import NUM_WARPS, Plan, load_channel, store_rounded, tile


@triton.jit
def max_fwd_kernel(x_ptr, t_ptr, y_ptr, code_ptr, N, WRITE_CODE: tl.constexpr,
                   BLOCK: tl.constexpr, INT64: tl.constexpr):
    _, _, _, _, _, offs, mask, _ = tile(tl.program_id(0), 1, N, 1, 1, BLOCK, True, INT64)
    # compared in opmath: exact, and the interpreter holds bf16 as raw integers
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    t = opmath(tl.load(t_ptr + offs, mask=mask))
    y, code = max_fwd(x, t)
    store_rounded(y_ptr + offs, y, mask)
    if WRITE_CODE:
        store_rounded(code_ptr + offs, code, mask)


@triton.jit
def max_bwd_kernel(g_ptr, code_ptr, dx_ptr, dt_ptr, N, BLOCK: tl.constexpr,
                   INT64: tl.constexpr):
    _, _, _, _, _, offs, mask, _ = tile(tl.program_id(0), 1, N, 1, 1, BLOCK, True, INT64)
    g = opmath(tl.load(g_ptr + offs, mask=mask))
    code = tl.load(code_ptr + offs, mask=mask)
    dx, dt = max_bwd(g, code)
    store_rounded(dx_ptr + offs, dx, mask)
    store_rounded(dt_ptr + offs, dt, mask)


@triton.jit
def max_affine_kernel(x_ptr, t_ptr, a_ptr, b_ptr, y_ptr, R, L, C, LAYOUT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
                      INT64: tl.constexpr):
    _, _, _, rows, cols, offs, mask, _ = tile(tl.program_id(0), R, L, 1, BLOCK_R, BLOCK_L,
                                              FLAT, INT64)
    x = opmath(tl.load(x_ptr + offs, mask=mask))
    t = opmath(tl.load(t_ptr + offs, mask=mask))
    a = load_channel(a_ptr, rows, cols, C, LAYOUT)
    b = load_channel(b_ptr, rows, cols, C, LAYOUT)
    y, _ = max_fwd(x, t * a + b)
    store_rounded(y_ptr + offs, y, mask)


def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, code: torch.Tensor | None,
            p: Plan) -> None:
    """y = max(x, t), and the win code if ``code`` is given; all dense with x's strides; ``p``
    is flat."""
    max_fwd_kernel[p.grid](x, t, y, y if code is None else code, p.cols,
                           WRITE_CODE=code is not None, BLOCK=p.block_l, INT64=p.int64,
                           num_warps=NUM_WARPS)


def backward(g: torch.Tensor, code: torch.Tensor, dx: torch.Tensor, dt: torch.Tensor,
             p: Plan) -> None:
    """dx, dt from the incoming gradient and the win code (all with the same strides)."""
    max_bwd_kernel[p.grid](g, code, dx, dt, p.cols, BLOCK=p.block_l, INT64=p.int64,
                           num_warps=NUM_WARPS)


def forward_affine(x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   y: torch.Tensor, p: Plan) -> None:
    """y = max(x, a t + b) with a, b per channel (C values, fp32)."""
    max_affine_kernel[p.grid](
        x, t, a, b, y, p.rows, p.cols, p.channels, LAYOUT=p.layout, BLOCK_R=p.block_r,
        BLOCK_L=p.block_l, FLAT=p.flat, INT64=p.int64, num_warps=NUM_WARPS)
