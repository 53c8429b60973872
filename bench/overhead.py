"""``python -m bench.overhead``: where the host time of one eager call goes, on a tiny tensor.

Prints microseconds per call for each layer of the eager path, from a bare Triton launch up to
forward+backward through autograd, next to PyTorch's own op, so a regression in any layer shows.
"""

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_act
from bench.timing import tensor_device
from fused_act import ops, plan
from fused_act.kernels import kernels
from fused_act.registry import KERNEL_IDS
from fused_act.triton_kernels import elementwise, tiling

MISH = KERNEL_IDS["mish"]  # the kernel activation timed


def per_call_us(fn: Callable, iters: int = 2000) -> float:
    """Median over 5 rounds of the mean host time per call, device synchronized at the ends."""
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / iters * 1e6)
    return sorted(rounds)[2]


def main(iters: int = 2000) -> None:
    """Print each layer's host time per call (``iters`` calls a round)."""
    x = torch.randn(2**10, device=tensor_device("cuda"))
    xg = x.clone().requires_grad_()
    y = torch.empty_like(x)
    g = torch.ones_like(x)
    p = plan.flat(x.numel(), plan.SCALAR)
    kernel = elementwise.act_fwd_kernel
    rows = {
        "torch.empty_like": lambda: torch.empty_like(x),
        "F.mish forward": lambda: F.mish(x),
        "triton launch (fwd kernel)": lambda: kernel[p.grid](
            x, y, x, 1.0, p.rows, p.cols, p.channels, ACT=MISH, BETA_MODE=0, BLOCK_R=1,
            BLOCK_L=p.block_l, FLAT=True, INT64=False, num_warps=tiling.NUM_WARPS),
        "elementwise.forward": lambda: elementwise.forward(x, y, MISH, None, 1.0, p),
        "ops.forward_impl": lambda: ops.forward_impl(x, "mish", None, 1.0, "triton"),
        "fused_act.mish forward": lambda: fused_act.mish(x),
        "custom op forward": lambda: ops.activation_op(x, "mish", None, 1.0, "triton"),
        "F.mish fwd+bwd": lambda: torch.autograd.grad(F.mish(xg), xg, g),
        "fused_act.mish fwd+bwd": lambda: torch.autograd.grad(fused_act.mish(xg), xg, g),
    }
    if fused_act.backend.cuda_status()[0]:
        def cuda_backend(fn):
            def call():
                with fused_act.use_backend("cuda"):
                    return fn()
            return call
        cuda = kernels("cuda")
        rows["cuda kernels: act_forward"] = lambda: cuda.act_forward(x, y, MISH, None, 1.0, p)
        rows["fused_act.mish forward (cuda)"] = cuda_backend(lambda: fused_act.mish(x))
        rows["fused_act.mish fwd+bwd (cuda)"] = cuda_backend(
            lambda: torch.autograd.grad(fused_act.mish(xg), xg, g))
    for name, fn in rows.items():
        print(f"{name:<28} {per_call_us(fn, iters):8.1f} us", flush=True)


if __name__ == "__main__":
    main()
