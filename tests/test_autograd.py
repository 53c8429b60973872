"""Autograd and op machinery: gradcheck, opcheck, torch.compile, saved tensors, checkpointing."""

import pytest
import torch
import torch.utils.checkpoint

import fused_act
from fused_act import ops

from .cases import (
    ALL_OPS,
    BACKENDS,
    CHANNEL_SHAPES,
    CPU_BACKENDS,
    DEVICES,
    OPS,
    make_x,
    need_backend,
    need_device,
    saved_by,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.name)
def test_gradcheck(op, backend_name, device):
    need_backend(backend_name, device)
    x = make_x("nchw_c3", torch.float64, device, 2.0, CHANNEL_SHAPES)[:1, :, :2, :4]
    x = x.clone().requires_grad_()
    params = op.params(x)
    with fused_act.use_backend(backend_name):
        assert torch.autograd.gradcheck(lambda x, *p: op.call(x, list(p)), (x, *params))


def _op_args(op, x):
    """Arguments of fused_act::activation for one row of the test table."""
    params = [p.detach().requires_grad_() for p in op.params(x)]
    return op.spec.kernel, (params[0] if params else None), op.beta_value


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.name)
def test_opcheck(op, backend_name, device):
    need_backend(backend_name, device)
    x = make_x("channels_last_c130", torch.float32, device, 4.0, CHANNEL_SHAPES)
    x.requires_grad_()
    act, beta, beta_value = _op_args(op, x)
    with fused_act.use_backend(backend_name):
        torch.library.opcheck(ops.activation_op, (x, act, beta, beta_value, backend_name))
        g = torch.randn_like(x)
        beta = None if beta is None else beta.detach()
        for need in ([False, True] if beta is not None else [False]):
            torch.library.opcheck(ops.activation_backward_op,
                                  (g, x.detach(), act, beta, beta_value, need, backend_name))


class _Block(torch.nn.Module):
    """A small model using every module: Linear -> act -> ... with a learnable swish."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = (torch.nn.Linear(16, 16) for _ in range(3))
        self.acts = torch.nn.ModuleList([
            fused_act.nn.Mish(), fused_act.nn.SiLU(), fused_act.nn.GELU(),
            fused_act.nn.GELU("tanh"), fused_act.nn.Swish(learnable=True, num_parameters=16),
            fused_act.nn.Swish(beta=0.5)])

    def forward(self, x):
        a = self.acts
        x = a[1](a[0](self.l1(x)))
        x = a[3](a[2](self.l2(x))) + x
        return a[5](a[4](self.l3(x)))


# a small model per kernel family: (factory, input shape)
MODELS = {
    "elementwise": (_Block, (8, 16)),
    "acon": (lambda: torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), fused_act.nn.AconC(16), torch.nn.Conv2d(16, 16, 1),
        fused_act.nn.MetaAconC(16, r=4)), (4, 3, 8, 8)),
    "frelu": (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                          fused_act.nn.FReLU(8)), (4, 3, 8, 8)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["opaque", "decompose"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("family", list(MODELS))
def test_compile_fullgraph(family, compiler, mode, device, monkeypatch):
    """torch.compile(fullgraph=True): forward and backward equal to eager in train mode, and
    the forward in eval mode without grad (FReLU's folded-BatchNorm path)."""
    need_device(device)
    monkeypatch.setattr(fused_act.config, "compile_mode", mode)
    torch._dynamo.reset()
    torch.manual_seed(0)
    factory, shape = MODELS[family]
    model = factory().to(device)
    x = torch.randn(shape, device=device) * 3

    def run(m):
        with fused_act.use_backend("triton"):
            model.zero_grad()
            y = m(x)
            y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()]

    y_eager, g_eager = run(model)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    y_comp, g_comp = run(compiled)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad(), fused_act.use_backend("triton"):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_compile_opaque_traces_our_op():
    torch._dynamo.reset()
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch.compile(fused_act.mish, fullgraph=True, backend=backend)(torch.randn(4))
    assert any("fused_act.activation" in t for t in seen), seen


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.name)
def test_saves_only_inputs(op, backend_name):
    need_backend(backend_name, "cpu")
    x = make_x("nchw_c64", torch.float32, "cpu", 4.0, CHANNEL_SHAPES).requires_grad_()
    params = op.params(x)
    y, saved = saved_by(lambda: op.call(x, params), backend_name)
    allowed = {x.data_ptr()} | {p.data_ptr() for p in params}
    assert saved and all(t.data_ptr() in allowed for t in saved), [t.shape for t in saved]
    assert sum(t.numel() for t in saved) == x.numel() + sum(p.numel() for p in params)
    y.sum().backward()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_checkpoint_and_retain_graph(op, backend_name):
    need_backend(backend_name, "cpu")
    x = make_x("nchw", torch.float32, "cpu", 4.0).requires_grad_()
    params = op.params(x)
    with fused_act.use_backend(backend_name):
        want = torch.autograd.grad(op.call(x, params).sum(), [x, *params])
        y = torch.utils.checkpoint.checkpoint(lambda x: op.call(x, params), x,
                                              use_reentrant=False)
        got = torch.autograd.grad(y.sum(), [x, *params])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
        y = op.call(x, params)
        first = torch.autograd.grad(y.sum(), [x, *params], retain_graph=True)
        second = torch.autograd.grad(y.sum(), [x, *params])
        for a, b, c in zip(first, second, want, strict=True):
            torch.testing.assert_close(a, c)
            torch.testing.assert_close(b, c)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.name)
def test_double_backward_supported_in_eager(op, backend_name):
    """create_graph=True gives a differentiable gradient (through the reference math)."""
    need_backend(backend_name, "cpu")
    x = make_x("nchw_c3", torch.float64, "cpu", 2.0, CHANNEL_SHAPES)[:1, :, :2, :2]
    x = x.clone().requires_grad_()
    params = op.params(x)
    with fused_act.use_backend(backend_name):
        assert torch.autograd.gradgradcheck(lambda x, *p: op.call(x, list(p)), (x, *params))


def test_double_backward_under_compile_is_a_clear_error():
    torch._dynamo.reset()
    x = torch.randn(10, requires_grad=True)
    f = torch.compile(fused_act.mish, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="double backward|autograd formula"):
        (dx,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        dx.sum().backward()


def test_gradients_never_written_into_inputs():
    x = torch.randn(3000, requires_grad=True)
    g = torch.randn(3000)
    x0, g0 = x.detach().clone(), g.clone()
    with fused_act.use_backend("triton"):
        y = fused_act.mish(x)
        y.backward(g)
    assert torch.equal(x.detach(), x0) and torch.equal(g, g0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_cpu_eager_node(op, dtype):
    """An eager call on a plain, dense CPU tensor under "auto" or "cpu" records the CPU
    kernels' C++ node: values and gradients bit for bit the op's own (its Python Function, by
    the same kernels), x alone saved, in any dense layout and for an expanded gradient; a
    batched gradient and create_graph take the reference math; an in-place write to x after
    the forward is torch's error; other backends, strided x, a beta tensor and inference mode
    keep the op."""
    need_backend("cpu", "cpu")
    base = make_x("nchw_c3", torch.float64, "cpu", 4.0, CHANNEL_SHAPES).to(dtype)
    params = op.params(base)
    if params:  # a beta tensor: the op's own path
        y = op.call(base.clone().requires_grad_(), params)
        assert type(y.grad_fn).__name__ == "ActivationBackward"
        return
    for x0 in (base, base.contiguous(memory_format=torch.channels_last)):
        x = x0.clone().requires_grad_()
        for backend_name in ("auto", "cpu"):
            y, saved = saved_by(lambda x=x: op.call(x, params), backend_name)
            assert "EagerActivation" in y.grad_fn.name(), y.grad_fn.name()
            assert [t.data_ptr() for t in saved] == [x.data_ptr()]
            with fused_act.use_backend("cpu"):
                want = ops.ACTIVATION(x, op.spec.kernel, None, op.beta_value)
            assert type(want.grad_fn).__name__ == "ActivationBackward"
            assert torch.equal(y, want) and y.stride() == x.stride()
            g = torch.randn(y.shape, dtype=dtype)
            for grad in (g, torch.ones((), dtype=dtype).expand(y.shape)):
                got, ref = (torch.autograd.grad(t, x, grad, retain_graph=True)[0]
                            for t in (y, want))
                assert torch.equal(got, ref)
            batched = torch.stack([g, 2 * g])
            got, ref = (torch.autograd.grad(t, x, batched, retain_graph=True,
                                            is_grads_batched=True)[0] for t in (y, want))
            torch.testing.assert_close(got, ref)
    x = base.clone().requires_grad_()
    y = op.call(x, params)
    with fused_act.use_backend("reference"):
        want = op.call(x, params)
    g = torch.randn(y.shape, dtype=dtype)

    def backward_under_transform(s):  # torch.func over the backward: the reference math
        return (s * torch.autograd.grad(y, x, g, retain_graph=True)[0].sum()).sum()

    torch.testing.assert_close(
        torch.func.grad(backward_under_transform)(torch.ones(2, dtype=dtype)),
        torch.autograd.grad(want, x, g, retain_graph=True)[0].sum().expand(2))

    def strided(t):  # an unpack hook that gives x back as a strided view
        buf = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        buf[..., ::2] = t
        return buf[..., ::2]

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), strided):
        y2 = op.call(x, params)
    assert torch.equal(torch.autograd.grad(y2, x, g)[0], torch.autograd.grad(y, x, g,
                                                                             retain_graph=True)[0])
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert dx.requires_grad and dx.grad_fn is not None
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    x = base.clone().requires_grad_()
    others = ["reference"] + (["triton"] if fused_act.backend.interpreting() else [])
    for backend_name, xi in [(b, x) for b in others] + [("cpu", x[..., ::2])]:
        with fused_act.use_backend(backend_name):
            y = op.call(xi, params)
        assert type(y.grad_fn).__name__ == "ActivationBackward", backend_name
    with torch.inference_mode():
        y = op.call(base.clone(), params)
    assert y.grad_fn is None
