"""``python -m bench.tune``: time the elementwise kernels at 2^26 elements over block sizes and
warp counts (GPU time from CUDA-graph replays), as a fraction of a copy of the same bytes."""

import itertools

import torch

from bench.timing import time_ms
from fused_act import plan
from fused_act.registry import KERNEL_IDS
from fused_act.triton_kernels import elementwise, tiling

N = 2**26
CONFIGS = list(itertools.product([1024, 2048, 4096], [4, 8]))


def main() -> None:
    print(f"{'act':<10} {'dtype':<9} {'pass':<4} " + " ".join(f"{b}/{w:<6}" for b, w in CONFIGS))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(N, device="cuda", dtype=dtype) * 4
        g, y = torch.randn_like(x), torch.empty_like(x)
        src, dst = torch.empty_like(x), torch.empty_like(x)
        copy_ms = time_ms(lambda: dst.copy_(src), N, True)  # noqa: B023
        for act, kind in itertools.product(KERNEL_IDS, ("fwd", "bwd")):
            fracs = []
            for block, warps in CONFIGS:
                tiling.NUM_WARPS = warps  # what num_warps() reads at each launch
                p = plan.Plan(1, N, 1, plan.SCALAR, 1, block)
                if kind == "fwd":
                    def run():
                        elementwise.forward(x, y, KERNEL_IDS[act], None, 1.0, p)  # noqa: B023
                    nbytes = 2
                else:
                    def run():
                        elementwise.backward(g, x, y, KERNEL_IDS[act], None, 1.0, None, p)  # noqa: B023
                    nbytes = 3
                fracs.append(nbytes / 2 * copy_ms / time_ms(run, N, True))
            print(f"{act:<10} {str(dtype)[6:]:<9} {kind:<4} "
                  + " ".join(f"{f:<11.3f}" for f in fracs))


if __name__ == "__main__":
    main()
