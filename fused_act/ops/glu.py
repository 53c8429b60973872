"""Gated activations act(gate) * up (SwiGLU, GeGLU, ...): ``fused_act::glu``, walking its tensors
as rows of contiguous runs, so the halves of a packed gate_up tensor are read and written in
place.  Backward saves only gate and up (or the packed tensor) and beta."""

import torch
from torch import Tensor

from .. import config, plan, reference
from ..kernels import launcher
from ..registry import SPECS
from .layout import flat_param, fp32, row_walk
from .op import Op, Schema, attr, data, param


def _glu_halves(gate: Tensor, up: Tensor | None, dim: int) -> tuple[Tensor, Tensor]:
    return reference.halves(gate, dim) if up is None else (gate, up)


def _glu_plan(rows: int, cols: int, beta: Tensor | None) -> plan.Plan:
    """Rows of the walk; a beta tensor (one value) is read as one channel (its partials: one
    slot per (column block, row))."""
    return plan.row_plan(rows, cols, plan.SCALAR if beta is None else plan.ROWS)


def _glu_reference(gate: Tensor, up: Tensor | None, act: str, beta: Tensor | None,
                   beta_value: float, dim: int) -> Tensor:
    g, u = _glu_halves(gate, up, dim)
    b = fp32(beta_value, gate) if beta is None else beta
    return reference.glu(g, u, lambda x: SPECS[act].forward(x, b))


def _glu_reference_grads(grad: Tensor, g: Tensor, u: Tensor, act: str, beta: Tensor | None,
                         beta_value: float, need_dbeta: bool
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dgate, dup, dbeta or None) of the halves ``g``, ``u`` by the reference math."""
    spec, b = SPECS[act], fp32(beta_value, g) if beta is None else beta
    return reference.glu_backward(grad, g, u, lambda x: spec.forward(x, b),
                                  lambda gr, x: spec.backward(gr, x, b, need_dbeta))


def _glu_reference_backward(grad: Tensor, gate: Tensor, up: Tensor | None, act: str,
                            beta: Tensor | None, beta_value: float, dim: int,
                            need_dbeta: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    g, u = _glu_halves(gate, up, dim)
    dg, du, db = _glu_reference_grads(grad, g, u, act, beta, beta_value, need_dbeta)
    return (torch.cat([dg, du], dim), None, db) if up is None else (dg, du, db)


def glu_forward_impl(gate: Tensor, up: Tensor | None, act: str, beta: Tensor | None,
                     beta_value: float, dim: int, backend: str) -> Tensor:
    """act(gate) * up for the kernel activation ``act`` (beta: swish; a tensor of one value, or
    ``beta_value``) by ``backend``, contiguous; ``up`` None: the halves of ``gate`` along
    ``dim``, read in place."""
    g, u = _glu_halves(gate, up, dim)
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    k = launcher(gate.device, backend)
    beta_value = fp32(beta_value)
    if k is None:
        return out.copy_(_glu_reference(gate, up, act, beta, beta_value, dim))
    rows, cols, (g, u), strides = row_walk((g, u), (out,))
    k.glu_forward(g, u, out, strides, SPECS[act].kernel_id,
                              None if beta is None else flat_param(beta, gate), beta_value,
                              _glu_plan(rows, cols, beta))
    return out


def glu_backward_impl(grad: Tensor, gate: Tensor, up: Tensor | None, act: str,
                      beta: Tensor | None, beta_value: float, dim: int, need_dbeta: bool,
                      backend: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dgate, dup, dbeta if ``need_dbeta``), contiguous; with ``up`` None, (d of the packed
    input, None, dbeta): one buffer whose halves the kernel writes in place."""
    g, u = _glu_halves(gate, up, dim)
    if up is None:
        packed = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dg, du = reference.halves(packed, dim)
    else:
        dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        du = torch.empty_like(dg)
    grads = (packed, None) if up is None else (dg, du)
    if dg.numel() == 0:
        return *grads, torch.zeros_like(beta) if need_dbeta else None
    k = launcher(gate.device, backend)
    beta_value = fp32(beta_value)
    if k is None:
        rg, ru, db = _glu_reference_grads(grad, g, u, act, beta, beta_value, need_dbeta)
        dg.copy_(rg)
        du.copy_(ru)
        return *grads, db
    # a gradient walked as the output is laid out: an expanded one (a sum's) would otherwise
    # fit only as rows of one element, and a beta's partials sum in the order of that walk
    grad = grad.contiguous()
    rows, cols, (grad, g, u), strides = row_walk((grad, g, u), (dg, du))
    p = _glu_plan(rows, cols, beta)
    partial = torch.empty(p.partials, dtype=plan.accumulator(gate),
                          device=gate.device) if need_dbeta else None
    k.glu_backward(grad, g, u, dg, du, strides, SPECS[act].kernel_id,
                               None if beta is None else flat_param(beta, gate), beta_value,
                               partial, p)
    if partial is None:
        return *grads, None
    return *grads, plan.channel_sums(partial, p).reshape(beta.shape).to(beta.dtype)






GATED = Op(
    Schema("glu", (data("gate"), data("up", optional=True), attr("act", "str"),
                   param("beta", optional=True), attr("beta_value", "float"), attr("dim", "int")),
           flag="need_dbeta", split=("up", "dim")),
    glu_forward_impl, _glu_reference, glu_backward_impl,
    _glu_reference_backward, compile_mode=config.mode_for)
glu_op, glu_backward_op = GATED.forward_op, GATED.backward_op
