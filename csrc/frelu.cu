// FReLU's max step: y = max(x, t) writing a one-byte win code for backward, the backward in one
// pass over (grad, code), and the eval-mode step max(x, a t + b) with BatchNorm folded into
// per-channel a, b.  All run by the tiled kernel (tile.cuh) on the caller's plan: flat for the
// max and its backward, a channel plan for the folded step.
#include "tile.cuh"

namespace fused_act {

template <class T>
struct MaxForward {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* x;
  const T* t;
  T* y;
  uint8_t* code;  // null: not needed

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&)[1][VEC]) const {
    M xv[VEC], tv[VEC];
    uint8_t c[VEC];
    load<VEC>(x + a.off, a.n, xv);  // compared in opmath: exact for every storage type
    load<VEC>(t + a.off, a.n, tv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      c[k] = max_code(xv[k], tv[k]);
      xv[k] = max_value(xv[k], tv[k]);
    }
    store<VEC>(y + a.off, a.n, xv);
    if (code != nullptr) store_raw<VEC>(code + a.off, a.n, c);
  }
};

template <class T>
struct MaxBackward {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* g;
  const uint8_t* code;
  T* dx;
  T* dt;

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&)[1][VEC]) const {
    M gv[VEC], dxv[VEC], dtv[VEC];
    uint8_t c[VEC];
    load<VEC>(g + a.off, a.n, gv);
    load_raw<VEC>(code + a.off, a.n, c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const Grad2<M> d = max_bwd(gv[k], k < a.n ? c[k] : uint8_t(0));
      dxv[k] = d.dx;
      dtv[k] = d.dparam;
    }
    store<VEC>(dx + a.off, a.n, dxv);
    store<VEC>(dt + a.off, a.n, dtv);
  }
};

template <class T>
struct MaxAffine {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* x;
  const T* t;
  const M* a_;
  const M* b_;
  T* y;
  int layout;

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&)[1][VEC]) const {
    M xv[VEC], tv[VEC];
    load<VEC>(x + a.off, a.n, xv);
    load<VEC>(t + a.off, a.n, tv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const M u = tv[k] * channel_param(a_, a, k, layout) + channel_param(b_, a, k, layout);
      xv[k] = max_value(xv[k], u);
    }
    store<VEC>(y + a.off, a.n, xv);
  }
};

}  // namespace fused_act

using namespace fused_act;

extern "C" int fa_max_forward(const void* x, const void* t, void* y, void* code, int dtype,
                              fa_plan plan, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const MaxForward<T> op{static_cast<const T*>(x), static_cast<const T*>(t), static_cast<T*>(y),
                           static_cast<uint8_t*>(code)};
    return run(op, plan, stream, {{x, sizeof(T)}, {t, sizeof(T)}, {y, sizeof(T)}, {code, 1}});
  });
}

extern "C" int fa_max_backward(const void* g, const void* code, void* dx, void* dt, int dtype,
                               fa_plan plan, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const MaxBackward<T> op{static_cast<const T*>(g), static_cast<const uint8_t*>(code),
                            static_cast<T*>(dx), static_cast<T*>(dt)};
    return run(op, plan, stream, {{g, sizeof(T)}, {code, 1}, {dx, sizeof(T)}, {dt, sizeof(T)}});
  });
}

extern "C" int fa_max_affine(const void* x, const void* t, const void* a, const void* b, void* y,
                             int dtype, fa_plan plan, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = opmath_t<T>;
    const MaxAffine<T> op{static_cast<const T*>(x), static_cast<const T*>(t),
                          static_cast<const M*>(a), static_cast<const M*>(b), static_cast<T*>(y),
                          plan.layout};
    return run(op, plan, stream, {{x, sizeof(T)}, {t, sizeof(T)}, {y, sizeof(T)}});
  });
}
