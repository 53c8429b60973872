"""``python -m bench``: every op, fused vs PyTorch eager vs torch.compile, on this GPU.

Activations are memory-bound, so each time is also given as GB/s (bytes that must move: forward
reads x and writes y, 2nb; backward reads grad and x and writes dx, 3nb) and as a fraction of a
device-to-device copy of the same bytes timed in the same run.  Each contestant's output is
checked against the reference before it is timed.  Without a GPU the harness checks every kernel
through Triton's interpreter against the reference, reports eager host overhead, and says that
GPU timings need a GPU.
"""

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined

from bench import harness  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few sizes, fewer repetitions")
    p.add_argument("--ops", nargs="+", default=list(harness.OPS), choices=list(harness.OPS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"],
                   choices=list(harness.DTYPES))
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="numbers of elements (default: 2^16 .. 2^28, or a few with --quick)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<gpu>)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        return harness.run_without_gpu(args.ops, args.dtypes)
    return harness.run_gpu(args.ops, args.dtypes, args.sizes, args.quick, args.out)


if __name__ == "__main__":
    sys.exit(main())
