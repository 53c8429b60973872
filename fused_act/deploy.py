"""Shipping a model that uses fused_act's ops: ``torch.export`` files, AOTInductor packages and
ONNX.

An exported graph holds our custom ops (``fused_act::activation``, ``glu``, ``acon_c``,
``frelu_max``, ``frelu_max_affine``) with no backend argument: wherever the graph runs, each op
takes the backend in force there.  Loading such a graph needs ``import fused_act`` first, since
the ops are defined in Python; a process without fused_act gets torch's error naming the op.

``decompositions()`` turns them into plain aten operations, for a file or package that runs
without fused_act: ``ep.run_decompositions(fused_act.deploy.decompositions())``.  Each op
becomes its reference math (the exact limits at +-inf; Inductor and AOTInductor fuse it into one
loop per op).

ONNX export (``torch.onnx.export(model, args, dynamo=True)``) needs no argument: while it runs
(``torch.onnx.is_in_onnx_export()``), each op traces its ONNX form instead of itself (``install``
gives the ops these forms).  The form uses the operators ONNX has for these functions where the
spec names a torch equivalent (Mish, Gelu with ``approximate``, x * Sigmoid(x)), and the
reference's primitive operations otherwise (ACON-C, learnable Swish, FReLU's max); fp16 and bf16
are computed in fp32 and rounded once, as the kernels do.  ONNX's operators take their own values
at +-inf: Mish, Gelu and x * Sigmoid(x) give NaN at -inf where ours give 0.  Nothing is
registered in torch's global tables: Inductor, fake tensors and ``torch.export`` see our ops as
they are.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from . import ops, reference
from .backend import get_backend, resolve
from .ops.op import Op
from .registry import SPECS


def _reference(op: Op) -> Callable[..., object]:
    """The op's reference math: plain, functional aten operations (an exported graph may hold
    no in-place write; the reference backend's path writes into its outputs)."""
    n = len(op.schema.args)
    return lambda *args, **kwargs: op.reference(*args[:n])


def _frelu_max(x: Tensor, t: Tensor, need_code: bool, *_: object) -> tuple[Tensor, Tensor]:
    # the op's win code too (empty where not asked for), which its reference math leaves out
    code = reference.frelu_max_code(x, t) if need_code else x.new_empty(0, dtype=torch.uint8)
    return reference.frelu_max(x, t), code


def _forms() -> dict[torch._ops.OpOverload, Callable[..., object]]:
    forms = {op.forward_op._opoverload: _reference(op) for op in ops.FAMILIES}
    forms[ops.FRELU_MAX.forward_op._opoverload] = _frelu_max
    return forms


def _kernel_form(op: Op, form: Callable[..., object]) -> Callable[..., object]:
    """The op as the backend in force runs it on its device, with the Triton kernels' launches
    traced into the graph; ``form`` where that backend is the reference math."""
    n = len(op.schema.args)

    def run(*args: object, **kwargs: object) -> object:
        args = args[:n]
        device = next(a for a in args if isinstance(a, Tensor)).device
        name = resolve(device, get_backend())
        if name in ("reference", "cpu"):
            return form(*args)
        if name != "triton":
            raise RuntimeError(
                f"fused_act.deploy: backend {name!r} runs {op.schema.name} on {device}, but only "
                "Triton kernels can be held by a traced program; use backend 'auto' or "
                "'triton' (or kernels=False: the reference math)")
        from .triton_kernels.tiling import traced_launches
        with traced_launches():
            return op.forward(*args, name)
    return run


def decompositions(kernels: bool = False) -> dict[torch._ops.OpOverload, Callable[..., object]]:
    """Each of fused_act's forward ops to plain aten operations, as ``ExportedProgram
    .run_decompositions`` takes a table: the program then runs without fused_act.

    Without ``kernels`` every op becomes its reference math, which ``torch.export.save`` can
    write and any device runs (Inductor fuses it).  With ``kernels``, an op whose backend in
    force is Triton (CUDA tensors with "auto") becomes the launches of our Triton kernels, which
    AOTInductor compiles into its package (a ``.pt2`` file of ``torch.export`` cannot hold
    them); elsewhere (CPU tensors) the reference math.  Only our ops are in the table, so
    everything else stays as it was."""
    forms = _forms()
    if kernels:
        forms = {o.forward_op._opoverload: _kernel_form(o, forms[o.forward_op._opoverload])
                 for o in ops.FAMILIES}
    return forms


def _in_opmath(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` in fp32 for 16-bit x, rounded once to x's dtype."""
    if x.dtype.itemsize >= 4:
        return fn(x)
    return fn(x.float()).to(x.dtype)


def _standard(act: str, beta: Tensor | None,
              beta_value: float) -> Callable[[Tensor], Tensor] | None:
    """Spec ``act`` as its torch equivalent, which the ONNX exporter writes as ONNX's own
    operator; None where the spec has a beta tensor (no standard form)."""
    spec = SPECS[act]
    if beta is not None:
        return None
    if spec.beta:
        return lambda x: spec.torch_fn(x, beta_value)
    return spec.torch_fn


def _onnx_activation(x: Tensor, act: str, beta: Tensor | None, beta_value: float,
                     *_: object) -> Tensor:
    fn = _standard(act, beta, beta_value)
    if fn is None:
        return ops.ACTIVATION.reference(x, act, beta, beta_value)
    return _in_opmath(fn, x)


def _onnx_glu(gate: Tensor, up: Tensor | None, act: str, beta: Tensor | None,
              beta_value: float, dim: int, *_: object) -> Tensor:
    fn = _standard(act, beta, beta_value)
    if fn is None:
        return ops.GATED.reference(gate, up, act, beta, beta_value, dim)
    if up is None:
        gate, up = gate.chunk(2, dim)
    return _in_opmath(lambda g: fn(g) * up.to(g.dtype), gate)


def install() -> None:
    """Give the ops their ONNX forms (module docstring); idempotent."""
    ops.ACTIVATION.onnx_form = _onnx_activation
    ops.GATED.onnx_form = _onnx_glu
