"""The benchmark harness: ops, contestants, timing, correctness checks and result files.

Every op is timed forward, backward and forward+backward for the contestants ``fused``
(fused_act's Triton kernels), ``fused_cuda`` (its CUDA C++ kernels, where built or buildable),
``eager`` (PyTorch as users write it today: F.* or the plain formula) and ``compile``
(``torch.compile`` of that eager function).  Each contestant's output and input
gradient are checked against the reference before it is timed.  On a GPU times are medians of
CUDA-graph replays (GPU time, no host overhead), and memory-bound ops are also given as GB/s and
as a fraction of a device-to-device copy of the same bytes timed in the same run.  The same code
runs on the CPU (host timers, no memory figures), which is how the test suite exercises it.
"""

import datetime
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_act
from fused_act import reference, registry

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FULL_SIZES = [2**k for k in range(16, 29, 2)]
QUICK_SIZES = [2**20, 2**24, 2**26]
LAYER_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (64, 512, 14, 14), (8, 4096, 4096)]
GRAPH_ELEMENTS = 2**27  # a timed CUDA graph repeats a call until it covers this many elements
MODES = ("forward", "backward", "fwd+bwd")
CONTESTANTS = ("fused", "fused_cuda", "eager", "compile")
# the kernel backend each contestant runs under (forward and backward alike)
BACKEND_OF = {"fused_cuda": "cuda"}


def _flat(n: int) -> tuple[int, ...]:
    return (n,)


def _nchw(n: int) -> tuple[int, ...]:
    """n elements as (N, 64, H, H): 64 channels, 32 x 32 images from 2^16 elements up."""
    batch = max(1, n // 2**16)
    side = max(1, math.isqrt(n // batch // 64))
    return (batch, 64, side, side)


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    ``fused``, ``eager`` and ``ref`` take ``(x, *params)``; ``params(x)`` makes the other
    differentiable inputs (parameters, FReLU's t); ``traffic`` is the number of x-sized tensors
    a forward and a backward must read plus write (None: not a single memory-bound pass).
    ``ref_fp32``: check against the reference in fp32 (else in x's dtype: for a module whose
    convolution and BatchNorm round in that dtype before the max picks a side).
    """

    fused: Callable
    eager: Callable
    ref: Callable
    shape: Callable[[int], tuple[int, ...]] = _flat
    params: Callable[[torch.Tensor], list[torch.Tensor]] = lambda x: []
    traffic: tuple[int, int] | None = (2, 3)
    ref_fp32: bool = True


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def _channel(x: torch.Tensor, lo: float, hi: float, per_sample: bool = False) -> torch.Tensor:
    n, c = x.shape[:2]
    shape = (n, c) if per_sample else (c,)
    shape = shape + (1,) * (x.dim() - 2) if per_sample else (1, c) + (1,) * (x.dim() - 2)
    return _leaf(torch.empty(shape, device=x.device).uniform_(lo, hi))


def _acon_params(x: torch.Tensor, per_sample: bool = False) -> list[torch.Tensor]:
    return [_channel(x, -1.0, 1.5), _channel(x, -1.0, 0.5), _channel(x, 0.5, 1.5, per_sample)]


def _acon_eager(x, p1, p2, beta):
    dpx = (p1 - p2) * x
    return dpx * torch.sigmoid(beta * dpx) + p2 * x


def _frelu_params(x: torch.Tensor) -> list[torch.Tensor]:
    c = x.shape[1]
    return [_leaf(torch.randn(c, 1, 3, 3, device=x.device, dtype=x.dtype) * 0.3),
            _leaf(torch.ones(c, device=x.device, dtype=x.dtype)),
            _leaf(torch.zeros(c, device=x.device, dtype=x.dtype))]


def _frelu_t(x, w, bn_w, bn_b):
    t = F.conv2d(x, w, padding=1, groups=x.shape[1])
    return F.batch_norm(t, None, None, bn_w, bn_b, training=True)


def _elementwise(spec: registry.Spec) -> Op:
    """A registry activation; one with a beta times its learnable one-element beta."""
    if spec.beta:
        return Op(spec.call, spec.torch_fn, spec.forward,
                  params=lambda x: [_leaf(torch.ones(1, device=x.device))])
    return Op(spec.call, spec.torch_fn, lambda x, s=spec: s.forward(x, 1.0))


OPS: dict[str, Op] = {
    **{s.name + ("_beta" if s.beta else ""): _elementwise(s) for s in registry.SPECS.values()},
    "acon_c": Op(fused_act.acon_c, _acon_eager, reference.acon_c, _nchw, _acon_params),
    "meta_acon": Op(fused_act.acon_c, _acon_eager, reference.acon_c, _nchw,
                    lambda x: _acon_params(x, per_sample=True)),
    # forward reads x and t, writes y; backward reads grad (and a 1-byte code), writes dx and dt
    "frelu_max": Op(fused_act.frelu_max, torch.maximum, reference.frelu_max, _nchw,
                    lambda x: [_leaf(torch.randn_like(x))], (3, 3)),
    "frelu_module": Op(lambda x, *p: fused_act.frelu_max(x, _frelu_t(x, *p)),
                       lambda x, *p: torch.max(x, _frelu_t(x, *p)),
                       lambda x, *p: reference.frelu_max(x, _frelu_t(x, *p)), _nchw,
                       _frelu_params, None, ref_fp32=False),
}


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = TOL[dtype]
    return bool(torch.allclose(out.double(), want.double(), rtol=tol, atol=tol, equal_nan=True))


# ---- timing ----------------------------------------------------------------------------------

_side: list[torch.cuda.Stream] = []


def _stream() -> torch.cuda.Stream:
    """The one side stream that runs every timed call on a GPU: graphs are captured on it, and
    autograd graphs whose backward is timed are built on it, since a backward replays on its
    forward's stream and a capture must not touch any other."""
    if not _side:
        _side.append(torch.cuda.Stream())
    return _side[0]


def _time_ms(fn: Callable, n: int, quick: bool, device: str = "cuda") -> float:
    """Median time of one call in ms: on a GPU from replays of a CUDA graph of ``reps`` calls,
    so that host overhead (Python, launches, the autograd engine) does not hide the kernels'
    time; on the CPU from host timers."""
    if device != "cuda":
        fn()
        times = []
        for _ in range(3 if quick else 10):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    import triton.testing
    reps = max(1, min(50, GRAPH_ELEMENTS // n))
    side = _stream()
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


def _peak_mb(fn: Callable, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _build_on_stream(device: str):
    return torch.cuda.stream(_stream()) if device == "cuda" else _nullcontext()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- one case ----------------------------------------------------------------------------------

_compiled: dict[tuple[str, str], Callable] = {}


def contestants(name: str, compile_backend: str = "inductor", device: str = "cuda"
                ) -> dict[str, Callable]:
    """fused, fused_cuda (on a GPU where the CUDA kernels can run), eager and compiled
    callables of op ``name`` (one compiled function per op)."""
    op = OPS[name]
    key = (name, compile_backend)
    if key not in _compiled:
        _compiled[key] = torch.compile(op.eager, backend=compile_backend)
    found = {"fused": op.fused}
    if device == "cuda" and fused_act.backend.cuda_status()[0]:
        found["fused_cuda"] = op.fused
    return {**found, "eager": op.eager, "compile": _compiled[key]}


def _inputs(op: Op, shape: tuple[int, ...], dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(math.prod(shape) % 2**31)
    x = (torch.randn(shape, generator=gen) * 4).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    torch.manual_seed(0)
    params = op.params(x)
    return x, g, params


def check(name: str, fn: Callable, x: torch.Tensor, g: torch.Tensor,
          params: list[torch.Tensor]) -> None:
    """Raise unless ``fn`` gives the reference's output and input gradient."""
    op = OPS[name]
    xg = x.detach().clone().requires_grad_()
    y = fn(xg, *params)
    (dx,) = torch.autograd.grad(y, xg, g)
    dtype = torch.float32 if op.ref_fp32 else x.dtype
    xr = x.detach().to(dtype).requires_grad_()
    want = op.ref(xr, *[p.detach().to(dtype) for p in params])
    (want_dx,) = torch.autograd.grad(want, xr, g.to(dtype))
    for what, got, ref in (("output", y, want), ("input gradient", dx, want_dx)):
        if not _close(got, ref, x.dtype):
            raise AssertionError(f"{name} {x.dtype} {tuple(x.shape)}: {what} differs from the "
                                 "reference")


def bench_case(name: str, dtype: torch.dtype, shape: tuple[int, ...], quick: bool,
               device: str = "cuda", compile_backend: str = "inductor") -> list[dict]:
    """Every contestant and mode for one op, dtype and shape: result rows, copy row first."""
    op = OPS[name]
    n = math.prod(shape)
    b = torch.finfo(dtype).bits // 8
    x, g, params = _inputs(op, shape, dtype, device)
    src, dst = torch.empty_like(x), torch.empty_like(x)
    copy_ms = _time_ms(lambda: dst.copy_(src), n, quick, device)
    copy_gbps = 2 * n * b / copy_ms / 1e6
    base = dict(op=name, dtype=str(dtype).replace("torch.", ""), n=n, shape=list(shape))
    rows = [dict(base, mode="copy", contestant="torch", ms=copy_ms, gbps=copy_gbps,
                 frac_copy=1.0, peak_mb=None)]
    for cname, fn in contestants(name, compile_backend, device).items():
        with fused_act.use_backend(BACKEND_OF.get(cname, "triton")):
            check(name, fn, x, g, params)
            timed = _time_modes(fn, x, g, params, n, quick, device)
        for mode, ms, peak in timed:
            row = dict(base, mode=mode, contestant=cname, ms=ms, gbps=None, frac_copy=None,
                       peak_mb=peak)
            if op.traffic is not None:
                tensors = {"forward": op.traffic[0], "backward": op.traffic[1],
                           "fwd+bwd": sum(op.traffic)}[mode]
                row["gbps"] = tensors * n * b / ms / 1e6
                row["frac_copy"] = row["gbps"] / copy_gbps
            rows.append(row)
    return rows


def _time_modes(fn: Callable, x: torch.Tensor, g: torch.Tensor, params: list[torch.Tensor],
                n: int, quick: bool, device: str) -> list[tuple[str, float, float | None]]:
    """(mode, median ms, peak MB of fwd+bwd or None) for forward, backward and both."""
    xg = x.detach().clone().requires_grad_()
    inputs = [xg, *params]
    with _build_on_stream(device):
        y = fn(xg, *params)
    with torch.no_grad():
        fwd = _time_ms(lambda: fn(x, *params), n, quick, device)
    bwd = _time_ms(lambda: torch.autograd.grad(y, inputs, g, retain_graph=True), n, quick, device)

    def both():
        return torch.autograd.grad(fn(xg, *params), inputs, g)

    return [("forward", fwd, None), ("backward", bwd, None),
            ("fwd+bwd", _time_ms(both, n, quick, device), _peak_mb(both, device))]


# ---- host overhead -----------------------------------------------------------------------------

def host_overhead(device: str, n: int = 2**10, iters: int = 300) -> dict[str, float]:
    """Microseconds per eager forward+backward call on a tiny tensor, fused_act vs PyTorch.

    fused_act is timed under each backend that really runs ``device`` tensors: on a GPU the
    Triton and (where built) CUDA kernels, elsewhere what "auto" runs there, the reference.
    Never the Triton interpreter: its figures say nothing of a GPU.  Each label names the
    implementation and the device."""
    x = torch.randn(n, device=device, requires_grad=True)
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


# ---- runs and result files ---------------------------------------------------------------------

def env(device: str) -> dict:
    """What the figures were measured on."""
    import triton
    try:
        # safe.directory: the checkout may belong to another user (a copied tree on a GPU host)
        commit = subprocess.run(["git", "-c", "safe.directory=*", "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})"
    # on a CPU the Triton kernels run under the interpreter: their times say nothing of a GPU
    interpreter = device == "cpu" and fused_act.backend.interpreting()
    return dict(gpu=gpu, device=device, torch=torch.__version__, triton=triton.__version__,
                interpreter=interpreter, cuda=torch.version.cuda,
                python=platform.python_version(), commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def run(ops: list[str], dtypes: list[str], sizes: list[int], shapes: list[tuple[int, ...]],
        quick: bool, out: Path, device: str = "cuda", compile_backend: str = "inductor",
        pipelines: bool = True) -> dict:
    """Time every case and the compile pipelines; write results.json, results.md and plots."""
    # the fused contestant is always the kernels; compiled backwards must allow retain_graph
    # (timing a backward repeats it), so buffer donation is off: compile's peak memory may read
    # a little high
    import torch._functorch.config as functorch_config

    from bench import pipelines as pipes
    with fused_act.use_backend("triton"), functorch_config.patch(donated_buffer=False):
        return _run(pipes, ops, dtypes, sizes, shapes, quick, out, device, compile_backend,
                    pipelines)


def _run(pipes, ops, dtypes, sizes, shapes, quick, out, device, compile_backend, pipelines):
    info = env(device)
    rows: list[dict] = []
    for name in ops:
        op = OPS[name]
        cases = [op.shape(n) for n in sizes] + [s for s in shapes if len(s) > 1 or
                                                op.shape is _flat]
        for dname in dtypes:
            for shape in cases:
                rows.extend(bench_case(name, DTYPES[dname], shape, quick, device,
                                       compile_backend))
                if device == "cuda":
                    torch.cuda.empty_cache()
    result = dict(env=info, rows=rows, host_overhead_us=host_overhead(device))
    if pipelines:
        result["pipelines"] = pipes.run(ops, device, quick, compile_backend)
        result["compile_mode_choice"] = pipes.choose(result["pipelines"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(rows, out)
    return result


def _size(n: int) -> str:
    k = math.log2(n)
    return f"2^{int(k)}" if k == int(k) else str(n)


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    """The tables: per op, dtype, shape and mode, and the compile pipelines."""
    info, rows = result["env"], result["rows"]
    by = {(r["op"], r["dtype"], tuple(r["shape"]), r["mode"], r["contestant"]): r for r in rows}
    overhead = ", ".join(f"{k} {v:.1f} us" for k, v in result["host_overhead_us"].items())
    fused = "the Triton kernels" + (" under Triton's CPU interpreter (not GPU figures)"
                                    if info.get("interpreter") else "")
    lines = [
        f"# fused_act on {info['gpu']}", "",
        f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit "
        f"{info['commit']}, {info['date']}. Fractions are of a device-to-device copy of the same "
        "bytes timed in the same run; GPU times are medians of CUDA-graph replays (GPU time, no "
        f"host overhead: that is the next line). fused: {fused}; cuda: the CUDA C++ kernels.",
        "",
        f"Host time per eager forward+backward on 2^10 elements: {overhead}", "",
        "| op | dtype | shape | mode | fused ms | fused / copy | cuda / copy | eager / copy "
        "| compile / copy | vs eager | vs compile | peak MB fused / eager / compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, dtype, shape, mode, c), r in by.items():
        if c != "fused":
            continue
        e, k = by[(op, dtype, shape, mode, "eager")], by[(op, dtype, shape, mode, "compile")]
        cu = by.get((op, dtype, shape, mode, "fused_cuda"), {}).get("frac_copy")
        peaks = " / ".join(_fmt(x["peak_mb"], ".0f") for x in (r, e, k))
        shown = _size(r["n"]) if len(shape) == 1 else "x".join(map(str, shape))
        lines.append(
            f"| {op} | {dtype} | {shown} | {mode} | {r['ms']:.4f} | {_fmt(r['frac_copy'], '.2f')} "
            f"| {_fmt(cu, '.2f')} | {_fmt(e['frac_copy'], '.2f')} | "
            f"{_fmt(k['frac_copy'], '.2f')} | "
            f"{e['ms'] / r['ms']:.2f}x | {k['ms'] / r['ms']:.2f}x | "
            f"{peaks if mode == 'fwd+bwd' else ''} |")
    if "pipelines" in result:
        lines += ["", "## torch.compile pipelines (forward+backward of a block, ms)", "",
                  "| op | block | " + " | ".join(result["pipelines"][0]["ms"]) + " | choice |",
                  "|---|---|" + "---|" * (len(result["pipelines"][0]["ms"]) + 1)]
        for p in result["pipelines"]:
            lines.append(f"| {p['op']} | {p['block']} | "
                         + " | ".join(f"{v:.4f}" for v in p["ms"].values())
                         + f" | {result['compile_mode_choice'][p['op']]} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], folder: Path) -> None:
    """GB/s against size, one panel per op and mode, a line per contestant and dtype, the copy
    of the same dtype dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    sweep = [r for r in rows if r["gbps"] is not None and len(r["shape"]) >= 1]
    ops = sorted({r["op"] for r in sweep if r["op"] != "copy"})
    dtypes = sorted({r["dtype"] for r in sweep})
    if not ops:
        return
    colors = {c: f"C{i}" for i, c in enumerate(CONTESTANTS)}
    styles = dict(zip(dtypes, ("-", "-.", ":"), strict=False))
    fig, axes = plt.subplots(len(ops), len(MODES), figsize=(15, 3.4 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            for dtype in dtypes:
                copy = sorted({(r["n"], r["gbps"]) for r in sweep if r["op"] == op and
                               r["mode"] == "copy" and r["dtype"] == dtype})
                if copy:
                    ax.plot(*zip(*copy, strict=True), "k--", lw=0.8)
                for c in CONTESTANTS:
                    pts = sorted((r["n"], r["gbps"]) for r in sweep if r["op"] == op and
                                 r["mode"] == mode and r["contestant"] == c and
                                 r["dtype"] == dtype)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), styles.get(dtype, "-"), marker="o",
                                ms=3, color=colors[c], label=f"{c} {dtype}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode} (dashed: copy)")
            ax.set_xlabel("elements")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "bandwidth.png", dpi=90)
    plt.close(fig)
