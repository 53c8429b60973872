"""fp16 and bf16 results are their fp32 results rounded to nearest even, on every backend.

Every kernel loads fp16/bf16 exactly into fp32, computes there and rounds once, at the store.
So the same op run on ``x.float()`` gives the fp32 result, and torch's ``.to(dtype)`` (round to
nearest even) of it is what the fp16/bf16 run must store: checked to at most one ulp anywhere
and one-ulp differences in at most MAX_ONE_ULP of the elements.  A store that rounds toward
zero, as Triton's interpreter does for a plain fp32 -> bf16 cast, is one ulp off in about half
of them, which the tolerances of test_kernels.py let through.

The fp32 result is the backend's own, not torch's op in fp32: torch's GELU formulas lose
relative accuracy in the negative tail (many bf16 ulps off the exact value there), so a
comparison with them would measure their math, not the store.
"""

import ast

import pytest
import torch
import triton
import triton.language as tl

import fused_act
from fused_act import ops, registry
from fused_act.triton_kernels import math as tmath

from .cases import DEVICES, OPS, ROOT, need_backend, need_device, ulp_distance
from .test_csrc_emulated import cuda_on_cpu, emulated  # noqa: F401  (fixtures, asked by name)

LOW = [torch.float16, torch.bfloat16]
# "cuda" on the CPU is the CUDA C++ kernels run by tests/cuda_emu.h
BACKENDS = ["triton", "cuda", "reference"]
SHAPE = (4, 8, 16, 8)  # 4096 elements, 8 channels
TINY = 256  # of them subnormal or just normal: loaded and stored exactly too
# Measured (4096 elements a case, every backend): no element off by one ulp once the store
# rounds to nearest even; while the interpreter truncated, 35-58 % of the bf16 elements, and
# fp32 subnormals many ulps off.  The margin is for a compiler that contracts the fp32 math of
# one dtype's kernel differently from another's.
MAX_ONE_ULP = 0.01


@pytest.fixture
def backend(request, device):
    """The backend under test, set up for ``device``."""
    name = request.param
    if device == "cpu" and name == "cuda":
        request.getfixturevalue("cuda_on_cpu")
    else:
        need_backend(name, device)
    return name


def _cases(fn):
    for mark in (pytest.mark.parametrize("dtype", LOW, ids=str),
                 pytest.mark.parametrize("backend", BACKENDS, indirect=True),
                 pytest.mark.parametrize("device", DEVICES)):
        fn = mark(fn)
    return fn


def _normal(scale, dtype, device, seed):
    """N(0, scale) in ``dtype``, the first TINY elements spread over its subnormals."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * scale
    x.view(-1)[:TINY] = torch.linspace(-2, 2, TINY, dtype=torch.float64) * torch.finfo(dtype).tiny
    return x.to(dtype).to(device)


def _uniform(lo, hi, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(SHAPE[1], generator=gen) * (hi - lo) + lo).to(device)


def assert_rounded(got, fp32, what):
    """``got`` is ``fp32`` rounded to nearest ``got.dtype``, give or take one ulp in at most
    MAX_ONE_ULP of the elements."""
    d = ulp_distance(got, fp32.to(got.dtype))
    if int(d.max()) > 1:
        idx = (d.view(-1) > 1).nonzero()[:5].flatten().tolist()
        pairs = [(i, got.reshape(-1)[i].item(), fp32.reshape(-1)[i].item()) for i in idx]
        raise AssertionError(f"{what}: {int((d > 1).sum())}/{d.numel()} elements more than one "
                             f"ulp off; first [index, got, fp32 result]: {pairs}")
    frac = (d == 1).double().mean().item()
    assert frac <= MAX_ONE_ULP, f"{what}: {frac:.1%} of the elements one ulp off (at most " \
                                f"{MAX_ONE_ULP:.1%} with rounding to nearest even)"


def _check(fn, inputs, g, backend, what):
    """fn(*inputs) and its gradient by the first input, from the fp16/bf16 inputs and from the
    same inputs in fp32 (exact), both by ``backend``."""
    results = []
    for dtype in (inputs[0].dtype, torch.float32):
        x = inputs[0].detach().to(dtype).requires_grad_()
        with fused_act.use_backend(backend):
            y = fn(x, *inputs[1:])
            (dx,) = torch.autograd.grad(y, x, g.to(dtype))
        results.append((y.detach(), dx))
    (y, dx), (y32, dx32) = results
    assert y.dtype == dx.dtype == inputs[0].dtype
    assert_rounded(y, y32, what + " forward")
    assert_rounded(dx, dx32, what + " dx")


@_cases
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_elementwise(op, dtype, backend, device):
    x = _normal(op.scale, dtype, device, 0)
    params = [p.detach() for p in op.params(x)]
    _check(lambda v: op.call(v, params), [x], _normal(1.0, dtype, device, 1), backend,
           f"{op.name}[{backend}, {dtype}, {device}]")


@_cases
def test_acon_c(dtype, backend, device):
    x, g = _normal(4.0, dtype, device, 0), _normal(1.0, dtype, device, 1)
    p1, p2, beta = (_uniform(-2, 2, device, 2), _uniform(-2, 2, device, 3),
                    _uniform(0.2, 2, device, 4))
    _check(fused_act.acon_c, [x, p1, p2, beta], g, backend, f"acon_c[{backend}, {dtype}, {device}]")


@_cases
def test_frelu_max_affine(dtype, backend, device):
    """max(x, a t + b) (eval mode: no gradient): the elements where a t + b wins are rounded.
    The training step max(x, t) stores one of its inputs as it is (test_frelu.py: bit for bit)."""
    x, t = _normal(1.0, dtype, device, 0), _normal(1.0, dtype, device, 1)
    a, b = _uniform(0.5, 2, device, 2), _uniform(-1, 1, device, 3)
    with fused_act.use_backend(backend):
        y = ops.FRELU_MAX_AFFINE(x, t, a, b)
        y32 = ops.FRELU_MAX_AFFINE(x.float(), t.float(), a, b)
    assert y.dtype == dtype
    assert_rounded(y, y32, f"frelu_max_affine[{backend}, {dtype}, {device}]")


@_cases
def test_frelu_max_subnormals(dtype, backend, device):
    """max(x, t) of subnormals returns one of them bit for bit, and routes the gradient so."""
    x = _normal(1.0, dtype, device, 0).view(-1)[:TINY].requires_grad_()
    t = x.detach().flip(0).requires_grad_()
    g = _normal(1.0, dtype, device, 1).view(-1)[TINY:2 * TINY]
    with fused_act.use_backend(backend):
        y = fused_act.frelu_max(x, t)
        got = torch.autograd.grad(y, [x, t], g)
    want = torch.maximum(x, t)
    for a, b in zip((y, *got), (want, *torch.autograd.grad(want, [x, t], g)), strict=True):
        assert torch.equal(a, b), (backend, dtype)


@triton.jit
def _bf16_round_trip(v_ptr, h_ptr, w_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(h_ptr + offs, tmath.fp32_to_bf16_bits(tl.load(v_ptr + offs, mask=mask)), mask=mask)
    tl.store(w_ptr + offs, tmath.bf16_to_fp32_bits(tl.load(h_ptr + offs, mask=mask)), mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_bit_conversions(device):
    """The interpreter's own fp32 <-> bf16 conversions, against torch's: every bf16 high half
    of an fp32 with low halves at and around the ties (infinities, NaNs, subnormals and the
    carry into inf included)."""
    need_device(device)
    high = torch.arange(1 << 16, dtype=torch.int64) << 16
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    v = (high[:, None] | low).view(-1).to(torch.int32).view(torch.float32).to(device)
    h = torch.empty_like(v, dtype=torch.bfloat16)
    w = torch.empty_like(v)
    _bf16_round_trip[(triton.cdiv(v.numel(), 8192),)](v, h, w, v.numel(), BLOCK=8192)
    assert int(ulp_distance(h, v.to(torch.bfloat16)).max()) == 0
    assert torch.equal(w.view(torch.int32), h.float().view(torch.int32))


def test_every_triton_store_rounds_in_one_place():
    """The Triton kernels store through tiling.store_rounded alone: the one place that decides
    how a result is rounded to the output's dtype.  The FP8 kernel (quant.py) stores codes its
    one encoder (fp8_bits) made, E8M0 bytes and fp32 scales and amaxes: nothing rounded there."""
    calls, quant = {}, []
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.store":
                calls.setdefault(path.name, []).append(node.lineno)
                if path.name == "quant.py":
                    quant.append(ast.unparse(node.args[1]))
    assert list(calls) == ["quant.py", "tiling.py"] and len(calls["tiling.py"]) == 1, calls
    assert all(v in ("q", "byte", "scale") or v.startswith(("fp8_bits(", "tl.max("))
               for v in quant), quant


def test_ulp_distance():
    for dtype in LOW:
        eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
        a = torch.tensor([1.0, -1.0, 0.0, tiny, float("nan"), 1.0], dtype=dtype)
        b = torch.tensor([1.0 + eps, -1.0 - 2 * eps, -0.0, -tiny, float("nan"), float("nan")],
                         dtype=dtype)
        steps = round(2 / eps)  # the smallest normal is 1 / eps subnormal steps above 0
        assert ulp_distance(a, b).tolist() == [1, 2, 0, steps, 0, torch.iinfo(torch.int64).max]


@_cases
@pytest.mark.parametrize("spec", list(registry.SPECS.values()), ids=lambda s: s.name)
def test_gated(spec, dtype, backend, device):
    """glu of each activation on a packed gate/up input: act(gate) * up and both gradients
    rounded once, from fp32 (a float beta where the activation has one)."""
    x = _normal(spec.scale, dtype, device, 0)
    g = _normal(1.0, dtype, device, 1)[..., :SHAPE[-1] // 2]
    kwargs = {**spec.kwargs, **({"beta": 0.75} if spec.beta else {})}
    _check(lambda v: fused_act.glu(v, None, spec.function or spec.name, **kwargs), [x], g,
           backend, f"glu {spec.name}[{backend}, {dtype}, {device}]")
