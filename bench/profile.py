"""``python -m bench.profile``: the kernels whose bandwidth a lease found short, for the profiler.

Run under Nsight Compute (``bench/gpu_run.py`` does, where ``ncu`` is installed): each case is
warmed up outside the profiled region, then launched once inside it (``cudaProfilerStart`` /
``Stop``), in ``CASES`` order, so the profiler's rows follow that order.  The counters asked for
(``METRICS``) say why a memory-bound kernel misses the copy: DRAM throughput, achieved
occupancy, the registers that limit it, how busy the issue slots and the FMA and ALU pipes are,
and how long warps wait on memory.
"""

import sys

import torch

import fused_act
from bench import timing
from fused_act import ops

METRICS = [
    "gpu__time_duration.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__occupancy_limit_registers",
    "launch__grid_size",
    "launch__block_size",
    "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
]
N = 2**26
# (label, backend, activation, dtype, pass): one kernel launch each
CASES = [
    ("mish fp32 forward", "triton", "mish", torch.float32, "forward"),
    ("mish fp32 forward", "cuda", "mish", torch.float32, "forward"),
    ("mish bf16 forward", "triton", "mish", torch.bfloat16, "forward"),
    ("mish bf16 forward", "cuda", "mish", torch.bfloat16, "forward"),
    ("mish bf16 backward", "triton", "mish", torch.bfloat16, "backward"),
    ("gelu bf16 forward", "triton", "gelu", torch.bfloat16, "forward"),
    ("silu bf16 forward", "triton", "swish", torch.bfloat16, "forward"),
]


def main(n: int = N) -> int:
    """Warm every case up, then launch each once between profiler start and stop (on a GPU;
    the test suite runs the same calls through its stand-in GPU on CPU tensors, unprofiled)."""
    device = timing.tensor_device("cuda")
    backends = ["triton"] + (["cuda"] if fused_act.backend.cuda_status()[0] else [])
    calls = []
    for label, backend, act, dtype, kind in CASES:
        if backend not in backends:
            continue
        x = torch.randn(n, device=device, dtype=dtype) * 4
        g = torch.randn_like(x)
        if kind == "forward":
            def call(x=x, act=act, backend=backend):
                ops.forward_impl(x, act, None, 1.0, backend)
        else:
            def call(x=x, g=g, act=act, backend=backend):
                ops.backward_impl(g, x, act, None, 1.0, False, backend)
        call()
        calls.append((f"{label} [{backend}]", call))
    profiled = device == "cuda"
    if profiled:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for _, call in calls:
        call()
    if profiled:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    for i, (label, _) in enumerate(calls):
        print(f"profiled {i}: {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
