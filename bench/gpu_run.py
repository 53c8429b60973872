"""``bash bench/gpu_run.sh``: everything one short GPU lease must learn, in one command.

A session that draws a GPU has minutes of device time, machine start included, so this runs
in about six minutes of wall time and writes what it learns under ``--out`` as it goes: a
timeout still returns every stage that finished and the cases measured so far.  The stages,
in priority order, each until its deadline (seconds from the start, ``DEADLINES``):

1. the CUDA C++ extension, built for this GPU's architecture alone in the background from
   the first second (parallel nvcc jobs; the package itself imports from the tree);
2. the cuda-marked tests of the Triton kernels (``TRITON_TESTS``), in parallel processes: they
   also fill Triton's cache, so no later stage waits on a compile;
3. the rest of the cuda-marked suite (backend "cuda", the reference, the models), once the
   extension is built;
4. ``measure`` (a fresh interpreter, whose deadline is enforced from outside): the ulp histograms
   of fp16/bf16 results against the fp32 result rounded by torch, the host overhead of an
   eager mish forward+backward, every op forward and backward in fp32 and bf16 at 2^26, at
   one LLM shape for the gated ops, the FP8 rows of ``bench.quant`` in bf16 at 8192 x 14336
   (their target's shape; peers too where importable), a few ``torch.compile`` rows, then at
   2^20, for fused Triton / fused CUDA / eager / copy, and last ``torch.compile`` of two FP8
   rows;
5. ``bench.profile`` under Nsight Compute: the counters that say why a kernel misses the copy;
6. ``bench.overhead``: the host time of an eager call, layer by layer;
7. ``bench.tune``: Triton's block sizes and warps on this GPU.

Files under ``--out`` (a lease returns at most 8): run.log (stages, times, summaries),
build.log, tests_triton.log, tests_rest.log, measure.log (tracebacks, the tuning table),
results.jsonl (the cases, as ``bench.harness`` writes them), extra.jsonl (ulp histograms, host
overhead), profile.log.  Back on a development machine,
``python -m bench.gpu_run --collect DIR --to bench/results/<gpu>`` turns them into
results.json, results.md and the plot.  ``--dry-run`` (the test suite's, on the CPU through
its stand-in GPU) runs the same stages at tiny sizes: the tests are only collected and the
extension not built.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# seconds from the start by which each stage must end: the whole command within 6 minutes.
# The H200 leases of 2026-12-04 took 295 s and 310 s; at these deadlines the measurement (147 s
# and 133 s there) may lose its last cases, the 2^20 ones, which matter least
DEADLINES = {"tests_triton": 100, "build": 110, "tests_rest": 180, "measure": 290,
             "profile": 315, "overhead": 335, "tune": 360}
# the cuda-marked tests that run the Triton kernels alone: no test in it needs the extension,
# and its complement is the rest of the suite (one -k expression each way, so none is lost)
TRITON_TESTS = "triton and not match_triton"
WORKERS = 14  # pytest processes of the 16 cores; the build takes the rest while it runs
SIZES = [2**26, 2**20]
MAIN = ("fused", "fused_cuda", "eager")  # timed on every case
# the rows that also time torch.compile of the eager function (each costs a compile)
COMPILED = [("mish", "bf16", 2**26), ("swish_beta", "bf16", 2**26), ("swiglu", "bf16", None),
            ("acon_c", "bf16", 2**26)]
# the FP8 rows (bench.quant) at the target's shape: the fused kernels, eager and the peers
# where importable on every row; torch.compile of the eager expression on these
QUANT_MAIN = (*MAIN, "vllm", "liger")
QUANT_COMPILED = ["swiglu_fp8_row", "swiglu_fp8_block"]
BUILD = Path("/tmp/fused_act_build")


class Lease:
    """The clock and the log of one run: every line goes to stdout and to run.log at once."""

    def __init__(self, out: Path, dry: bool, started_ago: float = 0.0) -> None:
        self.out, self.dry, self.t0 = out, dry, time.monotonic() - started_ago
        out.mkdir(parents=True, exist_ok=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def left(self, stage: str) -> float:
        return DEADLINES[stage] - self.now()

    def log(self, text: str) -> None:
        line = f"[{self.now():6.1f}s] {text}"
        print(line, flush=True)
        with (self.out / "run.log").open("a") as f:
            f.write(line + "\n")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Log a stage's start and end; an exception ends the stage, not the run."""
        start = self.now()
        self.log(f"== {name}")
        try:
            yield
        except Exception:  # noqa: BLE001 - a stage's failure must not cost the later stages
            self.log(f"{name} FAILED:\n{traceback.format_exc()}")
        self.log(f"== {name} done in {self.now() - start:.0f}s")


def _run_until(cmd: list[str], log: Path, seconds: float, env: dict | None = None) -> int:
    """Run ``cmd`` into ``log``; at ``seconds`` interrupt it (pytest then prints what ran),
    kill it 20 s later.  The return code, or -2 where it was interrupted."""
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        try:
            return proc.wait(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return -2


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def start_build(lease: Lease, arch: str) -> subprocess.Popen | None:
    """The extension for ``arch`` alone, built beside the tree into BUILD (copied into the
    package by ``finish_build``, so no test process sees it half-written)."""
    cmd = [sys.executable, "setup.py", "build_ext", "--build-temp", str(BUILD / "temp"),
           "--build-lib", str(BUILD / "lib")]
    env = dict(FUSED_ACT_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS="8")
    lease.log(f"build: {' '.join(cmd)} ({env})")
    if lease.dry:
        return None
    shutil.rmtree(BUILD, ignore_errors=True)
    return subprocess.Popen(cmd, stdout=(lease.out / "build.log").open("w"),
                            stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env})


def finish_build(lease: Lease, proc: subprocess.Popen | None) -> bool:
    """Wait for the build until its deadline; True where the extension is in the package."""
    if proc is None:
        return False
    try:
        rc = proc.wait(timeout=max(lease.left("build"), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        lease.log("build: past its deadline, killed")
        return False
    built = sorted((BUILD / "lib" / "fused_act").glob("_C*.so"))
    lease.log(f"build: exit {rc}, {[p.name for p in built]}")
    if rc != 0 or not built:
        return False
    shutil.copy2(built[0], ROOT / "fused_act" / built[0].name)
    return True


def tests(lease: Lease, name: str, expr: str, deadline: str, env: dict) -> None:
    """The cuda-marked tests selected by ``expr``, in parallel, until ``deadline``; the dry run
    collects them only."""
    log = lease.out / f"tests_{name}.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-k", expr, "-q", "-rfEs",
           "-p", "no:cacheprovider"]
    cmd += ["--co"] if lease.dry else ["-n", str(WORKERS)]
    # one compile thread a process: the parallelism is the processes'
    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1", **env}
    lease.log(f"tests {name}: {' '.join(cmd)} ({env})")
    rc = _run_until(cmd, log, lease.left(deadline), env)
    lease.log(f"tests {name}: exit {rc}{' (interrupted at its deadline)' if rc == -2 else ''}"
              f": {_last_line(log)}")


def profile(lease: Lease) -> None:
    """``bench.profile`` under Nsight Compute, its counters as CSV in profile.log; the dry run
    makes the same calls unprofiled."""
    from bench import profile as target
    if lease.dry:
        target.main(n=256)
        return
    found = [shutil.which("ncu")] + sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu")) \
        + sorted(Path("/usr/local").glob("cuda*/bin/ncu"))
    ncu = next((str(p) for p in found if p), None)
    if ncu is None:
        lease.log("profile: no ncu on this machine")
        return
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv",
           "--page", "raw", "--metrics", ",".join(target.METRICS), sys.executable, "-m",
           "bench.profile"]
    lease.log(f"profile: {' '.join(cmd)}")
    rc = _run_until(cmd, lease.out / "profile.log", lease.left("profile"))
    lease.log(f"profile: exit {rc}")


def gpu_arch() -> str:
    """This GPU's compute capability as TORCH_CUDA_ARCH_LIST spells it (9.0), read without
    creating a CUDA context in this process (the tests' processes need the memory)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    return out[0] if out else "9.0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_run")))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, tests collected only")
    p.add_argument("--measure", type=float, metavar="SECONDS", default=None,
                   help="stage 4 alone, in this process, the run having started SECONDS ago")
    p.add_argument("--collect", type=Path, help="a lease's --out folder, to turn into results")
    p.add_argument("--to", type=Path, help="with --collect: the results folder")
    args = p.parse_args(argv)
    if args.collect:
        collect(args.collect, args.to)
        return 0
    if not args.dry_run and shutil.which("nvidia-smi") is None:
        print("bench.gpu_run: no GPU here (no nvidia-smi); the test suite runs its stages on "
              "the CPU through a stand-in GPU (tests/test_bench_gpu_paths.py)", file=sys.stderr)
        return 2
    if args.measure is not None:
        measure(Lease(args.out, args.dry_run, args.measure))
        return 0
    lease = Lease(args.out, args.dry_run)
    with lease.stage("env"):
        lease.log(f"python {sys.version.split()[0]} at {sys.executable}; commit "
                  + subprocess.run(["git", "-c", "safe.directory=*", "rev-parse", "--short",
                                    "HEAD"], capture_output=True, text=True, cwd=ROOT
                                   ).stdout.strip())
        if shutil.which("nvidia-smi"):
            lease.log(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True
                                     ).stdout.strip())
    build = None
    with lease.stage("build start"):
        build = start_build(lease, gpu_arch())
    with lease.stage("tests_triton"):
        tests(lease, "triton", TRITON_TESTS, "tests_triton", {"FUSED_ACT_BUILD_CUDA": "0"})
    built = False
    with lease.stage("build"):
        built = finish_build(lease, build)
    with lease.stage("tests_rest"):
        # without the extension, backend "cuda" is skipped (said in the log), not built per test
        tests(lease, "rest", f"not ({TRITON_TESTS})", "tests_rest",
              {} if built else {"FUSED_ACT_BUILD_CUDA": "0"})
    with lease.stage("measure"):
        if lease.dry:
            measure(lease)
        else:
            # a fresh interpreter, whose deadline can be enforced from here
            cmd = [sys.executable, "-m", "bench.gpu_run", "--out", str(lease.out),
                   "--measure", f"{lease.now():.1f}"]
            rc = _run_until(cmd, lease.out / "measure.log", lease.left("measure") + 10,
                            {} if built else {"FUSED_ACT_BUILD_CUDA": "0"})
            lease.log(f"measure: exit {rc} (its tracebacks: measure.log)")
    with lease.stage("profile"):
        profile(lease)
    with lease.stage("overhead"):
        # where the host time of an eager call goes, layer by layer (bench.overhead)
        if lease.dry:
            from bench import overhead
            overhead.main(iters=2)
        else:
            rc = _run_until([sys.executable, "-m", "bench.overhead"], lease.out / "measure.log",
                            lease.left("overhead"))
            lease.log(f"overhead: exit {rc} (its table: measure.log)")
    with lease.stage("tune"):
        # Triton's block size and warps for this GPU (bench.tune), printed as they are timed
        if lease.dry:
            from bench import tune
            tune.main(n=4096, dtypes=(tune.torch.bfloat16,))
        else:
            rc = _run_until([sys.executable, "-m", "bench.tune"], lease.out / "measure.log",
                            lease.left("tune"))
            lease.log(f"tune: exit {rc} (its table: measure.log)")
    for name in ("triton", "rest"):
        log = lease.out / f"tests_{name}.log"
        if log.exists():
            lease.log(f"tests {name}: {_last_line(log)}")
    lease.log(f"all stages done in {lease.now():.0f}s")
    return 0


def plan(dry: bool) -> list[tuple[str, str, tuple[int, ...], tuple[str, ...]]]:
    """(op, dtype, shape, contestants) of every timed case, in the order they are timed: every
    op and dtype at the largest size, one LLM shape for the gated ops, the FP8 rows in bf16 at
    the target's shape, the compiled rows, the smaller sizes, then the compiled FP8 rows."""
    from bench import quant, table
    sizes = [256] if dry else SIZES
    cases = [(name, d, op.shape(n), MAIN) for n in sizes[:1] for name, op in table.OPS.items()
             for d in ("fp32", "bf16")]

    def llm(name: str) -> tuple[int, ...]:
        return table.OPS[name].shape(512) if dry else table.layer_shapes(name, True)[0]

    gated = [name for name, op in table.OPS.items() if op.compile_key]
    cases += [(name, d, llm(name), MAIN) for name in gated for d in ("fp32", "bf16")]

    def target(name: str) -> tuple[int, ...]:
        # quick: the target's shape alone (dry: 256 output elements alone)
        return quant.cases(name, [256], [], True)[0] if dry else quant.cases(name, [], None,
                                                                             True)[0]

    cases += [(name, "bf16", target(name), QUANT_MAIN) for name in quant.QUANT]
    for name, d, n in COMPILED:
        shape = llm(name) if n is None else table.OPS[name].shape(256 if dry else n)
        cases.append((name, d, shape, ("compile",)))
    cases += [(name, d, op.shape(n), MAIN) for n in sizes[1:] for name, op in table.OPS.items()
              for d in ("fp32", "bf16")]
    # last: a compile each, which the deadline may cut without losing a kernel's figure
    cases += [(name, "bf16", target(name), ("compile",)) for name in QUANT_COMPILED]
    return cases


def measure(lease: Lease) -> None:
    """Stage 4 in this process: ulp histograms, host overhead, the timed cases in ``plan``
    order until the deadline (each written to results.jsonl as it is measured)."""
    import torch

    from bench import harness, table, timing
    device = "cuda"
    dev = timing.tensor_device(device)
    extra = lease.out / "extra.jsonl"
    with lease.stage("ulp"):
        for line in ulp_histograms(2**8 if lease.dry else 2**20, dev):
            harness._log(extra, kind="ulp", **line)
            lease.log(f"ulp {line}")
    with lease.stage("host overhead"):
        us = timing.host_overhead(device, iters=3 if lease.dry else 300)
        harness._log(extra, kind="host_overhead", us=us)
        lease.log(f"host overhead (us per eager mish forward+backward, 2^10): {us}")
    log = lease.out / "results.jsonl"
    harness._log(log, kind="env", env=harness.env(device))
    rows, errors = [], []
    compile_backend = "aot_eager" if lease.dry else "inductor"
    with lease.stage("bench"), harness.settings():
        todo = plan(lease.dry)
        for i, (name, dname, shape, only) in enumerate(todo):
            if lease.left("measure") < 3:
                lease.log(f"bench: deadline; {len(todo) - i} of {len(todo)} cases not timed")
                break
            torch._dynamo.reset()
            found = harness.record_case(log, rows, errors, name, table.DTYPES[dname], shape,
                                        True, device, compile_backend, only)
            lease.log(f"bench {name} {dname} {shape}: "
                      + (f"FAILED {errors[-1]['error']}" if found is None else _fractions(found)))
    lease.log(f"bench: {len(rows)} timed calls, {len(errors)} cases failed")


def _fractions(rows: list[dict]) -> str:
    """One case's fractions of copy, compact: contestant fwd/bwd."""
    by = {(r["contestant"], r["mode"]): r for r in rows}
    parts = []
    for c in dict.fromkeys(r["contestant"] for r in rows if r["mode"] != "copy"):
        f, b = (by.get((c, m), {}).get("frac_copy") for m in ("forward", "backward"))
        parts.append(f"{c} " + "/".join("-" if v is None else f"{v:.2f}" for v in (f, b)))
    return ", ".join(parts)


def ulp_histograms(n: int, device: str) -> list[dict]:
    """For each memory-bound op, fp16 and bf16, and backend that runs here: how many elements
    of the output and of x's gradient lie 0, 1, 2 or more ulps from the same op run in fp32
    and rounded by torch (the contract: computed in fp32, rounded once: ``output``, ``grad``),
    and from the float64 reference rounded by torch, the correctly rounded result
    (``output_f64``, ``grad_f64``: what the fp32 math's own error costs)."""

    import fused_act
    from bench import table
    from tests.cases import ulp_distance
    backends = ["triton"] + (["cuda"] if fused_act.backend.cuda_status()[0] else [])
    found = []
    for name, op in table.OPS.items():
        if op.traffic is None:
            continue
        for dname in ("fp16", "bf16"):
            dtype = table.DTYPES[dname]
            x, g, params = table.make_inputs(op, op.shape(n), dtype, device)
            for backend_name in backends:
                with fused_act.use_backend(backend_name):
                    low = _output_and_grad(op, x, g, params)
                    high = _output_and_grad(op, x.float(), g.float(),
                                            [q.detach().float() for q in params])
                exact = _output_and_grad(op, x.double(), g.double(),
                                         [q.detach().double() for q in params], op.ref)
                line = dict(op=name, dtype=dname, backend=backend_name, n=x.numel(),
                            n_out=low[0].numel())
                for what, ref in (("", high), ("_f64", exact)):
                    for part, a, b in zip(("output", "grad"), low, ref, strict=True):
                        d = ulp_distance(a, b.to(dtype))
                        line[part + what] = [int((d == k).sum()) for k in (0, 1, 2)] + [
                            int((d > 2).sum())]
                found.append(line)
    return found


def _output_and_grad(op, x, g, params, fn=None):
    import torch

    from bench.table import copies
    xg, ps = copies(x, params)
    y = (fn or op.fused)(xg.requires_grad_(), *ps)
    (dx,) = torch.autograd.grad(y, xg, g)
    return y.detach(), dx


def collect(folder: Path, to: Path | None) -> dict:
    """A lease's files as the benchmark's results: results.json (with the ulp histograms and
    the host overhead), results.md and the plot, in ``to`` (default: beside them)."""
    from bench.report import markdown, plot
    to = to or folder
    to.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(ln) for ln in (folder / "results.jsonl").read_text().splitlines()]
    extra = [json.loads(ln) for ln in (folder / "extra.jsonl").read_text().splitlines()] \
        if (folder / "extra.jsonl").exists() else []
    overhead = [e["us"] for e in extra if e["kind"] == "host_overhead"]
    result = dict(env=next(ln["env"] for ln in lines if ln["kind"] == "env"),
                  rows=[r for ln in lines if ln["kind"] == "case" for r in ln["rows"]],
                  errors=[{k: v for k, v in ln.items() if k != "kind"}
                          for ln in lines if ln["kind"] == "error"],
                  host_overhead_us=overhead[0] if overhead else {},
                  ulp=[e for e in extra if e["kind"] == "ulp"])
    (to / "results.json").write_text(json.dumps(result, indent=1))
    (to / "results.md").write_text(markdown(result) + _ulp_table(result["ulp"]))
    plot(result["rows"], to)
    return result


def _ulp_table(ulp: list[dict]) -> str:
    if not ulp:
        return ""
    lines = ["", "## fp16/bf16 results in ulps (elements 0 / 1 / 2 / more ulps off)", "",
             "Against the same op run in fp32 and rounded by torch (computed in fp32, rounded "
             "once), and against the float64 reference rounded by torch (the correctly rounded "
             "result).", "",
             "| op | dtype | backend | n | output vs fp32 | x gradient vs fp32 | output vs f64 "
             "| x gradient vs f64 |", "|---|---|---|---|---|---|---|---|"]
    for u in ulp:
        cells = " | ".join(" / ".join(map(str, u[k])) if k in u else ""
                           for k in ("output", "grad", "output_f64", "grad_f64"))
        lines.append(f"| {u['op']} | {u['dtype']} | {u['backend']} | 2^{int(math.log2(u['n']))} "
                     f"| {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
