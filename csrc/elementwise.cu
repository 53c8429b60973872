// Mish, swish/SiLU and GELU (erf, tanh): one forward and one backward op for every activation
// and dtype, run by the tiled kernel (tile.cuh).  Backward sums d(loss)/d(beta) of a swish beta
// tensor per tile.
#include "tile.cuh"

namespace fused_act {

template <class M>
struct Beta {
  const M* ptr;  // null: the scalar `value`
  M value;
  int layout;

  __device__ __forceinline__ M at(const At& a, int k) const {
    return ptr == nullptr ? value : channel_param(ptr, a, k, layout);
  }
};

// Activation ACT with its beta (swish only), as tile.cuh's MapOp / GradOp take it.
template <int ACT, class M>
struct ActMath {
  static constexpr int NP = 1;  // d/dbeta
  Beta<M> beta;

  __device__ __forceinline__ M value(M x, const At& a, int k) const {
    return act_fwd<ACT>(x, beta.at(a, k));
  }
  __device__ __forceinline__ M grad(M x, const At& a, int k, M (&terms)[1]) const {
    const Grad2<M> d = act_bwd<ACT>(x, beta.at(a, k));
    terms[0] = d.dparam;
    return d.dx;
  }
};

template <int ACT, class T>
int act_forward(const void* x, void* y, const void* beta, float beta_value, const fa_plan& p,
                void* stream) {
  using M = opmath_t<T>;
  const MapOp<T, ActMath<ACT, M>> op{
      static_cast<const T*>(x), static_cast<T*>(y),
      {Beta<M>{static_cast<const M*>(beta), M(beta_value), p.layout}}};
  return run(op, p, stream, {{x, sizeof(T)}, {y, sizeof(T)}});
}

template <int ACT, class T>
int act_backward(const void* g, const void* x, void* dx, const void* beta, float beta_value,
                 void* partial, const fa_plan& p, void* stream) {
  using M = opmath_t<T>;
  const GradOp<T, ActMath<ACT, M>> op{
      static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(dx),
      {Beta<M>{static_cast<const M*>(beta), M(beta_value), p.layout}}};
  return run(op, p, stream, {{g, sizeof(T)}, {x, sizeof(T)}, {dx, sizeof(T)}},
             static_cast<M*>(partial));
}

// f(std::integral_constant<int, ACT>{}) for the run-time id `act`: every id of activations.cuh
// (0 .. N_ACT - 1) is instantiated; any other is cudaErrorInvalidValue.
template <class F, int... IDS>
int dispatch_act(int act, F&& f, std::integer_sequence<int, IDS...>) {
  int err = int(cudaErrorInvalidValue);
  static_cast<void>(((act == IDS && (err = f(std::integral_constant<int, IDS>{}), true)) || ...));
  return err;
}

template <class F>
int dispatch_act(int act, F&& f) {
  return dispatch_act(act, f, std::make_integer_sequence<int, N_ACT>{});
}

}  // namespace fused_act

using namespace fused_act;

extern "C" int fa_act_forward(const void* x, void* y, int dtype, int act, const void* beta,
                              float beta_value, fa_plan plan, void* stream) {
  return dispatch_act(act, [&](auto a) {
    return dispatch_dtype(dtype, [&](auto t) {
      return act_forward<decltype(a)::value, decltype(t)>(x, y, beta, beta_value, plan, stream);
    });
  });
}

extern "C" int fa_act_backward(const void* g, const void* x, void* dx, int dtype, int act,
                               const void* beta, float beta_value, void* partial, fa_plan plan,
                               void* stream) {
  return dispatch_act(act, [&](auto a) {
    return dispatch_dtype(dtype, [&](auto t) {
      return act_backward<decltype(a)::value, decltype(t)>(g, x, dx, beta, beta_value, partial,
                                                           plan, stream);
    });
  });
}

extern "C" const char* fa_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
