"""Scalar math of every activation, once, as Triton functions.

Each activation has a value function and a derivative function; the generic kernels in
``elementwise.py`` pick one by the ``ACT`` selector.  Everything here avoids libdevice (tanh,
log1p, erfc, ...) so that the CPU interpreter runs exactly the code the GPU runs, and every form
is written so that no finite input overflows into NaN or inf:

* ``sigmoid_pair`` returns sigma(z) and sigma(-z) from one ``exp(-|z|)``: both stay accurate in
  the tails, so ``1 - sigma(z)`` never cancels.
* tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2): exact to rounding where softplus
  underflows, and 1 for x > 20 (n would overflow past x ~ 44).
* 1 + tanh(u) = 2 sigma(2u), so GELU-tanh is x sigma(2u) and needs no tanh at all.

Infinite inputs return the mathematical limits (f(+inf) = +inf, f(-inf) = 0, f'(+inf) = 1,
f'(-inf) = 0) instead of the 0 * inf = NaN a direct formula gives.
"""

import triton
import triton.language as tl
from triton import knobs

# Activation selectors: fused_act/registry.py KERNEL_IDS assigns them (a test checks these).
MISH = tl.constexpr(0)
SWISH = tl.constexpr(1)
GELU = tl.constexpr(2)
GELU_TANH = tl.constexpr(3)
SQUARED_RELU = tl.constexpr(4)

# Module constants are constexpr; keep them right of a tensor operand (tensor * C): the
# interpreter cannot take constexpr * tensor as a tensor.
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_C = tl.constexpr(0.044715)
MISH_SATURATION = tl.constexpr(20.0)  # tanh(softplus(x)) == 1 in fp32 and fp64 beyond this
INF = tl.constexpr(float("inf"))


# Triton's interpreter converts between fp32 and bf16 on the bits by a route of its own: down by
# dropping the low 16 bits (round toward zero, where the GPU's cvt.rn.bf16.f32 rounds to nearest
# even), and both ways with subnormals scaled wrongly (triton 3.6 to 3.9; asking for
# fp_downcast_rounding="rtne" changes nothing, it is the default).  Under the interpreter the two
# conversions below do it on the bits instead.  Kernels are decorated for the interpreter or the
# GPU by the time this module is imported, and the choice is read the same way.
INTERPRETED = tl.constexpr(knobs.runtime.interpret)


@triton.jit
def bf16_to_fp32_bits(x):
    """bf16 -> fp32, exactly: the bits shifted into the high half."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_bf16_bits(v):
    """fp32 -> bf16 rounded to nearest, ties to even, on the bits."""
    tl.static_assert(v.dtype == tl.float32, "fp32_to_bf16_bits: fp32 only (one rounding)")
    bits = v.to(tl.uint32, bitcast=True)
    # just under half an ulp plus the kept lowest bit carries into the kept half exactly when
    # the dropped bits are over half an ulp, or half with the kept bit odd; a carry out of the
    # mantissa steps the exponent, past the largest bf16 to inf, as rounding does
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # a NaN stays a NaN (made quiet) instead of carrying into inf
    kept = tl.where(v != v, (bits >> 16) | 0x40, rounded)
    return kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def opmath(x):
    """fp16/bf16/fp32 compute in fp32; fp64 stays fp64 (for gradcheck)."""
    if x.dtype == tl.float64:
        r = x
    elif INTERPRETED and x.dtype == tl.bfloat16:
        r = bf16_to_fp32_bits(x)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def sigmoid_pair(z):
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    p = e * r
    pos = z >= 0
    return tl.where(pos, r, p), tl.where(pos, p, r)


@triton.jit
def _mish_tanh_softplus(x):
    e = tl.exp(x)
    n = e * (e + 2.0)
    t = tl.where(x > MISH_SATURATION, 1.0, n / (n + 2.0))
    return t, n


@triton.jit
def mish_fwd(x):
    t, _ = _mish_tanh_softplus(x)
    return tl.where(x == -INF, 0.0, x * t)


@triton.jit
def mish_bwd(x):
    # d/dx x tanh(sp(x)) = t + x sigma(x) (1 - t^2), with 1 - t = 2 / (n + 2) kept exact.
    t, n = _mish_tanh_softplus(x)
    s, _ = sigmoid_pair(x)
    one_minus_t2 = (2.0 / (n + 2.0)) * (1.0 + t)
    d = t + x * s * one_minus_t2
    return tl.where(x > MISH_SATURATION, 1.0, tl.where(x == -INF, 0.0, d))


@triton.jit
def mul_or_zero(c, x):
    """c * x, taking the limit 0 where c == 0 (x may be infinite)."""
    return tl.where(c == 0.0, 0.0, c * x)


@triton.jit
def _swish_parts(x, beta):
    # z = beta x (beta == 0 with x == inf would give NaN; the limit is z = 0), sigma(+-z), and
    # q = s (1 - s), which is 0 wherever a product with an infinite or overflowing factor would
    # make NaN; the limit of every such term is then 0
    z = mul_or_zero(beta, x)
    s, sn = sigmoid_pair(z)
    return z, s, sn, s * sn


@triton.jit
def swish_fwd(x, beta):
    _, s, _, _ = _swish_parts(x, beta)
    return tl.where((s == 0.0) & (tl.abs(x) == INF), 0.0, x * s)


@triton.jit
def swish_bwd(x, beta):
    # d/dx = s + z s (1 - s); d/dbeta = x^2 s (1 - s)
    z, s, _, q = _swish_parts(x, beta)
    dx = s + tl.where(q == 0.0, 0.0, z * q)
    dbeta = tl.where(q == 0.0, 0.0, x * x * q)
    return dx, dbeta


@triton.jit
def acon_c_fwd(x, a, p2, beta):
    """ACON-C with a = p1 - p2: a x sigma(beta a x) + p2 x = (a sigma(z) + p2) x, z = beta a x;
    the product form gives the limits at x = +-inf (p1 x, p2 x or their mean) directly."""
    _, s, _, _ = _swish_parts(mul_or_zero(a, x), beta)
    return mul_or_zero(a * s + p2, x)


@triton.jit
def acon_c_bwd(x, a, p2, beta):
    """(dy/dx, dy/dp1, dy/dp2, dy/dbeta) of ACON-C with a = p1 - p2: with d = a x and
    S = s + z q the derivative of d sigma(beta d) by d, dy/dx = a S + p2, dy/dp1 = x S,
    dy/dp2 = x (1 - S) where 1 - S = sigma(-z) - z q stays exact, dy/dbeta = d^2 q."""
    d = mul_or_zero(a, x)
    z, s, sn, q = _swish_parts(d, beta)
    zq = tl.where(q == 0.0, 0.0, z * q)
    big_s = s + zq
    dbeta = tl.where(q == 0.0, 0.0, d * d * q)
    return a * big_s + p2, mul_or_zero(big_s, x), mul_or_zero(sn - zq, x), dbeta


@triton.jit
def _gelu_cdf(x):
    return 0.5 * (1.0 + tl.erf(x * SQRT1_2))


@triton.jit
def gelu_fwd(x):
    return tl.where(x == -INF, 0.0, x * _gelu_cdf(x))


@triton.jit
def gelu_bwd(x):
    cdf = _gelu_cdf(x)
    pdf = tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    return tl.where(pdf == 0.0, cdf, cdf + x * pdf)


@triton.jit
def _gelu_tanh_u(x):
    return (x + x * x * x * GELU_TANH_C) * SQRT_2_OVER_PI


@triton.jit
def gelu_tanh_fwd(x):
    s, _ = sigmoid_pair(2.0 * _gelu_tanh_u(x))
    return tl.where((s == 0.0) & (tl.abs(x) == INF), 0.0, x * s)


@triton.jit
def gelu_tanh_bwd(x):
    # d/dx x sigma(2u) = s + 2 x s (1 - s) u'
    s, sn = sigmoid_pair(2.0 * _gelu_tanh_u(x))
    q = s * sn
    du = (1.0 + x * x * (3.0 * GELU_TANH_C)) * SQRT_2_OVER_PI
    return tl.where(q == 0.0, s, s + 2.0 * x * q * du)


@triton.jit
def squared_relu_fwd(x):
    # x * x for x > 0, else 0; NaN (neither branch's test holds) stays NaN
    return tl.where(x > 0.0, x * x, tl.where(x <= 0.0, 0.0, x))


@triton.jit
def squared_relu_bwd(x):
    return tl.where(x > 0.0, 2.0 * x, tl.where(x <= 0.0, 0.0, x))


@triton.jit
def act_fwd(x, beta, ACT: tl.constexpr):
    """y = f(x) for the activation ACT; beta is used by SWISH only."""
    if ACT == MISH:
        y = mish_fwd(x)
    elif ACT == SWISH:
        y = swish_fwd(x, beta)
    elif ACT == GELU:
        y = gelu_fwd(x)
    elif ACT == GELU_TANH:
        y = gelu_tanh_fwd(x)
    elif ACT == SQUARED_RELU:
        y = squared_relu_fwd(x)
    else:
        tl.static_assert(False, "act_fwd: unknown activation selector")
    return y


@triton.jit
def act_bwd(x, beta, ACT: tl.constexpr):
    """(df/dx, df/dbeta) for the activation ACT; df/dbeta is 0 for all but SWISH."""
    if ACT == MISH:
        dx = mish_bwd(x)
        dbeta = 0.0 * x
    elif ACT == SWISH:
        dx, dbeta = swish_bwd(x, beta)
    elif ACT == GELU:
        dx = gelu_bwd(x)
        dbeta = 0.0 * x
    elif ACT == GELU_TANH:
        dx = gelu_tanh_bwd(x)
        dbeta = 0.0 * x
    elif ACT == SQUARED_RELU:
        dx = squared_relu_bwd(x)
        dbeta = 0.0 * x
    else:
        tl.static_assert(False, "act_bwd: unknown activation selector")
    return dx, dbeta


# ---- frelu_max: max(x, t) with torch.maximum's gradient routing ----------------------------

# Which side won, one byte per element, all that the backward needs: x, t, a tie (each gets half
# the gradient) or a NaN on either side (each gets all of it, as torch.maximum's derivative).
X_WINS = tl.constexpr(0)
T_WINS = tl.constexpr(1)
TIE = tl.constexpr(2)
NAN = tl.constexpr(3)


@triton.jit
def max_fwd(x, t):
    """(max(x, t) with NaN if either is NaN, the win code)."""
    y = tl.where((x > t) | (x != x), x, t)
    code = tl.where(x > t, X_WINS, tl.where(x < t, T_WINS, tl.where(x == t, TIE, NAN)))
    return y, code.to(tl.uint8)


@triton.jit
def _order_key(bits):
    """An integer that orders as the 16-bit float of these bits (sign and magnitude to two's
    complement: +0 and -0 both 0); NaN bits order above or below everything."""
    return tl.where(bits < 0, -(bits & 0x7FFF), bits)


@triton.jit
def max_bits(x, t):
    """max_fwd's max of two 16-bit float tensors, bit for bit, in their own type: x where
    x > t or x is NaN, else t, decided on integer keys of the bits.  The float form of this
    selection, narrowed by the compiler to packed 16-bit compares, leaves pairs of predicates
    that ptxas spills to local memory; integer compares do not."""
    if x.dtype == tl.bfloat16:
        inf = 0x7F80
    else:
        inf = 0x7C00
    bx = x.to(tl.int16, bitcast=True).to(tl.int32)
    bt = t.to(tl.int16, bitcast=True).to(tl.int32)
    x_nan = (bx & 0x7FFF) > inf
    t_nan = (bt & 0x7FFF) > inf
    return tl.where(x_nan | ((_order_key(bx) > _order_key(bt)) & ~t_nan), x, t)


@triton.jit
def max_bwd(g, code):
    """(grad to x, grad to t) from the win code."""
    half = g * 0.5
    dx = tl.where((code == X_WINS) | (code == NAN), g, tl.where(code == TIE, half, 0.0))
    dt = tl.where((code == T_WINS) | (code == NAN), g, tl.where(code == TIE, half, 0.0))
    return dx, dt


def settle_cache_keys(namespace: dict) -> None:
    """Compute the cache key of every Triton function in ``namespace``, callees first.

    Triton up to 3.8 adds a called function's constexpr globals (``INTERPRETED``, the
    selectors, the constants above) to its caller's key before it has looked them up, the
    first time that function is reached: the key of a kernel then depends on which kernel was
    launched first in the process, and the on-disk cache misses from one run to the next.
    With every helper's key in place before any kernel's, each kernel's key is the same
    whatever the order.  Each module of kernels calls this last, on its own globals."""
    done = set()

    def visit(fn):
        if id(fn) in done:
            return
        done.add(id(fn))
        for name in fn.fn.__code__.co_names:
            callee = fn.fn.__globals__.get(name)
            if isinstance(callee, triton.runtime.JITFunction):
                visit(callee)
        fn.cache_key  # noqa: B018  (computed and kept by Triton)

    for value in list(namespace.values()):
        if isinstance(value, triton.runtime.JITFunction):  # not under the interpreter
            visit(value)


settle_cache_keys(globals())
