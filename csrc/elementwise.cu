// Mish, swish/SiLU and GELU (erf, tanh), plain and gated (f(gate) * up): one forward and one
// backward op for every activation and dtype, run by the tiled kernel (tile.cuh).  Backward sums
// d(loss)/d(beta) of a swish beta tensor per tile.
#include "act_math.cuh"

namespace fused_act {

template <int ACT, class T>
int act_forward(const void* x, void* y, const void* beta, float beta_value, const fa_plan& p,
                void* stream) {
  using M = opmath_t<T>;
  const MapOp<T, ActMath<ACT, M>> op{static_cast<const T*>(x), static_cast<T*>(y),
                                     {beta_of<M>(beta, beta_value, p)}};
  return run(op, p, stream, {{x, sizeof(T)}, {y, sizeof(T)}});
}

template <int ACT, class T>
int act_backward(const void* g, const void* x, void* dx, const void* beta, float beta_value,
                 void* partial, const fa_plan& p, void* stream) {
  using M = opmath_t<T>;
  const GradOp<T, ActMath<ACT, M>> op{static_cast<const T*>(g), static_cast<const T*>(x),
                                      static_cast<T*>(dx), {beta_of<M>(beta, beta_value, p)}};
  return run(op, p, stream, {{g, sizeof(T)}, {x, sizeof(T)}, {dx, sizeof(T)}},
             static_cast<M*>(partial));
}

// ---- gated: f(gate) * up, each tensor walked as rows `stride` elements apart ---------------

template <class P>
__device__ __forceinline__ P* at_row(P* p, const At& a, int64_t stride) {
  return p + a.row * stride + a.col;
}

// out = f(gate) * up
template <class T, class F>
struct GluOp {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* gate;
  const T* up;
  T* out;
  int64_t s_gate, s_up, s_out;
  F f;

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&)[1][VEC]) const {
    M x[VEC], u[VEC];
    load<VEC>(at_row(gate, a, s_gate), a.n, x);
    load<VEC>(at_row(up, a, s_up), a.n, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = f.value(x[k], a, k) * u[k];
    store<VEC>(at_row(out, a, s_out), a.n, x);
  }
};

// dgate = g up f'(gate), dup = g f(gate), and the terms g up df/dp of the tile's reduction
template <class T, class F>
struct GluGradOp {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = F::NP;
  const T* g;
  const T* gate;
  const T* up;
  T* dgate;
  T* dup;
  int64_t s_g, s_gate, s_up, s_dgate, s_dup;
  F f;

  template <int VEC, int SUMS>
  static constexpr int min_blocks() { return F::template glu_blocks<VEC, SUMS>(); }

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&d)[NP][VEC]) const {
    M gv[VEC], x[VEC], u[VEC];
    load<VEC>(at_row(g, a, s_g), a.n, gv);
    load<VEC>(at_row(gate, a, s_gate), a.n, x);
    load<VEC>(at_row(up, a, s_up), a.n, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      M terms[NP];
      const M gu = gv[k] * u[k];
      const M dfdx = f.grad(x[k], a, k, terms);
      // 0 past n: gv is 0 there
#pragma unroll
      for (int p = 0; p < NP; ++p) d[p][k] = gu * terms[p];
      u[k] = gv[k] * f.value(x[k], a, k);
      x[k] = gu * dfdx;
    }
    store<VEC>(at_row(dgate, a, s_dgate), a.n, x);
    store<VEC>(at_row(dup, a, s_dup), a.n, u);
  }
};

template <int ACT, class T>
int glu_forward(const void* gate, const void* up, void* out, const int64_t* s, const void* beta,
                float beta_value, const fa_plan& p, void* stream) {
  using M = opmath_t<T>;
  const GluOp<T, ActMath<ACT, M>> op{static_cast<const T*>(gate), static_cast<const T*>(up),
                                     static_cast<T*>(out), s[0], s[1], s[2],
                                     {beta_of<M>(beta, beta_value, p)}};
  return run(op, p, stream, {{gate, sizeof(T)}, {up, sizeof(T)}, {out, sizeof(T)}}, nullptr, 0,
             {s[0], s[1], s[2]});
}

template <int ACT, class T>
int glu_backward(const void* g, const void* gate, const void* up, void* dgate, void* dup,
                 const int64_t* s, const void* beta, float beta_value, void* partial,
                 const fa_plan& p, void* stream) {
  using M = opmath_t<T>;
  const GluGradOp<T, ActMath<ACT, M>> op{
      static_cast<const T*>(g), static_cast<const T*>(gate), static_cast<const T*>(up),
      static_cast<T*>(dgate), static_cast<T*>(dup), s[0], s[1], s[2], s[3], s[4],
      {beta_of<M>(beta, beta_value, p)}};
  return run(op, p, stream,
             {{g, sizeof(T)}, {gate, sizeof(T)}, {up, sizeof(T)}, {dgate, sizeof(T)},
              {dup, sizeof(T)}},
             static_cast<M*>(partial), 0, {s[0], s[1], s[2], s[3], s[4]});
}

}  // namespace fused_act

using namespace fused_act;

extern "C" int fa_act_forward(const void* x, void* y, int dtype, int act, const void* beta,
                              float beta_value, fa_plan plan, void* stream) {
  return dispatch_act_dtype(act, dtype, [&](auto a, auto t) {
    return act_forward<decltype(a)::value, decltype(t)>(x, y, beta, beta_value, plan, stream);
  });
}

extern "C" int fa_act_backward(const void* g, const void* x, void* dx, int dtype, int act,
                               const void* beta, float beta_value, void* partial, fa_plan plan,
                               void* stream) {
  return dispatch_act_dtype(act, dtype, [&](auto a, auto t) {
    return act_backward<decltype(a)::value, decltype(t)>(g, x, dx, beta, beta_value, partial,
                                                         plan, stream);
  });
}

extern "C" int fa_glu_forward(const void* gate, const void* up, void* out, const int64_t* strides,
                              int dtype, int act, const void* beta, float beta_value,
                              fa_plan plan, void* stream) {
  return dispatch_act_dtype(act, dtype, [&](auto a, auto t) {
    return glu_forward<decltype(a)::value, decltype(t)>(gate, up, out, strides, beta, beta_value,
                                                        plan, stream);
  });
}

extern "C" int fa_glu_backward(const void* g, const void* gate, const void* up, void* dgate,
                               void* dup, const int64_t* strides, int dtype, int act,
                               const void* beta, float beta_value, void* partial, fa_plan plan,
                               void* stream) {
  return dispatch_act_dtype(act, dtype, [&](auto a, auto t) {
    return glu_backward<decltype(a)::value, decltype(t)>(g, gate, up, dgate, dup, strides, beta,
                                                         beta_value, partial, plan, stream);
  });
}

extern "C" const char* fa_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
