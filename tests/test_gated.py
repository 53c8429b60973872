"""The gated activations act(gate) * up (``fused_act.glu``, ``swiglu``, ``geglu``): every
activation of the registry x backend ("reference", "triton" under the interpreter, "cuda" through
the CPU emulation of its kernels) x dtype x layout against the float64 reference, forward and
backward; limits and NaN; gradcheck, opcheck, torch.compile, torch.func, forward AD; the packed
halves read and written in place; errors."""

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fused_act
from fused_act import ops, reference, registry
from fused_act.kernels import Kernels
from fused_act.triton_kernels import TritonKernels

from .cases import (
    DTYPES,
    EDGES,
    assert_finite_as_reference,
    assert_near,
    assert_near_torch,
    assert_param_near,
    edge,
    expected,
    need_backend,
    saved_by,
)
from .test_csrc_emulated import cuda_on_cpu, emulated  # noqa: F401

BACKENDS = ["reference", "triton", "cuda"]
F64 = torch.float64


def _use(request, backend: str) -> None:
    """Make ``backend`` runnable on CPU tensors in this test (CUDA kernels: their emulation)."""
    if backend == "cuda":
        request.getfixturevalue("cuda_on_cpu")
    else:
        need_backend(backend, "cpu")


@dataclass(frozen=True)
class Act:
    """One gated activation as a user calls it: ``glu(..., activation, **kwargs)``; ``beta``:
    none, a float, or "tensor" (a learnable one-element beta, its gradient checked)."""

    name: str
    spec: registry.Spec
    kwargs: dict = field(default_factory=dict)
    beta: float | str | None = None

    def beta_of(self, dtype: torch.dtype) -> list[torch.Tensor]:
        if self.beta != "tensor":
            return []
        pd = F64 if dtype == F64 else torch.float32
        return [torch.tensor([1.3], dtype=pd, requires_grad=True)]

    def call(self, gate, up, dim, params):
        kwargs = dict(self.spec.kwargs)
        if self.beta is not None:
            kwargs["beta"] = params[0] if params else self.beta
        return fused_act.glu(gate, up, self.spec.function or self.spec.name, dim, **kwargs)

    def b(self, params):
        """The beta the reference math takes."""
        return params[0] if params else (1.0 if self.beta is None else self.beta)


# every spec of the registry; one with a beta with a float and with a learnable tensor
ACTS = [a for s in registry.SPECS.values() for a in (
    [Act(s.name + "_float", s, beta=-0.75), Act(s.name + "_tensor", s, beta="tensor")]
    if s.beta else [Act(s.name, s)])]


def _randn(shape, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)


def _buf_view(shape, dtype, scale, seed):
    """A tensor of ``shape`` one element into a larger buffer (a storage offset)."""
    return _randn(math.prod(shape) + 1, dtype, scale, seed)[1:].view(shape)


# layout -> (gate, up or None, dim) of a dtype and scale
LAYOUTS = {
    "separate": lambda d, s: (_randn((3, 5, 7), d, s, 1), _randn((3, 5, 7), d, 2.0, 2), -1),
    "flat_tail": lambda d, s: (_randn((2 * 2048 + 37,), d, s, 1),
                               _randn((2 * 2048 + 37,), d, 2.0, 2), -1),
    "packed_last": lambda d, s: (_randn((6, 2 * 37), d, s, 1), None, -1),
    "packed_mid": lambda d, s: (_randn((3, 2 * 5, 7), d, s, 1), None, 1),
    "packed_first": lambda d, s: (_randn((2 * 4, 9), d, s, 1), None, 0),
    "packed_blocks_tail": lambda d, s: (_randn((3, 2 * (2048 + 37)), d, s, 1), None, -1),
    "packed_many_rows": lambda d, s: (_randn((300, 2 * 6), d, s, 1), None, -1),
    "packed_offset": lambda d, s: (_buf_view((5, 2 * 33), d, s, 1), None, -1),
    "packed_transposed": lambda d, s: (_randn((2 * 8, 11), d, s, 1).t(), None, -1),
    "transposed": lambda d, s: (_randn((37, 53), d, s, 1).t(), _randn((37, 53), d, 2.0, 2).t(),
                                -1),
    "offset": lambda d, s: (_buf_view((9, 13), d, s, 1), _buf_view((9, 13), d, 2.0, 2), -1),
    "up_expanded": lambda d, s: (_randn((7, 19), d, s, 1), _randn((19,), d, 2.0, 2).expand(7, 19),
                                 -1),
    "empty": lambda d, s: (_randn((0, 8), d, s, 1), None, -1),
}


def _reference(act, gate64, up64, dim, p64, g64):
    """(out, d of each input of the call, dbeta, |terms| of dbeta) in float64 by the reference
    math; with ``up64`` None the packed input's gradient is its two halves' side by side."""
    x, u = reference.halves(gate64, dim) if up64 is None else (gate64, up64)
    b = act.b(p64)
    spec = act.spec
    out = reference.glu(x, u, lambda v: spec.forward(v, b))
    need = bool(p64)
    dg, du, db = reference.glu_backward(g64, x, u, lambda v: spec.forward(v, b),
                                        lambda gr, v: spec.backward(gr, v, b, need))
    grads = [torch.cat([dg, du], dim)] if up64 is None else [dg, du]
    terms = spec.backward((g64 * u).abs(), x, b, True)[1] if need else None
    return out, grads, db, terms


def _near(out, ref64, scale, dtype, what):
    """``assert_near`` for a product whose other factor is ``scale`` (up, grad * up, grad): the
    activation's own absolute tolerance grows with it (fp32 gelu(-6) is 0 to within 1e-7, and
    up multiplies that)."""
    s = scale.detach().double().abs().clamp_min(1.0)
    assert_near(out.detach().double() / s, ref64 / s, dtype, what)


def _check(act, layout, dtype, backend):
    gate, up, dim = LAYOUTS[layout](dtype, act.spec.scale)
    inputs = [t.requires_grad_() for t in (gate, up) if t is not None]
    params = act.beta_of(dtype)
    what = f"glu[{act.name}, {layout}, {backend}, {dtype}]"
    with fused_act.use_backend(backend):
        y = act.call(gate, up, dim, params)
        g = _randn(y.shape, dtype, 1.0, 3)
        grads = torch.autograd.grad(y, inputs + params, g) if y.numel() else None
    assert y.dtype == dtype and y.is_contiguous(), what
    want_y, want, db, terms = _reference(act, gate.detach().double(),
                                         None if up is None else up.detach().double(), dim,
                                         [p.detach().double() for p in params], g.double())
    u64 = reference.halves(gate.detach().double(), dim)[1] if up is None else up.double()
    g64 = g.double()
    _near(y, want_y, u64, dtype, what + " forward")
    if grads is None:
        return
    # d(gate) scales with grad * up, d(up) with grad; packed: the two halves side by side
    scales = [g64 * u64, g64]
    scales = [torch.cat(scales, dim)] if up is None else scales
    for i, (got, ref, s) in enumerate(zip(grads, want, scales, strict=False)):
        assert got.dtype == dtype
        _near(got, ref, s, dtype, f"{what} d{['gate', 'up'][i]}")
    if params:
        assert grads[-1].shape == params[0].shape and grads[-1].dtype == params[0].dtype
        assert_param_near(grads[-1], db, terms + db.abs(), dtype, what + " dbeta")


# every layout in fp32; in the other dtypes (loads, stores and the CUDA kernels' vector width
# change with it) the layouts with vector, scalar (misaligned) and tail paths
DTYPE_LAYOUTS = ["separate", "packed_mid", "packed_blocks_tail", "packed_offset", "up_expanded"]
CASES = [(layout, dtype) for dtype in DTYPES for layout in LAYOUTS
         if dtype == torch.float32 or layout in DTYPE_LAYOUTS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_vs_float64(act, layout, dtype, backend, request):
    _use(request, backend)
    _check(act, layout, dtype, backend)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_reference_is_torch_formula(act):
    """The reference's value and gradients equal autograd through torch's own function times up
    (float64)."""
    gate, up = _randn((4, 9), F64, act.spec.scale, 5), _randn((4, 9), F64, 2.0, 6)
    params = act.beta_of(F64)
    g = _randn((4, 9), F64, 1.0, 7)
    args = (act.b(params),) if act.spec.beta else ()
    leaves = [gate.requires_grad_(), up.requires_grad_(), *params]
    theirs = act.spec.torch_fn(gate, *args) * up
    want = torch.autograd.grad(theirs, leaves, g)
    ours, grads, db, _ = _reference(act, gate.detach(), up.detach(), -1,
                                    [p.detach() for p in params], g)
    got = [*grads, db] if params else grads
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, list(want), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [a for a in ACTS if a.beta != "tensor"], ids=lambda a: a.name)
def test_edge_values(act, dtype, backend, request):
    """Gate at the edge values (``cases.EDGES``), up 1.5: gate at +-inf gives the activation's
    limits times up (value and d/dgate), NaN in either input gives NaN, no finite input gives
    NaN or inf spuriously (inf exactly where the float64 reference overflows the dtype); NaN in
    up gives NaN."""
    _use(request, backend)
    n = len(EDGES)
    gate = torch.tensor(EDGES, dtype=dtype).requires_grad_()
    up = torch.full((n,), 1.5, dtype=dtype)
    nan_up = edge(20.0)  # a finite gate whose up is NaN
    up[nan_up] = math.nan
    up.requires_grad_()
    with fused_act.use_backend(backend):
        y = act.call(gate, up, -1, [])
        dg, du = torch.autograd.grad(y, [gate, up], torch.ones_like(y))
    g64, u64 = gate.detach().double(), up.detach().double()
    want_y, (want_dg, want_du), _, _ = _reference(act, g64, u64, -1, [], torch.ones_like(g64))
    finite = g64.isfinite() & u64.isfinite()
    what = f"glu[{act.name}, {backend}, {dtype}]"
    for got, want, part in ((y, want_y, "forward"), (dg, want_dg, "dgate"),
                            (du, want_du, "dup")):
        assert_finite_as_reference(got, want, finite, dtype, f"{what} {part}")
    nan = edge(math.nan)
    assert y[nan].isnan() and dg[nan].isnan() and y[nan_up].isnan() and dg[nan_up].isnan()
    if act.beta is None:
        f_pos, f_neg, d_pos, d_neg = act.spec.limits
        pos, neg = edge(math.inf), edge(-math.inf)
        assert (y[pos].item(), y[neg].item()) == (f_pos * 1.5, f_neg * 1.5)
        assert (dg[pos].item(), dg[neg].item()) == (d_pos * 1.5, d_neg * 1.5)
        assert (du[pos].item(), du[neg].item()) == (f_pos, f_neg)
    theirs = act.spec.torch_fn(g64, *([act.beta] if act.beta else [])) * 1.5
    ok = finite & theirs.isfinite() & expected(theirs, dtype).isfinite()
    assert_near_torch(y[ok], theirs[ok], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_gradcheck(act, packed, backend, request):
    _use(request, backend)
    gate = _randn((2, 4), F64, 2.0, 11)
    up = None if packed else _randn((2, 4), F64, 2.0, 12)
    leaves = [t.requires_grad_() for t in (gate, up) if t is not None] + act.beta_of(F64)
    n = 1 if packed else 2

    def f(*args):
        return act.call(args[0], None if packed else args[1], 1, list(args[n:]))

    with fused_act.use_backend(backend):
        assert torch.autograd.gradcheck(f, tuple(leaves))
        if backend == "reference":  # double backward is the reference math on every backend
            assert torch.autograd.gradgradcheck(f, tuple(leaves))


def _op_args(act, gate, up, dim, backend):
    params = act.beta_of(gate.dtype)
    beta = params[0].detach().requires_grad_() if params else None
    beta_value = act.beta if isinstance(act.beta, float) else 1.0
    return (gate, up, act.spec.kernel, beta, beta_value, dim, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_opcheck(act, packed, backend, request):
    _use(request, backend)
    gate = _randn((4, 10), torch.float32, 4.0, 13).requires_grad_()
    up = None if packed else _randn((4, 10), torch.float32, 2.0, 14).requires_grad_()
    args = _op_args(act, gate, up, 1, backend)
    torch.library.opcheck(ops.glu_op, args)
    g = _randn((4, 5) if packed else (4, 10), torch.float32, 1.0, 15)
    gate, up, kernel, beta, beta_value, dim, _ = args
    detached = None if up is None else up.detach()
    beta = None if beta is None else beta.detach()
    for need in ([False, True] if beta is not None else [False]):
        torch.library.opcheck(ops.glu_backward_op, (g, gate.detach(), detached, kernel, beta,
                                                    beta_value, dim, need, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["opaque", "decompose"])
def test_compile_fullgraph(mode, backend, request, monkeypatch):
    """torch.compile(fullgraph=True, aot_eager): forward and backward of a packed SwiGLU, a
    separate GeGLU-tanh and a learnable-beta swish gate equal eager, in both compile modes."""
    _use(request, backend)
    monkeypatch.setattr(fused_act.config, "compile_mode", mode)
    torch._dynamo.reset()
    beta = torch.tensor([0.8], requires_grad=True)

    def f(x, gate, up):
        a = fused_act.swiglu(x)
        b = fused_act.geglu(gate, up, approximate="tanh")
        return a * b + fused_act.glu(gate, up, "swish", beta=beta)

    x = _randn((4, 2 * 6), torch.float32, 3.0, 17).requires_grad_()
    gate = _randn((4, 6), torch.float32, 3.0, 18).requires_grad_()
    up = _randn((4, 6), torch.float32, 1.0, 19).requires_grad_()
    leaves = [x, gate, up, beta]
    results = []
    with fused_act.use_backend(backend):
        for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
            y = fn(x, gate, up)
            results.append((y, *torch.autograd.grad(y.square().sum(), leaves)))
    torch._dynamo.reset()
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_opaque_traces_our_op(monkeypatch):
    monkeypatch.setattr(fused_act.config, "compile_mode", "opaque")
    torch._dynamo.reset()
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch.compile(fused_act.swiglu, fullgraph=True, backend=backend)(torch.randn(2, 8))
    torch._dynamo.reset()
    assert any("fused_act.glu" in t for t in seen), seen


def _torch_swiglu(x, up=None):
    g, u = (x.chunk(2, -1) if up is None else (x, up))
    return torch.nn.functional.silu(g) * u


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["vmap", "grad", "jacrev", "forward_ad", "jacobian"])
def test_torch_func_and_forward_ad(kind, backend, request):
    """torch.func transforms, forward-mode AD and a vectorized jacobian of the packed form
    equal the same over torch's formula (they run the reference math)."""
    _use(request, backend)
    x = _randn((3, 8), F64, 3.0, 21)
    t = _randn((3, 8), F64, 1.0, 22)

    def run(f):
        if kind == "vmap":
            return torch.func.vmap(f)(x)
        if kind == "grad":
            return torch.func.grad(lambda v: f(v).sum())(x)
        if kind == "jacrev":
            return torch.func.jacrev(f)(x[0])
        if kind == "jacobian":
            return torch.autograd.functional.jacobian(f, x, vectorize=True)
        with fwAD.dual_level():
            out = f(fwAD.make_dual(x, t))
            return tuple(v.clone() for v in fwAD.unpack_dual(out))

    with fused_act.use_backend(backend):
        got = run(fused_act.swiglu)
    torch.testing.assert_close(got, run(_torch_swiglu), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_beta(backend, request):
    """torch.func.grad with respect to gate, up and a learnable beta."""
    _use(request, backend)
    gate, up = _randn((3, 5), F64, 3.0, 23), _randn((3, 5), F64, 1.0, 24)
    beta = torch.tensor([0.7], dtype=F64)
    with fused_act.use_backend(backend):
        got = torch.func.grad(lambda *a: fused_act.glu(a[0], a[1], "swish", beta=a[2]).sum(),
                              argnums=(0, 1, 2))(gate, up, beta)
    want = torch.func.grad(lambda g, u, b: (g * torch.sigmoid(b * g) * u).sum(),
                           argnums=(0, 1, 2))(gate, up, beta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_grad_deterministic(backend, request):
    """A learnable beta's gradient (per-tile partials finished on the host) is bit-identical
    across runs."""
    _use(request, backend)
    x = _randn((40, 2 * 300), torch.float32, 3.0, 25).requires_grad_()
    beta = torch.tensor([1.1], requires_grad=True)
    runs = []
    with fused_act.use_backend(backend):
        for _ in range(2):
            y = fused_act.glu(x, activation="swish", beta=beta)
            runs.append(torch.autograd.grad(y, [x, beta], torch.ones_like(y)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def launches(monkeypatch):
    """Every glu launcher call on either kernel backend, with its tensor arguments."""
    from fused_act._cuda import ExtensionKernels
    calls = []
    for cls in (TritonKernels, ExtensionKernels):
        for name in ("glu_forward", "glu_backward"):
            original = getattr(cls, name)

            def wrapper(*args, _orig=original, _name=name, **kwargs):
                calls.append((_name, [a for a in args if isinstance(a, torch.Tensor)]))
                return _orig(*args, **kwargs)

            monkeypatch.setattr(cls, name, wrapper if cls is ExtensionKernels else
                                staticmethod(wrapper))
    return calls


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dim", [-1, 1, 0])
def test_packed_halves_in_place(dim, backend, request, launches):
    """The halves of a contiguous packed tensor reach the kernels as views of it (no copy), and
    its gradient is one buffer whose halves the backward kernel writes (no concatenation)."""
    _use(request, backend)
    x = _randn((4, 6, 10), torch.float32, 3.0, 27).requires_grad_()
    h = x.shape[dim] // 2
    step = x.stride(dim) * h * x.element_size()
    with fused_act.use_backend(backend):
        (dx,) = torch.autograd.grad(fused_act.swiglu(x, dim=dim).sum(), x)
    (_, fwd), (_, bwd) = launches
    base = x.data_ptr()
    assert [t.data_ptr() for t in fwd[:2]] == [base, base + step]
    _, gate, up, dgate, dup = bwd[:5]
    assert (gate.data_ptr(), up.data_ptr()) == (base, base + step)
    assert (dgate.data_ptr(), dup.data_ptr()) == (dx.data_ptr(), dx.data_ptr() + step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_inputs_unchanged_and_saves_only_inputs(packed, backend, request):
    """Backward saves only gate and up (the packed tensor) and a beta, and writes no gradient
    into an input, a saved tensor or the incoming gradient."""
    _use(request, backend)
    gate = _randn((5, 12), torch.float32, 3.0, 29).requires_grad_()
    up = None if packed else _randn((5, 12), torch.float32, 1.0, 30).requires_grad_()
    beta = torch.tensor([0.9], requires_grad=True)
    leaves = [t for t in (gate, up, beta) if t is not None]
    before = [t.detach().clone() for t in leaves]
    y, saved = saved_by(lambda: fused_act.glu(gate, up, "swish", beta=beta), backend)
    assert {t.data_ptr() for t in saved} == {t.data_ptr() for t in leaves}
    assert sum(t.numel() for t in saved) == sum(t.numel() for t in leaves)
    g = torch.ones_like(y)
    grads = torch.autograd.grad(y, leaves, g, retain_graph=True)
    again = torch.autograd.grad(y, leaves, g)
    for t, b in zip(leaves, before, strict=True):
        assert torch.equal(t.detach(), b)
    assert torch.equal(g, torch.ones_like(y))
    for a, b in zip(grads, again, strict=True):
        assert torch.equal(a, b)


def test_named_forms_are_glu():
    x = _randn((3, 10), torch.float32, 3.0, 31)
    torch.testing.assert_close(fused_act.swiglu(x), fused_act.glu(x))
    torch.testing.assert_close(fused_act.geglu(x, approximate="tanh"),
                               fused_act.glu(x, activation="gelu_tanh"))
    torch.testing.assert_close(fused_act.geglu(x[:, :5], x[:, 5:]),
                               fused_act.glu(x, activation="gelu", approximate="none"))
    assert {"glu", "swiglu", "geglu"} <= set(fused_act.__all__)


ERRORS = {
    "shape": (lambda g: fused_act.glu(g, g[:, :3]), ValueError, r"up must have gate's shape"),
    "broadcast": (lambda g: fused_act.swiglu(g, g[:1]), ValueError, r"up must have gate's"),
    "odd": (lambda g: fused_act.glu(g[:, :5]), ValueError, r"odd size 5 along dim -1"),
    "dim": (lambda g: fused_act.glu(g, dim=2), ValueError, r"dim 2 is out of range"),
    "dim_with_up": (lambda g: fused_act.glu(g, g, dim=7), ValueError, r"dim 7 is out of range"),
    "dim_type_with_up": (lambda g: fused_act.swiglu(g, g, dim=None), TypeError,
                         r"dim must be an int"),
    "up_dtype": (lambda g: fused_act.glu(g, g.double()), TypeError, r"up must have gate's dtype"),
    "up_type": (lambda g: fused_act.glu(g, [1.0]), TypeError, r"up must be a torch.Tensor"),
    "gate_type": (lambda g: fused_act.swiglu(g.tolist()), TypeError,
                  r"fused_act.swiglu: gate must be a torch.Tensor"),
    "activation": (lambda g: fused_act.glu(g, activation="relu"), ValueError,
                   r"unknown activation 'relu'"),
    "kwarg": (lambda g: fused_act.glu(g, activation="mish", beta=2.0), TypeError,
              r"takes no argument 'beta'"),
    "approximate": (lambda g: fused_act.geglu(g, approximate="fast"), ValueError,
                    r"fused_act.geglu: activation 'gelu' takes"),
    "alias_clash": (lambda g: fused_act.glu(g, activation="gelu_tanh", approximate="none"),
                    ValueError, r"gelu_tanh"),
    "beta_shape": (lambda g: fused_act.glu(g, activation="swish", beta=torch.ones(3)),
                   ValueError, r"beta must be a float or a one-element tensor"),
    "beta_type": (lambda g: fused_act.glu(g, activation="swish", beta="1"), TypeError,
                  r"beta must be a float or a tensor"),
    "beta_dtype": (lambda g: fused_act.glu(g, activation="swish",
                                           beta=torch.ones(1, dtype=torch.int32)),
                   TypeError, r"beta must be a floating-point tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(case, backend, request, monkeypatch):
    """Bad arguments are clear errors naming the argument, raised before any kernel launch."""
    _use(request, backend)
    call, kind, match = ERRORS[case]
    launched = []
    from fused_act._cuda import ExtensionKernels
    for cls in (TritonKernels, ExtensionKernels):
        for name in [n for n in vars(Kernels) if n.startswith("glu")]:
            monkeypatch.setattr(cls, name, lambda *a, **k: launched.append(a))
    with fused_act.use_backend(backend), pytest.raises(kind, match=match):
        call(_randn((4, 6), torch.float32, 1.0, 33))
    assert not launched


def test_zero_dim_gate_and_up_take_dim_0_or_minus_1():
    """With up given, dim is unused but checked: a 0-d gate takes -1 (the default) or 0, as
    torch's dim arguments do on a 0-d tensor."""
    g, u = torch.tensor(0.5, dtype=F64), torch.tensor(2.0, dtype=F64)
    for dim in (-1, 0):
        torch.testing.assert_close(fused_act.swiglu(g, u, dim=dim),
                                   torch.nn.functional.silu(g) * u)
    with pytest.raises(ValueError, match="dim 1 is out of range"):
        fused_act.swiglu(g, u, dim=1)


def test_glu_module():
    """nn.GLU: the function over (gate, up) or a packed input; a learnable swish beta is a
    parameter whose gradient arrives; its repr says fused; arguments are checked when built."""
    torch.manual_seed(0)
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    m = fused_act.nn.GLU("gelu", approximate="tanh")
    torch.testing.assert_close(m(gate, up), fused_act.geglu(gate, up, approximate="tanh"))
    torch.testing.assert_close(m(torch.cat([gate, up], -1)), m(gate, up))
    assert repr(m) == "GLU(fused, activation='gelu', approximate='tanh')"
    learn = fused_act.nn.GLU("swish", learnable=True, beta=1.5)
    assert list(learn.state_dict()) == ["beta"] and learn.beta.item() == 1.5
    learn(gate, up).sum().backward()
    assert learn.beta.grad is not None and learn.beta.grad.isfinite().all()
    with pytest.raises(ValueError, match="learnable=True needs activation='swish'"):
        fused_act.nn.GLU("mish", learnable=True)
    with pytest.raises(ValueError):
        fused_act.nn.GLU("relu")
    with pytest.raises(TypeError):
        fused_act.nn.GLU("silu", approximate="tanh")
