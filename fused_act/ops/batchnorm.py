"""BatchNorm + activation: ``fused_act::batch_norm_act`` (training: the batch statistics) and
``fused_act::affine_act`` (eval: the running statistics folded into per-channel c, a, b).

Both compute y = f((x - c) a + b), f an elementwise activation of ``registry.SPECS`` (``act``,
with swish's beta) or ACON-C (``act`` "acon_c": per-channel p1, p2 and beta).  Training reads
x twice in the forward (statistics, then y) and x and the gradient twice in the backward (the
per-channel sums of dz and dz (x - mean), then dx; the CPU kernels keep dz between the two,
so the second reads it, not the gradient, and evaluates f' no more), and saves only x, the
parameters and the C-sized mean and variance: the normalised value is recomputed, never
stored.  Eval is one pass
forward and one backward.  The activation's parameter gradients are reduced in the backward
pass that sums, in the order beta, p1, p2.
"""

import torch
from torch import Tensor

from .. import config, plan, reference
from ..kernels import launcher, offers
from ..registry import SPECS
from .layout import dense, flat_param, fp32, like
from .op import Op, Schema, attr, data, param

ACON = "acon_c"  # the ``act`` of ACON-C, whose parameters are p1, p2 and beta


def _math(act: str, beta: Tensor | None, beta_value: float, p1: Tensor | None,
          p2: Tensor | None, x: Tensor) -> tuple[reference.Act, reference.ActBackward]:
    """The activation's reference forward and backward as ``reference``'s BatchNorm functions
    take them; its parameter gradients come back as (beta, p1, p2)."""
    if act == ACON:
        def acon_backward(g: Tensor, z: Tensor, need: bool) -> tuple:
            dz, dp1, dp2, dbeta = reference.acon_c_backward(g, z, p1, p2, beta)
            return dz, (dbeta, dp1, dp2) if need else (None, None, None)

        return lambda z: reference.acon_c(z, p1, p2, beta), acon_backward
    spec = SPECS[act]
    b = fp32(beta_value, x) if beta is None else beta

    def backward(g: Tensor, z: Tensor, need: bool) -> tuple:
        dz, dbeta = spec.backward(g, z, b, need and beta is not None)
        return dz, (dbeta, None, None)

    return lambda z: spec.forward(z, b), backward


def _kernels(x: Tensor, backend: str) -> object | None:
    k = launcher(x.device, backend)
    return k if k is not None and hasattr(k, "affine_act_forward") else None


def _flat(p: Tensor | None, x: Tensor) -> Tensor | None:
    """A parameter of 1 or C values as the kernels read it: C values, flat, in opmath."""
    return None if p is None else flat_param(p, x).expand(x.shape[1]).contiguous()


def _kernel_act(act: str, beta: Tensor | None, p1: Tensor | None, p2: Tensor | None,
                x: Tensor) -> dict:
    """The activation's arguments of the launchers: its kernel id, beta, and ACON-C's (p1, p2)."""
    if act == ACON:
        return dict(act=0, beta=_flat(beta, x), acon=(_flat(p1, x), _flat(p2, x)))
    return dict(act=SPECS[act].kernel_id, beta=_flat(beta, x), acon=None)


def _finish(partial: Tensor, p: plan.Plan) -> Tensor:
    """The per-channel totals of k quantities' partials: (k, C); the partials themselves where
    each channel has one slot (a sum's fixed cost was a tenth of a small backward)."""
    if partial.shape[1] == p.channels:
        return partial
    return partial.view(partial.shape[0], -1, p.channels).sum(1)


def _param_grads(sums: Tensor, act: str, beta: Tensor | None, p1: Tensor | None,
                 p2: Tensor | None) -> tuple[Tensor | None, ...]:
    """(dbeta, dp1, dp2) from the per-channel totals after the first two, each summed to a
    one-element parameter and in its parameter's shape and dtype."""
    def to(total: Tensor, t: Tensor) -> Tensor:
        return (total.sum() if t.numel() == 1 else total).reshape(t.shape).to(t.dtype)

    if act == ACON:
        return to(sums[4], beta), to(sums[2], p1), to(sums[3], p2)
    return (None if beta is None else to(sums[2], beta)), None, None


def _extra_rows(act: str, beta: Tensor | None) -> int:
    """Partial rows of the activation's parameter gradients."""
    return 3 if act == ACON else int(beta is not None)


def affine_act_impl(x: Tensor, c: Tensor, a: Tensor, b: Tensor, act: str, beta: Tensor | None,
                    beta_value: float, p1: Tensor | None, p2: Tensor | None,
                    backend: str) -> Tensor:
    """f((x - c) a + b) for per-channel c, a, b by ``backend``."""
    xd = dense(x)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        return like(reference.affine_act(xd, c, a, b, _math(act, beta, beta_value, p1, p2,
                                                              x)[0]), xd)
    y = torch.empty_like(xd)
    k.affine_act_forward(xd, y, c=flat_param(c, x), a=flat_param(a, x), b=flat_param(b, x),
                         beta_value=beta_value, p=plan.channel_plan(xd, x.shape[1]),
                         **_kernel_act(act, beta, p1, p2, x))
    return y


def affine_act_backward_impl(grad: Tensor, x: Tensor, c: Tensor, a: Tensor, b: Tensor, act: str,
                             beta: Tensor | None, beta_value: float, p1: Tensor | None,
                             p2: Tensor | None, need_params: bool,
                             backend: str) -> tuple[Tensor | None, ...]:
    """(dx, dc, da, db, dbeta, dp1, dp2) of ``affine_act``, all but dx only if
    ``need_params``."""
    xd = dense(x)
    g = like(grad, xd)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        dx, *rest = reference.affine_act_backward(
            g, xd, c, a, b, _math(act, beta, beta_value, p1, p2, x)[1], need_params)
        return (like(dx, xd), *rest)
    dx = torch.empty_like(xd)
    p = plan.channel_plan(xd, x.shape[1])
    af = flat_param(a, x)
    partial = torch.empty(2 + _extra_rows(act, beta), p.partials, dtype=plan.accumulator(x),
                          device=x.device) if need_params else None
    k.affine_act_backward(g, xd, dx, c=flat_param(c, x), a=af, b=flat_param(b, x),
                          beta_value=beta_value, k=None, partial=partial, p=p,
                          **_kernel_act(act, beta, p1, p2, x))
    if partial is None:
        return dx, None, None, None, None, None, None
    sums = _finish(partial, p)
    return (dx, (-sums[0] * af).reshape(c.shape).to(c.dtype), sums[1].reshape(a.shape).to(a.dtype),
            sums[0].reshape(b.shape).to(b.dtype), *_param_grads(sums, act, beta, p1, p2))


def _affine_reference(x: Tensor, c: Tensor, a: Tensor, b: Tensor, act: str, beta: Tensor | None,
                      beta_value: float, p1: Tensor | None, p2: Tensor | None) -> Tensor:
    return reference.affine_act(x, c, a, b, _math(act, beta, beta_value, p1, p2, x)[0])


def _affine_reference_backward(grad: Tensor, x: Tensor, c: Tensor, a: Tensor, b: Tensor,
                               act: str, beta: Tensor | None, beta_value: float,
                               p1: Tensor | None, p2: Tensor | None, need_params: bool
                               ) -> tuple[Tensor | None, ...]:
    return reference.affine_act_backward(grad, x, c, a, b,
                                         _math(act, beta, beta_value, p1, p2, x)[1], need_params)


# the activation's arguments, after the tensors the BatchNorm takes
_ACT_ARGS = (attr("act", "str"), param("beta", optional=True), attr("beta_value", "float"),
             param("p1", optional=True), param("p2", optional=True))

AFFINE_ACT = Op(
    Schema("affine_act", (data("x"), param("c"), param("a"), param("b"), *_ACT_ARGS),
           flag="need_params"),
    affine_act_impl, _affine_reference, affine_act_backward_impl, _affine_reference_backward,
    compile_mode=config.mode_for)
affine_act_op, affine_act_backward_op = AFFINE_ACT.forward_op, AFFINE_ACT.backward_op


def merge_stats(partial: Tensor, p: plan.Plan) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) of each channel from the stats kernel's per-tile counts, sums and
    sums of squared distances from the tile's mean (3 x ``p.partials``): the tiles' M2 plus
    each tile's count times its mean's squared distance from the channel's (Chan et al.), a sum
    of non-negative terms in a fixed order: deterministic, and no cancellation."""
    n, s, m2 = partial.view(3, -1, p.channels)
    total = n.sum(0)
    mean = s.sum(0) / total
    tile_mean = s / n.clamp_min(1.0)
    spread = torch.where(n > 0, n * (tile_mean - mean).square(), 0.0)
    return mean, (m2.sum(0) + spread.sum(0)) / total


def batch_norm_act_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                        act: str, beta: Tensor | None, beta_value: float, p1: Tensor | None,
                        p2: Tensor | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(f(batch_norm(x)), mean, biased variance) on x's batch statistics by ``backend``."""
    xd = dense(x)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        y, mean, var = reference.batch_norm_act(xd, weight, bias, eps,
                                                _math(act, beta, beta_value, p1, p2, x)[0])
        return like(y, xd), mean, var
    p = plan.channel_plan(xd, x.shape[1])
    partial = torch.empty(3, p.partials, dtype=plan.accumulator(x), device=x.device)
    k.stats(xd, partial, p)
    mean, var = k.merge_stats(partial, p) if offers(k, "merge_stats") else merge_stats(partial, p)
    a, b = reference.bn_affine(weight, bias, torch.rsqrt(var + eps))
    y = torch.empty_like(xd)
    k.affine_act_forward(xd, y, c=mean, a=a.contiguous(), b=b.contiguous(),
                         beta_value=beta_value, p=p, **_kernel_act(act, beta, p1, p2, x))
    return y, mean, var


def batch_norm_act_backward_impl(grad: Tensor, x: Tensor, weight: Tensor | None,
                                 bias: Tensor | None, eps: float, act: str, beta: Tensor | None,
                                 beta_value: float, p1: Tensor | None, p2: Tensor | None,
                                 mean: Tensor, var: Tensor, need_params: bool,
                                 backend: str) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, dbeta, dp1, dp2) of ``batch_norm_act``, all but dx only if
    ``need_params``."""
    xd = dense(x)
    g = like(grad, xd)
    beta_value = fp32(beta_value)
    k = _kernels(x, backend)
    if k is None or x.numel() == 0:
        dx, *rest = reference.batch_norm_act_backward(
            g, xd, weight, bias, eps, _math(act, beta, beta_value, p1, p2, x)[1], mean, var,
            need_params)
        return (like(dx, xd), *rest)
    p = plan.channel_plan(xd, x.shape[1])
    invstd = torch.rsqrt(var + eps)
    a, b = reference.bn_affine(weight, bias, invstd)
    a, b = a.contiguous(), b.contiguous()
    dx = torch.empty_like(xd)
    if offers(k, "batch_norm_backward") and act != ACON and beta is None:
        sums = torch.empty(2, x.shape[1], dtype=plan.accumulator(x), device=x.device)
        k.batch_norm_backward(g, xd, dx, SPECS[act].kernel_id, mean, a, b, invstd, beta_value,
                              sums, p)
    else:
        common = dict(c=mean, a=a, b=b, beta_value=beta_value, p=p,
                      **_kernel_act(act, beta, p1, p2, x))
        partial = torch.empty(2 + (_extra_rows(act, beta) if need_params else 0), p.partials,
                              dtype=plan.accumulator(x), device=x.device)
        k.affine_act_backward(g, xd, None, k=None, partial=partial, **common)
        sums = _finish(partial, p)
        m = x.numel() // x.shape[1]
        k1, k0 = -a * invstd * invstd * sums[1] / m, -a * sums[0] / m
        k.affine_act_backward(g, xd, dx, k=(k1, k0), partial=None, **common)
    if not need_params:
        return dx, None, None, None, None, None
    dweight = None if weight is None else (sums[1] * invstd).reshape(weight.shape).to(
        weight.dtype)
    dbias = None if bias is None else sums[0].reshape(bias.shape).to(bias.dtype)
    return dx, dweight, dbias, *_param_grads(sums, act, beta, p1, p2)


def _bn_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str,
                  beta: Tensor | None, beta_value: float, p1: Tensor | None,
                  p2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return reference.batch_norm_act(x, weight, bias, eps,
                                    _math(act, beta, beta_value, p1, p2, x)[0])


def _bn_reference_backward(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                           eps: float, act: str, beta: Tensor | None, beta_value: float,
                           p1: Tensor | None, p2: Tensor | None, mean: Tensor, var: Tensor,
                           need_params: bool) -> tuple[Tensor | None, ...]:
    # the statistics again from x, not the saved ones: a graph of this backward (double
    # backward) must see how they depend on x
    return reference.batch_norm_act_backward(grad, x, weight, bias, eps,
                                             _math(act, beta, beta_value, p1, p2, x)[1],
                                             *reference.batch_stats(x), need_params)


def bn_differentiable_backward(grad: Tensor, x: Tensor, weight: Tensor | None,
                               bias: Tensor | None, eps: float, act: str, beta_value: float,
                               need_params: bool
                               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) of the CPU eager node of ``batch_norm_act`` in training
    (ops/eager.py) as differentiable torch ops, for a backward that needs a graph of its own:
    the op's reference backward, x's batch statistics recomputed; dweight and dbias None unless
    ``need_params``."""
    dx, dw, db, *_ = _bn_reference_backward(grad, x, weight, bias, eps, act, None, beta_value,
                                            None, None, None, None, need_params)
    return dx, dw, db


def affine_differentiable_backward(grad: Tensor, x: Tensor, c: Tensor, a: Tensor, b: Tensor,
                                   act: str, beta_value: float, need_params: bool
                                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx, da, db) of the CPU eager node of ``batch_norm_act`` in eval (``affine_act`` on the
    folded running statistics, ops/eager.py) as differentiable torch ops, for a backward that
    needs a graph of its own: the op's reference backward (a's graph reaches weight); da and db
    None unless ``need_params``."""
    dx, _, da, db, *_ = _affine_reference_backward(grad, x, c, a, b, act, None, beta_value,
                                                   None, None, need_params)
    return dx, da, db


BATCH_NORM_ACT = Op(
    Schema("batch_norm_act", (data("x"), param("weight", optional=True),
                              param("bias", optional=True), attr("eps", "float"), *_ACT_ARGS),
           outputs=("y", "mean", "var"), saved_outputs=("mean", "var"), flag="need_params",
           returned=3),
    batch_norm_act_impl, _bn_reference, batch_norm_act_backward_impl, _bn_reference_backward,
    compile_mode=config.mode_for)
batch_norm_act_op = BATCH_NORM_ACT.forward_op
batch_norm_act_backward_op = BATCH_NORM_ACT.backward_op
