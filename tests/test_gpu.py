"""GPU checks: sizes past 2^31 elements, CUDA graphs, compile modes, each for both kernel
backends; and the CUDA C++ kernels against the Triton ones.

On a GPU they are ``pytest -m cuda``.  Without one they run in the default suite on the CPU, so
that no GPU-only test rots between GPU sessions: the Triton kernels under the interpreter, the
launches past 2^31 elements in their edge programs only (``sparse_launch.py``: every access
checked, values not), a CUDA graph's replay as a second run, Inductor as ``aot_eager``, and
backend "cuda" as the CUDA C++ kernels emulated on the CPU (``test_csrc_emulated.py``) on
smaller layouts; only its run past 2^31 elements, which no emulation can afford, needs a GPU.
"""

import contextlib

import pytest
import torch

import fused_act
from fused_act import ops, reference

from .cases import ALL_OPS, TOL, need_backend
from .sparse_launch import sparse_launches
from .test_csrc_emulated import cuda_on_cpu, emulated  # noqa: F401  (fixtures, asked by name)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
pytestmark = [pytest.mark.cuda] if GPU else []
KERNEL_BACKENDS = ["triton", "cuda"]
COMPILE_BACKEND = "inductor" if GPU else "aot_eager"
# without a GPU the layouts shrink by this factor (elements), for the interpreter and emulation
SHRINK = 1 if GPU else 256


@pytest.fixture
def use(request):
    """``use(backend)``: skip unless ``backend`` runs here; without a GPU, backend "cuda" is the
    emulated CUDA C++ kernels for this test."""
    def need(backend_name: str) -> None:
        if backend_name == "cuda" and not GPU:
            request.getfixturevalue("cuda_on_cpu")
        else:
            need_backend(backend_name, DEVICE)
    return need


class _ReplayedGraph:
    """A CUDA graph's stand-in on the CPU: replay runs the captured step again into its output."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step())


def capture(step):
    """(graph, output) of ``step`` captured in a CUDA graph (a re-run on the CPU)."""
    if not GPU:
        return _ReplayedGraph(step, out := step()), out
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_past_2_31_elements(backend_name):
    """64-bit offsets: a bf16 tensor of 2^31 + 4099 elements, forward and backward, checked at
    the start, around 2^31 and at the tail against the reference (on the CPU: the accesses of
    each launch's edge programs, on reserved memory; the CUDA C++ kernels only on a GPU)."""
    need_backend(backend_name, DEVICE)
    n = 2**31 + 4099
    make = torch.randn if GPU else torch.empty
    x = make(n, device=DEVICE, dtype=torch.bfloat16)
    g = make(n, device=DEVICE, dtype=torch.bfloat16)
    with fused_act.use_backend(backend_name), \
            contextlib.nullcontext() if GPU else sparse_launches():
        y = fused_act.mish(x)
        dx, _ = ops.backward_impl(g, x, "mish", None, 1.0, False, backend_name)
    if not GPU:
        return
    rtol, atol = TOL[torch.bfloat16]
    for s in (slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(n - 4096, n)):
        torch.testing.assert_close(y[s], reference.mish(x[s]), rtol=rtol, atol=atol)
        torch.testing.assert_close(dx[s], reference.mish_backward(g[s], x[s]), rtol=rtol,
                                   atol=atol)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_cuda_graph_capture(backend_name, use):
    use(backend_name)
    x = torch.randn(4096, device=DEVICE, requires_grad=True)
    beta = torch.ones(1, device=DEVICE, requires_grad=True)
    with fused_act.use_backend(backend_name):
        fused_act.swish(x, beta).sum().backward()  # compile kernels before capture
        graph, y = capture(lambda: fused_act.swish(x, beta))
    x.data.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, reference.swish(x.detach(), beta.detach()))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("compile_mode", ["opaque", "decompose"])
def test_compile_inductor_cuda(mode, compile_mode, backend_name, monkeypatch, use):
    use(backend_name)
    monkeypatch.setattr(fused_act.config, "compile_mode", compile_mode)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), fused_act.nn.Mish(),
                                torch.nn.Linear(64, 64), fused_act.nn.GELU("tanh"),
                                fused_act.nn.Swish(learnable=True, num_parameters=64)).to(DEVICE)
    x = torch.randn(32, 64, device=DEVICE)

    def step(m):
        model.zero_grad()
        y = m(x)
        y.square().mean().backward()
        return y.detach().clone(), [p.grad.clone() for p in model.parameters()]

    # the backend in force for the eager run, the trace and every compiled step alike
    with fused_act.use_backend(backend_name):
        y0, g0 = step(model)
        how = dict(mode=mode) if GPU else dict(backend=COMPILE_BACKEND)
        compiled = torch.compile(model, fullgraph=True, **how)
        for _ in range(3):  # reduce-overhead records, then replays
            y1, g1 = step(compiled)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _grads(fn, x, params, g):
    y = fn(x, params)
    return (y, *torch.autograd.grad(y, [x, *params], g))


def _randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).mul(6).to(dtype)


# each made in its final layout on the GPU (a later copy would realign it)
LAYOUTS = {
    "flat_tail": lambda d: _randn(3 * 2**20 // SHRINK + 7, dtype=d),
    # offset by 1 element: scalar path
    "misaligned": lambda d: _randn(2**20 // SHRINK + 1, dtype=d)[1:],
    "nchw": lambda d: _randn(8 // min(SHRINK, 4), 64, 56 // min(SHRINK, 4), 56, dtype=d),
    "nchw_odd_rows": lambda d: _randn(4 // min(SHRINK, 2), 130, 7, 7, dtype=d),  # rows of 49
    "channels_last": lambda d: _randn(8 // min(SHRINK, 8), 64, 28 // min(SHRINK, 4), 28,
                                      dtype=d).contiguous(memory_format=torch.channels_last),
    "nc": lambda d: _randn(256 // min(SHRINK, 64), 1024, dtype=d),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.name)
def test_cuda_kernels_match_triton(op, layout, dtype, use):
    """Two independent implementations, larger than the CPU tables: outputs and input gradients
    within a few ulps of each other, parameter gradients to summation order."""
    use("triton")
    use("cuda")
    torch.manual_seed(0)
    x = LAYOUTS[layout](dtype)
    assert layout != "misaligned" or x.data_ptr() % 16
    if x.dim() < 2 and op.name.startswith("swish_channel"):
        pytest.skip("a per-channel beta needs a channel dim")
    x.requires_grad_()
    params = op.params(x)
    g = torch.randn_like(x)
    got = {}
    for name in KERNEL_BACKENDS:
        with fused_act.use_backend(name):
            got[name] = _grads(op.call, x, params, g)
    ulp = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for a, b in zip(got["cuda"][:2], got["triton"][:2], strict=True):
        torch.testing.assert_close(a, b, rtol=ulp, atol=ulp)
    for a, b in zip(got["cuda"][2:], got["triton"][2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["swish_channel", "acon_nchw", "acon_cl", "meta_acon"])
def test_parameter_gradients_bit_identical(kind, backend_name, use):
    """Two runs give the same parameter gradients to the bit (no atomics)."""
    use(backend_name)
    torch.manual_seed(0)
    x = torch.randn(16 if GPU else 2, 64, 28, 28, device=DEVICE)
    if kind == "acon_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = x.shape[1]
    beta_shape = (x.shape[0], c) if kind == "meta_acon" else (c,)
    p = [torch.randn(c, device=DEVICE, requires_grad=True) for _ in range(2)]
    beta = torch.rand(beta_shape, device=DEVICE, requires_grad=True)
    g = torch.randn_like(x)

    def run():
        with fused_act.use_backend(backend_name):
            if kind == "swish_channel":
                y = fused_act.swish(x, p[0])
                return torch.autograd.grad(y, [p[0]], g)
            y = fused_act.acon_c(x, p[0], p[1], beta)
            return torch.autograd.grad(y, [*p, beta], g)

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
