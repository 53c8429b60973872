"""The benchmark harness end to end on the CPU: tiny sizes, every op, result files."""

import json
import subprocess
import sys

import pytest

from .cases import ROOT, need_device


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_harness_end_to_end(tmp_path):
    need_device("cpu")
    from bench import harness, pipelines, table
    result = harness.run(list(harness.OPS), ["fp32", "bf16"], [2**10], [(2, 8, 4, 4)],
                         quick=True, out=tmp_path, device="cpu", compile_backend="aot_eager")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    for op in harness.OPS:
        # the contestants the table gives this op on CPU tensors (no CUDA kernels, no peers)
        names = set(table.contestants(op, "aot_eager", "cpu"))
        assert names >= {"fused", "eager", "compile"}
        assert ("decompose" in names) == (op in table.GATED or op in table.PACKED), op
        for c in names:
            for mode in harness.MODES:
                found = [r for r in rows if (r["op"], r["contestant"], r["mode"]) == (op, c, mode)]
                assert len(found) == 4 and all(r["ms"] > 0 for r in found), (op, c, mode)
    assert not [r for r in rows if r["contestant"] in ("fused_cuda", "liger")]
    assert set(result["peers"]) == {label for label, _, _ in table.PEERS.values()}
    assert all(v.startswith("absent") for v in result["peers"].values())
    # a gated op moves 3 tensors of the gate's size forward, 5 backward, and its packed form
    # (n counts gate and up) 1.5 and 2.5 of that size: its GB/s and fraction of the copy count
    # those bytes
    assert {"swiglu", "geglu_tanh"} <= set(table.GATED) and "swiglu_packed" in table.PACKED
    bytes_per = {"forward": 3, "backward": 5, "fwd+bwd": 8}
    gated = [r for r in rows if r["op"] in {**table.GATED, **table.PACKED} and r["mode"] != "copy"]
    assert {r["op"] for r in gated} == set(table.GATED) | set(table.PACKED)
    for r in gated:
        b = 4 if r["dtype"] == "float32" else 2
        per = bytes_per[r["mode"]] / (2 if r["op"] in table.PACKED else 1)
        assert r["gbps"] * r["ms"] * 1e6 == pytest.approx(per * r["n"] * b)
    with_block = set(harness.OPS) & set(pipelines.BLOCKS)
    assert {p["op"] for p in result["pipelines"]} == with_block
    mlp = {p["op"] for p in result["pipelines"] if p["block"].startswith("mlp")}
    assert mlp == {n for n in table.GATED if n in with_block} and len(mlp) >= 2
    assert set(result["compile_mode_choice"].values()) <= {"opaque", "decompose"}
    md = (tmp_path / "results.md").read_text()
    assert "| acon_c | float32 |" in md and "compile pipelines" in md
    assert "| swiglu | bfloat16 |" in md and "decompose " in md and "| mlp " in md
    assert (tmp_path / "bandwidth.png").stat().st_size > 10_000


def test_bench_quick_without_gpu():
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--dtypes", "fp32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "GPU timings need a GPU" in out.stdout and "FAIL" not in out.stdout
    from bench import table
    assert out.stdout.count(" ok") == len(table.OPS)  # a line per op, the gated ones included
