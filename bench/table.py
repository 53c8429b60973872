"""What the benchmark measures: the ops, their inputs, the contestants, the check.

Kept apart from the timing and the runner so that adding or changing an op touches one table and
nothing that decides how it is timed: the elementwise rows are derived from
``fused_act.registry``, so a new activation appears here without an edit, and only the ops with
parameters or a module around them (ACON-C, Meta-ACON, FReLU) are written out.  Every
contestant is checked against the reference with the tolerances here before any time is taken,
so a fast but wrong kernel never reaches a table.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fused_act
from fused_act import reference, registry

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FULL_SIZES = [2**k for k in range(16, 29, 2)]
QUICK_SIZES = [2**20, 2**24, 2**26]
LAYER_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (64, 512, 14, 14), (8, 4096, 4096)]
MODES = ("forward", "backward", "fwd+bwd")
CONTESTANTS = ("fused", "fused_cuda", "eager", "compile")
# the kernel backend each contestant runs under (forward and backward alike)
BACKEND_OF = {"fused_cuda": "cuda"}


def flat(n: int) -> tuple[int, ...]:
    return (n,)


def _nchw(n: int) -> tuple[int, ...]:
    """n elements as (N, 64, H, H): 64 channels, 32 x 32 images from 2^16 elements up."""
    batch = max(1, n // 2**16)
    side = max(1, math.isqrt(n // batch // 64))
    return (batch, 64, side, side)


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    ``fused``, ``eager`` and ``ref`` take ``(x, *params)``; ``params(x)`` makes the other
    differentiable inputs (parameters, FReLU's t); ``traffic`` is the number of x-sized tensors
    a forward and a backward must read plus write (None: not a single memory-bound pass).
    ``ref_fp32``: check against the reference in fp32 (else in x's dtype: for a module whose
    convolution and BatchNorm round in that dtype before the max picks a side).
    """

    fused: Callable
    eager: Callable
    ref: Callable
    shape: Callable[[int], tuple[int, ...]] = flat
    params: Callable[[torch.Tensor], list[torch.Tensor]] = lambda x: []
    traffic: tuple[int, int] | None = (2, 3)
    ref_fp32: bool = True


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def _channel(x: torch.Tensor, lo: float, hi: float, per_sample: bool = False) -> torch.Tensor:
    n, c = x.shape[:2]
    shape = (n, c) if per_sample else (c,)
    shape = shape + (1,) * (x.dim() - 2) if per_sample else (1, c) + (1,) * (x.dim() - 2)
    return _leaf(torch.empty(shape, device=x.device).uniform_(lo, hi))


def _acon_params(x: torch.Tensor, per_sample: bool = False) -> list[torch.Tensor]:
    return [_channel(x, -1.0, 1.5), _channel(x, -1.0, 0.5), _channel(x, 0.5, 1.5, per_sample)]


def _acon_eager(x, p1, p2, beta):
    dpx = (p1 - p2) * x
    return dpx * torch.sigmoid(beta * dpx) + p2 * x


def _frelu_params(x: torch.Tensor) -> list[torch.Tensor]:
    c = x.shape[1]
    return [_leaf(torch.randn(c, 1, 3, 3, device=x.device, dtype=x.dtype) * 0.3),
            _leaf(torch.ones(c, device=x.device, dtype=x.dtype)),
            _leaf(torch.zeros(c, device=x.device, dtype=x.dtype))]


def _frelu_t(x, w, bn_w, bn_b):
    t = F.conv2d(x, w, padding=1, groups=x.shape[1])
    return F.batch_norm(t, None, None, bn_w, bn_b, training=True)


def bench_key(spec: registry.Spec) -> str:
    """The benchmark's name of a registry activation: the spec's name, with "_beta" for one
    with a beta (timed with a learnable one-element beta)."""
    return spec.name + ("_beta" if spec.beta else "")


def _elementwise(spec: registry.Spec) -> Op:
    """A registry activation; one with a beta times its learnable one-element beta."""
    if spec.beta:
        return Op(spec.call, spec.torch_fn, spec.forward,
                  params=lambda x: [_leaf(torch.ones(1, device=x.device))])
    return Op(spec.call, spec.torch_fn, lambda x, s=spec: s.forward(x, 1.0))


OPS: dict[str, Op] = {
    **{bench_key(s): _elementwise(s) for s in registry.SPECS.values()},
    "acon_c": Op(fused_act.acon_c, _acon_eager, reference.acon_c, _nchw, _acon_params),
    "meta_acon": Op(fused_act.acon_c, _acon_eager, reference.acon_c, _nchw,
                    lambda x: _acon_params(x, per_sample=True)),
    # forward reads x and t, writes y; backward reads grad (and a 1-byte code), writes dx and dt
    "frelu_max": Op(fused_act.frelu_max, torch.maximum, reference.frelu_max, _nchw,
                    lambda x: [_leaf(torch.randn_like(x))], (3, 3)),
    "frelu_module": Op(lambda x, *p: fused_act.frelu_max(x, _frelu_t(x, *p)),
                       lambda x, *p: torch.max(x, _frelu_t(x, *p)),
                       lambda x, *p: reference.frelu_max(x, _frelu_t(x, *p)), _nchw,
                       _frelu_params, None, ref_fp32=False),
}


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = TOL[dtype]
    return bool(torch.allclose(out.double(), want.double(), rtol=tol, atol=tol, equal_nan=True))


_compiled: dict[tuple[str, str], Callable] = {}


def contestants(name: str, compile_backend: str = "inductor", device: str = "cuda"
                ) -> dict[str, Callable]:
    """fused, fused_cuda (on a GPU where the CUDA kernels can run), eager and compiled
    callables of op ``name`` (one compiled function per op)."""
    op = OPS[name]
    key = (name, compile_backend)
    if key not in _compiled:
        _compiled[key] = torch.compile(op.eager, backend=compile_backend)
    found = {"fused": op.fused}
    if device == "cuda" and fused_act.backend.cuda_status()[0]:
        found["fused_cuda"] = op.fused
    return {**found, "eager": op.eager, "compile": _compiled[key]}


def make_inputs(op: Op, shape: tuple[int, ...], dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(math.prod(shape) % 2**31)
    x = (torch.randn(shape, generator=gen) * 4).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    torch.manual_seed(0)
    params = op.params(x)
    return x, g, params


def check(name: str, fn: Callable, x: torch.Tensor, g: torch.Tensor,
          params: list[torch.Tensor]) -> None:
    """Raise unless ``fn`` gives the reference's output and input gradient."""
    op = OPS[name]
    xg = x.detach().clone().requires_grad_()
    y = fn(xg, *params)
    (dx,) = torch.autograd.grad(y, xg, g)
    dtype = torch.float32 if op.ref_fp32 else x.dtype
    xr = x.detach().to(dtype).requires_grad_()
    want = op.ref(xr, *[p.detach().to(dtype) for p in params])
    (want_dx,) = torch.autograd.grad(want, xr, g.to(dtype))
    for what, got, ref in (("output", y, want), ("input gradient", dx, want_dx)):
        if not _close(got, ref, x.dtype):
            raise AssertionError(f"{name} {x.dtype} {tuple(x.shape)}: {what} differs from the "
                                 "reference")
