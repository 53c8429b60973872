"""The rows of an activation fused with FP8 quantisation: ``act(x)`` or ``act(gate) * up``
returned as ``(q, scales)`` (``out_dtype=torch.float8_e4m3fn``), forward only.

Contestants: ``fused`` (fused_act's one kernel, and ``fused_cuda`` where the CUDA C++ kernels
run), ``eager`` (what a user writes: the activation in the input's dtype, then torch's amax,
the scale and a clamped cast, ``quantize_eager``), ``compile`` (``torch.compile`` of that),
and where importable on a GPU the peers of ``PEERS``: vLLM's ``silu_and_mul`` then its
``scaled_fp8_quant`` (per token or per tensor, on the packed layout its kernel reads), and
Liger-Kernel's SwiGLU kernel then the eager quantisation.  Each contestant is checked against
``reference.quantize_fp8`` of the fp32 reference activation before it is timed (``check``).
Bytes moved: the inputs read (x, or gate and up: n or 2n elements of b bytes), n one-byte
codes and the scales written; GB/s and the fraction of the copy count these.  The target of
issue 30: at least 0.85 of the copy and 2x eager for row and block scaling on 8192 x 14336
bf16 (``TARGET``).  Each row is named ``<activation>_fp8_<scaling>``, so that the runner, the
lease's plan and the command line take it as they take an op of ``bench.table``.
"""

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fused_act
from bench.table import BACKEND_OF, TOL, _packed_rows, _peer_version, _rows
from bench.timing import peak_mb, tensor_device, time_ms
from fused_act import reference, registry

OUT_DTYPE = torch.float8_e4m3fn
# gated MLPs' gate (and up) as tokens x intermediate: bench.table's LLM shapes and the target's
LLM_SHAPES = [(8192, 11008), (8192, 14336), (16384, 14336)]
TARGET_SHAPE = (8192, 14336)
TARGET = dict(frac_copy=0.85, vs_eager=2.0, scalings=("row", "block"))


def _silu(t: torch.Tensor) -> torch.Tensor:
    """The reference SiLU in fp32 (registry's one definition of its math)."""
    return registry.SPECS["silu"].forward(t.float(), 1.0)


@dataclass(frozen=True)
class QuantOp:
    """One activation's layout: ``fused(x, *params, scaling)`` is fused_act's call, ``act(x,
    *params)`` the eager activation a user writes (in x's dtype), ``ref(x, *params)`` the fp32
    reference activation; ``params(x)`` makes up (gated); ``reads`` counts input elements per
    output element; ``shape(n)`` the input of n output elements; ``width`` what the input's
    last dim must be a multiple of (block scaling: 32 per output row, twice that packed)."""

    fused: Callable
    act: Callable
    ref: Callable
    params: Callable[[torch.Tensor], list[torch.Tensor]]
    reads: int
    shape: Callable[[int], tuple[int, ...]]
    width: int


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.halves(x, -1)


def _packed_swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a packed gate_up as users write it: the halves by ``chunk``."""
    g, u = x.chunk(2, -1)
    return F.silu(g) * u


LAYOUTS = {
    "silu": QuantOp(lambda x, s: fused_act.silu(x, out_dtype=OUT_DTYPE, scaling=s), F.silu,
                    _silu, lambda x: [], 1, _rows, reference.MX_BLOCK),
    "swiglu": QuantOp(lambda g, u, s: fused_act.swiglu(g, u, out_dtype=OUT_DTYPE, scaling=s),
                      lambda g, u: F.silu(g) * u, lambda g, u: _silu(g) * u.float(),
                      lambda x: [torch.randn_like(x)], 2, _rows, reference.MX_BLOCK),
    "swiglu_packed": QuantOp(lambda x, s: fused_act.swiglu(x, out_dtype=OUT_DTYPE, scaling=s),
                             _packed_swiglu,
                             lambda x: _silu(_halves(x)[0]) * _halves(x)[1].float(),
                             lambda x: [], 2, lambda n: _packed_rows(2 * n),
                             2 * reference.MX_BLOCK),
}
# row and block scaling for each layout; tensor scaling once, on the packed layout, where vLLM's
# per-tensor quantisation can run beside it
SCALINGS = {"silu": ("row", "block"), "swiglu": ("row", "block"),
            "swiglu_packed": ("row", "block", "tensor")}
QUANT: dict[str, tuple[str, str]] = {f"{layout}_fp8_{s}": (layout, s)
                                     for layout, scalings in SCALINGS.items() for s in scalings}


def quantize_eager(y: torch.Tensor, scaling: str, dtype: torch.dtype = OUT_DTYPE,
                   block: int = reference.MX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of ``y`` as a user writes it with torch ops: the amax per row
    (``abs().amax(-1, keepdim=True)``), of the whole tensor, or per ``block`` elements of a row
    through a reshape; the scale amax / FMAX (floored as ``reference.AMAX_FLOOR``), or for
    blocks the power of two 2^(floor(log2 amax) - emax) stored as E8M0 bytes; then y / scale
    clamped to the format's range and cast.  The same rule as ``reference.quantize_fp8``, on y
    as the caller computed it (in its dtype), so its codes may differ from the reference's by
    the rounding of y: ``check`` allows that much."""
    fmax = reference.FP8_MAX[dtype]
    if scaling == "block":
        blocks = y.unflatten(-1, (-1, block)).float()
        amax = blocks.abs().amax(-1, keepdim=True)
        e = (torch.floor(torch.log2(amax)) - reference.FP8_EMAX[dtype]).clamp(-127, 127)
        q = (blocks * torch.exp2(-e)).clamp(-fmax, fmax).to(dtype).flatten(-2)
        return q, (e.squeeze(-1) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    amax = y.abs().amax(-1, keepdim=True) if scaling == "row" else y.abs().amax()
    scale = amax.float().clamp(min=reference.AMAX_FLOOR) / fmax
    return (y.float() / scale).clamp(-fmax, fmax).to(dtype), scale


def _eager(layout: str, scaling: str) -> Callable:
    act = LAYOUTS[layout].act
    return lambda *xs: quantize_eager(act(*xs), scaling)


def _vllm(scaling: str) -> Callable:
    """vLLM's SwiGLU of a packed gate_up, then its dynamic FP8 quantisation (per token for
    row scaling): two kernels, the activation written out between them."""
    ops = importlib.import_module("vllm._custom_ops")

    def call(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), device=x.device, dtype=x.dtype)
        torch.ops._C.silu_and_mul(y, x)
        return ops.scaled_fp8_quant(y, use_per_token_if_dynamic=scaling == "row")
    return call


def _liger(scaling: str) -> Callable:
    """Liger-Kernel's SwiGLU kernel, then the eager quantisation."""
    mul = importlib.import_module("liger_kernel.ops.swiglu").LigerSiLUMulFunction.apply
    return lambda g, u: quantize_eager(mul(g, u), scaling)


# peers of a layout and scaling (E8M0 blocks of 32 are neither peer's format): contestant ->
# (module that must import, maker of the callable from the scaling)
PEERS: dict[str, dict[str, tuple[str, Callable[[str], Callable]]]] = {
    "swiglu": {"liger": ("liger_kernel.ops.swiglu", _liger)},
    "swiglu_packed": {"vllm": ("vllm._custom_ops", _vllm)},
}
PEER_SCALINGS = {"liger": ("row", "block"), "vllm": ("row", "tensor")}


def peers(device: str) -> dict[str, str]:
    """Each peer contestant of these rows: the package and version, or "absent: ..."."""
    return {label: _peer_version(module, device)
            for by in PEERS.values() for label, (module, _) in by.items()}


_compiled: dict[tuple[str, str], Callable] = {}


def contestants(name: str, compile_backend: str = "inductor", device: str = "cuda"
                ) -> dict[str, Callable]:
    """fused, fused_cuda (where the CUDA kernels run), eager, compiled (one per row and
    backend) and, on a GPU where they import, the peers, of row ``name``: each takes the
    layout's inputs and returns (q, scales)."""
    layout, scaling = QUANT[name]
    op = LAYOUTS[layout]
    if (name, compile_backend) not in _compiled:
        _compiled[name, compile_backend] = torch.compile(_eager(layout, scaling),
                                                         backend=compile_backend)
    found = {"fused": lambda *xs: op.fused(*xs, scaling)}
    if device == "cuda" and fused_act.backend.cuda_status()[0]:
        found["fused_cuda"] = found["fused"]
    found |= {"eager": _eager(layout, scaling), "compile": _compiled[name, compile_backend]}
    if device == "cuda":
        for label, (_, make) in PEERS.get(layout, {}).items():
            if scaling not in PEER_SCALINGS[label]:
                continue
            try:
                found[label] = make(scaling)
            except Exception:  # noqa: BLE001 - a peer that fails to import is absent
                continue
    return found


def cases(name: str, sizes: list[int], shapes: list[tuple[int, ...]] | None, quick: bool
          ) -> list[tuple[int, ...]]:
    """The input shapes of row ``name``: each size (output elements) as the layout's shape,
    then the layer shapes ``shapes`` (or where None ``LLM_SHAPES``, the target's alone with
    quick) whose last dim fits its scaling; a packed row's gate_up is twice as wide."""
    layout, _ = QUANT[name]
    op = LAYOUTS[layout]
    if shapes is None:
        shapes = [TARGET_SHAPE] if quick else LLM_SHAPES
        if layout == "swiglu_packed":
            shapes = [(*s[:-1], 2 * s[-1]) for s in shapes]
    return [op.shape(n) for n in sizes] + [
        s for s in shapes if len(s) >= 2 and s[-1] % op.width == 0]


def make_inputs(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x, params) of a case, normal times 4 and normal, from a seed of the shape."""
    gen = torch.Generator().manual_seed(math.prod(shape) % 2**31)
    x = (torch.randn(shape, generator=gen) * 4).to(device=device, dtype=dtype)
    torch.manual_seed(0)
    return x, [p.to(device=device, dtype=dtype) for p in LAYOUTS[QUANT[name][0]].params(x.cpu())]


def check(name: str, fn: Callable, x: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Raise unless ``fn`` gives ``reference.quantize_fp8`` of the fp32 reference activation,
    up to the rounding of the activation in x's dtype (the eager expression's and the peers'
    y): its scales within the dtype's tolerance (E8M0 bytes within one), every code back
    within one FP8 step of the activation.  A step is the format's eps times the value, or on the
    subnormal grid of the coarser of the two scales."""
    layout, scaling = QUANT[name]
    q, scales = fn(x, *params)
    y = LAYOUTS[layout].ref(x, *params)
    want_q, want = reference.quantize_fp8(y, OUT_DTYPE, scaling)
    where = f"{name} {x.dtype} {tuple(x.shape)}"
    if q.dtype != OUT_DTYPE or q.shape != want_q.shape:
        raise AssertionError(f"{where}: q is {q.dtype} {tuple(q.shape)}, the reference's "
                             f"{OUT_DTYPE} {tuple(want_q.shape)}")
    scales = scales.reshape(want.shape)
    if scaling == "block":
        off = (scales.view(torch.uint8).int() - want.view(torch.uint8).int()).abs().max()
        if off > 1:
            raise AssertionError(f"{where}: block scales' E8M0 bytes differ from the "
                                 f"reference's by {int(off)}")
    elif not torch.allclose(scales.float(), want, rtol=TOL[x.dtype], atol=0):
        raise AssertionError(f"{where}: scales differ from the reference's by up to "
                             f"{float((scales.float() / want - 1).abs().max()):.2e} (relative)")
    one = torch.ones_like(q, dtype=torch.float32).to(OUT_DTYPE)
    mult = torch.maximum(reference.dequantize_fp8(one, want, scaling),
                         reference.dequantize_fp8(one, scales, scaling))
    info = torch.finfo(OUT_DTYPE)
    # 1.25: MX saturation (amax / scale up to 512 cast to 448) is just under 2^-3 off in e4m3
    step = 1.25 * info.eps * y.abs() + info.smallest_normal * info.eps * mult
    err = (reference.dequantize_fp8(q, scales, scaling) - y).abs()
    if not bool((err <= step).all()):
        i = int((err - step).flatten().argmax())
        raise AssertionError(f"{where}: {int((err > step).sum())} of {q.numel()} codes off by "
                             f"more than one FP8 step, e.g. element {i}: dequantised "
                             f"{float(reference.dequantize_fp8(q, scales, scaling).flatten()[i])},"
                             f" activation {float(y.flatten()[i])}")


def bench_case(name: str, dtype: torch.dtype, shape: tuple[int, ...], quick: bool,
               device: str = "cuda", compile_backend: str = "inductor",
               only: tuple[str, ...] | None = None) -> list[dict]:
    """Every contestant (or those named in ``only``) of row ``name`` on one input dtype and
    shape, forward: result rows, the copy of an output-sized tensor of x's dtype first."""
    layout, scaling = QUANT[name]
    op = LAYOUTS[layout]
    x, params = make_inputs(name, shape, dtype, tensor_device(device))
    n = x.numel() // (2 if layout == "swiglu_packed" else 1)  # output elements
    b = x.element_size()
    scale_bytes = {"row": 4 * (x.numel() // shape[-1]), "tensor": 4,
                   "block": n // reference.MX_BLOCK}[scaling]
    moved = op.reads * n * b + n + scale_bytes
    src = torch.empty(n, device=x.device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), n, quick, device)
    copy_gbps = 2 * n * b / copy_ms / 1e6
    base = dict(op=name, dtype=str(dtype).replace("torch.", ""), n=n, shape=list(shape),
                scaling=scaling, out_dtype=str(OUT_DTYPE).replace("torch.", ""),
                bytes=moved)
    rows = [dict(base, mode="copy", contestant="torch", ms=copy_ms, gbps=copy_gbps,
                 frac_copy=1.0, peak_mb=None)]
    for cname, fn in contestants(name, compile_backend, device).items():
        if only is not None and cname not in only:
            continue
        xs = [x.clone(), *(p.clone() for p in params)]
        with fused_act.use_backend(BACKEND_OF.get(cname, "triton")), torch.no_grad():
            check(name, fn, *xs[:1], xs[1:])
            ms = time_ms(lambda f=fn, xs=xs: f(*xs), n, quick, device)
            peak = peak_mb(lambda f=fn, xs=xs: f(*xs), device)
        gbps = moved / ms / 1e6
        rows.append(dict(base, mode="forward", contestant=cname, ms=ms, gbps=gbps,
                         frac_copy=gbps / copy_gbps, peak_mb=peak))
    return rows
