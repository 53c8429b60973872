// ACON-C / Meta-ACON: forward in one pass over x; backward in one pass over (grad, x) writing dx
// and per-tile partial sums of dp1, dp2 and dbeta (tile.cuh), which the caller finishes with one
// small sum.  A per-sample beta (Meta-ACON) is read per (sample, channel).
#include "tile.cuh"

namespace fused_act {

template <class M>
struct AconParams {
  const M* p1;
  const M* p2;
  const M* beta;
  int64_t channels;
  int layout;
  bool per_sample;

  // (a = p1 - p2, p2, beta) of element k of the vector at `at`
  __device__ __forceinline__ void at(const At& a, int k, M& diff, M& q2, M& b) const {
    const M v1 = channel_param(p1, a, k, layout);
    q2 = channel_param(p2, a, k, layout);
    diff = v1 - q2;
    b = per_sample ? sample_param(beta, a, k, layout, channels) : channel_param(beta, a, k, layout);
  }
};

template <class T>
struct AconForward {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* x;
  T* y;
  AconParams<M> prm;

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&)[1][VEC]) const {
    M v[VEC];
    load<VEC>(x + a.off, a.n, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      M diff, p2, b;
      prm.at(a, k, diff, p2, b);
      v[k] = acon_c_fwd(v[k], diff, p2, b);
    }
    store<VEC>(y + a.off, a.n, v);
  }
};

template <class T>
struct AconBackward {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 3;
  const T* g;
  const T* x;
  T* dx;
  AconParams<M> prm;

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&d)[3][VEC]) const {
    M gv[VEC], xv[VEC];
    load<VEC>(g + a.off, a.n, gv);
    load<VEC>(x + a.off, a.n, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      M diff, p2, b;
      prm.at(a, k, diff, p2, b);
      const AconGrad<M> r = acon_c_bwd(xv[k], diff, p2, b);
      xv[k] = gv[k] * r.dx;
      // 0 past n: gv is 0 there and the terms are finite for x = 0
      d[0][k] = gv[k] * r.dp1;
      d[1][k] = gv[k] * r.dp2;
      d[2][k] = gv[k] * r.dbeta;
    }
    store<VEC>(dx + a.off, a.n, xv);
  }
};

template <class T>
AconParams<opmath_t<T>> acon_params(const void* p1, const void* p2, const void* beta,
                                    int per_sample, const fa_plan& p) {
  using M = opmath_t<T>;
  return {static_cast<const M*>(p1), static_cast<const M*>(p2), static_cast<const M*>(beta),
          p.channels, p.layout, per_sample != 0};
}

}  // namespace fused_act

using namespace fused_act;

extern "C" int fa_acon_forward(const void* x, void* y, int dtype, const void* p1, const void* p2,
                               const void* beta, int per_sample, fa_plan plan, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const AconForward<T> op{static_cast<const T*>(x), static_cast<T*>(y),
                            acon_params<T>(p1, p2, beta, per_sample, plan)};
    return run(op, plan, stream, {{x, sizeof(T)}, {y, sizeof(T)}});
  });
}

extern "C" int fa_acon_backward(const void* g, const void* x, void* dx, int dtype, const void* p1,
                                const void* p2, const void* beta, int per_sample, void* partial,
                                int64_t n_partial, fa_plan plan, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const AconBackward<T> op{static_cast<const T*>(g), static_cast<const T*>(x),
                             static_cast<T*>(dx), acon_params<T>(p1, p2, beta, per_sample, plan)};
    return run(op, plan, stream, {{g, sizeof(T)}, {x, sizeof(T)}, {dx, sizeof(T)}},
               static_cast<opmath_t<T>*>(partial), n_partial);
  });
}
