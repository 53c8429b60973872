"""``python -m bench.tune``: time the elementwise kernels at 2^26 elements over block sizes and
warp counts (GPU time from CUDA-graph replays), as a fraction of a copy of the same bytes."""

import itertools
import sys

import torch

from bench.timing import tensor_device, time_ms
from fused_act import plan
from fused_act.registry import KERNEL_IDS
from fused_act.triton_kernels import elementwise, tiling

N = 2**26
CONFIGS = list(itertools.product([1024, 2048, 4096], [4, 8]))


def main(n: int = N, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)) -> None:
    """One line per activation, dtype and pass: the fraction of copy of each configuration."""
    device = tensor_device("cuda")
    print(f"{'act':<10} {'dtype':<9} {'pass':<4} " + " ".join(f"{b}/{w:<6}" for b, w in CONFIGS),
          flush=True)
    default = tiling.NUM_WARPS
    try:
        for dtype in dtypes:
            x = torch.randn(n, device=device, dtype=dtype) * 4
            g, y = torch.randn_like(x), torch.empty_like(x)
            src, dst = torch.empty_like(x), torch.empty_like(x)
            copy_ms = time_ms(lambda: dst.copy_(src), n, True)  # noqa: B023
            for act, kind in itertools.product(KERNEL_IDS, ("fwd", "bwd")):
                fracs = []
                for block, warps in CONFIGS:
                    tiling.NUM_WARPS = warps  # what num_warps() reads at each launch
                    p = plan.Plan(1, n, 1, plan.SCALAR, 1, block)
                    if kind == "fwd":
                        def run():
                            elementwise.forward(x, y, KERNEL_IDS[act], None, 1.0, p)  # noqa: B023
                        nbytes = 2
                    else:
                        def run():
                            elementwise.backward(  # noqa: B023
                                g, x, y, KERNEL_IDS[act], None, 1.0, None, p)  # noqa: B023
                        nbytes = 3
                    fracs.append(nbytes / 2 * copy_ms / time_ms(run, n, True))
                print(f"{act:<10} {str(dtype)[6:]:<9} {kind:<4} "
                      + " ".join(f"{f:<11.3f}" for f in fracs), flush=True)
    finally:
        tiling.NUM_WARPS = default


if __name__ == "__main__":
    sys.exit(main())
