// An activation with its beta as tile.cuh's ops take it (ActMath), and the dispatch over the
// run-time activation id: shared by the plain and gated activations (elementwise.cu) and the
// activation after a per-channel affine (batchnorm.cu).
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
