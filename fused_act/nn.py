"""Drop-in ``nn.Module``s: same constructor arguments and state_dicts as the modules they replace.

``AconC`` and ``MetaAconC`` match the ACON paper's published modules (and, with ``bn=True``, the
authors' original Meta-ACON with BatchNorm).

``Mish``, ``SiLU`` and ``GELU`` take torch.nn's arguments and have no state; ``Swish`` has a
float beta or, when learnable, a ``beta`` parameter of ``num_parameters`` values (1, or C for a
per-channel beta, as ``torch.nn.PReLU``).  ``inplace=True`` overwrites the input when no gradient
is needed; when one is, the fused backward needs the input intact, so the module computes out of
place and warns once.
"""

import inspect
import warnings

import torch
from torch import Tensor, nn

from . import functional, ops
from .registry import SPECS

_warned_inplace = False


def _inplace(x: Tensor, name: str, module: str) -> Tensor | None:
    """f(x) written into ``x`` when that is safe, else None (after a one-time warning)."""
    global _warned_inplace
    if not (torch.is_grad_enabled() and x.requires_grad):
        return ops.apply_(x, name)
    if not _warned_inplace:
        _warned_inplace = True
        warnings.warn(f"fused_act.nn.{module}(inplace=True): the input requires grad and the "
                      "fused backward needs it, so the result is computed out of place",
                      stacklevel=3)
    return None


class FusedModule(nn.Module):
    """What every fused_act module shares: TorchScript is refused with a clear error.

    Scripting compiles ``forward`` from its source, and ours calls the fused custom ops through
    Python; ``torch.jit.trace`` records the reference math instead and works on every backend.
    """

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(f"fused_act.nn.{type(self).__name__} cannot be compiled by "
                           "torch.jit.script; use torch.compile or torch.export (or "
                           "torch.jit.trace, which records the reference math)")


class _InplaceActivation(FusedModule):
    """A stateless activation with torch.nn's ``inplace`` argument."""

    op = ""  # the public function in fused_act.functional, a spec of fused_act/registry.py

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            functional._check_x(self.op, x)
            y = _inplace(x, self.op, type(self).__name__)
            if y is not None:
                return y
        return getattr(functional, self.op)(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class Mish(_InplaceActivation):
    """Mish, ``x * tanh(softplus(x))``; a drop-in for ``torch.nn.Mish``."""

    op = "mish"


class SiLU(_InplaceActivation):
    """SiLU, ``x * sigmoid(x)``; a drop-in for ``torch.nn.SiLU``."""

    op = "silu"


class GELU(FusedModule):
    """GELU with ``approximate="none"`` or ``"tanh"``; a drop-in for ``torch.nn.GELU``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"fused_act.nn.GELU: approximate must be 'none' or 'tanh' "
                             f"(got {approximate!r})")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return functional.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Swish(FusedModule):
    """Swish, ``x * sigmoid(beta * x)`` with a fixed or learnable beta.

    ``learnable=True`` makes ``beta`` a parameter of ``num_parameters`` values initialised to
    ``beta``: 1 (shared) or C = ``x.shape[1]`` (per channel, as ``torch.nn.PReLU``).  Its gradient
    is reduced inside the fused backward kernel.
    """

    def __init__(self, beta: float = 1.0, learnable: bool = False, num_parameters: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        if num_parameters < 1:
            raise ValueError(f"fused_act.nn.Swish: num_parameters must be >= 1 "
                             f"(got {num_parameters})")
        if num_parameters != 1 and not learnable:
            raise ValueError("fused_act.nn.Swish: num_parameters > 1 needs learnable=True")
        self.learnable = learnable
        self.num_parameters = num_parameters
        if learnable:
            self.beta = nn.Parameter(torch.full((num_parameters,), float(beta), device=device,
                                                dtype=dtype))
        else:
            self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return functional.swish(x, self.beta)

    def extra_repr(self) -> str:
        if self.learnable:
            return f"learnable=True, num_parameters={self.num_parameters}"
        return f"beta={self.beta}"


class AconC(FusedModule):
    """ACON-C (Ma et al., "Activate or Not", 2021): ``(p1 - p2) x sigmoid(beta (p1 - p2) x) +
    p2 x`` with learnable per-channel ``p1``, ``p2``, ``beta`` of shape (1, C, 1, 1).

    Parameter names, shapes and initialisation (randn, randn, ones) match the paper's published
    module, so its state_dicts load as they are.  Takes (N, C, H, W) or (N, C) input.  Keep the
    parameters out of weight decay.
    """

    def __init__(self, c1: int) -> None:
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return functional.acon_c(x, self.p1, self.p2, self.beta)


class MetaAconC(FusedModule):
    """Meta-ACON: ACON-C whose beta is computed per sample and channel by a small network,
    ``beta = sigmoid(fc2(fc1(mean of x over H, W))))``, with 1x1 (``k``) convolutions through
    ``c2 = max(r, c1 // r)`` channels.

    ``bn=False`` (default) is the form most detection code ships; ``bn=True`` adds ``bn1`` after
    ``fc1`` and ``bn2`` after ``fc2``, as in the ACON authors' original module.  Parameter and
    buffer names, shapes and initialisation match both, so their checkpoints load as they are.
    The beta network runs in PyTorch; the activation itself is the fused per-sample ACON-C.
    """

    def __init__(self, c1: int, k: int = 1, s: int = 1, r: int = 16, bn: bool = False) -> None:
        super().__init__()
        c2 = max(r, c1 // r)
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.fc1 = nn.Conv2d(c1, c2, k, s, bias=True)
        self.bn1 = nn.BatchNorm2d(c2) if bn else nn.Identity()
        self.fc2 = nn.Conv2d(c2, c1, k, s, bias=True)
        self.bn2 = nn.BatchNorm2d(c1) if bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)  # as the published module
        beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(y)))))
        return functional.acon_c(x, self.p1, self.p2, beta)


class FReLU(FusedModule):
    """FReLU (Ma et al., "Funnel Activation for Visual Recognition", 2020):
    ``max(x, bn(conv(x)))`` with a depthwise ``k`` x ``k`` convolution ``conv`` (padding k // 2,
    no bias) and BatchNorm ``bn``, named and shaped as the paper's published module.

    The convolution and, in training, BatchNorm run in PyTorch; the max step is fused and saves
    one byte per element for backward.  In eval mode, when no gradient is needed, BatchNorm's
    running statistics and affine parameters fold into a per-channel ``a t + b`` inside the max
    kernel, so BatchNorm makes no pass of its own.
    """

    def __init__(self, c1: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c1, k, 1, k // 2, groups=c1, bias=False)
        self.bn = nn.BatchNorm2d(c1)

    def forward(self, x: Tensor) -> Tensor:
        t = self.conv(x)
        bn = self.bn
        if bn.training or bn.running_mean is None or bn.running_var is None or (
                torch.is_grad_enabled() and (t.requires_grad or any(
                    p.requires_grad for p in bn.parameters()))):
            return functional.frelu_max(x, bn(t))
        functional._check_frelu_pair("nn.FReLU", x, t)
        acc = torch.promote_types(bn.running_var.dtype, torch.float32)  # fp32, or fp64
        a = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.to(acc)
        b = -bn.running_mean.to(acc) * a
        if bn.bias is not None:
            b = b + bn.bias.to(acc)
        return ops.apply_frelu_max_affine(x, t, a, b)


# ---- replace_activations -------------------------------------------------------------------

def _has(m: nn.Module, names: tuple[str, ...]) -> bool:
    return all(hasattr(m, n) for n in names)


def _channel_params(m: nn.Module, names: tuple[str, ...]) -> int | None:
    """C if each named attribute is a (1, C, 1, 1) parameter, else None."""
    shapes = {tuple(getattr(m, n).shape) for n in names if isinstance(getattr(m, n, None),
                                                                      nn.Parameter)}
    if len(shapes) != 1:
        return None
    (shape,) = shapes
    return shape[1] if len(shape) == 4 and shape[0] == shape[2] == shape[3] == 1 else None


def _from_torch(m: nn.Module) -> nn.Module | None:
    """Ours for a torch.nn activation (the spec that ``replaces`` its class), with the module's
    arguments of the same names (inplace, approximate)."""
    kind = type(m).__name__
    if type(m) is not getattr(nn, kind, None):
        return None
    ours = globals()[_TORCH[kind]]
    args = inspect.signature(ours).parameters
    return ours(**{a: getattr(m, a) for a in args if hasattr(m, a)})


def _from_acon(m: nn.Module) -> nn.Module | None:
    if _has(m, ("p1", "p2", "beta")) and _channel_params(m, ("p1", "p2", "beta")):
        return AconC(m.p1.shape[1])
    return None


def _meta_r(c1: int, c2: int) -> int | None:
    """An r with max(r, c1 // r) == c2, the hidden width of a Meta-ACON beta network."""
    return next((r for r in range(1, max(c1, c2) + 1) if max(r, c1 // r) == c2), None)


def _from_meta_acon(m: nn.Module) -> nn.Module | None:
    if not (_has(m, ("p1", "p2", "fc1", "fc2")) and _channel_params(m, ("p1", "p2"))):
        return None
    fc1, fc2 = m.fc1, m.fc2
    if not (isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d)):
        return None
    c1, c2 = fc1.in_channels, fc1.out_channels
    bn = isinstance(getattr(m, "bn1", None), nn.BatchNorm2d)
    r = _meta_r(c1, c2)
    if r is None or fc2.in_channels != c2 or fc2.out_channels != c1 or c1 != m.p1.shape[1]:
        return None
    if fc1.bias is None or fc2.bias is None or fc1.kernel_size[0] != fc1.kernel_size[1]:
        return None
    return MetaAconC(c1, fc1.kernel_size[0], fc1.stride[0], r, bn=bn)


def _from_frelu(m: nn.Module) -> nn.Module | None:
    conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return None
    c1, k = conv.in_channels, conv.kernel_size[0]
    shape = (conv.out_channels, conv.groups, conv.kernel_size, conv.stride, conv.padding)
    if conv.bias is not None or shape != (c1, c1, (k, k), (1, 1), (k // 2, k // 2)):
        return None
    return FReLU(c1, k)


# class name -> how to build ours from a module of that name (paper modules are matched by name
# and then by their parameter layout)
_TORCH = {s.replaces: s.module for s in SPECS.values() if s.replaces}
_RECOGNISED = {
    **dict.fromkeys(_TORCH, _from_torch),
    "AconC": _from_acon, "MetaAconC": _from_meta_acon, "FReLU": _from_frelu,
}


def _selected(name: str, kind: str, patterns: list[str] | None) -> bool:
    return any(p == kind or p == name or name.startswith(p + ".") for p in patterns or ())


def replace_activations(model: nn.Module, *, include: list[str] | None = None,
                        exclude: list[str] | None = None) -> list[tuple[str, str, str]]:
    """Swap, in place, the activations of ``model`` for fused_act's; return what was swapped.

    Replaces ``torch.nn.Mish``, ``SiLU``, ``GELU`` (either approximation) and modules shaped like
    the published ACON-C, Meta-ACON (with or without BatchNorm) and FReLU modules, recognised by
    class name and parameter layout.  Each replacement keeps the module's parameters, buffers,
    train/eval mode, device and dtype (its state_dict is loaded strictly).  ``include`` and
    ``exclude`` hold kinds ("Mish", "SiLU", "GELU", "AconC", "MetaAconC", "FReLU") or module
    names (a name also covers everything below it); with ``include`` only matches are swapped.
    Modules it does not recognise are left alone, and running it again swaps nothing.  Returns
    ``(name, old class, new class)`` for each swap.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            kind = type(child).__name__
            if isinstance(child, FusedModule) or kind not in _RECOGNISED:
                continue
            if include is not None and not _selected(full, kind, include):
                continue
            if _selected(full, kind, exclude):
                continue
            new = _RECOGNISED[kind](child)
            if new is None:
                continue
            state = child.state_dict()
            ref = next((v for v in state.values() if v.is_floating_point()), None)
            if ref is not None:
                new = new.to(device=ref.device, dtype=ref.dtype)
                new.load_state_dict(state, strict=True)
            new.train(child.training)
            setattr(module, child_name, new)
            swapped.append((full, f"{type(child).__module__}.{kind}",
                            f"fused_act.nn.{type(new).__name__}"))
    return swapped
