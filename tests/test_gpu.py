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
from fused_act import ops, plan, reference, registry
from fused_act.ops import quant

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
        for out, new in zip(*(o if isinstance(o, tuple) else (o,) for o in (self.out,
                                                                           self.step())),
                            strict=True):
            out.copy_(new)


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


# ---- act_quant: the activation fused with FP8 quantisation -----------------------------------

QUANT_CASES = [("swish", "gated", "row"), ("gelu_tanh", "packed", "block"),
               ("mish", "elementwise", "tensor"), ("swish", "gated", "delayed")]
QUANT_IDS = ["-".join(c) for c in QUANT_CASES]


def _quant_inputs(mode: str, rows: int, k: int, make=torch.randn):
    """(gate, up, dim) of ``rows`` rows of ``k`` bf16 values as act_quant takes them ("packed":
    one (rows, 2k) tensor read in halves)."""
    if mode == "packed":
        return make(rows, 2 * k, device=DEVICE, dtype=torch.bfloat16), None, -1
    gate = make(rows, k, device=DEVICE, dtype=torch.bfloat16)
    up = make(rows, k, device=DEVICE, dtype=torch.bfloat16) if mode == "gated" else None
    return gate, up, None


def _scaling(scaling: str) -> tuple[str, torch.Tensor | None]:
    """(act_quant's scaling, the caller's scale): "delayed" is "tensor" with a given scale."""
    if scaling == "delayed":
        return "tensor", torch.tensor(0.05, device=DEVICE)
    return scaling, None


def _quant(args, act, mode, scale, backend_name):
    gate, up, dim = args
    return quant.act_quant(gate, up, act, 1.0, dim, torch.float8_e4m3fn, mode, scale, 32,
                           backend_name)


def _quant_expected(args, act, mode, scale, backend_name):
    """quantize_fp8 of the backend's own fp32 activation (what its kernel must equal)."""
    gate, up, dim = args
    if dim is not None:
        gate, up = reference.halves(gate, dim)
    name = registry.KERNELS[act].name
    if up is None:
        y = ops.forward_impl(gate.float(), name, None, 1.0, backend_name)
    else:
        y = ops.glu_forward_impl(gate.float(), up.float(), name, None, 1.0, -1, backend_name)
    return reference.quantize_fp8(y, torch.float8_e4m3fn, mode, scale)


def _same_quant(got, want):
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1].reshape(-1).view(torch.uint8), want[1].reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("act, mode, scaling", QUANT_CASES, ids=QUANT_IDS)
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_act_quant_past_2_31_elements(act, mode, scaling, backend_name):
    """act_quant's 64-bit offsets: bf16 rows of 4096 (gate and up, or packed) past 2^31
    elements, checked at the start, around 2^31 and at the tail against quantize_fp8 of the
    backend's own activation (on the CPU: the accesses of each launch's programs next to the
    edges, on reserved memory; the CUDA C++ kernels only on a GPU)."""
    need_backend(backend_name, DEVICE)
    k = 4096
    rows = 2**31 // k + 3
    args = _quant_inputs(mode, rows, k, torch.randn if GPU else torch.empty)
    mode_, scale = _scaling(scaling)
    with contextlib.nullcontext() if GPU else sparse_launches(lambda n: _near_edges(
            n, rows * k)):
        q, s = _quant(args, act, mode_, scale, backend_name)
    if not GPU:
        return
    gate, up, dim = args
    edge = 2**31 // k
    for r in (slice(0, 2), slice(edge - 1, edge + 2), slice(rows - 2, rows)):
        part = (gate[r], None if up is None else up[r], dim)
        want = _quant_expected(part, act, mode_, s if mode_ == "tensor" else scale, backend_name)
        assert torch.equal(q[r].view(torch.uint8), want[0].view(torch.uint8))
        if mode_ != "tensor":
            assert torch.equal(s[r].view(torch.uint8), want[1].view(torch.uint8))


def _near_edges(grid: int, elements: int, window: int = 4) -> list[int]:
    """The first and last programs and ``window`` on either side of each 2^31-element offset,
    for a launch of ``grid`` programs over ``elements`` (evenly spread)."""
    per = -(-elements // grid)
    picks = {0, 1, grid - 2, grid - 1}
    for k in range(1, 1 + elements // 2**31):
        p = k * 2**31 // per
        picks |= set(range(p - window, p + window + 1))
    return sorted(p for p in picks if 0 <= p < grid)


@pytest.mark.parametrize("act, mode, scaling", QUANT_CASES, ids=QUANT_IDS)
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_act_quant_on_device(act, mode, scaling, backend_name, use):
    """act_quant of each kernel backend on this device, rows held and rows past each kernel's
    hold (two passes), bit for bit against quantize_fp8 of the backend's own activation; then the
    same call captured in a CUDA graph and replayed on new inputs (the amax pass of "tensor"
    stays on the device: nothing to sync)."""
    use(backend_name)
    torch.manual_seed(0)
    mode_, scale = _scaling(scaling)
    # 9024: held by the Triton kernel (16 warps), two passes in the CUDA one; past ROW_HOLD
    # two passes in both
    for rows, k in ((64 if GPU else 5, 4096 if GPU else 96), (3, 9024),
                    (2, plan.ROW_HOLD + 32)):
        args = _quant_inputs(mode, rows, k)
        got = _quant(args, act, mode_, scale, backend_name)
        _same_quant(got, _quant_expected(args, act, mode_, scale, backend_name))
    graph, (q, s) = capture(lambda: _quant(args, act, mode_, scale, backend_name))
    for a in args[:2]:
        if a is not None:
            a.copy_(torch.randn_like(a))
    graph.replay()
    _same_quant((q, s), _quant_expected(args, act, mode_, scale, backend_name))
