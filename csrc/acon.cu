// ACON-C / Meta-ACON: forward in one pass over x; backward in one pass over (grad, x) writing dx
// and per-tile partial sums of dp1, dp2 and dbeta (tile.cuh), which the caller finishes with one
// small sum.  A per-sample beta (Meta-ACON) is read per (sample, channel).
#include "tile.cuh"

namespace fused_act {

// ACON-C with its per-channel p1, p2 and per-channel or per-sample beta, as tile.cuh's MapOp /
// GradOp take it.
template <class M>
struct AconMath {
  static constexpr int NP = 3;  // dp1, dp2, dbeta
  const M* p1;
  const M* p2;
  const M* beta;
  int64_t channels;
  int layout;
  bool per_sample;

  // tile.cuh min_blocks: the sums of three terms of the widest vectors need 128 registers (8
  // elements) or 80 (4) not to spill
  template <int VEC, int SUMS>
  static constexpr int grad_blocks() {
    return SUMS == NO_SUMS || VEC == 1 ? MIN_BLOCKS : (VEC >= 8 ? 2 : 3);
  }

  // (a = p1 - p2, p2, beta) of element k of the vector at `at`
  __device__ __forceinline__ void params(const At& a, int k, M& diff, M& q2, M& b) const {
    const M v1 = channel_param(p1, a, k, layout);
    q2 = channel_param(p2, a, k, layout);
    diff = v1 - q2;
    b = per_sample ? sample_param(beta, a, k, layout, channels) : channel_param(beta, a, k, layout);
  }
  __device__ __forceinline__ M value(M x, const At& a, int k) const {
    M diff, q2, b;
    params(a, k, diff, q2, b);
    return acon_c_fwd(x, diff, q2, b);
  }
  __device__ __forceinline__ M grad(M x, const At& a, int k, M (&terms)[3]) const {
    M diff, q2, b;
    params(a, k, diff, q2, b);
    const AconGrad<M> r = acon_c_bwd(x, diff, q2, b);
    terms[0] = r.dp1;
    terms[1] = r.dp2;
    terms[2] = r.dbeta;
    return r.dx;
  }
};

template <class T>
AconMath<opmath_t<T>> acon_math(const void* p1, const void* p2, const void* beta,
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
    const MapOp<T, AconMath<opmath_t<T>>> op{static_cast<const T*>(x), static_cast<T*>(y),
                                             acon_math<T>(p1, p2, beta, per_sample, plan)};
    return run(op, plan, stream, {{x, sizeof(T)}, {y, sizeof(T)}});
  });
}

extern "C" int fa_acon_backward(const void* g, const void* x, void* dx, int dtype, const void* p1,
                                const void* p2, const void* beta, int per_sample, void* partial,
                                int64_t n_partial, fa_plan plan, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const GradOp<T, AconMath<opmath_t<T>>> op{static_cast<const T*>(g),
                                              static_cast<const T*>(x), static_cast<T*>(dx),
                                              acon_math<T>(p1, p2, beta, per_sample, plan)};
    return run(op, plan, stream, {{g, sizeof(T)}, {x, sizeof(T)}, {dx, sizeof(T)}},
               static_cast<opmath_t<T>*>(partial), n_partial);
  });
}
