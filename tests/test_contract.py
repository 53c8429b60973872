"""The contract of DESIGN.md sections 2-4, one table per clause, on every backend ("triton" under
the interpreter, "cuda" through the CPU emulation of its kernels, "reference"): strided
parameters, in-place version counters, unsupported dtypes, negative views, the backend a
backward runs on, torch.func, forward-mode AD, autograd.functional.jacobian, dynamic
torch.compile, torch.jit, a property-based sweep of shapes, layouts, dtypes and ops,
torch.compile around transforms, fake kernels' strides, one rounding of a float beta, and the
benchmark's tables."""

import contextlib
import inspect
import itertools
import math
import re

import hypothesis
import hypothesis.strategies as st
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fused_act
from fused_act import reference, registry
from fused_act.kernels import Kernels
from fused_act.triton_kernels import TritonKernels

from .cases import (
    ALL_OPS,
    BACKENDS,
    CPU_BACKENDS,
    DTYPES,
    OPS,
    OpCase,
    assert_near,
    assert_param_near,
    need_backend,
)
from .test_csrc_emulated import cuda_on_cpu, emulated  # noqa: F401

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # float64 transforms against torch's own functions


def _use(request, backend):
    """Make ``backend`` runnable on CPU tensors in this test (CUDA kernels: their emulation)."""
    if backend == "cuda":
        request.getfixturevalue("cuda_on_cpu")
    else:
        need_backend(backend, "cpu")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=F64, scale=4.0, gen=None):
    gen = gen or _gen()
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)


def _rand(*shape, lo=-2.0, hi=2.0, dtype=F64, gen=None):
    gen = gen or _gen()
    return (torch.rand(shape, generator=gen, dtype=F64) * (hi - lo) + lo).to(dtype)


def _leaf(t):
    """``t`` as a leaf that requires grad, keeping its strides and storage offset."""
    return t.detach().requires_grad_()


def _acon_formula(x, p1, p2, beta):
    """ACON-C as plain torch operations (the paper's formula), parameters broadcast over C."""
    ones = [1] * (x.dim() - 2)
    p1, p2 = (p.reshape(1, x.shape[1], *ones) for p in (p1, p2))
    beta = beta.reshape(beta.shape[0] if beta.dim() >= 2 else 1, x.shape[1], *ones)
    d = (p1 - p2) * x
    return d * torch.sigmoid(beta * d) + p2 * x


def _acon_params(per_sample):
    def params(x):
        gen = _gen(7)
        pd = F64 if x.dtype == F64 else torch.float32
        n, c, ones = x.shape[0], x.shape[1], [1] * (x.dim() - 2)
        p1 = _rand(c, dtype=pd, gen=gen)
        p2 = _rand(1, c, *ones, dtype=pd, gen=gen) if ones else _rand(c, dtype=pd, gen=gen)
        beta = _rand(n, c, lo=0.2, dtype=pd, gen=gen) if per_sample else \
            _rand(c, lo=0.2, dtype=pd, gen=gen)
        return [p.to(x.device).requires_grad_() for p in (p1, p2, beta)]
    return params


# ACON-C in the shape of the tables in cases.py (x of rank >= 2)
ACON_OPS = [
    OpCase(name, lambda x, p: fused_act.acon_c(x, *p), lambda x, p: reference.acon_c(x, *p),
       lambda g, x, p: reference.acon_c_backward(g, x, *p), lambda x, p: _acon_formula(x, *p),
       _acon_params(per_sample), scale=4.0)
    for name, per_sample in (("acon_c", False), ("acon_c_sample", True))]
# the ops without parameter tensors: (x) -> y, with torch's own function beside each
ELEMENTWISE = [op for op in OPS if not op.params(torch.zeros(2, 3))]
# the registry's activations with a beta (a float, or a tensor of one or C values)
BETA_SPECS = [s for s in registry.SPECS.values() if s.beta]


def _beta_spec(name):
    """The beta spec a case named ``<spec>_...`` or ``<spec>-...`` is about."""
    return next(s for s in BETA_SPECS if name.startswith((f"{s.name}_", f"{s.name}-")))


def _beta_call(spec, b):
    """``spec``'s public function with beta ``b`` (a float, or a tensor broadcast over C)."""
    return lambda x: spec.call(x, b(x) if callable(b) else b)


def _beta_formula(spec):
    """``spec``'s torch function of (x, beta tensor), the tensor broadcast over C."""
    return lambda x, b: spec.torch_fn(x, reference._param(b, x))


def _param_terms(op_name, g64, x64, p64):
    """Per parameter, the size of the terms its reduced gradient sums (for its tolerance)."""
    if not p64:
        return []
    if op_name.startswith("acon"):
        terms = reference.acon_c_backward(g64.abs(), x64.abs(), *[p.abs() for p in p64])[1:]
        return [t.abs() for t in terms]
    if op_name.startswith("frelu"):
        return [g64.abs()]
    return [_beta_spec(op_name).backward(g64.abs(), x64, p64[0], True)[1].abs()]


# ---- 1. strided / sliced parameter tensors -----------------------------------------------

def _strided_case(name, dtype, x_offset):
    """(call, x, params): x of the case's shape (a view with a storage offset if ``x_offset``)
    and its parameters as strided views."""
    gen = _gen(3)
    spec = _beta_spec(name) if name.startswith(tuple(s.name for s in BETA_SPECS)) else None
    shape = (2, 3, 5) if spec and name.endswith("_channel") else (2, 3, 4, 5)
    n = math.prod(shape)
    x = _randn(n + 1, dtype=dtype, gen=gen)[1:].view(shape) if x_offset else \
        _randn(*shape, dtype=dtype, gen=gen)

    def r(*s, lo=-2.0):
        return _rand(*s, lo=lo, dtype=dtype, gen=gen)

    if name == "mish":
        return lambda x, p: fused_act.mish(x), x, []
    if spec:
        beta = (torch.rand(6, generator=gen).to(dtype) + 0.5)[::2] if name.endswith(
            "_channel") else r(1, 6, 1, 1, lo=0.5)[:, ::2]
        return lambda x, p: spec.call(x, p[0]), x, [beta]
    if name == "frelu_max":
        return lambda x, p: fused_act.frelu_max(x, p[0]), x, [_randn(2, 3, 4, 10, dtype=dtype,
                                                                     gen=gen)[..., ::2]]
    beta = {"acon_channel": lambda: r(6, lo=0.2)[::2],
            "acon_sample": lambda: r(2, 6, lo=0.2)[:, ::2],
            "acon_sample_4d": lambda: r(2, 6, 1, 1, lo=0.2)[:, ::2]}[name]()
    return lambda x, p: fused_act.acon_c(x, *p), x, [r(6)[::2], r(1, 6, 1, 1)[:, ::2], beta]


STRIDED = [f"{s.name}_{kind}" for s in BETA_SPECS for kind in ("channel", "channel_4d")] + [
    "acon_channel", "acon_sample", "acon_sample_4d", "frelu_max"]
STRIDED_CASES = [pytest.param("mish", True, id="mish-x_offset")] + [
    pytest.param(name, off, id=f"{name}-{'x_offset' if off else 'x_contiguous'}")
    for name in STRIDED for off in (False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, x_offset", STRIDED_CASES)
def test_strided_params_match_contiguous(name, x_offset, backend, dtype, request):
    """Strided parameter views (and x with a storage offset) give the values and gradients of
    contiguous copies (section 4: a unit-stride kernel gets a copy, never a strided view)."""
    _use(request, backend)
    call, x, params = _strided_case(name, dtype, x_offset)
    assert (x.storage_offset() > 0) == x_offset
    assert all(not p.is_contiguous() for p in params), "the case must have strided parameters"
    x, params = _leaf(x), [_leaf(p) for p in params]
    g = _randn(*x.shape, dtype=dtype, scale=1.0, gen=_gen(5))
    with fused_act.use_backend(backend):
        y = call(x, params)
        grads = torch.autograd.grad(y, [x, *params], g)
    x64, g64 = x.detach().double().contiguous(), g.double()
    p64 = [p.detach().double().contiguous() for p in params]
    with fused_act.use_backend("reference"):
        xr, pr = _leaf(x64), [_leaf(p) for p in p64]
        want_y = call(xr, pr)
        want = torch.autograd.grad(want_y, [xr, *pr], g64)
    what = f"{name}[{backend}, {dtype}, x_offset={x_offset}]"
    assert_near(y, want_y, dtype, what + " forward")
    assert_near(grads[0], want[0], dtype, what + " dx")
    terms = _param_terms(name, g64, x64, p64)
    for i, (p, got, ref64, t) in enumerate(zip(params, grads[1:], want[1:], terms, strict=True)):
        assert got.shape == p.shape, f"{what} dparam{i}: shape {got.shape} vs {p.shape}"
        assert_param_near(got, ref64, t + ref64.abs(), dtype, f"{what} dparam{i}")


# ---- 2. in-place writes bump the version counter ------------------------------------------

INPLACE = [pytest.param(getattr(fused_act.nn, s.module), getattr(torch.nn, s.replaces),
                        s.torch_fn, id=s.module) for s in registry.SPECS.values()
           if s.replaces
           and "inplace" in inspect.signature(getattr(torch.nn, s.replaces)).parameters]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours, theirs, fn", INPLACE)
def test_inplace_saved_tensor_raises(ours, theirs, fn, backend, request):
    """Overwriting a tensor autograd saved elsewhere makes backward raise torch's error, as
    torch.nn's in-place module does (section 4: the version counter is bumped)."""
    _use(request, backend)
    for module in (theirs, ours):
        x = torch.randn(50, generator=_gen())
        w = torch.randn(50, requires_grad=True)
        y = (x * w).sum()
        with fused_act.use_backend(backend):
            module(inplace=True)(x)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours, theirs, fn", INPLACE)
def test_inplace_version_delta(ours, theirs, fn, backend, request):
    """One in-place call bumps x._version by exactly what torch.nn's module does (1)."""
    _use(request, backend)
    deltas = {}
    for label, module in (("torch", theirs), ("fused_act", ours)):
        x = torch.randn(50, generator=_gen())
        before = x._version
        with fused_act.use_backend(backend):
            module(inplace=True)(x)
        deltas[label] = x._version - before
    assert deltas["fused_act"] == deltas["torch"] == 1, f"version deltas {deltas}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours, theirs, fn", INPLACE)
def test_inplace_no_grad_writes_input(ours, theirs, fn, backend, request):
    """Under torch.no_grad() the result is written into x's own memory."""
    _use(request, backend)
    x = torch.randn(50, generator=_gen()) * 4
    want = fn(x.double())
    ptr = x.data_ptr()
    with torch.no_grad(), fused_act.use_backend(backend):
        y = ours(inplace=True)(x)
    assert y.data_ptr() == x.data_ptr() == ptr, "the result is not x's memory"
    assert_near(x, want, torch.float32, f"{ours.__name__}(inplace=True) values in x")


# ---- 3. unsupported dtypes ------------------------------------------------------------

def _pdtype(x):
    return F64 if x.dtype == F64 else torch.float32


def _gated(spec):
    """glu of the spec's activation on the halves of x (up=None), a float beta where it has one."""
    kwargs = {**spec.kwargs, **({"beta": 1.5} if spec.beta else {})}
    return lambda x: fused_act.glu(x, None, spec.function or spec.name, 1, **kwargs)


# case -> (public name, call(x), the argument x is); parameters in a supported dtype, t in x's
# dtype; each activation also gated (x the packed gate), and the named gated forms
DTYPE_OPS = {
    **{s.name: (s.function or s.name, s.call, "x") for s in registry.SPECS.values()
       if not s.beta},
    **{f"{s.name}_{kind}": (s.function or s.name, _beta_call(s, b), "x") for s in BETA_SPECS
       for kind, b in (("float", 1.5),
                       ("tensor", lambda x: torch.full((3,), 1.5, dtype=_pdtype(x))))},
    "acon_c": ("acon_c", lambda x: fused_act.acon_c(
        x, torch.full((3,), 1.5, dtype=_pdtype(x)), torch.full((3,), 0.25, dtype=_pdtype(x)),
        torch.ones(3, dtype=_pdtype(x))), "x"),
    "frelu_max": ("frelu_max", lambda x: fused_act.frelu_max(x, torch.zeros_like(x)), "x"),
    **{f"glu_{s.name}": ("glu", _gated(s), "gate") for s in registry.SPECS.values()},
    "swiglu": ("swiglu", lambda x: fused_act.swiglu(x, x), "gate"),
    "geglu": ("geglu", lambda x: fused_act.geglu(x, dim=1), "gate"),
}
BAD_DTYPES = [getattr(torch, n) for n in ("float8_e5m2", "float8_e4m3fn") if hasattr(torch, n)] + [
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]
FLOAT8 = [d for d in BAD_DTYPES if "float8" in str(d)]
SUPPORTED_NAMES = ("float16", "bfloat16", "float32", "float64")


def _names(msg, arg):
    """True if ``msg`` names the argument ``arg`` (as a word, maybe quoted; not "x's")."""
    return re.search(rf"(?<![\w.'])(['\"`]?){re.escape(arg)}\1(?![\w'])", msg) is not None


@contextlib.contextmanager
def _kernel_probe(monkeypatch, attr):
    """Record every call of a ``Kernels`` launcher whose name ends in ``attr`` ("forward" or
    "backward") on each backend; yields the list of (backend, launcher) called."""
    from fused_act import kernels
    from fused_act._cuda import ExtensionKernels
    calls = []
    names = [n for n in vars(Kernels) if n.endswith(attr)]
    for cls in (TritonKernels, ExtensionKernels):
        for name in names:
            if not hasattr(cls, name):  # an optional launcher this backend lacks
                continue
            original = getattr(cls, name)

            def wrapper(*args, _orig=original, _name=name, _cls=cls, **kwargs):
                # the C++ kernels share one class: the CPU ones are the instance loaded as "cpu"
                backend = "triton" if _cls is TritonKernels else (
                    "cpu" if args[0] is kernels._loaded.get("cpu") else "cuda")
                calls.append((backend, _name))
                return _orig(*args, **kwargs)

            monkeypatch.setattr(cls, name, wrapper if cls is ExtensionKernels else
                                staticmethod(wrapper))
    yield calls


def _assert_dtype_error(err, op, arg, what):
    msg = str(err.value)
    assert f"fused_act.{op}" in msg, f"{what}: message does not name fused_act.{op}: {msg!r}"
    assert _names(msg, arg), f"{what}: message does not name the argument {arg!r}: {msg!r}"
    missing = [n for n in SUPPORTED_NAMES if n not in msg]
    assert not missing, f"{what}: supported dtypes {missing} not listed: {msg!r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DTYPE_OPS))
def test_unsupported_x_dtype(case, dtype, backend, request, monkeypatch):
    """x of any other dtype is a TypeError naming the op, "x" and the supported set, raised
    before any kernel launch (section 4)."""
    _use(request, backend)
    op, call, arg = DTYPE_OPS[case]
    x = _randn(2, 4, 4).to(dtype) if arg == "gate" else _randn(2, 3, 4).to(dtype)
    with _kernel_probe(monkeypatch, "forward") as launched, fused_act.use_backend(backend), \
            pytest.raises(TypeError) as err:
        call(x)
    assert not launched, f"{case}[{dtype}]: kernels launched before the error: {launched}"
    _assert_dtype_error(err, op, arg, f"{case}[{dtype}, {backend}]")


def _bad_param_call(case, dtype):
    x = _randn(2, 3, 4, dtype=torch.float32)
    ok = torch.ones(3)
    bad = torch.ones(3).to(dtype)
    return {
        **{f"{s.name}-beta": lambda s=s: s.call(x, bad) for s in BETA_SPECS},
        "acon_c-p1": lambda: fused_act.acon_c(x, bad, ok, ok),
        "acon_c-p2": lambda: fused_act.acon_c(x, ok, bad, ok),
        "acon_c-beta": lambda: fused_act.acon_c(x, ok, ok, bad),
        "frelu_max-t": lambda: fused_act.frelu_max(x, torch.zeros(2, 3, 4).to(dtype)),
        "glu-up": lambda: fused_act.glu(x, torch.zeros(2, 3, 4).to(dtype)),
        "glu-beta": lambda: fused_act.glu(x, activation=BETA_SPECS[0].name,
                                          beta=torch.ones(1).to(dtype)),
    }[case]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("case", [f"{s.name}-beta" for s in BETA_SPECS] + [
    "acon_c-p1", "acon_c-p2", "acon_c-beta", "frelu_max-t", "glu-up", "glu-beta"])
def test_unsupported_param_dtype(case, dtype, backend, request, monkeypatch):
    """A float8 parameter (beta, p1, p2, t) with a float32 x is a TypeError naming it."""
    _use(request, backend)
    op, arg = case.split("-")
    call = _bad_param_call(case, dtype)
    with _kernel_probe(monkeypatch, "forward") as launched, fused_act.use_backend(backend), \
            pytest.raises(TypeError) as err:
        call()
    assert not launched, f"{case}[{dtype}]: kernels launched before the error: {launched}"
    _assert_dtype_error(err, op, arg, f"{case}[{dtype}, {backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DTYPE_OPS))
def test_supported_dtypes_work(case, dtype, backend, request):
    """float16, bfloat16, float32 and float64 still run, with the float64 reference's values."""
    _use(request, backend)
    _, call, arg = DTYPE_OPS[case]
    x = _randn(2, 4 if arg == "gate" else 3, 4, dtype=dtype, gen=_gen(11))
    with fused_act.use_backend(backend):
        y = call(x)
    with fused_act.use_backend("reference"):
        want = call(x.double())
    assert y.dtype == dtype, f"{case}: output dtype {y.dtype} for x of {dtype}"
    assert_near(y, want, dtype, f"{case}[{dtype}, {backend}]")


# ---- 3b. negative views ------------------------------------------------------------------

def _negative(t):
    """A negative view that reads as ``t``'s values while its memory holds their negation (as
    ``z.conj().imag`` of a complex z is), a leaf that requires grad where ``t`` does."""
    return torch._neg_view(-t.detach()).requires_grad_(t.requires_grad)


def _run(call, tensors, grad):
    """(outputs, gradients of the inputs that require grad) of ``call(*tensors)``; ``grad``
    the gradient of the first output (None: no backward)."""
    out = call(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs[0], leaves, grad) if grad is not None and leaves else ()
    return [o.detach() for o in outs], list(grads)


def _bn(training):
    def call(x, w, b, rm, rv):
        y = fused_act.batch_norm_act(x, rm, rv, w, b, training=training)
        return y, rm, rv  # the running statistics as updated
    return call


_E4M3 = torch.float8_e4m3fn
_BN = [(4, 3, 5), (3,), (3,), (3,), (3,)]  # x, weight, bias, running mean and variance
# name -> (call, shapes of its tensors (x first), whether it has a backward); the public
# paths the tables below leave out: BatchNorm (training, eval), FP8 outputs and FP8 linears
NEGATIVE_EXTRA = {
    "batch_norm_act_train": (_bn(True), _BN, True),
    "batch_norm_act_eval": (_bn(False), _BN, True),
    "batch_norm_act_inference": (_bn(False), _BN, False),
    "silu_fp8": (lambda x: fused_act.silu(x, out_dtype=_E4M3), [(4, 64)], False),
    "swiglu_fp8": (lambda g, u: fused_act.swiglu(g, u, out_dtype=_E4M3, scaling="block"),
                   [(4, 64), (4, 64)], False),
    "acon_c_fp8": (lambda x, p1, p2, b: fused_act.acon_c(x, p1, p2, b, out_dtype=_E4M3),
                   [(2, 3, 32), (3,), (3,), (3,)], False),
    "act_fp8_linear": (lambda x, w: fused_act.act_fp8_linear(x, w, activation="silu"),
                       [(4, 64), (16, 64)], True),
    "glu_fp8_linear": (lambda g, u, w: fused_act.glu_fp8_linear(g, u, w),
                       [(4, 64), (4, 64), (16, 64)], True),
}
# (kind, name, dtype) in fp32 and bf16, but the FP8 linears' bf16 only (what they take on CPU)
NEGATIVE_CASES = [
    pytest.param(kind, name, dtype, id=f"{name}{suffix}-{dtype}")
    for kind, names, suffix in (("table", DTYPE_OPS, ""), ("strided", STRIDED, "-params"),
                                ("extra", NEGATIVE_EXTRA, ""))
    for name in names for dtype in (torch.float32, torch.bfloat16)
    if not (name.endswith("fp8_linear") and dtype == torch.float32)]


def _negative_case(kind, name, dtype):
    """(call, tensors, grad or None) of one case, the tensors of plain memory."""
    gen = _gen(17)
    if kind == "table":
        _, call, arg = DTYPE_OPS[name]
        x = _leaf(_randn(2, 4 if arg == "gate" else 3, 4, dtype=dtype, gen=gen))
        return call, [x], _randn(*call(x).shape, dtype=dtype, scale=1.0, gen=gen)
    if kind == "strided":
        call, x, params = _strided_case(name, dtype, False)
        tensors = [_leaf(t.contiguous()) for t in (x, *params)]
        return (lambda x, *p: call(x, list(p))), tensors, _randn(*x.shape, dtype=dtype,
                                                                  scale=1.0, gen=gen)
    call, shapes, backward = NEGATIVE_EXTRA[name]
    tensors = [_rand(*s, lo=0.5, dtype=dtype, gen=gen) for s in shapes]
    tensors[0] = tensors[0] * 4 - 6
    # BatchNorm's running statistics take no gradient
    tensors = [t.requires_grad_(backward and i < 3 if shapes is _BN else backward)
               for i, t in enumerate(tensors)]
    out = call(*tensors)
    out = out[0] if isinstance(out, tuple) else out
    return call, tensors, _randn(*out.shape, dtype=dtype, scale=1.0, gen=gen) if backward else None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, name, dtype", NEGATIVE_CASES)
def test_negative_views_are_their_values(kind, name, backend, dtype, request):
    """Every tensor argument, and the gradient, as a negative view (memory holding the
    negation of the values it reads as) gives the outputs and gradients of plain tensors of the
    same values, bit for bit: each path resolves the view before a kernel reads memory."""
    _use(request, backend)
    call, tensors, grad = _negative_case(kind, name, dtype)
    negative = [_negative(t) for t in tensors]  # before the call updates running statistics
    assert all(t.is_neg() and torch.equal(t, p) for t, p in zip(negative, tensors, strict=True))
    with fused_act.use_backend(backend):
        want = _run(call, tensors, grad)
        got = _run(call, negative, None if grad is None else _negative(grad))
    for what, g, w in (("output", got[0], want[0]), ("gradient", got[1], want[1])):
        for i, (a, b) in enumerate(zip(g, w, strict=True)):
            assert torch.equal(a.float(), b.float()) and a.dtype == b.dtype, \
                f"{name}[{backend}] {what} {i}: {(a.float() - b.float()).abs().max()} off"


HOOKED = ["silu", "swish_tensor", "acon_c", "frelu_max", "swiglu", "glu_mish"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", HOOKED + ["batch_norm_act_train", "act_fp8_linear"])
def test_saved_tensors_unpacked_as_negative_views(name, backend, request):
    """A saved-tensor hook whose unpack gives negative views (of the saved values) changes no
    gradient."""
    _use(request, backend)
    kind = "extra" if name in NEGATIVE_EXTRA else "table"
    dtype = torch.bfloat16 if name == "act_fp8_linear" else torch.float32
    call, tensors, grad = _negative_case(kind, name, dtype)
    fresh = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    with fused_act.use_backend(backend):
        want = _run(call, tensors, grad)[1]
        with torch.autograd.graph.saved_tensors_hooks(  # float8 has no negation
                lambda t: t, lambda t: _negative(t) if t.dtype in DTYPES else t):
            got = _run(call, fresh, grad)[1]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"{name}[{backend}] gradient {i}: {(a - b).abs().max()} off"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_mlp_recomputes_from_negative_views(backend, request):
    """GatedMLP's recomputed h (glu run again from its inputs in the backward) of negative views
    is the h of their values: the same gradients as plain inputs."""
    _use(request, backend)
    torch.manual_seed(0)
    mlp = fused_act.nn.GatedMLP(torch.nn.Linear(8, 4), "silu", gate_proj=torch.nn.Identity(),
                                up_proj=torch.nn.Identity(), recompute=True)
    x = _leaf(_randn(5, 8, dtype=torch.float32, gen=_gen(19)))  # glu records its node
    grads = []
    for given in (x, _negative(x)):
        mlp.zero_grad()
        with fused_act.use_backend(backend):
            mlp(given).sum().backward()
        grads.append(torch.cat([mlp.down_proj.weight.grad.flatten(), given.grad.flatten()]))
    assert torch.equal(*grads), (grads[0] - grads[1]).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_module_updates_negative_running_statistics(backend, request):
    """BatchNormAct2d in training updates running statistics that are negative views as it does
    plain ones (torch's BatchNorm2d, its CPU pair, leaves them as they were: those views take
    the fused op, whose update rounds apart from torch's)."""
    _use(request, backend)
    x = _randn(4, 3, 5, 5, dtype=torch.float32, gen=_gen(23))
    stats = []
    for negative in (False, True):
        m = fused_act.nn.BatchNormAct2d(3)
        if negative:
            m.running_mean, m.running_var = _negative(m.running_mean), _negative(m.running_var)
        with fused_act.use_backend(backend):
            m(x)
        assert m.running_mean.is_neg() == negative
        stats.append(torch.cat([m.running_mean, m.running_var]))
    torch.testing.assert_close(stats[1], stats[0], rtol=1e-6, atol=1e-7)
    assert not torch.equal(stats[1][:3], torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours, theirs, fn", INPLACE)
def test_inplace_into_a_negative_view(ours, theirs, fn, backend, request):
    """An in-place call on a negative view writes the activation of its values, read through
    the view, as torch's own in-place write does."""
    _use(request, backend)
    for grad_mode in (False, True):
        x = _negative(torch.randn(50, generator=_gen()) * 4)
        want = fn(x.double())
        with torch.set_grad_enabled(grad_mode), fused_act.use_backend(backend):
            y = ours(inplace=True)(x)
        assert y is x and x.is_neg()
        assert_near(x, want, torch.float32, f"{ours.__name__}(inplace=True) into a view")


def test_kernels_refuse_a_negative_view():
    """A negative view that reached the C++ kernels would be read as its memory: they refuse it
    (every path above resolves it first)."""
    need_backend("cpu", "cpu")
    lib = fused_act.kernels.kernels("cpu").lib
    x = _negative(torch.randn(64))
    with pytest.raises(RuntimeError, match="negative or conjugate view"):
        lib.eager_activation(x, None, "silu", registry.SPECS["silu"].kernel_id, 1.0,
                             fused_act.plan.BLOCK, None)


# ---- 4. a backward runs on the backend of its forward -------------------------------------

def _backward_case(name):
    """(call(x, params), x, params) of one op, x (2, 3, 4) in float32 (leaves)."""
    x = _leaf(_randn(2, 3, 4, dtype=torch.float32, gen=_gen(13)))
    if name in {op.name for op in ELEMENTWISE}:
        op = next(op for op in ELEMENTWISE if op.name == name)
        return op.call, x, []
    for s in BETA_SPECS:
        if name == f"{s.name}_channel":
            return lambda x, p, s=s: s.call(x, p[0]), x, [torch.full((3,), 1.5,
                                                                     requires_grad=True)]
    if name == "acon_c":
        return lambda x, p: fused_act.acon_c(x, *p), x, ACON_OPS[0].params(x)
    return lambda x, p: fused_act.frelu_max(x, p[0]), x, [_leaf(_randn(2, 3, 4,
                                                                         dtype=torch.float32))]


BACKWARD_OPS = [op.name for op in ELEMENTWISE] + [f"{s.name}_channel" for s in BETA_SPECS] + [
    "acon_c", "frelu_max"]
# (backend of the forward, backend in force when .backward() is called); "cuda" is probed on
# fused_act._cuda.ExtensionKernels, which the ops reach as ``kernels("cuda")``; on CPU the
# cuda_on_cpu fixture routes it to the emulated kernels
BACKWARD_PAIRS = [("triton", "auto"), ("cuda", "auto"), ("triton", "reference"),
                  ("cuda", "triton"), ("reference", "triton"), ("reference", "cuda"),
                  ("cpu", "reference"), ("reference", "cpu"), ("cpu", "triton"),
                  ("auto", "reference")]


@pytest.mark.parametrize("fwd, bwd", BACKWARD_PAIRS, ids=lambda s: s)
@pytest.mark.parametrize("name", BACKWARD_OPS)
def test_backward_runs_on_forward_backend(name, fwd, bwd, request, monkeypatch):
    """The backend in force when a forward runs is the one its backward uses, wherever the
    backward is called (section 2)."""
    for b in {fwd, bwd} - {"auto"}:
        _use(request, b)
    call, x, params = _backward_case(name)
    with fused_act.use_backend(fwd):
        y = call(x, params)
    eager = "Eager" in y.grad_fn.name()
    if eager:
        # the CPU kernels' C++ nodes (ops/eager.py) call them from C++, where the probe cannot
        # see: their gradient must be the op's own under fwd, bit for bit
        with fused_act.use_backend(bwd):
            eager_grad = torch.autograd.grad(y.sum(), [x, *params])
        monkeypatch.setattr(fused_act.ops.eager, "_kernels", lambda *ts: None)
        monkeypatch.setattr(fused_act.ops, "call_entry", lambda name, args: None)
        with fused_act.use_backend(fwd):
            y = call(x, params)
    with _kernel_probe(monkeypatch, "backward") as called, fused_act.use_backend(bwd):
        y.sum().backward()
    if eager:
        got = [t.grad for t in (x, *params)]
        assert all(torch.equal(a, b) for a, b in zip(eager_grad, got, strict=True)), name
    backends = {b for b, _ in called}
    # "auto" runs CPU tensors with the CPU kernels, or the reference where they cannot be built
    ran = fused_act.backend.resolve(x.device, fwd) if fwd == "auto" else fwd
    want = set() if ran == "reference" else {ran}
    assert backends == want, (f"{name}: forward under {fwd!r}, backward called under {bwd!r} "
                              f"ran the kernels of {sorted(backends) or 'none'} (want "
                              f"{sorted(want) or 'none: the reference'})")
    assert x.grad is not None and x.grad.isfinite().all(), f"{name}: no finite x.grad"


# ---- 5. torch.func transforms ------------------------------------------------------------

TRANSFORMS = ["vmap_in0", "vmap_in1", "grad", "jvp", "jacrev", "jacfwd", "hessian"]


def _transform(kind, f):
    """Apply the transform ``kind`` to ``f`` on fixed float64 inputs."""
    x34 = _randn(3, 4, gen=_gen(17), scale=3.0)
    x5 = _randn(5, gen=_gen(19), scale=3.0)
    v5 = _randn(5, gen=_gen(23), scale=1.0)
    fn = torch.func
    return {
        "vmap_in0": lambda: fn.vmap(f, in_dims=0)(x34),
        "vmap_in1": lambda: fn.vmap(f, in_dims=1)(x34),
        "grad": lambda: fn.grad(lambda x: f(x).sum())(x5),
        "jvp": lambda: fn.jvp(f, (x5,), (v5,)),
        "jacrev": lambda: fn.jacrev(f)(x5),
        "jacfwd": lambda: fn.jacfwd(f)(x5),
        "hessian": lambda: fn.hessian(f)(x5),
    }[kind]()


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ELEMENTWISE, ids=lambda o: o.name)
def test_torch_func(op, backend, kind, request):
    """vmap, grad, jvp, jacrev, jacfwd and hessian of each op equal the same transform of
    torch's function (section 4)."""
    _use(request, backend)
    with fused_act.use_backend(backend):
        got = _transform(kind, lambda x: op.call(x, []))
    want = _transform(kind, lambda x: op.torch_fn(x, []))
    torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"{op.name} {kind}: {m}")


def _swish_acon_inputs():
    gen = _gen(29)
    x = _randn(2, 3, gen=gen)
    beta = _rand(3, lo=0.2, gen=gen)
    p1, p2 = _rand(3, gen=gen), _rand(3, gen=gen)
    return x, p1, p2, beta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", BETA_SPECS, ids=lambda s: s.name)
def test_torch_func_grad_beta(spec, backend, request):
    """torch.func.grad with respect to a per-channel beta equals the plain formula's."""
    _use(request, backend)
    x, _, _, beta = _swish_acon_inputs()
    with fused_act.use_backend(backend):
        got = torch.func.grad(lambda x, b: spec.call(x, b).sum(), argnums=1)(x, beta)
    want = torch.func.grad(lambda x, b: _beta_formula(spec)(x, b).sum(), argnums=1)(x, beta)
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_acon(backend, request):
    """torch.func.grad over x, p1, p2 and beta of acon_c equals the plain formula's."""
    _use(request, backend)
    args = _swish_acon_inputs()
    with fused_act.use_backend(backend):
        got = torch.func.grad(lambda *a: fused_act.acon_c(*a).sum(), argnums=(0, 1, 2, 3))(*args)
    want = torch.func.grad(lambda *a: _acon_formula(*a).sum(), argnums=(0, 1, 2, 3))(*args)
    torch.testing.assert_close(got, want, **TIGHT)


# ---- 6. forward-mode AD ----------------------------------------------------------------

def _fwd_case(name):
    """(ours, torch's, primals): two functions of the same float64 primals."""
    gen = _gen(31)
    x = _randn(2, 3, gen=gen)
    for op in ELEMENTWISE:
        if op.name == name:
            return (lambda x, op=op: op.call(x, [])), (lambda x, op=op: op.torch_fn(x, [])), (x,)
    for s in BETA_SPECS:  # a beta of one element, or of C = 3
        for kind, n in (("scalar", 1), ("channel", 3)):
            if name == f"{s.name}_{kind}":
                return s.call, _beta_formula(s), (x, _rand(n, lo=0.2, gen=gen))
    if name.startswith("acon_c"):
        beta = _rand(2, 3, lo=0.2, gen=gen) if name == "acon_c_sample" else \
            _rand(3, lo=0.2, gen=gen)
        return fused_act.acon_c, _acon_formula, (x, _rand(3, gen=gen), _rand(3, gen=gen), beta)
    return fused_act.frelu_max, torch.maximum, (x, _randn(2, 3, gen=gen))  # no ties


FWD_OPS = [op.name for op in ELEMENTWISE] + [
    f"{s.name}_{kind}" for s in BETA_SPECS for kind in ("scalar", "channel")] + [
    "acon_c", "acon_c_sample", "frelu_max"]


def _jvp_dual(f, primals, tangents):
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)])
        value, tangent = fwAD.unpack_dual(out)
        return value.clone(), None if tangent is None else tangent.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FWD_OPS)
def test_forward_ad(name, backend, request):
    """Forward-mode AD (dual tensors, tangents on every input) gives torch's jvp (section 4)."""
    _use(request, backend)
    ours, theirs, primals = _fwd_case(name)
    gen = _gen(37)
    tangents = [_randn(*p.shape, scale=1.0, gen=gen) for p in primals]
    with fused_act.use_backend(backend):
        got = _jvp_dual(ours, primals, tangents)
    want = _jvp_dual(theirs, primals, tangents)
    assert got[1] is not None, f"{name}: the output carries no tangent"
    torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"{name}: {m}")


# ---- 7. autograd.functional.jacobian(vectorize=True) -------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ELEMENTWISE, ids=lambda o: o.name)
def test_jacobian_vectorized(op, backend, request):
    """torch.autograd.functional.jacobian(vectorize=True) equals torch's function's."""
    _use(request, backend)
    x = _randn(2, 3, gen=_gen(41), scale=3.0)
    with fused_act.use_backend(backend):
        got = torch.autograd.functional.jacobian(lambda x: op.call(x, []), x, vectorize=True)
    want = torch.autograd.functional.jacobian(lambda x: op.torch_fn(x, []), x, vectorize=True)
    torch.testing.assert_close(got, want, **TIGHT)


# ---- 8. torch.compile(dynamic=True) ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["opaque", "decompose"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", BETA_SPECS, ids=lambda s: s.name)
def test_compile_dynamic(spec, backend, mode, request, monkeypatch):
    """A dynamic compile with a Python-float beta that changes between calls (Dynamo makes it
    symbolic) gives the static compile's and eager's results, in both compile modes."""
    _use(request, backend)
    monkeypatch.setattr(fused_act.config, "compile_mode", mode)

    def f(x, beta):
        return spec.call(x, beta)

    calls = [(_randn(3, 4, dtype=torch.float32, gen=_gen(43)), 1.5),
             (_randn(5, 7, dtype=torch.float32, gen=_gen(47)), 0.3),
             (_randn(5, 7, dtype=torch.float32, gen=_gen(53)), -2.25)]
    with fused_act.use_backend(backend):
        eager = [f(x, b) for x, b in calls]
        results = {}
        for dynamic in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(f, dynamic=dynamic, backend="aot_eager", fullgraph=True)
            results[dynamic] = [compiled(x, b) for x, b in calls]
    torch._dynamo.reset()
    for dynamic, outs in results.items():
        for (x, b), got, want in zip(calls, outs, eager, strict=True):
            assert_near(got, want.double(), torch.float32,
                        f"{spec.name}[{backend}, {mode}, dynamic={dynamic}, beta={b}] "
                        f"{tuple(x.shape)}")


# ---- 9. torch.jit ------------------------------------------------------------------------

MODULES = {**{s.name: (lambda s=s: getattr(fused_act.nn, s.module)(**s.kwargs))
              for s in registry.SPECS.values() if s.module and not s.beta},
           **{s.module: (lambda s=s: getattr(fused_act.nn, s.module)(beta=1.5, **s.kwargs))
              for s in BETA_SPECS}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_jit_trace(name, backend, request):
    """A torch.jit.trace of the module computes what the module does on a new input."""
    _use(request, backend)
    module = MODULES[name]()
    example = _randn(3, 5, dtype=torch.float32, gen=_gen(53))
    x = _randn(3, 5, dtype=torch.float32, gen=_gen(59))
    with fused_act.use_backend(backend):
        traced = torch.jit.trace(module, example)
        got, want = traced(x), module(x)
    assert_near(got, want.double(), torch.float32, f"traced {name}[{backend}]")


def test_jit_script_points_to_compile():
    """torch.jit.script of a module is a clear error that points to torch.compile."""
    with pytest.raises((RuntimeError, Exception), match="torch.compile"):
        torch.jit.script(fused_act.nn.Mish())


# ---- 10. property-based: shapes x layouts x dtypes x ops ----------------------------------

PROPERTY_OPS = {op.name: op for op in ALL_OPS + ACON_OPS}


def _min_rank(name):
    if name.endswith("_4d"):
        return 3  # a (1, C, 1, ...) beta: as the kernel tables, x of rank >= 3
    return 2 if name.endswith("_channel") or name.startswith("acon") else 1


@st.composite
def _examples(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=rank, max_size=rank)))
    layout = draw(st.sampled_from(["contiguous", "sliced", "offset"] +
                                  (["transposed"] if rank >= 2 else [])))
    dim = draw(st.integers(0, rank - 1))
    dtype = draw(st.sampled_from(DTYPES))
    op = draw(st.sampled_from([n for n in PROPERTY_OPS if _min_rank(n) <= rank]))
    strided_params = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return shape, layout, dim, dtype, op, strided_params, seed


def _layout(shape, layout, dim, dtype, scale, gen):
    """A tensor of ``shape`` in ``layout``: contiguous, transposed (last two dims), sliced with
    step 2 along ``dim``, or a view one element into a larger buffer."""
    if layout == "transposed":
        s = list(shape)
        s[-1], s[-2] = s[-2], s[-1]
        return _randn(*s, dtype=dtype, scale=scale, gen=gen).transpose(-1, -2)
    if layout == "sliced":
        s = list(shape)
        s[dim] *= 2
        return _randn(*s, dtype=dtype, scale=scale, gen=gen)[(slice(None),) * dim +
                                                             (slice(None, None, 2),)]
    if layout == "offset":
        return _randn(math.prod(shape) + 1, dtype=dtype, scale=scale, gen=gen)[1:].view(shape)
    return _randn(*shape, dtype=dtype, scale=scale, gen=gen)


def _strided_copy(p):
    """``p``'s values as every other element of a buffer twice as long along its channel dim."""
    d = 0 if p.dim() == 1 else 1
    s = list(p.shape)
    s[d] *= 2
    view = torch.zeros(s, dtype=p.dtype)[(slice(None),) * d + (slice(None, None, 2),)]
    view.copy_(p.detach())
    return _leaf(view)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(example=_examples())
def test_property_vs_float64(backend, example):
    """Any small shape, layout, dtype and op (contiguous or strided parameters): outputs and
    gradients within the float64 reference's tolerance (sections 3, 4, 6)."""
    need_backend(backend, "cpu")
    shape, layout, dim, dtype, name, strided_params, seed = example
    op = PROPERTY_OPS[name]
    gen = _gen(seed)
    x = _leaf(_layout(shape, layout, dim, dtype, op.scale, gen))
    params = op.params(x)
    if strided_params:
        params = [_strided_copy(p) for p in params]
    g = _randn(*shape, dtype=dtype, scale=1.0, gen=gen)
    with fused_act.use_backend(backend):
        y = op.call(x, params)
        grads = torch.autograd.grad(y, [x, *params], g)
    x64, g64 = x.detach().double(), g.double()
    p64 = [p.detach().double() for p in params]
    what = (f"{name}[{backend}, {dtype}, {shape}, {layout}(dim {dim}), "
            f"strided params={strided_params}]")
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}"
    assert_near(y, op.ref(x64, p64), dtype, what + " forward")
    want = op.ref_backward(g64, x64, p64)
    assert_near(grads[0], want[0], dtype, what + " dx")
    if params:
        terms = _param_terms(name, g64, x64, p64)
        for p, got, ref64, t in zip(params, grads[1:], want[1:], terms, strict=True):
            assert got.shape == p.shape, f"{what}: param grad shape {got.shape} vs {p.shape}"
            assert_param_near(got, ref64, t + ref64.abs(), dtype, what + " dparam")


# ---- 11. torch.compile around torch.func transforms and forward-mode AD ----------------------

COMPILED_TRANSFORMS = ["jvp", "forward_ad", "grad", "vmap"]


def _transform_of(kind, f, primals):
    """The transform ``kind`` of ``f`` as a function of ``primals`` (fixed tangents; vmap over a
    new leading dim of 2)."""
    argnums = tuple(range(len(primals)))
    tangents = [_randn(*p.shape, scale=1.0, gen=_gen(61 + i)) for i, p in enumerate(primals)]
    if kind == "jvp":
        return lambda *a: torch.func.jvp(f, a, tuple(tangents))
    if kind == "forward_ad":
        def dual(*a):
            with fwAD.dual_level():
                out = f(*[fwAD.make_dual(p, t) for p, t in zip(a, tangents, strict=True)])
                return fwAD.unpack_dual(out)
        return dual
    if kind == "grad":
        return torch.func.grad(lambda *a: f(*a).sum(), argnums=argnums)
    return torch.func.vmap(f)


@pytest.mark.parametrize("kind", COMPILED_TRANSFORMS)
@pytest.mark.parametrize("name", FWD_OPS)
def test_compiled_transform_equals_eager(name, kind):
    """torch.compile of a torch.func transform (jvp, grad, vmap) or of forward-mode AD over an op
    gives the eager transform's values: the reference math runs there, never the opaque op (it
    has no jvp or batching rule: a zero tangent, or none)."""
    ours, _, primals = _fwd_case(name)
    if kind == "vmap":
        primals = tuple(torch.stack([p, p * 0.5 + 0.1]) for p in primals)
    fn = _transform_of(kind, ours, primals)
    want = fn(*primals)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager")(*primals)
    torch._dynamo.reset()
    if kind == "forward_ad":
        assert got[1] is not None, f"{name}: the compiled output carries no tangent"
    torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"compiled {kind} {name}: {m}")


@pytest.mark.parametrize("mode", ["opaque", "decompose"])
def test_compile_traces_op_unless_decomposed(mode, monkeypatch):
    """A plain compile traces the ``fused_act::activation`` custom op, or, with compile_mode
    "decompose", the reference math; a compiled transform always the reference math."""
    monkeypatch.setattr(fused_act.config, "compile_mode", mode)
    seen = []

    def backend(gm, inputs):
        seen.append({str(n.target) for n in gm.graph.nodes})
        return gm

    x = _randn(4, gen=_gen(67))
    torch._dynamo.reset()
    torch.compile(fused_act.mish, fullgraph=True, backend=backend)(x)
    torch.compile(torch.func.vmap(fused_act.silu), backend=backend)(x.reshape(2, 2))
    torch._dynamo.reset()
    plain, transformed = (any("fused_act.activation" in t for t in g) for g in seen)
    assert plain == (mode == "opaque"), f"plain compile, {mode}: traced {sorted(seen[0])}"
    assert not transformed, f"compiled vmap, {mode}: traced {sorted(seen[1])}"


def test_decomposed_graph_saves_only_inputs(monkeypatch):
    """Compiled with compile_mode "decompose", an activation with a float beta saves its input
    and no intermediate for the backward, as the op does: a mask of x's size saved between them
    costs a pass in each (Inductor's CPU code made compiled silu 3-5x its own that way).  One
    graph of the float-beta forms (silu, a beta to round, the gated form), one compile."""
    monkeypatch.setattr(fused_act.config, "compile_mode", "decompose")
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 4, 8, generator=gen).requires_grad_(),
              torch.randn(2, 4, 16, generator=gen).requires_grad_()]

    def fn(x, gate_up):
        return (fused_act.silu(x).sum() + fused_act.swish(x, 1.7).sum()
                + fused_act.swiglu(gate_up).sum())

    saved = []

    def pack(t):
        saved.append(t)
        return t

    torch._dynamo.reset()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.compile(fn, fullgraph=True)(*inputs).backward()
    torch._dynamo.reset()
    extra = [(t.dtype, tuple(t.shape)) for t in saved if not any(
        t.data_ptr() == i.data_ptr() and t.shape == i.shape for i in inputs)]
    assert saved and not extra, f"saved besides the inputs: {extra}"


# ---- 12. fake kernels give the real strides ----------------------------------------------

def _transposed(*shape):
    """A dense tensor of ``shape`` (the last two dims) laid out transposed, fp64."""
    return _rand(*shape[:-2], shape[-1], shape[-2], lo=0.2, gen=_gen(71)).transpose(-1, -2)


def _stride_cases():
    """name -> (call(x, params), x, params): parameters (a per-sample ACON beta, p1, p2, FReLU's
    t, a swish beta) dense but not in row-major order."""
    n, c = 3, 4
    x2, x4 = _randn(n, c, gen=_gen(73)), _randn(n, c, 2, 5, gen=_gen(79))
    beta4 = _rand(1, 1, 1, c, lo=0.2, gen=_gen(83)).permute(0, 3, 1, 2)  # (1, C, 1, 1)
    return {
        "acon_c_sample": (lambda x, p: fused_act.acon_c(x, *p), x2,
                          [_transposed(1, c), _transposed(1, c), _transposed(n, c)]),
        "acon_c_sample_4d": (lambda x, p: fused_act.acon_c(x, *p), x4,
                             [_rand(c, gen=_gen(89)), _rand(c, gen=_gen(97)), _transposed(n, c)]),
        **{f"{s.name}_channel_4d": (lambda x, p, s=s: s.call(x, p[0]), x4, [beta4])
           for s in BETA_SPECS},
        "frelu_max": (lambda x, p: fused_act.frelu_max(x, p[0]), x2, [_transposed(n, c)]),
    }


def _op_calls(name, x, params, backend):
    """(custom op, arguments) of the forward and backward ops that ``name`` runs."""
    from fused_act import ops
    g = _randn(*x.shape, scale=1.0, gen=_gen(101))
    if name.startswith("acon"):
        return [(ops.acon_c_op, (x, *params, backend)),
                (ops.acon_c_backward_op, (g, x, *params, True, backend))]
    if name.startswith("frelu"):
        _, code = ops.frelu_max_op(x, params[0], True, backend)
        a, b = _rand(x.shape[1], gen=_gen(103)), _rand(x.shape[1], gen=_gen(107))
        return [(ops.frelu_max_op, (x, params[0], True, backend)),
                (ops.frelu_max_backward_op, (g, code, backend)),
                (ops.frelu_max_affine_op, (x, params[0], a, b, backend)),
                (ops.frelu_max_affine_backward_op, (g, x, params[0], a, b, True, backend))]
    spec = _beta_spec(name)
    return [(ops.activation_op, (x, spec.kernel, params[0], 1.0, backend)),
            (ops.activation_backward_op, (g, x, spec.kernel, params[0], 1.0, True, backend))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_stride_cases()))
def test_opcheck_strided_params(name, backend, request):
    """torch.library.opcheck of the forward and backward ops with parameters laid out
    transposed: the fake kernels give the real outputs' shapes and strides (parameter gradients
    contiguous, x-sized outputs with x's strides)."""
    _use(request, backend)
    _, x, params = _stride_cases()[name]
    for op, args in _op_calls(name, x, params, backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(_stride_cases()))
def test_compile_inductor_strided_params(name, backend):
    """Inductor (fresh, no cached graphs) over forward and backward with such parameters gives
    eager's values: its checks of each output against the fake kernel's layout pass."""
    need_backend(backend, "cpu")
    call, x, params = _stride_cases()[name]

    def run(f):
        xs, ps = _leaf(x), [_leaf(p) for p in params]
        with fused_act.use_backend(backend):
            y = f(xs, ps)
            return y, torch.autograd.grad(y, [xs, *ps], torch.ones_like(y))

    want = run(call)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        got = run(torch.compile(call, backend="inductor", fullgraph=True))
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"{name}[{backend}]: {m}")


# ---- 13. one fp32 rounding of a float beta on every path -----------------------------------

@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("spec", BETA_SPECS, ids=lambda s: s.name)
def test_float_beta_rounded_alike_on_every_path(spec, dtype, monkeypatch):
    """A float beta that is not an fp32 value (0.1, and -1e-46, which rounds to -0) is rounded
    to fp32 on every path: eager, the compiled opaque op, the compiled decomposed math (static
    and dynamic; for fp32, where the traced math takes the float itself, also generated by
    Inductor) and the reference math of a transform give bit-identical results, at +-inf and
    NaN too."""
    x = torch.cat([_randn(61, dtype=dtype, gen=_gen(109)),
                   torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)])
    betas = {b: torch.tensor(b, dtype=torch.float32).item() for b in (0.1, -1e-46)}

    def f(x, b):
        return spec.call(x, b)

    exact = dict(rtol=0, atol=0, equal_nan=True)

    got, inductor = {}, {}
    with fused_act.use_backend("reference"):
        eager = {b: f(x, b) for b in betas}
        for b in betas:
            got[b, "vmap"] = torch.func.vmap(lambda x, b=b: f(x, b))(x.reshape(8, 8)).reshape(64)
            got[b, "jvp"] = torch.func.jvp(lambda x, b=b: f(x, b), (x,), (torch.ones_like(x),))[0]
        for mode, dynamic, backend in itertools.product(("opaque", "decompose"), (False, True),
                                                        ("aot_eager", "inductor")):
            if backend == "inductor" and (mode == "opaque" or dtype == F64):
                continue
            monkeypatch.setattr(fused_act.config, "compile_mode", mode)
            torch._dynamo.reset()
            compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=dynamic)
            compiled(x, 0.3)  # a second beta: a dynamic compile makes it symbolic
            for b, rounded in betas.items():
                if backend == "aot_eager":
                    got[b, f"{mode}, dynamic={dynamic}"] = compiled(x, b)
                else:  # Inductor's exp is not eager's: its own code with beta already rounded
                    inductor[b, f"dynamic={dynamic}"] = compiled(x, b), compiled(x, rounded)
    torch._dynamo.reset()
    for b, rounded in betas.items():
        torch.testing.assert_close(eager[b], spec.forward(x, rounded), **exact,
                                   msg=f"{spec.name}: eager beta={b} is not beta=fp32({b})")
    for (b, path), y in got.items():
        torch.testing.assert_close(y, eager[b], **exact,
                                   msg=f"{spec.name} beta={b}, {path}: differs from eager")
    for (b, path), (y, y_rounded) in inductor.items():
        torch.testing.assert_close(
            y, y_rounded, **exact,
            msg=f"{spec.name} beta={b}, Inductor {path}: differs from beta=fp32({b})")


# ---- 14. the benchmark's blocks come from the registry -------------------------------------

def test_bench_blocks_from_spec():
    """The benchmark's tables derive from a spec's properties (section 1): every op has a
    pipeline block (but a learnable gated one), another activation with a beta gets the
    learnable block (its ``torch_fn``) and its fused module with a learnable beta, one without
    a torch.nn class blocks over its own function, and a spec naming a torch.nn class that does
    not exist is a ValueError naming it."""
    import dataclasses

    from bench import pipelines, table
    # a gated row with a learnable beta has no MLP block (patch_gated_mlps patches fixed ones),
    # nor has the packed layout's row (its block would time the same activation as swiglu's)
    # one BatchNorm block (training) stands for the BatchNorm rows' layouts and modes
    assert set(pipelines.BLOCKS) == set(table.OPS) - set(table.PACKED) - {
        n for n, s in table.GATED.items() if s.beta} - {"bn_silu_train_cl", "bn_silu_eval"}
    x = _randn(2, 8, gen=_gen(113))
    for s in BETA_SPECS:
        other = dataclasses.replace(s, name=s.name + "_other")
        plain = pipelines._torch_module(other)(8).double()
        torch.testing.assert_close(plain(x), s.torch_fn(x, torch.ones(1, dtype=F64)), **TIGHT)
        fused = pipelines._fused_module(other)()
        assert isinstance(fused, getattr(fused_act.nn, s.module))
        assert [n for n, p in fused.named_parameters()] == ["beta"], "beta is not learnable"
    some = next(iter(registry.SPECS.values()))
    # no torch.nn class: both sides are blocks over the spec's own function
    bare = dataclasses.replace(some, replaces="")
    torch.testing.assert_close(pipelines._torch_module(bare)(8)(x), some.torch_fn(x), **TIGHT)
    torch.testing.assert_close(pipelines._fused_module(bare)()(x), some.call(x), **TIGHT)
    with pytest.raises(ValueError, match=f"'{some.name}'"):  # a class torch.nn lacks: a typo
        pipelines._torch_module(dataclasses.replace(bare, replaces="NoSuchModule"))(8)
