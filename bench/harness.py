"""The benchmark harness: contestants, timing, correctness checks and result files."""

import datetime
import json
import math
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_act
from fused_act import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FULL_SIZES = [2**k for k in range(16, 29, 2)]
QUICK_SIZES = [2**20, 2**24, 2**26]
GRAPH_ELEMENTS = 2**27  # a timed CUDA graph repeats a call until it covers this many elements


@dataclass(frozen=True)
class Op:
    """An op as each contestant runs it; ``params`` makes its parameters for an input."""

    fused: Callable
    torch_fn: Callable
    params: Callable = lambda x: []


def _beta(x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.ones(1, device=x.device, requires_grad=True)]


OPS: dict[str, Op] = {
    "mish": Op(lambda x: fused_act.mish(x), F.mish),
    "silu": Op(lambda x: fused_act.silu(x), F.silu),
    "swish_beta": Op(lambda x, b: fused_act.swish(x, b), lambda x, b: x * torch.sigmoid(b * x),
                     _beta),
    "gelu": Op(lambda x: fused_act.gelu(x), F.gelu),
    "gelu_tanh": Op(lambda x: fused_act.gelu(x, "tanh"),
                    lambda x: F.gelu(x, approximate="tanh")),
}


def _reference(name: str, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    if name == "swish_beta":
        return reference.swish(x, params[0])
    return {"mish": reference.mish, "silu": reference.silu, "gelu": reference.gelu,
            "gelu_tanh": lambda t: reference.gelu(t, "tanh")}[name](x)


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = TOL[dtype]
    return bool(torch.allclose(out.double(), want.double(), rtol=tol, atol=tol))


# ---- without a GPU ---------------------------------------------------------------------------

def run_without_gpu(ops: list[str], dtypes: list[str]) -> int:
    """Check every kernel through the interpreter against the reference; time host overhead."""
    print("No CUDA device: GPU timings need a GPU. Checking every kernel through Triton's "
          "interpreter against the reference instead.\n")
    print(f"{'op':<11} {'dtype':<5} {'forward':<8} {'backward':<8}")
    ok_all = True
    for name in ops:
        op = OPS[name]
        for dname in dtypes:
            dtype = DTYPES[dname]
            x = (torch.randn(2 * 2048 + 37, dtype=torch.float64) * 6).to(dtype).requires_grad_()
            params = op.params(x)
            g = torch.randn_like(x)
            with fused_act.use_backend("triton"):
                y = op.fused(x, *params)
                dx = torch.autograd.grad(y, x, g)[0]
            with fused_act.use_backend("reference"):
                y_ref = op.fused(x, *params)
                dx_ref = torch.autograd.grad(y_ref, x, g)[0]
            f_ok, b_ok = _close(y, y_ref, dtype), _close(dx, dx_ref, dtype)
            ok_all &= f_ok and b_ok
            verdict = [("ok" if ok else "FAIL").ljust(8) for ok in (f_ok, b_ok)]
            print(f"{name:<11} {dname:<5} {verdict[0]} {verdict[1]}")
    us_ours, us_torch = host_overhead("cpu")
    print(f"\nhost time per eager mish forward+backward on 2^10 CPU elements: fused_act "
          f"(reference backend) {us_ours:.1f} us, F.mish {us_torch:.1f} us")
    return 0 if ok_all else 1


def host_overhead(device: str, n: int = 2**10, iters: int = 300) -> tuple[float, float]:
    """Microseconds per eager forward+backward call on a tiny tensor: (fused_act, F.mish)."""
    x = torch.randn(n, device=device, requires_grad=True)
    g = torch.ones_like(x)
    result = []
    for fn in (fused_act.mish, F.mish):
        for _ in range(20):
            torch.autograd.grad(fn(x), x, g)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.autograd.grad(fn(x), x, g)
        _sync(device)
        result.append((time.perf_counter() - t0) / iters * 1e6)
    return result[0], result[1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- on a GPU --------------------------------------------------------------------------------

def _time_ms(fn: Callable, n: int, quick: bool) -> float:
    """Median GPU time of one call, from replays of a CUDA graph of ``reps`` calls, so that host
    overhead (Python, launches, the autograd engine) does not hide the kernels' time."""
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


_side: list[torch.cuda.Stream] = []


def _stream() -> torch.cuda.Stream:
    """The one side stream that runs every timed call: graphs are captured on it, and autograd
    graphs whose backward is timed are built on it, since a backward replays on its forward's
    stream and a capture must not touch any other."""
    if not _side:
        _side.append(torch.cuda.Stream())
    return _side[0]


def _peak_mb(fn: Callable) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_compiled: dict[str, Callable] = {}


def _contestants(name: str) -> dict[str, Callable]:
    # one compiled function per op: Inductor specializes per dtype and, after the second size,
    # compiles one dynamic-shape kernel, which keeps a full run's compile time bounded
    op = OPS[name]
    if name not in _compiled:
        _compiled[name] = torch.compile(op.torch_fn)
    return {"fused": op.fused, "eager": op.torch_fn, "compile": _compiled[name]}


def bench_case(name: str, dtype: torch.dtype, n: int, quick: bool) -> list[dict]:
    """All contestants and modes for one op, dtype and size; returns result rows."""
    op = OPS[name]
    b = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 4).to(device="cuda", dtype=dtype)
    g = torch.randn(n, generator=gen).to(device="cuda", dtype=dtype)
    params = op.params(x)
    src, dst = torch.empty_like(x), torch.empty_like(x)
    copy_ms = _time_ms(lambda: dst.copy_(src), n, quick)
    copy_gbps = 2 * n * b / copy_ms / 1e6
    rows = [dict(op="copy", dtype=str(dtype), n=n, mode="copy", contestant="torch", ms=copy_ms,
                 gbps=copy_gbps, frac_copy=1.0)]
    want = _reference(name, x, [p.detach() for p in params])
    xg = x.detach().clone().requires_grad_()
    for cname, fn in _contestants(name).items():
        with torch.no_grad():
            out = fn(x, *params)
        if not _close(out, want, dtype):
            raise AssertionError(f"{cname} {name} {dtype} n={n}: output differs from reference")
        for mode, ms, peak in _time_modes(fn, x, xg, params, g, n, quick):
            gbps = MODE_BYTES[mode] * n * b / ms / 1e6
            rows.append(dict(op=name, dtype=str(dtype), n=n, mode=mode, contestant=cname, ms=ms,
                             gbps=gbps, frac_copy=gbps / copy_gbps, peak_mb=peak))
    return rows


MODE_BYTES = {"forward": 2, "backward": 3, "fwd+bwd": 5}  # tensor-sized reads + writes


def _time_modes(fn: Callable, x: torch.Tensor, xg: torch.Tensor, params: list[torch.Tensor],
                g: torch.Tensor, n: int, quick: bool) -> list[tuple[str, float, float | None]]:
    """(mode, median ms, peak MB of fwd+bwd or None) for forward, backward and both."""
    inputs = [xg, *params]
    with torch.cuda.stream(_stream()):
        y = fn(xg, *params)
    with torch.no_grad():
        fwd = _time_ms(lambda: fn(x, *params), n, quick)
    bwd = _time_ms(lambda: torch.autograd.grad(y, inputs, g, retain_graph=True), n, quick)

    def both():
        return torch.autograd.grad(fn(xg, *params), inputs, g)

    return [("forward", fwd, None), ("backward", bwd, None),
            ("fwd+bwd", _time_ms(both, n, quick), _peak_mb(both))]


def _env() -> dict:
    import triton
    try:
        # safe.directory: the checkout may belong to another user (a copied tree on a GPU host)
        commit = subprocess.run(["git", "-c", "safe.directory=*", "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def run_gpu(ops: list[str], dtypes: list[str], sizes: list[int] | None, quick: bool,
            out: str | None) -> int:
    """Time every case, then write JSON, a markdown table and plots."""
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    env = _env()
    rows: list[dict] = []
    for name in ops:
        for dname in dtypes:
            for n in sizes:
                rows.extend(bench_case(name, DTYPES[dname], n, quick))
                torch.cuda.empty_cache()
    us_ours, us_torch = host_overhead("cuda")
    env["host_overhead_us"] = {"fused_act.mish": us_ours, "F.mish": us_torch}
    folder = Path(out) if out else Path(__file__).parent / "results" / _slug(env["gpu"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    table = markdown(env, rows)
    (folder / "results.md").write_text(table)
    plot(rows, folder)
    print(table)
    return 0


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _size(n: int) -> str:
    k = math.log2(n)
    return f"2^{int(k)}" if k == int(k) else str(n)


def markdown(env: dict, rows: list[dict]) -> str:
    """One line per op, dtype, size and mode: fraction of copy per contestant and speedups."""
    by = {(r["op"], r["dtype"], r["n"], r["mode"], r["contestant"]): r for r in rows}
    lines = [
        f"# fused_act on {env['gpu']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit "
        f"{env['commit']}, {env['date']}. Fractions are of a device-to-device copy of the same "
        "bytes timed in the same run; times are medians of CUDA-graph replays (GPU time, no "
        "host overhead; that is the line below).",
        "",
        "Host time per eager forward+backward on 2^10 elements: "
        + ", ".join(f"{k} {v:.1f} us" for k, v in env.get("host_overhead_us", {}).items()),
        "",
        "| op | dtype | n | mode | fused ms | fused / copy | eager / copy | compile / copy "
        "| vs eager | vs compile | peak MB fused / eager / compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, dtype, n, mode, c), r in by.items():
        if c != "fused":
            continue
        e, k = by[(op, dtype, n, mode, "eager")], by[(op, dtype, n, mode, "compile")]
        peaks = " / ".join(f"{x['peak_mb']:.0f}" for x in (r, e, k) if x["peak_mb"] is not None)
        lines.append(
            f"| {op} | {dtype.replace('torch.', '')} | {_size(n)} | {mode} | {r['ms']:.4f} | "
            f"{r['frac_copy']:.2f} | {e['frac_copy']:.2f} | {k['frac_copy']:.2f} | "
            f"{e['ms'] / r['ms']:.2f}x | {k['ms'] / r['ms']:.2f}x | "
            f"{peaks if mode == 'fwd+bwd' else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], folder: Path) -> None:
    """GB/s against size, one figure per op and mode, a line per contestant and dtype."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    ops = sorted({r["op"] for r in rows if r["op"] != "copy"})
    modes = ["forward", "backward", "fwd+bwd"]
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(15, 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for dtype in sorted({r["dtype"] for r in rows}):
                copy = sorted((r["n"], r["gbps"]) for r in rows
                              if r["op"] == "copy" and r["dtype"] == dtype)
                ax.plot(*zip(*copy, strict=True), "k--", lw=0.8)
                for c in ("fused", "eager", "compile"):
                    pts = sorted((r["n"], r["gbps"]) for r in rows if r["op"] == op and
                                 r["mode"] == mode and r["contestant"] == c and r["dtype"] == dtype)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", ms=3,
                                label=f"{c} {dtype.replace('torch.', '')}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode} (dashed: copy)")
            ax.set_xlabel("elements")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "bandwidth.png", dpi=90)
