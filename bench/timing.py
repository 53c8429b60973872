"""How the benchmark times a call: GPU time from CUDA-graph replays, host time apart.

Activations are short, memory-bound kernels, so on a GPU a host timer would mostly measure
Python, launches and the autograd engine; replaying a captured graph leaves only the kernels'
time, and the host's share is measured on its own by ``host_overhead``.  The capture rules
(one side stream for every timed call, autograd graphs built on it) live here once, for the
runner, the compile pipelines and the tuning and launch scripts alike.  On the CPU the same
calls fall back to host timers, so the whole benchmark runs without a GPU.
"""

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import fused_act

GRAPH_ELEMENTS = 2**27  # a timed CUDA graph repeats a call until it covers this many elements
# where the tensors of a run timed on a device live, where not on that device: the test suite's
# stand-in for a GPU runs every "cuda" code path of the benchmark on CPU tensors
TENSOR_DEVICE: dict[str, str] = {}

# host-timed calls per ``time_ms`` on the CPU, quick and full: there the times only stand in for a
# GPU's, and a run that checks the code paths alone (the test suite's) may take one call
CPU_CALLS = {True: 3, False: 10}

_side: list[torch.cuda.Stream] = []


def side_stream() -> torch.cuda.Stream:
    """The one side stream that runs every timed call on a GPU: graphs are captured on it, and
    autograd graphs whose backward is timed are built on it, since a backward replays on its
    forward's stream and a capture must not touch any other."""
    if not _side:
        _side.append(torch.cuda.Stream())
    return _side[0]


def tensor_device(device: str) -> str:
    """The device of the tensors of a run timed on ``device``: the one place the benchmark
    turns one into the other, so that a stand-in for a GPU can keep the tensors on the CPU."""
    return TENSOR_DEVICE.get(device, device)


def time_ms(fn: Callable, n: int, quick: bool, device: str = "cuda") -> float:
    """Median time of one call in ms: on a GPU from replays of a CUDA graph of ``reps`` calls,
    so that host overhead (Python, launches, the autograd engine) does not hide the kernels'
    time; on the CPU from host timers."""
    if device != "cuda":
        fn()
        times = []
        for _ in range(CPU_CALLS[quick]):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    import triton.testing
    reps = max(1, min(50, GRAPH_ELEMENTS // n))
    side = side_stream()
    side.wait_stream(torch.cuda.default_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(reps):
            fn()
    ms = triton.testing.do_bench(graph.replay, warmup=10 if quick else 25,
                                 rep=40 if quick else 100, return_mode="median")
    del graph
    return ms / reps


def peak_mb(fn: Callable, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def build_on_stream(device: str):
    """Where to build an autograd graph whose backward ``time_ms`` will capture: the side
    stream on a GPU, nowhere special on the CPU."""
    return torch.cuda.stream(side_stream()) if device == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def compile_mode(key: str, mode: str) -> Iterator[None]:
    """``fused_act.config.compile_mode`` as ``{key: mode}`` (every other op at its default) for
    the duration, restored after: what a compiled contestant or block is traced and run under."""
    previous = fused_act.config.compile_mode
    fused_act.config.compile_mode = {key: mode}
    try:
        yield
    finally:
        fused_act.config.compile_mode = previous


def host_overhead(device: str, n: int = 2**10, iters: int = 300) -> dict[str, float]:
    """Microseconds per eager forward+backward call on a tiny tensor, fused_act vs PyTorch.

    fused_act is timed under each backend that really runs ``device`` tensors: on a GPU the
    Triton and (where built) CUDA kernels, elsewhere what "auto" runs there (on a CPU its
    kernels, or the reference where they cannot be built).
    Never the Triton interpreter: its figures say nothing of a GPU.  Each label names the
    implementation and the device."""
    x = torch.randn(n, device=tensor_device(device), requires_grad=True)
    g = torch.ones_like(x)
    names = ["auto"]
    if device == "cuda":
        names = ["triton"] + (["cuda"] if fused_act.backend.cuda_status()[0] else [])
    calls = []
    for backend_name in names:
        runs = fused_act.backend.resolve(torch.device(device), backend_name)
        label = f"fused_act.mish [{runs}" + (", auto" if backend_name == "auto" else "")
        calls.append((f"{label}, {device}]", fused_act.mish, backend_name))
    calls.append((f"F.mish [torch, {device}]", F.mish, "reference"))
    result = {}
    for label, fn, backend_name in calls:
        with fused_act.use_backend(backend_name):
            for _ in range(20):
                torch.autograd.grad(fn(x), x, g)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.autograd.grad(fn(x), x, g)
            _sync(device)
        result[label] = (time.perf_counter() - t0) / iters * 1e6
    return result


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
