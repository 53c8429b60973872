"""The public functional API: argument checks, then one call into ``ops``.

Every check runs before any kernel launch and names the op and the argument.
"""

import struct

from torch import Tensor

from . import ops


def _check_x(op: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fused_act.{op}: x must be a torch.Tensor (got {type(x).__name__})")
    if not x.is_floating_point():
        raise TypeError(f"fused_act.{op}: x must be a floating-point tensor (fp16, bf16, fp32 "
                        f"or fp64), got {x.dtype}")


def _check_channel_param(op: str, arg: str, p: Tensor, x: Tensor) -> None:
    """A parameter of 1 element, or of C = x.shape[1] as (C,) or (1, C, 1, ...)."""
    if not isinstance(p, Tensor) or not p.is_floating_point():
        what = p.dtype if isinstance(p, Tensor) else type(p).__name__
        raise TypeError(f"fused_act.{op}: {arg} must be a floating-point tensor (got {what})")
    if p.device != x.device:
        raise ValueError(f"fused_act.{op}: {arg} is on {p.device} but x is on {x.device}")
    if p.numel() == 1:
        return
    c = x.shape[1] if x.dim() >= 2 else None
    shape = tuple(p.shape)
    ok = c is not None and p.numel() == c and (
        shape == (c,) or (len(shape) <= x.dim() and len(shape) >= 2 and shape[1] == c))
    if not ok:
        want = f"C={c} elements as (C,) or (1, C, 1, ...)" if c is not None else "one element"
        raise ValueError(f"fused_act.{op}: {arg} must have one element or {want} for x of shape "
                         f"{tuple(x.shape)} (got shape {shape})")


def _fp32(v: float) -> float:
    # kernels take scalars as fp32 (no fp64 promotion); round here so every backend agrees
    return struct.unpack("f", struct.pack("f", v))[0]


def mish(x: Tensor) -> Tensor:
    """Mish, ``x * tanh(softplus(x))`` (Misra, 2019), fused forward and backward.

    Same values as ``torch.nn.functional.mish`` for any shape and floating dtype (fp16/bf16/fp32
    computed in fp32; fp64 in fp64), with the exact limits mish(+inf) = +inf, mish(-inf) = 0.
    Backward saves only ``x``; a non-dense ``x`` is copied once to contiguous.
    """
    _check_x("mish", x)
    return ops.apply("mish", x, "mish")


def silu(x: Tensor) -> Tensor:
    """SiLU, ``x * sigmoid(x)``: ``swish`` with beta = 1, as ``torch.nn.functional.silu``.

    Any shape and floating dtype; silu(+inf) = +inf, silu(-inf) = 0.  Backward saves only ``x``.
    """
    _check_x("silu", x)
    return ops.apply("silu", x, "swish")


def swish(x: Tensor, beta: float | Tensor = 1.0) -> Tensor:
    """Swish, ``x * sigmoid(beta * x)`` (Ramachandran et al., 2017).

    ``beta`` is a float, a one-element tensor, or a per-channel tensor of C = ``x.shape[1]``
    values shaped (C,) or (1, C, 1, ...), like ``torch.nn.PReLU``'s weight.  A float beta is
    rounded to fp32, as every scalar that reaches a kernel.  A tensor beta that
    requires grad gets its gradient reduced inside the backward kernel, deterministically, in
    beta's dtype.  Backward saves only ``x`` and beta.
    """
    _check_x("swish", x)
    if isinstance(beta, Tensor):
        _check_channel_param("swish", "beta", beta, x)
        return ops.apply("swish", x, "swish", beta)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"fused_act.swish: beta must be a float or a tensor "
                        f"(got {type(beta).__name__})")
    return ops.apply("swish", x, "swish", None, _fp32(beta))


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU (Hendrycks & Gimpel, 2016) as ``torch.nn.functional.gelu``.

    ``approximate="none"`` is ``x * Phi(x)`` with the normal CDF through erf; ``"tanh"`` is
    ``x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2``.  Any shape and floating dtype;
    gelu(+inf) = +inf, gelu(-inf) = 0.  Backward saves only ``x``.
    """
    _check_x("gelu", x)
    if approximate == "none":
        return ops.apply("gelu", x, "gelu")
    if approximate == "tanh":
        return ops.apply("gelu_tanh", x, "gelu_tanh")
    raise ValueError(f"fused_act.gelu: approximate must be 'none' or 'tanh' (got {approximate!r})")

