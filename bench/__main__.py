"""``python -m bench``: every op, fused vs PyTorch eager vs torch.compile, on this GPU.

Activations are memory-bound, so each time is also given as GB/s (bytes that must move, e.g.
forward reads x and writes y: 2nb; backward reads grad and x and writes dx: 3nb; a gated op's
forward reads gate and up and writes the output: 3nb, its backward reads grad, gate and up and
writes both gradients: 5nb) and as a fraction of a device-to-device copy of the same bytes
timed in the same run.  Each contestant's output is checked against the reference before it
is timed.  The activation fused with FP8 quantisation has forward-only rows of its own
(``bench.quant``: bytes read plus one-byte codes and scales written), in a section of the table
that states their target.  Without a GPU the harness checks every kernel through Triton's
interpreter against the reference, reports eager host overhead, and says that GPU timings need
a GPU.  ``--cpu`` times every op on CPU tensors instead,
fused_act vs PyTorch, and writes a table of its own (``bench.cpu``).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined

from bench import harness, quant, report, table, timing  # noqa: E402

DEFAULT_DTYPES = ["fp32", "fp16", "bf16"]
# the ops of bench.table, then the rows of an activation fused with FP8 quantisation
ALL_OPS = [*table.OPS, *quant.QUANT]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def run_without_gpu(ops: list[str], dtypes: list[str]) -> int:
    """Check every op through the interpreter against the reference; print host overhead of
    what "auto" runs on CPU tensors (the CPU kernels, not the interpreter)."""
    print("No CUDA device: GPU timings need a GPU. Checking every Triton kernel on the CPU, "
          "through Triton's interpreter, against the reference instead.\n")
    width = max(map(len, ops)) + 1
    print(f"{'op':<{width}} {'dtype':<5} forward and input gradients (Triton interpreter, CPU)")
    ok_all = True
    for name in ops:
        for dname in dtypes:
            try:
                with fused_act.use_backend("triton"):
                    _check_interpreted(name, table.DTYPES[dname])
                verdict = "ok"
            except AssertionError as e:
                verdict, ok_all = f"FAIL: {e}", False
            except Exception as e:  # noqa: BLE001 - one op's crash must not hide the others'
                verdict, ok_all = f"FAIL: {type(e).__name__}: {e}", False
            print(f"{name:<{width}} {dname:<5} {verdict}")
    us = timing.host_overhead("cpu")
    runs = fused_act.backend.resolve(torch.device("cpu"), "auto")
    print("\nhost time per eager mish forward+backward on 2^10 CPU elements, no interpreter "
          f"(backend 'auto' runs CPU tensors with {runs!r}): "
          + ", ".join(f"{k} {v:.1f} us" for k, v in us.items()))
    print("For a table of CPU times (every op, fused_act vs PyTorch, and two models): "
          "python -m bench --cpu")
    return 0 if ok_all else 1


def _check_interpreted(name: str, dtype: torch.dtype) -> None:
    """One op or FP8 row of 2^12 elements checked against the reference on CPU tensors."""
    if name in quant.QUANT:
        layout = quant.LAYOUTS[quant.QUANT[name][0]]
        x, params = quant.make_inputs(name, layout.shape(2**12), dtype, "cpu")
        quant.check(name, quant.contestants(name, device="cpu")["fused"], x, params)
        return
    op = table.OPS[name]
    x, g, params = table.make_inputs(op, op.shape(2**12), dtype, "cpu")
    table.check(name, op.fused, x, g, params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few sizes, fewer repetitions")
    p.add_argument("--ops", nargs="+", default=ALL_OPS, choices=ALL_OPS,
                   help="ops of bench.table and FP8 rows of bench.quant (default: all)")
    p.add_argument("--dtypes", nargs="+", default=DEFAULT_DTYPES,
                   choices=list(table.DTYPES))
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="numbers of elements (default: 2^16 .. 2^28, or a few with --quick)")
    p.add_argument("--shapes", nargs="*", type=_shape, default=None,
                   help="layer shapes such as 32x64x112x112 (default: a few real layers per "
                        "op; LLM MLP shapes such as 8192x11008 for the gated ops)")
    p.add_argument("--no-pipelines", action="store_true", help="skip the compile pipelines")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<gpu>)")
    p.add_argument("--cpu", action="store_true",
                   help="the CPU table instead: every op on CPU tensors, fused_act (backend "
                        "'auto') vs PyTorch, at 2^16 and 2^22 elements (or --sizes), fp32 and "
                        "bf16 (or --dtypes), 1 and 2 threads, and two models; writes "
                        "bench/results/cpu-<cpu model>/ (minutes)")
    p.add_argument("--threads", nargs="+", type=int, default=None,
                   help="with --cpu: torch.set_num_threads values (default 1 2)")
    args = p.parse_args(argv)
    if args.cpu:
        from bench import cpu
        dtypes = None if args.dtypes == DEFAULT_DTYPES else args.dtypes  # default fp32, bf16
        result = cpu.run(Path(args.out) if args.out else None, args.ops, dtypes, args.sizes,
                         args.threads, reps=3 if args.quick else cpu.REPS)
        print(report.cpu_markdown(result))
        return 1 if result["errors"] else 0
    if not torch.cuda.is_available():
        return run_without_gpu(args.ops, args.dtypes)
    sizes = args.sizes or (table.QUICK_SIZES if args.quick else table.FULL_SIZES)
    name = harness.env("cuda")["gpu"]
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / _slug(name)
    result = harness.run(args.ops, args.dtypes, sizes, args.shapes, args.quick, out,
                         pipelines=not args.no_pipelines)
    print(report.markdown(result))
    # non-zero only now, after every other case was measured and written
    if result["errors"]:
        print(f"{len(result['errors'])} failed (see {out / 'results.md'}): "
              + ", ".join(f"{e['what']} {e['op']}" for e in result["errors"]), file=sys.stderr)
        return 1
    return 0


def _slug(name: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


import fused_act  # noqa: E402  (after TRITON_INTERPRET is settled)

if __name__ == "__main__":
    sys.exit(main())
