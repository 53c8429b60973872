// ACON-C / Meta-ACON: forward in one pass over x; backward in one pass over (grad, x) writing dx
// and per-tile partial sums of dp1, dp2 and dbeta (tile.cuh), which the caller finishes with one
// small sum.  A per-sample beta (Meta-ACON) is read per (sample, channel).
#include "act_math.cuh"

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
