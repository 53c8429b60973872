"""``python -m bench.launches``: kernel launches and GPU time of one forward+backward of the
ACON modules, fused vs the plain PyTorch module (the formula written with torch ops)."""

import torch
from torch.profiler import ProfilerActivity, profile

import fused_act
from bench.pipelines import AconC as PlainAconC
from bench.timing import side_stream, time_ms


def count_kernels(step) -> int:
    """CUDA kernels launched by ``step()`` (memsets and copies not counted)."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower())


def main() -> None:
    shape = (32, 64, 112, 112)
    print(f"ACON-C forward+backward on {shape}, parameter grads included")
    print(f"{'module':<22} {'dtype':<9} {'kernels':>8} {'GPU ms':>9} {'of copy':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
        g = torch.randn_like(x)
        src, dst = torch.empty_like(x), torch.empty_like(x)
        # forward+backward moves 5 tensors of x's size (x twice, y, grad, dx): 2.5 copies
        copy_ms = 2.5 * time_ms(lambda: dst.copy_(src), x.numel(), False)  # noqa: B023
        for name, module in (("plain PyTorch", PlainAconC(64)), ("fused_act.nn.AconC",
                                                                fused_act.nn.AconC(64))):
            module = module.to("cuda", dtype)  # parameters in x's dtype, as a bf16 model has
            params = list(module.parameters())

            def step(module=module, params=params, x=x, g=g):
                return torch.autograd.grad(module(x), [x, *params], g)

            kernels = count_kernels(step)
            with torch.cuda.stream(side_stream()):
                ms = time_ms(step, x.numel(), False)
            print(f"{name:<22} {str(dtype)[6:]:<9} {kernels:>8} {ms:>9.3f} {copy_ms / ms:>8.2f}")


if __name__ == "__main__":
    main()
