"""GPU-only checks (``pytest -m cuda``): sizes past 2^31 elements, CUDA graphs, compile modes."""

import pytest
import torch

import fused_act
from fused_act import reference

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_past_2_31_elements():
    """64-bit offsets: a bf16 tensor of 2^31 + 4099 elements, forward and backward, checked at
    the start, around 2^31 and at the tail against the reference."""
    n = 2**31 + 4099
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with fused_act.use_backend("triton"):
        y = fused_act.mish(x)
        from fused_act import ops
        dx, _ = ops.backward_impl(g, x, "mish", None, 1.0, False)
    for s in (slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(n - 4096, n)):
        torch.testing.assert_close(y[s], reference.mish(x[s]), rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(dx[s], reference.mish_backward(g[s], x[s]), rtol=8e-3,
                                   atol=1e-5)


def test_cuda_graph_capture():
    x = torch.randn(4096, device="cuda", requires_grad=True)
    beta = torch.ones(1, device="cuda", requires_grad=True)
    fused_act.swish(x, beta).sum().backward()  # compile kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_act.swish(x, beta)
    x.data.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, reference.swish(x.detach(), beta.detach()))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("compile_mode", ["opaque", "decompose"])
def test_compile_inductor_cuda(mode, compile_mode, monkeypatch):
    monkeypatch.setattr(fused_act.config, "compile_mode", compile_mode)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), fused_act.nn.Mish(),
                                torch.nn.Linear(64, 64), fused_act.nn.GELU("tanh"),
                                fused_act.nn.Swish(learnable=True, num_parameters=64)).cuda()
    x = torch.randn(32, 64, device="cuda")

    def step(m):
        model.zero_grad()
        y = m(x)
        y.square().mean().backward()
        return y.detach().clone(), [p.grad.clone() for p in model.parameters()]

    y0, g0 = step(model)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records, then replays
        y1, g1 = step(compiled)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
