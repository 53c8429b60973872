// Host program for tests/test_csrc.py: evaluates csrc/activations.cuh (the CUDA kernels' math)
// on the CPU.  Reads "beta a p2 acon_beta" and then one x a line from stdin; writes, per x, in
// float and then in double, %.17g each: for every kernel activation id 0 .. N_ACT - 1 (the
// header's count, which the test checks against the registry) f(x), df/dx and df/dbeta through
// the generic selectors the kernels use, then ACON-C's value, dy/dx, dy/dp1, dy/dp2 and
// dy/dbeta.
#include <stdio.h>

#include <utility>

#include "activations.cuh"

using namespace fused_act;

template <class M, int... IDS>
void activations(M x, M beta, std::integer_sequence<int, IDS...>) {
  const auto one = [&](auto id) {
    const Grad2<M> d = act_bwd<decltype(id)::value>(x, beta);
    printf("%.17g %.17g %.17g ", double(act_fwd<decltype(id)::value>(x, beta)), double(d.dx),
           double(d.dparam));
  };
  (one(std::integral_constant<int, IDS>{}), ...);
}

template <class M>
void row(M x, M beta, M a, M p2, M acon_beta) {
  activations<M>(x, beta, std::make_integer_sequence<int, N_ACT>{});
  const AconGrad<M> ac = acon_c_bwd(x, a, p2, acon_beta);
  const M v[] = {acon_c_fwd(x, a, p2, acon_beta), ac.dx, ac.dp1, ac.dp2, ac.dbeta};
  for (M value : v) printf("%.17g ", double(value));
}

int main() {
  double beta, a, p2, acon_beta, x;
  if (scanf("%lf %lf %lf %lf", &beta, &a, &p2, &acon_beta) != 4) return 1;
  while (scanf("%lf", &x) == 1) {
    row<float>(float(x), float(beta), float(a), float(p2), float(acon_beta));
    row<double>(x, beta, a, p2, acon_beta);
    printf("\n");
  }
  return 0;
}
