"""FP8 training through an MLP's down projection: ``act_fp8_linear`` computes
``F.linear(h, weight, bias)`` for h = act(x) (the elementwise form, ``fused_act.act_fp8_linear``)
or h = act(gate) * up (the gated form, ``fused_act.glu_fp8_linear``), with h quantised by the
fused ``act_quant`` (never written in high precision) and the weight quantised with the
matching scaling, multiplied by ``torch._scaled_mm`` where torch offers the combination on the
device, else from the dequantised operands in the output's dtype (a matmul that accumulates in
fp32).  Its backward is straight-through both quantisations: dh = dout @ weight, then the
unquantised op's own fused backward (``ACTIVATION``'s or ``GATED``'s implementations, under the
forward's backend) for dx (dgate and dup) and a tensor beta's gradient; dW = dout^T @
dequant(q_h), what the forward matmul read, in dout's dtype as a mixed-precision linear computes
it (fp32 would cost a GPU its tensor-core rate); db = dout summed over the tokens in fp32."""

import contextlib

import torch
from torch import Tensor

from .. import reference
from ..backend import get_backend
from ..registry import SPECS
from .acon import ACON_C
from .activation import ACTIVATION
from .glu import GATED
from .op import plain_backward, resolved
from .quant import run_act_quant

# the forward format of both operands in FP8 training recipes: the weight is always e4m3
WEIGHT_DTYPE = torch.float8_e4m3fn
SCALED_MM, DEQUANT = "scaled_mm", "dequant"

# (device, fp8 dtype of h, output dtype, scaling, bias, K % 16, N % 16) -> whether
# torch._scaled_mm computes that combination here (cuBLAS wants 16-aligned K and N; torch
# versions and devices differ in the dtypes and scalings they take)
_SUPPORTED: dict[tuple, bool] = {}


def _scaled_mm_runs(device: torch.device, h_dtype: torch.dtype, out_dtype: torch.dtype,
                    scaling: str, bias: bool, k_rem: int, n_rem: int) -> bool:
    """Whether ``torch._scaled_mm`` takes this combination, tried once on a small product of
    the same K and N remainders (torch.compile reads the answer as a constant)."""
    key = (device, h_dtype, out_dtype, scaling, bias, k_rem, n_rem)
    if key not in _SUPPORTED:
        m, k, n = 16, 16 + k_rem, 16 + n_rem
        a = torch.ones(m, k, device=device).to(h_dtype)
        b = torch.ones(n, k, device=device).to(WEIGHT_DTYPE).t()
        one = torch.ones((), device=device)
        sa, sb = (one, one) if scaling == "tensor" else (one.expand(m, 1).contiguous(),
                                                         one.expand(1, n).contiguous())
        c = torch.zeros(n, device=device, dtype=out_dtype) if bias else None
        try:
            out = torch._scaled_mm(a, b, sa, sb, bias=c, out_dtype=out_dtype)
            _SUPPORTED[key] = bool((out.float() == k).all())
        except (RuntimeError, TypeError, NotImplementedError, ValueError):
            _SUPPORTED[key] = False
    return _SUPPORTED[key]


# what torch.compiler.assume_constant_result marks, without importing the compiler with
# fused_act (that takes seconds and imports torch.distributed.tensor, whose import is when our
# sharding rules register)
_scaled_mm_runs._dynamo_marked_constant = True


def matmul_path(device: torch.device, h_dtype: torch.dtype, out_dtype: torch.dtype,
                scaling: str, k: int, n: int, bias: bool, tokens: int = 1) -> str:
    """Which product ``act_fp8_linear`` (both forms) runs for these operands: ``"scaled_mm"``
    (``torch._scaled_mm`` on the FP8 operands and their scales) where torch computes the
    combination on ``device`` (tried once per combination), else ``"dequant"`` (the dequantised
    operands multiplied in the output's dtype): always for ``scaling="block"`` (cuBLAS's MX
    path needs a Blackwell-class GPU and ``reference.blocked_scales``; not taken yet) and for
    no tokens."""
    if scaling == "block" or tokens == 0:
        return DEQUANT
    ok = _scaled_mm_runs(torch.device(device), h_dtype, out_dtype, scaling, bias, k % 16, n % 16)
    return SCALED_MM if ok else DEQUANT


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the fp32 products and the casts here are chosen, not the autocast dtype."""
    # a fixed list, not torch.amp.is_autocast_available: torch 2.11's Dynamo cannot trace that
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def quantize_weight(weight: Tensor, scaling: str, block: int) -> tuple[Tensor, Tensor]:
    """(q_w, scales) of the (N, K) weight in e4m3 by ``reference.quantize_fp8``: one scale per
    output feature ("row": (N, 1)), one ("tensor") or one per ``block`` of K ("block")."""
    return reference.quantize_fp8(weight, WEIGHT_DTYPE, scaling, None, block)


def fp8_product(q_h: Tensor, s_h: Tensor, q_w: Tensor, s_w: Tensor, bias: Tensor | None,
                scaling: str, block: int, out_dtype: torch.dtype, path: str) -> Tensor:
    """(M, N) = dequant(q_h) @ dequant(q_w)^T + bias in ``out_dtype``, for (M, K) ``q_h`` and
    (N, K) ``q_w`` with their scales as ``quantize_fp8`` makes them, by ``path``."""
    if path == SCALED_MM:
        b = None if bias is None else bias.to(out_dtype)
        s_b = s_w if scaling == "tensor" else s_w.reshape(1, -1)
        return torch._scaled_mm(q_h, q_w.t(), s_h, s_b, bias=b, out_dtype=out_dtype)
    # in the output's dtype, as the high-precision linear runs (block scales are powers of two:
    # the dequantised values are exact in bf16 too)
    h = reference.dequantize_fp8(q_h, s_h, scaling, block).to(out_dtype)
    w = reference.dequantize_fp8(q_w, s_w, scaling, block).to(out_dtype)
    out = h @ w.t()
    return out if bias is None else out + bias.to(out_dtype)


def _tokens(t: Tensor) -> Tensor:
    """``t`` with its leading dims flattened into one (the matmul's M)."""
    return t.reshape(-1, t.shape[-1])


class ActFp8Linear(torch.autograd.Function):
    """The autograd of ``act_fp8_linear`` (module docstring), for both forms: elementwise
    (``up`` and ``dim`` None) and gated.  Saves x and up (or the packed tensor), a tensor beta
    (with ACON-C's p1 and p2), q_h and its scales (one byte per element of h instead of h) and
    the weight."""

    @staticmethod
    def forward(ctx, x: Tensor, up: Tensor | None, beta: Tensor | None, p1: Tensor | None,
                p2: Tensor | None, weight: Tensor, bias: Tensor | None, act: str,
                beta_value: float, dim: int | None, out_dtype: torch.dtype, scaling: str,
                block: int, path: str | None) -> Tensor:
        backend = get_backend()
        packed = None if up is not None else dim
        kernel = act if act == ACON_C.schema.name else SPECS[act].kernel
        q_h, s_h = run_act_quant(x, up, kernel, beta_value, packed, out_dtype, scaling, None,
                                 block, beta, p1, p2)
        shape, k, n = q_h.shape, q_h.shape[-1], weight.shape[0]
        q2, s2 = _tokens(q_h), (s_h if scaling == "tensor" else _tokens(s_h))
        with _no_autocast(x.device):
            q_w, s_w = quantize_weight(weight, scaling, block)
            if path is None:
                path = matmul_path(x.device, out_dtype, x.dtype, scaling, k, n,
                                   bias is not None, q2.shape[0])
            out = fp8_product(q2, s2, q_w, s_w, bias, scaling, block, x.dtype, path)
        ctx.save_for_backward(x, up, beta, p1, p2, q2, s2, weight)
        ctx.attrs = (act, beta_value, dim, scaling, block, backend, shape,
                     None if bias is None else bias.dtype)
        return out.reshape(*shape[:-1], n)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple:
        # resolved: a saved-tensor hook may unpack a negative view
        x, up, beta, p1, p2, q2, s2, weight = resolved(*ctx.saved_tensors)
        act, beta_value, dim, scaling, block, backend, shape, bias_dtype = ctx.attrs
        if torch.is_grad_enabled():
            raise RuntimeError(f"fused_act.{_name(up, dim)}: double backward "
                               "(create_graph=True) is not supported")
        needs = ctx.needs_input_grad
        d2 = _tokens(dout)
        grads = [None] * 5  # dx, dup, dbeta, dp1, dp2
        dweight = dbias = None
        with _no_autocast(dout.device):
            if any(needs[:5]):
                # straight-through h's quantisation: the gradient the unquantised h gets, by
                # the unquantised op's own backward
                dh = (d2 @ weight.to(d2.dtype)).reshape(shape)
                grads = _activation_backward(dh, x, up, beta, p1, p2, act, beta_value, dim,
                                             any(needs[2:5]), backend)
            if needs[5]:
                h = reference.dequantize_fp8(q2, s2, scaling, block).to(d2.dtype)
                dweight = (d2.t() @ h).to(weight.dtype)
            if needs[6]:
                dbias = d2.float().sum(0).to(bias_dtype)
        return (*(g if need else None for g, need in zip(grads, needs[:5], strict=True)),
                dweight, dbias, *([None] * 7))


def _name(up: Tensor | None, dim: int | None) -> str:
    """The public function of a call: the elementwise form, or the gated one."""
    return "act_fp8_linear" if up is None and dim is None else "glu_fp8_linear"


def _activation_backward(dh: Tensor, x: Tensor, up: Tensor | None, beta: Tensor | None,
                         p1: Tensor | None, p2: Tensor | None, act: str, beta_value: float,
                         dim: int | None, need_params: bool, backend: str) -> list:
    """[dx, dup, dbeta, dp1, dp2] of dh by the unquantised op's backward (the activation's,
    ACON-C's or glu's), under ``backend`` and by the path its own node takes: the backward op
    while compiling, the reference math where the gradient needs it (``plain_backward``), else
    the kernels."""
    if act == ACON_C.schema.name:
        family, args = ACON_C, (dh, x, p1, p2, beta, need_params)
    elif up is None and dim is None:
        family, args = ACTIVATION, (dh, x, act, beta, beta_value, need_params)
    else:
        family, args = GATED, (dh, x, up, act, beta, beta_value, dim, need_params)
    if torch.compiler.is_compiling():
        grads = family.backward_op(*args, backend)
    elif plain_backward(dh):
        grads = family.backward(*args, backend)
    else:
        grads = family.reference_backward(*args)
    if family is ACON_C:
        dx, dp1, dp2, dbeta = grads
        return [dx, None, dbeta, dp1, dp2]
    # the gated form's dup is absent for a packed input (the backward op's: an empty tensor)
    return [grads[0], grads[1] if up is not None else None, grads[-1], None, None]


def act_fp8_linear(x: Tensor, up: Tensor | None, beta: Tensor | None, weight: Tensor,
                   bias: Tensor | None, act: str, beta_value: float, dim: int | None,
                   out_dtype: torch.dtype, scaling: str, block: int,
                   path: str | None = None, p1: Tensor | None = None,
                   p2: Tensor | None = None) -> Tensor:
    """``ActFp8Linear`` on validated arguments: ``act`` a spec name of the registry, with
    ``up`` and ``dim`` None its elementwise form (``beta``: swish's one or per-channel tensor),
    else its gated form (``up`` None: x is the packed gate_up split along ``dim``; ``beta``:
    one value); ``beta_value`` the float beta where ``beta`` is None; ``path`` None
    (``matmul_path`` decides) or the product to run; ``p1`` and ``p2`` ACON-C's (``act``
    "acon_c", with its per-channel ``beta``)."""
    # the backward hands the saved tensors to the kernels, which would read a negative view's
    # memory: the negation of its values (resolve_neg is recorded: gradients reach the view)
    x, up, beta, p1, p2 = resolved(x, up, beta, p1, p2)
    return ActFp8Linear.apply(x, up, beta, p1, p2, weight, bias, act, beta_value, dim,
                              out_dtype, scaling, block, path)
