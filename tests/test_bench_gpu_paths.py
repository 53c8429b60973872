"""The benchmark's GPU code paths on the CPU, through a stand-in for the GPU.

A GPU runs the benchmark only during a short lease, so a Python error or a changed torch or
Triton API in a ``device == "cuda"`` branch (CUDA-graph timing on the side stream, do_bench,
the memory statistics, the CUDA labels of the host overhead, the choice of contestants, the
GPU sizes of the pipelines, ``python -m bench``'s GPU path) would otherwise first show there.
The stand-in answers the torch.cuda and triton.testing calls the benchmark makes on the CPU,
each refusing any call its real counterpart's signature refuses, while the tensors stay on the
CPU (``bench.timing.TENSOR_DEVICE``) and the Triton kernels run under the interpreter.  It
holds a few of the rules a real capture enforces: no synchronization, ``empty_cache`` or
nested capture during a capture, no capture on the default stream, no replay of a graph not
captured.
"""

import collections
import contextlib
import inspect
import json
import statistics
import subprocess
import sys
import time
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_act

from .cases import need_device

GPU_NAME = "Stand-in GPU (CPU tensors)"
COMPILE_BACKEND = "aot_eager"  # Inductor's C++ compiles would take most of the run on a CPU


def _bind(real, *args, **kwargs) -> None:
    """Raise TypeError where ``real`` would refuse these arguments (a renamed or removed one)."""
    inspect.signature(real).bind(*args, **kwargs)


class _Record(TorchDispatchMode):
    """Records every op run while it is active, as a capture records kernels."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # a compiled function keeps running its compiled graph, as in a real capture (else
        # torch.compile runs it eagerly under the mode, frame by frame: minutes of Triton's
        # interpreter)
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


class StandIn:
    """The GPU the benchmark is shown, and what it was asked (``calls``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import triton.testing

        self.calls: collections.Counter[str] = collections.Counter()
        self.capturing: object | None = None
        stand = self

        class Stream:
            def __init__(self, *args, **kwargs) -> None:
                _bind(real.Stream, *args, **kwargs)

            def wait_stream(self, *args, **kwargs) -> None:
                _bind(real.Stream.wait_stream, self, *args, **kwargs)
                stand.calls["wait_stream"] += 1

            def synchronize(self, *args, **kwargs) -> None:
                _bind(real.Stream.synchronize, self, *args, **kwargs)
                stand.no_capture("Stream.synchronize")
                stand.calls["stream_synchronize"] += 1

        class CUDAGraph:
            def __init__(self, *args, **kwargs) -> None:
                _bind(real.CUDAGraph, *args, **kwargs)
                self.ops: list | None = None

            def replay(self, *args, **kwargs) -> None:
                _bind(real.CUDAGraph.replay, self, *args, **kwargs)
                stand.no_capture("CUDAGraph.replay")
                if self.ops is None:
                    raise RuntimeError("stand-in: replay of a graph that was never captured")
                stand.calls["replay"] += 1
                # the recorded ops alone: no Python, no autograd engine, as a replay
                with torch.no_grad():
                    for func, args, kw in self.ops:
                        func(*args, **kw)

        @contextlib.contextmanager
        def graph(*args, **kwargs):
            _bind(real.graph, *args, **kwargs)
            bound = inspect.signature(real.graph).bind(*args, **kwargs).arguments
            cuda_graph, capture_stream = bound["cuda_graph"], bound.get("stream") or Stream()
            stand.no_capture("a nested capture")
            if capture_stream is stand.default:
                raise RuntimeError("stand-in: a capture on the default stream")
            ops: list = []
            previous, stand.current = stand.current, capture_stream
            stand.capturing = cuda_graph
            try:
                with _Record(ops):
                    yield
            finally:
                stand.capturing, stand.current = None, previous
            cuda_graph.ops = ops
            stand.calls["capture"] += 1

        @contextlib.contextmanager
        def stream(*args, **kwargs):
            _bind(real.stream, *args, **kwargs)
            (chosen,) = inspect.signature(real.stream).bind(*args, **kwargs).arguments.values()
            previous, stand.current = stand.current, chosen or stand.current
            stand.calls["stream"] += 1
            try:
                yield
            finally:
                stand.current = previous

        def answer(name, value=None, refused_in_capture=False):
            def fake(*args, **kwargs):
                _bind(getattr(real, name), *args, **kwargs)
                if refused_in_capture:
                    stand.no_capture(name)
                stand.calls[name] += 1
                return value() if callable(value) else value
            return fake

        def do_bench(*args, **kwargs):
            _bind(real_do_bench, *args, **kwargs)
            bound = inspect.signature(real_do_bench).bind(*args, **kwargs)
            bound.apply_defaults()
            assert bound.arguments["return_mode"] in ("min", "max", "mean", "median", "all")
            stand.calls["do_bench"] += 1
            times = []
            for _ in range(2):
                start = time.perf_counter()
                bound.arguments["fn"]()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)

        def cuda_status():
            stand.calls["cuda_status"] += 1
            return False, "stand-in: the CUDA C++ kernels cannot run CPU tensors"

        real = types.SimpleNamespace(**{name: getattr(torch.cuda, name) for name in (
            "Stream", "CUDAGraph", "graph", "stream", "current_stream", "default_stream",
            "synchronize", "get_device_name", "reset_peak_memory_stats", "memory_allocated",
            "max_memory_allocated", "empty_cache", "is_available")})
        real_do_bench = triton.testing.do_bench
        self.default = Stream()
        self.current = self.default
        fakes = dict(
            Stream=Stream, CUDAGraph=CUDAGraph, graph=graph, stream=stream,
            current_stream=answer("current_stream", lambda: stand.current),
            default_stream=answer("default_stream", self.default),
            synchronize=answer("synchronize", refused_in_capture=True),
            get_device_name=answer("get_device_name", GPU_NAME),
            reset_peak_memory_stats=answer("reset_peak_memory_stats", refused_in_capture=True),
            memory_allocated=answer("memory_allocated", 0),
            max_memory_allocated=answer("max_memory_allocated", 2**20),
            empty_cache=answer("empty_cache", refused_in_capture=True))
        for name, fake in fakes.items():
            monkeypatch.setattr(torch.cuda, name, fake)
        monkeypatch.setattr(triton.testing, "do_bench", do_bench)
        monkeypatch.setattr(fused_act.backend, "cuda_status", cuda_status)

        from bench import __main__ as cli
        from bench import timing
        monkeypatch.setitem(timing.TENSOR_DEVICE, "cuda", "cpu")
        # one call per graph: under the interpreter each call costs what a GPU's thousands do
        monkeypatch.setattr(timing, "GRAPH_ELEMENTS", 1)
        monkeypatch.setattr(timing, "_side", [])  # the side stream made here stays here
        # only the command line is told that there is a GPU: torch itself (torch.compile's
        # saving of the CUDA random state, fused_act's backend probes) must keep seeing none
        cuda_view = types.SimpleNamespace(**vars(torch.cuda))
        cuda_view.is_available = answer("is_available", True)
        torch_view = types.SimpleNamespace(**vars(torch))
        torch_view.cuda = cuda_view
        monkeypatch.setattr(cli, "torch", torch_view)

    def no_capture(self, what: str) -> None:
        if self.capturing is not None:
            raise RuntimeError(f"stand-in: {what} during a CUDA graph capture (operation not "
                               "permitted when stream is capturing)")


@pytest.fixture
def gpu(monkeypatch):
    """The stand-in for one test: monkeypatch undoes every change when the test ends."""
    need_device("cpu")
    return StandIn(monkeypatch)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpu_path_end_to_end(gpu, tmp_path, monkeypatch, capsys):
    """``python -m bench``'s GPU path, every op and contestant, tiny sizes, pipelines on.

    In fp16 alone: no code of the benchmark depends on the dtype, and fp32 and bf16 take the
    GPU path for every op in the lease's dry run below, and every contestant in the CPU path's
    test (tests/test_bench.py)."""
    from bench import __main__ as cli
    from bench import harness, pipelines, table
    # the GPU's block sizes shrunk to the CPU's: the code that picks them still runs
    monkeypatch.setitem(pipelines.MLP_SIZES, "full", pipelines.MLP_SIZES["cpu"])
    monkeypatch.setitem(pipelines.MODEL_INPUT, "full", pipelines.MODEL_INPUT["cpu"])
    # one whole model (resnet10t): efficientnet_b0 takes minutes under the interpreter, and
    # the CPU path's test runs it
    monkeypatch.setattr(pipelines, "MODELS", dict(list(pipelines.MODELS.items())[:1]))
    for kind in pipelines.BLOCK_SHAPES:
        monkeypatch.setitem(pipelines.BLOCK_SHAPES[kind], "full",
                            pipelines.BLOCK_SHAPES[kind]["cpu"])
    # host overhead timed in a few calls, not hundreds: the interpreter runs them
    overhead = harness.host_overhead
    monkeypatch.setattr(harness, "host_overhead", lambda device: overhead(device, iters=3))
    run = harness.run
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: run(
        *args, **kwargs, compile_backend=COMPILE_BACKEND))
    # the default results folder, bench/results/<gpu>/, under tmp_path
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "bench" / "__main__.py"))
    code = cli.main(["--sizes", "256", "--shapes", "2x4x4x4", "--dtypes", "fp16"])
    out = tmp_path / "bench" / "results" / "stand-in-gpu-cpu-tensors"
    result = json.loads((out / "results.json").read_text())
    assert result["errors"] == [], "\n".join(e["traceback"] for e in result["errors"])
    assert code == 0
    assert "| mish | float16 |" in capsys.readouterr().out

    info = result["env"]
    assert (info["gpu"], info["device"], info["interpreter"]) == (GPU_NAME, "cuda", False)
    # every GPU branch was taken: graphs captured on the side stream and replayed by do_bench,
    # peak memory read, the cache emptied after each case, the CUDA kernels asked for
    calls = gpu.calls
    assert calls["capture"] == calls["do_bench"] > 0 and calls["replay"] >= calls["capture"]
    assert calls["wait_stream"] == calls["capture"] and calls["stream_synchronize"] > 0
    assert calls["max_memory_allocated"] > 0 and calls["empty_cache"] > 0
    assert calls["cuda_status"] > 0 and calls["is_available"] > 0
    assert calls["get_device_name"] > 0
    assert all(isinstance(r["peak_mb"], float) for r in result["rows"] if r["mode"] == "fwd+bwd")

    rows = result["rows"]
    assert {r["dtype"] for r in rows} == {"float16"}
    for op in table.OPS:
        # what the GPU path picks for this op: the CUDA C++ kernels asked for and refused
        names = set(table.contestants(op, COMPILE_BACKEND, "cuda"))
        assert names >= {"fused", "eager", "compile"} and "fused_cuda" not in names, op
        assert ("decompose" in names) == (table.OPS[op].compile_key is not None), op
        shapes = table.cases(op, [256], [(2, 4, 4, 4)], False)
        for c in names:
            for mode in harness.MODES:
                found = [r for r in rows if (r["op"], r["contestant"], r["mode"]) == (op, c, mode)]
                assert len(found) == len(shapes), (op, c, mode, len(found))
        assert {r["contestant"] for r in rows if r["op"] == op} == names | {"torch"}, op
    assert not [r for r in rows if r["contestant"] == "fused_cuda"]
    _check_quant_rows(rows, (out / "results.md").read_text(), result["peers"])
    assert set(result["host_overhead_us"]) == {"fused_act.mish [triton, cuda]",
                                               "F.mish [torch, cuda]"}

    blocks = {p["op"]: p["block"] for p in result["pipelines"]}
    assert set(blocks) == set(table.OPS) & set(pipelines.BLOCKS)
    assert blocks["mish"] == f"linear {pipelines.BLOCK_SHAPES['linear']['cpu']}"
    assert blocks["acon_c"] == f"conv {pipelines.BLOCK_SHAPES['conv']['cpu']}"
    assert blocks["swiglu"].startswith(f"mlp {pipelines.MLP_SIZES['cpu'][0]}")
    assert set(result["compile_mode_choice"]) == set(blocks)

    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "env" and {line["kind"] for line in lines[1:]} == {
        "case", "pipeline", "mlp_recompute", "models"}
    assert [r["variant"] for r in result["mlp_recompute"]] == [
        "eager torch", "fused, h kept", "fused, h recomputed"]
    assert sum((line.get("rows", []) for line in lines if line["kind"] == "case"), []) == rows
    # whole models: each model original and fused, one SGD step on the GPU path (bf16 autocast,
    # channels_last), each fused model checked against its original first
    models = result["models"]
    assert [(r["model"], r["way"]) for r in models] == [
        (m, w) for m in pipelines.MODELS for w in ("original", "fused")]
    assert all(r["swapped"] > 0 and r["ms"] > 0 and r["saved_mib"] > 0 for r in models)
    assert all(r["batch"] == list(pipelines.MODEL_INPUT["cpu"]) for r in models)
    assert all(isinstance(r["peak_mb"], float) for r in models)
    assert [line["rows"] for line in lines if line["kind"] == "models"] == [models]
    md = (out / "results.md").read_text()
    assert f"# fused_act on {GPU_NAME}" in md and "compile pipelines" in md
    original, fused = models
    batch = "x".join(map(str, pipelines.MODEL_INPUT["cpu"]))
    assert "## Whole models" in md and (
        f"| {fused['model']} | {batch} | fused | {fused['swapped']} | {fused['ms']:.4f} "
        f"| {fused['saved_mib']:.2f} | {fused['peak_mb']:.0f} "
        f"| {fused['ms'] / original['ms']:.2f} "
        f"| {fused['saved_mib'] / original['saved_mib']:.2f} |") in md
    assert (out / "bandwidth.png").exists()


def _check_quant_rows(rows: list[dict], md: str, peers: dict[str, str]) -> None:
    """The FP8 rows of ``bench.quant`` as the GPU path times them at 256 output elements:
    fused, eager and compiled forward only, each a fraction of the copy of the bytes it must
    move (inputs read, one-byte codes and the scales written); peers absent with a reason; their
    own section of results.md."""
    from bench import quant
    got = [r for r in rows if r["op"] in quant.QUANT]
    assert {(r["op"], r["contestant"], r["mode"]) for r in got} == {
        (name, c, m) for name in quant.QUANT
        for c, m in (("torch", "copy"), ("fused", "forward"), ("eager", "forward"),
                     ("compile", "forward"))}
    for r in got:
        if r["mode"] == "copy":
            continue
        layout, scaling = quant.QUANT[r["op"]]
        reads = quant.LAYOUTS[layout].reads
        scales = {"row": 4, "tensor": 4, "block": 256 // 32}[scaling]  # one row of 256
        assert (r["n"], r["scaling"], r["out_dtype"]) == (256, scaling, "float8_e4m3fn")
        assert r["gbps"] * r["ms"] * 1e6 == pytest.approx(reads * 256 * 2 + 256 + scales)
        assert isinstance(r["peak_mb"], float)
    assert {"vllm", "liger"} <= set(peers) and peers["vllm"].startswith("absent")
    assert "## Activation fused with FP8 quantisation" in md
    assert "| swiglu_fp8_block | block |" in md


def test_stand_in_is_scoped():
    """After a test with the stand-in, torch, Triton, fused_act and the benchmark are their own
    again (run after it in this file)."""
    import triton.testing

    from bench import __main__ as cli
    from bench import timing
    assert timing.TENSOR_DEVICE == {} and cli.torch is torch
    assert all(getattr(torch.cuda, name).__module__.startswith("torch.cuda") for name in (
        "Stream", "CUDAGraph", "graph", "stream", "synchronize", "empty_cache"))
    assert triton.testing.do_bench.__module__ == "triton.testing"
    assert fused_act.backend.cuda_status.__module__ == "fused_act.backend"
    assert not any(type(s).__module__ == __name__ for s in timing._side)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lease_command_dry_run(gpu, tmp_path, monkeypatch):
    """``bench/gpu_run.py``, the one command of a GPU lease, end to end at tiny sizes: every
    stage runs (the tests collected only, the extension not built), every planned case is
    timed, and its files turn into results as they would after a lease."""
    from bench import gpu_run, quant, table
    monkeypatch.setitem(gpu_run.DEADLINES, "measure", 10**6)  # the interpreter is slow
    out = tmp_path / "out"
    assert gpu_run.main(["--dry-run", "--out", str(out)]) == 0
    log = (out / "run.log").read_text()
    assert "FAILED" not in log, log

    # the two test selections split the cuda-marked suite: each test in exactly one
    collected = {}
    for name in ("triton", "rest"):
        last = (out / f"tests_{name}.log").read_text().strip().splitlines()[-1]
        collected[name] = int(last.split("/")[0])
    every = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "--co", "-q",
                            "-p", "no:cacheprovider"], capture_output=True, text=True,
                           cwd=gpu_run.ROOT).stdout.strip().splitlines()[-1]
    assert sum(collected.values()) == int(every.split("/")[0]) and min(collected.values()) > 0

    # every planned case timed, every op in fp32 and bf16, the compiled rows; timed calls
    plan = gpu_run.plan(dry=True)
    assert {(op, d) for op, d, _, only in plan if only == gpu_run.MAIN} == {
        (op, d) for op in table.OPS for d in ("fp32", "bf16")}
    lines = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    cases = [ln for ln in lines if ln["kind"] == "case"]
    assert len(cases) == len(plan) and not [ln for ln in lines if ln["kind"] == "error"]
    rows = [r for c in cases for r in c["rows"]]
    assert {r["contestant"] for r in rows} == {"torch", "fused", "eager", "compile"}
    assert f"bench: {len(rows)} timed calls, 0 cases failed" in log

    extra = [json.loads(ln) for ln in (out / "extra.jsonl").read_text().splitlines()]
    ulp = [e for e in extra if e["kind"] == "ulp"]
    assert {(u["op"], u["dtype"]) for u in ulp} == {
        (op, d) for op, o in table.OPS.items() if o.traffic for d in ("fp16", "bf16")}
    assert all(sum(u["output"]) == sum(u["output_f64"]) == u["n_out"]
               and sum(u["grad"]) == sum(u["grad_f64"]) == u["n"] for u in ulp)
    assert [e for e in extra if e["kind"] == "host_overhead"]
    for stage in ("profile", "overhead", "tune"):
        assert f"== {stage} done" in log

    result = gpu_run.collect(out, tmp_path / "results")
    assert len(result["rows"]) == len(rows)
    md = (tmp_path / "results" / "results.md").read_text()
    assert "| mish | float32 | 2^8 | forward |" in md and "ulps off" in md
    # the FP8 rows: every one with the kernels and eager, the compiled ones, in their section
    fp8 = {(r["op"], r["contestant"]) for r in rows if r["mode"] == "forward" and "scaling" in r}
    assert fp8 == {(name, c) for name in quant.QUANT for c in ("fused", "eager")} | {
        (name, "compile") for name in gpu_run.QUANT_COMPILED}
    assert "| swiglu_fp8_row | row | bfloat16 | 2^8 |" in md
    assert (tmp_path / "results" / "bandwidth.png").exists()
