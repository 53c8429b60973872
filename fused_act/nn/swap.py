"""Model surgery: recognise other libraries' activation modules and gated MLP blocks, check
that ours compute the same, swap them in place, and put them back."""

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..registry import SPECS
from .modules import (
    GELU,
    MODULES,
    AconC,
    BatchNormAct2d,
    FReLU,
    FusedModule,
    GatedMLP,
    MetaAconC,
    Swish,
    _check_fp8,
    _InplaceActivation,
    activation_form,
)

# ---- the papers' modules, recognised by name and layout ---------------------------------------

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
    if conv.bias is not None or shape != (c1, c1, (k, k), (1, 1), (k // 2, k // 2)) or (
            conv.dilation != (1, 1) or conv.padding_mode != "zeros"):
        return None
    return FReLU(c1, k)


# ---- replace_activations / restore_activations ----------------------------------------------

_CARRIED = ("inplace", "approximate")  # arguments of torch.nn's modules that ours take too
_PAPER = {"AconC": _from_acon, "MetaAconC": _from_meta_acon, "FReLU": _from_frelu}
# how far a swapped module may be from the original on the probe (run in fp32 or fp64),
# relative and absolute
_PROBE_TOL = 1e-5
# a gated block is probed in its own dtype (no copy of its weights): relative to its largest
# output, what the two roundings of act(gate) * up may move it by, in ulps of 16-bit outputs
_BLOCK_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _known() -> dict[str, tuple[str, dict]]:
    """Qualified class name -> (our module, its further arguments), from the registry."""
    known = {}
    for s in SPECS.values():
        if s.replaces:
            known[_qualname(getattr(nn, s.replaces))] = (s.module, {})
        known.update({name: (s.module, kwargs) for name, kwargs in s.lookalikes.items()})
    return known


_KNOWN = _known()
# an unknown class that shares a known class's name is a candidate too, checked on the probe
_BY_NAME = {name.rsplit(".", 1)[1]: hit for name, hit in _KNOWN.items()}


class Swapped(NamedTuple):
    """A module that ``replace_activations`` swapped: its name, the class it had (qualified),
    what replaced it, and whether it was checked on a probe first (an unfamiliar class)."""

    name: str
    old: str
    new: str
    probed: bool = False


class Left(NamedTuple):
    """A module that looked like an activation ``replace_activations`` computes but was left."""

    name: str
    cls: str
    reason: str


@dataclass
class Replacement:
    """What ``replace_activations`` (or ``patch_gated_mlps``: ``by``) did: the modules it
    swapped and those it left, with why."""

    swapped: list[Swapped] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    by: str = "replace_activations"

    def __str__(self) -> str:
        lines = [f"fused_act.{self.by}: {len(self.swapped)} swapped, "
                 f"{len(self.left)} left"]
        lines += [f"  swapped {s.name or '<model>'}: {s.old} -> {s.new}"
                  + (" (checked on a probe)" if s.probed else "") for s in self.swapped]
        lines += [f"  left    {x.name or '<model>'}: {x.cls}: {x.reason}" for x in self.left]
        return "\n".join(lines)


def _plan(m: nn.Module) -> tuple[nn.Module | None, bool, str]:
    """(ours for ``m``, whether ``m`` is unfamiliar and must match on the probe first, why not
    when ours is None and ``m`` looked like a candidate); (None, False, "") if it is not one."""
    cls = type(m)
    if cls.__name__ in _PAPER:
        with torch.device("meta"):  # every tensor is the original's (_adopt): none is drawn
            ours = _PAPER[cls.__name__](m)
        # known by name and layout only: its forward is checked on the probe
        return ours, True, "" if ours else f"its layout is not the published {cls.__name__}'s"
    depth, hit = next(((i, _KNOWN[_qualname(c)]) for i, c in enumerate(cls.__mro__)
                       if _qualname(c) in _KNOWN), (-1, _BY_NAME.get(cls.__name__)))
    if hit is None:
        return None, False, ""
    module, kwargs = hit
    ours = MODULES[module]
    args = inspect.signature(ours).parameters
    carried = {a: getattr(m, a) for a in _CARRIED if a in args and hasattr(m, a)}
    try:
        with torch.device("meta"):
            new = ours(**{**carried, **kwargs})
    except (TypeError, ValueError) as e:
        return None, False, f"its arguments do not carry over ({e})"
    # a known class itself, with its own forward: anything else (a subclass, a look-alike of
    # another package, a patched forward) is checked on the probe before it is trusted
    familiar = (depth == 0 and "forward" not in vars(m)
                and cls.forward.__qualname__ == f"{cls.__qualname__}.forward")
    return new, not familiar, ""


def _on_meta(m: nn.Module) -> bool:
    return any(t.is_meta for t in (*m.parameters(), *m.buffers()))


def _probe_input(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Values over [-8, 8], every 7th scaled by 50: saturated branches and clamps are reached."""
    x = torch.linspace(-8.0, 8.0, math.prod(shape), dtype=torch.float64)
    x[::7] *= 50
    return x.reshape(shape).to(device=device, dtype=dtype)


def _run_modes(m: nn.Module, x: Tensor, copy_buffers: bool = False) -> list[Tensor]:
    """``m(x)`` in eval mode, then in train mode from a fixed random state (dropout, batch
    statistics), each on its own copy of x; with ``copy_buffers`` on fresh copies of ``m``'s
    buffers (its parameters as they are), so no buffer of ``m`` moves or is replaced.  The
    caller's random state is kept: only the generators forked are seeded."""
    cuda = x.device.type == "cuda"
    outs = []
    for train in (False, True):
        with torch.random.fork_rng(devices=[x.device] if cuda else []), torch.no_grad():
            torch.default_generator.manual_seed(0)
            if cuda:
                torch.cuda.default_generators[x.device.index or 0].manual_seed(0)
            m.train(train)
            if copy_buffers:
                memo: dict[int, Tensor] = {}  # a buffer shared by two modules stays shared
                fresh = {k: memo.setdefault(id(b), b.clone())
                         for k, b in m.named_buffers(remove_duplicate=False)}
                outs.append(torch.func.functional_call(m, fresh, (x.clone(),)))
            else:
                outs.append(m(x.clone()))
    return outs


def _differs(got: list[Tensor], want: list[Tensor], tol: float, dtype: torch.dtype,
             atol: float | None = None) -> str:
    """'' if each of ``got`` is within ``tol`` of ``want``, relative and absolute (``atol``, or
    ``tol`` times the largest finite magnitude: a block's output has no natural scale), else
    what differs."""
    for mode, g, w in zip(("eval", "train"), got, want, strict=True):
        if g.shape != w.shape:
            return f"computes another function (shape {tuple(g.shape)}, not {tuple(w.shape)})"
        g, w = g.double(), w.double()
        scale = max(w[w.isfinite()].abs().max().item() if w.isfinite().any() else 0.0, 1.0)
        if not torch.allclose(g, w, rtol=tol, atol=tol * scale if atol is None else atol,
                              equal_nan=True):
            diff = (g - w).abs().nan_to_num(math.inf).max().item()
            return (f"computes another function (max difference {diff:.3g} on a {dtype} probe "
                    f"in {mode} mode)")
    return ""


def _probe(old: nn.Module, new: nn.Module, channels: int | None) -> str:
    """'' if ``new`` computes what ``old`` does, else why not.  Both run as float64 copies, so
    the decision is about the function and not the model's rounding: a function that merely
    agrees to bf16 precision is not swapped in a bf16 model, and nothing of the model moves."""
    import copy
    if _on_meta(old):
        return "it is on the meta device, where it cannot be checked: swap it once materialised"
    device = next((t.device for t in (*old.parameters(), *old.buffers())), torch.device("cpu"))
    x = _probe_input((2, channels, 5, 7) if channels else (7, 11, 13), device, torch.float64)
    try:
        want = _run_modes(copy.deepcopy(old).double(), x)
        got = _run_modes(copy.deepcopy(new).double(), x)
    except Exception as e:  # noqa: BLE001 - any failure leaves the module as it is
        return f"the probe raised {type(e).__name__}: {e}"
    return _differs(got, want, _PROBE_TOL, torch.float64, atol=_PROBE_TOL)


def _channels(m: nn.Module) -> int | None:
    """C of a channel-wise module (ACON-C, Meta-ACON, FReLU, BatchNorm), whose probe is
    (N, C, H, W)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    p1, conv = getattr(m, "p1", None), getattr(m, "conv", None)
    return p1.shape[1] if p1 is not None else conv.in_channels if conv is not None else None


def _named_patterns(name: str, cls: type, new: nn.Module) -> tuple[str, ...]:
    return (name, cls.__name__, _qualname(cls), type(new).__name__)


def _selected(name: str, kinds: tuple[str, ...], patterns: list[str] | None) -> bool:
    return any(p in kinds or name.startswith(p + ".") for p in patterns or ())


def _label(m: nn.Module) -> str:
    """``fused_act.nn.Class(arguments)`` of one of our modules, on one line."""
    return f"fused_act.nn.{type(m).__name__}({m.extra_repr()})"


def _slots(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(parent's name, parent, attribute, child) for every child slot in model order (depth
    first), a module shared by several slots once per slot (``named_children`` would show it
    once)."""
    slots: list[tuple[str, nn.Module, str, nn.Module]] = []
    seen: set[int] = set()

    def walk(name: str, parent: nn.Module) -> None:
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for attr, child in parent._modules.items():
            if child is not None:
                slots.append((name, parent, attr, child))
                walk(f"{name}.{attr}" if name else attr, child)

    walk("", model)
    return slots


def _compiled_slot(parent: nn.Module, attr: str) -> bool:
    """Whether the slot is a compiled module's wrapped module: its compiled forward stays bound
    to the module it wraps, so a swap there would change nothing that runs."""
    return attr == "_orig_mod" and isinstance(parent, torch._dynamo.eval_frame.OptimizedModule)


_COMPILED = "it is wrapped by torch.compile, whose compiled forward keeps calling it: " \
    "swap before compiling"


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` or a module inside it has hooks (which a swap would drop)."""
    return any(any((sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks,
                    sub._backward_pre_hooks)) for sub in m.modules())


def _gone(old: nn.Module, new: nn.Module) -> set[int]:
    """The modules inside ``old`` that the model no longer runs once ``new`` replaces it (those
    that ``new`` holds too, as a GatedMLP holds the projections, still run)."""
    return {id(m) for m in old.modules()} - {id(m) for m in new.modules()}


def _names_by_module(slots: list[tuple[str, nn.Module, str, nn.Module]]) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for parent_name, _, attr, child in slots:
        names.setdefault(id(child), []).append(f"{parent_name}.{attr}" if parent_name else attr)
    return names


def replace_activations(model: nn.Module, *, include: list[str] | None = None,
                        exclude: list[str] | None = None, verbose: bool = False
                        ) -> Replacement:
    """Swap, in place, the activations of ``model`` for fused_act's; return what was done.

    Recognises by qualified class name (importing nothing) the activation modules of torch.nn,
    timm, transformers and EfficientNet-PyTorch that the registry lists, and modules shaped like
    the published ACON-C, Meta-ACON and FReLU (by class name and parameter layout).  Anything
    but a known class itself with its own ``forward`` (a subclass, a look-alike, a patched
    ``forward``, a paper module) is swapped only if ours computes the same on a float64 probe,
    in eval and in train mode.  BatchNorm followed by such an activation (timm's
    ``BatchNormAct2d``, ``nn.BatchNorm2d`` then the activation in an ``nn.Sequential``) becomes
    one ``BatchNormAct2d``, as ``patch_batchnorm_acts`` says, where both the BatchNorm and the
    activation are selected by ``include`` / ``exclude``; exclude ``"BatchNorm2d"`` to keep
    them all apart.  Modules with hooks, inside ``torch.compile``, or with tensors
    not shaped as ours are left.  A replacement keeps the module's arguments (``inplace``,
    ``approximate``, BatchNorm's ``eps`` and ``momentum``), its parameter and buffer objects
    (optimizers still step them) and modes; a shared module stays shared.

    ``include`` / ``exclude`` hold class names (theirs or ours) or module names (covering what
    is below them).  Running it again swaps nothing; ``restore_activations`` undoes it.  The
    ``Replacement`` returned lists each swap and each candidate left, with why; ``verbose=True``
    prints it.
    """
    def decide(child: nn.Module, names: list[str], compiled: bool
               ) -> tuple[nn.Module | None, str, bool]:
        new, unfamiliar, why = _plan(child)
        if new is None or why:
            return new, why, unfamiliar
        if not all(include is None or _selected(n, _named_patterns(n, type(child), new),
                                                include) for n in names) or any(
                _selected(n, _named_patterns(n, type(child), new), exclude) for n in names):
            return new, "excluded by include/exclude", unfamiliar
        return new, _COMPILED if compiled else _swap_check(child, new, unfamiliar), unfamiliar

    report = Replacement()
    if _plan(model)[0] is not None:
        report.left.append(Left("", _qualname(type(model)), "the model itself is an activation: "
                                "swap it where it is used"))
    # BatchNorm -> activation pairs first, while the activations are still the model's own
    _swap_all(model, report, _batchnorm_decider(model, include, exclude), verbose=False)
    return _swap_all(model, report, decide, verbose)


def _swap_all(model: nn.Module, report: Replacement,
              decide: Callable[[nn.Module, list[str], bool], tuple[nn.Module | None, str, bool]],
              verbose: bool) -> Replacement:
    """Walk ``model``'s slots and swap each module that ``decide(module, its names, whether its
    slot is a compiled module's wrapped one)`` gives a replacement for with no reason against
    (and whether it was probed); record each swap, and each candidate left at every name with
    the reason.  A module shared by several slots is decided once and stays shared; slots inside
    a module the model no longer runs are skipped."""
    slots = _slots(model)
    names = _names_by_module(slots)
    done: dict[int, tuple[nn.Module, bool]] = {}  # id of a module swapped -> (new, probed)
    gone: set[int] = set()
    for parent_name, parent, attr, child in slots:
        name = f"{parent_name}.{attr}" if parent_name else attr
        if id(parent) in gone:  # the walk listed the slots before any swap
            continue
        cls = _qualname(type(child))
        if id(child) in done:
            new, probed = done[id(child)]
            setattr(parent, attr, new)
            report.swapped.append(Swapped(name, cls, _label(new), probed))
            continue
        if isinstance(child, FusedModule) or name != names[id(child)][0]:
            continue  # a shared module is decided once, at its first name
        new, why, probed = decide(child, names[id(child)], _compiled_slot(parent, attr))
        if why:
            report.left.extend(Left(n, cls, why) for n in names[id(child)])
        if new is None or why:
            continue
        new.__dict__["_replaced"] = child  # for restore_activations; not a submodule
        setattr(parent, attr, new)
        done[id(child)] = new, probed
        gone |= _gone(child, new)
        report.swapped.append(Swapped(name, cls, _label(new), probed))
    if verbose:
        print(report)
    return report


def _tensors(m: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return (dict(m.named_parameters(remove_duplicate=False)),
            dict(m.named_buffers(remove_duplicate=False)))


def _tensors_differ(a: nn.Module, b: nn.Module) -> str:
    """'' if ``a`` and ``b`` have parameters and buffers of the same names and shapes, else
    both lists."""
    for ours, theirs in zip(_tensors(a), _tensors(b), strict=True):
        if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
            return (f"ours has {sorted((k, tuple(v.shape)) for k, v in ours.items())}, "
                    f"it {sorted((k, tuple(v.shape)) for k, v in theirs.items())}")
    return ""


def _adopt(into: nn.Module, source: nn.Module) -> None:
    """Make ``into`` hold ``source``'s parameter and buffer objects themselves (their dtypes,
    devices and requires_grad flags with them), its BatchNorm layers' ``eps`` and ``momentum``,
    and each submodule's train/eval mode (a submodule ``source`` lacks takes the module's).
    Raises ValueError, changing nothing, where the names or shapes of the tensors differ."""
    why = _tensors_differ(into, source)
    if why:
        raise ValueError(why)
    params, buffers = _tensors(source)
    for table, attr in ((params, "_parameters"), (buffers, "_buffers")):
        for key, t in table.items():
            owner_name, _, leaf = key.rpartition(".")
            getattr(into.get_submodule(owner_name), attr)[leaf] = t
    theirs = dict(source.named_modules(remove_duplicate=False))
    for key, m in into.named_modules(remove_duplicate=False):
        src = theirs.get(key, source)
        m.training = src.training
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(
                src, nn.modules.batchnorm._BatchNorm):
            m.eps, m.momentum = src.eps, src.momentum


def _swap_check(old: nn.Module, new: nn.Module, unfamiliar: bool) -> str:
    """Give ``new`` ``old``'s tensors and modes; '' if it may replace ``old``, else why not."""
    if _hooked(old):
        return "it has hooks, which a swap would drop"
    try:
        _adopt(new, old)
    except ValueError as e:
        return f"its parameters and buffers are not ours ({e})"
    return _probe(old, new, _channels(new)) if unfamiliar else ""


def restore_activations(model: nn.Module) -> list[str]:
    """Undo ``replace_activations``, ``patch_gated_mlps`` and ``patch_batchnorm_acts``: put
    back each swapped module, in place, holding the tensors its replacement holds now (trained
    parameters, running statistics, as they are) and its modes; modules inside a restored one
    are restored too.  Returns the names of the modules restored.  Where a replacement's
    tensors no longer match its original's (a parameter replaced by one of another shape, a
    submodule wrapped), it raises ValueError naming the module before anything is restored in
    that pass."""
    restored: list[str] = []
    # id of a replacement put back already -> (it, its original): a replacement also seen
    # again inside a restored module (a shared activation) goes back to the same original
    back: dict[int, tuple[nn.Module, nn.Module]] = {}
    while True:
        slots = [(f"{p}.{a}" if p else a, parent, a, child) for p, parent, a, child
                 in _slots(model) if id(child) in back or "_replaced" in child.__dict__]
        if not slots:
            break
        for name, _, _, child in slots:
            if id(child) not in back and (why := _tensors_differ(child.__dict__["_replaced"],
                                                                  child)):
                raise ValueError(f"fused_act.restore_activations: {name} cannot be restored: "
                                 f"{why}")
        for name, parent, attr, child in slots:
            if id(child) not in back:
                back[id(child)] = (child, child.__dict__["_replaced"])
                _adopt(back[id(child)][1], child)
            setattr(parent, attr, back[id(child)][1])
            restored.append(name)
    for replacement, _ in back.values():
        del replacement.__dict__["_replaced"]  # detached now: it keeps no original alive
    return restored


# ---- patch_gated_mlps -------------------------------------------------------------------------

_ACT_NAMES = ("act_fn", "activation_fn", "act")  # what transformer MLP blocks call it


def _gated_form(act: nn.Module) -> tuple[str, dict] | None:
    """(glu's activation, its arguments) that computes what ``act`` does, or None; an
    unfamiliar class is trusted only after ``replace_activations``' float64 probe."""
    ours, unfamiliar, _ = (act, False, "") if isinstance(act, FusedModule) else _plan(act)
    if isinstance(ours, GELU):
        form = "gelu", {"approximate": ours.approximate}
    elif isinstance(ours, Swish) and not ours.learnable:
        form = "swish", {"beta": ours.beta}
    elif isinstance(ours, _InplaceActivation):
        form = ours.op, {}
    else:
        return None
    return None if unfamiliar and _probe(act, ours, None) else form


def _as_gated(m: nn.Module, recompute: bool | None = None
              ) -> tuple[GatedMLP | None, str, str]:
    """(a ``GatedMLP`` over ``m``'s projections, the name of ``m``'s activation) if ``m`` has
    the layout of a gated MLP block, with why not when it has the projections but not an
    activation the fused op computes."""
    names = {n: c for n, c in m._modules.items() if c is not None}
    act_name = next((n for n in _ACT_NAMES if n in names), "")
    if "down_proj" not in names or not act_name or not (
            "gate_up_proj" in names or {"gate_proj", "up_proj"} <= names.keys()):
        return None, "", ""
    form = _gated_form(names[act_name])
    if form is None:
        return None, f"its {act_name} ({_qualname(type(names[act_name]))}) is not an " \
            "activation the fused gated op computes", act_name
    projections = {n: names[n] for n in ("gate_proj", "up_proj", "gate_up_proj") if n in names}
    if "gate_up_proj" in projections and len(projections) > 1:
        return None, "it has both gate_up_proj and gate_proj/up_proj", act_name
    return GatedMLP(names["down_proj"], form[0], **projections, recompute=recompute,
                    **form[1]), "", act_name


def _block_check(old: nn.Module, new: GatedMLP, act_name: str) -> str:
    """'' if ``new`` may replace the block ``old``, else why not: the patch would drop nothing
    (state, submodules, hooks) and both compute the same on probes in eval and train mode, at
    a second scale that reaches clamps.  Only buffers are copied, as a large model's block is
    large: it runs on its own parameters in its dtype (hence ``_BLOCK_TOL``), and its modes,
    the random state and matmul precision are put back."""
    extra = old._modules.keys() - new._modules.keys() - {act_name}
    if extra:
        return f"it has submodules the patch would drop ({', '.join(sorted(extra))})"
    params, buffers = _tensors(old)
    ours, theirs = set().union(*map(dict.keys, _tensors(new))), params.keys() | buffers.keys()
    if ours != theirs:
        return f"it has parameters or buffers of its own ({', '.join(sorted(theirs - ours))})"
    if _hooked(old):
        return "it or a module inside it has hooks, which the patch would drop"
    if _on_meta(old):
        return "it is on the meta device, where it cannot be checked: patch it once materialised"
    proj = getattr(new, "gate_proj", None) or new.gate_up_proj
    features = getattr(proj, "in_features", None)
    weight = next((p for p in params.values() if p.is_floating_point()), None)
    if features is None or weight is None:
        return "its projections are not Linear layers"
    modes = [(m, m.training) for m in (*old.modules(), *new.modules())]
    # TF32 would differ by more than 1e-5: fp32 products in full precision, each backend's
    # setting put back exactly as it was
    matmuls = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    precisions = [b.fp32_precision for b in matmuls]
    try:
        for b in matmuls:
            b.fp32_precision = "ieee"
        for scale in (1.0, 30.0):
            x = (torch.randn(2, 3, features, generator=torch.Generator().manual_seed(0))
                 * scale).to(weight)
            if why := _differs(_run_modes(new, x, True), _run_modes(old, x, True),
                               _BLOCK_TOL.get(x.dtype, _PROBE_TOL), x.dtype):
                return why
    except Exception as e:  # noqa: BLE001 - any failure leaves the block as it is
        return f"the probe raised {type(e).__name__}: {e}"
    finally:
        for b, precision in zip(matmuls, precisions, strict=True):
            b.fp32_precision = precision
        for m, mode in modes:
            m.training = mode
    return ""


def patch_gated_mlps(model: nn.Module, *, recompute: bool | None = None, fp8: str | None = None,
                     fp8_dtype: torch.dtype = torch.float8_e4m3fn, verbose: bool = False
                     ) -> Replacement:
    """Make the gated MLP blocks of ``model`` use the fused gated op, in place.

    A block is a module with ``down_proj``, an activation (``act_fn``, ``activation_fn`` or
    ``act``, one ``replace_activations`` knows) and ``gate_proj`` and ``up_proj`` or a packed
    ``gate_up_proj`` (gate then up): the layout of Llama, Mistral, Qwen, Gemma and Phi-3 MLPs,
    ``down(act(gate(x)) * up(x))``.  It becomes a ``GatedMLP`` over the same projections only
    if it holds nothing else (state, submodules, hooks) and computes the same on probes in its
    dtype and device, in eval and train mode (a bf16 forward 5% off, an fp16 one 1% off, is
    caught).  ``recompute`` is each ``GatedMLP``'s: True recomputes h = act(gate) * up in
    ``down_proj``'s backward rather than keeping it for it, False keeps it, None (the default)
    recomputes off the CPU only (on the CPU the extra pass cost 2-3% of a Llama block's
    forward+backward, and memory rarely limits training there).
    ``fp8`` and ``fp8_dtype`` are each ``GatedMLP``'s too (FP8 training through an
    ``nn.Linear`` down_proj; a block whose down_proj is not one is left, with why), set once
    the block has passed the probes in high precision.
    ``restore_activations`` undoes it.  Returns a ``Replacement``, as ``replace_activations``;
    ``verbose=True`` prints it.
    """
    def decide(child: nn.Module, names: list[str], compiled: bool
               ) -> tuple[nn.Module | None, str, bool]:
        new, why, act_name = _as_gated(child, recompute)
        if new is None or why:
            return new, why, True
        new.training = child.training  # its projections keep their own modes
        why = _COMPILED if compiled else _block_check(child, new, act_name)
        if not why and fp8 is not None:
            try:
                new.use_fp8(fp8, fp8_dtype)
            except (TypeError, ValueError) as e:
                why = str(e)
        return new, why, True

    if fp8 is not None or fp8_dtype != torch.float8_e4m3fn:
        _check_fp8("patch_gated_mlps", fp8, fp8_dtype)
    return _swap_all(model, Replacement(by="patch_gated_mlps"), decide, verbose)


# ---- patch_batchnorm_acts ---------------------------------------------------------------------

_TIMM_BN_ACT = "timm.layers.norm_act.BatchNormAct2d"


def _fusable_act(act: nn.Module) -> tuple[nn.Module | None, bool]:
    """(our elementwise activation module computing what ``act`` does, whether ``act`` must be
    checked on a probe first), or (None, False) where there is none."""
    if isinstance(act, FusedModule):
        return (act if activation_form(act) else None), False
    ours, unfamiliar, why = _plan(act)
    if ours is None or why or activation_form(ours) is None:
        return None, False
    return ours, unfamiliar


def _bn_act(bn: nn.modules.batchnorm._BatchNorm, act: nn.Module) -> BatchNormAct2d:
    """A ``BatchNormAct2d`` with ``bn``'s arguments over ``act`` (on the meta device: it takes
    its tensors from the module it replaces)."""
    with torch.device("meta"):
        return BatchNormAct2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                              bn.track_running_stats, act=act)


def _pairs(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id of each ``nn.BatchNorm2d`` directly followed by another module in an ``nn.Sequential``
    (or a subclass that runs its children in order, as torchvision's Conv2dNormActivation) ->
    (that Sequential, the follower's attribute)."""
    pairs = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            items = [(k, c) for k, c in m._modules.items() if c is not None]
            for (_, first), (attr, _) in zip(items[:-1], items[1:], strict=True):
                if type(first) is nn.BatchNorm2d:
                    pairs[id(first)] = (m, attr)
    return pairs


def patch_batchnorm_acts(model: nn.Module, *, verbose: bool = False) -> Replacement:
    """Fuse BatchNorm with the activation after it, in place (``replace_activations`` does this
    too, with the activations): each ``nn.BatchNorm2d`` followed in an ``nn.Sequential`` by an
    activation ``replace_activations`` knows (without parameters of its own) becomes a
    ``BatchNormAct2d`` over it, and the activation's slot an ``nn.Identity``; each timm
    ``BatchNormAct2d`` with such an activation and no drop layer becomes ours.  Tensors
    (parameters, running statistics) are the originals' objects, modes and ``eps``/``momentum``
    carry over; unfamiliar classes are checked on the usual float64 probe; a module with hooks,
    a shared module, SyncBatchNorm and anything inside ``torch.compile`` are left, with why.
    The BatchNorm's slot then returns the activated value: code that slices such a Sequential
    between the two, or hooks the new module, sees the activation's output where BatchNorm's
    was.  ``restore_activations`` undoes it.  Returns a ``Replacement``; ``verbose=True``
    prints it."""
    return _swap_all(model, Replacement(by="patch_batchnorm_acts"), _batchnorm_decider(model),
                     verbose)


def _batchnorm_decider(model: nn.Module, include: list[str] | None = None,
                       exclude: list[str] | None = None
                       ) -> Callable[[nn.Module, list[str], bool],
                                     tuple[nn.Module | None, str, bool]]:
    """``_swap_all``'s ``decide`` for BatchNorm pairs (``patch_batchnorm_acts``, and
    ``replace_activations``' first pass): a pair is fused where its
    BatchNorm and its activation are both selected by ``include`` / ``exclude`` (as
    ``replace_activations`` takes them; None: everything)."""
    pairs = _pairs(model)
    names = _names_by_module(_slots(model))

    def chosen(name: str, m: nn.Module, new: nn.Module) -> bool:
        # timm's BatchNormAct2d is a BatchNorm2d: excluding "BatchNorm2d" keeps it apart too
        kinds = _named_patterns(name, type(m), new) + (
            ("BatchNorm2d",) if isinstance(m, nn.BatchNorm2d) else ())
        return (include is None or _selected(name, kinds, include)) and not _selected(
            name, kinds, exclude)

    def decide(child: nn.Module, child_names: list[str], compiled: bool
               ) -> tuple[nn.Module | None, str, bool]:
        if _qualname(type(child)) == _TIMM_BN_ACT:
            ours, unfamiliar = _fusable_act(child.act)
            if ours is None:
                return None, "", False
            new = _bn_act(child, ours if ours is not child.act else copy.deepcopy(ours))
            if not all(chosen(n, child, new) and chosen(f"{n}.act", child.act, ours)
                       for n in child_names):
                return None, "", False
            if not isinstance(child.drop, nn.Identity):
                return None, "it has a drop layer between BatchNorm and the activation", False
            unfamiliar = unfamiliar or "forward" in vars(child)
            return new, _COMPILED if compiled else _swap_check(child, new, unfamiliar), unfamiliar
        if id(child) not in pairs:
            return None, "", False
        seq, attr = pairs[id(child)]
        act = seq._modules[attr]
        ours, unfamiliar = _fusable_act(act)
        if ours is None:
            return None, "", False
        new = _bn_act(child, ours if ours is not act else copy.deepcopy(ours))
        if not all(chosen(n, child, new) for n in child_names) or not all(
                chosen(n, act, ours) for n in names[id(act)]):
            return None, "", False
        if compiled:
            return None, _COMPILED, False
        if len(child_names) > 1 or len(names[id(act)]) > 1:
            return None, "it or the activation after it is shared by several slots", False
        if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
            return None, "the activation after it has tensors of its own", False
        if _hooked(child) or _hooked(act):
            return None, "it or the activation after it has hooks, which a swap would drop", False
        if unfamiliar and (why := _probe(act, ours, None)):
            return None, f"the activation after it {why}", True
        _adopt(new, child)
        new.act.training = act.training
        # the activation's slot runs nothing now, whatever it held (one of ours too, which the
        # walk would skip); restore_activations puts it back
        identity = nn.Identity()
        identity.__dict__["_replaced"] = act
        setattr(seq, attr, identity)
        return new, "", unfamiliar

    return decide
