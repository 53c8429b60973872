// An activation with its beta as tile.cuh's ops take it (ActMath), ACON-C with its parameters
// (AconMath), and the dispatch over the run-time activation id: shared by the plain and gated
// activations (elementwise.cu), ACON-C and Meta-ACON (acon.cu) and the activation after a
// per-channel affine (batchnorm.cu).
#pragma once

#include <utility>

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

  // tile.cuh min_blocks: 64 registers spill for 16-bit vectors with sums of d/dbeta, and in the
  // gated backward (three inputs, two outputs) also for fp64 with sums and for 16-bit vectors
  // of an activation that reads beta, sums or not
  template <int VEC, int SUMS>
  static constexpr int grad_blocks() { return VEC >= 8 && SUMS != NO_SUMS ? 3 : MIN_BLOCKS; }
  template <int VEC, int SUMS>
  static constexpr int glu_blocks() {
    const bool sums = SUMS != NO_SUMS;
    return (VEC >= 8 && (sums || act_reads_beta<ACT>)) || (sizeof(M) == 8 && sums) ? 3
                                                                                  : MIN_BLOCKS;
  }

  __device__ __forceinline__ M value(M x, const At& a, int k) const {
    return act_fwd<ACT>(x, beta.at(a, k));
  }
  __device__ __forceinline__ M grad(M x, const At& a, int k, M (&terms)[1]) const {
    const Grad2<M> d = act_bwd<ACT>(x, beta.at(a, k));
    terms[0] = d.dparam;
    return d.dx;
  }
};

template <class M>
Beta<M> beta_of(const void* beta, float beta_value, const fa_plan& p) {
  return {static_cast<const M*>(beta), M(beta_value), p.layout};
}

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

// f(std::integral_constant<int, ACT>{}, T{}) for the run-time activation id and dtype
template <class F>
int dispatch_act_dtype(int act, int dtype, F&& f) {
  return dispatch_act(act, [&](auto a) {
    return dispatch_dtype(dtype, [&](auto t) { return f(a, t); });
  });
}

}  // namespace fused_act
