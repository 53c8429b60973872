// The CPU kernels: fused_act.h's interface for CPU tensors (binding.cpp built with FA_CPU wraps
// it), so the host code lays out and plans CPU tensors exactly as CUDA ones.  The math is
// activations.cuh's, instantiated for torch's SIMD vectors (at::vec::Vectorized, whose exp and
// erf are torch's own vector math), one vector of lanes at a time: one pass over memory per op,
// fp16/bf16 computed in fp32 and rounded once.  Tiles and partial-sum slots are tile.cuh's
// (fused_act/plan.py), each tile summed by one thread in a fixed order: parameter gradients are
// deterministic whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "fused_act.h"

namespace fused_act {

template <class M>
using Vec = at::vec::Vectorized<M>;

// activations.cuh's primitives for vectors, declared before it so that its templates find them
template <class M>
Vec<M> ex(const Vec<M>& v) { return v.exp(); }
template <class M>
Vec<M> erf_(const Vec<M>& v) { return v.erf(); }
// erf of float lanes by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7), the formula of torch's
// x86 vector erf, with torch's faster exp_u20 inline where that erf calls its exact exp out of
// line for every vector: gelu's loops ~20% faster, with the same error as torch's own vector
// gelu.  (exp_u20 maps NaN to a number; t carries a NaN x to the result.)  A (5, 5) rational in
// z^2 without the exp (17 operations for about 30; bf16 gelu's forward 1.4x faster) was tried
// and dropped: its float error, about 3e-7 near erf = +-1, is absolute where gelu's tail needs
// it relative (1 + erf near z = -3), and a glu product of such a tail by a large up missed
// fp32's tolerance 2x.
struct ErfParts {
  Vec<float> erf, e;  // erf(v), and the exp(-v^2) it took
};
inline ErfParts erf_parts(const Vec<float>& v) {
  using V = Vec<float>;
  const V a = v.abs();
  const V t = V(1.f) / at::vec::fmadd(V(0.3275911f), a, V(1.f));
  V p = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
  p = at::vec::fmadd(p, t, V(1.421413741f));
  p = at::vec::fmadd(p, t, V(-0.284496736f));
  p = at::vec::fmadd(p, t, V(0.254829592f));
  const V e = (V(0.f) - a * a).exp_u20();
  const V r = V(1.f) - p * t * e;
  return {V::blendv(r, V(0.f) - r, v < V(0.f)), e};
}
inline Vec<float> erf_(const Vec<float>& v) { return erf_parts(v).erf; }
// gelu's derivative (activations.cuh's gelu_bwd) on float lanes with one exp: the pdf's
// exp(-x^2 / 2) is the exp(-(x / sqrt 2)^2) that erf took (within an ulp of its argument),
// where two exps made the backward 1.4x torch's at 2^20 elements.  exp_u20's 0 below about
// -87 makes the pdf 0 there (|x| > 13.2), as the exp of -x^2 / 2 did; a NaN x makes cdf NaN.
inline Vec<float> gelu_bwd(const Vec<float>& x) {
  using V = Vec<float>;
  const ErfParts p = erf_parts(x * V(float(0.7071067811865476)));
  const V cdf = V(0.5f) * (V(1.f) + p.erf);
  const V pdf = p.e * V(float(0.3989422804014327));
  return V::blendv(cdf + x * pdf, cdf, pdf == V(0.f));
}
template <class M>
Vec<M> abs_(const Vec<M>& v) { return v.abs(); }
// activations.cuh's mul_or_zero for vectors: c * x, and 0 where c == 0 whatever x.  Written so
// that no comparison reads c alone: c is often one value for the whole tensor (a scalar beta),
// and a comparison of a loop-invariant vector made these loops several times slower (the mask
// is hoisted and rebuilt from a general register every iteration).  Where the product is NaN,
// q is c itself (times 1), so its test is c == 0; elsewhere the product stands.
template <class M>
Vec<M> mul_or_zero(const Vec<M>& c, const Vec<M>& x) {
  const Vec<M> z = c * x;
  const Vec<M> bad = z != z;
  const Vec<M> q = c * Vec<M>::blendv(x, Vec<M>(M(1)), bad);
  return Vec<M>::blendv(z, Vec<M>(M(0)), bad & (q == Vec<M>(M(0))));
}

// A factor whose values are all finite and at least FAST_FACTOR in magnitude (silu's 1, a
// number passed as beta, a beta tensor checked before the launch, ACON-C's p1 - p2 and beta):
// its mul_or_zero is the plain product (the general one above took as long as the rest of
// silu's forward).  And z = beta x is NaN only where x is, so swish may take torch's exp_u20,
// inline where the exact exp is a call for every vector: silu's forward then runs at F.silu's
// speed, and a learnable beta's twice as fast as with the general form.  exp_u20 maps NaN to a
// number (x and z carry the NaN), gives inf above about 88.7 on x86 (the quotient's x / inf),
// and 0 below about -87 where the exact exp still gives a subnormal: sigmoid tails of |z| > 87
// become 0 instead of a float under 1e-37 in y and dx.  In a parameter's gradient such a tail
// is scaled by 1 / factor (x = z / beta: the term x^2 sigma'(z) is 0.066 at beta = 1e-17,
// x = 9e18); from FAST_FACTOR = 1e-6 on, a lost term is under 1e-22 an element.  (Testing each
// vector for such lanes instead cost silu's forward a third of its time.)
constexpr double FAST_FACTOR = 1e-6;
template <class M>
struct Nonzero {
  Vec<M> v;
  explicit operator Vec<M>() const { return v; }
};
template <class M>
Vec<M> mul_or_zero(const Nonzero<M>& c, const Vec<M>& x) { return c.v * x; }
inline Vec<float> swish_exp(const Nonzero<float>&, const Vec<float>& z) {
  return (Vec<float>(0.f) - z).exp_u20();
}

// FA_SEL on vectors: both sides, blended by the mask c
template <class M, class A, class B>
Vec<M> pick(const Vec<M>& c, A a, B b) { return Vec<M>::blendv(b(), a(), c); }

}  // namespace fused_act

#include "activations.cuh"
#include "fp8.cuh"

namespace fused_act {
namespace {

enum cpu_error : int { OK = 0, BAD_ACT = 1, BAD_DTYPE = 2, BAD_VALUE = 3, NO_MEMORY = 4 };

template <class T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// `n` elements of storage T at p as one vector of opmath lanes; lanes past n are 0.  Load and
// store are always inlined: left as calls (the compiler did, for bf16 and fp16), each call
// spilled the loop's vector constants and ran vzeroupper, and bf16 gelu took 1.5x fp32's time.
template <class T, class M = opmath_t<T>>
C10_ALWAYS_INLINE Vec<M> load(const T* p, int64_t n) {
  constexpr int64_t W = Vec<M>::size();
  if constexpr (std::is_same_v<T, M>) {
    return n == W ? Vec<M>::loadu(p) : Vec<M>::loadu(p, n);
  } else {
    if (n == W) {
      Vec<M> v;
      at::vec::load_to_float<T>(p, v);
      return v;
    }
    alignas(64) M buf[W] = {};
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<M>(p[k]);
    return Vec<M>::loadu(buf);
  }
}

// The first n lanes of v to p, rounded once to storage T (to nearest even).
template <class T, class M>
C10_ALWAYS_INLINE void store(T* p, const Vec<M>& v, int64_t n) {
  constexpr int64_t W = Vec<M>::size();
  if constexpr (std::is_same_v<T, M>) {
    n == W ? v.store(p) : v.store(p, n);
  } else if (n == W) {
    at::vec::convert<T>(v).store(p, W);  // its first W lanes hold the W values
  } else {
    alignas(64) M buf[W];
    v.store(buf);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(buf[k]);
  }
}

// Where a vector lies: its row, first column, the row's channel (ROWS: row % channels) and
// sample (per-sample parameters), as tile.cuh's At.
struct At {
  int64_t row, col, chan, sample;
};

// A per-channel parameter for the lanes at `at`: one value per row (ROWS), or the columns'
// values (COLS; p + offset holds the row's channels).
template <class M>
Vec<M> channel_param(const M* p, const At& at, int64_t n, int layout, int64_t offset = 0) {
  return layout == FA_COLS ? Vec<M>::loadu(p + offset + at.col, n) : Vec<M>(p[offset + at.chan]);
}

// Runs `op` over every tile of plan `p` in parallel.  Op names its opmath M and its number of
// parameter-gradient terms NP, and `op.apply(at, n, d)` handles the n (<= lanes) elements at
// `at`, writing the NP terms of each lane to d.  With `partial`, every slot of tile.cuh's
// layout is written: ROWS (and one-channel plans) one per (column block, row), COLS one per
// (row block, column), term q at q * n_partial.
template <class Op>
void run(const Op& op, const fa_plan& p, typename Op::M* partial, int64_t n_partial) {
  using M = typename Op::M;
  constexpr int NP = Op::NP > 0 ? Op::NP : 1;
  constexpr int64_t W = Vec<M>::size();
  const int64_t rows_per_sample = p.rows / p.samples;
  const int64_t rows_per_item = p.batch > 0 ? p.rows / p.batch : 0;
  const int64_t col_blocks = (p.cols + p.block_l - 1) / p.block_l;
  const int64_t row_blocks = (rows_per_sample + p.block_r - 1) / p.block_r;
  const int64_t tiles = p.samples * row_blocks * col_blocks;
  const bool sums = Op::NP > 0 && partial != nullptr;
  const bool col_sums = sums && p.layout == FA_COLS;
  if (p.rows == 1 && !sums) {
    // one row and no sums: full vectors straight through, the lane count known to the compiler
    at::parallel_for(0, p.cols, int64_t(1) << 15, [&](int64_t begin, int64_t end) {
      // a local copy of the op: the extension compiles without strict aliasing (Python's
      // flags), so as far as the compiler knew a store through y could change op's fields, and
      // it reloaded them and tested the layout again for every vector (a BatchNorm eval
      // forward took 1.5x silu's time, 1.3x with the copy)
      const Op o = op;
      At at{0, begin, 0, 0};
      Vec<M> d[NP];
      for (; at.col + W <= end; at.col += W) o.apply(at, W, d);
      if (at.col < end) o.apply(at, end - at.col, d);
    });
    return;
  }
  // about 32K elements per task: enough work to pay for a thread, tiles enough to share
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (int64_t(p.block_r) * p.block_l));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    const Op o = op;  // as above
    std::vector<M> col_acc(col_sums ? size_t(NP) * p.block_l : 0);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t pid_l = tile % col_blocks;
      const int64_t sample = tile / col_blocks / row_blocks;
      const int64_t pid_r = tile / col_blocks % row_blocks;
      const int64_t r_end = std::min<int64_t>((pid_r + 1) * p.block_r, rows_per_sample);
      const int64_t c0 = pid_l * p.block_l;
      const int64_t c_end = std::min<int64_t>(c0 + p.block_l, p.cols);
      std::fill(col_acc.begin(), col_acc.end(), M(0));
      for (int64_t r_in = pid_r * p.block_r; r_in < r_end; ++r_in) {
        At at{sample * rows_per_sample + r_in, 0, 0, sample};
        at.chan = p.layout == FA_ROWS ? at.row % p.channels : 0;
        if (rows_per_item > 0) at.sample = at.row / rows_per_item;
        Vec<M> acc[NP];
        for (auto& a : acc) a = Vec<M>(M(0));
        // the terms of the n lanes at at.col into the row's or the columns' sums
        auto add = [&](Vec<M>* d, int64_t n) {
          for (int q = 0; q < NP; ++q) {
            if (n < W) d[q] = Vec<M>::set(Vec<M>(M(0)), d[q], n);  // lanes past n add nothing
            if (col_sums) {
              M* c = col_acc.data() + q * p.block_l + (at.col - c0);
              (Vec<M>::loadu(c, n) + d[q]).store(c, n);
            } else {
              acc[q] = acc[q] + d[q];
            }
          }
        };
        // full vectors with the lane count known to the compiler, then the row's tail
        for (at.col = c0; at.col + W <= c_end; at.col += W) {
          Vec<M> d[NP];
          o.apply(at, W, d);
          if (sums) add(d, W);
        }
        if (at.col < c_end) {
          Vec<M> d[NP];
          o.apply(at, c_end - at.col, d);
          if (sums) add(d, c_end - at.col);
        }
        if (sums && !col_sums) {
          for (int q = 0; q < NP; ++q) {
            alignas(64) M lanes[W];
            acc[q].store(lanes);
            M s = M(0);
            for (int64_t k = 0; k < W; ++k) s += lanes[k];
            partial[q * n_partial + pid_l * p.rows + at.row] = s;
          }
        }
      }
      if (col_sums) {
        const int64_t slot = (sample * row_blocks + pid_r) * p.cols + c0;
        for (int q = 0; q < NP; ++q) {
          std::copy(col_acc.begin() + q * p.block_l, col_acc.begin() + q * p.block_l + (c_end - c0),
                    partial + q * n_partial + slot);
        }
      }
    }
  });
}

// ---- the activations' math, as the ops below take it (elementwise.cu and acon.cu's ActMath and
// AconMath, for vectors): `value(x, at, n)` is f(x) for the lanes at `at`; `grad(x, at, n, terms)`
// returns df/dx and writes the NP parameter derivatives to `terms` -----------------------------

template <class M>
struct Beta {
  const M* ptr;  // null: the scalar `value`
  M value;
  int layout;

  Vec<M> at(const At& a, int64_t n) const {
    return ptr == nullptr ? Vec<M>(value) : channel_param(ptr, a, n, layout);
  }
};

// activation ACT with its beta (swish only); NONZERO: every value of beta is a fast_factor;
// TERMS: the backward wants d/dbeta (else none is computed: silu's backward 1.3x faster in bf16)
template <int ACT, class M, bool NONZERO, bool TERMS>
struct ActMath {
  static constexpr int NP = TERMS ? 1 : 0;  // d/dbeta
  Beta<M> beta;

  auto beta_at(const At& a, int64_t n) const {
    if constexpr (NONZERO) {
      return Nonzero<M>{beta.at(a, n)};
    } else {
      return beta.at(a, n);
    }
  }
  Vec<M> value(const Vec<M>& x, const At& a, int64_t n) const {
    return act_fwd<ACT>(x, beta_at(a, n));
  }
  Vec<M> grad(const Vec<M>& x, const At& a, int64_t n, Vec<M>* terms) const {
    const Grad2<Vec<M>> r = act_bwd<ACT>(x, beta_at(a, n));
    if constexpr (TERMS) terms[0] = r.dparam;
    return r.dx;
  }
  // grad's result, with f(x) into `value`: one pass over the math for both
  Vec<M> value_grad(const Vec<M>& x, const At& a, int64_t n, Vec<M>* terms,
                    Vec<M>& value) const {
    const Grad3<Vec<M>> r = act_both<ACT>(x, beta_at(a, n));
    value = r.value;
    if constexpr (TERMS) terms[0] = r.dparam;
    return r.dx;
  }
};

// ACON-C with its per-channel p1, p2 and per-channel or per-sample beta; NONZERO: every
// p1 - p2 and every beta is a fast_factor (then a x and beta a x are plain products)
template <class M, bool NONZERO>
struct AconMath {
  static constexpr int NP = 3;  // dp1, dp2, dbeta
  const M* p1;
  const M* p2;
  const M* beta;
  int64_t channels;
  int layout;
  bool per_sample;

  // (a = p1 - p2, p2, beta) for the lanes at `at`
  void params(const At& a, int64_t n, Vec<M>& diff, Vec<M>& q2, Vec<M>& b) const {
    q2 = channel_param(p2, a, n, layout);
    diff = channel_param(p1, a, n, layout) - q2;
    b = channel_param(beta, a, n, layout, per_sample ? a.sample * channels : 0);
  }
  template <class F>
  auto with_params(const At& a, int64_t n, F&& f) const {
    Vec<M> diff, q2, b;
    params(a, n, diff, q2, b);
    if constexpr (NONZERO) {
      return f(Nonzero<M>{diff}, q2, Nonzero<M>{b});
    } else {
      return f(diff, q2, b);
    }
  }
  Vec<M> value(const Vec<M>& x, const At& a, int64_t n) const {
    return with_params(a, n, [&](auto diff, const Vec<M>& q2, auto b) {
      return acon_c_fwd(x, diff, q2, b);
    });
  }
  Vec<M> grad(const Vec<M>& x, const At& a, int64_t n, Vec<M>* terms) const {
    const AconGrad<Vec<M>> r = with_params(a, n, [&](auto diff, const Vec<M>& q2, auto b) {
      return acon_c_bwd(x, diff, q2, b);
    });
    terms[0] = r.dp1;
    terms[1] = r.dp2;
    terms[2] = r.dbeta;
    return r.dx;
  }
};

// ---- the op shapes (tile.cuh's MapOp, GradOp; elementwise.cu's GluOp, GluGradOp) -------------

// y = f(x)
template <class T, class F>
struct MapOp {
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* x;
  T* y;
  int64_t cols;
  F f;

  void apply(const At& a, int64_t n, Vec<M>*) const {
    const int64_t off = a.row * cols + a.col;
    store(y + off, f.value(load(x + off, n), a, n), n);
  }
};

// dx = g f'(x), and the terms g df/dp of the parameter gradients
template <class T, class F>
struct GradOp {
  using M = opmath_t<T>;
  static constexpr int NP = F::NP;
  const T* g;
  const T* x;
  T* dx;
  int64_t cols;
  F f;

  void apply(const At& a, int64_t n, Vec<M>* d) const {
    const int64_t off = a.row * cols + a.col;
    const Vec<M> gv = load(g + off, n);
    Vec<M> terms[NP > 0 ? NP : 1];
    store(dx + off, gv * f.grad(load(x + off, n), a, n, terms), n);
    for (int q = 0; q < NP; ++q) d[q] = gv * terms[q];
  }
};

// out = f(gate) * up, every tensor walked as rows `s_*` elements apart
template <class T, class F>
struct GluOp {
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* gate;
  const T* up;
  T* out;
  int64_t s_gate, s_up, s_out;
  F f;

  void apply(const At& a, int64_t n, Vec<M>*) const {
    const Vec<M> v = f.value(load(gate + a.row * s_gate + a.col, n), a, n);
    store(out + a.row * s_out + a.col, v * load(up + a.row * s_up + a.col, n), n);
  }
};

// dgate = g up f'(gate), dup = g f(gate), and the terms g up df/dp
template <class T, class F>
struct GluGradOp {
  using M = opmath_t<T>;
  static constexpr int NP = F::NP;
  const T* g;
  const T* gate;
  const T* up;
  T* dgate;
  T* dup;
  int64_t s_g, s_gate, s_up, s_dgate, s_dup;
  F f;

  void apply(const At& a, int64_t n, Vec<M>* d) const {
    const Vec<M> gv = load(g + a.row * s_g + a.col, n);
    const Vec<M> x = load(gate + a.row * s_gate + a.col, n);
    const Vec<M> gu = gv * load(up + a.row * s_up + a.col, n);
    Vec<M> terms[NP > 0 ? NP : 1];
    Vec<M> value;
    store(dgate + a.row * s_dgate + a.col, gu * f.value_grad(x, a, n, terms, value), n);
    store(dup + a.row * s_dup + a.col, gv * value, n);
    for (int q = 0; q < NP; ++q) d[q] = gu * terms[q];
  }
};

// ---- BatchNorm + activation (batchnorm.cu's ops, for vectors) ------------------------------

// The per-channel affine in front of the activation: z = (x - c) a + b, with x - c and a for
// the backward.
template <class M>
struct Affine {
  const M* c;
  const M* a;
  const M* b;
  int layout;

  Vec<M> z(const Vec<M>& x, const At& at, int64_t n, Vec<M>& xc, Vec<M>& av) const {
    xc = x - channel_param(c, at, n, layout);
    av = channel_param(a, at, n, layout);
    return xc * av + channel_param(b, at, n, layout);
  }
};

// f((x - c) a + b), as MapOp takes it; F is ActMath or AconMath
template <class M, class F>
struct AffineMath {
  Affine<M> affine;
  F f;

  Vec<M> value(const Vec<M>& x, const At& a, int64_t n) const {
    Vec<M> xc, av;
    return f.value(affine.z(x, a, n, xc, av), a, n);
  }
};

// The batch statistics (fused_act.h fa_stats): for every slot of tile.cuh's layout, the count
// of its values, their sum, and the sum of their squared distances from their own mean, which
// the host merges (Chan et al.).  Two passes over the slot's values while its tile is in cache:
// the sum, then the distances from sum / count.  Each tile is one task's, summed in a fixed
// order: deterministic whatever the thread count.
template <class T>
void stats(const T* x, opmath_t<T>* partial, int64_t n_partial, const fa_plan& p) {
  using M = opmath_t<T>;
  constexpr int64_t W = Vec<M>::size();
  const int64_t rows_per_sample = p.rows / p.samples;
  const int64_t col_blocks = (p.cols + p.block_l - 1) / p.block_l;
  const int64_t row_blocks = (rows_per_sample + p.block_r - 1) / p.block_r;
  const int64_t tiles = p.samples * row_blocks * col_blocks;
  const bool col_sums = p.layout == FA_COLS;
  // the sum of v's lanes (those past n are 0)
  auto total = [](const Vec<M>& v) {
    alignas(64) M lanes[W];
    v.store(lanes);
    M s = M(0);
    for (int64_t k = 0; k < W; ++k) s += lanes[k];
    return s;
  };
  // the squares of v - mean, 0 in the lanes past n
  auto square = [](const Vec<M>& v, const Vec<M>& mean, int64_t n) {
    const Vec<M> e = v - mean;
    return n < W ? Vec<M>::set(Vec<M>(M(0)), e * e, n) : e * e;
  };
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (int64_t(p.block_r) * p.block_l));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t pid_l = tile % col_blocks;
      const int64_t sample = tile / col_blocks / row_blocks;
      const int64_t pid_r = tile / col_blocks % row_blocks;
      const int64_t r0 = sample * rows_per_sample + pid_r * p.block_r;
      const int64_t r_end = sample * rows_per_sample +
                            std::min<int64_t>((pid_r + 1) * p.block_r, rows_per_sample);
      const int64_t c0 = pid_l * p.block_l;
      const int64_t c_end = std::min<int64_t>(c0 + p.block_l, p.cols);
      if (!col_sums) {
        // a slot per row of the tile: its c_end - c0 values
        const M count = M(c_end - c0);
        for (int64_t row = r0; row < r_end; ++row) {
          const T* xr = x + row * p.cols;
          // along the row in two sums of alternate vectors (one chain of adds waited on each)
          auto along = [&](auto term) {
            Vec<M> a0(M(0)), a1(M(0));
            int64_t c = c0;
            for (; c + 2 * W <= c_end; c += 2 * W) {
              a0 = a0 + term(load(xr + c, W), W);
              a1 = a1 + term(load(xr + c + W, W), W);
            }
            for (; c < c_end; c += W) {
              const int64_t n = std::min(W, c_end - c);
              a0 = a0 + term(load(xr + c, n), n);
            }
            return total(a0 + a1);
          };
          const M sum = along([](const Vec<M>& v, int64_t) { return v; });
          const Vec<M> mean(sum / count);
          const int64_t slot = pid_l * p.rows + row;
          partial[slot] = count;
          partial[n_partial + slot] = sum;
          partial[2 * n_partial + slot] =
              along([&](const Vec<M>& v, int64_t n) { return square(v, mean, n); });
        }
        continue;
      }
      // a slot per column of the tile: its r_end - r0 values, a vector of columns at a time
      // down the tile's rows (in cache after the first), in two sums of alternate rows: the
      // sums stay in registers (kept in memory row by row, and one chain of adds, the kernel
      // ran at half the speed of a read)
      const M count = M(r_end - r0);
      const int64_t slot = (sample * row_blocks + pid_r) * p.cols;
      std::fill(partial + slot + c0, partial + slot + c_end, count);
      for (int64_t c = c0; c < c_end; c += W) {
        const int64_t n = std::min(W, c_end - c);
        const T* xc = x + c;
        auto down = [&](auto term) {
          Vec<M> a0(M(0)), a1(M(0));
          int64_t row = r0;
          for (; row + 1 < r_end; row += 2) {
            a0 = a0 + term(load(xc + row * p.cols, n));
            a1 = a1 + term(load(xc + (row + 1) * p.cols, n));
          }
          if (row < r_end) a0 = a0 + term(load(xc + row * p.cols, n));
          return a0 + a1;
        };
        const Vec<M> sum = down([](const Vec<M>& v) { return v; });
        const Vec<M> mean = sum / Vec<M>(count);
        sum.store(partial + n_partial + slot + c, n);
        down([&](const Vec<M>& v) { return square(v, mean, n); })
            .store(partial + 2 * n_partial + slot + c, n);
      }
    }
  });
}

// dz = g f'(z): dx = a dz (+ k1 (x - c) + k0) where dx is not null, and the terms dz, dz (x - c)
// and (NP = 2 + F::NP) the terms g df/dp of f's parameters (ActMath: beta; AconMath: p1, p2,
// beta)
template <class T, class F, int NP_>
struct AffineGradOp {
  using M = opmath_t<T>;
  static constexpr int NP = NP_;
  static_assert(NP == 2 || NP == 2 + F::NP, "AffineGradOp: 2 sums, or 2 and f's parameters'");
  const T* g;
  const T* x;
  T* dx;  // null: the sums only
  int64_t cols;
  Affine<M> affine;
  const M* k1;  // null: no correction (then k0 is unread)
  const M* k0;
  F f;
  M* keep;  // not null: dz kept there, in x's layout (fa_batch_norm_backward)

  void apply(const At& a, int64_t n, Vec<M>* d) const {
    const int64_t off = a.row * cols + a.col;
    const Vec<M> gv = load(g + off, n);
    Vec<M> xc, av, terms[F::NP > 0 ? F::NP : 1];
    d[0] = gv * f.grad(affine.z(load(x + off, n), a, n, xc, av), a, n, terms);
    if (keep != nullptr) d[0].store(keep + off, n);
    d[1] = d[0] * xc;
    for (int q = 2; q < NP; ++q) d[q] = gv * terms[q - 2];
    if (dx == nullptr) return;
    Vec<M> v = d[0] * av;
    if (k1 != nullptr) {
      v = v + xc * channel_param(k1, a, n, affine.layout) + channel_param(k0, a, n, affine.layout);
    }
    store(dx + off, v, n);
  }
};

// dx = a dz + k1 (x - c) + k0 from the dz an AffineGradOp kept: AffineGradOp's dx, bit for bit,
// without evaluating f' again
template <class T>
struct CorrectOp {
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const M* dz;
  const T* x;
  T* dx;
  int64_t cols;
  Affine<M> affine;
  const M* k1;
  const M* k0;

  void apply(const At& a, int64_t n, Vec<M>*) const {
    const int64_t off = a.row * cols + a.col;
    const Vec<M> xc = load(x + off, n) - channel_param(affine.c, a, n, affine.layout);
    const Vec<M> v = Vec<M>::loadu(dz + off, n) * channel_param(affine.a, a, n, affine.layout);
    store(dx + off,
          v + xc * channel_param(k1, a, n, affine.layout) + channel_param(k0, a, n, affine.layout),
          n);
  }
};

// ---- FReLU's max step: activations.cuh's max_value / max_code / max_bwd, the forwards on
// vectors (a blend by the same comparisons), the backward on each element of a vector ---------

// max_value for vectors: x where x > t or x is NaN, else t (ties and a NaN t: t)
template <class M>
Vec<M> max_of(const Vec<M>& x, const Vec<M>& t) {
  return Vec<M>::blendv(t, x, (x > t) | (x != x));
}

// max_code of n lanes into n bytes, 8 at a time.  The code's bit 0 is "not x >= t" (t wins, or a
// NaN) and its bit 1 "neither x > t nor x < t" (a tie, or a NaN); zero_mask gives each as one
// bit a lane, and a table turns 8 such bits into 8 bytes of 0 or 1.  Converting the lanes one at
// a time cost as much as the whole forward besides.
static_assert(X_WINS == 0 && T_WINS == 1 && TIE == 2 && NAN_SEEN == 3, "store_codes' bits");

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
constexpr int kByteOf[8] = {7, 6, 5, 4, 3, 2, 1, 0};
#else
constexpr int kByteOf[8] = {0, 1, 2, 3, 4, 5, 6, 7};
#endif

struct ByteSpread {
  uint64_t of[256];
  constexpr ByteSpread() : of{} {
    for (int m = 0; m < 256; ++m) {
      // lane k's byte is the k-th in memory once stored
      for (int k = 0; k < 8; ++k) of[m] |= uint64_t((m >> k) & 1) << (8 * kByteOf[k]);
    }
  }
};
constexpr ByteSpread kSpread{};

template <class M>
void store_codes(uint8_t* code, const Vec<M>& x, const Vec<M>& t, int64_t n) {
  const uint64_t t_or_nan = static_cast<uint32_t>((x >= t).zero_mask());
  const uint64_t tie_or_nan = static_cast<uint32_t>(((x > t) | (x < t)).zero_mask());
  for (int64_t k = 0; k < n; k += 8) {
    const uint64_t bytes =
        kSpread.of[(t_or_nan >> k) & 0xff] | kSpread.of[(tie_or_nan >> k) & 0xff] << 1;
    std::memcpy(code + k, &bytes, static_cast<size_t>(std::min<int64_t>(8, n - k)));
  }
}

template <class T>
struct MaxForward {
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* x;
  const T* t;
  T* y;
  uint8_t* code;  // null: not needed
  int64_t cols;

  void apply(const At& a, int64_t n, Vec<M>*) const {
    const int64_t off = a.row * cols + a.col;
    const Vec<M> xv = load(x + off, n);
    const Vec<M> tv = load(t + off, n);
    store(y + off, max_of(xv, tv), n);
    if (code != nullptr) store_codes(code + off, xv, tv, n);
  }
};

template <class T>
struct MaxBackward {
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* g;
  const uint8_t* code;
  T* dx;
  T* dt;
  int64_t cols;

  void apply(const At& a, int64_t n, Vec<M>*) const {
    const int64_t off = a.row * cols + a.col;
    for (int64_t k = off; k < off + n; ++k) {
      const Grad2<M> d = max_bwd(static_cast<M>(g[k]), code[k]);
      dx[k] = static_cast<T>(d.dx);
      dt[k] = static_cast<T>(d.dparam);
    }
  }
};

template <class T>
struct MaxAffine {
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* x;
  const T* t;
  const M* a_;
  const M* b_;
  T* y;
  int64_t cols;
  int layout;

  void apply(const At& a, int64_t n, Vec<M>*) const {
    const int64_t off = a.row * cols + a.col;
    const Vec<M> u = load(t + off, n) * channel_param(a_, a, n, layout) +
                     channel_param(b_, a, n, layout);
    store(y + off, max_of(load(x + off, n), u), n);
  }
};

// ---- dispatch --------------------------------------------------------------------------------

// f(T{}) for the storage type of dtype code `dtype`
template <class F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case FA_F32:
      return f(float{});
    case FA_F16:
      return f(c10::Half{});
    case FA_BF16:
      return f(c10::BFloat16{});
    case FA_F64:
      return f(double{});
    default:
      return BAD_DTYPE;
  }
}

// f(std::integral_constant<int, ACT>{}, T{}) for a run-time activation id and dtype: every id
// of activations.cuh is instantiated, any other is BAD_ACT.
template <class F, int... IDS>
int dispatch_act(int act, int dtype, F&& f, std::integer_sequence<int, IDS...>) {
  int err = BAD_ACT;
  static_cast<void>(((act == IDS && (err = dispatch_dtype(dtype, [&](auto t) {
                                       return f(std::integral_constant<int, IDS>{}, t);
                                     }), true)) || ...));
  return err;
}

template <class F>
int dispatch_act(int act, int dtype, F&& f) {
  return dispatch_act(act, dtype, f, std::make_integer_sequence<int, N_ACT>{});
}

// finite, and at least FAST_FACTOR in magnitude (Nonzero's comment says why)
bool fast_factor(double v) { return std::isfinite(v) && std::abs(v) >= FAST_FACTOR; }

// f(ActMath of activation ACT in opmath M with this beta): its NONZERO form where every value of
// beta is a fast_factor (the scalar, or the p.channels values of a beta tensor: a learnable
// beta is one value or one per channel, and a pass over them is nothing beside the tensor's),
// computing d/dbeta terms only where a backward writes their `partial` sums
template <int ACT, class M, class F>
int with_math(const void* beta, float beta_value, const fa_plan& p, F&& f,
              const void* partial = nullptr) {
  const Beta<M> b{static_cast<const M*>(beta), M(beta_value), p.layout};
  if constexpr (act_reads_beta<ACT>) {
    const bool fast = b.ptr == nullptr
        ? fast_factor(b.value)
        : std::all_of(b.ptr, b.ptr + p.channels, [](M v) { return fast_factor(v); });
    if (partial != nullptr) {
      return fast ? f(ActMath<ACT, M, true, true>{b}) : f(ActMath<ACT, M, false, true>{b});
    }
    if (fast) return f(ActMath<ACT, M, true, false>{b});
    return f(ActMath<ACT, M, false, false>{b});
  }
  return f(ActMath<ACT, M, false, true>{b});  // d/dbeta = 0: nothing to compute
}

// f(AconMath of storage T with these parameters): its NONZERO form where every p1 - p2 (in
// opmath, as the kernel takes it) and every beta is a fast_factor (C values each, beta
// N C per sample: a pass over them is nothing beside the tensor's)
template <class T, class F>
int with_acon(const void* p1, const void* p2, const void* beta, int per_sample, const fa_plan& p,
              F&& f) {
  using M = opmath_t<T>;
  const M* q1 = static_cast<const M*>(p1);
  const M* q2 = static_cast<const M*>(p2);
  const M* b = static_cast<const M*>(beta);
  const int64_t samples = per_sample == 0 ? 1 : p.layout == FA_COLS ? p.samples : p.batch;
  bool fast = std::all_of(b, b + samples * p.channels, [](M v) { return fast_factor(v); });
  for (int64_t c = 0; fast && c < p.channels; ++c) fast = fast_factor(q1[c] - q2[c]);
  if (fast) {
    return f(AconMath<M, true>{q1, q2, b, p.channels, p.layout, per_sample != 0});
  }
  return f(AconMath<M, false>{q1, q2, b, p.channels, p.layout, per_sample != 0});
}

template <class Op>
int launch(const Op& op, const fa_plan& p, void* partial = nullptr, int64_t n_partial = 0) {
  run(op, p, static_cast<typename Op::M*>(partial), n_partial > 0 ? n_partial : 0);
  return OK;
}

// ---- FP8 quantisation of fp32 y (fa_quantize) ------------------------------------------------
// fp8.cuh's encoder and scale rules, shared with the CUDA kernel, so q is quantize_fp8's bit for
// bit; rows in parallel, each by one thread.

// max of |y| as int bits (fp8.cuh abs_bits) over n values: an integer max, which vectorises,
// and a NaN is above every number
C10_ALWAYS_INLINE int amax_bits(const float* y, int64_t n) {
  int a = 0;
  for (int64_t i = 0; i < n; ++i) a = imax(a, abs_bits(y[i]));
  return a;
}

template <int FP8>
void divide(const float* y, uint8_t* q, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) q[i] = fp8_code<FP8>(div_rn(y[i], scale));
}

// The MX block (reference.MX_BLOCK): its groups take loops of a length known when compiling,
// which unroll and vectorise (4x the speed of loops of a runtime length, at 32 values a group)
constexpr int64_t MX_GROUP = 32;

// One block group of n values (N where known when compiling, else 0): its codes into q and its
// E8M0 byte
template <int FP8, int64_t N>
C10_ALWAYS_INLINE uint8_t quantize_group(const float* y, uint8_t* q, int64_t n) {
  const int64_t len = N > 0 ? N : n;
  float mult;
  const uint8_t byte = mx_byte<FP8>(amax_bits(y, len), mult);
  for (int64_t i = 0; i < len; ++i) q[i] = mx_code<FP8>(y[i], byte, mult);
  return byte;
}

template <int FP8>
int quantize(const float* y, uint8_t* q, void* scales, const float* scale, int scaling,
             int64_t group, int64_t rows, int64_t cols) {
  if (scaling == Q_BLOCK && (group < 1 || cols % group != 0)) return BAD_VALUE;
  if (scaling != Q_TENSOR && scaling != Q_ROW && scaling != Q_BLOCK) return BAD_VALUE;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / cols);
  float s = 0.0f;
  if (scaling == Q_TENSOR && scale != nullptr) {
    s = *scale;
  } else if (scaling == Q_TENSOR) {
    const int a = at::parallel_reduce(
        int64_t(0), rows, grain, 0,
        [&](int64_t begin, int64_t end, int acc) {
          return imax(acc, amax_bits(y + begin * cols, (end - begin) * cols));
        },
        [](int a, int b) { return imax(a, b); });
    s = row_scale<FP8>(a);
    *static_cast<float*>(scales) = s;
  }
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* yr = y + r * cols;
      uint8_t* qr = q + r * cols;
      if (scaling == Q_TENSOR) {
        divide<FP8>(yr, qr, cols, s);
      } else if (scaling == Q_ROW) {
        const float rs = row_scale<FP8>(amax_bits(yr, cols));
        static_cast<float*>(scales)[r] = rs;
        divide<FP8>(yr, qr, cols, rs);
      } else {
        uint8_t* bytes = static_cast<uint8_t*>(scales) + r * (cols / group);
        for (int64_t c0 = 0; c0 < cols; c0 += group) {
          bytes[c0 / group] = group == MX_GROUP ? quantize_group<FP8, MX_GROUP>(yr + c0, qr + c0, 0)
                                                : quantize_group<FP8, 0>(yr + c0, qr + c0, group);
        }
      }
    }
  });
  return OK;
}

}  // namespace
}  // namespace fused_act

using namespace fused_act;

// The C interface (fused_act.h) on CPU memory; `stream` is ignored.

extern "C" int fa_act_forward(const void* x, void* y, int dtype, int act, const void* beta,
                              float beta_value, fa_plan plan, void*) {
  return dispatch_act(act, dtype, [&](auto a, auto t) {
    using T = decltype(t);
    return with_math<decltype(a)::value, opmath_t<T>>(beta, beta_value, plan, [&](auto f) {
      return launch(MapOp<T, decltype(f)>{static_cast<const T*>(x), static_cast<T*>(y),
                                          plan.cols, f},
                    plan);
    });
  });
}

extern "C" int fa_act_backward(const void* g, const void* x, void* dx, int dtype, int act,
                               const void* beta, float beta_value, void* partial, fa_plan plan,
                               void*) {
  return dispatch_act(act, dtype, [&](auto a, auto t) {
    using T = decltype(t);
    return with_math<decltype(a)::value, opmath_t<T>>(beta, beta_value, plan, [&](auto f) {
      return launch(GradOp<T, decltype(f)>{static_cast<const T*>(g), static_cast<const T*>(x),
                                           static_cast<T*>(dx), plan.cols, f},
                    plan, partial, fa_partial_slots(plan));
    }, partial);
  });
}

extern "C" int fa_glu_forward(const void* gate, const void* up, void* out, const int64_t* s,
                              int dtype, int act, const void* beta, float beta_value,
                              fa_plan plan, void*) {
  return dispatch_act(act, dtype, [&](auto a, auto t) {
    using T = decltype(t);
    return with_math<decltype(a)::value, opmath_t<T>>(beta, beta_value, plan, [&](auto f) {
      return launch(GluOp<T, decltype(f)>{static_cast<const T*>(gate), static_cast<const T*>(up),
                                          static_cast<T*>(out), s[0], s[1], s[2], f},
                    plan);
    });
  });
}

extern "C" int fa_glu_backward(const void* g, const void* gate, const void* up, void* dgate,
                               void* dup, const int64_t* s, int dtype, int act, const void* beta,
                               float beta_value, void* partial, fa_plan plan, void*) {
  return dispatch_act(act, dtype, [&](auto a, auto t) {
    using T = decltype(t);
    return with_math<decltype(a)::value, opmath_t<T>>(beta, beta_value, plan, [&](auto f) {
      return launch(GluGradOp<T, decltype(f)>{static_cast<const T*>(g),
                                              static_cast<const T*>(gate),
                                              static_cast<const T*>(up), static_cast<T*>(dgate),
                                              static_cast<T*>(dup), s[0], s[1], s[2], s[3], s[4],
                                              f},
                    plan, partial, fa_partial_slots(plan));
    }, partial);
  });
}

extern "C" int fa_acon_forward(const void* x, void* y, int dtype, const void* p1, const void* p2,
                               const void* beta, int per_sample, fa_plan plan, void*) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_acon<T>(p1, p2, beta, per_sample, plan, [&](auto f) {
      return launch(MapOp<T, decltype(f)>{static_cast<const T*>(x), static_cast<T*>(y),
                                          plan.cols, f},
                    plan);
    });
  });
}

extern "C" int fa_acon_backward(const void* g, const void* x, void* dx, int dtype, const void* p1,
                                const void* p2, const void* beta, int per_sample, void* partial,
                                int64_t n_partial, fa_plan plan, void*) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_acon<T>(p1, p2, beta, per_sample, plan, [&](auto f) {
      return launch(GradOp<T, decltype(f)>{static_cast<const T*>(g), static_cast<const T*>(x),
                                           static_cast<T*>(dx), plan.cols, f},
                    plan, partial, n_partial);
    });
  });
}

extern "C" int fa_max_forward(const void* x, const void* t, void* y, void* code, int dtype,
                              fa_plan plan, void*) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(MaxForward<T>{static_cast<const T*>(x), static_cast<const T*>(t),
                                static_cast<T*>(y), static_cast<uint8_t*>(code), plan.cols},
                  plan);
  });
}

extern "C" int fa_max_backward(const void* g, const void* code, void* dx, void* dt, int dtype,
                               fa_plan plan, void*) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(MaxBackward<T>{static_cast<const T*>(g), static_cast<const uint8_t*>(code),
                                 static_cast<T*>(dx), static_cast<T*>(dt), plan.cols},
                  plan);
  });
}

extern "C" int fa_max_affine(const void* x, const void* t, const void* a, const void* b, void* y,
                             int dtype, fa_plan plan, void*) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = opmath_t<T>;
    return launch(MaxAffine<T>{static_cast<const T*>(x), static_cast<const T*>(t),
                               static_cast<const M*>(a), static_cast<const M*>(b),
                               static_cast<T*>(y), plan.cols, plan.layout},
                  plan);
  });
}

extern "C" int fa_stats(const void* x, void* partial, int64_t n_partial, int dtype,
                        fa_plan plan, void*) {
  if (partial == nullptr) return BAD_VALUE;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    stats(static_cast<const T*>(x), static_cast<opmath_t<T>*>(partial), n_partial, plan);
    return int(OK);
  });
}

// f(math, T{}) for f's math in storage T: ACON-C (with_acon) where p1 is not null (then p2 and
// beta are needed, act is unread), else activation `act` with its beta (with_math)
template <class F>
int with_affine_math(int act, int dtype, const void* beta, float beta_value, const void* p1,
                     const void* p2, const fa_plan& p, F&& f, const void* partial = nullptr) {
  if (p1 != nullptr) {
    if (p2 == nullptr || beta == nullptr) return BAD_VALUE;
    return dispatch_dtype(dtype, [&](auto t) {
      return with_acon<decltype(t)>(p1, p2, beta, 0, p, [&](auto m) { return f(m, t); });
    });
  }
  return dispatch_act(act, dtype, [&](auto id, auto t) {
    return with_math<decltype(id)::value, opmath_t<decltype(t)>>(
        beta, beta_value, p, [&](auto m) { return f(m, t); }, partial);
  });
}

extern "C" int fa_affine_act_forward(const void* x, void* y, int dtype, int act, const void* c,
                                     const void* a, const void* b, const void* beta,
                                     float beta_value, const void* p1, const void* p2,
                                     fa_plan plan, void*) {
  return with_affine_math(act, dtype, beta, beta_value, p1, p2, plan, [&](auto f, auto t) {
    using T = decltype(t);
    using M = opmath_t<T>;
    using F = AffineMath<M, decltype(f)>;
    return launch(MapOp<T, F>{static_cast<const T*>(x), static_cast<T*>(y), plan.cols,
                              F{{static_cast<const M*>(c), static_cast<const M*>(a),
                                 static_cast<const M*>(b), plan.layout}, f}},
                  plan);
  });
}

// sums: 2, or 2 and f's parameter gradients (3 with an activation's beta, 5 with ACON-C's)
extern "C" int fa_affine_act_backward(const void* g, const void* x, void* dx, int dtype, int act,
                                      const void* c, const void* a, const void* b,
                                      const void* beta, float beta_value, const void* p1,
                                      const void* p2, const void* k1, const void* k0,
                                      void* partial, int sums, int64_t n_partial, fa_plan plan,
                                      void*) {
  return with_affine_math(act, dtype, beta, beta_value, p1, p2, plan, [&](auto f, auto t) {
    using T = decltype(t);
    using M = opmath_t<T>;
    constexpr int ALL = 2 + decltype(f)::NP;
    if (partial != nullptr && sums != 2 && sums != ALL) return int(BAD_VALUE);
    auto go = [&](auto np) {
      return launch(AffineGradOp<T, decltype(f), decltype(np)::value>{
                        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(dx),
                        plan.cols,
                        {static_cast<const M*>(c), static_cast<const M*>(a),
                         static_cast<const M*>(b), plan.layout},
                        static_cast<const M*>(k1), static_cast<const M*>(k0), f, nullptr},
                    plan, partial, n_partial);
    };
    return partial != nullptr && sums == ALL ? go(std::integral_constant<int, ALL>{})
                                             : go(std::integral_constant<int, 2>{});
  }, partial);
}

extern "C" int fa_batch_norm_backward(const void* g, const void* x, void* dx, int dtype, int act,
                                      const void* c, const void* a, const void* b,
                                      const void* invstd, float beta_value, void* sums,
                                      fa_plan plan) {
  return with_affine_math(act, dtype, nullptr, beta_value, nullptr, nullptr, plan,
                          [&](auto f, auto t) {
    using T = decltype(t);
    using M = opmath_t<T>;
    const int64_t n = plan.rows * plan.cols, channels = plan.channels;
    const int64_t slots = fa_partial_slots(plan);
    if (channels < 1 || n < 2 * channels) return int(BAD_VALUE);
    const Affine<M> affine{static_cast<const M*>(c), static_cast<const M*>(a),
                           static_cast<const M*>(b), plan.layout};
    // not value-initialised: every element is written before it is read
    const std::unique_ptr<M[]> dz(new (std::nothrow) M[n]),
        partial(new (std::nothrow) M[2 * slots]), k(new (std::nothrow) M[2 * channels]);
    if (!dz || !partial || !k) return int(NO_MEMORY);
    run(AffineGradOp<T, decltype(f), 2>{static_cast<const T*>(g), static_cast<const T*>(x),
                                        nullptr, plan.cols, affine, nullptr, nullptr, f,
                                        dz.get()},
        plan, partial.get(), slots);
    // the channels' sums in slot order (slot j is channel j % channels), in double: a channel
    // may have millions of slots, whose fp32 running sum would drift; then the correction
    const double m = double(n / channels);
    const M* inv = static_cast<const M*>(invstd);
    M* s = static_cast<M*>(sums);
    for (int64_t ch = 0; ch < channels; ++ch) {
      double s0 = 0, s1 = 0;
      for (int64_t j = ch; j < slots; j += channels) s0 += partial[j], s1 += partial[slots + j];
      const double a = affine.a[ch], i = inv[ch];
      s[ch] = M(s0);
      s[channels + ch] = M(s1);
      k[ch] = M(-a * i * i * s1 / m);
      k[channels + ch] = M(-a * s0 / m);
    }
    run(CorrectOp<T>{dz.get(), static_cast<const T*>(x), static_cast<T*>(dx), plan.cols, affine,
                     k.get(), k.get() + channels},
        plan, nullptr, 0);
    return int(OK);
  });
}

extern "C" int fa_quantize(const float* y, void* q, void* scales, const float* scale, int fp8,
                           int scaling, int block, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 1) return BAD_VALUE;
  auto u8 = static_cast<uint8_t*>(q);
  switch (fp8) {
    case E4M3:
      return quantize<E4M3>(y, u8, scales, scale, scaling, block, rows, cols);
    case E5M2:
      return quantize<E5M2>(y, u8, scales, scale, scaling, block, rows, cols);
    default:
      return BAD_VALUE;
  }
}

extern "C" const char* fa_error_string(int err) {
  switch (err) {
    case OK:
      return "no error";
    case BAD_ACT:
      return "unknown activation id";
    case BAD_DTYPE:
      return "unsupported dtype";
    case BAD_VALUE:
      return "invalid argument";
    case NO_MEMORY:
      return "out of memory";
    default:
      return "unknown error";
  }
}
