// Host program for tests/test_csrc.py: evaluates csrc/activations.cuh (the CUDA kernels' math)
// on the CPU.  Reads "beta a p2 acon_beta" and then one x a line from stdin; writes, per x, the
// values below in float and then in double, %.17g each.
#include <stdio.h>

#include "activations.cuh"

using namespace fused_act;

template <class M>
void row(M x, M beta, M a, M p2, M acon_beta) {
  const Grad2<M> sw = swish_bwd(x, beta);
  const AconGrad<M> ac = acon_c_bwd(x, a, p2, acon_beta);
  const M v[] = {mish_fwd(x),     mish_bwd(x),     swish_fwd(x, beta), sw.dx,
                 sw.dparam,       gelu_fwd(x),     gelu_bwd(x),        gelu_tanh_fwd(x),
                 gelu_tanh_bwd(x), acon_c_fwd(x, a, p2, acon_beta), ac.dx, ac.dp1,
                 ac.dp2,          ac.dbeta};
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
