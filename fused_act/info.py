"""``python -m fused_act.info``: what fused_act can run on this machine, and why not."""

import platform

import torch

from . import __version__, backend


def report() -> str:
    """A few lines: versions, the device, each backend's availability and the reason."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    lines = [
        f"fused_act {__version__}, torch {torch.__version__}, triton {triton_version}, "
        f"python {platform.python_version()}",
        f"device: {device}",
        f"backend in force: {backend.get_backend()}",
    ]
    for name, (ok, why) in (("triton", backend.triton_status()),
                            ("cuda", backend.cuda_status()),
                            ("cpu", backend.cpu_status()),
                            ("reference", (True, "pure PyTorch, any device"))):
        lines.append(f"  {name:<9} {'yes' if ok else 'no ':<3}  {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
