"""FReLU's max step: ``fused_act::frelu_max``, which saves a one-byte code of the side that won
instead of x and t, and the eval-mode ``fused_act::frelu_max_affine``, max(x, a t + b) with the
BatchNorm folded into per-channel a, b (differentiable in all four, its backward the reference
math).  Both follow the compile mode of "frelu_max"."""

import torch
from torch import Tensor

from .. import config, plan, reference
from ..kernels import launcher
from .layout import dense, flat_param, like
from .op import Op, Schema, attr, data, param


def frelu_forward_impl(x: Tensor, t: Tensor, need_code: bool,
                       backend: str) -> tuple[Tensor, Tensor | None]:
    """(max(x, t), the one-byte win code if ``need_code``) by ``backend``."""
    xd = dense(x)
    td = like(t, xd)
    k = launcher(x.device, backend)
    if k is None:
        y = reference.frelu_max(xd, td)
        return y, reference.frelu_max_code(xd, td) if need_code else None
    y = torch.empty_like(xd)
    code = torch.empty_like(xd, dtype=torch.uint8) if need_code else None
    if x.numel():
        k.max_forward(xd, td, y, code, plan.flat(x.numel(), plan.SCALAR))
    return y, code


def _frelu_forward(x: Tensor, t: Tensor, need_code: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(max(x, t), win code); the code is empty unless ``need_code``."""
    y, code = frelu_forward_impl(x, t, need_code, backend)
    return y, x.new_empty(0, dtype=torch.uint8) if code is None else code


def frelu_backward_impl(grad: Tensor, code: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dt) of max(x, t) from the incoming gradient and the win code."""
    g = like(grad, code)
    k = launcher(code.device, backend)
    if k is None:
        return reference.frelu_max_backward_code(g, code)
    dx, dt = torch.empty_like(g), torch.empty_like(g)
    if code.numel():
        k.max_backward(g, code, dx, dt, plan.flat(code.numel(), plan.SCALAR))
    return dx, dt






FRELU_MAX = Op(
    Schema("frelu_max", (data("x", saved=False), data("t", saved=False),
                         attr("need_code", "bool", backward=False)),
           outputs=("y", "code"), companions_if="need_code", saved_outputs=("code",)),
    _frelu_forward, lambda x, t, need_code: reference.frelu_max(x, t),
    frelu_backward_impl, reference.frelu_max_backward_code,
    compile_mode=config.mode_for)
frelu_max_op, frelu_max_backward_op = FRELU_MAX.forward_op, FRELU_MAX.backward_op



def frelu_max_affine_impl(x: Tensor, t: Tensor, a: Tensor, b: Tensor, backend: str) -> Tensor:
    """max(x, a t + b) with per-channel a, b: FReLU's eval-mode step."""
    xd = dense(x)
    td = like(t, xd)
    k = launcher(x.device, backend)
    if k is None:
        return like(reference.frelu_max_affine(xd, td, a, b), xd)
    y = torch.empty_like(xd)
    if x.numel():
        k.max_affine(xd, td, flat_param(a, x), flat_param(b, x), y,
                                 plan.channel_plan(xd, a.numel()))
    return y


def frelu_max_affine_backward_impl(grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                                   need_params: bool, backend: str
                                   ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dx, dt, da, db) of max(x, a t + b), da and db only if ``need_params`` (else None).

    The reference math on every backend, ``backend`` unused: a gradient through the folded
    BatchNorm is the rare eval-mode-with-grad path (an export or a compile of an eval model,
    fine-tuning through a frozen BatchNorm), not worth kernels of its own.  The training path,
    ``frelu_max``, keeps its fused backward."""
    xd = dense(x)
    dx, dt, da, db = reference.frelu_max_affine_backward(like(grad, xd), xd, like(t, xd), a, b,
                                                         need_params)
    return like(dx, xd), like(dt, xd), da, db


FRELU_MAX_AFFINE = Op(
    Schema("frelu_max_affine", (data("x"), data("t"), param("a"), param("b")),
           flag="need_params"),
    frelu_max_affine_impl, reference.frelu_max_affine, frelu_max_affine_backward_impl,
    reference.frelu_max_affine_backward, compile_mode=config.mode_for)
frelu_max_affine_op = FRELU_MAX_AFFINE.forward_op
frelu_max_affine_backward_op = FRELU_MAX_AFFINE.backward_op
