"""Shipping a model that uses fused_act's ops: ``torch.export`` files, AOTInductor packages and
ONNX.

An exported graph holds our custom ops (``fused_act::activation``, ``glu``, ``acon_c``,
``frelu_max``, ``frelu_max_affine``, and ``act_quant`` for an FP8 output) with no backend
argument: wherever the graph runs, each op takes the backend in force there.  Loading such a
graph needs ``import fused_act`` first, since the ops are defined in Python; a process without
fused_act gets torch's error naming the op.

``decompositions()`` turns them into plain aten operations, for a file or package that runs
without fused_act: ``ep.run_decompositions(fused_act.deploy.decompositions())``.  Each op
becomes its reference math (the exact limits at +-inf; Inductor and AOTInductor fuse it into one
loop per op); ``act_quant`` becomes ``reference.quantize_fp8``'s operations, which give the
eager q and scales bit for bit for every scaling.  An AOTInductor package cannot hold block
scaling: torch's AOTInductor C++ wrapper (2.14) does not declare float8_e8m0fnu, so compiling
it fails there (a ``.pt2`` of ``torch.export`` runs it from torch 2.14 on; torch 2.11's
serializer cannot write the E8M0 scales' ``view(dtype)``, and its AOTInductor wrapper
declares no float8 type: FP8 outputs in AOTInductor packages need torch 2.14).

ONNX export (``torch.onnx.export(model, args, dynamo=True)``) needs no argument: while it runs
(``torch.onnx.is_in_onnx_export()``), each op traces its ONNX form instead of itself (``install``
gives the ops these forms).  The form uses the operators ONNX has for these functions where the
spec names a torch equivalent (Mish, Gelu with ``approximate``, x * Sigmoid(x)), and the
reference's primitive operations otherwise (ACON-C, learnable Swish, FReLU's max); fp16 and bf16
are computed in fp32 and rounded once, as the kernels do.  ONNX's operators take their own values
at +-inf: Mish, Gelu and x * Sigmoid(x) give NaN at -inf where ours give 0.  An FP8 output
(``act_quant``) with row or tensor scaling (a caller's scale too) is the reference's primitive
operations (ReduceMax, Div, Clip, IsNaN, Where, a Cast to FLOAT8E4M3FN or FLOAT8E5M2), from
which onnxruntime gives eager's q and scales bit for bit where its activation math is eager's;
block scaling raises a RuntimeError at export, since torch.onnx cannot write its E8M0 scales
(ONNX's FLOAT8E8M0), never a graph without them.  Nothing is registered in torch's global
tables: Inductor, fake tensors and ``torch.export`` see our ops as they are.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from . import ops, reference
from .backend import get_backend, resolve
from .ops import quant
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
    forms[ops.act_quant_op._opoverload] = quant.reference_form
    return forms


def _kernel_form(name: str, n: int, forward: Callable[..., object],
                 form: Callable[..., object]) -> Callable[..., object]:
    """Op ``name`` (``n`` arguments before its backend's) as the backend in force runs it on its
    device, ``forward(*args, backend)``, with the Triton kernels' launches traced into the
    graph; ``form`` where that backend is the reference math."""

    def run(*args: object, **kwargs: object) -> object:
        args = args[:n]
        device = next(a for a in args if isinstance(a, Tensor)).device
        backend = resolve(device, get_backend())
        if backend in ("reference", "cpu"):
            return form(*args)
        if backend != "triton":
            raise RuntimeError(
                f"fused_act.deploy: backend {backend!r} runs {name} on {device}, but only "
                "Triton kernels can be held by a traced program; use backend 'auto' or "
                "'triton' (or kernels=False: the reference math)")
        from .triton_kernels.tiling import traced_launches
        with traced_launches():
            return forward(*args, backend=backend)
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
    if not kernels:
        return forms
    table = {o.forward_op._opoverload: _kernel_form(o.schema.name, len(o.schema.args),
                                                   o.forward, forms[o.forward_op._opoverload])
             for o in ops.FAMILIES}
    act_quant = ops.act_quant_op._opoverload
    n = len(act_quant._schema.arguments) - 1  # all but its backend
    table[act_quant] = _kernel_form("act_quant", n, quant.act_quant_unchecked, forms[act_quant])
    return table


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


def _onnx_act_quant(gate: Tensor, up: Tensor | None, act: str, beta_value: float,
                    dim: int | None, out_dtype: torch.dtype, scaling: str,
                    scale: Tensor | None, block: int, beta: Tensor | None = None,
                    p1: Tensor | None = None, p2: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    if scaling == "block":
        raise RuntimeError(
            "fused_act.deploy: ONNX export of an FP8 output with scaling='block' is not "
            "supported: torch.onnx cannot write its float8_e8m0fnu scales (ONNX's FLOAT8E8M0); "
            "use scaling='row' or 'tensor', or torch.export with decompositions()")
    return quant.reference_form(gate, up, act, beta_value, dim, out_dtype, scaling, scale, block,
                                beta, p1, p2)


def install() -> None:
    """Give the ops their ONNX forms (module docstring); idempotent."""
    quant.onnx_form = _onnx_act_quant
    ops.ACTIVATION.onnx_form = _onnx_activation
    ops.GATED.onnx_form = _onnx_glu
