"""The benchmark harness end to end on the CPU: tiny sizes, every op, result files; every
default case of the GPU run on meta tensors; a failing case recorded and skipped."""

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fused_act
from fused_act import registry

from .cases import ROOT, need_device


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_harness_end_to_end(tmp_path, monkeypatch):
    """The CPU path: every op and contestant, the result files, the CPU's block, MLP and model
    sizes.  What does not depend on the device runs once: here every op in fp32 and the whole
    models after the first; in the GPU path's test (tests/test_bench_gpu_paths.py) every op in
    fp16, every op's block and the first whole model (bf16 takes the GPU path for every op in
    the lease's dry run there).  Here one block of each kind."""
    need_device("cpu")
    from bench import harness, pipelines, table, timing
    kinds = ("mish", "acon_c", "swiglu", "geglu")  # linear, conv, and two gated MLP blocks
    assert {pipelines.BLOCKS[k][1] for k in kinds} == {"linear", "conv", "mlp"}
    monkeypatch.setattr(pipelines, "BLOCKS", {k: pipelines.BLOCKS[k] for k in kinds})
    monkeypatch.setattr(pipelines, "MODELS", dict(list(pipelines.MODELS.items())[1:]))
    assert pipelines.MODELS
    # one timed call after the warm-up: the host times are not asserted, only measured
    monkeypatch.setattr(timing, "CPU_CALLS", {True: 1, False: 1})
    result = harness.run(list(harness.OPS), ["fp32"], [2**10], [(2, 8, 4, 4)],
                         quick=True, out=tmp_path, device="cpu", compile_backend="aot_eager")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    assert result["errors"] == [], [e["traceback"] for e in result["errors"]]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sum((line["rows"] for line in lines if line["kind"] == "case"), []) == rows
    for op in harness.OPS:
        # the contestants the table gives this op on CPU tensors (no CUDA kernels, no peers)
        names = set(table.contestants(op, "aot_eager", "cpu"))
        assert names >= {"fused", "eager", "compile"}
        assert ("decompose" in names) == (table.OPS[op].compile_key is not None), op
        for c in names:
            for mode in harness.MODES:
                found = [r for r in rows if (r["op"], r["contestant"], r["mode"]) == (op, c, mode)]
                assert len(found) == 2 and all(r["ms"] > 0 for r in found), (op, c, mode)
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
    assert "| swiglu | float32 |" in md and "decompose " in md and "| mlp " in md
    # the MLP block's saved bytes: x, gate, up, silu(gate), h; without silu(gate); without h
    (b, s, hidden), width = pipelines.MLP_SIZES["cpu"]
    mib = [r["saved_mib"] * 2**20 / (2 * b * s) for r in result["mlp_recompute"]]
    assert mib == [hidden + 4 * width, hidden + 3 * width, hidden + 2 * width]
    assert "h recomputed" in md and "(CPU host time)" in md
    # whole models: each original and fused (fp32 on the CPU), host times, no peak memory
    models = result["models"]
    assert [(r["model"], r["way"]) for r in models] == [
        (m, w) for m in pipelines.MODELS for w in ("original", "fused")]
    assert all(r["swapped"] > 0 and r["ms"] > 0 and r["saved_mib"] > 0 for r in models)
    assert all(r["batch"] == list(pipelines.MODEL_INPUT["cpu"]) and r["peak_mb"] is None
               for r in models)
    batch = "x".join(map(str, pipelines.MODEL_INPUT["cpu"]))
    assert "## Whole models" in md and f"| efficientnet_b0 | {batch} | fused |" in md
    assert (tmp_path / "bandwidth.png").stat().st_size > 10_000


def test_bench_quick_without_gpu():
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--dtypes", "fp32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "GPU timings need a GPU" in out.stdout and "FAIL" not in out.stdout
    from bench import quant, table
    # a line per op, the gated ones included, and per FP8 row
    assert out.stdout.count(" ok") == len(table.OPS) + len(quant.QUANT)


def _default_cases() -> list[tuple[str, tuple[int, ...]]]:
    """(op, shape) of every case a GPU run gives each op by default, full or quick."""
    from bench import table
    return list(dict.fromkeys(
        (name, shape) for name in table.OPS for quick in (False, True)
        for shape in table.cases(name, table.QUICK_SIZES if quick else table.FULL_SIZES, None,
                                 quick)))


def test_default_cases_on_meta():
    """Every default case's inputs can be made, and the eager and the fused function take
    them forward and backward: on meta tensors, shapes only, so a case that would crash a GPU
    run minutes in (an image-only op given a (tokens, ...) shape) fails here at once.  (Backend
    "auto" runs a meta tensor through the fused function's argument checks and its reference
    path; no backend launches kernels on one.)"""
    from bench import table
    found = _default_cases()
    assert {name for name, _ in found} == set(table.OPS)
    for name, shape in found:
        op = table.OPS[name]
        assert op.takes(shape), (name, shape)
        for dtype in table.DTYPES.values():
            x, g, params = table.make_inputs(op, shape, dtype, "meta")
            assert x.shape == shape and x.dtype == g.dtype == dtype, (name, shape, dtype)
            for label, fn in (("eager", op.eager), ("fused", op.fused)):
                xs, ps = table.copies(x, params)
                with fused_act.use_backend("auto"):
                    y = fn(xs.requires_grad_(), *ps)
                    grads = torch.autograd.grad(y, [xs, *ps], g)
                assert y.shape == g.shape, (name, label, shape, dtype)
                assert [t.shape for t in grads] == [t.shape for t in (xs, *ps)], (name, label)


def test_layer_shapes_follow_the_table():
    """An op is given only the layer shapes it takes, whether its own or the run's: the image
    ops no (tokens, features) shape, the packed gated op no odd width, and only an elementwise
    op a 1-D shape."""
    from bench import table
    given = [(2, 8, 4, 4), (8, 4096, 4096), (16, 30), (16, 31), (1024,)]
    assert table.cases("frelu_module", [], given, False) == [(2, 8, 4, 4)]
    assert (8, 4096, 4096) not in table.layer_shapes("frelu_module", False)
    assert table.cases("swiglu_packed", [], given, False) == [(2, 8, 4, 4), (8, 4096, 4096),
                                                               (16, 30)]
    assert table.cases("swiglu", [], given, False) == given[:-1]
    assert table.cases("mish", [2**10], given, True) == [(2**10,), *given]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_failing_case_is_recorded_and_skipped(tmp_path, monkeypatch):
    """A case that raises is printed, recorded as an error and skipped; every other case is
    measured and written to results.jsonl as it finishes, the result files are written, and
    ``python -m bench`` then exits non-zero."""
    need_device("cpu")
    from bench import __main__ as cli
    from bench import harness
    real = harness.bench_case
    calls = []

    def bench_case(name, dtype, shape, *args, **kwargs):
        # every case before this one is on disk already, not only at the end of the run
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        assert len(lines) == 1 + len(calls), lines
        calls.append((name, shape))
        if name == "silu" and shape == (2, 8, 4, 4):
            raise RuntimeError("boom")
        return real(name, dtype, shape, *args, **kwargs)

    monkeypatch.setattr(harness, "bench_case", bench_case)
    # the command line's GPU path, run on the CPU with a quick compiler: only the command line
    # is told there is a GPU
    monkeypatch.setattr(cli, "torch", SimpleNamespace(cuda=SimpleNamespace(
        is_available=lambda: True)))
    env, run = harness.env, harness.run
    monkeypatch.setattr(harness, "env", lambda device: env("cpu"))
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: run(
        *args, **kwargs, device="cpu", compile_backend="aot_eager"))
    code = cli.main(["--quick", "--ops", "mish", "silu", "--dtypes", "fp32", "--sizes", "1024",
                     "--shapes", "2x8x4x4", "--no-pipelines", "--out", str(tmp_path)])
    assert code == 1
    assert calls == [(op, s) for op in ("mish", "silu") for s in ((1024,), (2, 8, 4, 4))]
    result = json.loads((tmp_path / "results.json").read_text())
    [error] = result["errors"]
    assert error["what"] == "case" and error["error"] == "RuntimeError: boom"
    assert (error["op"], error["dtype"], error["shape"]) == ("silu", "float32", [2, 8, 4, 4])
    measured = {(r["op"], tuple(r["shape"])) for r in result["rows"]}
    assert measured == {("mish", (1024,)), ("mish", (2, 8, 4, 4)), ("silu", (1024,))}
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["env", "case", "case", "case", "error"]
    assert sum((line.get("rows", []) for line in lines), []) == result["rows"]
    md = (tmp_path / "results.md").read_text()
    assert "## Failed (1" in md and "| case | silu | float32 | 2x8x4x4 | RuntimeError: boom |" in md


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_failing_pipeline_is_recorded_and_skipped(tmp_path, monkeypatch):
    """A pipeline that raises is recorded and skipped like a case; the others still run."""
    need_device("cpu")
    from bench import harness, pipelines
    real = pipelines._blocks

    def blocks(name, *args):
        if name == "mish":
            raise RuntimeError("no block")
        return real(name, *args)

    monkeypatch.setattr(pipelines, "_blocks", blocks)
    # no whole model: the stage still runs and is logged (the end-to-end tests time them)
    monkeypatch.setattr(pipelines, "MODELS", {})
    result = harness.run(["mish", "silu"], ["fp32"], [2**10], [], quick=True, out=tmp_path,
                         device="cpu", compile_backend="aot_eager")
    assert [(e["what"], e["op"], e["error"]) for e in result["errors"]] == [
        ("pipeline", "mish", "RuntimeError: no block")]
    assert [p["op"] for p in result["pipelines"]] == ["silu"] and result["models"] == []
    assert set(result["compile_mode_choice"]) == {"silu"}
    kinds = [json.loads(line)["kind"]
             for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert kinds == ["env", "case", "case", "error", "pipeline", "mlp_recompute", "models"]
    assert "| pipeline | mish |" in (tmp_path / "results.md").read_text()


def test_model_check_catches_a_wrong_fused_model():
    """The whole-model rows' check passes a fused model that computes the original's logits,
    in fp32 and under bf16 autocast, and stops one with a wrong activation."""
    need_device("cpu")
    import copy

    import timm

    from bench import pipelines
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    original = timm.create_model("resnet10t", pretrained=False, num_classes=10,
                                 act_layer="mish")
    fused = copy.deepcopy(original)
    assert fused_act.replace_activations(fused).swapped
    assert any(isinstance(m, fused_act.nn.BatchNormAct2d) for m in fused.modules())
    with fused_act.use_backend("triton"):
        for autocast in (False, True):
            pipelines._check_model("resnet10t", original, fused, x, autocast=autocast)
        fused.act1 = fused_act.nn.SiLU(inplace=True)  # mish there in the original
        with pytest.raises(AssertionError, match="resnet10t: the fused model's fp32 logits"):
            pipelines._check_model("resnet10t", original, fused, x, autocast=False)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pipeline_without_a_torch_class(monkeypatch):
    """An activation torch.nn has no class for (here mish and GELU-tanh with their class
    forgotten) gets its blocks from its own function: the plain block calls its ``torch_fn``,
    the fused one its fused function (the MLP: a ``GatedMLP`` over the block's projections),
    each checked against the plain block and timed, never an error."""
    need_device("cpu")
    from bench import pipelines
    names = []
    for spec in (registry.SPECS["mish"], registry.SPECS["gelu_tanh"]):
        spec = dataclasses.replace(spec, name=spec.name + "_no_class", replaces="",
                                   function=spec.function or spec.name)
        assert pipelines._torch_class(spec) is None
        act = pipelines._torch_module(spec)
        assert isinstance(act(8), pipelines.TorchFunction)
        monkeypatch.setitem(pipelines.BLOCKS, spec.name, (spec.kernel, "linear", act))
        monkeypatch.setitem(pipelines.FUSED, spec.name, pipelines._fused_module(spec))
        monkeypatch.setitem(pipelines.BLOCKS, "glu_" + spec.name, ("glu", "mlp", act))
        monkeypatch.setitem(pipelines.FUSED_MLP, "glu_" + spec.name, (spec.function, spec.kwargs))
        names += [spec.name, "glu_" + spec.name]
    found = pipelines.run(names, "cpu", True, "aot_eager")
    assert [p["op"] for p in found] == names
    assert all(ms > 0 for p in found for ms in p["ms"].values())
    # the fused block is checked against the plain one: a wrong function would not pass
    wrong = dataclasses.replace(registry.SPECS["silu"], name="mish_no_class", function="silu")
    monkeypatch.setitem(pipelines.FUSED, "mish_no_class", pipelines._fused_module(wrong))
    with pytest.raises(AssertionError, match="differs from the eager plain block"):
        pipelines.run(["mish_no_class"], "cpu", True, "aot_eager")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cpu_table(tmp_path):
    """The CPU table's code path end to end at tiny sizes: every op, both thread counts, the
    model rows (each run or skipped with its reason), the files it writes.  Times are not
    asserted, only that they were measured."""
    need_device("cpu")
    from bench import cpu, quant, table
    result = cpu.run(tmp_path, sizes=[2**10], threads=[1, 2], reps=1,
                     resnet_input=(2, 3, 32, 32), mlp_size=(8, 32, 48),
                     compile_backend="aot_eager", verbose=False)
    assert result["errors"] == [], [e["traceback"] for e in result["errors"]]
    saved = json.loads((tmp_path / "results.json").read_text())
    info = saved["env"]
    assert info["cpu"] == cpu.cpu_model() and info["cpu"]
    assert info["threads"] == [1, 2] and info["torch"] == torch.__version__
    assert "commit" in info and info["label"] == "CPU"
    rows = saved["rows"]
    assert {(r["op"], r["dtype"], r["threads"], r["mode"]) for r in rows} == {
        (op, d, t, m) for op in table.OPS for d in ("float32", "bfloat16") for t in (1, 2)
        for m in table.MODES} | {(op, d, t, "forward") for op in quant.QUANT
                                 for d in ("float32", "bfloat16") for t in (1, 2)}
    assert all(r["fused_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert {r["torch"] for r in rows if r["op"] in ("mish", "silu", "gelu", "gelu_tanh")} == {
        "F.mish", "F.silu", "F.gelu", "F.gelu(tanh)"}
    models = saved["models"]
    assert {r["model"] for r in models} >= {"timm resnet10t (mish)", "Llama MLP block"} or \
        any("skipped" in r for r in models)
    for r in models:
        assert r.get("skipped") or (r["swapped"] >= 1 and r["ratio"] > 0), r
    md = (tmp_path / "results.md").read_text()
    assert md.startswith(f"# fused_act on CPU: {info['cpu']}")
    assert "| mish | F.mish | float32 | 2^10 | 2 |" in md and "## Models" in md
    assert "| swiglu_fp8_block | eager expression (amax, cast) | bfloat16 | 2^10 | 1 |" in md
    assert cpu.results_dir().name == "cpu-" + cpu.slug(info["cpu"])


def test_fp8_peer_is_checked(monkeypatch):
    """An FP8 row's peer (Liger-Kernel's SwiGLU then the eager quantisation) joins the
    contestants on a GPU where it imports, and the check before timing passes it only where it
    computes the row's function: a stand-in module computing SiLU * up passes, GELU * up
    fails.  vLLM, not importable here, is absent and says why."""
    from bench import quant
    x, params = quant.make_inputs("swiglu_fp8_block", (4, 64), torch.bfloat16, "cpu")
    for act, right in ((torch.nn.functional.silu, True), (torch.nn.functional.gelu, False)):
        fake = SimpleNamespace(LigerSiLUMulFunction=SimpleNamespace(
            apply=lambda g, u, a=act: a(g) * u))
        monkeypatch.setitem(sys.modules, "liger_kernel.ops.swiglu", fake)
        found = quant.contestants("swiglu_fp8_block", "aot_eager", "cuda")
        assert "liger" in found and "vllm" not in quant.contestants(
            "swiglu_packed_fp8_row", "aot_eager", "cuda")
        if right:
            quant.check("swiglu_fp8_block", found["liger"], x, params)
        else:
            with pytest.raises(AssertionError, match="codes off by more than one FP8 step"):
                quant.check("swiglu_fp8_block", found["liger"], x, params)
    assert quant.peers("cuda")["vllm"].startswith("absent")
