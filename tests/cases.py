"""The test tables: ops, dtypes, shapes and layouts, edge values, tolerances, and the comparison
helpers."""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor

import fused_act
from fused_act import backend, reference, registry

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# |out - ref64| <= atol + rtol |ref64|, against the reference computed in float64.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}
# PyTorch's own functions are not the float64 reference: compared with them (``assert_near_torch``),
# a result may be TORCH_RTOL_FACTOR times the table's relative tolerance off, TORCH_ATOL absolute
TORCH_RTOL_FACTOR = 4
TORCH_ATOL = 1e-5
# parameter gradients are sums: |err| <= PARAM_RTOL * sum |terms| (fp32 accumulation)
PARAM_RTOL = {torch.float64: 1e-10}
PARAM_RTOL_DEFAULT = 2e-5

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
# "cuda" (the CUDA C++ kernels) runs CUDA tensors only and "cpu" (the CPU C++ kernels) CPU
# tensors only; conftest.py drops their combinations with the other device
BACKENDS = ["triton", "cuda", "cpu", "reference"]
CPU_BACKENDS = ["triton", "cpu", "reference"]


def need_device(device: str) -> None:
    """Skip unless Triton can run on ``device`` here (GPU, or the CPU interpreter)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu" and not backend.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")


def need_backend(backend_name: str, device: str) -> None:
    """Skip unless ``backend_name`` can run on ``device`` here."""
    if backend_name == "triton":
        need_device(device)
    elif device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend_name == "cuda":
        ok, why = backend.cuda_status()
        if not ok:
            pytest.skip(f"backend 'cuda': {why}")
    if backend_name == "cpu":
        ok, why = backend.cpu_status()
        if not ok:
            # CI has a compiler: there, a CPU kernel that cannot be built fails its tests
            (pytest.fail if os.environ.get("CI") else pytest.skip)(f"backend 'cpu': {why}")


def saved_by(fn: Callable[[], Tensor], backend_name: str) -> tuple[Tensor, list[Tensor]]:
    """Run ``fn`` under ``backend_name``; return its result and the tensors autograd saved."""
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with fused_act.use_backend(backend_name), hooks:
        return fn(), saved


@dataclass(frozen=True)
class OpCase:
    """One activation variant: the public call, its reference, and what PyTorch users call.
    ``spec`` is its registry entry (None for the families outside the registry's table);
    ``beta_value`` the float beta it passes (swish's float variant)."""

    name: str
    call: Callable[[Tensor, list[Tensor]], Tensor]
    ref: Callable[[Tensor, list[Tensor]], Tensor]
    ref_backward: Callable[[Tensor, Tensor, list[Tensor]], tuple[Tensor, ...]]
    torch_fn: Callable[[Tensor, list[Tensor]], Tensor]
    params: Callable[[Tensor], list[Tensor]] = field(default=lambda x: [])
    scale: float = 8.0  # inputs ~ N(0, scale): reaches the saturating branches
    spec: registry.Spec | None = None
    beta_value: float = 1.0


def _beta_scalar(x: Tensor) -> list[Tensor]:
    return [torch.tensor([1.3], device=x.device, dtype=_param_dtype(x)).requires_grad_()]


def _beta_channel(x: Tensor) -> list[Tensor]:
    c = x.shape[1]
    b = torch.linspace(-1.5, 2.0, c, device=x.device, dtype=_param_dtype(x))
    return [b.requires_grad_()]


def _beta_channel_4d(x: Tensor) -> list[Tensor]:
    (b,) = _beta_channel(x)
    return [b.detach().reshape(1, -1, *([1] * (x.dim() - 2))).requires_grad_()]


def _param_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _plain(spec: registry.Spec, beta: float = 1.0, suffix: str = "") -> OpCase:
    """The spec called with no tensor parameter (a float beta for a spec with beta)."""
    args = (beta,) if spec.beta else ()
    return OpCase(spec.name + suffix, lambda x, p: spec.call(x, *args),
              lambda x, p: spec.forward(x, beta),
              lambda g, x, p: (spec.backward(g, x, beta, False)[0],),
              lambda x, p: spec.torch_fn(x, *args), scale=spec.scale, spec=spec, beta_value=beta)


def _with_beta(spec: registry.Spec, suffix: str, params: Callable) -> OpCase:
    """The spec with a beta tensor (a learnable parameter), its gradient checked too."""
    return OpCase(spec.name + suffix, lambda x, p: spec.call(x, p[0]),
              lambda x, p: spec.forward(x, p[0]),
              lambda g, x, p: spec.backward(g, x, p[0], True),
              lambda x, p: spec.torch_fn(x, reference._param(p[0], x).to(x.dtype)), params,
              spec.scale, spec)


# every spec of the registry; those with a beta also with a float, a one-element and (on the
# channel shapes) a per-channel beta, (C,) and (1, C, 1, ...)
OPS = [op for spec in registry.SPECS.values() for op in (
    [_plain(spec, -0.75, "_float"), _with_beta(spec, "_scalar", _beta_scalar)] if spec.beta
    else [_plain(spec)])]
CHANNEL_OPS = [op for spec in registry.SPECS.values() if spec.beta for op in (
    _with_beta(spec, "_channel", _beta_channel),
    _with_beta(spec, "_channel_4d", _beta_channel_4d))]
ALL_OPS = OPS + CHANNEL_OPS


def _t(x: Tensor) -> Tensor:
    return x.t()


def _cl(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _strided(x: Tensor) -> Tensor:
    return x[:, ::2]


def _perm(x: Tensor) -> Tensor:
    return x.permute(2, 0, 1)


# (shape made first, layout transform) -> the tensor the op sees
SHAPES = {
    "empty": ((0,), None),
    "scalar": ((), None),
    "one": ((1,), None),
    "odd": ((7,), None),
    "blocks_tail": ((2 * 2048 + 37,), None),
    "nchw": ((3, 5, 7, 11), None),
    "channels_last": ((2, 6, 9, 13), _cl),
    "transposed": ((37, 53), _t),
    "strided": ((33, 70), _strided),
    "permuted": ((4, 9, 5), _perm),
}
# per-channel beta needs a channel dim: x of rank >= 2, channel counts 1, 3, 64, 130
CHANNEL_SHAPES = {
    "nc": ((5, 130), None),
    "nchw_c1": ((3, 1, 4, 5), None),
    "nchw_c3": ((2, 3, 45, 47), None),
    "nchw_c64": ((2, 64, 3, 5), None),
    "channels_last_c130": ((2, 130, 3, 7), _cl),
    "transposed_nc": ((64, 9), _t),
    "strided": ((3, 64, 10), lambda x: x[..., ::3]),
}


def make_x(shape_key: str, dtype: torch.dtype, device: str, scale: float = 8.0,
           table: dict = SHAPES, seed: int = 0) -> Tensor:
    """A fresh random input over the activation's interesting range, in the given layout."""
    shape, layout = table[shape_key]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    return layout(x) if layout else x


# The edge values of the elementwise and gated tables (test_kernels.py, test_gated.py, and the
# host math of test_csrc.py): +-inf and NaN, mish's saturation point 20 and 45 past it (where
# e^x (e^x + 2) overflows fp32), +-88 and -100 (exp at the end of fp32's range), 1e4 (finite in
# every dtype; a function growing faster than x overflows fp16 there: x^2 from 256), signed
# zeros, 3e-8 (below fp16's smallest subnormal), and +-1e20 (inf in fp16; x^2 overflows bf16
# and fp32 there, not fp64).  Tests find a value's place with ``edge``.
EDGES = [math.inf, -math.inf, math.nan, 20.0, -20.0, 88.0, -88.0, 1e4, -1e4, -0.0, 0.0, 3e-8,
         -100.0, 45.0, 1e20, -1e20]


def edge(value: float) -> int:
    """The index of ``value`` in EDGES (a signed zero by its sign; NaN as NaN)."""
    same = (lambda v: math.isnan(v)) if math.isnan(value) else (
        lambda v: v == value and math.copysign(1.0, v) == math.copysign(1.0, value))
    return next(i for i, v in enumerate(EDGES) if same(v))


def expected(ref64: Tensor, dtype: torch.dtype) -> Tensor:
    """The float64 reference as a result in ``dtype`` is judged: +-inf where it rounds to an
    infinity in ``dtype`` (the function itself overflows there, e.g. x^2 past 256 in fp16),
    elsewhere as it is (the tolerances judge the rounding)."""
    r = ref64.detach().double().cpu()
    rounded = r.to(dtype).double()
    return torch.where(rounded.isinf(), rounded, r)


def assert_finite_as_reference(out: Tensor, ref64: Tensor, given: Tensor, dtype: torch.dtype,
                               what: str) -> None:
    """Where the inputs are finite (``given``), ``out`` is never NaN, and it is infinite exactly
    where the float64 reference overflows ``dtype``, with the reference's sign: no finite input
    gives NaN or inf spuriously, and none a finite value where the true result is not one."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    want = expected(ref64, dtype)
    o = out.detach().double().cpu()
    bad = given.cpu() & (o.isnan() | want.isnan() | (o.isinf() != want.isinf())
                         | (o.isinf() & (o != want)))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, o[tuple(i)].item(), ref64.reshape(o.shape)[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: NaN or inf where the float64 reference rounded to {dtype} "
                             f"is finite, or the other way round; [index, got, float64 "
                             f"reference]: {pairs}")


def assert_near_torch(out: Tensor, theirs: Tensor, dtype: torch.dtype) -> None:
    """``out`` within the tolerance of a comparison with PyTorch's own function (TORCH_*)."""
    torch.testing.assert_close(out.detach().double(), theirs.detach().double(),
                               rtol=TOL[dtype][0] * TORCH_RTOL_FACTOR, atol=TORCH_ATOL)


def assert_near(out: Tensor, ref64: Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise tolerance check with a message naming the first mismatches; where the float64
    reference overflows ``dtype``, ``out`` must be that infinity (``expected``)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    rtol, atol = TOL[dtype]
    o, r = out.detach().double().cpu(), expected(ref64, dtype)
    bad = ~((o - r).abs() <= atol + rtol * r.abs()) & ~(o.isnan() & r.isnan()) & ~(o == r)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, o[tuple(i)].item(), r[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())}/{o.numel()} elements off "
                             f"(rtol {rtol}, atol {atol}); first [index, got, want]: {pairs}")


def assert_param_near(out: Tensor, ref64: Tensor, terms_abs_sum: Tensor, dtype: torch.dtype,
                      what: str) -> None:
    """A reduced parameter gradient against float64, scaled by the size of its terms, plus the
    rounding of the parameter's own dtype (a fp16 parameter gets a fp16 gradient)."""
    rtol = PARAM_RTOL.get(dtype, PARAM_RTOL_DEFAULT)
    ref = ref64.detach().double().cpu()
    err = (out.detach().double().cpu() - ref).abs()
    rounding = torch.finfo(out.dtype).eps * ref.abs() if out.dtype != torch.float64 else 0.0
    lim = rtol * terms_abs_sum.double().cpu() + rounding + 1e-12
    ok = bool((err <= lim).all())
    assert ok, f"{what}: error {err.max().item():.3g} > {lim.max().item():.3g}"


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """How many representable values of their (common, floating) dtype lie between ``a`` and
    ``b``, elementwise, as int64: 0 where they are equal (+0 and -0 included) or both NaN, and
    the largest int64 where only one is NaN."""
    assert a.dtype == b.dtype and a.dtype.is_floating_point, (a.dtype, b.dtype)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    top = torch.iinfo(bits).max

    def ordered(t: Tensor) -> Tensor:
        # sign-magnitude bits to a line of integers on which neighbours differ by one
        i = t.detach().cpu().contiguous().view(bits).long()
        return torch.where(i < 0, -(i & top), i)

    d = (ordered(a) - ordered(b)).abs()
    nan_a, nan_b = a.detach().cpu().isnan(), b.detach().cpu().isnan()
    d = torch.where(nan_a & nan_b, 0, d)
    return torch.where(nan_a ^ nan_b, torch.iinfo(torch.int64).max, d)
