// BatchNorm + activation, the kernels fused_act/ops/batchnorm.py composes (as
// triton_kernels/batchnorm.py, slot for slot): per slot the count, sum and squared distances
// from the slot's mean of x (the batch statistics); y = f(z), z = (x - c) a + b with
// per-channel c, a, b; and its backward, writing dx = a dz (+ k1 (x - c) + k0) and/or per-tile
// partial sums of dz = g f'(z), dz (x - c) and the activation's parameter gradients:
// g df/dbeta, or for ACON-C (f of per-channel p1, p2 and beta) g df/dp1, g df/dp2, g df/dbeta.
#include "act_math.cuh"

namespace fused_act {

// The per-channel affine in front of the activation.
template <class M>
struct Affine {
  const M* c;
  const M* a;
  const M* b;
  int layout;

  // z = (x - c) a + b of element k at `at`, with x - c and a for the backward
  __device__ __forceinline__ M z(M x, const At& at, int k, M& xc, M& av) const {
    xc = x - channel_param(c, at, k, layout);
    av = channel_param(a, at, k, layout);
    return xc * av + channel_param(b, at, k, layout);
  }
};

template <class M>
Affine<M> affine_of(const void* c, const void* a, const void* b, const fa_plan& p) {
  return {static_cast<const M*>(c), static_cast<const M*>(a), static_cast<const M*>(b),
          p.layout};
}

// The batch statistics: per slot, the count of x's values, their sum and the sum of their
// squared distances from their own mean (a centered op: tile.cuh merges the lanes by Chan et
// al.'s formula, so nothing cancels however far the values lie from 0).  Reads x only.
template <class T>
struct StatsOp {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 3;
  static constexpr bool SUMS_ONLY = true;
  static constexpr bool CENTERED = true;
  const T* x;

  // fp64's merges spill at 64 registers (bench/codegen_cuda.py): 80
  template <int VEC, int SUMS>
  static constexpr int min_blocks() { return sizeof(M) == 8 ? 3 : MIN_BLOCKS; }

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&d)[NP][VEC]) const {
    M v[VEC];
    load<VEC>(x + a.off, a.n, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      // the lanes past n stay (0, 0, 0): no value
      if (k < a.n) {
        d[0][k] = M(1);
        d[1][k] = v[k];
      }
    }
  }
};

// f((x - c) a + b), as tile.cuh's MapOp takes it; F is ActMath or AconMath
template <class M, class F>
struct AffineMath {
  Affine<M> affine;
  F f;

  __device__ __forceinline__ M value(M x, const At& a, int k) const {
    M xc, av;
    return f.value(affine.z(x, a, k, xc, av), a, k);
  }
};

// dz = g f'(z): dx = a dz (+ k1 (x - c) + k0 per channel) where dx is not null, and the terms
// dz, dz (x - c) and (NP = 2 + F::NP) the F::NP terms g df/dp of f's parameters (ActMath: beta;
// AconMath: p1, p2, beta) of the tile's reduction
template <class T, class F, int NP_>
struct AffineGradOp {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = NP_;
  static_assert(NP == 2 || NP == 2 + F::NP, "AffineGradOp: 2 sums, or 2 and f's parameters'");
  const T* g;
  const T* x;
  T* dx;        // null: the sums only
  Affine<M> affine;
  const M* k1;  // null: no correction (then k0 is unread)
  const M* k0;
  F f;

  // tile.cuh min_blocks (bench/codegen_cuda.py): 16-bit vectors spill at 80 registers (GELU's
  // dx pass) and fp32's sums at 80, so they get 128; fp64 with sums spills at 64.  ACON-C
  // (F::NP = 3): fp32 vectors spill at 64 in the dx pass too, and 16-bit vectors with all five
  // column sums at 128, so those get 255 (measured: 128 + 64 B of spill)
  template <int VEC, int SUMS>
  static constexpr int min_blocks() {
    if (NP == 5 && VEC >= 8 && SUMS == COLUMN_SUMS) return 1;
    if (VEC >= 8 || (VEC >= 4 && (SUMS != NO_SUMS || F::NP == 3))) return 2;
    return SUMS != NO_SUMS && sizeof(M) == 8 ? 3 : MIN_BLOCKS;
  }

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&d)[NP][VEC]) const {
    M gv[VEC], xv[VEC];
    load<VEC>(g + a.off, a.n, gv);
    load<VEC>(x + a.off, a.n, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      M xc, av, terms[F::NP];
      const M dz = gv[k] * f.grad(affine.z(xv[k], a, k, xc, av), a, k, terms);
      // past n, g reads as 0, but 0 f'(z) is NaN where z, the affine of 0, is not finite
      if (k < a.n) {
        d[0][k] = dz;
        d[1][k] = dz * xc;
#pragma unroll
        for (int q = 2; q < NP; ++q) d[q][k] = gv[k] * terms[q - 2];
      }
      xv[k] = dz * av;
      if (k1 != nullptr) {
        xv[k] = xv[k] + xc * channel_param(k1, a, k, affine.layout) +
                channel_param(k0, a, k, affine.layout);
      }
    }
    if (dx != nullptr) store<VEC>(dx + a.off, a.n, xv);
  }
};

// F: f's math (ActMath or AconMath) for storage T
template <class T, class F>
int affine_act_forward(const void* x, void* y, const void* c, const void* a, const void* b,
                       const F& f, const fa_plan& p, void* stream) {
  using M = opmath_t<T>;
  const MapOp<T, AffineMath<M, F>> op{static_cast<const T*>(x), static_cast<T*>(y),
                                      {affine_of<M>(c, a, b, p), f}};
  return run(op, p, stream, {{x, sizeof(T)}, {y, sizeof(T)}});
}

// sums: 2, or 2 + F::NP with f's parameter gradients
template <class T, class F>
int affine_act_backward(const void* g, const void* x, void* dx, const void* c, const void* a,
                        const void* b, const F& f, const void* k1, const void* k0, void* partial,
                        int sums, int64_t n_partial, const fa_plan& p, void* stream) {
  using M = opmath_t<T>;
  auto go = [&](auto np) {
    const AffineGradOp<T, F, decltype(np)::value> op{
        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(dx),
        affine_of<M>(c, a, b, p), static_cast<const M*>(k1), static_cast<const M*>(k0), f};
    return run(op, p, stream, {{g, sizeof(T)}, {x, sizeof(T)}, {dx, sizeof(T)}},
               static_cast<M*>(partial), n_partial);
  };
  if (partial != nullptr && sums == 2 + F::NP) return go(std::integral_constant<int, 2 + F::NP>{});
  if (partial != nullptr && sums != 2) return int(cudaErrorInvalidValue);
  return go(std::integral_constant<int, 2>{});
}

// f(F{}, T{}) for f's math: ACON-C where p1 is not null (then p2 and beta are needed, act is
// unread), else activation `act` with its beta; and the dtype
template <class F>
int dispatch_f(int act, int dtype, const void* beta, float beta_value, const void* p1,
               const void* p2, const fa_plan& p, F&& f) {
  if (p1 != nullptr) {
    if (p2 == nullptr || beta == nullptr) return int(cudaErrorInvalidValue);
    return dispatch_dtype(dtype, [&](auto t) {
      return f(acon_math<decltype(t)>(p1, p2, beta, 0, p), t);
    });
  }
  return dispatch_act_dtype(act, dtype, [&](auto id, auto t) {
    using M = opmath_t<decltype(t)>;
    return f(ActMath<decltype(id)::value, M>{beta_of<M>(beta, beta_value, p)}, t);
  });
}

}  // namespace fused_act

using namespace fused_act;

extern "C" int fa_stats(const void* x, void* partial, int64_t n_partial, int dtype,
                        fa_plan plan, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const StatsOp<T> op{static_cast<const T*>(x)};
    return run(op, plan, stream, {{x, sizeof(T)}}, static_cast<opmath_t<T>*>(partial),
               n_partial);
  });
}

extern "C" int fa_affine_act_forward(const void* x, void* y, int dtype, int act, const void* c,
                                     const void* a, const void* b, const void* beta,
                                     float beta_value, const void* p1, const void* p2,
                                     fa_plan plan, void* stream) {
  return dispatch_f(act, dtype, beta, beta_value, p1, p2, plan, [&](const auto& f, auto t) {
    return affine_act_forward<decltype(t)>(x, y, c, a, b, f, plan, stream);
  });
}

extern "C" int fa_affine_act_backward(const void* g, const void* x, void* dx, int dtype, int act,
                                      const void* c, const void* a, const void* b,
                                      const void* beta, float beta_value, const void* p1,
                                      const void* p2, const void* k1, const void* k0,
                                      void* partial, int sums, int64_t n_partial, fa_plan plan,
                                      void* stream) {
  return dispatch_f(act, dtype, beta, beta_value, p1, p2, plan, [&](const auto& f, auto t) {
    return affine_act_backward<decltype(t)>(g, x, dx, c, a, b, f, k1, k0, partial, sums,
                                            n_partial, plan, stream);
  });
}
