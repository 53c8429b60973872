"""What the benchmark measures: the ops, their inputs, the contestants, the check.

Kept apart from the timing and the runner so that adding or changing an op touches one table and
nothing that decides how it is timed: the elementwise rows and their gated rows
(``act(gate) * up``: swiglu, geglu, ...) are derived from ``fused_act.registry``, so a new
activation appears here twice without an edit, and only the ops with parameters or a module
around them (ACON-C, Meta-ACON, FReLU) are written out.  Every contestant is checked against the
reference with the tolerances here before any time is taken, so a fast but wrong kernel never
reaches a table.
"""

import importlib
import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fused_act
from bench.timing import compile_mode
from fused_act import reference, registry

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FULL_SIZES = [2**k for k in range(16, 29, 2)]
QUICK_SIZES = [2**20, 2**24, 2**26]
# conv layers' (N, C, H, W) and a linear layer's (batch, tokens, features); an op is timed only
# on those its ``BenchOp.takes`` accepts
LAYER_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (64, 512, 14, 14), (8, 4096, 4096)]
# a gated MLP's gate (and up) as tokens x intermediate: Llama-2-7B's width on 8192 tokens, and
# Llama-3-8B's / Mistral-7B's on 16384
LLM_SHAPES = [(8192, 11008), (16384, 14336)]
MODES = ("forward", "backward", "fwd+bwd")
# "decompose": torch.compile of our op with its compile mode "decompose" (ops with a
# compile_key); "liger": Liger-Kernel's kernel of the same function, where importable
CONTESTANTS = ("fused", "fused_cuda", "eager", "compile", "decompose", "liger")
# the kernel backend each contestant runs under (forward and backward alike)
BACKEND_OF = {"fused_cuda": "cuda"}


def flat(n: int) -> tuple[int, ...]:
    return (n,)


def _nchw(n: int) -> tuple[int, ...]:
    """n elements as (N, 64, H, H): 64 channels, 32 x 32 images from 2^16 elements up."""
    batch = max(1, n // 2**16)
    side = max(1, math.isqrt(n // batch // 64))
    return (batch, 64, side, side)


def _rows(n: int) -> tuple[int, ...]:
    """n elements as (tokens, 4096), the layout of an MLP's intermediate activations (a single
    row below 4096 elements), so that a row-wise peer kernel can run the size sweep too."""
    width = min(n, 4096)
    return (max(1, n // width), width)


def _any_shape(shape: tuple[int, ...]) -> bool:
    """An elementwise op takes a tensor of any shape."""
    return True


def _image(shape: tuple[int, ...]) -> bool:
    """(N, C, H, W): what a conv net's activation sees (FReLU's depthwise conv needs it, and
    ACON's per-channel parameters and Meta-ACON's spatial mean assume it)."""
    return len(shape) == 4


def _matrix_rows(shape: tuple[int, ...]) -> bool:
    """(..., features) with at least one leading dim: a gated op's gate and up."""
    return len(shape) >= 2


def _packed_shape(shape: tuple[int, ...]) -> bool:
    """(..., 2 w): gate and up as the halves of the last dim."""
    return len(shape) >= 2 and shape[-1] % 2 == 0


@dataclass(frozen=True)
class BenchOp:
    """One benchmarked op.

    ``fused``, ``eager`` and ``ref`` take ``(x, *params)``; ``params(x)`` makes the other
    differentiable inputs (parameters, FReLU's t); ``traffic`` is the number of x-sized tensors
    a forward and a backward must read plus write (None: not a single memory-bound pass).
    ``ref_fp32``: check against the reference in fp32 (else in x's dtype: for a module whose
    convolution and BatchNorm round in that dtype before the max picks a side).  ``inputs``: how
    many leading arguments are data whose gradients the check compares (a gated op's gate and
    up: 2).  ``layers``: the real layer shapes the op is timed on by default (empty: the
    run's).  ``takes(shape)``: whether the op can be timed on a layer shape (a layer shape it
    does not take is skipped, whether it is the default or the run's).  ``compile_key``: its
    ``fused_act.config.compile_mode`` key, which adds the contestant "decompose".
    ``channels_last``: x and the output gradient are drawn channels_last (a 4-d x).
    """

    fused: Callable
    eager: Callable
    ref: Callable
    shape: Callable[[int], tuple[int, ...]] = flat
    params: Callable[[torch.Tensor], list[torch.Tensor]] = lambda x: []
    traffic: tuple[float, float] | None = (2, 3)
    ref_fp32: bool = True
    inputs: int = 1
    layers: tuple[tuple[int, ...], ...] = ()
    takes: Callable[[tuple[int, ...]], bool] = _any_shape
    compile_key: str | None = None
    channels_last: bool = False


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def _scalar_beta(x: torch.Tensor) -> torch.Tensor:
    # in x's dtype, as in a model cast to it: an fp32 beta of shape (1,) would promote the
    # eager contestant's output to fp32 (more bytes written than the op's)
    return _leaf(torch.ones(1, device=x.device, dtype=x.dtype))


def _up(x: torch.Tensor) -> torch.Tensor:
    return _leaf(torch.randn_like(x))


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


def _elementwise(spec: registry.Spec) -> BenchOp:
    """A registry activation; one with a beta times its learnable one-element beta."""
    if spec.beta:
        return BenchOp(spec.call, spec.torch_fn, spec.forward, params=lambda x: [_scalar_beta(x)])
    return BenchOp(spec.call, spec.torch_fn, lambda x, s=spec: s.forward(x, 1.0))


# the gated rows by the names LLM code gives them; "geglu" is fused_act.geglu's default (erf),
# "geglu_tanh" the tanh form of Gemma and of Liger-Kernel's kernel
_GATED_NAMES = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}
GATED: dict[str, registry.Spec] = {
    _GATED_NAMES.get(s.name, "glu_" + bench_key(s)): s for s in registry.SPECS.values()}


def _gated(spec: registry.Spec) -> BenchOp:
    """``act(gate) * up`` of a registry activation by ``fused_act.glu``: x is the gate, the
    first parameter up (then a learnable one-element beta where the spec has one); eager is the
    plain ``torch_fn(gate) * up``.  Forward reads gate and up and writes the output (3 tensors
    of x's size), backward reads grad, gate and up and writes both gradients (5)."""
    act, kwargs = spec.function or spec.name, spec.kwargs
    common = dict(shape=_rows, traffic=(3, 5), inputs=2, layers=tuple(LLM_SHAPES),
                  takes=_matrix_rows, compile_key="glu")
    if spec.beta:
        return BenchOp(lambda g, u, b: fused_act.glu(g, u, act, beta=b),
                  lambda g, u, b: spec.torch_fn(g, b) * u,
                  lambda g, u, b: spec.forward(g, b) * u,
                  params=lambda x: [_up(x), _scalar_beta(x)], **common)
    return BenchOp(lambda g, u: fused_act.glu(g, u, act, **kwargs),
              lambda g, u: spec.torch_fn(g) * u,
              lambda g, u: spec.forward(g, 1.0) * u, params=lambda x: [_up(x)], **common)


def _packed_rows(n: int) -> tuple[int, ...]:
    """n elements as (tokens, 2 w): gate and up packed side by side, w as ``_rows``' width."""
    tokens, width = _rows(max(1, n // 2))
    return (tokens, 2 * width)


def _packed(spec: registry.Spec) -> BenchOp:
    """``act(gate) * up`` with gate and up the halves of one tensor x (``up=None``: a fused
    gate_up projection's output, read in place).  Forward reads x and writes half of it (1.5
    x-sized tensors), backward reads grad (half) and x and writes one packed gradient (2.5)."""
    act, kwargs = spec.function or spec.name, spec.kwargs

    def ref(x):
        g, u = reference.halves(x, -1)
        return spec.forward(g, 1.0) * u

    def eager(x):
        g, u = x.chunk(2, dim=-1)
        return spec.torch_fn(g) * u

    return BenchOp(lambda x: fused_act.glu(x, None, act, **kwargs), eager, ref, shape=_packed_rows,
              traffic=(1.5, 2.5), layers=tuple((t, 2 * w) for t, w in LLM_SHAPES),
              takes=_packed_shape, compile_key="glu")


# running statistics of each channel count and device, for the eval rows (fixed values)
_RUNNING: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _running(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    key = (c, x.device)
    if key not in _RUNNING:
        _RUNNING[key] = (torch.linspace(-1.0, 1.0, c, device=x.device),
                         torch.linspace(0.5, 2.0, c, device=x.device))
    return _RUNNING[key]


def _bn_params(x: torch.Tensor) -> list[torch.Tensor]:
    """BatchNorm's weight and bias, fp32 as a model's under autocast keeps them."""
    c = x.shape[1]
    return [_leaf(torch.empty(c, device=x.device).uniform_(0.5, 1.5)),
            _leaf(torch.randn(c, device=x.device))]


def _bn_act(training: bool, channels_last: bool = False) -> BenchOp:
    """BatchNorm2d -> SiLU: ``fused_act.batch_norm_act`` vs ``F.silu(F.batch_norm(...))``, on
    the batch statistics in training and folded running statistics in eval.  Training reads x
    twice forward (statistics, then y) and grad and x twice backward (sums, then dx): 3 and 5
    x-sized tensors, against eager's 5 and 8 (BatchNorm 3 + 5, SiLU 2 + 3); eval is one pass
    each way."""
    # training on batch statistics alone: a running statistic updated in place by every timed
    # forward would be one that torch's BatchNorm saves for the backward timed after them
    def running(x):
        return (None, None) if training else _running(x)

    def fused(x, w, b):
        return fused_act.batch_norm_act(x, *running(x), w, b, training, 0.1, 1e-5, "silu")

    def eager(x, w, b):
        return F.silu(F.batch_norm(x, *running(x), w, b, training, 0.1, 1e-5))

    def silu(z):
        return registry.SPECS["silu"].forward(z, 1.0)

    def ref(x, w, b):
        if training:
            return reference.batch_norm_act(x, w, b, 1e-5, silu)[0]
        rm, rv = _running(x)
        return reference.affine_act(x, rm, w * torch.rsqrt(rv + 1e-5), b, silu)

    return BenchOp(fused, eager, ref, _nchw, _bn_params, (3, 5) if training else (2, 3),
                   takes=_image, compile_key="batch_norm_act", channels_last=channels_last)


# the packed layout (up=None) is timed for SwiGLU alone: the other activations read it alike
PACKED = {"swiglu_packed": registry.SPECS["silu"]}

OPS: dict[str, BenchOp] = {
    **{bench_key(s): _elementwise(s) for s in registry.SPECS.values()},
    "acon_c": BenchOp(fused_act.acon_c, _acon_eager, reference.acon_c, _nchw, _acon_params,
                 takes=_image),
    "meta_acon": BenchOp(fused_act.acon_c, _acon_eager, reference.acon_c, _nchw,
                    lambda x: _acon_params(x, per_sample=True), takes=_image),
    # forward reads x and t, writes y; backward reads grad (and a 1-byte code), writes dx and dt
    "frelu_max": BenchOp(fused_act.frelu_max, torch.maximum, reference.frelu_max, _nchw,
                    lambda x: [_leaf(torch.randn_like(x))], (3, 3), takes=_image),
    "frelu_module": BenchOp(lambda x, *p: fused_act.frelu_max(x, _frelu_t(x, *p)),
                       lambda x, *p: torch.max(x, _frelu_t(x, *p)),
                       lambda x, *p: reference.frelu_max(x, _frelu_t(x, *p)), _nchw,
                       _frelu_params, None, ref_fp32=False, takes=_image),
    **{name: _gated(s) for name, s in GATED.items()},
    **{name: _packed(s) for name, s in PACKED.items()},
    "bn_silu_train": _bn_act(True),
    "bn_silu_train_cl": _bn_act(True, channels_last=True),
    "bn_silu_eval": _bn_act(False),
}

# peer libraries' kernels of a row's function, timed beside ours where importable and never a
# dependency: row -> (contestant, module, autograd.Function whose apply(gate, up) is the op)
PEERS: dict[str, tuple[str, str, str]] = {
    "swiglu": ("liger", "liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
    "geglu_tanh": ("liger", "liger_kernel.ops.geglu", "LigerGELUMulFunction"),
}


def layer_shapes(name: str, quick: bool) -> list[tuple[int, ...]]:
    """The real layer shapes op ``name`` is timed on unless the run names its own: LLM MLP
    shapes for the gated ops, conv and linear layers for the rest, those the op takes (the
    first two with quick)."""
    op = OPS[name]
    shapes = [s for s in op.layers or LAYER_SHAPES if op.takes(s)]
    return shapes[:2] if quick else shapes


def cases(name: str, sizes: list[int], shapes: list[tuple[int, ...]] | None, quick: bool
          ) -> list[tuple[int, ...]]:
    """The shapes op ``name`` is timed on: each size as the op's ``shape`` of that many
    elements, then the layer shapes ``shapes`` it takes, or where None its own
    (``layer_shapes``)."""
    op = OPS[name]
    layers = layer_shapes(name, quick) if shapes is None else shapes
    return [op.shape(n) for n in sizes] + [s for s in layers if op.takes(s)]


def _peer(name: str, device: str) -> tuple[str, Callable] | None:
    """(contestant, callable) of the peer kernel of row ``name``, or None where there is none,
    it does not import, or the tensors are not CUDA tensors (the peers' kernels need a GPU)."""
    if name not in PEERS or device != "cuda":
        return None
    label, module, attr = PEERS[name]
    try:
        return label, getattr(importlib.import_module(module), attr).apply
    except Exception:  # noqa: BLE001 - a peer that fails to import is absent, never fatal
        return None


def peers(device: str) -> dict[str, str]:
    """Each peer contestant: the package and version timed, or "absent: ..." saying why
    (recorded in results.json, so that a table without a peer's column says why)."""
    found = {}
    for label, module, _ in PEERS.values():
        found.setdefault(label, _peer_version(module, device))
    return found


def _peer_version(module: str, device: str) -> str:
    if device != "cuda":
        return "absent: its kernels need CUDA tensors"
    package = module.split(".")[0]
    try:
        importlib.import_module(module)
        return f"{package} {importlib.metadata.version(package.replace('_', '-'))}"
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        return f"absent: {type(e).__name__}: {e}"


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = TOL[dtype]
    return bool(torch.allclose(out.double(), want.double(), rtol=tol, atol=tol, equal_nan=True))


_compiled: dict[tuple[str, str, str], Callable] = {}


def _decomposed(fn: Callable, key: str, compile_backend: str) -> Callable:
    """``fn`` compiled with compile mode ``key`` "decompose" in force whenever it runs (a
    compiled graph is kept per mode, so the mode must hold at every call, not only the first)."""
    compiled = torch.compile(fn, backend=compile_backend)

    def call(*args: torch.Tensor) -> torch.Tensor:
        with compile_mode(key, "decompose"):
            return compiled(*args)

    return call


def contestants(name: str, compile_backend: str = "inductor", device: str = "cuda"
                ) -> dict[str, Callable]:
    """fused, fused_cuda (on a GPU where the CUDA kernels can run), eager, compiled, and where
    they apply decomposed (an op with a compile_key) and peer (``PEERS``, importable, CUDA
    tensors) callables of op ``name`` (one compiled function per op and kind)."""
    op = OPS[name]
    if (name, compile_backend, "compile") not in _compiled:
        _compiled[name, compile_backend, "compile"] = torch.compile(op.eager,
                                                                     backend=compile_backend)
        if op.compile_key:
            _compiled[name, compile_backend, "decompose"] = _decomposed(
                op.fused, op.compile_key, compile_backend)
    found = {"fused": op.fused}
    if device == "cuda" and fused_act.backend.cuda_status()[0]:
        found["fused_cuda"] = op.fused
    found |= {"eager": op.eager, "compile": _compiled[name, compile_backend, "compile"]}
    if op.compile_key:
        found["decompose"] = _compiled[name, compile_backend, "decompose"]
    peer = _peer(name, device)
    if peer is not None:
        found[peer[0]] = peer[1]
    return found


def make_inputs(op: BenchOp, shape: tuple[int, ...], dtype: torch.dtype, device: str
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(x, output gradient g, parameters) of one case: x normal times 4 and g normal, drawn
    from a seed of the shape, so every contestant and run sees the same values.  On device
    "meta" they have shapes and dtypes only: how the cases are checked without the memory."""
    gen = torch.Generator().manual_seed(math.prod(shape) % 2**31)

    def draw(size: torch.Size | tuple[int, ...], scale: float) -> torch.Tensor:
        if device == "meta":
            return torch.empty(size, device="meta", dtype=dtype)
        return (torch.randn(size, generator=gen) * scale).to(device=device, dtype=dtype)

    x = draw(shape, 4)
    torch.manual_seed(0)
    params = op.params(x)
    # the output's shape (a packed gated op's is half of x's), from a run on meta tensors
    out = op.eager(x.to("meta"), *(p.detach().to("meta") for p in params)).shape
    g = draw(out, 1)
    if op.channels_last:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    return x, g, params


def copies(x: torch.Tensor, params: list[torch.Tensor]
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fresh copies of x and the parameters for one contestant: Liger-Kernel's backward writes
    its gradients into its saved inputs, which must not reach the next contestant or the
    reference."""
    return x.detach().clone(), [p.detach().clone().requires_grad_(p.requires_grad)
                                for p in params]


def check(name: str, fn: Callable, x: torch.Tensor, g: torch.Tensor,
          params: list[torch.Tensor]) -> None:
    """Raise unless ``fn`` gives the reference's output and the gradients of its data inputs
    (x, and up for a gated op)."""
    op = OPS[name]
    xg, ps = copies(x, params)
    y = fn(xg.requires_grad_(), *ps)
    grads = torch.autograd.grad(y, [xg, *ps[:op.inputs - 1]], g)
    dtype = torch.float32 if op.ref_fp32 else x.dtype
    xr = x.detach().to(dtype).requires_grad_()
    pr = [p.detach().to(dtype) for p in params]
    data = [xr, *(p.requires_grad_() for p in pr[:op.inputs - 1])]
    want = op.ref(xr, *pr)
    wants = torch.autograd.grad(want, data, g.to(dtype))
    labels = ["output", "input gradient"] + [f"gradient of input {i + 1}"
                                             for i in range(1, op.inputs)]
    for i, (what, got, ref) in enumerate(zip(labels, (y, *grads), (want, *wants), strict=True)):
        if not _close(got, ref, x.dtype):
            raise AssertionError(f"{name} {x.dtype} {tuple(x.shape)}: {what} differs from the "
                                 f"reference: {_mismatch(op, x, g, params, got, ref, i)}")


def _mismatch(op: BenchOp, x: torch.Tensor, g: torch.Tensor, params: list[torch.Tensor],
              got: torch.Tensor, ref: torch.Tensor, which: int) -> str:
    """Where ``got`` and the reference ``ref`` disagree, and what the float64 reference says
    there: whether the op or the reference in its dtype is off (all a GPU run may leave)."""
    tol = TOL[x.dtype]
    bad = ~torch.isclose(got.double(), ref.double(), rtol=tol, atol=tol, equal_nan=True)
    xr = x.detach().double().requires_grad_()
    pr = [p.detach().double() for p in params]
    data = [xr, *(p.requires_grad_() for p in pr[:op.inputs - 1])]
    want = op.ref(xr, *pr)
    exact = (want, *torch.autograd.grad(want, data, g.double()))[which]
    flat = [t.detach().flatten() for t in (got, ref, exact, x)]
    idx = bad.flatten().nonzero()[:4].flatten()
    pairs = [(int(i), *(float(t[i]) for t in flat)) for i in idx]
    return (f"{int(bad.sum())} of {bad.numel()} elements off; [index, got, reference, float64 "
            f"reference, x]: {pairs}")
