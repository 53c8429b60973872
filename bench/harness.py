"""The benchmark runner: every case of every op, the compile pipelines, the result files.

Every op is timed forward, backward and forward+backward for the contestants ``fused``
(fused_act's Triton kernels), ``fused_cuda`` (its CUDA C++ kernels, where built or buildable),
``eager`` (PyTorch as users write it today: F.* or the plain formula), ``compile``
(``torch.compile`` of that eager function) and, for the gated ops, ``decompose``
(``torch.compile`` of our op with its compile mode "decompose") and ``liger`` (Liger-Kernel's
kernel, where importable; results.json's ``peers`` says which peers ran or why not).  Each
contestant runs on its own copies of the inputs.  This module only walks the cases and turns times
into rows, so that what is measured (``bench.table``), how it is timed (``bench.timing``) and
how it is shown (``bench.report``) each change in one place.  Memory-bound ops are also given as
GB/s and as a fraction of a device-to-device copy of the same bytes timed in the same run: the
fraction says how far a kernel is from the hardware, which a bare time does not.  The same code
runs on the CPU (host timers, no memory figures), which is how the test suite exercises it.

A run is long and its GPU lease short, so each case (op, dtype, shape) and each op's pipeline
is appended to ``results.jsonl`` as soon as it is measured, and one that raises is reported,
recorded in ``errors`` and skipped: a crash or a timeout loses only the case it was in.
"""

import contextlib
import datetime
import json
import math
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import torch

import fused_act
from bench import pipelines as pipes
from bench import quant
from bench.report import markdown, plot
from bench.table import (
    BACKEND_OF,
    CONTESTANTS,
    DTYPES,
    MODES,
    OPS,
    cases,
    check,
    contestants,
    copies,
    make_inputs,
    peers,
)
from bench.timing import build_on_stream, host_overhead, peak_mb, tensor_device, time_ms

# the names other modules use (CONTESTANTS, MODES, OPS: re-exported from bench.table)
__all__ = ["CONTESTANTS", "MODES", "OPS", "bench_case", "env", "run"]


def bench_case(name: str, dtype: torch.dtype, shape: tuple[int, ...], quick: bool,
               device: str = "cuda", compile_backend: str = "inductor",
               only: Collection[str] | None = None) -> list[dict]:
    """Every contestant (or those of them named in ``only``) and mode for one op, dtype and
    shape: result rows, copy row first.  A row of ``bench.quant`` (an activation fused with
    FP8 quantisation) is timed there, forward only."""
    if name in quant.QUANT:
        return quant.bench_case(name, dtype, shape, quick, device, compile_backend, only)
    op = OPS[name]
    n = math.prod(shape)
    b = torch.finfo(dtype).bits // 8
    x, g, params = make_inputs(op, shape, dtype, tensor_device(device))
    src, dst = torch.empty_like(x), torch.empty_like(x)
    copy_ms = time_ms(lambda: dst.copy_(src), n, quick, device)
    copy_gbps = 2 * n * b / copy_ms / 1e6
    base = dict(op=name, dtype=str(dtype).replace("torch.", ""), n=n, shape=list(shape))
    rows = [dict(base, mode="copy", contestant="torch", ms=copy_ms, gbps=copy_gbps,
                 frac_copy=1.0, peak_mb=None)]
    for cname, fn in contestants(name, compile_backend, device).items():
        if only is not None and cname not in only:
            continue
        with fused_act.use_backend(BACKEND_OF.get(cname, "triton")):
            check(name, fn, x, g, params)
            timed = _time_modes(fn, *copies(x, params), g, n, quick, device)
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


def _time_modes(fn: Callable, x: torch.Tensor, params: list[torch.Tensor], g: torch.Tensor,
                n: int, quick: bool, device: str) -> list[tuple[str, float, float | None]]:
    """(mode, median ms, peak MB of fwd+bwd or None) for forward, backward and both."""
    xg = x.detach().clone().requires_grad_()
    inputs = [xg, *params]
    with build_on_stream(device):
        y = fn(xg, *params)
    with torch.no_grad():
        fwd = time_ms(lambda: fn(x, *params), n, quick, device)
    bwd = time_ms(lambda: torch.autograd.grad(y, inputs, g, retain_graph=True), n, quick, device)

    def both():
        return torch.autograd.grad(fn(xg, *params), inputs, g)

    return [("forward", fwd, None), ("backward", bwd, None),
            ("fwd+bwd", time_ms(both, n, quick, device), peak_mb(both, device))]


def env(device: str) -> dict:
    """What the figures were measured on."""
    import triton
    try:
        # safe.directory: the checkout may belong to another user (a source tree on a GPU machine)
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


def run(ops: list[str], dtypes: list[str], sizes: list[int],
        shapes: list[tuple[int, ...]] | None, quick: bool, out: Path, device: str = "cuda",
        compile_backend: str = "inductor", pipelines: bool = True) -> dict:
    """Time every case and, with ``pipelines``, the compile pipelines, the gated MLP block's
    ways (``pipelines.mlp_recompute``) and the whole models (``pipelines.model_steps``); write
    results.json, results.md and plots.

    Each op runs on ``table.cases``: ``sizes`` (its ``shape`` of that many elements) and the
    layer shapes ``shapes`` it takes, or where None its own (``table.layer_shapes``: LLM MLP
    shapes for the gated ops); a row of ``bench.quant`` on ``quant.cases``.  Each case and
    pipeline goes to ``out/results.jsonl`` as it is measured; one that raises is printed,
    recorded in the result's ``errors`` and skipped, so the caller decides what a failure
    means once everything else is written."""
    with settings():
        return _run(ops, dtypes, sizes, shapes, quick, out, device, compile_backend, pipelines)


@contextlib.contextmanager
def settings() -> Iterator[None]:
    """What every timed case runs under (``run``, and the lease's ``bench.gpu_run``)."""
    # the fused contestant is always the kernels; compiled backwards must allow retain_graph
    # (timing a backward repeats it), so buffer donation is off: compile's peak memory may read
    # a little high.  A compiled contestant keeps a graph per rank, static and dynamic sizes
    # and grad mode (the forward is also timed under no_grad): 8 for an elementwise op and
    # dtype over the default cases, already dynamo's default limit, past which it would
    # silently run eager.  The limit is raised to 32, and passing it is an error
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    with fused_act.use_backend("triton"), functorch_config.patch(donated_buffer=False), \
            dynamo_config.patch(recompile_limit=32, fail_on_recompile_limit_hit=True):
        yield


def _run(ops, dtypes, sizes, shapes, quick, out, device, compile_backend, pipelines):
    info = env(device)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    log.write_text("")  # this run's lines only, not a previous run's
    _log(log, kind="env", env=info)
    rows: list[dict] = []
    errors: list[dict] = []
    for name in ops:
        for dname in dtypes:
            dtype = DTYPES[dname]
            # the limit counts graphs per code object, which the gated rows' compiled
            # contestants share (one lambda each way): a fresh start per op and dtype
            torch._dynamo.reset()
            found = quant.cases if name in quant.QUANT else cases
            for shape in found(name, sizes, shapes, quick):
                record_case(log, rows, errors, name, dtype, shape, quick, device,
                            compile_backend)
    timed_quant = any(name in quant.QUANT for name in ops)
    result = dict(env=info, peers=peers(device) | (quant.peers(device) if timed_quant else {}),
                  rows=rows,
                  host_overhead_us=host_overhead(device), errors=errors)
    if pipelines:
        measured = []
        for name in dict.fromkeys(n for n in ops if n in OPS):
            try:
                found = pipes.run([name], device, quick, compile_backend)
            except Exception as e:  # noqa: BLE001 - as for a case
                errors.append(_failure(e, what="pipeline", op=name))
                _log(log, kind="error", **errors[-1])
            else:
                measured.extend(found)
                if found:
                    _log(log, kind="pipeline", op=name, pipelines=found)
        result["pipelines"] = measured
        result["compile_mode_choice"] = pipes.choose(measured)
        # the MLP block's ways, then the whole models: each recorded or failed as a case
        for key, measure, what, op in (("mlp_recompute", pipes.mlp_recompute, "mlp recompute",
                                        "swiglu"),
                                       ("models", pipes.model_steps, "models", "models")):
            try:
                result[key] = measure(device, quick)
            except Exception as e:  # noqa: BLE001 - as for a case
                errors.append(_failure(e, what=what, op=op))
                _log(log, kind="error", **errors[-1])
            else:
                _log(log, kind=key, rows=result[key])

    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(rows, out)
    return result


def record_case(log: Path, rows: list[dict], errors: list[dict], name: str, dtype: torch.dtype,
                shape: tuple[int, ...], quick: bool, device: str, compile_backend: str,
                only: Collection[str] | None = None) -> list[dict] | None:
    """``bench_case`` into ``rows`` and a "case" line of ``log``; a case that raises goes to
    ``errors`` and an "error" line instead (None), and the run goes on."""
    where = dict(op=name, dtype=str(dtype).replace("torch.", ""), shape=list(shape))
    try:
        found = bench_case(name, dtype, shape, quick, device, compile_backend, only)
    except Exception as e:  # noqa: BLE001 - one case's failure must not end the run
        errors.append(_failure(e, what="case", **where))
        _log(log, kind="error", **errors[-1])
        return None
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    rows.extend(found)
    _log(log, kind="case", **where, rows=found)
    return found


def _log(path: Path, **line: object) -> None:
    """Append one JSON line to ``path`` now (opened and closed each time, so that a run killed
    mid-case leaves every earlier line whole on disk)."""
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def _failure(e: Exception, **where: object) -> dict:
    """Print the exception that ended a case or pipeline and return its error entry: where it
    happened, the exception and its traceback (all a GPU lease's output may leave to debug)."""
    trace = "".join(traceback.format_exception(e))
    label = " ".join(str(v) for k, v in where.items() if k != "what")
    print(f"FAILED {where['what']} {label}, skipped:\n{trace}", file=sys.stderr, flush=True)
    return dict(where, error=f"{type(e).__name__}: {e}", traceback=trace)
