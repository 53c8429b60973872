"""Pure-PyTorch math of every activation: the fallback on any device and the tests' oracle.

Each activation has a forward and an explicit backward, so the reference backend, like the
fused ones, saves only its inputs for backward.  Arithmetic runs in fp32 for fp16/bf16/fp32
inputs and in fp64 for fp64 (``_opmath``); results come back in the input's dtype.  The forms are
the numerically stable ones of ``triton_kernels/math.py`` (same limits at +-inf, no NaN from any
finite input), written with torch operations so that ``torch.compile`` can fuse them when an op
is compiled in "decompose" mode.

Parameter shapes follow the public API: a per-channel parameter is ``(C,)`` or ``(1, C, 1, ...)``
for an input of shape ``(N, C, *)``; a one-element tensor is a scalar; a Meta-ACON beta may be
``(N, C)`` or ``(N, C, 1, ...)``.  Parameter gradients come back in the parameter's shape and dtype.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

SQRT1_2 = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_C = 0.044715
MISH_SATURATION = 20.0
INF = math.inf

Beta = float | Tensor


def _opmath(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def per_sample(p: Tensor, x: Tensor) -> bool:
    """The one rule for a per-sample parameter (Meta-ACON's beta): shape (N, C) or (N, C, 1,
    ...) with N = x.shape[0] > 1; any other parameter is per channel or a scalar."""
    return p.dim() >= 2 and p.shape[0] == x.shape[0] and p.shape[0] != 1


def _param(p: Beta, x: Tensor) -> Beta:
    """A parameter as a tensor that broadcasts against ``x`` in opmath (floats stay floats)."""
    if not isinstance(p, Tensor):
        return p
    p = _opmath(p)
    if p.numel() == 1:
        return p.reshape(())
    if per_sample(p, x):
        return p.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
    return p.reshape(1, x.shape[1], *([1] * (x.dim() - 2)))


def _grad_to(g: Tensor, p: Tensor) -> Tensor:
    """Sum an elementwise parameter gradient down to ``p``'s shape and dtype."""
    if p.numel() == 1:
        return g.sum().reshape(p.shape).to(p.dtype)
    if per_sample(p, g):
        return g.reshape(g.shape[0], g.shape[1], -1).sum(2).reshape(p.shape).to(p.dtype)
    dims = [d for d in range(g.dim()) if d != 1]
    return g.sum(dims).reshape(p.shape).to(p.dtype)


def sigmoid_pair(z: Tensor) -> tuple[Tensor, Tensor]:
    """sigma(z) and sigma(-z), both accurate in the tails, from one exp.

    -|z| is spelled as a selection: autograd through abs takes slope 0 at z = 0, which would
    make sigma'(0) = 0 instead of 1/4 for every path that differentiates this math (swish's
    d/dbeta at beta = 0 under torch.func, compile mode "decompose")."""
    pos = z >= 0
    e = torch.exp(torch.where(pos, -z, z))
    r = 1.0 / (1.0 + e)
    p = e * r
    return torch.where(pos, r, p), torch.where(pos, p, r)


def _is_inf(x: Tensor) -> Tensor:
    return x.abs() == INF


# ---- mish: x tanh(softplus(x)) -------------------------------------------------------------

def _tanh_softplus(x: Tensor) -> tuple[Tensor, Tensor]:
    e = torch.exp(x)
    n = e * (e + 2.0)
    return torch.where(x > MISH_SATURATION, 1.0, n / (n + 2.0)), n


def mish(x: Tensor) -> Tensor:
    """Mish, x * tanh(softplus(x)), as ``torch.nn.functional.mish`` with exact limits."""
    xf = _opmath(x)
    t, _ = _tanh_softplus(xf)
    return torch.where(xf == -INF, 0.0, xf * t).to(x.dtype)


def mish_backward(grad: Tensor, x: Tensor) -> Tensor:
    """grad * mish'(x), mish' = t + x sigma(x) (1 - t^2) with t = tanh(softplus(x))."""
    xf = _opmath(x)
    t, n = _tanh_softplus(xf)
    s, _ = sigmoid_pair(xf)
    d = t + xf * s * ((2.0 / (n + 2.0)) * (1.0 + t))
    d = torch.where(xf > MISH_SATURATION, 1.0, torch.where(xf == -INF, 0.0, d))
    return (_opmath(grad) * d).to(x.dtype)


# ---- swish: x sigma(beta x); silu is beta = 1 ----------------------------------------------

def _mul_or_zero(c: Tensor, x: Tensor) -> Tensor:
    """c * x, taking the limit +0 where c == 0 (x may be infinite or NaN), as the kernels do.

    A product in both branches, not a selection of a constant: autograd through it (torch.func,
    forward AD, compile mode "decompose" differentiate this math) must see d/dc = x and d/dx = c
    where c rounds to 0 at a finite x, which a constant branch would make 0.  The masked x keeps
    an infinite or NaN x out of the product, so no 0 * inf reaches the values or the gradients.
    """
    prod = c * torch.where((c == 0.0) & ~torch.isfinite(x), 0.0, x)
    return torch.where(c == 0.0, prod + 0.0, prod)  # + 0.0: the kernels' +0, not -0


def _swish_z(xf: Tensor, b: Beta) -> Tensor:
    if isinstance(b, Tensor):
        return _mul_or_zero(b, xf)
    return xf * b if b != 0.0 else torch.zeros_like(xf)


def swish(x: Tensor, beta: Beta = 1.0) -> Tensor:
    """Swish, x * sigmoid(beta * x); beta a float or a scalar / per-channel tensor."""
    xf = _opmath(x)
    s, _ = sigmoid_pair(_swish_z(xf, _param(beta, x)))
    return torch.where((s == 0.0) & _is_inf(xf), 0.0, xf * s).to(x.dtype)


def swish_backward(grad: Tensor, x: Tensor, beta: Beta = 1.0,
                   need_dbeta: bool = False) -> tuple[Tensor, Tensor | None]:
    """(grad * d/dx, grad * d/dbeta summed to beta's shape if asked) of swish."""
    xf, gf, b = _opmath(x), _opmath(grad), _param(beta, x)
    z = _swish_z(xf, b)
    s, sn = sigmoid_pair(z)
    q = s * sn
    dx = (gf * (s + torch.where(q == 0.0, 0.0, z * q))).to(x.dtype)
    if not need_dbeta:
        return dx, None
    if not isinstance(beta, Tensor):
        raise TypeError("swish_backward: need_dbeta requires beta to be a tensor")
    return dx, _grad_to(gf * torch.where(q == 0.0, 0.0, xf * xf * q), beta)


def silu(x: Tensor) -> Tensor:
    """SiLU, x * sigmoid(x), as ``torch.nn.functional.silu`` with exact limits."""
    return swish(x, 1.0)


# ---- gelu: x Phi(x), and its tanh approximation x sigma(2u) --------------------------------

def _gelu_cdf(xf: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(xf * SQRT1_2))


def _gelu_tanh_u(xf: Tensor) -> Tensor:
    return SQRT_2_OVER_PI * (xf + GELU_TANH_C * xf * xf * xf)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, x * Phi(x) ("none") or x * (1 + tanh(u)) / 2 ("tanh"), as F.gelu."""
    xf = _opmath(x)
    if approximate == "tanh":
        s, _ = sigmoid_pair(2.0 * _gelu_tanh_u(xf))
        y = torch.where((s == 0.0) & _is_inf(xf), 0.0, xf * s)
    else:
        y = torch.where(xf == -INF, 0.0, xf * _gelu_cdf(xf))
    return y.to(x.dtype)


def gelu_backward(grad: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    """grad * gelu'(x) for either approximation."""
    xf = _opmath(x)
    if approximate == "tanh":
        s, sn = sigmoid_pair(2.0 * _gelu_tanh_u(xf))
        q = s * sn
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * xf * xf)
        d = torch.where(q == 0.0, s, s + 2.0 * xf * q * du)
    else:
        cdf = _gelu_cdf(xf)
        pdf = torch.exp(-0.5 * xf * xf) * INV_SQRT_2PI
        d = torch.where(pdf == 0.0, cdf, cdf + xf * pdf)
    return (_opmath(grad) * d).to(x.dtype)


# ---- squared_relu: relu(x)^2 (So et al., Primer, 2021) -------------------------------------

def squared_relu(x: Tensor) -> Tensor:
    """Squared ReLU, relu(x)^2: x * x for x > 0, else 0; NaN in gives NaN out."""
    xf = _opmath(x)
    return torch.where(xf > 0.0, xf * xf, torch.where(xf <= 0.0, 0.0, xf)).to(x.dtype)


def squared_relu_backward(grad: Tensor, x: Tensor) -> Tensor:
    """grad * 2x for x > 0, else 0 (NaN stays NaN)."""
    xf = _opmath(x)
    d = torch.where(xf > 0.0, 2.0 * xf, torch.where(xf <= 0.0, 0.0, xf))
    return (_opmath(grad) * d).to(x.dtype)


# ---- acon_c: (p1 - p2) x sigma(beta (p1 - p2) x) + p2 x ------------------------------------



def _acon_parts(xf: Tensor, p1: Tensor, p2: Tensor, beta: Tensor):
    a, b2, b = _param(p1, xf) - _param(p2, xf), _param(p2, xf), _param(beta, xf)
    d = _mul_or_zero(a, xf)
    z = _mul_or_zero(b, d)
    s, sn = sigmoid_pair(z)
    return a, b2, d, z, s, sn, s * sn


def acon_c(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C (Ma et al., 2021) with per-channel p1, p2 and a per-channel or per-sample
    (Meta-ACON) beta: (p1 - p2) x sigma(beta (p1 - p2) x) + p2 x, written (a sigma(z) + p2) x so
    that x = +-inf gives its limit (p1 x, p2 x, or their mean where beta (p1 - p2) = 0)."""
    xf = _opmath(x)
    a, b2, _, _, s, _, _ = _acon_parts(xf, p1, p2, beta)
    return _mul_or_zero(a * s + b2, xf).to(x.dtype)


def acon_c_backward(grad: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dp1, dp2, dbeta) of ACON-C; parameter gradients in the parameters' shapes.

    With d = (p1 - p2) x, z = beta d and S = s + z s (1 - s) (the derivative of d sigma(beta d)
    by d): dx = (p1 - p2) S + p2, dp1 = x S, dp2 = x (1 - S), dbeta = d^2 s (1 - s), each times
    grad and summed over everything but the parameter's own dims.
    """
    xf, gf = _opmath(x), _opmath(grad)
    a, b2, d, z, s, sn, q = _acon_parts(xf, p1, p2, beta)
    zq = torch.where(q == 0.0, 0.0, z * q)
    big_s = s + zq
    dx = (gf * (a * big_s + b2)).to(x.dtype)
    dp1 = _grad_to(gf * _mul_or_zero(big_s, xf), p1)
    dp2 = _grad_to(gf * _mul_or_zero(sn - zq, xf), p2)
    dbeta = _grad_to(gf * torch.where(q == 0.0, 0.0, d * d * q), beta)
    return dx, dp1, dp2, dbeta


# ---- frelu_max: max(x, t) with torch.maximum's gradient routing ----------------------------

def frelu_max(x: Tensor, t: Tensor) -> Tensor:
    """max(x, t), NaN if either is NaN (``torch.maximum``)."""
    return torch.maximum(x, t)


def frelu_max_backward(grad: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dt): grad to the larger, half to each on a tie, all to both where NaN is involved."""
    g = torch.where(x == t, grad / 2, grad)
    return g.masked_fill(x < t, 0), g.masked_fill(x > t, 0)


# which side of max(x, t) won, one byte per element: all that its backward needs
X_WINS, T_WINS, TIE, NAN = 0, 1, 2, 3


def frelu_max_code(x: Tensor, t: Tensor) -> Tensor:
    """The win code of max(x, t): X_WINS, T_WINS, TIE, or NAN where either is NaN (uint8)."""
    # selections, not in-place fills: exported graphs must be functional (ONNX export); their
    # tensor operands all have x's strides, and so has the code
    code = torch.full_like(x, NAN, dtype=torch.uint8)
    for wins, value in ((x == t, TIE), (x < t, T_WINS), (x > t, X_WINS)):
        code = torch.where(wins, value, code)
    return code


def frelu_max_backward_code(grad: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dt) from the win code, as ``frelu_max_backward``; differentiable in ``grad``."""
    half = torch.where(code == TIE, 0.5, 1.0).to(grad.dtype)
    gx = (code == X_WINS) | (code == NAN) | (code == TIE)
    gt = (code == T_WINS) | (code == NAN) | (code == TIE)
    g = grad * half
    # where, not a product with 0: the loser's gradient is +0.0, as torch.maximum's is
    return torch.where(gx, g, 0.0), torch.where(gt, g, 0.0)


def frelu_max_affine(x: Tensor, t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """max(x, a t + b) with per-channel a, b (fp32, C values): FReLU's max after an eval-mode
    BatchNorm folded into a, b."""
    xf, tf = _opmath(x), _opmath(t)
    return torch.maximum(xf, tf * _param(a, x) + _param(b, x)).to(x.dtype)


def frelu_max_affine_backward(grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                              need_params: bool = True
                              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dx, dt, da, db) of ``frelu_max_affine``: ``frelu_max_backward``'s routing between x and
    z = a t + b (ties half and half, NaN to both), then dt = a dz, da = sum t dz, db = sum dz
    per channel (None unless ``need_params``); differentiable in every input."""
    xf, tf, af = _opmath(x), _opmath(t), _param(a, x)
    # z as the forward computes it, so the routing sees the forward's comparison
    gx, gz = frelu_max_backward(_opmath(grad), xf, tf * af + _param(b, x))
    dx, dt = gx.to(x.dtype), (gz * af).to(t.dtype)
    if not need_params:
        return dx, dt, None, None
    return dx, dt, _grad_to(gz * tf, a), _grad_to(gz, b)


# ---- BatchNorm + activation: f((x - c) a + b) per channel -----------------------------------

# an activation as the BatchNorm functions take it: its reference forward z -> f(z) in opmath,
# and its backward (grad, z, need_params) -> (grad f'(z), its parameters' gradients in their
# shapes, None where not needed)
Act = Callable[[Tensor], Tensor]
ActBackward = Callable[[Tensor, Tensor, bool], tuple[Tensor, tuple[Tensor | None, ...]]]


def _channel_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def affine_act(x: Tensor, c: Tensor, a: Tensor, b: Tensor, act: Act) -> Tensor:
    """f((x - c) a + b) with per-channel c, a, b (C values): an activation after a BatchNorm
    whose statistics and affine are folded into c (the mean), a (weight / std) and b (bias)."""
    z = (_opmath(x) - _param(c, x)) * _param(a, x) + _param(b, x)
    return act(z).to(x.dtype)


def affine_act_backward(grad: Tensor, x: Tensor, c: Tensor, a: Tensor, b: Tensor,
                        act_backward: ActBackward, need_params: bool) -> tuple[Tensor, ...]:
    """(dx, dc, da, db, *the activation's parameter gradients) of ``affine_act``: dz = grad
    f'(z), dx = a dz, and per channel dc = -a sum dz, da = sum dz (x - c), db = sum dz; all but
    dx None unless ``need_params``."""
    xc = _opmath(x) - _param(c, x)
    af = _param(a, x)
    dz, grads = act_backward(_opmath(grad), xc * af + _param(b, x), need_params)
    dx = (dz * af).to(x.dtype)
    if not need_params:
        return dx, None, None, None, *grads
    return (dx, (-_grad_to(dz, a) * _opmath(a)).to(c.dtype), _grad_to(dz * xc, a),
            _grad_to(dz, b), *grads)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) of each channel of ``x`` (N, C, *), in opmath: (C,) each."""
    var, mean = torch.var_mean(_opmath(x), _channel_dims(x), correction=0)
    return mean, var


def bn_affine(weight: Tensor | None, bias: Tensor | None, invstd: Tensor
              ) -> tuple[Tensor, Tensor]:
    """(a, b) of a BatchNorm's weight and bias (None: 1 and 0) over 1 / std, in opmath."""
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    return a, torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)


def batch_norm_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                   act: Act) -> tuple[Tensor, Tensor, Tensor]:
    """(f(batch_norm(x)), mean, var): BatchNorm on the batch statistics of ``x`` (N, C, *), as
    torch's in training, then the activation, computed in opmath and rounded once; mean and the
    biased variance come back in opmath for the running statistics."""
    mean, var = batch_stats(x)
    a, b = bn_affine(weight, bias, torch.rsqrt(var + eps))
    return affine_act(x, mean, a, b, act), mean, var


def batch_norm_act_backward(grad: Tensor, x: Tensor, weight: Tensor | None,
                            bias: Tensor | None, eps: float, act_backward: ActBackward,
                            mean: Tensor, var: Tensor, need_params: bool
                            ) -> tuple[Tensor, ...]:
    """(dx, dweight, dbias, *the activation's parameter gradients) of ``batch_norm_act`` from
    its ``mean`` and ``var``: with dz = grad f'(z), S1 = sum dz and S2 = sum dz (x - mean) per
    channel over its M elements, dbias = S1, dweight = S2 / std and dx = a (dz - S1 / M -
    (x - mean) S2 / (M var')) with a = weight / std, var' = var + eps (torch's training
    BatchNorm backward); all but dx None unless ``need_params``."""
    invstd = torch.rsqrt(var + eps)
    a, b = bn_affine(weight, bias, invstd)
    xc = _opmath(x) - _param(mean, x)
    af = _param(a, x)
    dz, grads = act_backward(_opmath(grad), xc * af + _param(b, x), need_params)
    dims = _channel_dims(x)
    m = x.numel() // max(x.shape[1], 1)  # C = 0: nothing to normalise, and no division
    s1, s2 = dz.sum(dims), (dz * xc).sum(dims)
    dx = af * (dz - _param(s1 / m, x) - xc * _param(s2 * invstd * invstd / m, x))
    if not need_params:
        return dx.to(x.dtype), None, None, *grads
    dweight = None if weight is None else (s2 * invstd).to(weight.dtype)
    dbias = None if bias is None else s1.to(bias.dtype)
    return dx.to(x.dtype), dweight, dbias, *grads


# ---- gated: act(gate) * up (SwiGLU, GeGLU, ...) --------------------------------------------

def halves(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The gate and up halves of a packed tensor along ``dim`` (views, gate first)."""
    h = x.shape[dim] // 2
    return x.narrow(dim, 0, h), x.narrow(dim, h, h)


def glu(gate: Tensor, up: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """act(gate) * up, for ``act`` an activation's reference forward (opmath in, opmath out)."""
    return (act(_opmath(gate)) * _opmath(up)).to(gate.dtype)


def glu_backward(grad: Tensor, gate: Tensor, up: Tensor, act: Callable[[Tensor], Tensor],
                 act_backward: Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dgate, dup, dparam) of act(gate) * up from the activation's reference forward and
    explicit backward ``act_backward(grad, x) -> (dx, dparam or None)``: dgate is the
    activation's backward of grad * up, dup = grad * act(gate)."""
    gf, xf = _opmath(grad), _opmath(gate)
    dgate, dparam = act_backward(gf * _opmath(up), xf)
    return dgate.to(gate.dtype), (gf * act(xf)).to(up.dtype), dparam


# ---- FP8 quantisation: the oracle of fused quantising epilogues ----------------------------

# largest finite value of each FP8 format, and its exponent (floor(log2)) for the MX shared scale
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
FP8_EMAX = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15}
# the least amax a tensor or row scale is computed from: an all-zero tensor then gets the finite
# scale AMAX_FLOOR / FMAX (its q all 0) instead of 0 / 0
AMAX_FLOOR = 1e-12
SCALINGS = ("tensor", "row", "block")
MX_BLOCK = 32
E8M0_NAN = 0xFF
FP8_NAN = 0x7F  # the one code every quantised NaN gets, so that q is the same on every device


def _amax(yf: Tensor, dim: int | None = None) -> Tensor:
    """max |yf| over ``dim`` (kept), or over all of yf (shape ()); NaN if any element is NaN,
    0 over none."""
    a = yf.abs()
    if dim is None:
        # over one flat dim: ONNX export has no amax over all dims
        return _amax(a.reshape(-1), 0).reshape(())
    if not a.shape[dim]:
        return a.sum(dim, keepdim=True)
    # NaN by a where: torch's max reductions propagate it, onnxruntime's ReduceMax drops it
    return torch.where(a.isnan().any(dim, True), math.nan, a.amax(dim, keepdim=True))


def _to_fp8(v: Tensor, dtype: torch.dtype) -> Tensor:
    """Saturating round-to-nearest-even cast of fp32 ``v``: the clamp makes torch's cast
    saturate on every version (its e5m2 cast overflows to inf), and every NaN becomes a
    positive one first, which the cast writes as FP8_NAN in both formats: the cast keeps a
    NaN's sign, which devices choose differently (x86 makes inf / inf a negative NaN, CUDA a
    positive one).  No bit view: torch.func batches it on every torch, and ONNX has it."""
    fmax = FP8_MAX[dtype]
    return torch.where(v.isnan(), math.nan, v.clamp(-fmax, fmax)).to(dtype)


def check_quantize(y: Tensor, dtype: object, scaling: object, scale: object, block: object,
                   fn: str = "quantize_fp8", names: tuple[str, str] = ("y", "dtype"),
                   max_block: int | None = None, read_scale: bool = True) -> None:
    """The checks of a quantisation's arguments, one place for every entry: errors name the
    function ``fn`` and the argument (``names``: what ``fn`` calls y and dtype).  ``max_block``
    bounds the block size where a kernel holds a block in one tile; ``read_scale`` reads a
    caller's scale's value on the host (a traced graph cannot, a kernel's caller has)."""
    y_name, dtype_name = names
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise TypeError(f"{fn}: {y_name} must be a floating-point tensor, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if dtype not in FP8_MAX:
        raise ValueError(f"{fn}: {dtype_name} must be torch.float8_e4m3fn or "
                         f"torch.float8_e5m2, got {dtype}")
    if scaling not in SCALINGS:
        raise ValueError(f"{fn}: scaling must be one of {SCALINGS}, got {scaling!r}")
    if scaling != "tensor" and y.dim() == 0:
        raise ValueError(f"{fn}: {y_name} must have a last dimension for scaling={scaling!r} "
                         "(got a 0-d tensor)")
    if scale is not None:
        if scaling != "tensor":
            raise ValueError(f"{fn}: a caller's scale is for scaling='tensor' only, "
                             f"got scaling={scaling!r}")
        if not isinstance(scale, Tensor):
            raise TypeError(f"{fn}: scale must be a tensor, got {type(scale).__name__}")
        if not (scale.numel() == 1 and scale.dtype == torch.float32):
            raise ValueError(f"{fn}: scale must be a one-element float32 tensor, got shape "
                             f"{tuple(scale.shape)}, dtype {scale.dtype}")
        if read_scale:
            value = scale.reshape(-1)[0].item()
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{fn}: scale must be finite and > 0, got value {value}")
    if scaling == "block":
        _check_block(block, y.shape[-1], fn, max_block)


def _check_block(block: object, k: int, fn: str, max_block: int | None = None) -> None:
    pow2 = (isinstance(block, int) and not isinstance(block, bool) and block >= 2
            and block & (block - 1) == 0)
    if not pow2 or k % block or (max_block is not None and block > max_block):
        sizes = f"from 2 to {max_block}" if max_block is not None else ">= 2"
        raise ValueError(f"{fn}: block must be a power of two {sizes} dividing the last "
                         f"dimension (the MX layout's is {MX_BLOCK}), got block={block!r} for a "
                         f"last dimension of {k}")


def _e8m0_exponent(amax: Tensor, emax: int) -> tuple[Tensor, Tensor]:
    """(E8M0 byte, 2^-e as fp32) of the MX FLOOR rule e = floor(log2 amax) - emax, read off
    amax's exponent field: no log2 to round, and amax == 0 or subnormal lands on byte 0."""
    biased = (amax.view(torch.int32) >> 23) & 0xFF  # amax >= 0, or a NaN of either sign
    byte = (biased - emax).clamp(0, 254)  # e + 127 with e clamped to [-127, 127]
    # 2^-e = 2^(127 - byte), built from its exponent field 254 - byte >= emax - 1 > 0 (byte <=
    # 255 - emax): always a normal fp32, so exact
    mult = ((254 - byte) << 23).view(torch.float32)
    return torch.where(biased == 0xFF, E8M0_NAN, byte).to(torch.uint8), mult


def amax_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """The tensor or row scale max(amax, AMAX_FLOOR) / FMAX of fp32 ``amax`` (NaN stays NaN),
    by one IEEE division on amax's device: also what the fused kernels' host finishes their
    tensor amax with."""
    # the divisor is a tensor on amax's device: with a CPU scalar divisor torch's CUDA division
    # multiplies by its reciprocal, which is not the IEEE quotient
    # a where, not clamp_min: ONNX export writes that as a Clip to the largest float, which
    # makes an amax of inf finite
    floored = torch.where(amax < AMAX_FLOOR, AMAX_FLOOR, amax)
    return floored / torch.full((), FP8_MAX[dtype], device=amax.device)


def quantize_fp8(y: Tensor, dtype: torch.dtype, scaling: str, scale: Tensor | None = None,
                 block: int = MX_BLOCK) -> tuple[Tensor, Tensor]:
    """(q, scales): ``y`` quantised to ``dtype`` (float8_e4m3fn or float8_e5m2) by one fp32
    scale ("tensor", or the caller's ``scale``: delayed scaling), one per row of the last
    dimension ("row") or one E8M0 power of two per ``block`` elements of it ("block", MX);
    the bit-exact oracle for fused quantising kernels, so every step is one fp32 IEEE operation
    on ``y.float()`` (fp64 input as its fp32 value) and a saturating round-to-nearest-even cast
    (the hardware's ``satfinite`` conversion, NaN's sign aside).  Tensor and row scales are the
    dequantisation multipliers max(amax, AMAX_FLOOR) / FMAX, fp32 of shape () or
    ``y.shape[:-1] + (1,)`` (``torch._scaled_mm``'s tensorwise and rowwise ``scale_a``), and
    q = sat(y / scale); block scales are E8M0 bytes (``float8_e8m0fnu``, shape ``y.shape[:-1] +
    (K // block,)``) of the OCP MX FLOOR rule 2^(floor(log2 amax) - emax), and q = sat(y * 2^-e),
    which equals the division since the factor is an exact power of two.  A poisoned group stays
    visibly poisoned rather than quietly finite: an amax of inf gives scale inf (finite values
    then quantise to 0, infinities to NaN), an amax of NaN a NaN scale and NaN q, and a block
    with an inf or NaN the E8M0 NaN byte 0xFF and all-NaN q."""
    check_quantize(y, dtype, scaling, scale, block)
    return quantize_fp8_unchecked(y, dtype, scaling, scale, block)


def quantize_fp8_unchecked(y: Tensor, dtype: torch.dtype, scaling: str,
                           scale: Tensor | None = None,
                           block: int = MX_BLOCK) -> tuple[Tensor, Tensor]:
    """``quantize_fp8`` of arguments ``check_quantize`` passed: plain functional torch
    operations that read nothing on the host, so a traced graph (an exported program, a
    decomposition) can hold them."""
    yf = y.float()
    if scaling == "block":
        k = y.shape[-1]
        blocks = yf.unflatten(-1, (k // block, block))
        byte, mult = _e8m0_exponent(_amax(blocks, -1), FP8_EMAX[dtype])
        v = torch.where(byte == E8M0_NAN, math.nan, blocks * mult)
        return _to_fp8(v, dtype).flatten(-2), byte.squeeze(-1).view(torch.float8_e8m0fnu)
    if scale is None:
        scale = amax_scale(_amax(yf, None if scaling == "tensor" else -1), dtype)
    else:
        scale = scale.to(yf.device).reshape(())
    return _to_fp8(yf / scale, dtype), scale


def dequantize_fp8(q: Tensor, scales: Tensor, scaling: str, block: int = MX_BLOCK) -> Tensor:
    """q * scale in fp32, broadcast per tensor, row or block as ``quantize_fp8`` made the
    scales: the inverse the tests and module probes check quantisation against; an E8M0 byte
    decodes exactly to 2^(byte - 127) and 0xFF to NaN."""
    if scaling not in SCALINGS:
        raise ValueError(f"dequantize_fp8: scaling must be one of {SCALINGS}, got {scaling!r}")
    qf = q.float()
    if scaling != "block":
        return qf * scales.float()
    _check_block(block, q.shape[-1], "dequantize_fp8")
    mult = scales.view(torch.uint8).view(torch.float8_e8m0fnu).float().unsqueeze(-1)
    return (qf.unflatten(-1, (q.shape[-1] // block, block)) * mult).flatten(-2)


def blocked_scales(scales: Tensor) -> Tensor:
    """The (M, K // 32) MX scales of ``quantize_fp8`` in the swizzled order cuBLAS reads
    block-scaled operands in (VEC32_UE8M0), flat: rows zero-padded to a multiple of 128 and
    columns to a multiple of 4, each 128 x 4 tile stored contiguously (tiles row-major) with its
    row r, column c at offset (r % 32) * 16 + (r // 32) * 4 + c.  ``torch._scaled_mm`` (torch
    2.14) checks only the element count, round_up(M, 128) * round_up(K / 32, 4), so row-major
    scales of that size would pass unnoticed and scale the wrong blocks; its MX path needs a
    Blackwell-class GPU."""
    if scales.dim() != 2 or scales.element_size() != 1:
        raise ValueError(f"blocked_scales: scales must be a 2-D tensor of one-byte values, got "
                         f"shape {tuple(scales.shape)} and dtype {scales.dtype}")
    m, k = scales.shape
    nr, nc = -(-m // 128), -(-k // 4)
    u = torch.nn.functional.pad(scales.view(torch.uint8), (0, nc * 4 - k, 0, nr * 128 - m))
    tiles = u.view(nr, 128, nc, 4).permute(0, 2, 1, 3)
    out = tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()
    return out.view(scales.dtype)
