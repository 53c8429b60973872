"""Every op x backend x dtype x shape/layout against the float64 reference, forward and backward."""

import math

import pytest
import torch

import fused_act
from fused_act import ops, plan, reference

from .cases import (
    BACKENDS,
    CHANNEL_OPS,
    CHANNEL_SHAPES,
    DEVICES,
    DTYPES,
    EDGES,
    OPS,
    SHAPES,
    assert_finite_as_reference,
    assert_near,
    assert_near_torch,
    assert_param_near,
    edge,
    make_x,
    need_backend,
    need_device,
)


def _run(op, x, backend_name, seed=1):
    params = op.params(x)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
    with fused_act.use_backend(backend_name):
        y = op.call(x, params)
        grads = torch.autograd.grad(y, [x, *params], g) if x.numel() else [torch.zeros_like(x)]
    return params, g, y, grads


def _check(op, x, dtype, backend_name):
    params, g, y, grads = _run(op, x, backend_name)
    x64, g64 = x.detach().double(), g.double()
    p64 = [p.detach().double() for p in params]
    what = f"{op.name}[{backend_name}, {dtype}, {tuple(x.shape)}]"
    assert y.dtype == dtype and grads[0].dtype == dtype
    if ops.is_dense(x):
        assert y.stride() == x.stride(), f"{what}: output strides {y.stride()} vs {x.stride()}"
    assert_near(y, op.ref(x64, p64), dtype, what + " forward")
    if x.numel() == 0:
        return
    want = op.ref_backward(g64, x64, p64)
    assert_near(grads[0], want[0], dtype, what + " dx")
    for p, got, ref64 in zip(params, grads[1:], want[1:], strict=True):
        assert got.shape == p.shape and got.dtype == p.dtype
        _, terms = reference.swish_backward(g64.abs(), x64, p64[0], need_dbeta=True)
        assert_param_near(got, ref64, terms, dtype, what + " dbeta")


# every elementwise op on every shape; per-channel beta on the shapes that have channels
CASES = [pytest.param(op, key, SHAPES, id=f"{op.name}-{key}") for op in OPS for key in SHAPES] + [
    pytest.param(op, key, CHANNEL_SHAPES, id=f"{op.name}-{key}")
    for op in CHANNEL_OPS for key in CHANNEL_SHAPES
    if not (op.name.endswith("_4d") and len(CHANNEL_SHAPES[key][0]) < 3)]  # (1, C, 1, ...) beta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, shape, table", CASES)
def test_vs_float64(op, shape, table, dtype, backend_name, device):
    need_backend(backend_name, device)
    x = make_x(shape, dtype, device, op.scale, table).requires_grad_()
    _check(op, x, dtype, backend_name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS + CHANNEL_OPS[:1], ids=lambda o: o.name)
def test_int64_offsets(op, device, monkeypatch):
    """The 64-bit offset path (taken from 2^31 elements) computes the same values."""
    need_device(device)
    monkeypatch.setattr(plan, "INT64_THRESHOLD", 0)
    x = make_x("nchw_c3", torch.float32, device, op.scale, CHANNEL_SHAPES).requires_grad_()
    _check(op, x, torch.float32, "triton")


def _ulp_error(out, want, dtype):
    """max |out - want| in units of the spacing of ``dtype`` at ``want`` (finite ``want``)."""
    mant = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    spacing = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(tiny)))) * mant
    return ((out - want).abs() / spacing).max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS + CHANNEL_OPS, ids=lambda o: o.name)
def test_fused_no_worse_than_torch(op, device):
    """In fp16/bf16 the fused result is no further from float64 than twice PyTorch's own op's
    error, measured in units in the last place (both round their fp32 result to nearest: about
    0.5 each; the interpreter too, since ``tiling.store_rounded``)."""
    need_device(device)
    for dtype in (torch.float16, torch.bfloat16):
        x = make_x("nchw_c64", dtype, device, op.scale, CHANNEL_SHAPES)
        params = [p.detach() for p in op.params(x)]
        with fused_act.use_backend("triton"):
            ours = op.call(x, params).double()
        theirs = op.torch_fn(x, params).double()
        want = op.ref(x.double(), [p.double() for p in params])
        err_ours = _ulp_error(ours, want, dtype)
        err_torch = _ulp_error(theirs, want, dtype)
        assert err_ours <= 2 * err_torch, (op.name, dtype, err_ours, err_torch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS + CHANNEL_OPS[:1], ids=lambda o: o.name)
def test_beta_grad_deterministic(op, device):
    need_device(device)
    x = make_x("nchw_c64", torch.float32, device, op.scale, CHANNEL_SHAPES).requires_grad_()
    runs = [_run(op, x, "triton", seed=3)[3] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_edge_values(op, dtype, backend_name, device):
    """inf, NaN, large magnitudes, signed zeros (``cases.EDGES``): limits at +-inf, NaN in gives
    NaN out, no spurious NaN/inf from finite input (inf exactly where the float64 reference
    overflows the dtype), and PyTorch's values wherever PyTorch is finite."""
    need_backend(backend_name, device)
    x = torch.tensor(EDGES, dtype=dtype, device=device).requires_grad_()
    params = [p.detach() for p in op.params(x)]
    with fused_act.use_backend(backend_name):
        y = op.call(x, params)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().cpu()
    p64 = [p.double().cpu() for p in params]
    finite = x64.isfinite()
    what = f"{op.name}[{backend_name}, {dtype}]"
    assert_finite_as_reference(y, op.ref(x64, p64), finite, dtype, what + " forward")
    assert_finite_as_reference(dx, op.ref_backward(torch.ones_like(x64), x64, p64)[0], finite,
                               dtype, what + " dx")
    nan = edge(math.nan)
    assert y[nan].isnan() and dx[nan].isnan()
    if op.name == op.spec.name:  # the mathematical limits at +-inf, for value and derivative
        lim = op.spec.limits
        pos, neg = edge(math.inf), edge(-math.inf)
        assert (y[pos].item(), y[neg].item(), dx[pos].item(), dx[neg].item()) == lim
    theirs = op.torch_fn(x.detach(), params)
    ok = finite.to(theirs.device) & theirs.isfinite()
    assert_near_torch(y[ok], theirs[ok], dtype)
    if op.name in ("mish", "silu"):  # f(-1e4) = -0.0, as PyTorch gives
        v = y[edge(-1e4)].item()
        assert v == 0.0 and math.copysign(1.0, v) == -1.0
    if op.name == "mish" and dtype in (torch.float32, torch.float64):
        assert dx[edge(-100.0)].item() < 0.0  # mish'(-100) = e^-100 (2 - 100 + ...) < 0


@pytest.mark.parametrize("name", ["reference", "auto", "Triton", "tritonx"])
def test_kernels_unknown_backend(name):
    """Only "triton" and "cuda" name kernel backends: any other name is a ValueError naming
    them, never Triton's kernels by default."""
    from fused_act.kernels import _loaded, kernels
    with pytest.raises(ValueError, match="'triton', 'cuda'"):
        kernels(name)
    assert name not in _loaded
