"""BatchNorm + activation: ``fused_act::batch_norm_act`` (training: the batch statistics) and
``fused_act::affine_act`` (eval: the running statistics folded into per-channel c, a, b).

Both compute y = f((x - c) a + b), f an elementwise activation of ``registry.SPECS`` (``act``,
with swish's beta).  Training reads x twice in the forward (statistics, then y) and x and the
gradient twice in the backward (the per-channel sums of dz and dz (x - mean), then dx), and saves
only x, the parameters and the C-sized mean and variance: the normalised value is recomputed,
never stored.  Eval is one pass forward and one backward.
"""

import torch
from torch import Tensor

from .. import config, plan, reference
from ..kernels import launcher
from ..registry import SPECS
from .layout import dense, flat_param, fp32, like
from .op import Op, Schema, attr, data, param


def _beta(beta: Tensor | None, beta_value: float, x: Tensor) -> reference.Beta:
    return fp32(beta_value, x.device) if beta is None else beta


def _channel_beta(beta: Tensor | None, x: Tensor) -> Tensor | None:
    """A tensor beta as the kernels read it: C values (a one-element beta repeated)."""
    if beta is None:
        return None
    return flat_param(beta, x).expand(x.shape[1]).contiguous()


def _finish(partial: Tensor, p: plan.Plan) -> Tensor:
    """The per-channel totals of k quantities' partials: (k, C)."""
    return partial.view(partial.shape[0], -1, p.channels).sum(1)


def _beta_grad(total: Tensor, beta: Tensor) -> Tensor:
    """d/dbeta from its per-channel totals, summed to a one-element beta."""
    return (total.sum() if beta.numel() == 1 else total).reshape(beta.shape).to(beta.dtype)


def _kernels(x: Tensor, backend: str) -> object | None:
    k = launcher(x.device, backend)
    return k if k is not None and hasattr(k, "affine_act_forward") else None


def affine_act_impl(x: Tensor, c: Tensor, a: Tensor, b: Tensor, act: str, beta: Tensor | None,
                    beta_value: float, backend: str) -> Tensor:
    """f((x - c) a + b) for per-channel c, a, b by ``backend``."""
    xd = dense(x)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        return like(reference.affine_act(xd, c, a, b, SPECS[act].forward,
                                         _beta(beta, beta_value, x)), xd)
    y = torch.empty_like(xd)
    k.affine_act_forward(xd, y, SPECS[act].kernel_id, flat_param(c, x), flat_param(a, x),
                         flat_param(b, x), _channel_beta(beta, x), beta_value,
                         plan.channel_plan(xd, x.shape[1]))
    return y


def affine_act_backward_impl(grad: Tensor, x: Tensor, c: Tensor, a: Tensor, b: Tensor, act: str,
                             beta: Tensor | None, beta_value: float, need_params: bool,
                             backend: str) -> tuple[Tensor | None, ...]:
    """(dx, dc, da, db, dbeta) of ``affine_act``, all but dx only if ``need_params``."""
    xd = dense(x)
    g = like(grad, xd)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        dx, *rest = reference.affine_act_backward(g, xd, c, a, b, SPECS[act].backward,
                                                  _beta(beta, beta_value, x), need_params)
        return (like(dx, xd), *rest)
    dx = torch.empty_like(xd)
    p = plan.channel_plan(xd, x.shape[1])
    af = flat_param(a, x)
    partial = torch.empty(2 + (beta is not None), p.partials, dtype=plan.accumulator(x),
                          device=x.device) if need_params else None
    k.affine_act_backward(g, xd, dx, SPECS[act].kernel_id, flat_param(c, x), af,
                          flat_param(b, x), _channel_beta(beta, x), beta_value, None, partial, p)
    if partial is None:
        return dx, None, None, None, None
    sums = _finish(partial, p)
    dbeta = None if beta is None else _beta_grad(sums[2], beta)
    return (dx, (-sums[0] * af).reshape(c.shape).to(c.dtype), sums[1].reshape(a.shape).to(a.dtype),
            sums[0].reshape(b.shape).to(b.dtype), dbeta)


def _affine_reference(x: Tensor, c: Tensor, a: Tensor, b: Tensor, act: str, beta: Tensor | None,
                      beta_value: float) -> Tensor:
    return reference.affine_act(x, c, a, b, SPECS[act].forward, _beta(beta, beta_value, x))


def _affine_reference_backward(grad: Tensor, x: Tensor, c: Tensor, a: Tensor, b: Tensor,
                               act: str, beta: Tensor | None, beta_value: float,
                               need_params: bool) -> tuple[Tensor | None, ...]:
    return reference.affine_act_backward(grad, x, c, a, b, SPECS[act].backward,
                                         _beta(beta, beta_value, x), need_params)


AFFINE_ACT = Op(
    Schema("affine_act", (data("x"), param("c"), param("a"), param("b"), attr("act", "str"),
                          param("beta", optional=True), attr("beta_value", "float")),
           flag="need_params"),
    affine_act_impl, _affine_reference, affine_act_backward_impl, _affine_reference_backward,
    compile_mode=config.mode_for)
affine_act_op, affine_act_backward_op = AFFINE_ACT.forward_op, AFFINE_ACT.backward_op


def _shift(x: Tensor) -> Tensor:
    """One value of each channel of a non-empty ``x`` (its first), to sum x - shift from."""
    return flat_param(x[(0, slice(None), *([0] * (x.dim() - 2)))], x)


def batch_norm_act_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                        act: str, beta: Tensor | None, beta_value: float,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(f(batch_norm(x)), mean, biased variance) on x's batch statistics by ``backend``."""
    xd = dense(x)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        y, mean, var = reference.batch_norm_act(xd, weight, bias, eps, SPECS[act].forward,
                                                _beta(beta, beta_value, x))
        return like(y, xd), mean, var
    p = plan.channel_plan(xd, x.shape[1])
    m = x.numel() // x.shape[1]
    shift = _shift(xd)
    partial = torch.empty(2, p.partials, dtype=plan.accumulator(x), device=x.device)
    k.stats(xd, shift, partial, p)
    s1, s2 = _finish(partial, p) / m
    mean = shift + s1
    var = (s2 - s1 * s1).clamp_min(0.0)
    a, b = reference._affine(weight, bias, torch.rsqrt(var + eps))
    y = torch.empty_like(xd)
    k.affine_act_forward(xd, y, SPECS[act].kernel_id, mean, a.contiguous(), b.contiguous(),
                         _channel_beta(beta, x), beta_value, p)
    return y, mean, var


def batch_norm_act_backward_impl(grad: Tensor, x: Tensor, weight: Tensor | None,
                                 bias: Tensor | None, eps: float, act: str, beta: Tensor | None,
                                 beta_value: float, mean: Tensor, var: Tensor, need_params: bool,
                                 backend: str) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, dbeta) of ``batch_norm_act``, all but dx only if ``need_params``."""
    xd = dense(x)
    g = like(grad, xd)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        dx, *rest = reference.batch_norm_act_backward(
            g, xd, weight, bias, eps, SPECS[act].backward, _beta(beta, beta_value, x), mean, var,
            need_params)
        return (like(dx, xd), *rest)
    p = plan.channel_plan(xd, x.shape[1])
    m = x.numel() // x.shape[1]
    invstd = torch.rsqrt(var + eps)
    a, b = reference._affine(weight, bias, invstd)
    a, b = a.contiguous(), b.contiguous()
    kb = _channel_beta(beta, x)
    act_id = SPECS[act].kernel_id
    partial = torch.empty(2 + (need_params and beta is not None), p.partials,
                          dtype=plan.accumulator(x), device=x.device)
    k.affine_act_backward(g, xd, None, act_id, mean, a, b, kb, beta_value, None, partial, p)
    sums = _finish(partial, p)
    k1, k0 = -a * invstd * invstd * sums[1] / m, -a * sums[0] / m
    dx = torch.empty_like(xd)
    k.affine_act_backward(g, xd, dx, act_id, mean, a, b, kb, beta_value, (k1, k0), None, p)
    if not need_params:
        return dx, None, None, None
    dweight = None if weight is None else (sums[1] * invstd).reshape(weight.shape).to(
        weight.dtype)
    dbias = None if bias is None else sums[0].reshape(bias.shape).to(bias.dtype)
    dbeta = None if beta is None else _beta_grad(sums[2], beta)
    return dx, dweight, dbias, dbeta


def _bn_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str,
                  beta: Tensor | None, beta_value: float) -> tuple[Tensor, Tensor, Tensor]:
    return reference.batch_norm_act(x, weight, bias, eps, SPECS[act].forward,
                                    _beta(beta, beta_value, x))


def _bn_reference_backward(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                           eps: float, act: str, beta: Tensor | None, beta_value: float,
                           mean: Tensor, var: Tensor, need_params: bool
                           ) -> tuple[Tensor | None, ...]:
    # the statistics again from x, not the saved ones: a graph of this backward (double
    # backward) must see how they depend on x
    return reference.batch_norm_act_backward(grad, x, weight, bias, eps, SPECS[act].backward,
                                             _beta(beta, beta_value, x),
                                             *reference.batch_stats(x), need_params)


BATCH_NORM_ACT = Op(
    Schema("batch_norm_act", (data("x"), param("weight", optional=True),
                              param("bias", optional=True), attr("eps", "float"),
                              attr("act", "str"), param("beta", optional=True),
                              attr("beta_value", "float")),
           outputs=("y", "mean", "var"), saved_outputs=("mean", "var"), flag="need_params",
           returned=3),
    batch_norm_act_impl, _bn_reference, batch_norm_act_backward_impl, _bn_reference_backward,
    compile_mode=config.mode_for)
batch_norm_act_op = BATCH_NORM_ACT.forward_op
batch_norm_act_backward_op = BATCH_NORM_ACT.backward_op
