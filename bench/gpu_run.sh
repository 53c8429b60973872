#!/usr/bin/env bash
# The one command of a GPU lease (bench/gpu_run.py says what it runs and writes under $OUT).
# The machine has torch and no network, and its setuptools may not build an editable wheel:
# the package is laid out as installed (triton_kernels/ and csrc/ inside fused_act/, as the
# wheel has them) in this copy of the tree and imported from it, and the CUDA extension is
# built by gpu_run.py in the background.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_run}
mkdir -p "$out"
ln -sfn ../triton_kernels fused_act/triton_kernels
ln -sfn ../csrc fused_act/csrc
trap 'rm -f fused_act/triton_kernels fused_act/csrc' EXIT  # a checkout is left as it was
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m bench.gpu_run --out "$out" "$@"
