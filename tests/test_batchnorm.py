"""BatchNorm + activation (``fused_act.batch_norm_act``, ``fused_act.nn.BatchNormAct2d``): every
backend against the eager pair BatchNorm -> activation in float64 (values, input, weight, bias
and beta gradients, running statistics over several steps, eval after training), gradcheck,
opcheck, compile, the bytes autograd saves, and bad input."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_act
from fused_act import ops

from .cases import (
    BACKENDS,
    CPU_BACKENDS,
    DEVICES,
    DTYPES,
    PARAM_RTOL,
    PARAM_RTOL_DEFAULT,
    TOL,
    need_backend,
)

# (shape, layout): NCHW tiles by rows, channels_last and (N, C) by columns, C = 1 flat; the
# larger ones cross tile boundaries with tails
SHAPES = {
    "nchw": ((4, 3, 5, 7), None),
    "channels_last": ((4, 6, 5, 7), torch.channels_last),
    "nc": ((16, 5), None),
    "one_channel": ((2, 1, 3001), None),
    "long_rows": ((3, 4, 2100), None),
    "wide_cl": ((2, 80, 3, 3), torch.channels_last),
    "strided": ((4, 3, 5, 14), "strided"),
}
_BETA32 = torch.tensor(1.702, dtype=torch.float32).item()
# (activation, its arguments, the torch function of the eager pair)
ACTS = {
    "mish": ("mish", {}, F.mish),
    "silu": ("silu", {}, F.silu),
    "gelu": ("gelu", {}, F.gelu),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}, lambda z: F.gelu(z, approximate="tanh")),
    # a float beta reaches every path rounded to fp32
    "swish": ("swish", {"beta": 1.702}, lambda z: z * torch.sigmoid(_BETA32 * z)),
    "squared_relu": ("squared_relu", {}, lambda z: F.relu(z).square()),
}


def _x(key, dtype, device, seed=0):
    shape, layout = SHAPES[key]
    gen = torch.Generator().manual_seed(seed)
    # an offset mean: the statistics must not cancel
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 + 3.0).to(dtype)
    if layout == "strided":
        x = x[..., ::2]
    elif layout is not None:
        x = x.contiguous(memory_format=layout)
    return x.to(device).requires_grad_()


def _params(c, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).float().to(device)
    b = torch.randn(c, generator=gen, dtype=torch.float64).float().to(device)
    return w.requires_grad_(), b.requires_grad_()


def _eager64(x, w, b, torch_fn, rm=None, rv=None, training=True, beta=None):
    """The eager pair in float64, with dz = d(loss)/d(BatchNorm output) for the tolerances."""
    z = F.batch_norm(x.double(), rm, rv, w.double(), b.double(), training, 0.1, 1e-5)
    zd = z.detach().requires_grad_()
    y = torch_fn(zd) if beta is None else zd * torch.sigmoid(beta.double().view(1, -1, *(
        [1] * (x.dim() - 2))) * zd)
    return z, zd, y


def _check_grads(got, want, terms, dtype, what):
    """Each gradient within the dtype's tolerance of float64, scaled by the sum of the absolute
    terms it is made of (its own magnitude for dx, whose terms cancel)."""
    for name, g, r, t in zip(("dx", "dweight", "dbias"), got, want, terms, strict=True):
        rtol = TOL[dtype][0] if name == "dx" else PARAM_RTOL.get(dtype, PARAM_RTOL_DEFAULT)
        err = (g.detach().double().cpu() - r.detach().double().cpu()).abs()
        lim = rtol * t.double().cpu() + TOL[dtype][1] + (
            torch.finfo(g.dtype).eps * r.detach().double().cpu().abs())
        assert bool((err <= lim).all()), f"{what} {name}: error {err.max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", list(SHAPES))
@pytest.mark.parametrize("act", list(ACTS))
def test_training_matches_the_eager_pair(act, key, dtype, backend_name, device):
    """Training forward and backward against BatchNorm -> activation in float64."""
    need_backend(backend_name, device)
    name, kwargs, torch_fn = ACTS[act]
    x = _x(key, dtype, device)
    c = x.shape[1]
    w, b = _params(c, device)
    with fused_act.use_backend(backend_name):
        y = fused_act.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, name, **kwargs)
    z, zd, want = _eager64(x, w, b, torch_fn)
    assert y.dtype == dtype and y.shape == x.shape
    if ops.is_dense(x):
        assert y.stride() == x.stride()
    what = f"{act}[{key}, {dtype}, {backend_name}]"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double().cpu(), want.detach().cpu(), rtol=rtol,
                               atol=atol + rtol * want.abs().max().item(), msg=what)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64).to(dtype).to(device)
    with fused_act.use_backend(backend_name):
        got = torch.autograd.grad(y, (x, w, b), g)
    (dz,) = torch.autograd.grad(want, zd, g.double())
    want_grads = torch.autograd.grad(z, (x, w, b), dz)
    dims = [d for d in range(x.dim()) if d != 1]
    xhat = (z.detach() - b.double().view(1, -1, *([1] * (x.dim() - 2)))) / w.double().view(
        1, -1, *([1] * (x.dim() - 2)))
    terms = (want_grads[0].abs() + dz.abs().amax() * 4, (dz * xhat).abs().sum(dims),
             dz.abs().sum(dims))
    _check_grads(got, want_grads, terms, dtype, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("key", ["nchw", "channels_last", "one_channel"])
def test_learnable_beta(key, backend_name, device):
    """A swish beta per channel and a one-element one: values and every gradient, training and
    eval, in float64 against the eager pair."""
    need_backend(backend_name, device)
    x = _x(key, torch.float64, device)
    c = x.shape[1]
    for beta in (torch.linspace(0.5, 2.0, c, dtype=torch.float64),
                 torch.tensor([1.3], dtype=torch.float64)):
        beta = beta.to(device).requires_grad_()
        w, b = (t.double().detach().requires_grad_() for t in _params(c, device))
        rm, rv = torch.randn(c, dtype=torch.float64).to(device), torch.rand(
            c, dtype=torch.float64).to(device) + 0.5
        for training in (True, False):
            with fused_act.use_backend(backend_name):
                y = fused_act.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1,
                                             1e-5, "swish", beta=beta)
            bx = beta.expand(c) if beta.numel() == 1 else beta
            want = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
            want = want * torch.sigmoid(bx.view(1, -1, *([1] * (x.dim() - 2))) * want)
            torch.testing.assert_close(y, want)
            g = torch.randn_like(y)
            with fused_act.use_backend(backend_name):
                got = torch.autograd.grad(y, (x, w, b, beta), g)
            for d, e in zip(got, torch.autograd.grad(want, (x, w, b, beta), g), strict=True):
                torch.testing.assert_close(d, e)


def _acon(z, p1, p2, beta):
    v = [t.view(1, -1, *([1] * (z.dim() - 2))) for t in (p1, p2, beta)]
    d = (v[0] - v[1]) * z
    return d * torch.sigmoid(v[2] * d) + v[1] * z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("key", ["nchw", "channels_last", "nc", "one_channel"])
def test_acon_c(key, backend_name, device):
    """ACON-C after BatchNorm, training and eval, in float64: values and the gradients of x,
    weight, bias, p1, p2 and beta; one channel has p1 = p2 and another beta = 0 (the sigmoid
    of 0 everywhere)."""
    need_backend(backend_name, device)
    x = _x(key, torch.float64, device)
    c = x.shape[1]
    gen = torch.Generator().manual_seed(3)
    w, b, p1, p2, beta = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(5))
    if c > 2:
        p2[1], beta[2] = p1[1], 0.0
    params = [t.to(device).requires_grad_() for t in (w, b, p1, p2, beta)]
    w, b, p1, p2, beta = params
    rm = torch.randn(c, generator=gen, dtype=torch.float64).to(device)
    rv = torch.rand(c, generator=gen, dtype=torch.float64).to(device) + 0.5
    for training in (True, False):
        with fused_act.use_backend(backend_name):
            y = fused_act.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training,
                                         activation="acon_c", p1=p1, p2=p2, beta=beta)
        want = _acon(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training), p1, p2, beta)
        torch.testing.assert_close(y, want)
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device)
        with fused_act.use_backend(backend_name):
            got = torch.autograd.grad(y, (x, *params), g)
        for d, e in zip(got, torch.autograd.grad(want, (x, *params), g), strict=True):
            torch.testing.assert_close(d, e)


def test_acon_c_module_and_checks():
    """BatchNormAct2d over AconC: the state_dict of BatchNorm2d plus act.p1, act.p2, act.beta;
    Meta-ACON is refused (its beta is computed from BatchNorm's output); missing ACON
    arguments are named."""
    m = fused_act.nn.BatchNormAct2d(3, act=fused_act.nn.AconC(3))
    assert {"act.p1", "act.p2", "act.beta", "weight", "running_var"} <= set(m.state_dict())
    y = m(torch.randn(2, 3, 4, 4))
    y.sum().backward()
    assert m.act.p1.grad is not None and m.act.beta.grad is not None
    with pytest.raises(TypeError, match="act must be"):
        fused_act.nn.BatchNormAct2d(3, act=fused_act.nn.MetaAconC(3))
    with pytest.raises(TypeError, match="takes p1, p2 and beta"):
        fused_act.batch_norm_act(torch.randn(2, 3, 4), None, None, training=True,
                                 activation="acon_c", p1=torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_module_follows_batchnorm_over_steps(backend_name, device):
    """BatchNormAct2d next to BatchNorm2d -> Mish: three training steps of SGD (outputs,
    gradients, running statistics, num_batches_tracked), then eval; also momentum=None,
    affine=False and track_running_stats=False."""
    need_backend(backend_name, device)
    for options in ({}, {"momentum": None}, {"affine": False},
                    {"track_running_stats": False}):
        ours = fused_act.nn.BatchNormAct2d(6, act="mish", **options).to(device)
        theirs = nn.Sequential(nn.BatchNorm2d(6, **options), nn.Mish()).to(device)
        theirs[0].load_state_dict(ours.state_dict())
        ours.double(), theirs.double()
        sgd = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)
               if options.get("affine", True)]
        for step in range(3):
            x = _x("channels_last", torch.float64, device, seed=step)
            with fused_act.use_backend(backend_name):
                y = ours(x)
                (y * y).sum().backward()
            want = theirs(x)
            torch.testing.assert_close(y, want, msg=f"{options} step {step}")
            (want * want).sum().backward()
            for opt in sgd:
                opt.step()
                opt.zero_grad()
        for k, v in theirs[0].state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, msg=f"{options} {k}")
        ours.eval(), theirs.eval()
        x = _x("nchw", torch.float64, device, seed=9)[:, :1].expand(4, 6, 5, 7)
        with fused_act.use_backend(backend_name):
            y = ours(x)
        torch.testing.assert_close(y, theirs(x), msg=str(options))


@pytest.mark.parametrize("backend_name", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training, backend_name):
    need_backend(backend_name, "cpu")
    x = _x("channels_last", torch.float64, "cpu")[:2, :3, :3, :4].detach().requires_grad_()
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, w, b, beta):
        return fused_act.batch_norm_act(x, None if training else rm, None if training else rv,
                                        w, b, training, 0.1, 1e-5, "swish", beta=beta)

    with fused_act.use_backend(backend_name):
        assert torch.autograd.gradcheck(f, (x, w, b, beta))
        assert torch.autograd.gradgradcheck(f, (x, w, b, beta))


@pytest.mark.parametrize("backend_name", ["triton", "cpu", "reference"])
def test_opcheck(backend_name):
    need_backend(backend_name, "cpu")
    x = _x("nchw", torch.float32, "cpu").detach().requires_grad_()
    w, b = _params(3, "cpu")
    c, a = torch.randn(3), torch.rand(3).requires_grad_()
    p1, p2, beta = (torch.rand(3).requires_grad_() for _ in range(3))
    cases = [(ops.batch_norm_act_op, (x, w, b, 1e-5, "mish", None, 1.0, None, None,
                                      backend_name)),
             (ops.affine_act_op, (x, c, a, b, "gelu", None, 1.0, None, None, backend_name)),
             (ops.batch_norm_act_op, (x, w, b, 1e-5, "acon_c", beta, 1.0, p1, p2,
                                      backend_name))]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("mode", ["opaque", "decompose"])
def test_compile_fullgraph(mode, monkeypatch):
    """The module compiled with fullgraph in training and eval: the eager module's values,
    gradients and running statistics; the opaque graph holds the fused ops."""
    monkeypatch.setattr(fused_act.config, "compile_mode", {"batch_norm_act": mode})
    torch._dynamo.reset()
    # float64: on CPU the eager module is torch's pair, the compiled one the fused op
    ours = fused_act.nn.BatchNormAct2d(6, act="silu").double()
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        ours.train(training), eager.train(training)
        x = _x("channels_last", torch.float64, "cpu")
        y = compiled(x)
        want = eager(x)
        torch.testing.assert_close(y, want)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, (x, ours.weight), g),
                                   torch.autograd.grad(want, (x, eager.weight), g))
        for k, v in eager.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v)


def test_cpu_takes_torch_pair(monkeypatch):
    """Eager CPU calls run torch's BatchNorm2d then the activation's function (the activation
    module's hooks do not run, as on the fused path), in training and eval, with and without
    a graph, under every backend but "triton", which runs the fused op on CPU tensors (the
    interpreter).  Each as the eager pair: values, gradients, running statistics
    (momentum=None)."""
    need_backend("cpu", "cpu")
    calls = []
    real = fused_act.functional.batch_norm_act
    monkeypatch.setattr(fused_act.functional, "batch_norm_act",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [(b, training, grad, False) for b in ("auto", "cpu", "reference")
             for training in (True, False) for grad in (True, False)]
    if fused_act.backend.interpreting():
        cases += [("triton", True, True, True), ("triton", False, False, True)]
    for backend_name, training, grad, fused in cases:
        torch.manual_seed(0)
        ours = fused_act.nn.BatchNormAct2d(4, act="mish", momentum=None).double()
        theirs = nn.Sequential(nn.BatchNorm2d(4, momentum=None), nn.Mish()).double()
        ours.train(training), theirs.train(training)
        theirs[0].load_state_dict(ours.state_dict())
        hooked, calls[:] = [], []
        ours.act.register_forward_hook(lambda *a, hooked=hooked: hooked.append(1))
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64).mul(3).add(1).requires_grad_(grad)
        what = f"{backend_name} training={training} grad={grad}"
        with fused_act.use_backend(backend_name), torch.set_grad_enabled(grad):
            y = ours(x)
        want = theirs(x)
        assert not hooked and bool(calls) == fused, what
        if grad:
            name = y.grad_fn.name()
            assert (name in ("BatchNormActBackward", "AffineActBackward")) == fused, (what, name)
            g = torch.randn_like(y)
            torch.testing.assert_close(torch.autograd.grad(y, (x, ours.weight), g),
                                       torch.autograd.grad(want, (x, theirs[0].weight), g),
                                       msg=what)
        else:
            assert y.grad_fn is None
        torch.testing.assert_close(y, want, msg=what)
        for k, v in theirs[0].state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, msg=f"{what} {k}")


@pytest.mark.parametrize("training", [True, False])
def test_function_runs_the_fused_op(training, monkeypatch):
    """``fused_act.batch_norm_act`` on CPU runs the fused op (the eager nodes under "auto" and
    "cpu", which save what the op saves) in training and eval, under every backend, for fp32,
    fp64 and bf16 x, channels_last, (N, C) and strided x, and mixed dtypes: values, gradients
    and running statistics as the float64 pair; in inference a dense x under "auto" and "cpu"
    takes one C++ call, the op's kernel bit for bit; and under non-reentrant checkpointing with
    the recomputation under another backend, the unsplit run's gradients."""
    need_backend("cpu", "cpu")
    from torch.utils.checkpoint import checkpoint
    eager = fused_act.ops.eager_batch_norm
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    backends = ["auto", "cpu", "reference"] + ["triton"] * fused_act.backend.interpreting()
    cl, nc = torch.channels_last, (20, 3)  # layouts whose statistics torch lets cancel
    cases = [(f32, f32, 5), (f64, f64, 5), (bf16, bf16, 5), (bf16, f32, 5), (f32, f64, 5),
             (f32, f32, cl), (f32, f32, nc), (f32, f32, "strided")]
    for (dtype, p_dtype, width), backend_name in itertools.product(cases, backends):
        last = width if isinstance(width, int) else 10 if width == "strided" else 5
        x = torch.rand(nc if width == nc else (4, 3, 5, last),
                       generator=gen, dtype=f64).mul(6).sub(2).to(dtype)
        x = x[..., ::2] if width == "strided" else x.contiguous(
            memory_format=cl if width == cl else torch.contiguous_format)
        w, b, rm, rv = (torch.rand(3, generator=gen, dtype=f64) + s for s in (0.5, -0.5, -0.5, 1))
        stats = [t.to(p_dtype) for t in (rm, rv)]
        ps = [t.to(p_dtype).requires_grad_() for t in (w, b)]
        xs = x.requires_grad_()
        with fused_act.use_backend(backend_name):
            y = fused_act.batch_norm_act(xs, *stats, *ps, training, 0.1, 1e-5, "mish")
        want_stats = [t.to(p_dtype).double() for t in (rm, rv)]
        wd, bd = (p.detach().double().requires_grad_() for p in ps)
        xd = x.detach().double().requires_grad_()
        want = F.mish(F.batch_norm(xd, *want_stats, wd, bd, training, 0.1, 1e-5))
        what = f"{dtype} params {p_dtype} width {width} {backend_name}"
        fused_nodes = ("BatchNormActBackward", "AffineActBackward", "EagerBatchNormBackward",
                       "EagerAffineBackward")
        assert y.grad_fn.name() in fused_nodes, what
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(y.double(), want, rtol=rtol, atol=atol * 4, msg=what)
        g = torch.randn(x.shape, generator=gen, dtype=f64)
        got = torch.autograd.grad(y, (xs, *ps), g.to(dtype))
        for o, t in zip(got, torch.autograd.grad(want, (xd, wd, bd), g), strict=True):
            # dx's terms cancel, and dweight and dbias sum many: a bound scaled by the largest
            err = (o.double() - t).abs().max() / t.abs().max()
            assert err <= 8 * torch.finfo(dtype).eps, (what, err.item())
        if not training:  # inference: under "auto" and "cpu" a dense x takes one C++ call
            took = []
            with monkeypatch.context() as m, torch.no_grad(), fused_act.use_backend(
                    backend_name):
                m.setattr(fused_act.ops, "eager_batch_norm",
                          lambda *a, took=took: took.append(eager(*a)) or took[-1])
                y0 = fused_act.batch_norm_act(x.detach(), *stats, *ps, False, 0.1, 1e-5, "mish")
            assert y0.grad_fn is None
            torch.testing.assert_close(y0.double(), want, rtol=rtol, atol=atol * 4, msg=what)
            kernel = backend_name in ("auto", "cpu") and width != "strided"
            assert bool(took and took[0] is not None) == kernel, what
            if kernel:  # the op's kernel on the op's coefficients
                assert torch.equal(y0, y), what
        tol = torch.finfo(p_dtype).eps * 4
        for got_stat, ref in zip(stats, want_stats, strict=True):
            torch.testing.assert_close(got_stat.double(), ref, rtol=tol, atol=tol, msg=what)
        if backend_name == "triton":
            continue
        split = []
        for first, second in (("auto", "cpu"), ("cpu", "reference")):
            with fused_act.use_backend(first):
                y2 = checkpoint(fused_act.batch_norm_act, xs, *stats, *ps, training, 0.1, 1e-5,
                                "mish", use_reentrant=False)
            with fused_act.use_backend(second):
                split.append(torch.autograd.grad(y2, (xs, *ps), g.to(dtype)))
        for s in split:  # the recomputation's backend runs the backward: to rounding
            for o, t in zip(s, got, strict=True):
                err = (o - t).double().abs().max() / t.double().abs().max()
                assert err <= 8 * torch.finfo(dtype).eps, (what, "checkpointed", err.item())


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "n_c_1_1"])
def test_function_arguments_as_torch_takes_them(layout):
    """What torch's BatchNorm takes, the fused op takes alike (contiguous NCHW, channels_last
    and (N, C, 1, 1)): a weight and bias of C values in any shape
    (the fused op once broadcast a (1, C, 1, 1) weight to C x C values: wrong outputs), a
    truthy ``training``, running statistics that require grad (eval), and vmap over members
    with batched running statistics, each as the float64 pair."""
    need_backend("cpu", "cpu")
    gen = torch.Generator().manual_seed(5)
    shape = (4, 3, 1, 1) if layout == "n_c_1_1" else (4, 3, 5, 6)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).mul(2).add(1).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5

    def want(training, rm=rm, rv=rv, x=x):
        return F.mish(F.batch_norm(x.double(), rm.double(), rv.double(), w.double(),
                                   b.double(), training, 0.1, 1e-5))

    for training in (1, 0):
        for ws, bs in (((1, 3, 1, 1), (3, 1)), ((1, 3), (1, 3, 1))):
            stats = [rm.clone(), rv.clone()]
            y = fused_act.batch_norm_act(x, *stats, w.reshape(ws), b.reshape(bs), training,
                                         0.1, 1e-5, "mish")
            torch.testing.assert_close(y.double(), want(bool(training)), rtol=1e-5, atol=1e-5,
                                       msg=f"{layout} {training} {ws} {bs}")
    stats = [t.clone().requires_grad_() for t in (rm, rv)]
    y = fused_act.batch_norm_act(x, *stats, w, b, False, 0.1, 1e-5, "mish")
    torch.testing.assert_close(y.double(), want(False), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.sum(), stats)
    ref = [t.double().requires_grad_() for t in (rm, rv)]  # eval's formula: torch refuses these

    def channel(t):
        return t.double().view(1, 3, 1, 1)

    z = (x.double() - channel(ref[0])) * torch.rsqrt(channel(ref[1]) + 1e-5) * channel(w)
    torch.testing.assert_close(
        grads, torch.autograd.grad(F.mish(z + channel(b)).sum(), ref), rtol=1e-4, atol=1e-5,
        check_dtype=False)
    xs = torch.stack([x, x * 2 + 1])  # two members of an ensemble, in training
    if layout == "channels_last":
        xs = xs.contiguous(memory_format=torch.channels_last_3d)
    rms, rvs = torch.stack([rm, rm * 2]), torch.stack([rv, rv * 2])
    ys = torch.func.vmap(lambda x, rm, rv: fused_act.batch_norm_act(
        x, rm, rv, w, b, True, 0.1, 1e-5, "mish"))(xs, rms, rvs)
    for i in range(2):
        stats = [(rm * (i + 1)).double(), (rv * (i + 1)).double()]  # updated as one member's
        torch.testing.assert_close(ys[i].double(), want(True, *stats, x=xs[i]), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close((rms[i].double(), rvs[i].double()), tuple(stats),
                                   rtol=1e-5, atol=1e-6)


def test_checkpoint_recomputes_under_another_backend():
    """Non-reentrant activation checkpointing of BatchNormAct2d with the forward under one
    backend and the backward (which recomputes the forward) under another: the gradients of
    the unsplit run."""
    need_backend("cpu", "cpu")
    from torch.utils.checkpoint import checkpoint
    for first, second in (("cpu", "auto"), ("auto", "cpu"), ("auto", "reference")):
        torch.manual_seed(0)
        m = fused_act.nn.BatchNormAct2d(4, act="mish").double()
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        ref = copy.deepcopy(m)
        want = torch.autograd.grad(ref(x).square().sum(), (x, ref.weight))
        with fused_act.use_backend(first):
            y = checkpoint(m, x, use_reentrant=False)
        with fused_act.use_backend(second):
            got = torch.autograd.grad(y.square().sum(), (x, m.weight))
        torch.testing.assert_close(got, want, msg=f"{first} then {second}")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_eval_backward_reads_the_forward_statistics(backend_name):
    """An eval forward, then a training call that updates the same running statistics in
    place (which bumps no version counter, as torch's), then the eval backward: the gradients
    of the statistics the forward read, bit for bit (the op kept the running mean itself and
    read the updated one)."""
    need_backend(backend_name, "cpu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=gen).requires_grad_()
    w = (torch.rand(3, generator=gen) + 0.5).requires_grad_()
    stats = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    g = torch.randn(x.shape, generator=gen)
    got = []
    for update in (False, True):
        rm, rv = (t.clone() for t in stats)
        with fused_act.use_backend(backend_name):
            y = fused_act.batch_norm_act(x, rm, rv, w, None, False, 0.1, 1e-5, "mish")
            if update:
                fused_act.batch_norm_act(torch.randn(x.shape, generator=gen) * 5 + 3, rm, rv,
                                         None, None, True, 0.5, 1e-5, "mish")
                assert not torch.equal(rm, stats[0])
            got.append(torch.autograd.grad(y, (x, w), g))
    assert all(torch.equal(a, b) for a, b in zip(*got, strict=True))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_bf16_autocast_is_as_close_as_torch(backend_name):
    """conv -> BatchNormAct2d under CPU bf16 autocast, training: the output and the gradients
    of x, the conv weight and BatchNorm's weight and bias are as close to float64's as torch's
    conv -> BatchNorm2d -> Mish under the same autocast (mean error within 1.25x of torch's)."""
    need_backend(backend_name, "cpu")
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16).mul(2).add(0.5).requires_grad_()
    ref = _conv_bn_act(False, 8)
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5), ref[1].bias.uniform_(-0.5, 0.5)
    fused = nn.Sequential(ref[0], fused_act.nn.BatchNormAct2d(8, act="mish"))
    fused[1].load_state_dict(ref[1].state_dict())
    truth = copy.deepcopy(ref).double()

    def run(model, dtype, autocast):
        model = copy.deepcopy(model).to(dtype)
        xi = x.detach().to(dtype).requires_grad_()
        with fused_act.use_backend(backend_name), torch.autocast("cpu", torch.bfloat16,
                                                                  enabled=autocast):
            y = model(xi)
            y.float().square().mean().backward()
        bn = model[1]
        return [t.double() for t in (y, xi.grad, model[0].weight.grad, bn.weight.grad,
                                     bn.bias.grad)]

    want = run(truth, torch.float64, False)
    ours, theirs = run(fused, torch.float32, True), run(ref, torch.float32, True)
    for what, o, t, w in zip(("y", "dx", "dconv", "dweight", "dbias"), ours, theirs, want,
                             strict=True):
        err, torch_err = (o - w).abs().mean().item(), (t - w).abs().mean().item()
        assert err <= 1.25 * torch_err, (what, err, torch_err)


def _conv_bn_act(fused: bool, channels: int = 64) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if fused:
        return nn.Sequential(conv, fused_act.nn.BatchNormAct2d(channels, act="mish"))
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.Mish())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes(dtype, device):
    """conv -> BatchNorm -> Mish (8x64x32x32): the fused block saves at most 0.70x the eager
    block's bytes (the conv's input and the BatchNorm input; never BatchNorm's output).  On
    CPU tensors the module fuses under backend "triton" only (the interpreter)."""
    need_backend("triton", device)
    x = torch.randn(8, 64, 32, 32, dtype=dtype, device=device).requires_grad_()

    def saved(m):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                fused_act.use_backend("triton"):
            m.to(device, dtype)(x)
        return sum(seen.values())

    eager, fused = saved(_conv_bn_act(False)), saved(_conv_bn_act(True))
    assert fused <= 0.70 * eager, (fused, eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout", [None, torch.channels_last])
def test_statistics_do_not_cancel(layout, backend_name, device):
    """fp32 statistics of channels far from 0 (mean 1e3) with an outlier first (-1e3): the mean,
    the running variance and y as accurate as fp32 allows, against float64."""
    need_backend(backend_name, device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64) + 1e3
    x[0, :, 0, 0] = -1e3
    x = x.contiguous(memory_format=layout or torch.contiguous_format)
    stats = [torch.zeros(3, device=device), torch.ones(3, device=device)]
    with fused_act.use_backend(backend_name):
        y = fused_act.batch_norm_act(x.float().to(device), *stats, None, None, True, 1.0)
    want_stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    want = F.silu(F.batch_norm(x, *want_stats, None, None, True, 1.0))
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5)
    for got, exact in zip(stats, want_stats, strict=True):
        torch.testing.assert_close(got.double().cpu(), exact, rtol=1e-5, atol=0)


def test_statistics_and_sums_over_millions_of_slots():
    """A channel of 2^24 values and more, in rows of 2049 (a tile's slot of 2048 and one of 1
    each): the CPU kernels' merged count, mean and variance and the backward's per-channel sums
    as accurate as fp32 allows against float64 (summed in fp32 one slot after another, the
    count stopped being exact, the running mean was 5e-4 off and dweight 3e-5)."""
    need_backend("cpu", "cpu")
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(8200, 2, 2049, generator=gen) + 3).requires_grad_()
    w = torch.ones(2, requires_grad=True)
    stats = [torch.zeros(2), torch.ones(2)]
    y = fused_act.batch_norm_act(x, *stats, w, None, True, 1.0)
    g = torch.randn(x.shape, generator=gen) + 2
    dx, dw = torch.autograd.grad(y, (x, w), g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want_stats = [torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    want = F.silu(F.batch_norm(xd, *want_stats, wd, None, True, 1.0))
    for got, exact in zip(stats, want_stats, strict=True):
        torch.testing.assert_close(got.double(), exact, rtol=2e-6, atol=0)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    dxd, dwd = torch.autograd.grad(want, (xd, wd), g.double())
    assert (dw.double() - dwd).abs().max() / dwd.abs().max() < 2e-6
    assert (dx.double() - dxd).abs().max() / dxd.abs().max() < 2e-6


def test_edge_values():
    """inf and NaN in a channel make that channel's statistics NaN, as torch's do; the other
    channels are untouched, and no finite channel gets a NaN."""
    x = _x("nchw", torch.float32, "cpu").detach()
    x[0, 1, 0, 0] = float("inf")
    x[1, 2, 3, 3] = float("nan")
    for backend_name in ("triton", "cpu", "reference"):
        need_backend(backend_name, "cpu")
        with fused_act.use_backend(backend_name):
            y = fused_act.batch_norm_act(x, None, None, training=True, activation="mish")
        want = F.mish(F.batch_norm(x, None, None, training=True))
        torch.testing.assert_close(y, want, equal_nan=True)
        assert y[:, 0].isfinite().all() and y[:, 1:].isnan().all()


def test_bad_input():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused_act.batch_norm_act(torch.randn(1, 3, 1), None, None, training=True)
    for eps in (0.0, -1.0, float("nan")):  # as torch's, in training
        with pytest.raises(ValueError, match="eps must be positive"):
            fused_act.batch_norm_act(x, None, None, training=True, eps=eps)
    with pytest.raises(ValueError, match="weight must have C=3"):
        fused_act.batch_norm_act(x, None, None, torch.ones(4), training=True)
    for shape in ((1, 3, 1), (3, 1)):  # updated in place: (C,), as torch's BatchNorm takes
        with pytest.raises(ValueError, match="running_mean must have shape"):
            fused_act.batch_norm_act(x, torch.zeros(shape), torch.ones(3), training=True)
    with pytest.raises(TypeError, match="x must be"):
        fused_act.batch_norm_act(x.int(), None, None, training=True)
    with pytest.raises(ValueError, match="unknown activation"):
        fused_act.batch_norm_act(x, None, None, training=True, activation="relu6")
    with pytest.raises(ValueError, match="both be None or neither"):
        fused_act.batch_norm_act(x, torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="defined in evaluation mode"):
        fused_act.batch_norm_act(x, None, None)
    with pytest.raises(TypeError, match="act must be"):
        fused_act.nn.BatchNormAct2d(3, act=nn.ReLU())
    with pytest.raises(ValueError, match="act 'relu'"):
        fused_act.nn.BatchNormAct2d(3, act="relu")
    with pytest.raises(ValueError, match="expected 4D input"):
        fused_act.nn.BatchNormAct2d(3)(x)


def test_dtensor_is_refused():
    """A DTensor would be normalised by each shard's statistics: refused, naming SyncBatchNorm
    (a fake process group of two: nothing runs across processes)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        x = distribute_tensor(torch.randn(4, 3, 5), DeviceMesh("cpu", [0, 1]), [Shard(0)])
        with pytest.raises(TypeError, match="SyncBatchNorm"):
            fused_act.batch_norm_act(x, None, None, training=True)
    finally:
        dist.destroy_process_group()


def test_empty_batch():
    """An empty batch gives an empty result and leaves the running statistics, as torch's;
    no channels at all runs forward and backward."""
    m = fused_act.nn.BatchNormAct2d(3, act="gelu")
    x = torch.empty(0, 3, 4, 4)
    assert m(x).shape == x.shape
    assert m.running_mean.eq(0).all() and m.running_var.eq(1).all()
    x = torch.randn(2, 0, 4, 4, requires_grad=True)
    fused_act.batch_norm_act(x, torch.zeros(0), torch.ones(0), training=True).sum().backward()
    assert x.grad.shape == x.shape


# ---- patch_batchnorm_acts ---------------------------------------------------------------------

def _train_step_matches(model, ref, x):
    """One training forward+backward and an eval forward of ``model`` and ``ref`` (float64)
    agree: outputs, every parameter gradient, the state_dicts (keys and running statistics)."""
    for training in (True, False):
        model.train(training), ref.train(training)
        y, want = model(x), ref(x)
        torch.testing.assert_close(y, want)
        if training:
            y.square().sum().backward()
            want.square().sum().backward()
            ours = dict(model.named_parameters())
            # a gradient that is 0 but for rounding (a bias before another BatchNorm) is judged
            # against the model's largest
            scale = max(p.grad.abs().max().item() for p in ref.parameters())
            for k, p in ref.named_parameters():
                torch.testing.assert_close(ours[k].grad, p.grad, rtol=1e-7, atol=1e-10 * scale)
    assert model.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


@pytest.mark.parametrize("name,kwargs,swaps", [
    ("efficientnet_b0", {}, 33),  # BatchNormAct2d with SiLU throughout
    ("resnet10t", {"act_layer": "mish"}, 2),  # the deep stem's Sequential pairs
    ("regnetx_002", {}, 0),  # ReLU: nothing fused_act computes
])
def test_timm_models(name, kwargs, swaps):
    """replace_activations fuses timm's BatchNormAct2d and its Sequential pairs, and back."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).double()
    ref = copy.deepcopy(model)
    report = fused_act.replace_activations(model)
    fused = [s for s in report.swapped if s.new.startswith("fused_act.nn.BatchNormAct2d")]
    assert len(fused) == swaps, report
    assert sum(isinstance(m, fused_act.nn.BatchNormAct2d) for m in model.modules()) == swaps
    _train_step_matches(model, ref, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert fused_act.replace_activations(model).swapped == []  # again: nothing more
    fused_act.restore_activations(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    _train_step_matches(model, ref, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_torchvision_conv_norm_activation():
    """torchvision's Conv2dNormActivation (a Sequential) with SiLU: conv, fused pair, Identity;
    EfficientNet's blocks, swapped and restored, by patch_batchnorm_acts and by
    replace_activations (following include / exclude)."""
    ops_ = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    model = nn.Sequential(ops_.Conv2dNormActivation(3, 8, activation_layer=nn.SiLU),
                          ops_.Conv2dNormActivation(8, 8, activation_layer=nn.Mish),
                          ops_.Conv2dNormActivation(8, 8, activation_layer=nn.ReLU)).double()
    ref = copy.deepcopy(model)
    report = fused_act.patch_batchnorm_acts(model)
    assert [s.name for s in report.swapped] == ["0.1", "1.1"]
    assert isinstance(model[0][2], nn.Identity) and isinstance(model[2][2], nn.ReLU)
    _train_step_matches(model, ref, torch.randn(2, 3, 9, 9, dtype=torch.float64))
    assert sorted(fused_act.restore_activations(model)) == ["0.1", "0.2", "1.1", "1.2"]
    assert isinstance(model[0][1], nn.BatchNorm2d) and isinstance(model[0][2], nn.SiLU)
    # replace_activations fuses the same pairs, unless BatchNorm or the activation is excluded
    # or not included
    for options, pairs in (({}, ["0.1", "1.1"]), ({"exclude": ["BatchNorm2d"]}, []),
                           ({"exclude": ["1.2"]}, ["0.1"]), ({"include": ["SiLU"]}, []),
                           ({"include": ["BatchNorm2d", "Mish"]}, ["1.1"])):
        report = fused_act.replace_activations(model, **options)
        got = [s.name for s in report.swapped if "BatchNormAct2d" in s.new]
        assert got == pairs, (options, report)
        _train_step_matches(model, ref, torch.randn(2, 3, 9, 9, dtype=torch.float64))
        fused_act.restore_activations(model)
        assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]


def test_pairs_left_with_a_reason():
    """A shared activation, one with parameters, hooks, a drop layer in timm's module, and an
    already fused activation after BatchNorm (fused into the pair, not run twice)."""
    shared = nn.SiLU()
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda *a: None)
    model = nn.Sequential(nn.BatchNorm2d(4), shared, nn.BatchNorm2d(4), shared,
                          nn.BatchNorm2d(4), fused_act.nn.Swish(learnable=True),
                          hooked, nn.Mish(), nn.BatchNorm2d(4), fused_act.nn.Mish()).double()
    ref = copy.deepcopy(model)
    report = fused_act.patch_batchnorm_acts(model)
    reasons = {x.name: x.reason for x in report.left}
    assert "shared" in reasons["0"] and "shared" in reasons["2"]
    assert "tensors of its own" in reasons["4"]
    assert "hooks" in reasons["6"]
    assert [s.name for s in report.swapped] == ["8"] and isinstance(model[9], nn.Identity)
    _train_step_matches(model, ref, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    sync = nn.Sequential(nn.SyncBatchNorm(4), nn.SiLU())  # statistics across processes
    assert fused_act.patch_batchnorm_acts(sync).swapped == []
    timm = pytest.importorskip("timm")
    block = timm.layers.BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout)
    report = fused_act.patch_batchnorm_acts(nn.Sequential(block))
    assert "drop layer" in report.left[0].reason
    # timm's module is a BatchNorm2d: excluding that keeps it apart
    block = nn.Sequential(timm.layers.BatchNormAct2d(4, act_layer=nn.SiLU))
    fused_act.replace_activations(block, exclude=["BatchNorm2d"])
    assert not any(isinstance(m, fused_act.nn.BatchNormAct2d) for m in block.modules())

    class MySiLU(nn.SiLU):  # an unfamiliar class: fused after the probe on (N, C, H, W)
        pass

    block = nn.Sequential(timm.layers.BatchNormAct2d(4, act_layer=MySiLU)).double()
    ref = copy.deepcopy(block)
    report = fused_act.replace_activations(block)
    assert [(s.name, s.probed) for s in report.swapped] == [("0", True)], report
    _train_step_matches(block, ref, torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_export_and_fx():
    """torch.export holds affine_act in eval and batch_norm_act in training (running statistics
    updated by the exported program); torch.fx records one call of the public function."""
    for training in (False, True):
        m = nn.Sequential(nn.Conv2d(3, 4, 3), fused_act.nn.BatchNormAct2d(4, act="mish"))
        m.train(training)
        twin = copy.deepcopy(m)
        x = torch.randn(2, 3, 8, 8)
        ep = torch.export.export(twin, (x,))
        targets = {str(n.target) for n in ep.graph.nodes if "fused_act" in str(n.target)}
        assert targets == {f"fused_act.{'batch_norm_act' if training else 'affine_act'}.default"}
        want = m(x)
        torch.testing.assert_close(ep.module()(x), want)


def test_fx_records_the_module():
    """torch.fx records BatchNormAct2d as one module call, as BatchNorm2d: the traced graph
    follows train/eval and counts batches (momentum None: a cumulative average), as torch's
    pair does."""
    def pair(fused):
        torch.manual_seed(0)
        bn = fused_act.nn.BatchNormAct2d(3, act="mish", momentum=None) if fused else \
            nn.Sequential(nn.BatchNorm2d(3, momentum=None), nn.Mish())
        return torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), bn))

    ours, theirs = pair(True), pair(False)
    assert [n.op for n in ours.graph.nodes].count("call_module") == 2
    for step in range(3):
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(step)) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    assert ours.get_submodule("1").num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.get_submodule("1").running_var,
                               theirs.get_submodule("1.0").running_var)
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
