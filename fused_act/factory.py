"""One op family built once: custom ops, fake kernels, autograd, and the switch between paths.

A family (the elementwise activations, ACON-C, FReLU's max step, ...) is declared in ``ops.py`` as
a ``Family``: its forward and backward implementations (kernels or reference, chosen per call by
the backend argument), their fake kernels, its reference math, and what backward needs.
``Op(family)`` builds from it, the same way for every family:

* the custom ops ``fused_act::<name>`` and ``fused_act::<name>_backward`` with their fake kernels
  and the autograd registration that joins them (what ``torch.compile`` traces, opaque to
  Inductor);
* an ``autograd.Function`` for eager calls: the same implementations without the custom-op
  dispatch cost;
* ``Op.__call__``, which picks the path: under torch.func transforms, forward-mode AD and
  ``torch.jit.trace`` the reference math (plain torch operations, which every transform
  differentiates and batches natively), compiled or not (the custom op has no jvp or batching
  rule); otherwise under ``torch.compile`` the custom op, or the reference math where
  ``config.compile_mode`` says "decompose"; otherwise the custom op where a tensor argument has
  a dispatch of its own (``dispatches_itself``), else the eager Function;
* in the eager Function's backward, the reference's explicit backward where a gradient needs a
  graph of its own or is batched (``plain_backward``), else the kernels.

The backend in force at the forward (``backend.get_backend()``) is the last argument of every
op, saved with the node, and runs its backward too.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad
from torch import Tensor

from . import config, distributed
from .backend import get_backend


def reference_math() -> bool:
    """True where an op must be its reference math, not a kernel call: under a torch.func
    transform (its wrapped tensors have no storage a kernel could read), forward-mode AD (the
    reference's operations carry tangents) and ``torch.jit.trace`` (a trace records operations,
    not kernel launches)."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0 or torch.jit.is_tracing())


def dispatches_itself(args: tuple) -> bool:
    """True where a tensor among ``args`` is of a subclass with a ``__torch_dispatch__`` of its
    own (DTensor, TwoTensor), in any argument: an op called on it must reach that dispatch.
    ``nn.Parameter`` and subclasses without one dispatch as a plain tensor."""
    plain = Tensor.__torch_dispatch__
    return any(isinstance(a, Tensor) and type(a).__torch_dispatch__ is not plain for a in args)


def plain_backward(grad: Tensor) -> bool:
    """False where a backward must run the reference math: ``create_graph=True`` (the gradient
    needs a graph of its own), a torch.func transform over the backward, or a batched gradient
    (``autograd.grad(is_grads_batched=True)``, which ``autograd.functional.jacobian(...,
    vectorize=True)`` runs)."""
    return not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
                or torch._C._functorch.is_legacy_batchedtensor(grad))


@dataclass(frozen=True)
class Family:
    """What one op family is; everything else ``Op`` builds.

    ``forward(*args, backend)`` returns the output, or a tuple whose first entry is the output and
    the rest non-differentiable companions (FReLU's win code); ``fake`` takes the same arguments
    and returns tensors of the same shapes and strides.  ``reference(*args)`` is the composite
    math.  A family without ``backward`` is inference-only (no autograd).  Otherwise
    ``saved(args, outputs)`` lists the tensors backward reads, ``backward_args(saved, attrs,
    needs)`` builds the arguments after ``grad`` of ``backward(grad, *backward_args, backend)``
    (``attrs`` are the forward's arguments with tensors replaced by None, ``needs`` its
    ``needs_input_grad``), which returns the gradients of the forward arguments at positions
    ``grad_of`` (None where not needed); ``reference_backward(grad, *backward_args)`` is the same
    in differentiable torch operations, and ``fake_backward`` the backward's fake kernel (empty
    tensors where not needed)."""

    name: str
    forward: Callable[..., Tensor | tuple[Tensor, ...]]
    fake: Callable[..., Tensor | tuple[Tensor, ...]]
    reference: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor | None, ...]] | None = None
    fake_backward: Callable[..., tuple[Tensor, ...]] | None = None
    reference_backward: Callable[..., tuple[Tensor | None, ...]] | None = None
    saved: Callable[[tuple, tuple], tuple[Tensor | None, ...]] | None = None
    backward_args: Callable[[tuple, tuple, tuple], tuple] | None = None
    grad_of: tuple[int, ...] = ()


def _backward_op(family: Family) -> torch.library.CustomOpDef:
    """``family.backward`` as a custom op: a gradient that is not needed comes back as an empty
    tensor (an op returns tensors), and one that is part of a bigger buffer (ACON-C's parameter
    gradients are slices of one sum) as a copy: an op's outputs own their memory, as its fake
    kernel's do.  (Storage, not ``_is_view``: below autograd, slices are not marked as views.)"""
    fn = family.backward

    def own(d: Tensor | None, grad: Tensor) -> Tensor:
        if d is None:
            return grad.new_empty(0)
        whole = d.storage_offset() == 0 and d.untyped_storage().nbytes() == d.nbytes
        return d if whole else d.clone()

    def run(*args: object) -> tuple[Tensor, ...]:
        return tuple(own(d, args[0]) for d in fn(*args))

    ret = tuple[(Tensor,) * len(family.grad_of)]
    run.__signature__ = inspect.signature(fn).replace(return_annotation=ret)
    op = torch.library.custom_op(f"fused_act::{family.name}_backward", run, mutates_args=())
    op.register_fake(family.fake_backward)
    return op


class Op:
    """A family's custom ops, eager Function and entry point (module docstring)."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.forward_op = torch.library.custom_op(f"fused_act::{family.name}", family.forward,
                                                  mutates_args=())
        self.forward_op.register_fake(family.fake)
        self.backward_op = None
        self.function = None
        if family.backward is None:
            return
        self.backward_op = _backward_op(family)
        self.forward_op.register_autograd(
            lambda ctx, grad, *_: self._grads(ctx, grad, self.backward_op),
            setup_context=self._save)

        op = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args: object) -> Tensor | tuple[Tensor, ...]:
                out = family.forward(*args)
                op._save(ctx, args, out)
                return out

            @staticmethod
            def backward(ctx, grad: Tensor, *_: Tensor) -> tuple:
                return op._grads(ctx, grad, family.backward if plain_backward(grad)
                                 else op._reference_backward)

        Function.__name__ = Function.__qualname__ = f"{family.name}_function"
        self.function = Function

    def _save(self, ctx, inputs: tuple, output: Tensor | tuple[Tensor, ...]) -> None:
        *args, ctx.backend = inputs
        ctx.attrs = tuple(None if isinstance(a, Tensor) else a for a in args)
        outputs = output if isinstance(output, tuple) else (output,)
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outputs[1:])
        ctx.save_for_backward(*self.family.saved(args, outputs))

    def _grads(self, ctx, grad: Tensor, backward: Callable) -> tuple:
        needs = ctx.needs_input_grad
        args = self.family.backward_args(ctx.saved_tensors, ctx.attrs, needs)
        grads = [None] * len(needs)
        for i, d in zip(self.family.grad_of, backward(grad, *args, ctx.backend), strict=True):
            grads[i] = d if needs[i] else None
        return tuple(grads)

    def _reference_backward(self, grad: Tensor, *args: object) -> tuple:
        return self.family.reference_backward(grad, *args[:-1])

    def __call__(self, *args: object, mode: str | None = None) -> Tensor:
        """The family on validated arguments, by the path this call needs (module docstring);
        ``mode`` names the op whose ``config.compile_mode`` applies (None: always opaque)."""
        if reference_math():  # first: a transform or dual tensors under compile need it too
            return self.family.reference(*args)
        if torch.compiler.is_compiling():
            if mode is not None and config.mode_for(mode) == "decompose":
                return self.family.reference(*args)
            out = self.forward_op(*args, get_backend())
        elif dispatches_itself(args):
            # the subclass (DTensor, by the sharding rules of distributed.py) must meet the
            # custom ops: the eager Function would hand it to the kernels as it is; the rules
            # are missing where torch.distributed.tensor was loaded past the import hook
            distributed.register_if_imported()
            out = self.forward_op(*args, get_backend())
        elif self.function is None:
            out = self.forward_op(*args, get_backend())
        else:
            out = self.function.apply(*args, get_backend())
        return out[0] if isinstance(out, tuple) else out
