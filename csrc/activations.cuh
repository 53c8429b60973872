// Scalar math of every activation, once, for the CUDA kernels: the same forms as
// triton_kernels/math.py (see there for why each is written as it is; swish's forward here is
// the quotient form, fewer operations on a CPU's vectors), in opmath M (float for
// fp32/fp16/bf16 data, double for fp64).  Host and device functions, so a host program can check
// them against the reference without a GPU.
//
// * sigmoid_pair gives sigma(z) and sigma(-z) from one exp(-|z|): no cancellation in 1 - sigma.
// * tanh(softplus(x)) = n / (n + 2), n = e^x (e^x + 2); 1 beyond x = 20.
// * 1 + tanh(u) = 2 sigma(2u): GELU-tanh needs no tanh.
// * Infinite inputs give the mathematical limits, never 0 * inf = NaN.
//
// M is a scalar here, and a vector of lanes in the CPU kernels (cpu.cpp), which declare ex,
// erf_, abs_ and pick for their vector type before including this file: so the activations
// choose with FA_SEL and combine conditions with & (no ?: and no && on M).
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fused_act {

FA_HD float ex(float v) { return expf(v); }
FA_HD double ex(double v) { return exp(v); }
FA_HD float erf_(float v) { return erff(v); }
FA_HD double erf_(double v) { return erf(v); }
FA_HD float abs_(float v) { return fabsf(v); }
FA_HD double abs_(double v) { return fabs(v); }

// FA_SEL(c, a, b): a where c holds, else b.  For a scalar it is ?: (only the chosen side runs,
// and nvcc may branch around the other); the CPU kernels' `pick` for vectors computes both and
// blends them lane by lane.
#define FA_SEL(c, a, b) ::fused_act::pick((c), [&] { return (a); }, [&] { return (b); })

template <class A, class B>
FA_HD auto pick(bool c, A a, B b) { return c ? a() : b(); }

template <class M>
struct Sig {
  M s, sn;  // sigma(z), sigma(-z)
};

// from e = e^-|z|
template <class M>
FA_HD Sig<M> sigmoid_from(M z, M e) {
  const M r = M(1) / (M(1) + e);
  const M p = e * r;
  const auto pos = z >= M(0);
  return {FA_SEL(pos, r, p), FA_SEL(pos, p, r)};
}

template <class M>
FA_HD Sig<M> sigmoid_pair(M z) { return sigmoid_from(z, ex(-abs_(z))); }

template <class M>
FA_HD auto is_inf(M v) { return abs_(v) == M(INFINITY); }

// c * x, taking the limit 0 where c == 0 (x may be infinite).  (The CPU kernels' vectors have
// their own overloads, declared before this file: the same values, computed without comparing c,
// and a plain product for a factor whose values their host knows are finite and not 0.)
template <class M>
FA_HD M mul_or_zero(M c, M x) { return FA_SEL(c == M(0), M(0), c * x); }

// ---- mish ----------------------------------------------------------------------------------

constexpr double MISH_SATURATION = 20.0;

template <class M>
FA_HD M mish_fwd(M x) {
  const M e = ex(x);
  const M n = e * (e + M(2));
  const M t = FA_SEL(x > M(MISH_SATURATION), M(1), n / (n + M(2)));
  return FA_SEL(x == M(-INFINITY), M(0), x * t);
}

template <class M>
FA_HD M mish_bwd(M x) {
  // t + x sigma(x) (1 - t^2), with 1 - t = 2 / (n + 2) kept exact
  const M e = ex(x);
  const M n = e * (e + M(2));
  const M t = FA_SEL(x > M(MISH_SATURATION), M(1), n / (n + M(2)));
  const M one_minus_t2 = (M(2) / (n + M(2))) * (M(1) + t);
  const M d = t + x * sigmoid_pair(x).s * one_minus_t2;
  return FA_SEL(x > M(MISH_SATURATION), M(1), FA_SEL(x == M(-INFINITY), M(0), d));
}

// ---- swish (and ACON-C, which is swish of d = (p1 - p2) x plus p2 x) -----------------------
// beta's type B is M, or whatever type the caller gives mul_or_zero(B, M) for.

template <class M>
struct SwishParts {
  M z, s, sn, q;  // z = beta x, sigma(+-z), q = s (1 - s)
};

// e^-z for swish, by beta's type: ex here; the CPU kernels give a beta whose values are all
// finite and nonzero (z is NaN only where x is) a faster exp of their own, which need not keep a
// NaN: the forward's quotient keeps x's, and the backward's z q is NaN where z is, whatever q is
template <class M, class B>
FA_HD M swish_exp(const B&, M z) { return ex(-z); }

template <class M, class B>
FA_HD SwishParts<M> swish_parts(M x, B beta) {
  const M z = mul_or_zero(beta, x);
  const Sig<M> p = sigmoid_from(z, swish_exp(beta, abs_(z)));
  return {z, p.s, p.sn, p.s * p.sn};
}

// x sigma(z), with the limit 0 where sigma(z) = 0 and x is infinite
template <class M>
FA_HD M x_sigmoid(M x, M z) {
  const M s = sigmoid_pair(z).s;
  return FA_SEL((s == M(0)) & is_inf(x), M(0), x * s);
}

// x / (1 + e^-z), fewer operations than x sigma(z).  Where e^-z overflows (z below about -88.7
// in float, z = -inf included) the true value underflows and x / inf is the 0 of x's sign, as
// x sigma(z) gives; only an infinite x there makes NaN, whose limit is 0.
template <class M, class B>
FA_HD M swish_fwd(M x, B beta) {
  const M z = mul_or_zero(beta, x);
  return FA_SEL((z == M(-INFINITY)) & is_inf(x), M(0), x / (M(1) + swish_exp(beta, z)));
}

template <class M>
struct Grad2 {
  M dx, dparam;
};

template <class M>
FA_HD Grad2<M> swish_grad(M x, const SwishParts<M>& p) {
  // d/dx = s + z q, where z q is 0 for an infinite z (q = 0) and NaN for a NaN z; d/dbeta = x^2 q
  return {p.s + FA_SEL(is_inf(p.z), M(0), p.z * p.q), FA_SEL(p.q == M(0), M(0), x * x * p.q)};
}

template <class M, class B>
FA_HD Grad2<M> swish_bwd(M x, B beta) { return swish_grad(x, swish_parts(x, beta)); }

// ACON-C with a = p1 - p2: (a sigma(beta a x) + p2) x, the product form giving the limits at
// x = +-inf directly.  a's type A and beta's type B are M, or the types the caller gives
// mul_or_zero(A, M) and swish_parts for (M(a) is a's value).
template <class M, class A, class B>
FA_HD M acon_c_fwd(M x, A a, M p2, B beta) {
  const M s = swish_parts(mul_or_zero(a, x), beta).s;
  return mul_or_zero(M(a) * s + p2, x);
}

template <class M>
struct AconGrad {
  M dx, dp1, dp2, dbeta;
};

// With d = a x and S = s + z q: dy/dx = a S + p2, dy/dp1 = x S, dy/dp2 = x (1 - S) where
// 1 - S = sigma(-z) - z q stays exact, dy/dbeta = d^2 q.
template <class M, class A, class B>
FA_HD AconGrad<M> acon_c_bwd(M x, A a, M p2, B beta) {
  const M d = mul_or_zero(a, x);
  const SwishParts<M> p = swish_parts(d, beta);
  const auto flat = p.q == M(0);
  const M zq = FA_SEL(flat, M(0), p.z * p.q);
  const M big_s = p.s + zq;
  return {M(a) * big_s + p2, mul_or_zero(big_s, x), mul_or_zero(p.sn - zq, x),
          FA_SEL(flat, M(0), d * d * p.q)};
}

// ---- gelu ----------------------------------------------------------------------------------

constexpr double SQRT1_2 = 0.7071067811865476;       // 1 / sqrt(2)
constexpr double INV_SQRT_2PI = 0.3989422804014327;  // 1 / sqrt(2 pi)
constexpr double SQRT_2_OVER_PI = 0.7978845608028654;
constexpr double GELU_TANH_C = 0.044715;

template <class M>
FA_HD M gelu_cdf(M x) { return M(0.5) * (M(1) + erf_(x * M(SQRT1_2))); }

template <class M>
FA_HD M gelu_fwd(M x) { return FA_SEL(x == M(-INFINITY), M(0), x * gelu_cdf(x)); }

// (the CPU kernels' float vectors have a gelu_bwd of their own, whose pdf takes the exp erf took)
template <class M>
FA_HD M gelu_bwd(M x) {
  const M cdf = gelu_cdf(x);
  const M pdf = ex(M(-0.5) * x * x) * M(INV_SQRT_2PI);
  return FA_SEL(pdf == M(0), cdf, cdf + x * pdf);
}

template <class M>
FA_HD M gelu_tanh_u(M x) { return (x + x * x * x * M(GELU_TANH_C)) * M(SQRT_2_OVER_PI); }

template <class M>
FA_HD M gelu_tanh_fwd(M x) { return x_sigmoid(x, M(2) * gelu_tanh_u(x)); }

template <class M>
FA_HD M gelu_tanh_bwd(M x) {
  // d/dx x sigma(2u) = s + 2 x s (1 - s) u'
  const Sig<M> p = sigmoid_pair(M(2) * gelu_tanh_u(x));
  const M q = p.s * p.sn;
  const M du = (M(1) + x * x * M(3 * GELU_TANH_C)) * M(SQRT_2_OVER_PI);
  return FA_SEL(q == M(0), p.s, p.s + M(2) * x * q * du);
}

// ---- squared relu: relu(x)^2 ----------------------------------------------------------------

// x * x for x > 0, else 0; NaN (neither test holds) stays NaN
template <class M>
FA_HD M squared_relu_fwd(M x) { return FA_SEL(x > M(0), x * x, FA_SEL(x <= M(0), M(0), x)); }

template <class M>
FA_HD M squared_relu_bwd(M x) { return FA_SEL(x > M(0), M(2) * x, FA_SEL(x <= M(0), M(0), x)); }

// ---- the selectors the generic kernels use --------------------------------------------------

// Each kernel activation's id, as fused_act/registry.py KERNEL_IDS assigns it (0, 1, ...; a test
// checks these and N_ACT).  The C interface (fused_act.h) takes one as `int act`, and
// elementwise.cu instantiates its kernels for every id below N_ACT, so an activation is an id
// here and a branch in each selector.
enum act_id : int {
  ACT_MISH = 0, ACT_SWISH = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_SQUARED_RELU = 4, N_ACT
};

// Whether activation ACT reads its beta (the others ignore it: their d/dbeta is 0).  Its gated
// backward needs more registers (elementwise.cu ActMath::glu_blocks).
template <int ACT>
constexpr bool act_reads_beta = ACT == ACT_SWISH;

// The activation whose beta may be a tensor (a learnable swish): what the parameterised
// sources of quant.cu compute, which name no activation themselves.
constexpr int ACT_TENSOR_BETA = ACT_SWISH;

template <int ACT, class M, class B>
FA_HD M act_fwd(M x, B beta) {
  if constexpr (ACT == ACT_MISH) {
    return mish_fwd(x);
  } else if constexpr (ACT == ACT_SWISH) {
    return swish_fwd(x, beta);
  } else if constexpr (ACT == ACT_GELU) {
    return gelu_fwd(x);
  } else if constexpr (ACT == ACT_GELU_TANH) {
    return gelu_tanh_fwd(x);
  } else if constexpr (ACT == ACT_SQUARED_RELU) {
    return squared_relu_fwd(x);
  } else {
    static_assert(ACT != ACT, "act_fwd: unknown activation selector");
  }
}

// (df/dx, df/dbeta); df/dbeta is 0 for all but swish.
template <int ACT, class M, class B>
FA_HD Grad2<M> act_bwd(M x, B beta) {
  if constexpr (ACT == ACT_MISH) {
    return {mish_bwd(x), M(0)};
  } else if constexpr (ACT == ACT_SWISH) {
    return swish_bwd(x, beta);
  } else if constexpr (ACT == ACT_GELU) {
    return {gelu_bwd(x), M(0)};
  } else if constexpr (ACT == ACT_GELU_TANH) {
    return {gelu_tanh_bwd(x), M(0)};
  } else if constexpr (ACT == ACT_SQUARED_RELU) {
    return {squared_relu_bwd(x), M(0)};
  } else {
    static_assert(ACT != ACT, "act_bwd: unknown activation selector");
  }
}

template <class M>
struct Grad3 {
  M value, dx, dparam;
};

// (f, df/dx, df/dbeta): what a gated backward needs (dup = g f, dgate = g up f').  Swish's
// forward divides by 1 + e^-z and its backward takes sigma(z) from e^-|z|, two exps that no
// compiler merges: here f is x sigma(z) from the backward's sigma (within an ulp of act_fwd's;
// the CPU kernels' gated backward, 24% faster there).  The others' shared parts are inline
// math a compiler merges by itself.
template <int ACT, class M, class B>
FA_HD Grad3<M> act_both(M x, B beta) {
  if constexpr (ACT == ACT_SWISH) {
    const SwishParts<M> p = swish_parts(x, beta);
    const Grad2<M> d = swish_grad(x, p);
    return {FA_SEL((p.s == M(0)) & is_inf(x), M(0), x * p.s), d.dx, d.dparam};
  } else {
    const Grad2<M> d = act_bwd<ACT>(x, beta);
    return {act_fwd<ACT>(x, beta), d.dx, d.dparam};
  }
}

// ---- frelu_max: max(x, t) with torch.maximum's gradient routing ----------------------------

// Which side won, one byte per element: x, t, a tie (half the gradient each) or a NaN on either
// side (all of it to each), as triton_kernels/math.py.
enum MaxCode : unsigned char { X_WINS = 0, T_WINS = 1, TIE = 2, NAN_SEEN = 3 };

template <class M>
FA_HD M max_value(M x, M t) { return (x > t || x != x) ? x : t; }

template <class M>
FA_HD unsigned char max_code(M x, M t) {
  return x > t ? X_WINS : (x < t ? T_WINS : (x == t ? TIE : NAN_SEEN));
}

template <class M>
FA_HD Grad2<M> max_bwd(M g, unsigned char code) {
  const M half = g * M(0.5);
  return {code == X_WINS || code == NAN_SEEN ? g : (code == TIE ? half : M(0)),
          code == T_WINS || code == NAN_SEEN ? g : (code == TIE ? half : M(0))};
}

}  // namespace fused_act
