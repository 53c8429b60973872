"""ACON-C and Meta-ACON: kernels vs the float64 reference, autograd machinery, modules."""

import pytest
import torch
from torch import nn

import fused_act
from fused_act import ops, plan, reference

from .cases import (
    BACKENDS,
    CPU_BACKENDS,
    DEVICES,
    DTYPES,
    assert_near,
    assert_param_near,
    need_backend,
    need_device,
    saved_by,
)

# x shape, layout: channel counts 1, 3, 64, 130; tails and several blocks; 2-D after a Linear
SHAPES = {
    "c1": ((3, 1, 17, 9), None),
    "c1_tiles": ((2, 1, 37, 29), None),  # flat past one tile: whole tiles unmasked, a tail
    "c3": ((2, 3, 45, 47), None),  # rows of 2115: two column blocks with a tail
    "c64": ((2, 64, 5, 7), None),
    "c130_cl": ((2, 130, 3, 7), "channels_last"),
    "c64_cl_big": ((3, 64, 9, 11), "channels_last"),  # several row blocks per sample
    "nc": ((37, 130), None),
    "nc_t": ((64, 9), "t"),  # (9, 64) transposed: channels innermost without a copy
    "strided": ((2, 3, 10, 12), "strided"),
    "3d": ((4, 6, 33), None),
}
BETAS = ["channel", "channel_4d", "sample", "sample_4d"]
# every shape with every beta kind it admits: (.., C, 1, ...) parameters need x of rank >= 3
CASES = [(key, kind) for key in SHAPES for kind in BETAS
         if not (kind.endswith("_4d") and len(SHAPES[key][0]) < 3)]


def make(key, dtype, device, beta_kind, param_dtype=None, seed=0):
    shape, layout = SHAPES[key]
    gen = torch.Generator().manual_seed(seed)
    if layout == "t":
        shape = shape[::-1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
    if layout == "t":
        x = x.t()
    x = x.to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = x[..., ::2]
    n, c = x.shape[:2]
    ones = [1] * (x.dim() - 2)
    pd = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def p(*s, lo=-2.0, hi=2.0):
        return (torch.rand(s, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(pd)

    p1, p2 = p(c), p(1, c, *ones)
    beta = {"channel": p(c, lo=0.2), "channel_4d": p(1, c, *ones, lo=0.2),
            "sample": p(n, c, lo=0.2), "sample_4d": p(n, c, *ones, lo=0.2)}[beta_kind]
    params = [t.to(device).requires_grad_() for t in (p1, p2, beta)]
    return x.requires_grad_(), params


def check(x, params, dtype, backend_name, what):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
    with fused_act.use_backend(backend_name):
        y = fused_act.acon_c(x, *params)
        grads = torch.autograd.grad(y, [x, *params], g)
    x64, g64 = x.detach().double(), g.double()
    p64 = [p.detach().double() for p in params]
    assert y.dtype == dtype and grads[0].dtype == dtype
    if ops.is_dense(x) and not reference.per_sample(params[2], x) or x.is_contiguous():
        assert y.stride() == x.stride(), f"{what}: strides {y.stride()} vs {x.stride()}"
    assert_near(y, reference.acon_c(x64, *p64), dtype, what + " forward")
    want = reference.acon_c_backward(g64, x64, *p64)
    assert_near(grads[0], want[0], dtype, what + " dx")
    # the size of each parameter gradient's terms, for its tolerance
    terms = reference.acon_c_backward(g64.abs(), x64.abs(), *[p.abs() for p in p64])
    for name, p, got, ref64, t in zip(("dp1", "dp2", "dbeta"), params, grads[1:], want[1:],
                                      terms[1:], strict=True):
        assert got.shape == p.shape and got.dtype == p.dtype, (name, got.shape, got.dtype)
        assert_param_near(got, ref64, t.abs() + ref64.abs(), dtype, f"{what} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key, beta_kind", CASES)
def test_vs_float64(key, beta_kind, dtype, backend_name, device):
    need_backend(backend_name, device)
    x, params = make(key, dtype, device, beta_kind)
    check(x, params, dtype, backend_name, f"acon_c[{key}, {beta_kind}, {dtype}, {backend_name}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_params_in_x_dtype(dtype, device):
    need_device(device)
    x, params = make("c64_cl_big", dtype, device, "sample", param_dtype=dtype)
    check(x, params, dtype, "triton", f"acon_c params in {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta_kind", BETAS)
def test_int64_offsets(beta_kind, device, monkeypatch):
    need_device(device)
    monkeypatch.setattr(plan, "INT64_THRESHOLD", 0)
    for key in ("c3", "c64_cl_big"):
        x, params = make(key, torch.float32, device, beta_kind)
        check(x, params, torch.float32, "triton", f"acon_c int64 {key}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", ["c3", "c130_cl"])
def test_deterministic(key, device):
    need_device(device)
    x, params = make(key, torch.float32, device, "sample")
    g = torch.randn_like(x)
    runs = []
    with fused_act.use_backend("triton"):
        for _ in range(2):
            runs.append(torch.autograd.grad(fused_act.acon_c(x, *params), [x, *params], g))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_edge_values():
    """inf, NaN, zeros, huge values: limits at +-inf (p1 x or p2 x), NaN in gives NaN out."""
    need_device("cpu")
    inf = float("inf")
    x = torch.tensor([[inf, -inf, float("nan"), 0.0, -0.0, 1e4, -1e4, 88.0, -88.0]]).t()
    x = x.reshape(9, 1).repeat(1, 2).requires_grad_()  # (N=9, C=2)
    p1, p2, beta = torch.tensor([2.0, 0.5]), torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0])
    for backend_name in CPU_BACKENDS:
        with fused_act.use_backend(backend_name):
            y = fused_act.acon_c(x, p1, p2, beta)
            (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        # channel 0: beta (p1 - p2) > 0, so y -> p1 x at +inf and p2 x at -inf; channel 1 swaps;
        # here p1 = 2, p2 = 0.5 in channel 0 and the reverse in channel 1
        assert y[0].tolist() == [inf, inf] and y[1].tolist() == [-inf, -inf]
        assert dx[0].tolist() == [2.0, 2.0] and dx[1].tolist() == [0.5, 0.5]
        assert y[2].isnan().all() and dx[2].isnan().all()
        finite = x.detach().isfinite()
        assert y[finite].isfinite().all() and dx[finite].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("beta_kind", BETAS)
def test_gradcheck(beta_kind, backend_name, device):
    need_backend(backend_name, device)
    x, params = make("c3", torch.float64, device, beta_kind)
    x = x.detach()[:, :, :1, :3].clone().requires_grad_()
    with fused_act.use_backend(backend_name):
        assert torch.autograd.gradcheck(fused_act.acon_c, (x, *params))
        assert torch.autograd.gradgradcheck(fused_act.acon_c, (x, *params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("key, beta_kind", [("c130_cl", "sample_4d"), ("c3", "channel"),
                                            ("nc", "sample")])
def test_opcheck(key, beta_kind, backend_name, device):
    need_backend(backend_name, device)
    x, params = make(key, torch.float32, device, beta_kind)
    with fused_act.use_backend(backend_name):
        torch.library.opcheck(ops.acon_c_op, (x, *params, backend_name))
        g = torch.randn_like(x)
        detached = [t.detach() for t in (x, *params)]
        for need in (False, True):
            torch.library.opcheck(ops.acon_c_backward_op, (g, *detached, need, backend_name))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_saves_only_inputs(backend_name):
    need_backend(backend_name, "cpu")
    x, params = make("c64", torch.float32, "cpu", "sample_4d")
    y, saved = saved_by(lambda: fused_act.acon_c(x, *params), backend_name)
    allowed = {t.data_ptr() for t in (x, *params)}
    assert len(saved) == 4 and all(t.data_ptr() in allowed for t in saved)
    y.sum().backward()


def test_only_requested_grads():
    need_device("cpu")
    x, (p1, p2, beta) = make("c3", torch.float32, "cpu", "channel")
    p2.requires_grad_(False)
    with fused_act.use_backend("triton"):
        fused_act.acon_c(x, p1, p2, beta).sum().backward()
    assert x.grad is not None and p1.grad is not None and beta.grad is not None
    assert p2.grad is None


def test_bad_arguments():
    x = torch.randn(2, 4, 3, 3)
    p = torch.randn(4)
    with pytest.raises(ValueError, match=r"acon_c: p1 must have C=4 elements .*\(got shape \(3,\)"):
        fused_act.acon_c(x, torch.randn(3), p, p)
    with pytest.raises(ValueError, match="acon_c: p2 must have C=4"):
        fused_act.acon_c(x, p, torch.randn(1, 4, 2, 1), p)
    with pytest.raises(ValueError, match="acon_c: p1 must have C=4"):
        fused_act.acon_c(x, torch.randn(1), p, p)  # a scalar p1 is no per-channel parameter
    with pytest.raises(ValueError, match=r"per-sample beta must be \(N, C\)"):
        fused_act.acon_c(x, p, p, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"per-sample beta must be"):
        fused_act.acon_c(x, p, p, torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="acon_c: beta must have C=4"):
        fused_act.acon_c(x, p, p, torch.randn(5))
    with pytest.raises(ValueError, match="x must have shape \\(N, C, \\*\\), got rank 1"):
        fused_act.acon_c(torch.randn(4), p, p, p)
    with pytest.raises(TypeError, match="acon_c: x must be a floating-point tensor"):
        fused_act.acon_c(torch.zeros(2, 4, dtype=torch.int32), p, p, p)
    with pytest.raises(TypeError, match="acon_c: beta must be a floating-point tensor"):
        fused_act.acon_c(x, p, p, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="acon_c: p2 is on meta but x is on cpu"):
        fused_act.acon_c(x, p, torch.randn(4, device="meta"), p)


# ---- modules: the published forms, written here in plain PyTorch ----------------------------

class PlainAconC(nn.Module):
    def __init__(self, c1):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c1, 1, 1))

    def forward(self, x):
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(self.beta * dpx) + self.p2 * x


class PlainMetaAconC(nn.Module):
    """Without BatchNorm (detection code) or with it (``bn=True``, the authors' original)."""

    def __init__(self, c1, k=1, s=1, r=16, bn=False):
        super().__init__()
        c2 = max(r, c1 // r)
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.fc1 = nn.Conv2d(c1, c2, k, s, bias=True)
        self.fc2 = nn.Conv2d(c2, c1, k, s, bias=True)
        self.bn = bn
        if bn:
            self.bn1 = nn.BatchNorm2d(c2)
            self.bn2 = nn.BatchNorm2d(c1)

    def forward(self, x):
        y = x.mean(dim=2, keepdims=True).mean(dim=3, keepdims=True)
        if self.bn:
            beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(y)))))
        else:
            beta = torch.sigmoid(self.fc2(self.fc1(y)))
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(beta * dpx) + self.p2 * x


MODULES = {
    "AconC": (lambda: PlainAconC(24), lambda: fused_act.nn.AconC(24)),
    "MetaAconC": (lambda: PlainMetaAconC(24), lambda: fused_act.nn.MetaAconC(24)),
    "MetaAconC_bn": (lambda: PlainMetaAconC(40, r=4, bn=True),
                     lambda: fused_act.nn.MetaAconC(40, r=4, bn=True)),
}


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("train", [True, False])
def test_modules_match_published(name, train, backend_name):
    need_backend(backend_name, "cpu")
    torch.manual_seed(0)
    theirs, ours = (f().double() for f in MODULES[name])
    assert sorted((k, v.shape) for k, v in theirs.state_dict().items()) == \
        sorted((k, v.shape) for k, v in ours.state_dict().items())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.train(train)
    ours.train(train)
    c = theirs.p1.shape[1]
    x = torch.randn(4, c, 6, 5, dtype=torch.float64) * 3
    results = []
    for m in (theirs, ours):
        xg = x.clone().requires_grad_()
        with fused_act.use_backend(backend_name):
            y = m(xg)
            y.pow(2).sum().backward()
        results.append((y.detach(), xg.grad, {k: p.grad for k, p in m.named_parameters()}))
    (ya, gxa, gpa), (yb, gxb, gpb) = results
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gxb, gxa, rtol=1e-9, atol=1e-9)
    for k in gpa:
        torch.testing.assert_close(gpb[k], gpa[k], rtol=1e-9, atol=1e-9, msg=k)
    if name == "MetaAconC_bn" and train:
        torch.testing.assert_close(ours.bn1.running_mean, theirs.bn1.running_mean)


def test_module_init_matches_published():
    m = fused_act.nn.AconC(8)
    assert m.p1.shape == m.p2.shape == m.beta.shape == (1, 8, 1, 1)
    assert torch.equal(m.beta, torch.ones(1, 8, 1, 1))
    meta = fused_act.nn.MetaAconC(64)
    assert meta.fc1.out_channels == 16 and meta.fc2.out_channels == 64  # max(16, 64 // 16)
    assert meta.fc1.bias is not None and meta.fc2.bias is not None
    assert fused_act.nn.MetaAconC(1024).fc1.out_channels == 64
