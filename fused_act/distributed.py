"""torch.distributed support: DTensor sharding rules for fused_act's custom ops.

DDP and FSDP2 need nothing from this module: their parameters reach the ops as plain tensors
(FSDP2 gathers them before the forward) and their gradients are reduced by the wrapper like any
other parameter's.  Tensor parallelism does: a ``DTensor`` reaching one of our custom ops needs a
sharding rule, or DTensor refuses the op.  Every op here is pointwise in its data tensors (x, t,
the incoming gradient, FReLU's win code), so any placement of x is a valid placement of all of
them and of the outputs shaped like x: the op runs on the local shards, and nothing is gathered.
A parameter broadcast against x (swish's beta; ACON-C's p1, p2, beta; the affine a, b) is sharded
with x where it runs along x's sharded dim (a per-channel parameter with x sharded on channels, a
per-sample beta with x sharded on the batch) and replicated where it is broadcast over it; its
gradient is then sharded the same way, or a partial sum (``Partial``) that DTensor reduces when it
is read.  ``RULES`` holds this per op (``Pointwise``), read off the ops' declared schemas.

When the rules are registered: importing ``torch.distributed.tensor`` costs 0.35-0.8 s on top of
torch's own import (measured with torch 2.11 and 2.15 on a CPU machine), ten to twenty times
``import fused_act`` (0.03-0.04 s), so fused_act never imports it itself.  ``install()``, run by
``import fused_act``, registers the rules at once where ``torch.distributed.tensor`` is already
imported, and otherwise right after its first import (an import hook, which leaves once the
module has loaded), so a DTensor never meets an op without its rule and users call nothing.
Should the module load past the hook, the first tensor subclass reaching an op registers them
(``register_if_imported``).
``register()`` does the registration itself, idempotently.
"""

import functools
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import ops
from .after_import import when_imported
from .ops import op
from .ops.op import DATA, PARAM, Arg, Schema

DTENSOR_MODULE = "torch.distributed.tensor"


@dataclass(frozen=True)
class Pointwise:
    """How the tensors of one custom op line up element by element.

    ``data`` are the positions (in the op's schema) of tensors shaped like x, x first: they all
    take x's placement.  ``params`` are the positions of parameters broadcast against x: one
    element, C elements as (C,) or (1, C, 1, ...), or per sample (N, C) / (N, C, 1, ...); an
    absent (None) parameter is skipped.  ``outputs`` holds, for each output, the position of the
    argument it is shaped like: a data argument (the output takes x's placement) or a parameter
    (the output is its gradient: sharded like it, or ``Partial`` where x is sharded over a dim the
    parameter is broadcast over).  ``flag`` is the position of the bool argument without which
    the outputs after the first are empty tensors (``need_dbeta``, ``need_params``,
    ``need_code``); it decides the outputs' shapes, so DTensor's cache is keyed on it;
    ``emptied`` are the indices of the outputs it empties (None: all after the first).  A data
    argument may be absent (None: its output is then an empty tensor); ``split`` = (position of
    such an argument, position of the dim argument) for an op that, without it, takes both
    halves of its first data tensor along that dim (glu's packed gate and up), which therefore
    must not be sharded.
    """

    data: tuple[int, ...]
    params: tuple[int, ...] = ()
    outputs: tuple[int, ...] = (0,)
    flag: int | None = None
    emptied: tuple[int, ...] | None = None
    split: tuple[int, int] | None = None

    @property
    def keyed_from(self) -> int | None:
        """The first argument position DTensor's sharding cache must key on (an absent data
        argument, or the flag, changes the outputs' shapes)."""
        keys = [k for k in (self.flag, self.split and self.split[0]) if k is not None]
        return min(keys) if keys else None


def _positions(args: list[Arg], kind: str) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(args) if a.kind == kind)


def _rules(schema: Schema) -> dict[str, Pointwise]:
    """The rules of one family's ops, read off its declared schema (``ops/op.py``)."""
    names = [a.name for a in schema.args]
    split = schema.split and tuple(names.index(n) for n in schema.split)
    data = _positions(list(schema.args), DATA)
    rules = {schema.name: Pointwise(
        data=data, params=_positions(list(schema.args), PARAM),
        outputs=(data[0],) * len(schema.outputs),
        flag=schema.companions_if and names.index(schema.companions_if), split=split)}
    args = [op.data("grad"), *schema.backward_args()]
    names = [a.name for a in args]
    grads = schema.tensors
    rules[f"{schema.name}_backward"] = Pointwise(
        data=_positions(args, DATA), params=_positions(args, PARAM),
        # a gradient is shaped like its argument where backward takes it, else like grad
        outputs=tuple(names.index(a.name) if a.name in names else 0 for a in grads),
        flag=schema.flag and names.index(schema.flag),
        emptied=tuple(i for i, a in enumerate(grads) if a.kind == PARAM),
        split=schema.split and tuple(names.index(n) for n in schema.split))
    return rules


# batch_norm_act reduces over every dim but the channels: no pointwise rule is right for it, so
# DTensor refuses it (fused_act.nn.BatchNormAct2d says so first: SyncBatchNorm is the tool)
RULES: dict[str, Pointwise] = {name: rule for family in ops.FAMILIES
                               if family is not ops.BATCH_NORM_ACT
                               for name, rule in _rules(family.schema).items()}


def param_dim(param_shape: Sequence[int], x_shape: Sequence[int], dim: int) -> int | None:
    """The dim of a parameter of ``param_shape`` that runs along dim ``dim`` of x, or None where
    the parameter is broadcast over that dim.

    The ops align parameters with x from the left (not from the right, as broadcasting does): a
    1-D parameter of C elements runs along x's channel dim 1, a (1, C, 1, 1) or (N, C) one along
    x's dims 0, 1, ...; a one-element parameter is a scalar.  A dim of size 1 counts as
    broadcast, so a parameter is only ever sharded along a dim of x's size.
    """
    if math.prod(param_shape) == 1:
        return None
    j = dim - 1 if len(param_shape) == 1 else dim
    if 0 <= j < len(param_shape) and param_shape[j] == x_shape[dim] != 1:
        return j
    return None


def strategies(rule: Pointwise, *args: object) -> list[tuple[list, list]]:
    """The (output placements, input placements) pairs DTensor may run the op of ``rule`` with,
    for one mesh dim (DTensor combines them over the mesh's dims); ``args`` are the op's
    arguments with each tensor replaced by its DTensor spec.

    x replicated: everything replicated.  x sharded on any dim d: the data tensors and the outputs
    shaped like x sharded on d; each parameter sharded on its dim along d (``param_dim``) or
    replicated, and its gradient sharded the same way or ``Partial``.  Partial inputs are
    not accepted (the ops are not linear), so DTensor reduces them first.  Outputs that the flag
    leaves empty are replicated.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    x = args[rule.data[0]]
    computed = rule.flag is None or bool(args[rule.flag])
    packed_dim = None
    if rule.split is not None and args[rule.split[0]] is None:
        packed_dim = args[rule.split[1]] % x.ndim
    pairs = []
    for dim in (None, *(d for d in range(x.ndim) if d != packed_dim)):
        placement = {i: Replicate() if dim is None else Shard(dim) for i in rule.data
                     if args[i] is not None}
        grad_placement = {}
        for i in rule.params:
            p = args[i]
            if p is None:
                continue
            j = None if dim is None else param_dim(p.shape, x.shape, dim)
            placement[i] = Replicate() if j is None else Shard(j)
            grad_placement[i] = placement[i] if j is not None or dim is None else Partial()
        outputs = [placement.get(i, Replicate()) if i in rule.data
                   else grad_placement.get(i, Replicate()) for i in rule.outputs]
        if not computed:
            for k in range(1, len(outputs)) if rule.emptied is None else rule.emptied:
                outputs[k] = Replicate()
        pairs.append((outputs, [placement.get(i) for i in range(len(args))]))
    return pairs


def quant_strategies(gate: object, up: object, act: str, beta_value: float,
                     dim: int | None, out_dtype: object, scaling: str, scale: object,
                     block: int, beta: object = None, p1: object = None, p2: object = None,
                     backend: str | None = None) -> list[tuple[list, list]]:
    """``strategies`` for ``fused_act::act_quant`` (q and its scales), one mesh dim: all
    replicated, or gate (and up) sharded along a dim before the last (rows), not the dim a
    packed gate_up splits along.  Sharded rows give row or block scales sharded with them
    (each rank quantises its own rows: nothing is communicated) and, with a caller's scale
    (replicated), one replicated scale.  Tensor scaling from the amax of the whole result has
    no sharded strategy: DTensor gathers gate first, so the one scale is the global one.
    Per-channel parameters (a tensor beta; ACON-C's p1, p2) are replicated, and x is not
    sharded along its channel dim 1 unless each holds one value (a shard's channels would
    not be the parameters' C)."""
    from torch.distributed.tensor import Replicate, Shard

    params = [None if t is None else Replicate() for t in (beta, p1, p2)]
    # the strategy sees DTensorSpecs, which have a shape but no numel()
    per_channel = any(t is not None and math.prod(t.shape) > 1 for t in (beta, p1, p2))

    def inputs(x: object, s: object) -> list:
        return [x, None if up is None else x, *[None] * 5, s, None, *params, None]

    packed = None if up is not None or dim is None else dim % gate.ndim
    pairs = [([Replicate(), Replicate()],
              inputs(Replicate(), None if scale is None else Replicate()))]
    if scaling == "tensor" and scale is None:
        return pairs
    for d in range(gate.ndim - 1):
        if d == packed or (d == 1 and per_channel):
            continue
        scales = Replicate() if scaling == "tensor" else Shard(d)
        pairs.append(([Shard(d), scales],
                      inputs(Shard(d), None if scale is None else Replicate())))
    return pairs


def _key_cache_from(overload: torch._ops.OpOverload, position: int) -> None:
    """Make DTensor's sharding cache tell calls apart by the op's arguments from ``position`` on.

    ``register_sharding`` keys the cache on the tensor arguments and on non-tensor arguments from
    the first int one on; most of our ops have no int argument, so a call with
    ``need_dbeta=True`` would reuse the output shapes cached for ``need_dbeta=False`` (an empty
    gradient), and glu's absent ``up`` sits before its int ``dim``.  The public API
    cannot say otherwise (torch 2.11 to 2.15), so the op's runtime schema info is set here.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.op_to_schema_info[overload] = RuntimeSchemaInfo(static_argnum=position,
                                                               needs_pytree=True)


_registered = False


def register() -> None:
    """Register the DTensor sharding rules of ``RULES`` for fused_act's custom ops.

    Idempotent; ``import fused_act`` arranges for it to run automatically (``install``), so users
    need not call it.  It imports ``torch.distributed.tensor`` (about half a second the first
    time).  After it, a DTensor x sharded on any dim, with parameters sharded or replicated as
    ``strategies`` says, runs through the ops on its local shards; the output is a DTensor with
    x's placement and parameter gradients are sharded or ``Partial``.
    """
    global _registered
    if _registered:
        return
    from torch.distributed.tensor.experimental import register_sharding

    for name, rule in RULES.items():
        overload = getattr(torch.ops.fused_act, name).default
        register_sharding(overload)(functools.partial(strategies, rule))
        if rule.keyed_from is not None:
            _key_cache_from(overload, rule.keyed_from)
    # up's absence and every attribute after it decide the outputs' shapes
    register_sharding(torch.ops.fused_act.act_quant.default)(quant_strategies)
    _key_cache_from(torch.ops.fused_act.act_quant.default, 1)
    _registered = True


def _register_or_warn() -> None:
    # runs inside someone else's import: a failure must not break it
    try:
        register()
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"fused_act: DTensor sharding rules were not registered ({e!r}); "
                      "DTensor inputs to fused_act's ops will be refused", stacklevel=2)


def register_if_imported() -> None:
    """``register`` where ``torch.distributed.tensor`` is imported and the rules are not yet in
    place: for a tensor subclass reaching an op, in case that module was loaded past the import
    hook (a finder ahead of it, a replaced ``sys.meta_path``)."""
    if not _registered and DTENSOR_MODULE in sys.modules:
        _register_or_warn()


def install() -> None:
    """Arrange for ``register`` to run as soon as DTensor exists: now, if
    ``torch.distributed.tensor`` is imported already, else right after it first is.  Nothing
    where torch was built without distributed support."""
    if not torch.distributed.is_available() or _registered:
        return
    if register_if_imported not in op.SUBCLASS_HOOKS:
        op.SUBCLASS_HOOKS.append(register_if_imported)
    when_imported(DTENSOR_MODULE, _register_or_warn)
