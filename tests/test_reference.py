"""The oracle itself: reference math against PyTorch's own functions and autograd in float64,
and its fp32 path against its float64 path."""

import math

import pytest
import torch

from fused_act import reference, registry

from .cases import TOL, assert_near


def _x(shape=(4, 6, 5, 7), scale=6.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _autograd(fn, *inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return y.detach(), torch.autograd.grad(y, inputs, grad)


# every activation of the registry without a beta: (forward, backward, torch's function)
ELEMENTWISE = {
    s.name: (lambda x, s=s: s.forward(x, 1.0), lambda g, x, s=s: s.backward(g, x, 1.0, False)[0],
             s.torch_fn)
    for s in registry.SPECS.values() if not s.beta}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_vs_torch_float64(name):
    fwd, bwd, torch_fn = ELEMENTWISE[name]
    x, g = _x(), _x(seed=1)
    y, (dx,) = _autograd(torch_fn, x, grad=g)
    assert_near(fwd(x), y, torch.float64, name)
    assert_near(bwd(g, x), dx, torch.float64, name + " backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_low_precision_vs_float64(name, dtype):
    fwd, bwd, _ = ELEMENTWISE[name]
    x, g = _x().to(dtype), _x(seed=1).to(dtype)
    assert fwd(x).dtype == dtype
    assert_near(fwd(x), fwd(x.double()), dtype, name)
    assert_near(bwd(g, x), bwd(g.double(), x.double()), dtype, name + " backward")


@pytest.mark.parametrize("beta_shape", [(1,), (6,), (1, 6, 1, 1)])
def test_swish_vs_autograd(beta_shape):
    x, g = _x(), _x(seed=1)
    beta = torch.linspace(-2, 2, 6, dtype=torch.float64)[: torch.Size(beta_shape).numel()]
    beta = beta.reshape(beta_shape)

    def plain(x, b):
        b = b.reshape(-1) if b.numel() == 1 else b.reshape(1, 6, 1, 1)
        return x * torch.sigmoid(b * x)

    y, (dx, db) = _autograd(plain, x, beta, grad=g)
    assert_near(reference.swish(x, beta), y, torch.float64, "swish")
    rdx, rdb = reference.swish_backward(g, x, beta, need_dbeta=True)
    assert rdb.shape == beta.shape
    assert_near(rdx, dx, torch.float64, "swish dx")
    torch.testing.assert_close(rdb, db, rtol=1e-10, atol=1e-10)


def _acon_plain(x, p1, p2, beta):
    def shape(p):
        if p.dim() >= 2 and p.shape[0] == x.shape[0] and p.shape[0] != 1:
            return p.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
        return p.reshape(1, x.shape[1], *([1] * (x.dim() - 2)))
    d = (shape(p1) - shape(p2)) * x
    return d * torch.sigmoid(shape(beta) * d) + shape(p2) * x


@pytest.mark.parametrize("beta_shape", ["channel", "channel_4d", "sample", "sample_4d"])
@pytest.mark.parametrize("x_shape", [(4, 6, 5, 7), (4, 6)])
def test_acon_c_vs_autograd(beta_shape, x_shape):
    x, g = _x(x_shape, 3.0), _x(x_shape, seed=1)
    n, c = x_shape[:2]
    ones = [1] * (len(x_shape) - 2)
    p1 = torch.randn(c, dtype=torch.float64)
    p2 = torch.randn(1, c, *ones, dtype=torch.float64)
    beta = {"channel": torch.rand(c), "channel_4d": torch.rand(1, c, *ones),
            "sample": torch.rand(n, c), "sample_4d": torch.rand(n, c, *ones)}[beta_shape]
    beta = beta.double() * 2
    y, grads = _autograd(_acon_plain, x, p1, p2, beta, grad=g)
    assert_near(reference.acon_c(x, p1, p2, beta), y, torch.float64, "acon_c")
    ours = reference.acon_c_backward(g, x, p1, p2, beta)
    for got, want, p in zip(ours, grads, (x, p1, p2, beta), strict=True):
        assert got.shape == p.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_autograd_through_the_math_where_a_factor_rounds_to_zero(dtype):
    """torch.func, forward AD and compile mode "decompose" differentiate the reference math: its
    zero-limit products must keep their derivatives where a factor rounds to exactly 0 at a
    finite x (ACON-C's a sigma(z) + p2 at one element in 67M on a GPU; swish's beta at 0), as
    the explicit backward (eager, kernels) has them; +-inf and NaN still give no NaN."""
    import fused_act
    x = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    s1 = reference.sigmoid_pair(torch.tensor(1.0, dtype=dtype))[0]
    # a = p1 - p2 = 1, beta = 1, p2 = -sigma(1): a sigma(z) + p2 is exactly 0 at x = 1
    p1, p2, beta = (torch.full((1, 3), v, dtype=dtype) for v in (1.0 - s1, -s1, 1.0))
    g = torch.ones_like(x).reshape(1, 3)
    xr = x.reshape(1, 3)
    assert float(reference.acon_c(xr, p1, p2, beta)[0, 0]) == 0.0
    with fused_act.use_backend("reference"):
        by_func = torch.func.grad(lambda *a: fused_act.acon_c(*a).sum(), argnums=(0, 1, 2, 3))(
            xr, p1, p2, beta)
    explicit = reference.acon_c_backward(g, xr, p1, p2, beta)
    assert float(explicit[0][0, 0]) != 0.0  # sigma'(1) = 0.197: the term a zero branch drops
    for got, want in zip(by_func, explicit, strict=True):
        torch.testing.assert_close(got, want.reshape(got.shape))

    b0 = torch.zeros(1, dtype=dtype)
    with fused_act.use_backend("reference"):
        dx, db = torch.func.grad(lambda x, b: fused_act.swish(x, b).sum(), argnums=(0, 1))(x, b0)
    rdx, rdb = reference.swish_backward(torch.ones_like(x), x, b0, need_dbeta=True)
    assert float(rdb) == pytest.approx(float((x * x).sum()) / 4)  # x^2 sigma'(0) per element
    torch.testing.assert_close((dx, db), (rdx, rdb))

    edge = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0], dtype=dtype)
    c = torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=dtype, requires_grad=True)
    e = edge.clone().requires_grad_()
    y = reference._mul_or_zero(c, e)
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0] and not torch.signbit(y[:3]).any()
    dc, de = torch.autograd.grad(y.sum(), (c, e))
    assert not dc.isnan().any() and not de.isnan().any()


def test_frelu_max_vs_torch_maximum():
    x = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0, float("nan"), -0.0], dtype=torch.float64)
    t = torch.tensor([2.0, 2.0, 1.0, 1.0, float("nan"), float("nan"), 0.0], dtype=torch.float64)
    g = torch.arange(1.0, 8.0, dtype=torch.float64)
    y, (dx, dt) = _autograd(torch.maximum, x, t, grad=g)
    torch.testing.assert_close(reference.frelu_max(x, t), y, equal_nan=True)
    rdx, rdt = reference.frelu_max_backward(g, x, t)
    torch.testing.assert_close(rdx, dx)
    torch.testing.assert_close(rdt, dt)


def test_limits_documented():
    """At +-inf the reference returns the mathematical limits its spec declares (PyTorch is not
    consistent there), and the declared limits are those of PyTorch's own function: its value
    and derivative at +-1e6 in float64 are the finite limits, or past +-1e5 toward an infinite
    one."""
    x = torch.tensor([float("inf"), -float("inf")])
    g = torch.ones(2)
    big = torch.tensor([1e6, -1e6], dtype=torch.float64, requires_grad=True)
    for name, (fwd, bwd, torch_fn) in ELEMENTWISE.items():
        f_pos, f_neg, d_pos, d_neg = limits = registry.SPECS[name].limits
        assert fwd(x).tolist() == [f_pos, f_neg], name
        assert bwd(g, x).tolist() == [d_pos, d_neg], name
        y = torch_fn(big)
        (dy,) = torch.autograd.grad(y.sum(), big)
        for got, lim in zip([*y.tolist(), *dy.tolist()], limits, strict=True):
            if math.isinf(lim):
                assert got * math.copysign(1.0, lim) > 1e5, (name, limits, got)
            else:
                assert got == pytest.approx(lim, abs=1e-6), (name, limits, got)
    assert TOL  # one tolerance table serves every file
