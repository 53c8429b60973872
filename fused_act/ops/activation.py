"""The elementwise activations (mish, swish/silu, gelu, ...): one pair of ops,
``fused_act::activation`` and ``fused_act::activation_backward``, for every activation of
``registry.SPECS``, which ``act`` names.  Backward saves only x and beta."""

import torch
from torch import Tensor

from .. import config, plan
from ..backend import get_backend
from ..kernels import launcher
from ..registry import SPECS
from .layout import dense, flat_param, fp32, is_dense, like
from .op import Op, Schema, attr, data, dispatches_itself, param, reference_math


def _act_plan(x: Tensor, beta: Tensor | None) -> plan.Plan:
    """Flat without a beta tensor (SCALAR: no parameter read), else by channel."""
    return plan.flat(x.numel(), plan.SCALAR) if beta is None else plan.channel_plan(
        x, beta.numel())


def _act_forward(x: Tensor, act: str, beta: Tensor | None, beta_value: float, backend: str,
                 out: Tensor | None = None) -> Tensor:
    xd = dense(x)
    if x.numel() == 0:
        return torch.empty_like(xd) if out is None else out
    k = launcher(x.device, backend)
    if k is None:
        y = like(SPECS[act].forward(xd, beta_value if beta is None else beta), xd)
        return y if out is None else out.copy_(y)
    y = torch.empty_like(xd) if out is None else out
    k.act_forward(xd, y, SPECS[act].kernel_id,
                              None if beta is None else flat_param(beta, x), beta_value,
                              _act_plan(xd, beta))
    return y


def forward_impl(x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                 backend: str) -> Tensor:
    """y = f(x) for the activation ``act`` (a name of ``registry.SPECS``; beta: swish) by
    ``backend`` (a name as ``set_backend`` takes) for ``x.device``."""
    return _act_forward(x, act, beta, fp32(beta_value), backend)


def backward_impl(grad: Tensor, x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                  need_dbeta: bool, backend: str) -> tuple[Tensor, Tensor | None]:
    """(dx, dbeta if ``need_dbeta``) by ``backend`` for ``x.device``."""
    xd = dense(x)
    g = like(grad, xd)
    if x.numel() == 0:
        db = beta.new_zeros(beta.shape) if need_dbeta else None
        return torch.empty_like(xd), db
    k = launcher(x.device, backend)
    beta_value = fp32(beta_value)
    if k is None:
        dx, db = SPECS[act].backward(g, xd, beta_value if beta is None else beta, need_dbeta)
        return like(dx, xd), db
    dx = torch.empty_like(xd)
    p = _act_plan(xd, beta)
    partial = torch.empty(p.partials, dtype=plan.accumulator(x),
                          device=x.device) if need_dbeta else None
    k.act_backward(g, xd, dx, SPECS[act].kernel_id,
                               None if beta is None else flat_param(beta, x), beta_value,
                               partial, p)
    if partial is None:
        return dx, None
    return dx, plan.channel_sums(partial, p).reshape(beta.shape).to(beta.dtype)


def _act_reference(x: Tensor, act: str, beta: Tensor | None, beta_value: float) -> Tensor:
    return SPECS[act].forward(x, fp32(beta_value, x) if beta is None else beta)


def _act_reference_backward(grad: Tensor, x: Tensor, act: str, beta: Tensor | None,
                            beta_value: float, need_dbeta: bool) -> tuple[Tensor, Tensor | None]:
    return SPECS[act].backward(grad, x, fp32(beta_value, x) if beta is None else beta,
                                 need_dbeta)


ACTIVATION = Op(
    Schema("activation", (data("x"), attr("act", "str"), param("beta", optional=True),
                          attr("beta_value", "float")), flag="need_dbeta"),
    forward_impl, _act_reference, backward_impl,
    _act_reference_backward, compile_mode=config.mode_for)
activation_op, activation_backward_op = ACTIVATION.forward_op, ACTIVATION.backward_op


def apply_(x: Tensor, name: str, beta_value: float = 1.0) -> Tensor:
    """Overwrite ``x`` with the activation of spec ``name`` (no autograd: the caller checked that
    no gradient is needed).

    The write bumps x's autograd version exactly once, as torch's in-place ops do, so a tensor
    that autograd saved elsewhere raises torch's error instead of giving a wrong gradient."""
    backend = get_backend()
    if (torch.compiler.is_compiling() or reference_math() or dispatches_itself((x,))
            or not is_dense(x) or x.is_neg() or launcher(x.device, backend) is None):
        return x.copy_(ACTIVATION(x, name, None, beta_value, mode=name))  # copy_ bumps the version
    _act_forward(x, name, None, fp32(beta_value), backend, out=x)
    if not x.is_inference():
        torch.autograd.graph.increment_version(x)
    return x
