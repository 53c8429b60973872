"""The benchmark harness end to end on the CPU: tiny sizes, every op, result files."""

import json
import subprocess
import sys

import pytest

from .cases import ROOT, need_device


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_harness_end_to_end(tmp_path):
    need_device("cpu")
    from bench import harness
    result = harness.run(list(harness.OPS), ["fp32", "bf16"], [2**10], [(2, 8, 4, 4)],
                         quick=True, out=tmp_path, device="cpu", compile_backend="aot_eager")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    for op in harness.OPS:
        for c in set(harness.CONTESTANTS) - {"fused_cuda"}:  # CUDA kernels: CUDA tensors only
            for mode in harness.MODES:
                found = [r for r in rows if (r["op"], r["contestant"], r["mode"]) == (op, c, mode)]
                assert len(found) == 4 and all(r["ms"] > 0 for r in found), (op, c, mode)
    assert not [r for r in rows if r["contestant"] == "fused_cuda"]
    assert {p["op"] for p in result["pipelines"]} == set(harness.OPS)
    assert set(result["compile_mode_choice"].values()) <= {"opaque", "decompose"}
    table = (tmp_path / "results.md").read_text()
    assert "| acon_c | float32 |" in table and "compile pipelines" in table
    assert (tmp_path / "bandwidth.png").stat().st_size > 10_000


def test_bench_quick_without_gpu():
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--dtypes", "fp32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "GPU timings need a GPU" in out.stdout and "FAIL" not in out.stdout
    from bench import table
    assert out.stdout.count(" ok") == len(table.OPS)  # a line per op
