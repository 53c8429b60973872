"""torch.compile pipelines: a realistic block per op, timed forward+backward five ways.

A block is Linear -> activation -> residual add for the elementwise activations, and
Conv -> BatchNorm -> activation -> residual add for ACON-C, Meta-ACON and FReLU.  The plain
block uses PyTorch's modules (or the published ACON/FReLU modules, written here in PyTorch); the
fused block is the same model after ``fused_act.replace_activations``.  Timed: eager plain,
compiled plain, eager fused, and compiled fused with the op opaque and decomposed
(``fused_act.config.compile_mode``).  The faster compiled-fused variant is the op's choice.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn

import fused_act
from bench.table import bench_key
from bench.timing import build_on_stream, time_ms
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


def _linear_block(act: nn.Module, h: int) -> nn.Module:
    return Residual(nn.Linear(h, h), act)


def _conv_block(act: nn.Module, c: int) -> nn.Module:
    return Residual(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act)


def _cannot(spec: registry.Spec, why: str) -> Callable[..., nn.Module]:
    """A factory that says why ``spec``'s block cannot be built, when it is asked for one."""
    def build(*_: object) -> nn.Module:
        raise ValueError(f"bench.pipelines: no block for {spec.name!r}: {why}")
    return build


def _torch_module(spec: registry.Spec) -> Callable[[int], nn.Module]:
    """The module users have for an elementwise spec: ``LearnableBeta`` above for a spec with a
    beta, else torch.nn's class that the spec replaces, with its arguments (a factory that raises
    where there is none)."""
    if spec.beta:
        return lambda c: LearnableBeta(spec)
    cls = getattr(nn, spec.replaces, None) if spec.replaces else None
    if cls is None:
        return _cannot(spec, f"no torch.nn class to build its PyTorch block from (replaces="
                             f"{spec.replaces!r}) and no beta")
    return lambda c: cls(**spec.kwargs)


def _fused_module(spec: registry.Spec) -> Callable[[], nn.Module]:
    """The fused module of a spec with a beta, its beta learnable (``replace_activations``
    leaves ``LearnableBeta`` alone; a factory that raises where the spec has no module)."""
    if not spec.module:
        return _cannot(spec, "a beta but no fused_act.nn module (Spec.module)")
    return lambda: getattr(fused_act.nn, spec.module)(learnable=True)


# op -> (config key, block kind, activation factory taking the channel count)
BLOCKS: dict[str, tuple[str, str, Callable[[int], nn.Module]]] = {
    **{bench_key(s): (s.name, "linear", _torch_module(s)) for s in registry.SPECS.values()},
    "acon_c": ("acon_c", "conv", AconC),
    "meta_acon": ("acon_c", "conv", MetaAconC),
    "frelu_max": ("frelu_max", "conv", FReLU),
    "frelu_module": ("frelu_max", "conv", FReLU),
}
# op -> its fused activation, where replace_activations does not make it (a learnable beta)
FUSED: dict[str, Callable[[], nn.Module]] = {
    bench_key(s): _fused_module(s) for s in registry.SPECS.values() if s.beta}


def _shape(kind: str, device: str, quick: bool) -> tuple[int, ...]:
    if device != "cuda":
        return (2, 16, 32) if kind == "linear" else (2, 16, 6, 6)
    if kind == "linear":
        return (8, 512, 1024) if quick else (16, 1024, 1024)
    return (16, 64, 56, 56) if quick else (32, 64, 112, 112)


def run(ops: list[str], device: str, quick: bool, compile_backend: str = "inductor"
        ) -> list[dict]:
    """Forward+backward ms of each op's block, five ways."""
    out = []
    for name in dict.fromkeys(ops):
        key, kind, act = BLOCKS[name]
        shape = _shape(kind, device, quick)
        width = shape[-1] if kind == "linear" else shape[1]
        torch.manual_seed(0)
        make = _linear_block if kind == "linear" else _conv_block
        plain = make(act(width), width).to(device)
        fused = copy.deepcopy(plain)
        fused_act.replace_activations(fused)
        if name in FUSED:
            fused.body[1] = FUSED[name]().to(device)
        x = torch.randn(shape, device=device, requires_grad=True)
        variants = {"eager torch": (plain, None), "compile torch": (plain, "plain"),
                    "eager fused": (fused, None), "compile opaque": (fused, "opaque"),
                    "compile decompose": (fused, "decompose")}
        ms = {}
        for label, (model, mode) in variants.items():
            ms[label] = _time_block(model, x, mode, key, device, quick, compile_backend)
        out.append(dict(op=name, block=f"{kind} {tuple(shape)}", config_key=key, ms=ms))
    return out


def _time_block(model: nn.Module, x: torch.Tensor, mode: str | None, key: str, device: str,
                quick: bool, compile_backend: str) -> float:
    previous = fused_act.config.compile_mode
    if mode in ("opaque", "decompose"):
        fused_act.config.compile_mode = {key: mode}
    try:
        torch._dynamo.reset()
        fn = torch.compile(model, fullgraph=True, backend=compile_backend) if mode else model
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            return torch.autograd.grad(fn(x).square().mean(), [x, *params])

        with build_on_stream(device):
            step()  # compile outside the timed region
        return time_ms(step, x.numel(), quick, device)
    finally:
        fused_act.config.compile_mode = previous


def choose(pipelines: list[dict]) -> dict[str, str]:
    """The faster compile mode per op (ops sharing a config key: the first row decides)."""
    choice = {}
    for p in pipelines:
        ms = p["ms"]
        choice.setdefault(p["op"], "opaque" if ms["compile opaque"] <= ms["compile decompose"]
                          else "decompose")
    return choice
