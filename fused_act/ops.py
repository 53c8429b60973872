"""What each op family computes: its implementations by backend, fake kernels, reference math
and what its backward needs.  ``factory.Op`` builds the custom ops, autograd and the eager and
compile paths from each ``Family`` (factory.py says how a call is routed).

The elementwise family (mish, swish/silu, gelu, gelu-tanh) shares one pair of ops
(``fused_act::activation``, ``fused_act::activation_backward``), and their gated forms
act(gate) * up another (``fused_act::glu``); ACON-C and FReLU's max step have their own.
Backward saves only the inputs (x and the parameters), except frelu_max, which saves a one-byte
code of which side won instead of x and t.  Double backward (``create_graph=True``) is
supported in eager mode through the reference's explicit backward math; under ``torch.compile``
the opaque backward ops have no derivative and say so.  Dense inputs of any strides
(channels_last, permuted) run in place of their memory with outputs of the same strides (the
gated ops: any rows of contiguous runs, such as the halves of a packed tensor, with contiguous
outputs); other inputs are copied once to contiguous; parameter tensors reach the kernels flat,
contiguous and in opmath (``flat_param``).
"""

import math
import struct

import torch
from torch import Tensor

from . import plan, reference
from .backend import get_backend, resolve
from .factory import Family, Op, reference_math
from .kernels import kernels
from .registry import KERNEL_IDS, KERNELS, SPECS

# ---- layout --------------------------------------------------------------------------------

def is_dense(x: Tensor) -> bool:
    """True if ``x`` covers a gap-free, non-overlapping block of memory in some dim order."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return True  # the common layouts, answered in C++ (this runs on every call)
    expected = 1
    dims = sorted((st, s) for s, st in zip(x.shape, x.stride(), strict=True) if s != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def dense(x: Tensor) -> Tensor:
    """``x`` itself when dense, else one contiguous copy."""
    return x if is_dense(x) else x.contiguous()


def like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with ``x``'s strides (``x`` dense): a copy only when they differ, e.g. an
    expanded gradient from ``.sum()``."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def flat_param(p: Tensor, x: Tensor) -> Tensor:
    """A parameter as every kernel reads it: flat, contiguous (a strided view is copied: the
    kernels index it with unit stride) and in x's opmath dtype (fp32, or fp64 for fp64 x)."""
    return p.reshape(-1).to(plan.accumulator(x)).contiguous()


def _fp32(v: float, device: torch.device | None = None) -> float | Tensor:
    """``v`` rounded to fp32, as every kernel takes a scalar: the one rounding of a float beta,
    applied on every path (kernels, the reference backend, the decomposed and the reference
    math), so that all agree bit for bit.  Under ``torch.compile`` ``v`` may be symbolic and
    Python's rounding does not trace: there it is a 0-d fp32 tensor on ``device`` (the rounding
    traced), which the reference math takes as its beta."""
    if torch.compiler.is_compiling():
        return torch.tensor(v, dtype=torch.float32, device=device)
    return struct.unpack("f", struct.pack("f", v))[0]


# ---- the elementwise activations ------------------------------------------------------------

def _act_plan(x: Tensor, beta: Tensor | None) -> plan.Plan:
    """Flat without a beta tensor (SCALAR: no parameter read), else by channel."""
    return plan.flat(x.numel(), plan.SCALAR) if beta is None else plan.channel_plan(
        x, beta.numel())


def _act_forward(x: Tensor, act: str, beta: Tensor | None, beta_value: float, backend: str,
                 out: Tensor | None = None) -> Tensor:
    xd = dense(x)
    if x.numel() == 0:
        return torch.empty_like(xd) if out is None else out
    name = resolve(x.device, backend)
    if name == "reference":
        y = like(KERNELS[act].forward(xd, beta_value if beta is None else beta), xd)
        return y if out is None else out.copy_(y)
    y = torch.empty_like(xd) if out is None else out
    kernels(name).act_forward(xd, y, KERNEL_IDS[act],
                              None if beta is None else flat_param(beta, x), beta_value,
                              _act_plan(xd, beta))
    return y


def forward_impl(x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                 backend: str) -> Tensor:
    """y = f(x) for the kernel activation ``act`` (``registry.KERNEL_IDS``; beta: swish) by
    ``backend`` (a name as ``set_backend`` takes) for ``x.device``."""
    return _act_forward(x, act, beta, _fp32(beta_value), backend)


def backward_impl(grad: Tensor, x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                  need_dbeta: bool, backend: str) -> tuple[Tensor, Tensor | None]:
    """(dx, dbeta if ``need_dbeta``) by ``backend`` for ``x.device``."""
    xd = dense(x)
    g = like(grad, xd)
    if x.numel() == 0:
        db = beta.new_zeros(beta.shape) if need_dbeta else None
        return torch.empty_like(xd), db
    name = resolve(x.device, backend)
    beta_value = _fp32(beta_value)
    if name == "reference":
        dx, db = KERNELS[act].backward(g, xd, beta_value if beta is None else beta, need_dbeta)
        return like(dx, xd), db
    dx = torch.empty_like(xd)
    p = _act_plan(xd, beta)
    partial = torch.empty(p.partials, dtype=plan.accumulator(x),
                          device=x.device) if need_dbeta else None
    kernels(name).act_backward(g, xd, dx, KERNEL_IDS[act],
                               None if beta is None else flat_param(beta, x), beta_value,
                               partial, p)
    if partial is None:
        return dx, None
    return dx, plan.channel_sums(partial, p).reshape(beta.shape).to(beta.dtype)


def _act_fake(x: Tensor, act: str, beta: Tensor | None, beta_value: float,
              backend: str) -> Tensor:
    return torch.empty_like(dense(x))


def _act_fake_backward(grad: Tensor, x: Tensor, act: str, beta: Tensor | None,
                       beta_value: float, need_dbeta: bool,
                       backend: str) -> tuple[Tensor, Tensor]:
    db = beta.new_empty(beta.shape) if need_dbeta else x.new_empty(0)
    return torch.empty_like(dense(x)), db


def _act_reference(x: Tensor, act: str, beta: Tensor | None, beta_value: float) -> Tensor:
    return KERNELS[act].forward(x, _fp32(beta_value, x.device) if beta is None else beta)


def _act_reference_backward(grad: Tensor, x: Tensor, act: str, beta: Tensor | None,
                            beta_value: float, need_dbeta: bool) -> tuple[Tensor, Tensor | None]:
    return KERNELS[act].backward(grad, x, _fp32(beta_value, x.device) if beta is None else beta,
                                 need_dbeta)


ACTIVATION = Op(Family(
    "activation", forward_impl, _act_fake, _act_reference,
    backward_impl, _act_fake_backward, _act_reference_backward,
    saved=lambda args, outputs: (args[0], args[2]),  # x, beta
    # (x, act, beta, beta_value, need_dbeta): beta's gradient only when asked
    backward_args=lambda saved, attrs, needs: (saved[0], attrs[1], saved[1], attrs[3], needs[2]),
    grad_of=(0, 2)))
activation_op, activation_backward_op = ACTIVATION.forward_op, ACTIVATION.backward_op


def apply(name: str, x: Tensor, beta: Tensor | None = None, beta_value: float = 1.0) -> Tensor:
    """Run the activation of spec ``name`` (``registry.SPECS``; its compile mode applies) on
    validated arguments."""
    return ACTIVATION(x, SPECS[name].kernel, beta, beta_value, mode=name)


def apply_(x: Tensor, name: str, beta_value: float = 1.0) -> Tensor:
    """Overwrite ``x`` with the activation of spec ``name`` (no autograd: the caller checked that
    no gradient is needed).

    The write bumps x's autograd version exactly once, as torch's in-place ops do, so a tensor
    that autograd saved elsewhere raises torch's error instead of giving a wrong gradient."""
    backend = get_backend()
    if (torch.compiler.is_compiling() or reference_math() or not is_dense(x)
            or resolve(x.device, backend) == "reference"):
        return x.copy_(apply(name, x, None, beta_value))  # copy_ bumps the version
    _act_forward(x, SPECS[name].kernel, None, _fp32(beta_value), backend, out=x)
    if not x.is_inference():
        torch.autograd.graph.increment_version(x)
    return x


# ---- ACON-C / Meta-ACON ------------------------------------------------------------------

def acon_dense(x: Tensor, per_sample: bool) -> Tensor:
    """``dense(x)``, and with N outermost in memory when beta is per sample (else one copy)."""
    xd = dense(x)
    if per_sample and xd.shape[0] != 1 and xd.stride(0) * xd.shape[0] != xd.numel():
        xd = xd.contiguous()
    return xd


def acon_forward_impl(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, backend: str) -> Tensor:
    """ACON-C, (p1 - p2) x sigma(beta (p1 - p2) x) + p2 x, by ``backend`` for ``x.device``."""
    per_sample = reference.per_sample(beta, x)
    xd = acon_dense(x, per_sample)
    if x.numel() == 0:
        return torch.empty_like(xd)
    name = resolve(x.device, backend)
    if name == "reference":
        return like(reference.acon_c(xd, p1, p2, beta), xd)
    y = torch.empty_like(xd)
    kernels(name).acon_forward(xd, y, flat_param(p1, x), flat_param(p2, x), flat_param(beta, x),
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
    name = resolve(x.device, backend)
    if name == "reference":
        dx, *dparams = reference.acon_c_backward(g, xd, p1, p2, beta)
        return (like(dx, xd), *(dparams if need_params else (None,) * 3))
    dx = torch.empty_like(xd)
    p = plan.channel_plan(xd, p1.numel(), per_sample)
    acc = plan.accumulator(x)
    partial = torch.empty(3 * p.partials, dtype=acc, device=x.device) if need_params else None
    kernels(name).acon_backward(g, xd, dx, flat_param(p1, x), flat_param(p2, x),
                                flat_param(beta, x), per_sample, partial, p)
    if partial is None:
        return dx, None, None, None
    # the gradients come back in the parameters' dtype when they share one (one cast, not three)
    out_dtype = p1.dtype if p1.dtype == p2.dtype == beta.dtype else acc
    sums = plan.acon_sums(partial, p, x.shape[0], per_sample, out_dtype)
    return (dx, *(s.reshape(q.shape).to(q.dtype) for s, q in zip(sums, (p1, p2, beta),
                                                                  strict=True)))


def _acon_fake(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, backend: str) -> Tensor:
    return torch.empty_like(acon_dense(x, reference.per_sample(beta, x)))


def _acon_fake_backward(grad: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
                        need_params: bool, backend: str) -> tuple[Tensor, ...]:
    dx = torch.empty_like(acon_dense(x, reference.per_sample(beta, x)))
    return dx, *(p.new_empty(p.shape) if need_params else x.new_empty(0) for p in (p1, p2, beta))


ACON_C = Op(Family(
    "acon_c", acon_forward_impl, _acon_fake, reference.acon_c,
    acon_backward_impl, _acon_fake_backward,
    lambda grad, x, p1, p2, beta, need_params: reference.acon_c_backward(grad, x, p1, p2, beta),
    saved=lambda args, outputs: args,
    backward_args=lambda saved, attrs, needs: (*saved, any(needs[1:4])),
    grad_of=(0, 1, 2, 3)))
acon_c_op, acon_c_backward_op = ACON_C.forward_op, ACON_C.backward_op


def apply_acon(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C on validated arguments, eager or under torch.compile (``config.compile_mode``)."""
    return ACON_C(x, p1, p2, beta, mode="acon_c")


# ---- FReLU's max step ---------------------------------------------------------------------

def frelu_forward_impl(x: Tensor, t: Tensor, need_code: bool,
                       backend: str) -> tuple[Tensor, Tensor | None]:
    """(max(x, t), the one-byte win code if ``need_code``) by ``backend``."""
    xd = dense(x)
    td = like(t, xd)
    name = resolve(x.device, backend)
    if name == "reference":
        y = reference.frelu_max(xd, td)
        return y, reference.frelu_max_code(xd, td) if need_code else None
    y = torch.empty_like(xd)
    code = torch.empty_like(xd, dtype=torch.uint8) if need_code else None
    if x.numel():
        kernels(name).max_forward(xd, td, y, code, plan.flat(x.numel(), plan.SCALAR))
    return y, code


def _frelu_forward(x: Tensor, t: Tensor, need_code: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(max(x, t), win code); the code is empty unless ``need_code``."""
    y, code = frelu_forward_impl(x, t, need_code, backend)
    return y, x.new_empty(0, dtype=torch.uint8) if code is None else code


def frelu_backward_impl(grad: Tensor, code: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dt) of max(x, t) from the incoming gradient and the win code."""
    g = like(grad, code)
    name = resolve(code.device, backend)
    if name == "reference":
        return reference.frelu_max_backward_code(g, code)
    dx, dt = torch.empty_like(g), torch.empty_like(g)
    if code.numel():
        kernels(name).max_backward(g, code, dx, dt, plan.flat(code.numel(), plan.SCALAR))
    return dx, dt


def _frelu_fake(x: Tensor, t: Tensor, need_code: bool, backend: str) -> tuple[Tensor, Tensor]:
    xd = dense(x)
    code = xd if need_code else x.new_empty(0)
    return torch.empty_like(xd), torch.empty_like(code, dtype=torch.uint8)


def _frelu_fake_backward(grad: Tensor, code: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(code, dtype=grad.dtype), torch.empty_like(code, dtype=grad.dtype)


FRELU_MAX = Op(Family(
    "frelu_max", _frelu_forward, _frelu_fake,
    lambda x, t, need_code: reference.frelu_max(x, t),
    frelu_backward_impl, _frelu_fake_backward, reference.frelu_max_backward_code,
    saved=lambda args, outputs: outputs[1:],  # the win code
    backward_args=lambda saved, attrs, needs: saved,
    grad_of=(0, 1)))
frelu_max_op, frelu_max_backward_op = FRELU_MAX.forward_op, FRELU_MAX.backward_op


def apply_frelu_max(x: Tensor, t: Tensor) -> Tensor:
    """max(x, t) on validated arguments, eager or under torch.compile."""
    need_code = torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)
    return FRELU_MAX(x, t, need_code, mode="frelu_max")


def frelu_max_affine_impl(x: Tensor, t: Tensor, a: Tensor, b: Tensor, backend: str) -> Tensor:
    """max(x, a t + b) with per-channel a, b: FReLU's eval-mode step (no autograd)."""
    xd = dense(x)
    td = like(t, xd)
    name = resolve(x.device, backend)
    if name == "reference":
        return like(reference.frelu_max_affine(xd, td, a, b), xd)
    y = torch.empty_like(xd)
    if x.numel():
        kernels(name).max_affine(xd, td, flat_param(a, x), flat_param(b, x), y,
                                 plan.channel_plan(xd, a.numel()))
    return y


FRELU_MAX_AFFINE = Op(Family(
    "frelu_max_affine", frelu_max_affine_impl,
    lambda x, t, a, b, backend: torch.empty_like(dense(x)), reference.frelu_max_affine))
frelu_max_affine_op = FRELU_MAX_AFFINE.forward_op


def apply_frelu_max_affine(x: Tensor, t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """max(x, a t + b) on validated arguments (no gradient needed)."""
    return FRELU_MAX_AFFINE(x, t, a, b)


# ---- gated activations: act(gate) * up ----------------------------------------------------

def row_stride(t: Tensor, k: int) -> int | None:
    """The distance between rows of ``t`` walked as prod(shape[:k]) rows of the prod(shape[k:])
    elements behind each, if those are contiguous and the rows evenly spaced; else None."""
    expected = 1
    for size, stride in zip(reversed(t.shape[k:]), reversed(t.stride()[k:]), strict=True):
        if size != 1 and stride != expected:
            return None
        expected *= size
    row = None
    for size, stride in zip(reversed(t.shape[:k]), reversed(t.stride()[:k]), strict=True):
        if size == 1:
            continue
        if row is None:
            row = stride
        elif stride != expected:
            return None
        expected = stride * size
    return expected if row is None else row


def row_walk(reads: tuple[Tensor, ...], writes: tuple[Tensor, ...]
             ) -> tuple[int, int, tuple[Tensor, ...], tuple[int, ...]]:
    """(rows, cols, reads, row strides of reads and writes): the split of the common shape into
    rows of contiguous elements that fits every written tensor and the most read ones, which
    are then used in place (the halves of a packed tensor: rows two halves apart); a read tensor
    that does not fit is copied once to contiguous.  Rows evenly spaced in every tensor are one
    flat row."""
    shape = writes[0].shape
    best = None
    for k in range(len(shape) + 1):
        w = [row_stride(t, k) for t in writes]
        if None in w:
            continue
        r = [row_stride(t, k) for t in reads]
        fits = sum(s is not None for s in r)
        if best is None or fits > best[0]:
            best = fits, k, r, w
        if fits == len(reads):
            break
    _, k, r, w = best  # contiguous buffers fit every k
    rows, cols = math.prod(shape[:k]), math.prod(shape[k:])
    reads = tuple(t if s is not None else t.contiguous() for t, s in zip(reads, r, strict=True))
    strides = tuple(cols if s is None else s for s in r) + tuple(w)
    if all(s == cols for s in strides):
        return 1, rows * cols, reads, strides
    return rows, cols, reads, strides


def _glu_halves(gate: Tensor, up: Tensor | None, dim: int) -> tuple[Tensor, Tensor]:
    return reference.halves(gate, dim) if up is None else (gate, up)


def _glu_plan(rows: int, cols: int, beta: Tensor | None) -> plan.Plan:
    """Rows of the walk; a beta tensor (one value) is read as one channel (its partials: one
    slot per (column block, row))."""
    return plan.row_plan(rows, cols, plan.SCALAR if beta is None else plan.ROWS)


def _glu_reference(gate: Tensor, up: Tensor | None, act: str, beta: Tensor | None,
                   beta_value: float, dim: int) -> Tensor:
    g, u = _glu_halves(gate, up, dim)
    b = _fp32(beta_value, gate.device) if beta is None else beta
    return reference.glu(g, u, lambda x: KERNELS[act].forward(x, b))


def _glu_reference_grads(grad: Tensor, g: Tensor, u: Tensor, act: str, beta: Tensor | None,
                         beta_value: float, need_dbeta: bool
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dgate, dup, dbeta or None) of the halves ``g``, ``u`` by the reference math."""
    spec, b = KERNELS[act], _fp32(beta_value, g.device) if beta is None else beta
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
    name = resolve(gate.device, backend)
    beta_value = _fp32(beta_value)
    if name == "reference":
        return out.copy_(_glu_reference(gate, up, act, beta, beta_value, dim))
    rows, cols, (g, u), strides = row_walk((g, u), (out,))
    kernels(name).glu_forward(g, u, out, strides, KERNEL_IDS[act],
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
    name = resolve(gate.device, backend)
    beta_value = _fp32(beta_value)
    if name == "reference":
        rg, ru, db = _glu_reference_grads(grad, g, u, act, beta, beta_value, need_dbeta)
        dg.copy_(rg)
        du.copy_(ru)
        return *grads, db
    rows, cols, (grad, g, u), strides = row_walk((grad, g, u), (dg, du))
    p = _glu_plan(rows, cols, beta)
    partial = torch.empty(p.partials, dtype=plan.accumulator(gate),
                          device=gate.device) if need_dbeta else None
    kernels(name).glu_backward(grad, g, u, dg, du, strides, KERNEL_IDS[act],
                               None if beta is None else flat_param(beta, gate), beta_value,
                               partial, p)
    if partial is None:
        return *grads, None
    return *grads, plan.channel_sums(partial, p).reshape(beta.shape).to(beta.dtype)


def _glu_fake(gate: Tensor, up: Tensor | None, act: str, beta: Tensor | None,
              beta_value: float, dim: int, backend: str) -> Tensor:
    g, _ = _glu_halves(gate, up, dim)
    return gate.new_empty(g.shape)


def _glu_fake_backward(grad: Tensor, gate: Tensor, up: Tensor | None, act: str,
                       beta: Tensor | None, beta_value: float, dim: int, need_dbeta: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dup = gate.new_empty(0) if up is None else up.new_empty(up.shape)
    db = beta.new_empty(beta.shape) if need_dbeta else gate.new_empty(0)
    return gate.new_empty(gate.shape), dup, db


GLU = Op(Family(
    "glu", glu_forward_impl, _glu_fake, _glu_reference,
    glu_backward_impl, _glu_fake_backward, _glu_reference_backward,
    saved=lambda args, outputs: (args[0], args[1], args[3]),  # gate, up (None: packed), beta
    # (gate, up, act, beta, beta_value, dim, need_dbeta)
    backward_args=lambda saved, attrs, needs: (saved[0], saved[1], attrs[2], saved[2], attrs[4],
                                               attrs[5], needs[3]),
    grad_of=(0, 1, 3)))
glu_op, glu_backward_op = GLU.forward_op, GLU.backward_op


def apply_glu(gate: Tensor, up: Tensor | None, name: str, beta: Tensor | None = None,
              beta_value: float = 1.0, dim: int = -1) -> Tensor:
    """act(gate) * up for the activation of spec ``name`` on validated arguments (``up`` None:
    the halves of ``gate`` along ``dim``), eager or under torch.compile (``config.compile_mode``
    of "glu")."""
    return GLU(gate, up, SPECS[name].kernel, beta, beta_value, dim, mode="glu")
