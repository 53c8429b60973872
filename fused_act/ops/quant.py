"""An activation fused with FP8 quantisation: ``act_quant`` quantises act(gate) or
act(gate) * up as ``reference.quantize_fp8`` does, without writing the activation out, where the
backend has the kernel (``Kernels.act_quant``), else by the reference math; ``fused_act::act_quant``
is its custom op (what torch.compile traces) and ``run_act_quant`` the entry of the public
functions' ``out_dtype``.  Activations with per-channel parameters (swish with a tensor beta,
ACON-C) read them by channel; a gated swish reads its one-value tensor beta as one channel.
No autograd: a gradient cannot flow through FP8 data."""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .. import config, plan, reference
from ..backend import get_backend
from ..kernels import ChannelParams, launcher, offers
from ..registry import KERNEL_IDS, KERNELS
from .acon import acon_forward_impl
from .activation import forward_impl
from .glu import glu_forward_impl
from .layout import flat_param, fp32, row_stride
from .op import (
    SUBCLASS_HOOKS,
    dispatches_itself,
    exporting,
    onnx_exporting,
    reference_math,
    resolved,
)

# inputs the kernel computes from (in fp32); fp64 takes the reference (its fp32 value)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACON_C = "acon_c"  # act_quant's name for ACON-C (no kernel id: its kernels take p1, p2, beta)
# what a torch.onnx.export traces in the op's place (deploy.install sets it), as Op.onnx_form
onnx_form: Callable[..., tuple[Tensor, Tensor]] | None = None


def _rows(t: Tensor) -> tuple[Tensor, int]:
    """``t`` and the distance between its rows of the last dim: in place where they are
    contiguous and evenly spaced (the halves of a packed tensor), else a contiguous copy."""
    s = row_stride(t, t.dim() - 1)
    if s is None:
        t = t.contiguous()
        s = t.shape[-1]
    return t, s


def reference_form(gate: Tensor, up: Tensor | None, act: str, beta_value: float,
                   dim: int | None, out_dtype: torch.dtype, scaling: str, scale: Tensor | None,
                   block: int, beta: Tensor | None = None, p1: Tensor | None = None,
                   p2: Tensor | None = None, backend: str | None = None
                   ) -> tuple[Tensor, Tensor]:
    """The op's reference math on checked arguments (``backend`` unused): plain functional
    torch operations reading nothing on the host, which torch.func transforms batch and a
    decomposed exported program holds."""
    g, u = (gate, up) if up is not None or dim is None else reference.halves(gate, dim)
    return _reference(g, u, act, beta_value, out_dtype, scaling, scale, block, beta, p1, p2)


def _reference(g: Tensor, u: Tensor | None, act: str, beta_value: float, out_dtype: torch.dtype,
               scaling: str, scale: Tensor | None, block: int, beta: Tensor | None = None,
               p1: Tensor | None = None, p2: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if act == ACON_C:
        y = reference.acon_c(g.float(), p1, p2, beta)
    else:
        gf = g.float()
        y = KERNELS[act].forward(gf, fp32(beta_value, gf) if beta is None else beta)
    if u is not None:
        y = y * u.float()
    return _quantise(y, out_dtype, scaling, scale, block)


def _two_passes(g: Tensor, u: Tensor | None, act: str, beta_value: float,
                out_dtype: torch.dtype, scaling: str, scale: Tensor | None, block: int,
                backend: str, beta: Tensor | None, p1: Tensor | None,
                p2: Tensor | None) -> tuple[Tensor, Tensor]:
    """For kernels without a fused act_quant (the CPU ones): their own fp32 activation, then
    its quantisation by their ``quantize`` (a 0-dim y, or kernels without one: torch
    operations), so q is ``quantize_fp8`` of that backend's own fp32 activation as on every
    backend.  Two passes over memory and an fp32 temporary, but each at the kernels' speed: the
    reference activation's chain of exp and where is several times slower than the eager
    expression a user would write, and quantize_fp8's torch operations, one pass over y each,
    took about twice that expression's time."""
    x = g.float()
    if act == ACON_C:
        y = acon_forward_impl(x, p1, p2, beta, backend)
    elif u is None:
        y = forward_impl(x, KERNELS[act].name, beta, beta_value, backend)
    else:
        y = glu_forward_impl(x, u.float(), KERNELS[act].name, beta, beta_value, -1, backend)
    k = launcher(y.device, backend)
    if not offers(k, "quantize") or y.dim() == 0:
        return _quantise(y, out_dtype, scaling, scale, block)
    y = y.contiguous()
    q = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    lead, cols = y.shape[:-1], y.shape[-1]
    if scaling == "block":
        scales = torch.empty((*lead, cols // block), dtype=torch.float8_e8m0fnu, device=y.device)
    else:
        scales = torch.empty((*lead, 1) if scaling == "row" else (), device=y.device)
    k.quantize(y, q, scales, None if scale is None else scale.to(y.device).reshape(1), scaling,
               block)
    return q, scales if scale is None else scale.to(y.device).reshape(()).clone()


def _quantise(y: Tensor, out_dtype: torch.dtype, scaling: str, scale: Tensor | None,
              block: int) -> tuple[Tensor, Tensor]:
    q, scales = reference.quantize_fp8_unchecked(y, out_dtype, scaling, scale, block)
    # row-major whatever the inputs' strides, as the kernels write them (and the fake says)
    return q.contiguous(), scales.contiguous() if scale is None else scales.clone()


def _check_params(x: Tensor, up: Tensor | None, dim: int | None, act: str,
                  beta: Tensor | None, p1: Tensor | None, p2: Tensor | None) -> None:
    """Per-channel parameters (beta; with ACON-C p1 and p2) of one or C = x.shape[1] values
    each, on x's device, for an elementwise call, or swish's beta of one value for a gated one
    (as the gated op takes it): what the kernels index."""
    acon = act == ACON_C
    if acon and (beta is None or p1 is None or p2 is None):
        raise ValueError("fused_act.act_quant: act 'acon_c' takes p1, p2 and beta")
    if not acon and (p1 is not None or p2 is not None or (beta is not None and act != "swish")):
        raise ValueError(f"fused_act.act_quant: parameter tensors are for 'swish' (beta) and "
                         f"'acon_c' (p1, p2, beta), got act {act!r}")
    if beta is None:
        return
    gated = up is not None or dim is not None
    if gated and (acon or beta.numel() != 1):
        raise ValueError(f"fused_act.act_quant: a gated call (up or dim given) takes swish's "
                         f"beta of one value; per-channel parameters are for an elementwise "
                         f"call (got act {act!r}, beta of shape {tuple(beta.shape)})")
    c = x.shape[1] if x.dim() >= 2 and not gated else 1
    for name, t in (("beta", beta), ("p1", p1), ("p2", p2)):
        if t is not None and (t.numel() not in (1, c) or t.device != x.device
                              or not t.is_floating_point()):
            raise ValueError(f"fused_act.act_quant: {name} must be a floating-point tensor of "
                             f"1 or C={c} values on {x.device} for x of shape "
                             f"{tuple(x.shape)}, got {t.dtype} of shape {tuple(t.shape)} on "
                             f"{t.device}")


def _channel_params(x: Tensor, beta: Tensor, p1: Tensor | None, p2: Tensor | None
                    ) -> tuple[ChannelParams, int, int]:
    """(the kernels' parameters, their channel count, the plan layout) for x of shape
    (N, C, *inner) read as rows of its last dim: a channel is inner // cols rows (ROWS), or the
    column of a 2-D x (COLS); one value for all is one channel."""
    c = max(t.numel() for t in (beta, p1, p2) if t is not None)
    params = [None if t is None else flat_param(t, x).expand(c).contiguous()
              for t in (beta, p1, p2)]
    if c == 1 or x.dim() > 2:
        run = math.prod(x.shape[2:-1]) if c > 1 else 1
        return ChannelParams(*params, run), c, plan.ROWS
    return ChannelParams(*params, 1), c, plan.COLS


def act_quant(gate: Tensor, up: Tensor | None, act: str, beta_value: float = 1.0,
              dim: int | None = None, out_dtype: torch.dtype = torch.float8_e4m3fn,
              scaling: str = "block", scale: Tensor | None = None,
              block: int = reference.MX_BLOCK, backend: str = "auto",
              beta: Tensor | None = None, p1: Tensor | None = None,
              p2: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(q, scales) = ``reference.quantize_fp8(y, out_dtype, scaling, scale, block)`` of
    y = act(gate) (``up`` None, ``dim`` None), act(gate) * up, or with ``up`` None and ``dim``
    given act(first half) * (second half) of ``gate`` split along ``dim`` (a packed gate_up,
    read in place), y computed in fp32 and never stored.  ``act`` is a kernel activation of
    ``registry.KERNEL_IDS`` (silu: "swish" with ``beta_value`` 1.0), ``out_dtype``
    float8_e4m3fn or float8_e5m2; q is row-major and scales are shaped as ``quantize_fp8``
    returns them (a caller's ``scale`` comes back as a copy of shape ()); the caller has checked
    the scale's value (this reads nothing on the host).  With ``backend``'s kernels
    for gate's device (``kernels.launcher``), where they offer ``act_quant``, fp16/bf16/fp32
    inputs are quantised in one pass over gate and up ("tensor" without a caller's scale: two,
    the first reducing per-tile amaxes that torch finishes on the device, no host sync); q then
    equals ``quantize_fp8`` of that backend's own fp32 activation bit for bit.  Otherwise (fp64
    too) it is ``quantize_fp8`` of the reference activation of gate.float() (times
    up.float()).  Rows of the last dim that are not evenly spaced runs are copied once.
    ``beta`` (a tensor: swish's, read per channel instead of ``beta_value``) and with ``act``
    "acon_c" also ``p1`` and ``p2`` are per-channel parameters of 1 or C = gate.shape[1]
    values, for an elementwise call (``up`` and ``dim`` None), read in fp32; a gated call takes
    swish's ``beta`` of one value (the gated op's learnable beta)."""
    if act not in KERNEL_IDS and act != ACON_C:
        raise ValueError(f"fused_act.act_quant: act must be one of "
                         f"{sorted([*KERNEL_IDS, ACON_C])}, got {act!r}")
    _check_params(gate, up, dim, act, beta, p1, p2)
    g, u = (gate, up) if up is not None or dim is None else reference.halves(gate, dim)
    if u is not None and (u.shape != g.shape or u.device != g.device):
        raise ValueError(f"fused_act.act_quant: up must have gate's shape and device, got "
                         f"{tuple(u.shape)} on {u.device} and {tuple(g.shape)} on {g.device}")
    reference.check_quantize(g, out_dtype, scaling, scale, block, "fused_act.act_quant",
                             ("gate", "out_dtype"), read_scale=False)
    if u is not None and not u.is_floating_point():
        raise TypeError(f"fused_act.act_quant: up must be a floating-point tensor, got {u.dtype}")
    # the public functions' path (a kernel called directly would be invisible to a trace or a
    # TorchDispatchMode), with no gradient as the kernels give none (the op has no autograd)
    with torch.no_grad():
        return run_act_quant(gate, up, act, beta_value, dim, out_dtype, scaling, scale, block,
                             beta, p1, p2, backend=backend)


def _act_quant(g: Tensor, u: Tensor | None, act: str, beta_value: float,
               out_dtype: torch.dtype, scaling: str, scale: Tensor | None, block: int,
               backend: str, beta: Tensor | None, p1: Tensor | None,
               p2: Tensor | None) -> tuple[Tensor, Tensor]:
    """``act_quant`` of checked arguments, gate and up apart (a packed gate split)."""
    # a negative view's memory holds the negation of its values, which the kernels would read
    g, u, scale, beta, p1, p2 = resolved(g, u, scale, beta, p1, p2)
    k = launcher(g.device, backend)
    args = (g, u, act, beta_value, out_dtype, scaling, scale, block)
    if (k is None or g.numel() == 0 or block > plan.BLOCK or g.dtype not in KERNEL_DTYPES
            or (u is not None and u.dtype not in KERNEL_DTYPES)):
        return _reference(*args, beta, p1, p2)
    if not offers(k, "act_quant"):
        return _two_passes(*args, backend, beta, p1, p2)
    shape = g.shape
    params, channels, layout = (None, 1, plan.SCALAR) if beta is None else _channel_params(
        g, beta, p1, p2)
    if g.dim() == 0:
        g, u = g.reshape(1), None if u is None else u.reshape(1)
    cols = g.shape[-1]
    rows = g.numel() // cols
    g, s_gate = _rows(g)
    u, s_up = (None, s_gate) if u is None else _rows(u)
    strides = (s_gate, s_up)
    if scaling != "row" and s_gate == s_up == cols and channels == 1:
        # one contiguous run: the last dim's rows matter to row scales only (block groups of a
        # divisor of cols stay where they were)
        rows, cols = 1, rows * cols
    q = torch.empty(shape, dtype=out_dtype, device=g.device)
    act_id, beta_value = KERNEL_IDS.get(act, -1), fp32(beta_value)
    p = plan.quant_plan(rows, cols, scaling, block, channels, layout)
    if scaling == "block":
        scales = torch.empty((*shape[:-1], shape[-1] // block), dtype=torch.float8_e8m0fnu,
                             device=g.device)
    elif scaling == "row":
        scales = torch.empty((*shape[:-1], 1), dtype=torch.float32, device=g.device)
    elif scale is not None:
        # a copy: the caller's delayed scale moves on, these scales belong to this q
        scales = scale.detach().to(g.device).reshape(()).clone()
    else:
        partial = torch.empty(p.grid[0], dtype=torch.float32, device=g.device)
        k.act_quant(g, u, q, partial, strides, act_id, beta_value, "amax", block, p, params)
        # torch's amax propagates NaN, and a max is exact in any order
        scales = reference.amax_scale(partial.amax(), out_dtype)
    k.act_quant(g, u, q, scales, strides, act_id, beta_value, scaling, block, p, params)
    return q, scales


def _fake(gate: Tensor, up: Tensor | None, act: str, beta_value: float, dim: int | None,
          out_dtype: torch.dtype, scaling: str, scale: Tensor | None, block: int,
          beta: Tensor | None = None, p1: Tensor | None = None, p2: Tensor | None = None,
          backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Outputs shaped as ``act_quant``'s: what torch.compile traces the op with."""
    if onnx_exporting() and onnx_form is not None:
        # torch.onnx's strict try (Dynamo) records the op where its ONNX form refused the call:
        # the form refuses here too, so that the export fails with the form's error
        onnx_form(gate, up, act, beta_value, dim, out_dtype, scaling, scale, block, beta, p1,
                  p2)
    g = gate if up is not None or dim is None else reference.halves(gate, dim)[0]
    q = g.new_empty(g.shape, dtype=out_dtype)
    if scaling == "block":
        return q, g.new_empty((*g.shape[:-1], g.shape[-1] // block),
                              dtype=torch.float8_e8m0fnu)
    if scaling == "row":
        return q, g.new_empty((*g.shape[:-1], 1), dtype=torch.float32)
    return q, g.new_empty((), dtype=torch.float32)


def act_quant_unchecked(gate: Tensor, up: Tensor | None, act: str, beta_value: float,
                        dim: int | None, out_dtype: torch.dtype, scaling: str,
                        scale: Tensor | None, block: int, beta: Tensor | None = None,
                        p1: Tensor | None = None, p2: Tensor | None = None,
                        backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``act_quant`` of arguments a public function checked (the op's schema order), under
    ``backend`` or else the backend in force: what the custom op runs."""
    g, u = (gate, up) if up is not None or dim is None else reference.halves(gate, dim)
    return _act_quant(g, u, act, beta_value, out_dtype, scaling, scale, block,
                      backend or get_backend(), beta, p1, p2)


# what torch.compile traces (an opaque op: Inductor cannot see inside the kernel), and what
# torch.export records; eager calls skip its dispatch
act_quant_op = torch.library.custom_op(
    "fused_act::act_quant", act_quant_unchecked, mutates_args=(),
    schema="(Tensor gate, Tensor? up, str act, float beta_value, int? dim, ScalarType out_dtype, "
           "str scaling, Tensor? scale, int block, Tensor? beta=None, Tensor? p1=None, "
           "Tensor? p2=None, str? backend=None) -> (Tensor, Tensor)")
act_quant_op.register_fake(_fake)


def run_act_quant(gate: Tensor, up: Tensor | None, act: str, beta_value: float,
                  dim: int | None, out_dtype: torch.dtype, scaling: str, scale: Tensor | None,
                  block: int, beta: Tensor | None = None, p1: Tensor | None = None,
                  p2: Tensor | None = None, mode: str | None = None,
                  backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``act_quant`` on validated arguments under ``backend`` (None: the backend in force
    where the kernels run), by the path the call needs: the reference math under torch.func
    transforms (plain torch operations, which batch) and under torch.compile where ``mode``
    (the op's ``config.compile_mode`` key) says "decompose" (Inductor then fuses the
    activation, the amax and the cast itself), ``onnx_form`` under ONNX export, the custom op
    under torch.compile and export, else the kernels or the reference math directly."""
    args = (gate, up, act, beta_value, dim, out_dtype, scaling, scale, block, beta, p1, p2)
    if reference_math():
        return reference_form(*args)
    if torch.compiler.is_compiling():
        if exporting() and onnx_exporting():
            return (onnx_form or reference_form)(*args)
        if mode is not None and config.mode_for(mode) == "decompose":
            return reference_form(*args)
        return act_quant_op(*args, backend)
    if dispatches_itself((gate, up, scale, beta, p1, p2)):
        # DTensor's rule (distributed.quant_strategies); any other subclass that dispatches
        # itself meets the op, which it either handles or refuses
        for hook in SUBCLASS_HOOKS:
            hook()
        return act_quant_op(*args, backend)
    return act_quant_unchecked(*args, backend)
