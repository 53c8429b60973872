"""ACON-C and Meta-ACON (a per-sample beta): ``fused_act::acon_c``.  Backward saves only x and
the parameters, whose gradients are reduced inside the backward kernel."""

import torch
from torch import Tensor

from .. import config, plan, reference
from ..kernels import launcher
from .layout import dense, flat_param, like
from .op import Op, Schema, data, param


def n_outermost(x: Tensor) -> bool:
    """Whether a dense ``x``'s samples lie one after another in memory (as a per-sample beta's
    tiles read them)."""
    return x.shape[0] == 1 or x.stride(0) * x.shape[0] == x.numel()


def acon_dense(x: Tensor, per_sample: bool) -> Tensor:
    """``dense(x)``, and with N outermost in memory when beta is per sample (else one copy)."""
    xd = dense(x)
    return xd.contiguous() if per_sample and not n_outermost(xd) else xd


def acon_forward_impl(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, backend: str) -> Tensor:
    """ACON-C, (p1 - p2) x sigma(beta (p1 - p2) x) + p2 x, by ``backend`` for ``x.device``."""
    per_sample = reference.per_sample(beta, x)
    xd = acon_dense(x, per_sample)
    if x.numel() == 0:
        return torch.empty_like(xd)
    k = launcher(x.device, backend)
    if k is None:
        return like(reference.acon_c(xd, p1, p2, beta), xd)
    y = torch.empty_like(xd)
    k.acon_forward(xd, y, flat_param(p1, x), flat_param(p2, x), flat_param(beta, x),
                               per_sample, plan.channel_plan(xd, p1.numel(), per_sample))
    return y


def acon_backward_impl(grad: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
                       need_params: bool, backend: str) -> tuple[Tensor, ...]:
    """(dx, dp1, dp2, dbeta), the last three only if ``need_params`` (else None)."""
    per_sample = reference.per_sample(beta, x)
    xd = acon_dense(x, per_sample)
    g = like(grad, xd)
    if x.numel() == 0:
        zeros = tuple(p.new_zeros(p.shape) if need_params else None for p in (p1, p2, beta))
        return (torch.empty_like(xd), *zeros)
    k = launcher(x.device, backend)
    if k is None:
        dx, *dparams = reference.acon_c_backward(g, xd, p1, p2, beta)
        return (like(dx, xd), *(dparams if need_params else (None,) * 3))
    dx = torch.empty_like(xd)
    p = plan.channel_plan(xd, p1.numel(), per_sample)
    acc = plan.accumulator(x)
    partial = torch.empty(3 * p.partials, dtype=acc, device=x.device) if need_params else None
    k.acon_backward(g, xd, dx, flat_param(p1, x), flat_param(p2, x),
                                flat_param(beta, x), per_sample, partial, p)
    if partial is None:
        return dx, None, None, None
    # the gradients come back in the parameters' dtype when they share one (one cast, not three)
    out_dtype = p1.dtype if p1.dtype == p2.dtype == beta.dtype else acc
    sums = plan.acon_sums(partial, p, x.shape[0], per_sample, out_dtype)
    return (dx, *(s.reshape(q.shape).to(q.dtype) for s, q in zip(sums, (p1, p2, beta),
                                                                  strict=True)))






ACON_C = Op(
    Schema("acon_c", (data("x"), param("p1"), param("p2"), param("beta")), flag="need_params"),
    acon_forward_impl, reference.acon_c, acon_backward_impl,
    lambda grad, x, p1, p2, beta, need_params: reference.acon_c_backward(grad, x, p1, p2, beta),
    compile_mode=config.mode_for)
acon_c_op, acon_c_backward_op = ACON_C.forward_op, ACON_C.backward_op
