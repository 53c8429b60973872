"""Every activation as torch ops: kernels, fake kernels and autograd.

The elementwise family (mish, swish/silu, gelu, gelu-tanh) shares one pair of ops; ACON-C and
FReLU's max step have their own.  Two entry points reach the same kernels:

* eager calls go through ``_ActivationFn``, a plain ``autograd.Function`` (a few microseconds of
  host time cheaper per call than a custom op);
* under ``torch.compile`` the custom ops (``fused_act::activation``, ``fused_act::acon_c``,
  ``fused_act::frelu_max`` and their backward ops) are traced, opaque to Inductor, or, when
  ``config.compile_mode`` says "decompose" for the op, the reference math is traced instead.

Either way backward saves only the inputs (x and the parameters), except frelu_max, which
saves a one-byte code of which side won instead of x and t.  Double backward
(``create_graph=True``) is supported in eager mode through the reference's explicit backward
math; under ``torch.compile`` the opaque backward ops have no derivative and say so.

The backend in force when a forward runs (``backend.get_backend()``) is recorded with the node
and runs its backward too, wherever and whenever the backward is called: it is an argument of
every op, resolved per call by ``backend.resolve``.  Under torch.func transforms (vmap, grad,
jvp, jacrev, jacfwd, hessian, and the vmap of ``autograd.functional.jacobian(vectorize=True)``),
forward-mode AD and ``torch.jit.trace``, an op is its reference math: plain torch operations,
which every transform differentiates and batches natively and a trace records; the kernels see
only plain tensors.  Dense inputs of any strides (channels_last, permuted) run in place of their
memory with outputs of the same strides; other inputs are copied once to contiguous; parameter
tensors reach the kernels flat, contiguous and in opmath (``flat_param``).
"""

import struct
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.autograd.forward_ad
from torch import Tensor

from . import config, plan, reference
from .backend import get_backend, resolve
from .registry import KERNEL_IDS, KERNELS

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


_kernel_sets: dict = {}


def _kernels(name: str):
    """The kernel families (``elementwise``, ``acon``, ``frelu``) of backend ``name``."""
    # imported on first use: defining the Triton kernels reads TRITON_INTERPRET, loading the
    # CUDA ones may build them, and CPU-only users of the reference pay for neither
    if name not in _kernel_sets:
        if name == "cuda":
            from . import _cuda
            _cuda.library()
            _kernel_sets[name] = _cuda
        else:
            from .triton_kernels import acon, elementwise, frelu
            _kernel_sets[name] = SimpleNamespace(elementwise=elementwise, acon=acon,
                                                 frelu=frelu)
    return _kernel_sets[name]


def flat_param(p: Tensor, x: Tensor) -> Tensor:
    """A parameter as every kernel reads it: flat, contiguous (a strided view is copied: the
    kernels index it with unit stride) and in x's opmath dtype (fp32, or fp64 for fp64 x)."""
    return p.reshape(-1).to(plan.accumulator(x)).contiguous()


def reference_math() -> bool:
    """True where an op must be its reference math, not a kernel call: under a torch.func
    transform (its wrapped tensors have no storage a kernel could read), forward-mode AD (the
    reference's operations carry tangents) and ``torch.jit.trace`` (a trace records operations,
    not kernel launches)."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0 or torch.jit.is_tracing())


# ---- implementations (what the op and the Function run) ------------------------------------

def forward_impl(x: Tensor, act: str, beta: Tensor | None, beta_value: float, backend: str,
                 out: Tensor | None = None) -> Tensor:
    """f(x) by ``backend`` (a name as ``set_backend`` takes) for ``x.device``; ``out`` (dense,
    x's strides) may be x."""
    xd = dense(x)
    if x.numel() == 0:
        return torch.empty_like(xd) if out is None else out
    name = resolve(x.device, backend)
    if name == "reference":
        y = KERNELS[act].forward(xd, beta_value if beta is None else beta)
        return y if out is None else out.copy_(y)
    y = torch.empty_like(xd) if out is None else out
    _kernels(name).elementwise.forward(xd, y, KERNEL_IDS[act],
                                       None if beta is None else flat_param(beta, x), beta_value)
    return y


def backward_impl(grad: Tensor, x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                  need_dbeta: bool, backend: str) -> tuple[Tensor, Tensor | None]:
    """(dx, dbeta if asked) by ``backend`` for ``x.device``."""
    xd = dense(x)
    g = like(grad, xd)
    if x.numel() == 0:
        db = torch.zeros_like(beta) if need_dbeta else None
        return torch.empty_like(xd), db
    name = resolve(x.device, backend)
    if name == "reference":
        return KERNELS[act].backward(g, xd, beta_value if beta is None else beta, need_dbeta)
    dx = torch.empty_like(xd)
    db = _kernels(name).elementwise.backward(g, xd, dx, KERNEL_IDS[act],
                                             None if beta is None else flat_param(beta, x),
                                             beta_value, need_dbeta)
    if db is not None:
        db = db.reshape(beta.shape).to(beta.dtype)
    return dx, db


# ---- torch.library custom ops (what torch.compile sees) ------------------------------------

@torch.library.custom_op("fused_act::activation", mutates_args=())
def activation_op(x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                  backend: str) -> Tensor:
    """y = f(x) for the kernel activation ``act`` (``registry.KERNEL_IDS``; beta: swish)."""
    return forward_impl(x, act, beta, _fp32(beta_value), backend)


@activation_op.register_fake
def _(x: Tensor, act: str, beta: Tensor | None, beta_value: float, backend: str) -> Tensor:
    return torch.empty_like(dense(x))


@torch.library.custom_op("fused_act::activation_backward", mutates_args=())
def activation_backward_op(grad: Tensor, x: Tensor, act: str, beta: Tensor | None,
                           beta_value: float, need_dbeta: bool,
                           backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dbeta); dbeta is an empty tensor unless ``need_dbeta``."""
    dx, db = backward_impl(grad, x, act, beta, _fp32(beta_value), need_dbeta, backend)
    return dx, x.new_empty(0) if db is None else db


@activation_backward_op.register_fake
def _(grad: Tensor, x: Tensor, act: str, beta: Tensor | None, beta_value: float,
      need_dbeta: bool, backend: str) -> tuple[Tensor, Tensor]:
    db = torch.empty_like(beta) if need_dbeta else x.new_empty(0)
    return torch.empty_like(dense(x)), db


def _fp32(v: float) -> float:
    """``v`` rounded to fp32, as every kernel takes a scalar (so every backend agrees)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _save(ctx, x: Tensor, act: str, beta: Tensor | None, beta_value: float,
          backend: str) -> None:
    ctx.act, ctx.beta_value, ctx.backend = act, beta_value, backend
    ctx.save_for_backward(x, beta)


def _grads(ctx, grad: Tensor, backward: Callable) -> tuple:
    x, beta = ctx.saved_tensors
    need_dbeta = beta is not None and ctx.needs_input_grad[2]
    dx, db = backward(grad, x, ctx.act, beta, ctx.beta_value, need_dbeta, ctx.backend)
    return dx, None, db if need_dbeta else None, None, None


activation_op.register_autograd(
    lambda ctx, grad: _grads(ctx, grad, activation_backward_op),
    setup_context=lambda ctx, inputs, output: _save(ctx, *inputs))


def _reference_backward(grad: Tensor, x: Tensor, act: str, beta: Tensor | None,
                        beta_value: float, need_dbeta: bool,
                        backend: str) -> tuple[Tensor, Tensor | None]:
    """The reference's explicit backward: plain torch operations, so differentiable (double
    backward) and batchable (a vmap over the backward)."""
    return KERNELS[act].backward(grad, x, beta_value if beta is None else beta, need_dbeta)


def plain_backward(grad: Tensor) -> bool:
    """False where a backward must run the reference math: ``create_graph=True`` (the gradient
    needs a graph of its own), a torch.func transform over the backward, or a batched gradient
    (``autograd.grad(is_grads_batched=True)``, which ``autograd.functional.jacobian(...,
    vectorize=True)`` runs)."""
    return not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
                or torch._C._functorch.is_legacy_batchedtensor(grad))


class _ActivationFn(torch.autograd.Function):
    """The eager path: the same kernels without the custom-op dispatch cost."""

    @staticmethod
    def forward(ctx, x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                backend: str) -> Tensor:
        _save(ctx, x, act, beta, beta_value, backend)
        return forward_impl(x, act, beta, beta_value, backend)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        return _grads(ctx, grad, backward_impl if plain_backward(grad) else _reference_backward)


def apply(name: str, x: Tensor, act: str, beta: Tensor | None = None,
          beta_value: float = 1.0) -> Tensor:
    """Run activation ``act`` (public name ``name``) on validated arguments."""
    if torch.compiler.is_compiling():
        if config.mode_for(name) == "decompose":
            return KERNELS[act].forward(x, beta_value if beta is None else beta)
        return activation_op(x, act, beta, beta_value, get_backend())
    if reference_math():
        return KERNELS[act].forward(x, beta_value if beta is None else beta)
    return _ActivationFn.apply(x, act, beta, beta_value, get_backend())


def apply_(x: Tensor, act: str, beta_value: float = 1.0) -> Tensor:
    """Overwrite ``x`` with f(x) (no autograd: the caller checked that no gradient is needed).

    The write bumps x's autograd version exactly once, as torch's in-place ops do, so a tensor
    that autograd saved elsewhere raises torch's error instead of giving a wrong gradient."""
    backend = get_backend()
    if (torch.compiler.is_compiling() or reference_math() or not is_dense(x)
            or resolve(x.device, backend) == "reference"):
        return x.copy_(apply(act, x, act, None, beta_value))  # copy_ bumps the version
    forward_impl(x, act, None, beta_value, backend, out=x)
    if not x.is_inference():
        torch.autograd.graph.increment_version(x)
    return x


# ---- ACON-C / Meta-ACON ------------------------------------------------------------------

def acon_per_sample(beta: Tensor, x: Tensor) -> bool:
    """A beta of shape (N, C) or (N, C, 1, ...) with N > 1 is per sample (Meta-ACON)."""
    return beta.dim() >= 2 and beta.shape[0] == x.shape[0] and beta.shape[0] != 1


def acon_dense(x: Tensor, per_sample: bool) -> Tensor:
    """``dense(x)``, and with N outermost in memory when beta is per sample (else one copy)."""
    xd = dense(x)
    if per_sample and xd.shape[0] != 1 and xd.stride(0) * xd.shape[0] != xd.numel():
        xd = xd.contiguous()
    return xd


def acon_forward_impl(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, backend: str) -> Tensor:
    """ACON-C by ``backend`` for ``x.device``."""
    per_sample = acon_per_sample(beta, x)
    xd = acon_dense(x, per_sample)
    if x.numel() == 0:
        return torch.empty_like(xd)
    name = resolve(x.device, backend)
    if name == "reference":
        return reference.acon_c(xd, p1, p2, beta)
    y = torch.empty_like(xd)
    _kernels(name).acon.forward(xd, y, flat_param(p1, x), flat_param(p2, x), flat_param(beta, x),
                            per_sample)
    return y


def acon_backward_impl(grad: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
                       need_params: bool, backend: str) -> tuple[Tensor, ...]:
    """(dx, dp1, dp2, dbeta), the last three only if ``need_params`` (else None)."""
    per_sample = acon_per_sample(beta, x)
    xd = acon_dense(x, per_sample)
    g = like(grad, xd)
    if x.numel() == 0:
        zeros = tuple(torch.zeros_like(p) if need_params else None for p in (p1, p2, beta))
        return (torch.empty_like(xd), *zeros)
    name = resolve(x.device, backend)
    if name == "reference":
        dx, *dparams = reference.acon_c_backward(g, xd, p1, p2, beta)
        return (dx, *(dparams if need_params else (None,) * 3))
    dx = torch.empty_like(xd)
    # the gradients come back in the parameters' dtype when they share one (one cast, not three)
    out_dtype = p1.dtype if p1.dtype == p2.dtype == beta.dtype else None
    sums = _kernels(name).acon.backward(g, xd, dx, flat_param(p1, x), flat_param(p2, x),
                                        flat_param(beta, x), per_sample, need_params, out_dtype)
    if sums is None:
        return dx, None, None, None
    return (dx, *(s.reshape(p.shape).to(p.dtype) for s, p in zip(sums, (p1, p2, beta),
                                                                  strict=True)))


@torch.library.custom_op("fused_act::acon_c", mutates_args=())
def acon_c_op(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, backend: str) -> Tensor:
    """ACON-C: (p1 - p2) x sigma(beta (p1 - p2) x) + p2 x."""
    return acon_forward_impl(x, p1, p2, beta, backend)


@acon_c_op.register_fake
def _(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, backend: str) -> Tensor:
    return torch.empty_like(acon_dense(x, acon_per_sample(beta, x)))


@torch.library.custom_op("fused_act::acon_c_backward", mutates_args=())
def acon_c_backward_op(grad: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
                       need_params: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dp1, dp2, dbeta); the parameter gradients are empty unless ``need_params``."""
    dx, *dparams = acon_backward_impl(grad, x, p1, p2, beta, need_params, backend)
    # dp1 and dp2 are views of one buffer, and a custom op's outputs may not alias
    return dx, *(x.new_empty(0) if d is None else d.clone() for d in dparams)


@acon_c_backward_op.register_fake
def _(grad: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
      need_params: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx = torch.empty_like(acon_dense(x, acon_per_sample(beta, x)))
    return dx, *(torch.empty_like(p) if need_params else x.new_empty(0) for p in (p1, p2, beta))


def _acon_grads(ctx, grad: Tensor, backward: Callable) -> tuple:
    x, p1, p2, beta = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, *dparams = backward(grad, x, p1, p2, beta, any(need[1:4]), ctx.backend)
    return (dx, *(d if n else None for d, n in zip(dparams, need[1:4], strict=True)), None)


def _acon_save(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.backend = inputs[4]
    ctx.save_for_backward(*inputs[:4])


acon_c_op.register_autograd(lambda ctx, grad: _acon_grads(ctx, grad, acon_c_backward_op),
                            setup_context=_acon_save)


def _acon_reference_backward(grad: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
                             need_params: bool, backend: str) -> tuple:
    """The reference's explicit backward (differentiable and batchable, as
    ``_reference_backward``)."""
    return reference.acon_c_backward(grad, x, p1, p2, beta)


class _AconFn(torch.autograd.Function):
    """The eager path of ACON-C: the same kernels without the custom-op dispatch cost."""

    @staticmethod
    def forward(ctx, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, backend: str) -> Tensor:
        _acon_save(ctx, (x, p1, p2, beta, backend), None)
        return acon_forward_impl(x, p1, p2, beta, backend)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        return _acon_grads(ctx, grad,
                           acon_backward_impl if plain_backward(grad) else _acon_reference_backward)


def apply_acon(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C on validated arguments, eager or under torch.compile (``config.compile_mode``)."""
    if torch.compiler.is_compiling():
        if config.mode_for("acon_c") == "decompose":
            return reference.acon_c(x, p1, p2, beta)
        return acon_c_op(x, p1, p2, beta, get_backend())
    if reference_math():
        return reference.acon_c(x, p1, p2, beta)
    return _AconFn.apply(x, p1, p2, beta, get_backend())


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
        _kernels(name).frelu.forward(xd, td, y, code)
    return y, code


def frelu_backward_impl(grad: Tensor, code: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dt) from the incoming gradient and the win code."""
    g = like(grad, code)
    name = resolve(code.device, backend)
    if name == "reference":
        return reference.frelu_max_backward_code(g, code)
    dx, dt = torch.empty_like(g), torch.empty_like(g)
    if code.numel():
        _kernels(name).frelu.backward(g, code, dx, dt)
    return dx, dt


@torch.library.custom_op("fused_act::frelu_max", mutates_args=())
def frelu_max_op(x: Tensor, t: Tensor, need_code: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(max(x, t), win code); the code is empty unless ``need_code``."""
    y, code = frelu_forward_impl(x, t, need_code, backend)
    return y, x.new_empty(0, dtype=torch.uint8) if code is None else code


@frelu_max_op.register_fake
def _(x: Tensor, t: Tensor, need_code: bool, backend: str) -> tuple[Tensor, Tensor]:
    xd = dense(x)
    code = torch.empty_like(xd, dtype=torch.uint8) if need_code else x.new_empty(0,
                                                                               dtype=torch.uint8)
    return torch.empty_like(xd), code


@torch.library.custom_op("fused_act::frelu_max_backward", mutates_args=())
def frelu_max_backward_op(grad: Tensor, code: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dt) of max(x, t) from the win code."""
    return frelu_backward_impl(grad, code, backend)


@frelu_max_backward_op.register_fake
def _(grad: Tensor, code: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(code, dtype=grad.dtype), torch.empty_like(code, dtype=grad.dtype))


def _frelu_save(ctx, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.backend = inputs[3]
    ctx.save_for_backward(output[1])


frelu_max_op.register_autograd(
    lambda ctx, grad, _: (*frelu_max_backward_op(grad, ctx.saved_tensors[0], ctx.backend), None,
                          None),
    setup_context=_frelu_save)


@torch.library.custom_op("fused_act::frelu_max_affine", mutates_args=())
def frelu_max_affine_op(x: Tensor, t: Tensor, a: Tensor, b: Tensor, backend: str) -> Tensor:
    """max(x, a t + b) with per-channel a, b: FReLU's eval-mode step (no autograd)."""
    xd = dense(x)
    td = like(t, xd)
    name = resolve(x.device, backend)
    if name == "reference":
        return reference.frelu_max_affine(xd, td, a, b)
    y = torch.empty_like(xd)
    if x.numel():
        _kernels(name).frelu.forward_affine(xd, td, flat_param(a, x), flat_param(b, x), y)
    return y


@frelu_max_affine_op.register_fake
def _(x: Tensor, t: Tensor, a: Tensor, b: Tensor, backend: str) -> Tensor:
    return torch.empty_like(dense(x))


def apply_frelu_max_affine(x: Tensor, t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """max(x, a t + b) on validated arguments (no gradient needed)."""
    if reference_math() and not torch.compiler.is_compiling():
        return reference.frelu_max_affine(x, t, a, b)
    return frelu_max_affine_op(x, t, a, b, get_backend())


class _FreluMaxFn(torch.autograd.Function):
    """The eager path of frelu_max: saves the win code (1 byte per element), not x and t."""

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, backend: str) -> Tensor:
        y, code = frelu_forward_impl(x, t, ctx.needs_input_grad[0] or ctx.needs_input_grad[1],
                                     backend)
        ctx.backend = backend
        ctx.save_for_backward(code)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (code,) = ctx.saved_tensors
        if plain_backward(grad):
            return (*frelu_backward_impl(grad, code, ctx.backend), None)
        # differentiable in grad, batchable: plain torch operations
        return (*reference.frelu_max_backward_code(grad, code), None)


def apply_frelu_max(x: Tensor, t: Tensor) -> Tensor:
    """max(x, t) on validated arguments, eager or under torch.compile."""
    if torch.compiler.is_compiling():
        if config.mode_for("frelu_max") == "decompose":
            return reference.frelu_max(x, t)
        need = torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)
        return frelu_max_op(x, t, need, get_backend())[0]
    if reference_math():
        return reference.frelu_max(x, t)
    return _FreluMaxFn.apply(x, t, get_backend())
