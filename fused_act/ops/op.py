"""The op builder: one declared ``Schema`` and a family's implementations become custom ops,
autograd and the switch between paths.

A ``Schema`` names each argument and its role: ``data`` (a tensor shaped like x), ``param`` (a
tensor broadcast against x, whose gradient is reduced), ``attr`` (not a tensor), plus the
outputs, what backward reads and the name of the backward's flag (True when some parameter
needs its gradient).  From it ``Op`` derives, the same way for every family:

* the custom ops ``fused_act::<name>`` and ``fused_act::<name>_backward`` (their signatures:
  the forward's arguments and ``str? backend=None``; the backward's ``grad``, the saved tensors
  and attributes in the forward's order, the flag, ``backend``; one gradient per tensor
  argument),
  with their fake kernels (the reference path of the implementations, run on fake tensors)
  and the autograd registration that joins them (what
  ``torch.compile`` traces, opaque to Inductor);
* an ``autograd.Function`` for eager calls, named after the op (``ActivationBackward``): the same
  implementations without the custom-op dispatch cost;
* ``Op.__call__``, which picks the path: under torch.func transforms, forward-mode AD and
  ``torch.jit.trace`` the reference math (plain torch operations, which every transform
  differentiates and batches); under ``torch.onnx.export`` its ONNX form (``Op.onnx_form``);
  under ``torch.compile`` and ``torch.export`` the custom op, or the reference math where the
  op's compile mode says "decompose"; the custom op where a tensor argument has a
  dispatch of its own (DTensor); else the eager Function, whose backward runs the reference's
  explicit backward where a gradient needs a graph of its own or is batched, or, where no
  gradient is recorded, the implementations directly.

The backend in force at the forward is the last argument of every op, saved with the node, and
runs its backward too.  ``torch.export`` leaves it out of the forward ops: an exported graph
runs each op with the backend in force where it runs (None: read when the op runs).  This
module knows nothing of fused_act's settings or of DTensor: the compile mode comes in as a
function (``backend.get_backend`` is read here: it is part of every op's arguments), and
``SUBCLASS_HOOKS`` lets ``distributed`` register its sharding rules before a tensor subclass
first meets an op.  ``Op.rerun`` computes a forward again from a node's record (what
``fused_act.nn.GatedMLP`` recomputes instead of keeping).
"""

import contextlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad
from torch import Tensor

from ..backend import get_backend

DATA, PARAM, ATTR = "data", "param", "attr"

# run before a tensor subclass with a dispatch of its own reaches a custom op
SUBCLASS_HOOKS: list[Callable[[], None]] = []


@dataclass(frozen=True)
class Arg:
    """One argument of an op: ``kind`` DATA, PARAM or ATTR; ``type`` its schema type ("Tensor",
    "Tensor?" for an absent-able one, "str", "float", "int", "bool"); ``backward``: whether the
    backward takes it (an attribute, or a tensor backward reads)."""

    name: str
    kind: str
    type: str
    backward: bool = True

    @property
    def tensor(self) -> bool:
        return self.kind != ATTR


def data(name: str, optional: bool = False, saved: bool = True) -> Arg:
    return Arg(name, DATA, "Tensor?" if optional else "Tensor", saved)


def param(name: str, optional: bool = False) -> Arg:
    return Arg(name, PARAM, "Tensor?" if optional else "Tensor")


def attr(name: str, type: str, backward: bool = True) -> Arg:
    return Arg(name, ATTR, type, backward)


@dataclass(frozen=True)
class Schema:
    """An op's declaration (module docstring).  ``outputs``: the result first, then companions
    shaped like x that are not differentiable (FReLU's win code), all present only where the
    bool argument ``companions_if`` is true (else empty tensors); ``saved_outputs``: companions
    backward reads instead of the inputs; ``flag``: the backward's bool argument, true when a
    parameter needs its gradient; ``split``: (an absent-able data argument, an int argument):
    without the first, the op takes both halves of its first data tensor along that dim;
    ``returned``: how many outputs a call (``Op.__call__``) returns: the result alone (1, not
    in a tuple), or the first ``returned`` (BatchNorm's batch statistics, of which its module
    keeps running averages).  Outputs after the result are never differentiable."""

    name: str
    args: tuple[Arg, ...]
    outputs: tuple[str, ...] = ("y",)
    companions_if: str | None = None
    saved_outputs: tuple[str, ...] = ()
    flag: str | None = None
    split: tuple[str, str] | None = None
    returned: int = 1

    @property
    def tensors(self) -> tuple[Arg, ...]:
        """The tensor arguments: one gradient each, in this order."""
        return tuple(a for a in self.args if a.tensor)

    def backward_args(self) -> tuple[Arg, ...]:
        """The backward op's arguments after ``grad`` and before ``backend``."""
        return (*(a for a in self.args if a.backward),
                *(data(o) for o in self.saved_outputs),
                *((attr(self.flag, "bool"),) if self.flag else ()))

    def forward_signature(self) -> str:
        outs = ", ".join(["Tensor"] * len(self.outputs))
        outs = outs if len(self.outputs) == 1 else f"({outs})"
        return f"({_params(self.args)}, str? backend=None) -> {outs}"

    def backward_signature(self) -> str:
        grads = ", ".join(["Tensor"] * len(self.tensors))
        return f"(Tensor grad, {_params(self.backward_args())}, str backend) -> ({grads})"


def _params(args: tuple[Arg, ...]) -> str:
    return ", ".join(f"{a.type} {a.name}" for a in args)


def _check_names(fn: Callable, names: list[str], what: str) -> None:
    """An implementation takes the schema's arguments by the schema's names."""
    got = list(inspect.signature(fn).parameters)
    if got != names:
        raise TypeError(f"fused_act: {what} takes {got}, but its schema declares {names}")


def reference_math() -> bool:
    """True where an op must be its reference math, not a kernel call: under a torch.func
    transform (its wrapped tensors have no storage a kernel could read), forward-mode AD (the
    reference's operations carry tangents) and ``torch.jit.trace`` (a trace records operations,
    not kernel launches)."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0 or torch.jit.is_tracing())


def exporting() -> bool:
    """True under ``torch.export`` (strict or not), not under ``torch.compile``.  It reads the
    flag export sets, which Dynamo reads as it is: torch 2.11's Dynamo folds
    ``torch.compiler.is_exporting()`` to True under ``torch.compile`` as well."""
    return torch.compiler._is_exporting_flag


def onnx_exporting() -> bool:
    """True while ``torch.onnx.export`` runs (an export underway imported ``torch.onnx``; it is
    not imported here otherwise)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def dispatches_itself(args: tuple) -> bool:
    """True where an op call must reach torch's dispatcher as one op: under a TorchDispatchMode
    (make_fx tracing real tensors, FlopCounterMode, ...), which would not see a kernel called
    directly (make_fx's graph held the output's empty buffer alone: garbage when run), or where
    a tensor among ``args`` is of a subclass with a ``__torch_dispatch__`` of its own (DTensor,
    TwoTensor).  ``nn.Parameter`` and subclasses without one dispatch as a plain tensor."""
    if torch._C._len_torch_dispatch_stack():
        return True
    plain = Tensor.__torch_dispatch__
    return any(isinstance(a, Tensor) and type(a).__torch_dispatch__ is not plain for a in args)


def plain_backward(grad: Tensor) -> bool:
    """False where a backward must run the reference math: ``create_graph=True`` (the gradient
    needs a graph of its own), a torch.func transform over the backward, a batched gradient
    (``autograd.grad(is_grads_batched=True)``), or a gradient of a subclass that dispatches
    itself (its data pointer is not its data: a kernel would read stray memory)."""
    return not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
                or torch._C._functorch.is_legacy_batchedtensor(grad)
                or dispatches_itself((grad,)))


def resolve_negative(args: tuple, at: list[int]) -> tuple:
    """``args`` with each tensor at the positions ``at`` that is a negative view (``is_neg()``:
    the imaginary part of a conjugate, ``torch._neg_view``) replaced by a copy of its values: a
    kernel reads memory, which holds the negation of such a view's values.  The copy is
    recorded by autograd, so gradients reach the view."""
    for i in at:  # a loop that stops at the first: this runs on every call
        if args[i] is not None and args[i].is_neg():
            return tuple(a.resolve_neg() if j in at and a is not None else a
                         for j, a in enumerate(args))
    return args


def resolved(*ts: Tensor | None) -> list[Tensor | None]:
    """Each of ``ts`` with a negative view (``resolve_negative``) replaced by a copy of its
    values; None stays None."""
    return [t if t is None else t.resolve_neg() for t in ts]


def _own(d: Tensor | None, grad: Tensor) -> Tensor:
    """A gradient as a custom op returns it: an empty tensor where not needed, and a copy where
    it is part of a bigger buffer (ACON-C's parameter gradients are slices of one sum): an op's
    outputs own their memory, as its fake kernel's do.  (Storage, not ``_is_view``: below
    autograd, slices are not marked as views.)"""
    if d is None:
        return grad.new_empty(0)
    whole = d.storage_offset() == 0 and d.untyped_storage().nbytes() == d.nbytes
    return d if whole else d.clone()


class Op:
    """A family's custom ops, eager Function and entry point (module docstring).

    ``forward(*args, backend)`` returns the outputs; ``reference(*args)`` is the composite
    math.  ``backward(grad, *backward_args, backend)`` returns one gradient per tensor argument
    (None where the flag or an absent argument leaves it out), and ``reference_backward`` the
    same without ``backend`` in differentiable torch operations.  ``compile_mode(mode)`` says
    "opaque" or "decompose" for the ``mode`` a call names."""

    # the op in an ONNX export's graph (``deploy`` sets ONNX's own operators where they compute
    # it); None: its reference math
    onnx_form: Callable | None = None

    def __init__(self, schema: Schema, forward: Callable, reference: Callable,
                 backward: Callable, reference_backward: Callable,
                 compile_mode: Callable[[str], str]) -> None:
        self.schema, self.compile_mode = schema, compile_mode
        self.forward, self.reference = forward, reference
        names = [a.name for a in schema.args]
        _check_names(forward, [*names, "backend"], f"{schema.name}'s forward")

        n = len(schema.args)

        # backend None, or left out (the schema's default): the one in force where the op runs
        def run_forward(*args: object) -> Tensor | tuple[Tensor, ...]:
            return forward(*args[:n], (args[n:] or (None,))[0] or get_backend())

        self.forward_op = torch.library.custom_op(
            f"fused_act::{schema.name}", run_forward, mutates_args=(),
            schema=schema.forward_signature())
        # the fake kernels are the implementations' reference path on fake tensors: the same
        # shapes, strides and dtypes as every backend's outputs (which the tests hold them to)
        self.forward_op.register_fake(lambda *args: forward(*args[:n], "reference"))
        bnames = ["grad", *(a.name for a in schema.backward_args())]
        _check_names(backward, [*bnames, "backend"], f"{schema.name}'s backward")
        self.backward, self.reference_backward = backward, reference_backward

        def run(*args: object) -> tuple[Tensor, ...]:
            return tuple(_own(d, args[0]) for d in backward(*args))

        self.backward_op = torch.library.custom_op(
            f"fused_act::{schema.name}_backward", run, mutates_args=(),
            schema=schema.backward_signature())
        self.backward_op.register_fake(lambda grad, *args: tuple(
            grad.new_empty(0) if d is None else d
            for d in backward(grad, *args[:-1], "reference")))
        self.forward_op.register_autograd(
            lambda ctx, grad, *_: self._grads(ctx, grad, self.backward_op),
            setup_context=self._save)
        # where each argument goes, worked out once (these run on every call)
        self._tensor_at = [i for i, a in enumerate(schema.args) if a.tensor]
        self._param_at = [i for i, a in enumerate(schema.args) if a.kind == PARAM]
        self._saved_at = [i for i, a in enumerate(schema.args) if a.tensor and a.backward]
        self._attr_at = [i for i, a in enumerate(schema.args) if not a.tensor and a.backward]
        self._companion_at = [schema.outputs.index(o) for o in schema.saved_outputs]
        self._backward_reads = [a.tensor for a in schema.backward_args()
                                if a.name != schema.flag]
        # a node holds the attributes of the whole forward call only where backward reads all
        self._rerunnable = all(a.backward for a in schema.args if not a.tensor)
        self.function = self._eager_function()

    def _eager_function(self) -> type[torch.autograd.Function]:
        op = self

        def forward(ctx, *args: object) -> Tensor | tuple[Tensor, ...]:
            out = op.forward(*args)
            op._save(ctx, args, out)
            return out

        def backward(ctx, grad: Tensor, *_: Tensor) -> tuple:
            return op._grads(ctx, grad.resolve_neg(), op.backward if plain_backward(grad)
                             else op._reference_backward)

        # the class name is what autograd nodes print: ActivationBackward, GluBackward, ...
        name = "".join(w.capitalize() for w in self.schema.name.split("_"))
        return type(name, (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward),
            "__module__": __name__})

    def _save(self, ctx, inputs: tuple, output: Tensor | tuple[Tensor, ...]) -> None:
        args, backend = inputs[:len(self.schema.args)], inputs[len(self.schema.args):]
        ctx.backend = (backend or (None,))[0] or get_backend()
        outputs = output if isinstance(output, tuple) else (output,)
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outputs[1:])
        # list comprehensions, not generators: this runs on every eager call
        ctx.attrs = tuple([args[i] for i in self._attr_at])
        ctx.save_for_backward(*[args[i] for i in self._saved_at],
                              *[outputs[i] for i in self._companion_at])

    def _grads(self, ctx, grad: Tensor, backward: Callable) -> tuple:
        needs = ctx.needs_input_grad
        # a saved-tensor hook may unpack a negative view
        saved = iter(resolved(*ctx.saved_tensors))
        attrs = iter(ctx.attrs)
        args = [next(saved) if tensor else next(attrs) for tensor in self._backward_reads]
        if self.schema.flag:
            args.append(any(needs[i] for i in self._param_at))
        grads = [None] * len(needs)
        for i, d in zip(self._tensor_at, backward(grad, *args, ctx.backend), strict=True):
            grads[i] = d if needs[i] else None
        return tuple(grads)

    def node_of(self, out: object) -> torch.autograd.graph.Node | None:
        """The autograd node of ``out`` where this op's eager Function made it; None where
        ``out`` needs no gradient or came from another path (compiled, traced, transformed, a
        tensor subclass) or from another op."""
        node = out.grad_fn if isinstance(out, Tensor) else None
        return node if type(node) is self.function._backward_cls else None

    def rerun(self, node: torch.autograd.graph.Node, *tensors: Tensor | None) -> Tensor:
        """The forward's result computed again from its tensor arguments ``tensors`` (in the
        schema's order, as the forward got them) and the attributes and backend ``node`` (of
        ``node_of``) recorded.  No graph is recorded and autocast is off (the tensors are in the
        dtypes the forward ran in), so a deterministic backend gives the forward's result bit
        for bit."""
        if not self._rerunnable:
            raise TypeError(f"fused_act: {self.schema.name}'s node does not keep every "
                            "attribute of its forward")
        given, attrs = iter(tensors), iter(node.attrs)
        args = resolve_negative(tuple(next(given) if a.tensor else next(attrs)
                                      for a in self.schema.args), self._tensor_at)
        device = next(a for a in args if isinstance(a, Tensor)).device.type
        autocast_off = (torch.autocast(device, enabled=False)
                        if torch.amp.is_autocast_available(device) else contextlib.nullcontext())
        with torch.no_grad(), autocast_off:
            # under a TorchDispatchMode the op itself, which the mode sees (dispatches_itself)
            out = (self.forward_op if dispatches_itself(tuple(args)) else self.forward)(
                *args, node.backend)
        return out[0] if isinstance(out, tuple) else out

    def _reference_backward(self, grad: Tensor, *args: object) -> tuple:
        return self.reference_backward(grad, *args[:-1])

    def __call__(self, *args: object, mode: str | None = None) -> Tensor | tuple[Tensor, ...]:
        """The op on validated arguments and the backend in force, by the path this call needs
        (module docstring); ``mode`` names the compile mode that applies (None: opaque)."""
        if reference_math():  # first: a transform or dual tensors under compile need it too
            return self.reference(*args)
        if torch.compiler.is_compiling():
            if exporting() and onnx_exporting():
                return (self.onnx_form or self.reference)(*args)
            if mode is not None and self.compile_mode(mode) == "decompose":
                return self.reference(*args)
            # an exported graph runs elsewhere: its ops take the backend in force where they run
            out = (self.forward_op(*args) if exporting()
                   else self.forward_op(*args, get_backend()))
        elif dispatches_itself(args):
            for hook in SUBCLASS_HOOKS:
                hook()
            out = self.forward_op(*args, get_backend())
        else:
            # torch's dispatcher resolves a negative view for the custom op, not for these
            args = resolve_negative(args, self._tensor_at)
            if torch.is_grad_enabled() and any([
                    args[i] is not None and args[i].requires_grad for i in self._tensor_at]):
                out = self.function.apply(*args, get_backend())
            else:  # no graph to record: the Function's bookkeeping costs more than a small op
                out = self.forward(*args, get_backend())
        if not isinstance(out, tuple):
            return out
        return out[0] if self.schema.returned == 1 else out[:self.schema.returned]
