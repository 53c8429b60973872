"""``python -m bench --cpu``: every op on CPU tensors, fused_act vs PyTorch, and two models.

What users get on a machine without a GPU: fused_act with backend "auto" on CPU tensors (the CPU
kernels, ``csrc/cpu.cpp``; the reference where they cannot be built) against PyTorch's own function
where one exists (``F.mish``, ``F.silu``, ``F.gelu`` both forms) or else the eager expression a
user would write (the table's eager contestant), for every op of ``bench.table.OPS``, forward,
backward and both, at each size, dtype and thread count (``torch.set_num_threads``), and the
forward of each FP8 row of ``bench.quant`` against its eager expression (on CPU tensors "auto"
runs the CPU kernels' fp32 activation, then their C++ quantiser: they have no fused FP8
output).  Each
contestant is checked against the reference first (``table.check``); times are medians of
repetitions interleaved between the two contestants, so that a change of load on a shared machine
hits both alike, and each row gives the ratio fused / torch.  Two model rows: timm's resnet10t with
Mish, one SGD step, swapped by ``fused_act.replace_activations`` vs the original with the same
weights; and a Llama-style MLP block, forward+backward, patched by ``fused_act.patch_gated_mlps``
vs the original, eager and under ``torch.compile``.  A model whose package is missing is skipped
with the reason.  Writes ``results.json`` and ``results.md`` to ``bench/results/cpu-<model>/``.
"""

import copy
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_act
from bench import quant
from bench.harness import env
from bench.table import DTYPES, MODES, OPS, check, copies, make_inputs


def _implementation() -> str:
    """What backend "auto" ran CPU tensors with, as the table's header names it."""
    if fused_act.backend.resolve(torch.device("cpu"), "auto") == "cpu":
        return "the CPU kernels (csrc/cpu.cpp)"
    return f"the reference (CPU kernels: {fused_act.backend.cpu_status()[1]})"


SIZES = [2**16, 2**22]
THREADS = [1, 2]
REPS = 9
# a model's step varies more between repetitions than one op (allocations, many kernels on a
# shared machine): its rows take this many times the ops' repetitions
MODEL_REPS_FACTOR = 4
# the models' sizes: resnet10t's batch (N, 3, H, W); the MLP's (tokens, hidden, intermediate)
RESNET_INPUT = (2, 3, 64, 64)
MLP_SIZE = (512, 256, 688)
COMPILE_LIMIT_S = 60.0
NOTE = ("Absolute times depend on what else the machine runs: read the ratios (each row's "
        "contestants were interleaved, so load hits both).")


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo, or what platform says elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def results_dir() -> Path:
    return Path(__file__).parent / "results" / f"cpu-{slug(cpu_model())}"


def torch_label(name: str) -> str:
    """What the torch contestant of op ``name`` is: PyTorch's function, or an eager
    expression."""
    fn = OPS[name].eager
    if name == "gelu_tanh":
        return "F.gelu(tanh)"
    module, fname = getattr(fn, "__module__", "") or "", getattr(fn, "__name__", "")
    if module in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{fname}"
    if module == "torch" and fname != "<lambda>":
        return f"torch.{fname}"
    return "eager expression"


# a timed sample runs a call this long at least (repeated in a loop): one call of a small op
# takes tens of microseconds, near the timer's and the scheduler's noise
MIN_SAMPLE_MS = 2.0


def interleaved(calls: dict[str, Callable], reps: int) -> dict[str, float]:
    """Median ms of each call over ``reps`` rounds, each round timing every one in turn (after
    two warm-up calls each, the second of which sets how many calls one sample loops over: as
    many as take ``MIN_SAMPLE_MS``)."""
    loops = {}
    for k, fn in calls.items():
        fn()
        t0 = time.perf_counter()
        fn()
        loops[k] = max(1, math.ceil(MIN_SAMPLE_MS / max((time.perf_counter() - t0) * 1e3,
                                                        1e-6)))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(loops[k]):
                fn()
            times[k].append((time.perf_counter() - t0) * 1e3 / loops[k])
    return {k: statistics.median(v) for k, v in times.items()}


def op_case(name: str, dtype: torch.dtype, n: int, reps: int) -> list[dict]:
    """One op, dtype and size at the current thread count: a row per mode."""
    op = OPS[name]
    x, g, params = make_inputs(op, op.shape(n), dtype, "cpu")
    fns = {"fused": op.fused, "torch": op.eager}
    for fn in fns.values():
        check(name, fn, x, g, params)
    plain, built = {}, {}
    for k, fn in fns.items():
        xc, ps = copies(x, params)
        plain[k] = (xc, ps)
        xg = xc.detach().clone().requires_grad_()
        built[k] = (fn, xg, [xg, *ps], fn(xg, *ps))

    def forward(k):
        fn, (xc, ps) = fns[k], plain[k]
        return lambda: fn(xc, *ps)

    def backward(k):
        _, _, inputs, y = built[k]
        return lambda: torch.autograd.grad(y, inputs, g, retain_graph=True)

    def both(k):
        fn, xg, inputs, _ = built[k]
        return lambda: torch.autograd.grad(fn(xg, *inputs[1:]), inputs, g)

    rows = []
    for mode, make in zip(MODES, (forward, backward, both), strict=True):
        with torch.no_grad() if mode == "forward" else torch.enable_grad():
            ms = interleaved({k: make(k) for k in fns}, reps)
        rows.append(dict(op=name, dtype=str(dtype).replace("torch.", ""), n=n,
                         shape=list(x.shape), threads=torch.get_num_threads(), mode=mode,
                         torch=torch_label(name), fused_ms=ms["fused"], torch_ms=ms["torch"],
                         ratio=ms["fused"] / ms["torch"]))
    return rows


def quant_case(name: str, dtype: torch.dtype, n: int, reps: int) -> list[dict]:
    """One FP8 row of ``bench.quant`` (n output elements) at the current thread count: the
    forward, fused_act against the eager expression, each checked first."""
    x, params = quant.make_inputs(name, quant.LAYOUTS[quant.QUANT[name][0]].shape(n), dtype,
                                  "cpu")
    found = quant.contestants(name, device="cpu")
    fns = {"fused": found["fused"], "torch": found["eager"]}
    with torch.no_grad():
        for fn in fns.values():
            quant.check(name, fn, x, params)
        ms = interleaved({k: lambda f=fn: f(x, *params) for k, fn in fns.items()}, reps)
    return [dict(op=name, dtype=str(dtype).replace("torch.", ""), n=n, shape=list(x.shape),
                 threads=torch.get_num_threads(), mode="forward",
                 torch="eager expression (amax, cast)", fused_ms=ms["fused"],
                 torch_ms=ms["torch"], ratio=ms["fused"] / ms["torch"])]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max()) / scale
    if not err <= tol:
        raise AssertionError(f"{what}: fused_act's model differs from the original by {err:.2e}")


def resnet_row(reps: int, shape: tuple[int, ...] = RESNET_INPUT) -> dict:
    """timm resnet10t (act_layer="mish"): one SGD step (forward, cross entropy, backward,
    step), swapped vs original from the same weights."""
    import timm
    torch.manual_seed(0)
    original = timm.create_model("resnet10t", pretrained=False, act_layer="mish",
                                 num_classes=10)
    fused = copy.deepcopy(original)
    swapped = len(fused_act.replace_activations(fused).swapped)
    if not swapped:
        raise AssertionError("replace_activations swapped nothing in resnet10t")
    x = torch.randn(shape)
    target = torch.randint(0, 10, (shape[0],))
    outs = []
    for m in (original, fused):
        y = m(x)
        outs.append((y, torch.autograd.grad(F.cross_entropy(y, target), list(m.parameters()))))
    _close(outs[1][0], outs[0][0], "resnet10t output")
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        _close(a, b, "resnet10t parameter gradient", 1e-3)

    def step(m: torch.nn.Module) -> Callable:
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), target).backward()
            opt.step()
        return run

    ms = interleaved({"fused": step(fused), "torch": step(original)}, reps)
    return dict(model="timm resnet10t (mish)", what=f"SGD step, fp32 {'x'.join(map(str, shape))}",
                swapped=swapped, fused_ms=ms["fused"], torch_ms=ms["torch"],
                ratio=ms["fused"] / ms["torch"])


def mlp_rows(reps: int, size: tuple[int, int, int] = MLP_SIZE, compile_backend: str = "inductor",
             compile_limit_s: float = COMPILE_LIMIT_S) -> list[dict]:
    """transformers' LlamaMLP (hidden, intermediate; tokens of x): forward+backward, patched by
    ``patch_gated_mlps`` vs original from the same weights, eager and compiled."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaMLP
    tokens, hidden, intermediate = size
    torch.manual_seed(0)
    original = LlamaMLP(transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=1,
                                                 num_key_value_heads=1,
                                                 intermediate_size=intermediate))
    holder = torch.nn.Sequential(copy.deepcopy(original))  # a model's block, not the model
    swapped = len(fused_act.patch_gated_mlps(holder).swapped)
    fused = holder[0]
    if not swapped:
        raise AssertionError("patch_gated_mlps swapped nothing in LlamaMLP")
    x = torch.randn(1, tokens, hidden)
    g = torch.randn(1, tokens, hidden)
    what = f"forward+backward, fp32, {tokens} tokens, {hidden} -> {intermediate}"

    def step(m: Callable, params: list[torch.Tensor]) -> Callable:
        xg = x.clone().requires_grad_()
        return lambda: (y := m(xg), torch.autograd.grad(y, [xg, *params], g))

    def measure(models: dict[str, Callable]) -> dict:
        got = {k: step(m, list(p.parameters()))() for k, (m, p) in models.items()}
        _close(got["fused"][0], got["torch"][0], "Llama MLP output")
        for a, b in zip(got["fused"][1], got["torch"][1], strict=True):
            _close(a, b, "Llama MLP gradient", 1e-3)
        return interleaved({k: step(m, list(p.parameters())) for k, (m, p) in models.items()},
                           reps)

    base = dict(model="Llama MLP block", swapped=swapped)
    ms = measure({"fused": (fused, fused), "torch": (original, original)})
    rows = [dict(base, what=f"eager {what}", fused_ms=ms["fused"], torch_ms=ms["torch"],
                 ratio=ms["fused"] / ms["torch"])]
    compiled = {k: (torch.compile(m, backend=compile_backend), m)
                for k, m in (("fused", fused), ("torch", original))}
    t0 = time.perf_counter()
    for m, p in compiled.values():  # the first call compiles, forward and backward
        step(m, list(p.parameters()))()
        if time.perf_counter() - t0 > compile_limit_s:
            break
    seconds = time.perf_counter() - t0
    name = f"torch.compile ({compile_backend})"
    if seconds > compile_limit_s:
        rows.append(dict(base, what=f"{name} {what}", fused_ms=None, torch_ms=None, ratio=None,
                         skipped=f"compiling took {seconds:.0f} s (over {compile_limit_s:.0f} "
                                 "s): not timed"))
    else:
        ms = measure(compiled)
        rows.append(dict(base, what=f"{name} {what}", fused_ms=ms["fused"],
                         torch_ms=ms["torch"], ratio=ms["fused"] / ms["torch"],
                         compile_s=seconds))
    return rows


def _failure(e: Exception, **where: object) -> dict:
    trace = "".join(traceback.format_exception(e))
    print(f"FAILED {where}, skipped:\n{trace}", file=sys.stderr, flush=True)
    return dict(where, error=f"{type(e).__name__}: {e}", traceback=trace)


def run(out: Path | None = None, ops: list[str] | None = None, dtypes: list[str] | None = None,
        sizes: list[int] | None = None, threads: list[int] | None = None, reps: int = REPS,
        models: bool = True, resnet_input: tuple[int, ...] = RESNET_INPUT,
        mlp_size: tuple[int, int, int] = MLP_SIZE, compile_backend: str = "inductor",
        label: str = "CPU", note: str = NOTE, verbose: bool = True) -> dict:
    """The CPU table: every case at every thread count, then the model rows; writes
    ``results.json`` and ``results.md`` to ``out`` (default ``results_dir()``)."""
    import json

    from bench.report import cpu_markdown
    out = out or results_dir()
    ops = ops or [*OPS, *quant.QUANT]
    dtypes = dtypes or ["fp32", "bf16"]
    sizes = sizes or SIZES
    threads = threads or THREADS
    model_reps = MODEL_REPS_FACTOR * reps
    info = dict(env("cpu"), cpu=cpu_model(), label=label, cores=os.cpu_count(),
                threads=threads, reps=reps, model_reps=model_reps, min_sample_ms=MIN_SAMPLE_MS,
                backend="auto", note=note)
    rows: list[dict] = []
    model_rows: list[dict] = []
    errors: list[dict] = []
    previous = torch.get_num_threads()
    try:
        with fused_act.use_backend("auto"):
            for t in threads:
                torch.set_num_threads(t)
                for name in ops:
                    for dname in dtypes:
                        for n in sizes:
                            try:
                                case = quant_case if name in quant.QUANT else op_case
                                found = case(name, DTYPES[dname], n, reps)
                            except Exception as e:  # noqa: BLE001 - one case must not end the run
                                errors.append(_failure(e, what="case", op=name, dtype=dname,
                                                       n=n, threads=t))
                                continue
                            rows.extend(found)
                            if verbose:
                                print(f"{t} threads {name} {dname} {n}: " + ", ".join(
                                    f"{r['mode']} {r['ratio']:.2f}" for r in found), flush=True)
                if not models:
                    continue
                for what, make in (("resnet10t", lambda: [resnet_row(model_reps,
                                                                      resnet_input)]),
                                   ("llama mlp", lambda: mlp_rows(model_reps, mlp_size,
                                                                  compile_backend))):
                    try:
                        found = make()
                    except ImportError as e:
                        found = [dict(model=what, skipped=f"not installed: {e}")]
                    except Exception as e:  # noqa: BLE001 - as for a case
                        errors.append(_failure(e, what="model", op=what, threads=t))
                        continue
                    for r in found:
                        r["threads"] = t
                    model_rows.extend(found)
                    if verbose:
                        print(f"{t} threads {what}: "
                              + ", ".join(f"{r.get('ratio') or r.get('skipped')}"
                                          for r in found), flush=True)
    finally:
        torch.set_num_threads(previous)
    info["implementation"] = _implementation()  # after the runs: a failed build shows here
    result = dict(env=info, rows=rows, models=model_rows, errors=errors)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(cpu_markdown(result))
    return result
