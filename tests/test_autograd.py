"""Autograd and op machinery: gradcheck, opcheck, torch.compile, saved tensors, checkpointing."""

import pytest
import torch
import torch.utils.checkpoint
from torch._dynamo.utils import counters

import fused_act
from fused_act import ops, reference

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
    the same kernels), a beta tensor's gradient too, x and beta alone saved, in any dense layout
    and for an expanded gradient; a batched gradient and create_graph take the reference math;
    a saved x given back strided is read right, in another shape refused; an in-place write to
    x after the forward is torch's error; other backends, strided x and inference mode keep the
    op."""
    need_backend("cpu", "cpu")
    base = make_x("nchw_c3", torch.float64, "cpu", 4.0, CHANNEL_SHAPES).to(dtype)
    # a beta tensor (per channel or one value) requires grad: its gradient is compared too
    params = [p.detach().requires_grad_() for p in op.params(base)]
    for x0 in (base, base.contiguous(memory_format=torch.channels_last)):
        x = x0.clone().requires_grad_()
        for backend_name in ("auto", "cpu"):
            y, saved = saved_by(lambda x=x: op.call(x, params), backend_name)
            assert "EagerActivation" in y.grad_fn.name(), y.grad_fn.name()
            assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in (x, *params)]
            with fused_act.use_backend("cpu"):
                want = ops.ACTIVATION(x, op.spec.kernel, params[0] if params else None,
                                      op.beta_value)
            assert type(want.grad_fn).__name__ == "ActivationBackward"
            assert torch.equal(y, want) and y.stride() == x.stride()
            g = torch.randn(y.shape, dtype=dtype)
            for grad in (g, torch.ones((), dtype=dtype).expand(y.shape)):
                got, ref = (torch.autograd.grad(t, [x, *params], grad, retain_graph=True)
                            for t in (y, want))
                assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
            batched = torch.stack([g, 2 * g])
            got, ref = (torch.autograd.grad(t, [x, *params], batched, retain_graph=True,
                                            is_grads_batched=True) for t in (y, want))
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
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), _flat):
        y2 = op.call(x, params)
    with pytest.raises(RuntimeError, match="came back from a saved-tensor hook"):
        torch.autograd.grad(y2, x, g)
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



def _flat(t):
    """A saved-tensor hook's unpack that gives a tensor back in another shape: a kernel would
    read it by the forward's, so the nodes refuse it."""
    return t.reshape(-1) if t.dim() > 1 else t


# the eager nodes but the activations': (inputs from x of (4, 6, 6), the public call, the
# op's call)
EAGER_NODES = {
    "glu": (lambda x: [x, torch.randn(x.shape, dtype=x.dtype)],
            lambda a: fused_act.geglu(a[0], a[1], approximate="tanh"),
            lambda a: ops.GATED(a[0], a[1], "gelu_tanh", None, 1.0, -1, mode="glu")),
    "glu packed, last dim": (lambda x: [x], lambda a: fused_act.swiglu(a[0]),
                             lambda a: ops.GATED(a[0], None, "silu", None, 1.0, -1, mode="glu")),
    "glu packed, dim 1": (lambda x: [x[:, :4]], lambda a: fused_act.swiglu(a[0], dim=1),
                          lambda a: ops.GATED(a[0], None, "silu", None, 1.0, 1, mode="glu")),
    "glu packed, beta tensor": (
        lambda x: [x, torch.tensor([0.75], dtype=x.dtype)],
        lambda a: fused_act.glu(a[0], activation="swish", beta=a[1]),
        lambda a: ops.GATED(a[0], None, "swish", a[1], 1.0, -1, mode="glu")),
    "glu, fp32 beta tensor": (
        lambda x: [x, torch.randn(x.shape, dtype=x.dtype), torch.tensor(1.5)],
        lambda a: fused_act.glu(a[0], a[1], activation="swish", beta=a[2]),
        lambda a: ops.GATED(a[0], a[1], "swish", a[2], 1.0, -1, mode="glu")),
    "max": (lambda x: [x, torch.where(torch.rand(x.shape) < 0.3, x, torch.randn(x.shape,
                                                                               dtype=x.dtype))],
            lambda a: fused_act.frelu_max(*a),
            lambda a: ops.FRELU_MAX(*a, True, mode="frelu_max")),
    # p1 in x's dtype, p2 and beta fp32 (their gradients then fp32), beta per channel
    "acon_c": (lambda x: [x, torch.randn(6, dtype=x.dtype), torch.randn(1, 6, 1),
                          torch.rand(6) + 0.5],
               lambda a: fused_act.acon_c(*a),
               lambda a: ops.ACON_C(*a, mode="acon_c")),
    # Meta-ACON: a beta per (sample, channel), all in x's dtype
    "meta_acon": (lambda x: [x, torch.randn(6, dtype=x.dtype), torch.randn(6, dtype=x.dtype),
                             (torch.rand(4, 6, 1) + 0.5).to(x.dtype)],
                  lambda a: fused_act.acon_c(*a),
                  lambda a: ops.ACON_C(*a, mode="acon_c")),
    # BatchNorm in training + gelu; weight and bias in x's dtype
    "batch_norm_act": (lambda x: [x, torch.randn(6, dtype=x.dtype), torch.randn(6, dtype=x.dtype)],
                       lambda a: fused_act.batch_norm_act(a[0], None, None, a[1], a[2], True,
                                                          activation="gelu"),
                       lambda a: ops.BATCH_NORM_ACT(a[0], a[1], a[2], 1e-5, "gelu", None, 1.0,
                                                    None, None, mode="batch_norm_act")[0]),
    # BatchNorm in eval + gelu (EagerAffine); running statistics in another dtype than x's
    "batch_norm_eval": (lambda x: [x, torch.rand(6, dtype=x.dtype) + 0.5,
                                   torch.randn(6, dtype=x.dtype)],
                        lambda a: fused_act.batch_norm_act(a[0], *_eval_stats(a[0]), a[1], a[2],
                                                           False, activation="gelu"),
                        lambda a: _eval_op(*a)),
}


def _eval_stats(x):
    """Fixed running statistics (mean, variance) of 6 channels, in fp64 (fp32 for fp64 x)."""
    gen = torch.Generator().manual_seed(1)
    dtype = torch.float32 if x.dtype == torch.float64 else torch.float64
    return torch.randn(6, generator=gen, dtype=dtype), torch.rand(6, generator=gen,
                                                                  dtype=dtype) + 0.5


def _eval_op(x, w, b):
    """batch_norm_act's eval call of the op: affine_act on the folded ``_eval_stats``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rm, rv = (t.to(acc) for t in _eval_stats(x))
    return ops.AFFINE_ACT(x, rm, torch.rsqrt(rv + 1e-5) * w.to(acc), b.to(acc), "gelu", None,
                          1.0, None, None, mode="batch_norm_act")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", EAGER_NODES)
def test_cpu_eager_gated_max_and_acon_nodes(case, dtype):
    """EagerGlu (two tensors, or the halves of one along a dim), EagerMax, EagerAcon (ACON-C,
    Meta-ACON), EagerBatchNorm (training) and EagerAffine (its eval), as test_cpu_eager_node's
    EagerActivation: values and gradients the op's own bit for bit, for an expanded gradient
    too; the op's saved tensors (the inputs; the max's win code; BatchNorm's per-channel
    statistics too, or in eval its coefficients); second derivatives to every input; a batched
    gradient, create_graph and torch.func over the backward take the reference math; a strided
    unpack is read right, one of another shape refused; an in-place write after the forward is
    torch's error; a strided input keeps the op."""
    need_backend("cpu", "cpu")
    make, call, op_call = EAGER_NODES[case]
    torch.manual_seed(0)
    base = (torch.randn(4, 6, 6, dtype=torch.float64) * 4).to(dtype)
    inputs = [t.contiguous().requires_grad_() for t in make(base)]
    y, saved = saved_by(lambda: call(inputs), "auto")
    assert "Eager" in y.grad_fn.name(), y.grad_fn.name()
    if case == "max":
        assert [t.dtype for t in saved] == [torch.uint8]
    elif case == "batch_norm_eval":  # 1/std (torch's Mul, for weight), x, c, a, b, as the op
        _, want = saved_by(lambda: op_call(inputs), "cpu")
        assert len(saved) == len(want) == 5
        assert all(torch.equal(a, b) for a, b in zip(saved, want, strict=True))
        assert saved[1] is inputs[0]
    elif "batch_norm" in case:  # and the batch mean and biased variance, as the op saves them
        assert [t.data_ptr() for t in saved[:3]] == [t.data_ptr() for t in inputs]
        mean, var = reference.batch_stats(inputs[0].detach())
        torch.testing.assert_close(saved[3:], [mean, var], rtol=1e-6, atol=1e-6)
    else:
        assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in inputs]
    with fused_act.use_backend("cpu"):
        want = op_call(inputs)
    assert "Eager" not in want.grad_fn.name() and torch.equal(y, want)
    g = torch.randn(y.shape, dtype=dtype)
    for grad in (g, torch.ones((), dtype=dtype).expand(y.shape)):
        got, ref = (torch.autograd.grad(t, inputs, grad, retain_graph=True) for t in (y, want))
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    batched = torch.stack([g, 2 * g])
    got, ref = (torch.autograd.grad(t, inputs, batched, retain_graph=True,
                                    is_grads_batched=True) for t in (y, want))
    torch.testing.assert_close(got, ref)
    dx = torch.autograd.grad((y * y).sum(), inputs[0], create_graph=True)[0]
    with fused_act.use_backend("reference"):
        ref = torch.autograd.grad((want * want).sum(), inputs[0], create_graph=True)[0]
    torch.testing.assert_close(dx, ref)
    assert dx.grad_fn is not None
    # the second derivatives reach every input (BatchNorm's eval weight through torch's Mul)
    torch.testing.assert_close(
        torch.autograd.grad(dx.sum(), inputs, retain_graph=True, allow_unused=True),
        torch.autograd.grad(ref.sum(), inputs, retain_graph=True, allow_unused=True))

    def backward_under_transform(s):  # torch.func over the backward: the reference math
        return (s * torch.autograd.grad(y, inputs[0], g, retain_graph=True)[0].sum()).sum()

    torch.testing.assert_close(
        torch.func.grad(backward_under_transform)(torch.ones(2, dtype=dtype)),
        torch.autograd.grad(want, inputs[0], g, retain_graph=True)[0].sum().expand(2))

    def strided(t):  # an unpack hook that gives a saved tensor back as a strided view
        if t.dim() == 0:
            return t
        buf = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        buf[..., ::2] = t
        return buf[..., ::2]

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), strided):
        y2 = call(inputs)
    got, ref = (torch.autograd.grad(t, inputs, g, retain_graph=True) for t in (y2, want))
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), _flat):
        y2 = call(inputs)
    with pytest.raises(RuntimeError, match="came back from a saved-tensor hook"):
        torch.autograd.grad(y2, inputs, g)
    if "batch_norm" in case:  # statistics given back in another dtype than the kernel reads
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: t.detach(), lambda t: t.half() if t.dim() == 1 else t):
            y2 = call(inputs)
        with pytest.raises(RuntimeError, match="came back from a saved-tensor hook"):
            torch.autograd.grad(y2, inputs, g)
    if case != "max":  # the max saves its code, not its inputs
        y = call(inputs)
        with torch.no_grad():
            inputs[0].add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    # a strided input (ACON-C's along a spatial dim, where its parameters still fit)
    cut = (..., slice(None, None, 2)) if "acon" in case else slice(None, None, 2)
    y = call([(t.detach()[cut] if t.shape == inputs[0].shape else t).requires_grad_()
              for t in inputs])
    assert "Eager" not in y.grad_fn.name(), y.grad_fn.name()


def _node_case(case, last=6):
    """Inputs (requiring grad) and the public call of an eager node's case: "silu", "swish beta
    tensor" or one of EAGER_NODES, on fp32 (4, 6, last) data."""
    torch.manual_seed(0)
    base = torch.randn(4, 6, last) * 4
    if case in EAGER_NODES:
        make, call, _ = EAGER_NODES[case]
    else:
        make, call = ((lambda x: [x], lambda a: fused_act.silu(a[0])) if case == "silu" else
                      (lambda x: [x, torch.rand(6) + 0.5], lambda a: fused_act.swish(*a)))
    return [t.contiguous().requires_grad_() for t in make(base)], call


@pytest.mark.parametrize("case", ["silu", "swish beta tensor", *EAGER_NODES])
def test_cpu_eager_nodes_under_compiled_autograd(case):
    """The eager C++ nodes' backward under compiled autograd (a backward compiled after an
    eager forward, its gradient from another node): an opaque call of the node's backward, as
    for an autograd Function, so the gradients are the plain backward's bit for bit; where no
    gradient reaches the node, zeros of the output's shape, on a second shape too (the output's
    shape keys the capture)."""
    need_backend("cpu", "cpu")
    inputs, call = _node_case(case)
    w = torch.randn(call(inputs).shape)
    want = torch.autograd.grad((call(inputs) * w).sum(), inputs)
    torch._dynamo.reset()
    counters.clear()
    y = call(inputs)
    assert "Eager" in y.grad_fn.name(), y.grad_fn.name()
    compiler = torch.compile(backend="eager")
    with torch._dynamo.compiled_autograd._enable(compiler):
        got = torch.autograd.grad((y * w).sum(), inputs)
    assert counters["compiled_autograd"]["captures"] == 1
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for last in (6, 10):
        inputs, call = _node_case(case, last)
        with torch._dynamo.compiled_autograd._enable(compiler):
            got = torch.autograd.grad(_DropFirst.apply(call(inputs), torch.ones(3))[1].sum(),
                                      inputs, allow_unused=True)
        assert all(torch.equal(d, torch.zeros_like(t)) for d, t in zip(got, inputs, strict=True))


@pytest.mark.parametrize("case", ["silu", "swish beta tensor", *EAGER_NODES])
def test_cpu_eager_nodes_under_checkpoint_and_copying_hooks(case):
    """An eager node under checkpointing (non-reentrant: its recomputation stops at the last
    tensor packed) and under a saved-tensor hook that packs a copy: each saved tensor is packed
    once the forward has written it (the max's code), so the gradients are the plain
    backward's bit for bit."""
    need_backend("cpu", "cpu")
    inputs, call = _node_case(case)
    w = torch.randn(call(inputs).shape)
    want = torch.autograd.grad((call(inputs) * w).sum(), inputs)
    y = torch.utils.checkpoint.checkpoint(call, inputs, use_reentrant=False)
    got = torch.autograd.grad((y * w).sum(), inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        y = call(inputs)
    got = torch.autograd.grad((y * w).sum(), inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


class _DropFirst(torch.autograd.Function):
    """Passes two tensors through; its backward gives the first no gradient (None)."""

    @staticmethod
    def forward(ctx, a, b):
        return a.clone(), b.clone()

    @staticmethod
    def backward(ctx, ga, gb):
        return None, gb


@pytest.mark.parametrize("case", ["silu", "swish beta tensor", *EAGER_NODES])
def test_cpu_eager_nodes_without_a_gradient_and_creation_hooks(case):
    """Where no gradient reaches an eager node's output, its inputs get zeros, as from the op's
    node (an autograd Function's); no node but the eager one is recorded by the forward (a
    parameter's flattening records none; BatchNorm's eval records its weight's Mul too), and
    node-creation hooks, where torch has them, see it."""
    need_backend("cpu", "cpu")
    inputs, call = _node_case(case)
    other = torch.ones(3, requires_grad=True)
    y = call(inputs)
    _, c = _DropFirst.apply(y, other)
    got = torch.autograd.grad(c.sum(), inputs)
    assert all(torch.equal(d, torch.zeros_like(t)) for d, t in zip(got, inputs, strict=True))
    if hasattr(torch.autograd.graph, "node_creation_hook"):
        seen = []
        with torch.autograd.graph.node_creation_hook(lambda n: seen.append(n.name())):
            y = call(inputs)
        # BatchNorm's eval coefficient reaches weight through torch's Mul, as the op's
        mul = ["MulBackward0"] * (case == "batch_norm_eval")
        assert [n for n in seen if "Accumulate" not in n] == [*mul, y.grad_fn.name()]


@pytest.mark.parametrize("weight", ["grad", "frozen", None])
@pytest.mark.parametrize("bias", ["grad", None])
@pytest.mark.parametrize("n", [4, 1])
def test_cpu_eager_batch_norm_eval_saves_what_the_op_saves(weight, bias, n):
    """BatchNorm's eval node (EagerAffine) with a weight that takes a gradient, a frozen one or
    none, and a bias or none: a saved-tensor hook sees the op's tensors in the op's order (1/std
    only where torch's Mul of weight saves it), and the gradients are the op's bit for bit; one
    sample too (a channel's one partial slot is its total)."""
    need_backend("cpu", "cpu")
    torch.manual_seed(0)
    x = (torch.randn(n, 6, 6) * 4).to(torch.bfloat16).requires_grad_()
    w = None if weight is None else (torch.rand(6) + 0.5).requires_grad_(weight == "grad")
    b = None if bias is None else torch.randn(6).requires_grad_()
    stats = _eval_stats(x)

    def op_call():
        acc = torch.float32
        rm, rv = (t.to(acc) for t in stats)
        a = torch.rsqrt(rv + 1e-5)
        a = a if w is None else a * w
        return ops.AFFINE_ACT(x, rm, a, torch.zeros_like(a) if b is None else b, "gelu", None,
                              1.0, None, None, mode="batch_norm_act")

    y, saved = saved_by(lambda: fused_act.batch_norm_act(x, *stats, w, b, False,
                                                         activation="gelu"), "auto")
    assert y.grad_fn.name() == "EagerAffineBackward"
    want, want_saved = saved_by(op_call, "cpu")
    assert "Eager" not in want.grad_fn.name() and torch.equal(y, want)
    assert len(saved) == len(want_saved) == 4 + (weight == "grad")
    assert all(s.dtype == t.dtype and torch.equal(s, t)
               for s, t in zip(saved, want_saved, strict=True))
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    g = torch.randn(y.shape, dtype=y.dtype)
    got, ref = (torch.autograd.grad(t, leaves, g) for t in (y, want))
    assert all(torch.equal(s, t) for s, t in zip(got, ref, strict=True))
