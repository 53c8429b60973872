"""The public functional API: argument checks, then one call into ``ops``.

Every check runs before any kernel launch and names the op and the argument.  Every public
function takes part in torch's ``__torch_function__`` protocol as torch.nn.functional's do, so
``torch.fx`` records it as one call (a leaf) and a tensor-like with a ``__torch_function__`` of
its own sees the call.
"""

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from . import ops, reference
from .registry import FUNCTIONS, SPECS, Spec

# Every op computes in fp32 for the 16-bit types and fp32, in fp64 for fp64.  Anything else
# (integers, bool, complex, float8) is refused: float8's few mantissa bits would need their own
# rounding rules, and no kernel here implements them.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED = "floating-point tensor of dtype float16, bfloat16, float32 or float64"


def _check_dtype(op: str, arg: str, t: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused_act.{op}: {arg} must be a {_SUPPORTED} (got {t.dtype})")


def _check_tensor(op: str, arg: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fused_act.{op}: {arg} must be a torch.Tensor (got {type(t).__name__})")
    _check_dtype(op, arg, t)


def _check_x(op: str, x: object) -> None:
    _check_tensor(op, "x", x)


def _check_param_type(op: str, arg: str, p: object, x: Tensor, x_arg: str = "x") -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"fused_act.{op}: {arg} must be a {_SUPPORTED} (got "
                        f"{type(p).__name__})")
    _check_dtype(op, arg, p)
    if p.device != x.device:
        raise ValueError(f"fused_act.{op}: {arg} is on {p.device} but {x_arg} is on {x.device}")


def _check_channel_param(op: str, arg: str, p: Tensor, x: Tensor,
                         allow_scalar: bool = True) -> None:
    """A parameter of C = x.shape[1] elements as (C,) or (1, C, 1, ...), or of one element
    (a scalar) where ``allow_scalar``."""
    _check_param_type(op, arg, p, x)
    if p.numel() == 1 and allow_scalar:
        return
    c = x.shape[1] if x.dim() >= 2 else None
    shape = tuple(p.shape)
    ok = c is not None and p.numel() == c and (
        shape == (c,) or (len(shape) <= x.dim() and len(shape) >= 2 and shape[1] == c))
    if not ok:
        want = f"C={c} elements as (C,) or (1, C, 1, ...)" if c is not None else "one element"
        one = "one element or " if allow_scalar and c is not None else ""
        raise ValueError(f"fused_act.{op}: {arg} must have {one}{want} for x of shape "
                         f"{tuple(x.shape)} (got shape {shape})")


# ---- FP8 output: the activation fused with the quantisation that feeds an FP8 matmul ---------

QUANT_ARGS = ("out_dtype", "scaling", "scale", "block")
MAX_BLOCK = 2048  # one tile of the kernels holds a whole block
_Out = Tensor | tuple[Tensor, Tensor]
QUANT_DOC = """

    ``out_dtype=torch.float8_e4m3fn`` or ``torch.float8_e5m2`` returns ``(q, scales)`` instead:
    the result quantised as ``fused_act.reference.quantize_fp8`` defines (computed in fp32,
    saturated to the format's finite range, rounded to nearest even, every NaN the code 0x7F),
    in one pass where the kernels offer it, the activation never written out.  ``scaling="row"``
    (the default): one fp32 scale per row of the last dim, shape ``(..., 1)``, the rowwise
    ``scale_a`` of ``torch._scaled_mm``; ``"tensor"``: one fp32 scale, shape (), from the amax
    of the whole result, or the caller's ``scale`` (one finite fp32 value > 0: delayed
    scaling); ``"block"``: one E8M0 power of two per ``block`` (32, the MX layout) elements of
    the last dim, ``float8_e8m0fnu`` of shape ``(..., K // block)``, row-major
    (``reference.blocked_scales`` swizzles them for the matmul).  q (row-major) times its scale
    gives the result back; the scales are a tensor of their own (a caller's is copied), and a
    caller's scale is checked on the host in eager calls only (torch.compile does not read it).
    torch.compile traces the op, or its reference math where the call's compile mode
    (``fused_act.config.compile_mode``: glu's key for the gated forms) is "decompose".
    No gradient flows through FP8 data: such a call refuses inputs that require grad where grad
    mode is on."""


def _check_quant(op: str, gate: Tensor, up: Tensor | None, dim: int | None, out_dtype: object,
                 scaling: object, scale: object, block: object) -> None:
    """The checks of the quantisation arguments of an FP8-output call (naming ``op`` and the
    argument)."""
    g = gate if up is not None or dim is None else reference.halves(gate, dim)[0]
    # a traced graph cannot read a caller's scale (there a scale of 0, inf or NaN goes
    # unchecked: the docstring says so)
    reference.check_quantize(g, out_dtype, scaling, scale, block, f"fused_act.{op}",
                             ("the input", "out_dtype"), MAX_BLOCK,
                             read_scale=not torch.compiler.is_compiling())
    if scale is not None and scale.device != g.device:
        raise ValueError(f"fused_act.{op}: scale is on {scale.device} but the input is on "
                         f"{g.device}")


def _quantized(op: str, gate: Tensor, up: Tensor | None, act: str, beta_value: float,
               dim: int | None, out_dtype: object, scaling: object, scale: object,
               block: object, params: tuple[Tensor | None, ...] = ()) -> tuple[Tensor, Tensor]:
    """The checks of an FP8-output call (naming ``op`` and the argument), then the op;
    ``params``: the checked per-channel (beta, p1, p2) of swish's tensor beta or ACON-C."""
    _check_quant(op, gate, up, dim, out_dtype, scaling, scale, block)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (gate, up, *params)):
        raise RuntimeError(f"fused_act.{op}: out_dtype={out_dtype} gives FP8 data, through "
                           "which autograd carries no gradient; call it under torch.no_grad() "
                           "or torch.inference_mode(), or on inputs that do not require grad")
    # the compile mode of the call without out_dtype: glu's for the gated forms, else the
    # activation's own (gelu's two forms apart)
    mode = "glu" if up is not None or dim is not None else act if op == "gelu" else op
    return ops.run_act_quant(gate, up, act, beta_value, dim, out_dtype, scaling, scale, block,
                             *params, mode=mode)


def swish(x: Tensor, beta: float | Tensor = 1.0, *, out_dtype: torch.dtype | None = None,
          scaling: str = "row", scale: Tensor | None = None,
          block: int = reference.MX_BLOCK) -> _Out:
    """Swish, ``x * sigmoid(beta * x)`` (Ramachandran et al., 2017).

    ``beta`` is a float, a one-element tensor, or a per-channel tensor of C = ``x.shape[1]``
    values shaped (C,) or (1, C, 1, ...), like ``torch.nn.PReLU``'s weight.  A float beta is
    rounded to fp32, as every scalar that reaches a kernel.  A tensor beta that
    requires grad gets its gradient reduced inside the backward kernel, deterministically, in
    beta's dtype.  Backward saves only ``x`` and beta.
    """
    _check_x("swish", x)
    if isinstance(beta, Tensor):
        _check_channel_param("swish", "beta", beta, x)
        if out_dtype is not None:
            return _quantized("swish", x, None, "swish", 1.0, None, out_dtype, scaling, scale,
                              block, (beta,))
        return ops.run_activation(x, "swish", beta, 1.0)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"fused_act.swish: beta must be a float or a tensor "
                        f"(got {type(beta).__name__})")
    if out_dtype is not None:
        return _quantized("swish", x, None, "swish", beta, None, out_dtype, scaling, scale, block)
    return ops.run_activation(x, "swish", None, beta)  # ops round beta to fp32


def gelu(x: Tensor, approximate: str = "none", *, out_dtype: torch.dtype | None = None,
         scaling: str = "row", scale: Tensor | None = None,
         block: int = reference.MX_BLOCK) -> _Out:
    """GELU (Hendrycks & Gimpel, 2016) as ``torch.nn.functional.gelu``.

    ``approximate="none"`` is ``x * Phi(x)`` with the normal CDF through erf; ``"tanh"`` is
    ``x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2``.  Any shape and floating dtype;
    gelu(+inf) = +inf, gelu(-inf) = 0.  Backward saves only ``x``.
    """
    _check_x("gelu", x)
    act = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if act is not None and out_dtype is not None:
        return _quantized("gelu", x, None, act, 1.0, None, out_dtype, scaling, scale, block)
    if act is not None:
        return ops.run_activation(x, act, None, 1.0)
    raise ValueError(f"fused_act.gelu: approximate must be 'none' or 'tanh' (got {approximate!r})")


def acon_c(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, *,
           out_dtype: torch.dtype | None = None, scaling: str = "row",
           scale: Tensor | None = None, block: int = reference.MX_BLOCK) -> _Out:
    """ACON-C (Ma et al., 2021): ``(p1 - p2) x sigmoid(beta (p1 - p2) x) + p2 x``.

    ``x`` is (N, C, *) or (N, C) in any floating dtype (fp16/bf16/fp32 computed in fp32);
    ``p1``, ``p2`` hold C values as (C,) or (1, C, 1, ...); ``beta`` is per channel in the same
    shapes or per sample, (N, C) or (N, C, 1, ...), which is Meta-ACON.  Parameters may be fp32 or
    x's dtype; their gradients come back in their dtype, reduced inside the fused backward
    (deterministically).  Contiguous and channels_last inputs run without a copy; other strides
    are copied once.  Backward saves only x and the parameters.  ``out_dtype`` (below) takes a
    per-channel beta only: Meta-ACON's per-sample beta has no FP8 output.
    """
    _check_x("acon_c", x)
    if x.dim() < 2:
        raise ValueError(f"fused_act.acon_c: x must have shape (N, C, *), got rank {x.dim()} "
                         f"(shape {tuple(x.shape)})")
    for name, p in (("p1", p1), ("p2", p2)):
        _check_channel_param("acon_c", name, p, x, allow_scalar=x.shape[1] == 1)
    _check_acon_beta(x, beta)
    if out_dtype is not None:
        if reference.per_sample(beta, x):
            raise ValueError(f"fused_act.acon_c: out_dtype takes a per-channel beta; a "
                             f"per-sample beta of shape {tuple(beta.shape)} (Meta-ACON) has no "
                             "FP8 output")
        return _quantized("acon_c", x, None, "acon_c", 1.0, None, out_dtype, scaling, scale,
                          block, (beta, p1, p2))
    return ops.run_acon(x, p1, p2, beta)


def _check_acon_beta(x: Tensor, beta: Tensor) -> None:
    n, c = x.shape[:2]
    if isinstance(beta, Tensor) and reference.per_sample(beta, x):
        _check_param_type("acon_c", "beta", beta, x)
        shape = tuple(beta.shape)
        if shape[1] != c or len(shape) > x.dim() or any(s != 1 for s in shape[2:]):
            raise ValueError(f"fused_act.acon_c: a per-sample beta must be (N, C) or (N, C, 1, "
                             f"...) = ({n}, {c}, ...) for x of shape {tuple(x.shape)} "
                             f"(got shape {shape})")
        return
    _check_channel_param("acon_c", "beta", beta, x, allow_scalar=c == 1)


def _check_frelu_pair(op: str, x: Tensor, t: Tensor) -> None:
    _check_x(op, x)
    if not isinstance(t, Tensor):
        raise TypeError(f"fused_act.{op}: t must be a torch.Tensor (got {type(t).__name__})")
    _check_dtype(op, "t", t)
    if t.dtype != x.dtype:
        raise TypeError(f"fused_act.{op}: t must have x's dtype {x.dtype} (got {t.dtype})")
    if t.device != x.device:
        raise ValueError(f"fused_act.{op}: t is on {t.device} but x is on {x.device}")
    if t.shape != x.shape:
        raise ValueError(f"fused_act.{op}: t must have x's shape {tuple(x.shape)} (got "
                         f"{tuple(t.shape)}); no broadcasting")


def frelu_max(x: Tensor, t: Tensor) -> Tensor:
    """FReLU's max step (Ma et al., "Funnel Activation", 2020): ``torch.maximum(x, t)``.

    ``x`` and ``t`` have the same shape, dtype and device (no broadcasting).  NaN in either gives
    NaN, and the gradient routes as ``torch.maximum``'s: all to the larger, half to each on a
    tie, all to both where a NaN is involved.  Backward saves one byte per element (which side
    won) instead of x and t; forward and backward are one pass each.
    """
    _check_frelu_pair("frelu_max", x, t)
    need_code = torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)
    return ops.run_max(x, t, need_code)


# ---- gated activations: act(gate) * up ----------------------------------------------------

def _gated_activation(op: str, activation: str, kwargs: dict) -> tuple[Spec, object]:
    """The registry spec that ``fused_act.<activation>(x, **kwargs)`` would run, and the beta
    among ``kwargs`` (None for an activation without one).  ``activation`` is a public
    activation function ("silu", "gelu", ...) or a spec name ("gelu_tanh")."""
    alias = SPECS.get(activation)
    if alias is not None and alias.function:
        clash = {k: v for k, v in kwargs.items() if alias.kwargs.get(k, v) != v}
        if clash:
            raise ValueError(f"fused_act.{op}: activation {activation!r} is "
                             f"{alias.function} with {alias.kwargs} (got {clash})")
        activation, kwargs = alias.function, {**alias.kwargs, **kwargs}
    specs = [s for s in SPECS.values() if s.public == activation]
    if not specs:
        names = sorted({s.public for s in SPECS.values()} | set(SPECS))
        raise ValueError(f"fused_act.{op}: unknown activation {activation!r}; choose one of "
                         f"{names}")
    defaults = dict(_ACTIVATION_ARGS[activation])
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"fused_act.{op}: activation {activation!r} takes no argument "
                        f"{unknown[0]!r} (it takes {sorted(defaults) or 'none'})")
    beta = kwargs.pop("beta", defaults.pop("beta", None))
    chosen = {**defaults, **kwargs}
    for spec in specs:
        if {**defaults, **spec.kwargs} == chosen:
            return spec, beta
    allowed = [{**defaults, **s.kwargs} for s in specs]
    raise ValueError(f"fused_act.{op}: activation {activation!r} takes {allowed} (got {chosen})")


def _plain_activation(op: str, activation: str) -> tuple[Spec, object]:
    """``_gated_activation`` of an activation named without arguments, once per name: its
    search of the registry cost a small layer's call several microseconds.  (A dict, not
    functools.cache, whose calls Dynamo warns about when it traces them.)"""
    found = _PLAIN_ACTIVATIONS.get((op, activation))
    if found is None:
        found = _PLAIN_ACTIVATIONS[op, activation] = _gated_activation(op, activation, {})
    return found


_PLAIN_ACTIVATIONS: dict[tuple[str, str], tuple[Spec, object]] = {}


def _check_gated(op: str, gate: Tensor, up: Tensor | None, dim: int) -> None:
    _check_tensor(op, "gate", gate)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"fused_act.{op}: dim must be an int (got {type(dim).__name__})")
    if up is not None:
        # dim is unused with up given, but a wrong one is a mistake worth naming; a 0-d gate
        # takes dim 0 or -1, as torch's dim arguments do
        if not -max(gate.dim(), 1) <= dim < max(gate.dim(), 1):
            raise ValueError(f"fused_act.{op}: dim {dim} is out of range for gate of shape "
                             f"{tuple(gate.shape)}")
        _check_tensor(op, "up", up)
        if up.dtype != gate.dtype:
            raise TypeError(f"fused_act.{op}: up must have gate's dtype {gate.dtype} (got "
                            f"{up.dtype})")
        if up.device != gate.device:
            raise ValueError(f"fused_act.{op}: up is on {up.device} but gate is on "
                             f"{gate.device}")
        if up.shape != gate.shape:
            raise ValueError(f"fused_act.{op}: up must have gate's shape {tuple(gate.shape)} "
                             f"(got {tuple(up.shape)}); no broadcasting")
        return
    if not -gate.dim() <= dim < gate.dim():
        raise ValueError(f"fused_act.{op}: dim {dim} is out of range for gate of shape "
                         f"{tuple(gate.shape)}, which up=None splits into gate and up halves")
    if gate.shape[dim] % 2:
        raise ValueError(f"fused_act.{op}: gate of shape {tuple(gate.shape)} has an odd size "
                         f"{gate.shape[dim]} along dim {dim}; up=None splits it into two "
                         "equal halves")


def _float_beta(op: str, beta: object) -> float:
    """A gated call's float beta (1.0 for none); the ops round it to fp32."""
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float))):
        raise TypeError(f"fused_act.{op}: beta must be a float or a tensor "
                        f"(got {type(beta).__name__})")
    return 1.0 if beta is None else beta


def _gated_beta(op: str, beta: object, gate: Tensor) -> tuple[Tensor | None, float]:
    """(the tensor beta or None, the float beta) of a gated call's activation: a float, or a
    tensor of one value on gate's device, which the gated kernels read as one channel."""
    if isinstance(beta, Tensor):
        _check_param_type(op, "beta", beta, gate, "gate")
        if beta.numel() != 1:
            raise ValueError(f"fused_act.{op}: beta must be a float or a one-element tensor "
                             f"(got shape {tuple(beta.shape)})")
        return beta, 1.0
    return None, _float_beta(op, beta)


def _gated(op: str, gate: Tensor, up: Tensor | None, activation: str, dim: int,
           kwargs: dict, quant: tuple = (None,), eager: bool = True) -> _Out:
    """The checks and the call of every gated function (``op``: the one the user called);
    ``quant``: its (out_dtype, scaling, scale, block); ``eager`` False: the op's own node even
    where the CPU fast path would run (``nn.GatedMLP`` reruns that node)."""
    _check_gated(op, gate, up, dim)
    spec, beta = _gated_activation(op, activation, dict(kwargs))
    beta_t, beta_value = _gated_beta(op, beta, gate)
    if quant[0] is not None:
        return _quantized(op, gate, up, spec.kernel, beta_value,
                          None if up is not None else dim, *quant,
                          () if beta_t is None else (beta_t,))
    if not eager:
        return ops.GATED(gate, up, spec.name, beta_t, beta_value, dim, mode="glu")
    return ops.run_glu(gate, up, spec.name, beta_t, beta_value, dim)


def glu(gate: Tensor, up: Tensor | None = None, activation: str = "silu", dim: int = -1, *,
        out_dtype: torch.dtype | None = None, scaling: str = "row", scale: Tensor | None = None,
        block: int = reference.MX_BLOCK, **activation_kwargs: object) -> _Out:
    """Gated activation ``activation(gate) * up`` (Shazeer, "GLU Variants Improve Transformer",
    2020), fused: one pass forward, one pass backward.

    ``activation`` is any elementwise activation here ("silu", "swish", "gelu", "mish", ...),
    with its own keyword arguments (``beta`` for swish: a float or a one-element tensor, whose
    gradient is reduced inside the backward, and which ``out_dtype`` reads on the device as the
    unquantised forward does; ``approximate`` for gelu).  ``gate`` and ``up``
    have the same shape, dtype and device (no broadcasting).  With ``up=None``, ``gate`` is the
    packed gate_up tensor, split into two halves along ``dim`` (first half gate); the halves of a
    contiguous packed tensor are read in place and its gradient is one buffer of its shape
    (with ``up`` given, ``dim`` is unused, but must still be a dim of gate).  fp16/bf16/fp32
    computed in fp32, fp64 in fp64; the output is contiguous, in gate's dtype.
    Backward saves only gate and up (or the packed tensor); other non-dense inputs are copied
    once.
    """
    return _gated("glu", gate, up, activation, dim, activation_kwargs,
                  (out_dtype, scaling, scale, block))


def swiglu(gate: Tensor, up: Tensor | None = None, dim: int = -1, *,
           out_dtype: torch.dtype | None = None, scaling: str = "row",
           scale: Tensor | None = None, block: int = reference.MX_BLOCK) -> _Out:
    """SwiGLU, ``silu(gate) * up``: ``glu`` with activation "silu" (``up=None`` splits gate;
    ``out_dtype``: an FP8 result and its scales, as ``glu``)."""
    return _gated("swiglu", gate, up, "silu", dim, {}, (out_dtype, scaling, scale, block))


def geglu(gate: Tensor, up: Tensor | None = None, approximate: str = "none",
          dim: int = -1, *, out_dtype: torch.dtype | None = None, scaling: str = "row",
          scale: Tensor | None = None, block: int = reference.MX_BLOCK) -> _Out:
    """GeGLU, ``gelu(gate, approximate) * up``: ``glu`` with activation "gelu" (``up=None``
    splits gate; ``out_dtype``: an FP8 result and its scales, as ``glu``)."""
    return _gated("geglu", gate, up, "gelu", dim, {"approximate": approximate},
                  (out_dtype, scaling, scale, block))


def _fp8_linear(op: str, gated: bool, x: Tensor, up: Tensor | None, dim: int | None,
                weight: Tensor, bias: Tensor | None, activation: str, kwargs: dict,
                out_dtype: object, scaling: object, block: object) -> Tensor:
    """The checks and the call of both FP8 linear functions (``op``: the one the user called):
    the gated form act(gate) * up (a tensor beta of one value, as ``glu`` takes it), or the
    elementwise form act(x) (``up`` and ``dim`` None; a tensor beta of 1 or C values, as
    ``swish`` takes it)."""
    elementwise = not gated
    name = "x" if elementwise else "gate"
    p1 = p2 = None
    if elementwise:
        _check_tensor(op, name, x)
    else:
        _check_gated(op, x, up, dim)
    if elementwise and activation == "acon_c":
        act, beta_value, (beta_t, p1, p2) = "acon_c", 1.0, _fp8_acon_params(op, x, kwargs)
    else:
        spec, beta = _gated_activation(op, activation, dict(kwargs))
        act = spec.name
        if not elementwise:
            beta_t, beta_value = _gated_beta(op, beta, x)
        elif isinstance(beta, Tensor):
            _check_channel_param(op, "beta", beta, x)
            beta_t, beta_value = beta, 1.0
        else:
            beta_t, beta_value = None, _float_beta(op, beta)
    if x.dim() == 0:
        raise ValueError(f"fused_act.{op}: {name} must have a last dimension (got a 0-d tensor)")
    packed = None if up is not None else dim
    _check_quant(op, x, up, packed, out_dtype, scaling, None, block)
    k = (x if packed is None else reference.halves(x, dim)[0]).shape[-1]
    _check_param_type(op, "weight", weight, x, name)
    if weight.dim() != 2 or weight.shape[1] != k:
        h = "activation(x)" if elementwise else "activation(gate) * up"
        raise ValueError(f"fused_act.{op}: weight must be (N, K) with K={k}, the last dimension "
                         f"of {h} (got shape {tuple(weight.shape)})")
    if bias is not None:
        _check_param_type(op, "bias", bias, x, name)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"fused_act.{op}: bias must be (N,) = ({weight.shape[0]},) (got "
                             f"shape {tuple(bias.shape)})")
    if ops.reference_math():
        raise RuntimeError(f"fused_act.{op}: torch.func transforms, forward-mode AD and "
                           "torch.jit.trace are not supported (its backward is a "
                           "straight-through estimator, not the derivative of its forward)")
    return ops.act_fp8_linear(x, up, beta_t, weight, bias, act, beta_value, dim, out_dtype,
                              scaling, block, p1=p1, p2=p2)


def _fp8_acon_params(op: str, x: Tensor, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(beta, p1, p2) of ACON-C in ``act_fp8_linear``, checked as ``acon_c(..., out_dtype=)``
    checks them: per-channel tensors of C = ``x.shape[1]`` values (Meta-ACON's per-sample beta
    has no FP8 output)."""
    missing = sorted({"p1", "p2", "beta"} - set(kwargs))
    extra = sorted(set(kwargs) - {"p1", "p2", "beta"})
    if missing or extra:
        raise TypeError(f"fused_act.{op}: activation 'acon_c' takes p1, p2 and beta (got "
                        f"{sorted(kwargs)})")
    if x.dim() < 2:
        raise ValueError(f"fused_act.{op}: activation 'acon_c' needs x of shape (N, C, *), got "
                         f"rank {x.dim()}")
    beta = kwargs["beta"]
    if isinstance(beta, Tensor) and reference.per_sample(beta, x):
        raise ValueError(f"fused_act.{op}: activation 'acon_c' takes a per-channel beta; a "
                         f"per-sample beta of shape {tuple(beta.shape)} (Meta-ACON) has no FP8 "
                         "output")
    for key in ("p1", "p2", "beta"):
        _check_channel_param(op, key, kwargs[key], x, allow_scalar=x.shape[1] == 1)
    return beta, kwargs["p1"], kwargs["p2"]


FP8_LINEAR_DOC = """

    The (N, K) ``weight`` is quantised to float8_e4m3fn (the forward format of FP8 recipes,
    whatever ``out_dtype``) by ``reference.quantize_fp8`` with the same ``scaling`` as h: one
    scale per output feature ("row", ``torch._scaled_mm``'s rowwise ``scale_b``), one
    ("tensor"), or one E8M0 scale per ``block`` of K ("block").  Leading dims of the input are
    the tokens, flattened for the product and restored; the result is in the input's dtype.
    The product is ``torch._scaled_mm(q_h, q_w.t(), ...)`` where torch computes that
    combination on the device, else dequant(q_h) @ dequant(q_w)^T in the result's dtype
    (always for "block": cuBLAS's MX path is not taken yet);
    ``fused_act.ops.fp8_linear.matmul_path`` says which runs.

    The backward is straight-through both quantisations, as FP8 training recipes are: it takes
    the output's gradient in the input's dtype and forms dh = dout @ weight (in that dtype, as
    ``F.linear``'s backward); the unquantised activation's own fused backward, under the
    backend in force at the forward, gives dx (dgate and dup) and the gradients of a tensor
    beta (and ACON-C's p1 and p2), bit for bit what the unquantised op gives for that dh;
    dweight = dout^T @ dequant(q_h) (what the forward product read) in dout's dtype, as a
    mixed-precision linear, and dbias = dout summed over the tokens in fp32, each then in its
    parameter's dtype.  Saved: the activation's inputs (and its parameter tensors), q_h and
    its scales (one byte per element of h
    instead of h) and weight.  Not supported: gradients in FP8 (e5m2 with its scale); double
    backward; torch.func transforms and forward-mode AD (each is a clear error).  ``weight``
    and ``bias`` may be of another floating dtype than the input (fp32 master weights)."""


def act_fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                   activation: str = "gelu", *, out_dtype: torch.dtype = torch.float8_e4m3fn,
                   scaling: str = "row", block: int = reference.MX_BLOCK,
                   **activation_kwargs: object) -> Tensor:
    """``F.linear(activation(x), weight, bias)`` in FP8, differentiable: an MLP's activation
    and second projection (``fc2(gelu(fc1(x)))``) for FP8 training.

    h = activation(x), any elementwise activation here ("gelu", "silu", "swish", "mish",
    "squared_relu", ...) with its own keyword arguments (``approximate`` for gelu; ``beta`` for
    swish: a float, or a tensor of 1 or C = ``x.shape[1]`` values as ``swish`` takes it, so per
    feature for a 2-D (tokens, features) x, whose gradient the backward gives; or "acon_c"
    with per-channel tensors ``p1``, ``p2`` and ``beta`` of C = ``x.shape[1]`` values, whose
    gradients it gives, Meta-ACON's per-sample beta refused as ``acon_c(..., out_dtype=)``
    refuses it),
    is quantised to ``out_dtype`` with its scales
    by the fused quantisation of ``fused_act.<activation>(x, out_dtype=, scaling=, block=)``,
    in one pass, never written in high precision.  ``glu_fp8_linear`` is the gated form.
    """
    return _fp8_linear("act_fp8_linear", False, x, None, None, weight, bias, activation,
                       activation_kwargs, out_dtype, scaling, block)


def glu_fp8_linear(gate: Tensor, up: Tensor | None, weight: Tensor, bias: Tensor | None = None,
                   activation: str = "silu", dim: int = -1, *,
                   out_dtype: torch.dtype = torch.float8_e4m3fn, scaling: str = "row",
                   block: int = reference.MX_BLOCK, **activation_kwargs: object) -> Tensor:
    """``F.linear(activation(gate) * up, weight, bias)`` in FP8, differentiable: a gated MLP's
    activation and down projection for FP8 training.

    h = activation(gate) * up (``up=None``: the halves of a packed gate_up along ``dim``, as
    ``glu``; ``activation`` and its keyword arguments as ``glu`` takes them, ``beta`` a float or
    a one-element tensor whose gradient the backward gives) is quantised to ``out_dtype`` with
    its scales by the fused quantisation of ``glu(..., out_dtype=, scaling=, block=)``, in one
    pass, never written in high precision.  ``act_fp8_linear`` is the elementwise form.
    """
    return _fp8_linear("glu_fp8_linear", True, gate, up, dim, weight, bias, activation,
                       activation_kwargs, out_dtype, scaling, block)


# ---- BatchNorm + activation ------------------------------------------------------------------

def _check_bn_tensor(arg: str, t: object, x: Tensor) -> None:
    """A BatchNorm tensor of C = x.shape[1] values: a weight or bias of any shape, a running
    statistic (updated in place) of shape (C,), as torch's BatchNorm takes them."""
    _check_param_type("batch_norm_act", arg, t, x)
    if arg.startswith("running") and t.shape != (x.shape[1],):
        raise ValueError(f"fused_act.batch_norm_act: {arg} must have shape (C,) = "
                         f"({x.shape[1]},) for x of shape {tuple(x.shape)} (got shape "
                         f"{tuple(t.shape)})")
    if t.numel() != x.shape[1]:
        raise ValueError(f"fused_act.batch_norm_act: {arg} must have C={x.shape[1]} elements "
                         f"for x of shape {tuple(x.shape)} (got shape {tuple(t.shape)})")


def _bn_activation(x: Tensor, activation: str, kwargs: dict
                   ) -> tuple[str, Tensor | None, float, Tensor | None, Tensor | None]:
    """(the ops' act, tensor beta, float beta, p1, p2) of ``batch_norm_act``'s activation."""
    op = "batch_norm_act"
    if activation == "acon_c":
        if set(kwargs) != {"p1", "p2", "beta"}:
            raise TypeError(f"fused_act.{op}: activation 'acon_c' takes p1, p2 and beta (got "
                            f"{sorted(kwargs)})")
        for name in ("p1", "p2", "beta"):
            _check_channel_param(op, name, kwargs[name], x, allow_scalar=x.shape[1] == 1)
        return "acon_c", kwargs["beta"], 1.0, kwargs["p1"], kwargs["p2"]
    if not kwargs and isinstance(activation, str):
        spec, beta = _plain_activation(op, activation)
    else:
        spec, beta = _gated_activation(op, activation, dict(kwargs))
    if isinstance(beta, Tensor):
        _check_channel_param(op, "beta", beta, x)
        return spec.name, beta, 1.0, None, None
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float))):
        raise TypeError(f"fused_act.{op}: beta must be a float or a tensor "
                        f"(got {type(beta).__name__})")
    return spec.name, None, 1.0 if beta is None else beta, None, None


def batch_norm_act(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                   activation: str = "silu", **activation_kwargs: object) -> Tensor:
    """``activation(torch.nn.functional.batch_norm(x, ...))``, fused: the same arguments and
    running-statistics updates as torch's, then any elementwise activation here with its
    keyword arguments (``approximate`` for gelu; ``beta`` for swish, a float or a tensor of 1 or
    C values whose gradient is reduced inside the backward), or ``"acon_c"`` with per-channel
    ``p1``, ``p2`` and ``beta`` (ACON-C; their gradients reduced in the backward too).

    ``x`` is (N, C, *).  In training the batch statistics are
    computed in fp32 (fp64 for fp64) in one read of x, then y = f((x - mean) a + b) in a second;
    the backward reads x and the gradient twice (per-channel sums, then dx; on CPU the second
    pass reads the first one's dz in the gradient's place) and saves only x,
    the parameters and the C-sized statistics, never the normalised value.  ``running_mean`` and
    ``running_var`` (both, or neither) are updated in place with ``momentum`` (the unbiased
    variance, as torch).  In eval (``training=False``, which needs the running statistics, as
    torch's) they fold into per-channel a, b: one pass each way, gradients reaching weight and
    bias.  fp16/bf16 results are rounded once, from fp32.  A DTensor is
    refused: statistics across shards are SyncBatchNorm's job.

    Eager calls on CPU tensors under backends "auto" and "cpu", with an elementwise activation
    of a float beta and running statistics that take no gradient, run the fused op's kernels
    from C++ (ops/eager.py), without its Python bookkeeping, which made small layers up to 3x
    slower than torch's pair: in training as one autograd node with the op's results and saved
    tensors; in eval as one call of its kernel without a gradient to take (inference) and as a
    node of its affine_act with one.
    """
    _check_x("batch_norm_act", x)
    if x.dim() < 2:
        raise ValueError(f"fused_act.batch_norm_act: x must have shape (N, C, *), got rank "
                         f"{x.dim()} (shape {tuple(x.shape)})")
    for arg, t in (("running_mean", running_mean), ("running_var", running_var),
                   ("weight", weight), ("bias", bias)):
        if t is not None:
            _check_bn_tensor(arg, t, x)
    act, beta_t, beta_v, p1, p2 = _bn_activation(x, activation, activation_kwargs)
    dtensor = sys.modules.get("torch.distributed.tensor")  # imported by whoever made one
    if dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in (
            x, running_mean, running_var, weight, bias, beta_t)):
        raise TypeError("fused_act.batch_norm_act: DTensor inputs would be normalised by each "
                        "shard's own statistics; use torch.nn.SyncBatchNorm and the activation "
                        "apart")
    if (running_mean is None) != (running_var is None):
        raise ValueError("fused_act.batch_norm_act: running_mean and running_var must either "
                         "both be None or neither be None")
    if not training and running_mean is None:
        raise ValueError("fused_act.batch_norm_act: running_mean and running_var must be "
                         "defined in evaluation mode (training=False)")
    if training:
        if not eps > 0:  # 1 / sqrt(var + eps) of a constant channel: inf, as torch refuses
            raise ValueError(f"fused_act.batch_norm_act: eps must be positive during training, "
                             f"got {eps}")
        m = x.numel() // x.shape[1] if x.shape[1] else 0
        if m == 1:
            raise ValueError(f"fused_act.batch_norm_act: expected more than 1 value per channel "
                             f"when training, got input size {tuple(x.shape)}")
    # the ops read C values in a row (a (1, C, 1, 1) weight once broadcast to C x C there)
    weight = weight if weight is None or weight.dim() == 1 else weight.reshape(-1)
    bias = bias if bias is None or bias.dim() == 1 else bias.reshape(-1)
    # the C++ path saves what the op saves: checkpointing may recompute it under another
    # backend; momentum is not read in eval (torch's BatchNorm modules pass None there)
    y = ops.eager_batch_norm(x, running_mean, running_var, weight, bias, bool(training),
                             momentum if training else 0.0, eps, act, beta_t, beta_v)
    if y is not None:
        return y
    if training:
        y, mean, var = ops.BATCH_NORM_ACT(x, weight, bias, eps, act, beta_t, beta_v, p1, p2,
                                          mode="batch_norm_act")
        if running_mean is not None and m > 0:
            # as torch's BatchNorm, the update is no write in autograd's saved-tensor checks:
            # non-reentrant checkpointing saves the buffers as inputs and would refuse them at
            # recomputation (compiled graphs functionalise the update: no counter to keep)
            kept = contextlib.nullcontext() if torch.compiler.is_compiling() else (
                torch.autograd._unsafe_preserve_version_counter((running_mean, running_var)))
            with torch.no_grad(), kept:
                # mul_.Scalar, as the C++ node's update (a Python float makes mul_.Tensor,
                # which rounds bf16 statistics differently: 1 ulp apart in most calls)
                mul_ = torch.ops.aten.mul_.Scalar
                mul_(running_mean, 1.0 - momentum).add_(mean.to(running_mean.dtype),
                                                        alpha=momentum)
                mul_(running_var, 1.0 - momentum).add_((var * (m / (m - 1))).to(
                    running_var.dtype), alpha=momentum)
        return y
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        a = a * weight.to(acc)
    b = torch.zeros_like(a) if bias is None else bias.to(acc)
    # a copy: a training step between this forward and its backward updates the running mean in
    # place below the version counter (as torch's), and the backward reads the forward's
    return ops.AFFINE_ACT(x, running_mean.to(acc, copy=True), a, b, act, beta_t, beta_v, p1, p2,
                          mode="batch_norm_act")


def _plain(spec: Spec) -> Callable[..., Tensor]:
    """The public function of an activation without arguments of its own (its spec's ``doc``),
    with torch.nn.functional's ``inplace``."""
    name = spec.name

    def function(x: Tensor, inplace: bool = False, *, out_dtype: torch.dtype | None = None,
                 scaling: str = "row", scale: Tensor | None = None,
                 block: int = reference.MX_BLOCK) -> _Out:
        _check_x(name, x)
        if out_dtype is not None:
            if inplace:
                raise ValueError(f"fused_act.{name}: inplace=True writes x's dtype; out_dtype "
                                 "gives a new FP8 tensor")
            return _quantized(name, x, None, spec.kernel, 1.0, None, out_dtype, scaling, scale,
                              block)
        if not inplace:
            return ops.run_activation(x, name, None, 1.0)
        if torch.is_grad_enabled() and x.requires_grad:
            # the backward reads the input, which the write would destroy: it reads a copy;
            # copy_ raises torch's own error for a leaf that requires grad, as torch's does
            return x.copy_(ops.run_activation(x.clone(), name, None, 1.0))
        return ops.apply_(x, name)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = (f"{inspect.cleandoc(spec.doc)}\n\n``inplace=True`` writes the result into "
                        "``x`` and returns ``x``, as torch.nn.functional's ``inplace``.\n\n"
                        + inspect.cleandoc(QUANT_DOC))
    return function


for _written in (swish, gelu, glu, acon_c):
    _written.__doc__ += QUANT_DOC
for _written in (act_fp8_linear, glu_fp8_linear):
    _written.__doc__ += FP8_LINEAR_DOC

_F = TypeVar("_F", bound=Callable[..., Tensor])


def _overridable(function: _F, entry: str | None = None) -> _F:
    """``function`` taking part in the ``__torch_function__`` protocol, as torch.nn.functional's
    functions do: a call with any argument whose type overrides it (an FX ``Proxy``, a
    tensor-like, a tensor subclass, or under a TorchFunctionMode) is handed to that override with
    the public function itself as ``func``, so ``torch.fx`` records one node whose target is
    the public function and a traced graph calls it back.  Plain tensors, ``nn.Parameter`` and
    DTensor (whose ``__torch_function__`` is disabled) pass one C check and run ``function``.
    ``entry`` names the CPU kernels' one-step C++ call of the function (ops.call_entry), tried
    first on positional arguments: it takes exact Tensor or Parameter arguments with no
    TorchFunctionMode on the stack only, the calls for which the protocol does nothing."""

    @functools.wraps(function)
    def public(*args: object, **kwargs: object) -> Tensor:
        if entry is not None and not kwargs:
            y = ops.call_entry(entry, args)
            if y is not None:
                return y
        relevant = (*args, *kwargs.values()) if kwargs else args
        if has_torch_function(relevant):
            return handle_torch_function(public, relevant, *args, **kwargs)
        return function(*args, **kwargs)

    return public  # type: ignore[return-value]


# The public functions, re-exported by fused_act/__init__.py: those written above, and one
# generated for every other activation of the registry (it takes x alone); each is registered
# overridable, the one place the protocol is added (and frelu_max's C++ entry tried).
_WRITTEN = {"acon_c": acon_c, "act_fp8_linear": act_fp8_linear, "batch_norm_act": batch_norm_act,
            "frelu_max": frelu_max, "geglu": geglu, "gelu": gelu, "glu": glu,
            "glu_fp8_linear": glu_fp8_linear, "swiglu": swiglu, "swish": swish}
FUNCTIONS.update({name: _overridable(f, "fast_max" if f is frelu_max else None)
                  for name, f in _WRITTEN.items()})
FUNCTIONS.update({s.public: _overridable(_plain(s)) for s in SPECS.values()
                  if s.public not in FUNCTIONS})
globals().update(FUNCTIONS)
__all__ = sorted(FUNCTIONS)

# each public activation function's keyword arguments with their defaults, which a gated op's
# activation arguments are checked against (``inplace`` is no argument of the activation): read
# once here, as torch.compile traces a dict
_ACTIVATION_ARGS = {
    s.public: {p.name: p.default
               for p in list(inspect.signature(FUNCTIONS[s.public]).parameters.values())[1:]
               if p.name != "inplace" and p.name not in QUANT_ARGS}
    for s in SPECS.values()}
