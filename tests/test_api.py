"""Public API: argument errors, backend control, modules, in-place, and the op table."""

import inspect
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import triton
import triton.language as tl

import fused_act
from fused_act import ops, reference, registry
from fused_act.triton_kernels import math as tmath

from .cases import CPU_BACKENDS, ROOT, need_backend, need_device


def c_enum(text: str, name: str) -> dict[str, int]:
    """The enumerators of the C enum ``name`` in ``text``, in order, with their values (an
    implicit one is the previous plus one)."""
    body = re.search(rf"enum {name}\b[^{{;]*{{([^}}]*)}}", re.sub(r"//[^\n]*", "", text))
    assert body, f"enum {name} not found"
    values, value = {}, 0
    for item in filter(None, (i.strip() for i in body.group(1).split(","))):
        key, _, given = (part.strip() for part in item.partition("="))
        value = int(given, 0) if given else value
        values[key] = value
        value += 1
    return values


def test_every_activation_in_every_math_site():
    """Each kernel activation of the registry has its math in every language, under the id the
    registry assigns: a Triton pair and selector constant, a CUDA pair, id (``act_id``, whose last
    enumerator ``N_ACT`` counts them: the CUDA launchers dispatch over every id below it) and
    selector branches, and a spec whose reference math the op table runs.  No other CUDA file
    names an activation."""
    header = (ROOT / "csrc" / "activations.cuh").read_text()
    ids = c_enum(header, "act_id")
    assert list(ids)[-1] == "N_ACT", ids
    n_act = ids.pop("N_ACT")
    assert {k.removeprefix("ACT_").lower(): v for k, v in ids.items()} == registry.KERNEL_IDS
    assert all(k.startswith("ACT_") for k in ids), ids
    assert sorted(registry.KERNEL_IDS.values()) == list(range(n_act))
    dispatch = (ROOT / "csrc" / "act_math.cuh").read_text()
    assert "std::make_integer_sequence<int, N_ACT>" in dispatch
    others = {p.name: p.read_text() for p in (ROOT / "csrc").iterdir()
              if p.name != "activations.cuh"}
    for name, i in registry.KERNEL_IDS.items():
        assert hasattr(tmath, f"{name}_fwd") and hasattr(tmath, f"{name}_bwd"), name
        assert getattr(tmath, name.upper()).value == i, name
        assert f"M {name}_fwd(" in header and f"{name}_bwd(" in header, name
        # act_fwd's and act_bwd's branches; act_both's one special case is swish's
        assert header.count(f"ACT == ACT_{name.upper()})") == 2 + (name == "swish"), name
        for file, text in others.items():
            assert not re.search(rf"\b(FA|ACT)_{name.upper()}\b", text), (file, name)
        assert registry.KERNELS[name].kernel == name
    for fn in ("mish", "swish", "gelu", "acon_c", "frelu_max"):
        assert hasattr(reference, fn) and hasattr(reference, fn + "_backward")


@triton.jit
def _selector_kernel(out_ptr, ACT: tl.constexpr, BWD: tl.constexpr):
    x = tl.full((16,), 1.0, tl.float32)
    if BWD:
        y, _ = tmath.act_bwd(x, 1.0, ACT)
    else:
        y = tmath.act_fwd(x, 1.0, ACT)
    tl.store(out_ptr + tl.arange(0, 16), y)


@pytest.mark.parametrize("bwd", [False, True], ids=["act_fwd", "act_bwd"])
def test_unknown_selector_is_an_error(bwd):
    """A selector no branch handles fails at compile time (here: the interpreter's), never
    falls through to another activation; the CUDA selectors end in a static_assert likewise."""
    need_device("cpu")
    out = torch.empty(16)
    _selector_kernel[(1,)](out, ACT=registry.KERNEL_IDS["mish"], BWD=bwd)
    unknown = max(registry.KERNEL_IDS.values()) + 1
    with pytest.raises(Exception, match="unknown activation selector"):
        _selector_kernel[(1,)](out, ACT=unknown, BWD=bwd)
    header = (ROOT / "csrc" / "activations.cuh").read_text()
    assert header.count('static_assert(ACT != ACT, "') == 2


@pytest.mark.parametrize("call", [pytest.param(s.call, id=s.name)
                                  for s in registry.SPECS.values()])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_input_is_a_type_error(call, dtype):
    with pytest.raises(TypeError, match=r"fused_act\.\w+: x must be a floating-point tensor"):
        call(torch.zeros(4, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fused_act.mish([1.0, 2.0])


@pytest.mark.parametrize("shape", [(5,), (2, 3), (1, 3, 2), (3, 1, 1, 1)])
def test_beta_of_wrong_shape(shape):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"fused_act.swish: beta must have one element or C=4"):
        fused_act.swish(x, torch.ones(shape))


def test_beta_bad_types_and_devices():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="beta must be a floating-point tensor"):
        fused_act.swish(x, torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="beta must be a float or a tensor"):
        fused_act.swish(x, "1.0")
    with pytest.raises(TypeError, match="beta must be a float or a tensor"):
        fused_act.swish(x, True)
    with pytest.raises(ValueError, match="beta is on meta but x is on cpu"):
        fused_act.swish(x, torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="one element"):
        fused_act.swish(torch.randn(5), torch.ones(5))  # a 1-D x has no channel dim


def test_gelu_bad_approximate():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        fused_act.gelu(torch.randn(3), "erf")
    with pytest.raises(ValueError, match="approximate must be"):
        fused_act.nn.GELU("fast")


def test_backend_control():
    assert fused_act.get_backend() == "auto"
    with fused_act.use_backend("reference"):
        assert fused_act.get_backend() == "reference"
        with fused_act.use_backend("triton"):
            assert fused_act.get_backend() == "triton"
        assert fused_act.get_backend() == "reference"
    assert fused_act.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fused_act.set_backend("fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        fused_act.set_backend("cuda")
    fused_act.set_backend("reference")
    try:
        assert fused_act.get_backend() == "reference"
    finally:
        fused_act.set_backend("auto")


def test_use_backend_is_per_thread():
    """A block in one thread does not change the backend another thread runs with; a new thread
    starts from the set_backend default, and set_backend does not override a block in force."""
    import threading
    inside, entered, leave, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def blocked():
        with fused_act.use_backend("reference"):
            entered.set()
            leave.wait(10)
            seen["blocked"] = fused_act.get_backend()

    def other():
        inside.wait(10)
        seen["other"] = fused_act.get_backend()

    with fused_act.use_backend("triton"):
        threads = [threading.Thread(target=blocked), threading.Thread(target=other)]
        for t in threads:
            t.start()
        entered.wait(10)
        inside.set()
        threads[1].join(10)
        fused_act.set_backend("reference")
        try:
            assert fused_act.get_backend() == "triton"
            leave.set()
            threads[0].join(10)
        finally:
            fused_act.set_backend("auto")
    assert seen == {"blocked": "reference", "other": "auto"}


def test_compiled_graph_follows_use_backend(monkeypatch):
    """The backend in force when a compiled function runs picks its graph: a block with another
    backend retraces rather than reusing the first graph's kernels."""
    ran = []
    real = fused_act.kernels.kernels

    def probe(name):
        ran.append(name)
        return real(name)

    monkeypatch.setattr(fused_act.kernels, "kernels", probe)
    f = torch.compile(lambda t: fused_act.mish(t), fullgraph=True, backend="eager")
    x = torch.randn(64)
    with fused_act.use_backend("reference"):
        torch.testing.assert_close(f(x), reference.mish(x))
    assert ran == []
    with fused_act.use_backend("triton"):
        torch.testing.assert_close(f(x), reference.mish(x), rtol=1e-6, atol=1e-6)
    assert ran and set(ran) == {"triton"}


def test_compiled_graph_follows_use_backend_in_a_new_thread(monkeypatch):
    """The same, first traced outside any block in a thread that never entered one (its
    backend read then finds no value of the thread's own)."""
    import threading
    ran, seen = [], {}
    real = fused_act.kernels.kernels

    def probe(name):
        ran.append(name)
        return real(name)

    monkeypatch.setattr(fused_act.kernels, "kernels", probe)

    def body():
        f = torch.compile(lambda t: fused_act.mish(t), fullgraph=True, backend="eager")
        seen["x"] = x = torch.randn(64)
        f(x)
        seen["outside"] = list(ran)
        ran.clear()
        with fused_act.use_backend("reference"):
            seen["value"] = f(x)
        seen["inside"] = list(ran)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen["outside"] and seen["inside"] == [], seen
    torch.testing.assert_close(seen["value"], reference.mish(seen["x"]))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fused_act.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_act.mish(torch.randn(4))
    # "auto" quietly uses the reference for CPU tensors
    torch.testing.assert_close(fused_act.mish(torch.ones(3)), reference.mish(torch.ones(3)))


def test_backend_from_environment():
    code = "import fused_act; print(fused_act.get_backend())"
    env = dict(os.environ, FUSED_ACT_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "reference", out.stderr
    env["FUSED_ACT_BACKEND"] = "nonsense"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown backend 'nonsense'" in out.stderr


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "fused_act.info"], capture_output=True, text=True)
    assert out.returncode == 0 and "triton" in out.stdout and "reference" in out.stdout


def test_compile_mode_validation(monkeypatch):
    monkeypatch.setattr(fused_act.config, "compile_mode", {"mish": "decompose"})
    assert fused_act.config.mode_for("mish") == "decompose"
    assert fused_act.config.mode_for("gelu") == "opaque"
    monkeypatch.setattr(fused_act.config, "compile_mode", "fast")
    with pytest.raises(ValueError, match="compile_mode"):
        fused_act.config.mode_for("mish")


@pytest.mark.parametrize("make_x, dense", [
    (lambda: torch.randn(3, 4), True),
    (lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), True),
    (lambda: torch.randn(4, 5).t(), True),
    (lambda: torch.randn(4, 5, 6).permute(2, 0, 1), True),
    (lambda: torch.randn(4, 1, 5)[:, :, :], True),
    (lambda: torch.randn(4, 6)[:, ::2], False),
    (lambda: torch.randn(4, 1).expand(4, 3), False),
    (lambda: torch.randn(4, 6)[:, 1:4], False),
])
def test_is_dense(make_x, dense):
    assert ops.is_dense(make_x()) is dense


# ---- modules ---------------------------------------------------------------------------

# (torch.nn's module, ours) of every spec that replaces one, with the spec's arguments
REPLACING = [s for s in registry.SPECS.values() if s.replaces]
MODULE_PAIRS = [pytest.param((lambda s=s: getattr(torch.nn, s.replaces)(**s.kwargs),
                              lambda s=s: getattr(fused_act.nn, s.module)(**s.kwargs)),
                             id=s.name) for s in REPLACING]
# our modules with torch.nn's inplace argument
INPLACE_MODULES = [m for m in dict.fromkeys(getattr(fused_act.nn, s.module) for s in REPLACING)
                   if "inplace" in inspect.signature(m).parameters]


@pytest.mark.parametrize("pair", MODULE_PAIRS)
def test_modules_match_torch(pair):
    theirs, ours = pair[0](), pair[1]()
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 6, 5, requires_grad=True)
    ya, yb = theirs(x), ours(x)
    torch.testing.assert_close(yb, ya)
    ga, gb = (torch.autograd.grad(y.sum(), x)[0] for y in (ya, yb))
    torch.testing.assert_close(gb, ga)


def test_module_constructor_arguments_match_torch():
    for name in dict.fromkeys(s.replaces for s in REPLACING):
        theirs = inspect.signature(getattr(torch.nn, name)).parameters
        ours = inspect.signature(getattr(fused_act.nn, name)).parameters
        assert list(theirs) == list(ours), name
        assert all(theirs[p].default == ours[p].default for p in theirs), name


def test_swish_module():
    fixed = fused_act.nn.Swish(beta=1.5)
    assert dict(fixed.state_dict()) == {} and "beta=1.5" in repr(fixed)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    torch.testing.assert_close(fixed(x), x * torch.sigmoid(1.5 * x))
    per_channel = fused_act.nn.Swish(beta=0.5, learnable=True, num_parameters=3)
    assert per_channel.state_dict()["beta"].shape == (3,)
    per_channel(x).sum().backward()
    assert per_channel.beta.grad is not None and per_channel.beta.grad.shape == (3,)
    prelu_like = fused_act.nn.Swish(learnable=True, num_parameters=3)
    prelu_like.load_state_dict({"beta": torch.tensor([1.0, 2.0, 3.0])})
    torch.testing.assert_close(prelu_like(x), x * torch.sigmoid(
        torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) * x))
    with pytest.raises(ValueError, match="needs learnable=True"):
        fused_act.nn.Swish(num_parameters=3)


@pytest.mark.parametrize("module", INPLACE_MODULES, ids=lambda m: m.__name__)
def test_inplace(module):
    x = torch.randn(300) * 4
    want = module()(x)
    y = module(inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, want)
    strided = torch.randn(10, 8)[:, ::2]
    want = module()(strided)
    module(inplace=True)(strided)
    torch.testing.assert_close(strided, want)
    # with a gradient needed, still into x (the backward reads a copy), as torch.nn's module
    # does, and with no warning; a leaf that requires grad is torch's own error
    h = torch.randn(5, requires_grad=True) * 1
    want = module()(h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = module(inplace=True)(h)
    assert y.data_ptr() == h.data_ptr()
    torch.testing.assert_close(h, want)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        module(inplace=True)(torch.randn(5, requires_grad=True))


def test_inplace_under_triton_uses_one_buffer():
    need_device("cpu")
    x = torch.randn(5000) * 4
    want = reference.mish(x)
    with fused_act.use_backend("triton"):
        y = fused_act.nn.Mish(inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, want)


def test_autocast_bf16_on_cpu():
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        for f in (fused_act.mish, fused_act.silu, fused_act.gelu):
            assert f(h).dtype == torch.bfloat16 == torch.nn.functional.mish(h).dtype


def test_backends_implement_the_kernel_interface():
    """Both kernel backends offer every launcher of ``kernels.Kernels`` with its parameters (what
    a type checker verifies, checked here without one); an optional one, where they have it,
    and ``kernels.offers`` says which they have."""
    import inspect

    from fused_act._cuda import ExtensionKernels
    from fused_act.kernels import OPTIONAL, Kernels, offers
    from fused_act.triton_kernels import TritonKernels

    def params(fn):
        return [p for p in inspect.signature(fn).parameters if p != "self"]

    launchers = [n for n, v in vars(Kernels).items()
                 if inspect.isfunction(v) and not n.startswith("_")]
    assert len(launchers) == 16 and OPTIONAL <= set(launchers)
    for cls in (TritonKernels, ExtensionKernels):
        for name in launchers:
            if name in OPTIONAL and not hasattr(cls, name):
                continue
            assert params(getattr(cls, name)) == params(getattr(Kernels, name)), (cls, name)
    assert offers(TritonKernels(), "act_quant") and not offers(ExtensionKernels(None), "act_quant")
    assert not offers(TritonKernels(), "quantize")
    assert not offers(ExtensionKernels(None), "quantize")
    assert not offers(TritonKernels(), "merge_stats")
    assert not offers(ExtensionKernels(None), "merge_stats")
    assert not offers(TritonKernels(), "batch_norm_backward")
    assert not offers(ExtensionKernels(None), "batch_norm_backward")
    assert not offers(None, "act_quant")
    with pytest.raises(ValueError, match="not an optional"):
        offers(TritonKernels(), "act_forward")


# A tensor subclass in any tensor argument: (call, x's shape, the subclassed argument's shape,
# other tensor arguments' shapes); each call is (x, subclassed, *others)
SUBCLASS_CALLS = {
    "swish_beta": (lambda x, b: fused_act.swish(x, b), (2, 3, 4), (3,), ()),
    "acon_p1": (lambda x, p1, p2, b: fused_act.acon_c(x, p1, p2, b), (2, 3, 4), (3,),
                ((3,), (3,))),
    "frelu_t": (lambda x, t: fused_act.frelu_max(x, t), (2, 3, 4), (2, 3, 4), ()),
    "swiglu_up": (lambda g, u: fused_act.swiglu(g, u), (3, 4), (3, 4), ()),
    "glu_beta": (lambda g, b, u: fused_act.glu(g, u, "swish", beta=b), (3, 4), (1,), ((3, 4),)),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(SUBCLASS_CALLS))
def test_tensor_subclass_after_the_first_argument(case, backend):
    """A tensor subclass that dispatches ops itself (here TwoTensor, which runs every op on its
    two components) in an argument other than the first: the op runs on the subclass, as torch's
    own ops do, with the output and every gradient the calls on each component's plain tensors
    give."""
    from torch.testing._internal.two_tensor import TwoTensor

    if backend == "triton":
        need_device("cpu")
    call, x_shape, sub_shape, other_shapes = SUBCLASS_CALLS[case]
    gen = torch.Generator().manual_seed(7)
    x, sub_a, sub_b, *others = (torch.rand(s, generator=gen, dtype=torch.float64) + 0.5
                                for s in (x_shape, sub_shape, sub_shape, *other_shapes))
    x = 4 * x - 4
    leaves = [x.requires_grad_(), TwoTensor(sub_a, sub_b).requires_grad_(),
              *(t.requires_grad_() for t in others)]
    with fused_act.use_backend(backend):
        y = call(*leaves)
        assert type(y) is TwoTensor
        y.sum().backward()
        for part in ("a", "b"):
            plain = [t.detach().clone().requires_grad_() for t in leaves]
            plain[1] = getattr(leaves[1], part).detach().clone().requires_grad_()
            want = call(*plain)
            want.sum().backward()
            torch.testing.assert_close(getattr(y, part), want, msg=f"output {part}")
            for i, (t, p) in enumerate(zip(leaves, plain, strict=True)):
                got = getattr(t.grad, part) if type(t.grad) is TwoTensor else t.grad
                torch.testing.assert_close(got, p.grad, msg=f"gradient {i} {part}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_subclass_gradient_and_inplace(backend):
    """A gradient of a subclass that dispatches itself (TwoTensor) reaching the backward of an
    op on plain tensors (the eager Function, for a Parameter x and a beta tensor, and the CPU
    kernels' C++ node) and a TwoTensor overwritten in place: the reference math runs on the
    subclass, each component as its plain call; no kernel reads the subclass's data pointer
    (it read stray memory: a segfault)."""
    from torch.testing._internal.two_tensor import TwoTensor

    need_backend(backend, "cpu")
    gen = torch.Generator().manual_seed(3)
    a, b, x0 = (torch.randn(2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    beta = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    calls = {"plain": (lambda x: fused_act.mish(x), x0.clone()),
             "parameter": (lambda x: fused_act.silu(x), torch.nn.Parameter(x0.clone())),
             "beta": (lambda x: fused_act.swish(x, beta), x0.clone())}
    with fused_act.use_backend(backend):
        for what, (call, x) in calls.items():
            x.requires_grad_()
            (got,) = torch.autograd.grad(call(x), x, TwoTensor(a, b))
            assert type(got) is TwoTensor, what
            for part, g in (("a", a), ("b", b)):
                xp = x0.clone().requires_grad_()
                torch.testing.assert_close(getattr(got, part),
                                           torch.autograd.grad(call(xp), xp, g)[0],
                                           msg=f"{what} {part}")
        t = TwoTensor(a.clone(), b.clone())
        fused_act.mish(t, inplace=True)
        torch.testing.assert_close(t.a, fused_act.mish(a))
        torch.testing.assert_close(t.b, fused_act.mish(b))


def test_plain_tensors_and_parameters_take_the_eager_function():
    """Plain tensors and nn.Parameter (a subclass without a dispatch of its own) take the eager
    Function, which spares the custom op's dispatch cost; a subclass with its own dispatch in
    any argument takes the custom op."""
    from torch.testing._internal.two_tensor import TwoTensor

    x = torch.randn(2, 3, 4, requires_grad=True)
    beta = torch.nn.Parameter(torch.ones(3))
    eager = ops.ACTIVATION.function
    with fused_act.use_backend("reference"):  # on CPU tensors, "cpu" takes its C++ node
        assert fused_act.swish(x, beta).grad_fn._forward_cls is eager
        assert fused_act.swish(torch.nn.Parameter(x.detach()), beta).grad_fn._forward_cls is eager
        assert fused_act.swish(x, TwoTensor(beta, beta)).grad_fn._forward_cls is not eager
