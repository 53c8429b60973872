"""torch.compile pipelines: a realistic block per op, timed forward+backward five ways.

A block is Linear -> activation -> residual add for the elementwise activations,
Conv -> BatchNorm -> activation -> residual add for ACON-C, Meta-ACON and FReLU, and for the
gated ops a transformer's gated MLP (Linear gate and up -> gated activation -> Linear down) with
a residual add, in bf16.  The plain block uses PyTorch's modules (or the published ACON/FReLU
modules, written here in PyTorch; an activation torch.nn has no class for: a module calling the
spec's ``torch_fn``); the fused block is the same model after ``fused_act.replace_activations``
(the MLP: after ``fused_act.patch_gated_mlps``, a ``GatedMLP``), or, where that does not know
the activation (a learnable beta, no torch.nn class), with the fused activation put in its
place.  Timed: eager plain, compiled plain, eager fused, and compiled fused with the op
opaque and decomposed (``fused_act.config.compile_mode``), each first checked against the eager
plain block.  The faster compiled-fused variant is the op's choice.
"""

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

import fused_act
from bench.table import GATED, bench_key
from bench.timing import build_on_stream, compile_mode, peak_mb, tensor_device, time_ms
from fused_act import registry


class LearnableBeta(nn.Module):
    """An activation with a beta (Swish: x sigmoid(beta x)) and one learnable beta, as users
    write it: the spec's ``torch_fn``.  (One beta, not one per channel: in a (batch, tokens,
    features) block there is no channel dim 1.)"""

    def __init__(self, spec: registry.Spec) -> None:
        super().__init__()
        self.fn = spec.torch_fn
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.beta)


class TorchFunction(nn.Module):
    """An activation torch.nn has no class for, as users write it: the spec's ``torch_fn``."""

    def __init__(self, spec: registry.Spec) -> None:
        super().__init__()
        self.fn = spec.torch_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class FusedFunction(nn.Module):
    """The fused function of a spec (``fused_act.<function>``), with one learnable beta where
    the spec has a beta: what replaces an activation ``replace_activations`` does not swap."""

    def __init__(self, spec: registry.Spec) -> None:
        super().__init__()
        self.spec = spec
        if spec.beta:
            self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.call(x, *([self.beta] if self.spec.beta else []))


class AconC(nn.Module):
    """The published ACON-C module's layout and forward (recognised by replace_activations)."""

    def __init__(self, c1: int) -> None:
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(self.beta * dpx) + self.p2 * x


class MetaAconC(nn.Module):
    """The published Meta-ACON module (no BatchNorm in its beta network)."""

    def __init__(self, c1: int, k: int = 1, s: int = 1, r: int = 16) -> None:
        super().__init__()
        c2 = max(r, c1 // r)
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.fc1 = nn.Conv2d(c1, c2, k, s, bias=True)
        self.fc2 = nn.Conv2d(c2, c1, k, s, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        beta = torch.sigmoid(self.fc2(self.fc1(y)))
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(beta * dpx) + self.p2 * x


class FReLU(nn.Module):
    """The published FReLU module."""

    def __init__(self, c1: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c1, k, 1, k // 2, groups=c1, bias=False)
        self.bn = nn.BatchNorm2d(c1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.max(x, self.bn(self.conv(x)))


class Residual(nn.Module):
    """body(x) + x."""

    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class MLP(nn.Module):
    """A transformer's gated MLP as model code writes it, ``down_proj(act_fn(gate_proj(x)) *
    up_proj(x))`` without biases: the layout ``patch_gated_mlps`` recognises."""

    def __init__(self, hidden: int, intermediate: int, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear_block(act: nn.Module, h: int) -> nn.Module:
    return Residual(nn.Linear(h, h), act)


def _conv_block(act: nn.Module, c: int) -> nn.Module:
    return Residual(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act)


def _torch_class(spec: registry.Spec) -> type[nn.Module] | None:
    """torch.nn's class of an elementwise spec (``Spec.replaces``), if it has one; a name that
    torch.nn lacks is a mistake in the spec, not an activation without a class."""
    if not spec.replaces or spec.beta:
        return None
    if not hasattr(nn, spec.replaces):
        raise ValueError(f"spec {spec.name!r} replaces torch.nn.{spec.replaces}, which torch.nn "
                         "does not have")
    return getattr(nn, spec.replaces)


def _torch_module(spec: registry.Spec) -> Callable[[int], nn.Module]:
    """The module users have for an elementwise spec: ``LearnableBeta`` above for a spec with a
    beta, torch.nn's class that the spec replaces, with its arguments, or, where torch.nn has
    none, ``TorchFunction`` over the spec's own function."""
    if spec.beta:
        return lambda c: LearnableBeta(spec)
    cls = _torch_class(spec)
    if cls is None:
        return lambda c: TorchFunction(spec)
    return lambda c: cls(**spec.kwargs)


def _fused_module(spec: registry.Spec) -> Callable[[], nn.Module]:
    """The fused activation of a spec that ``replace_activations`` does not put in itself: with
    a beta, its fused module with the beta learnable (``LearnableBeta`` is left alone), else
    (no torch.nn class) ``FusedFunction``; a spec with a beta but no module gets that too."""
    if spec.beta and spec.module:
        return lambda: getattr(fused_act.nn, spec.module)(learnable=True)
    return lambda: FusedFunction(spec)


# op -> (config key, block kind, activation factory taking the channel count)
BLOCKS: dict[str, tuple[str, str, Callable[[int], nn.Module]]] = {
    **{bench_key(s): (s.name, "linear", _torch_module(s)) for s in registry.SPECS.values()},
    "acon_c": ("acon_c", "conv", AconC),
    "meta_acon": ("acon_c", "conv", MetaAconC),
    "frelu_max": ("frelu_max", "conv", FReLU),
    "frelu_module": ("frelu_max", "conv", FReLU),
    # its fused block is replace_activations' (BatchNorm and SiLU as one module)
    "bn_silu_train": ("batch_norm_act", "conv", lambda c: nn.SiLU()),
    # the activation factory takes the intermediate width; a learnable beta has no MLP block,
    # as patch_gated_mlps patches only activations of fixed arguments
    **{name: ("glu", "mlp", _torch_module(s)) for name, s in GATED.items() if not s.beta},
}
# op -> its fused activation, where replace_activations does not make it (a learnable beta, an
# activation without a torch.nn class)
FUSED: dict[str, Callable[[], nn.Module]] = {
    bench_key(s): _fused_module(s) for s in registry.SPECS.values() if _torch_class(s) is None}
# gated op -> (glu's activation, its arguments), where patch_gated_mlps does not know the plain
# MLP's activation (no torch.nn class): its GatedMLP is built over the block's projections
FUSED_MLP: dict[str, tuple[str, dict]] = {
    name: (s.function or s.name, s.kwargs) for name, s in GATED.items()
    if not s.beta and _torch_class(s) is None}

# the MLP block's x (batch, sequence, hidden) and intermediate width: a Llama-2-7B layer on 8192
# tokens (its gate is table.LLM_SHAPES' first); with --quick half the tokens and widths
MLP_SIZES = {"full": ((8, 1024, 4096), 11008), "quick": ((4, 1024, 2048), 5504),
             "cpu": ((2, 16, 32), 64)}
# the other blocks' x: a linear block's (batch, tokens, features), a conv block's (N, C, H, W)
BLOCK_SHAPES = {"linear": {"full": (16, 1024, 1024), "quick": (8, 512, 1024), "cpu": (2, 16, 32)},
                "conv": {"full": (32, 64, 112, 112), "quick": (16, 64, 56, 56),
                         "cpu": (2, 16, 6, 6)}}
# how close each variant's output and input gradient must come to the eager plain block's,
# relative to its largest magnitude: loose enough for TF32 convolutions and another summation
# order, tight enough that another function fails
BLOCK_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


def _size(device: str, quick: bool) -> str:
    return "cpu" if device != "cuda" else "quick" if quick else "full"


def _mlp_sizes(device: str, quick: bool) -> tuple[tuple[int, ...], int]:
    return MLP_SIZES[_size(device, quick)]


def _shape(kind: str, device: str, quick: bool) -> tuple[int, ...]:
    if kind == "mlp":
        return _mlp_sizes(device, quick)[0]
    return BLOCK_SHAPES[kind][_size(device, quick)]


def _blocks(name: str, kind: str, act: Callable[[int], nn.Module], shape: tuple[int, ...],
            device: str, quick: bool) -> tuple[nn.Module, nn.Module, str]:
    """(plain block, fused block, label) of op ``name``."""
    torch.manual_seed(0)
    tensors = tensor_device(device)
    if kind == "mlp":
        width = _mlp_sizes(device, quick)[1]
        plain = Residual(MLP(shape[-1], width, act(width))).to(tensors, torch.bfloat16)
        fused = copy.deepcopy(plain)
        if name in FUSED_MLP:
            activation, kwargs = FUSED_MLP[name]
            mlp = fused.body[0]
            fused.body[0] = fused_act.nn.GatedMLP(mlp.down_proj, activation,
                                                  gate_proj=mlp.gate_proj, up_proj=mlp.up_proj,
                                                  **kwargs)
            return plain, fused, f"mlp {tuple(shape)} -> {width} bf16"
        report = fused_act.patch_gated_mlps(fused)
        if not report.swapped:
            raise RuntimeError(f"{name}: patch_gated_mlps left the MLP block: {report}")
        return plain, fused, f"mlp {tuple(shape)} -> {width} bf16"
    width = shape[-1] if kind == "linear" else shape[1]
    make = _linear_block if kind == "linear" else _conv_block
    plain = make(act(width), width).to(tensors)
    fused = copy.deepcopy(plain)
    # the op's own block: BatchNorm fused with the activation only in the BatchNorm block
    fused_act.replace_activations(
        fused, exclude=[] if BLOCKS[name][0] == "batch_norm_act" else ["BatchNorm2d"])
    if BLOCKS[name][0] == "batch_norm_act" and not any(
            isinstance(m, fused_act.nn.BatchNormAct2d) for m in fused.modules()):
        raise RuntimeError(f"{name}: replace_activations left BatchNorm and the activation apart")
    if name in FUSED:
        fused.body[1] = FUSED[name]().to(tensors)
    return plain, fused, f"{kind} {tuple(shape)}"


def run(ops: list[str], device: str, quick: bool, compile_backend: str = "inductor"
        ) -> list[dict]:
    """Forward+backward ms of each op's block, five ways (ops without a block are skipped)."""
    out = []
    for name in dict.fromkeys(n for n in ops if n in BLOCKS):
        key, kind, act = BLOCKS[name]
        shape = _shape(kind, device, quick)
        plain, fused, label = _blocks(name, kind, act, shape, device, quick)
        dtype = next(plain.parameters()).dtype
        x = torch.randn(shape, device=tensor_device(device), dtype=dtype, requires_grad=True)
        want = _output_and_grad(plain, x)
        variants = {"eager torch": (plain, None), "compile torch": (plain, "plain"),
                    "eager fused": (fused, None), "compile opaque": (fused, "opaque"),
                    "compile decompose": (fused, "decompose")}
        ms = {}
        for variant, (model, mode) in variants.items():
            ms[variant] = _time_block(model, x, mode, key, device, quick, compile_backend,
                                      (f"{name} {variant}", want))
        out.append(dict(op=name, block=label, config_key=key, ms=ms))
    return out


def _output_and_grad(fn: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = fn(x)
    return y.detach(), torch.autograd.grad(y.square().mean(), x)[0]


def _check_block(fn: Callable, x: torch.Tensor, what: str,
                 want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Raise unless ``fn`` gives the eager plain block's output and input gradient."""
    for label, got, ref in zip(("output", "input gradient"), _output_and_grad(fn, x), want,
                               strict=True):
        err = (got.double() - ref.double()).abs().max().item()
        if not err <= BLOCK_TOL[x.dtype] * max(ref.double().abs().max().item(), 1e-30):
            raise AssertionError(f"{what} {tuple(x.shape)}: {label} differs from the eager "
                                 f"plain block's (max difference {err:.3g})")


def _time_block(model: nn.Module, x: torch.Tensor, mode: str | None, key: str, device: str,
                quick: bool, compile_backend: str,
                check: tuple[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Forward+backward ms of ``model`` eager (``mode`` None) or compiled (``mode``: "plain",
    or our op's compile mode), after ``check`` = (label, eager plain output and gradient)."""
    ours = mode in ("opaque", "decompose")
    with compile_mode(key, mode) if ours else contextlib.nullcontext():
        torch._dynamo.reset()
        fn = torch.compile(model, fullgraph=True, backend=compile_backend) if mode else model
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            return torch.autograd.grad(fn(x).square().mean(), [x, *params])

        with build_on_stream(device):
            _check_block(fn, x, *check)  # also compiles, outside the timed region
            step()
        return time_ms(step, x.numel(), quick, device)


def mlp_recompute(device: str, quick: bool) -> list[dict]:
    """The swiglu MLP block (bf16, ``MLP_SIZES``) forward+backward in eager mode three ways:
    PyTorch's, fused keeping h = silu(gate) * up for down_proj (``recompute=False``) and fused
    recomputing it (``recompute=True``, on every device; the default does so off the CPU only),
    each first checked against PyTorch's.  Per way: ms (host timers on the CPU, as
    ``time_ms``), the MiB autograd keeps (``saved_mib``) and the step's peak MiB on a GPU.
    Compiled blocks take the plain path (AOTAutograd decides), so only eager is measured."""
    shape, width = _mlp_sizes(device, quick)
    torch.manual_seed(0)
    plain = Residual(MLP(shape[-1], width, nn.SiLU())).to(tensor_device(device), torch.bfloat16)
    x = torch.randn(shape, device=tensor_device(device), dtype=torch.bfloat16,
                    requires_grad=True)
    want = _output_and_grad(plain, x)
    rows = []
    for variant, recompute in (("eager torch", None), ("fused, h kept", False),
                               ("fused, h recomputed", True)):
        model = plain
        if recompute is not None:
            model = copy.deepcopy(plain)
            if not fused_act.patch_gated_mlps(model, recompute=recompute).swapped:
                raise RuntimeError("patch_gated_mlps left the MLP block")
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model: nn.Module = model, params: list = params) -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(model(x).square().mean(), [x, *params])

        with build_on_stream(device):
            _check_block(model, x, f"mlp {variant}", want)
            step()
        rows.append(dict(variant=variant, block=f"mlp {tuple(shape)} -> {width} bf16",
                         ms=time_ms(step, x.numel(), quick, device),
                         saved_mib=saved_mib(model, x), peak_mb=peak_mb(step, device)))
    return rows


# whole timm models, one SGD training step each: (timm name, its arguments); their batch by run
MODELS = {"resnet10t (mish)": ("resnet10t", {"act_layer": "mish"}),
          "efficientnet_b0": ("efficientnet_b0", {})}
MODEL_INPUT = {"full": (64, 3, 224, 224), "quick": (32, 3, 160, 160), "cpu": (2, 3, 64, 64)}


def model_steps(device: str, quick: bool) -> list[dict]:
    """Each of ``MODELS`` (random weights, 10 classes): one SGD step (forward, cross entropy,
    backward, step) original vs fused (``replace_activations``, BatchNorm pairs included, from
    the same weights), the fused model first checked against the original
    (``_check_model``).  On a GPU channels_last under bf16 autocast, as such models train; on
    the CPU fp32.  Per way: ms, the MiB autograd keeps and peak MiB (GPU).  A model whose
    package is missing raises."""
    import timm

    gpu = device == "cuda"
    tensors = tensor_device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(MODEL_INPUT[_size(device, quick)], generator=gen).to(tensors)
    x = x.contiguous(memory_format=torch.channels_last) if gpu else x
    target = torch.randint(0, 10, (x.shape[0],), generator=gen).to(tensors)
    rows = []
    for label, (name, kwargs) in MODELS.items():
        torch.manual_seed(0)
        original = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).to(
            tensors, memory_format=torch.channels_last if gpu else torch.preserve_format)
        fused = copy.deepcopy(original)
        swapped = len(fused_act.replace_activations(fused).swapped)
        _check_model(label, original, fused, x, autocast=gpu)
        for way, model in (("original", original), ("fused", fused)):
            rows.append(dict(model=label, way=way, swapped=swapped,
                             **_model_step(model, x, target, device, quick)))
    return rows


def _check_model(label: str, original: nn.Module, fused: nn.Module, x: torch.Tensor,
                 autocast: bool) -> None:
    """Raise unless the fused model's train-mode logits on ``x`` are the original's: in fp32
    (no TF32) to ``BLOCK_TOL``; and where the steps run under bf16 autocast, its bf16 logits
    no further from the original's fp32 logits than twice the original's own bf16 logits are
    (or ``BLOCK_TOL`` of bf16, where more).  A fixed bf16 tolerance would not tell a wrong
    fused model from rounding: batch statistics over few values amplify bf16's, and
    efficientnet_b0's bf16 logits (torch's own model) are 5% of their largest value off fp32
    at 32x3x224x224 and 36% at 2x3x64x64 (measured on the CPU)."""
    want = _logits(original, x, autocast=False)
    scale = max(want.abs().max().item(), 1.0)
    err = (_logits(fused, x, autocast=False) - want).abs().max().item()
    if not err <= BLOCK_TOL[torch.float32] * scale:
        raise AssertionError(f"{label}: the fused model's fp32 logits differ from the "
                             f"original's by {err:.3g}")
    if autocast:
        own = (_logits(original, x, autocast=True) - want).abs().max().item()
        err = (_logits(fused, x, autocast=True) - want).abs().max().item()
        if not err <= max(2 * own, BLOCK_TOL[torch.bfloat16] * scale):
            raise AssertionError(f"{label}: the fused model's bf16 logits differ from the "
                                 f"original's fp32 ones by {err:.3g}, the original's bf16 "
                                 f"ones by {own:.3g}")


def _logits(model: nn.Module, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """``model``'s logits on ``x`` in train mode (batch statistics), from a copy so that its
    running statistics do not move: under bf16 autocast, or else in fp32 without TF32."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast), torch.no_grad():
            return copy.deepcopy(model)(x).float()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _model_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, device: str,
                quick: bool) -> dict:
    """Batch, ms, saved MiB and peak MiB of one SGD step of ``model``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(x.device.type, torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()

    with build_on_stream(device):
        step()
    with amp():
        saved = saved_mib(model, x)
    return dict(batch=list(x.shape), ms=time_ms(step, x.numel(), quick, device),
                saved_mib=saved, peak_mb=peak_mb(step, device))


def saved_mib(model: nn.Module, x: torch.Tensor) -> float:
    """The MiB autograd keeps for ``model(x)``'s backward, each storage once, the parameters
    left out (the same in every way of running a block)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values()) / 2**20


def choose(pipelines: list[dict]) -> dict[str, str]:
    """The faster compile mode per op (ops sharing a config key: the first row decides)."""
    choice = {}
    for p in pipelines:
        ms = p["ms"]
        choice.setdefault(p["op"], "opaque" if ms["compile opaque"] <= ms["compile decompose"]
                          else "decompose")
    return choice
