"""The code the Triton compiler makes of every launched specialization, compiled for sm_90 on
any machine (``bench/codegen_triton.py``): the gate passes, and it fails on a change that costs
the kernels their 16-byte accesses or makes fp64 spill."""

import pytest

from bench import codegen_triton

# one-line changes that lose act_fwd_kernel's 16-byte accesses: the length left unspecialized
# (rows of a per-channel plan no longer known to start 16 bytes apart), and whole tiles masked
# like the last (a flat row whose length is not a multiple of 16 masked everywhere)
MUTATIONS = {
    "length not specialized": (
        "elementwise.py", "@triton.jit\ndef act_fwd_kernel(",
        '@triton.jit(do_not_specialize=["L"])\ndef act_fwd_kernel('),
    "every tile masked": (
        "elementwise.py", "offs, C, None, ACT, BETA_MODE)", "offs, C, mask, ACT, BETA_MODE)"),
}


@pytest.fixture(scope="module")
def rows():
    return codegen_triton.rows()


def test_gate_passes(rows):
    found = codegen_triton.problems(rows, codegen_triton.load_baseline())
    assert not found, "\n".join(found)


def test_sweep_covers_every_kernel_and_tail(rows):
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"act_fwd_kernel", "act_bwd_kernel", "glu_fwd_kernel", "glu_bwd_kernel",
                       "acon_fwd_kernel", "acon_bwd_kernel", "max_fwd_kernel", "max_bwd_kernel",
                       "max_affine_kernel", "act_quant_kernel"}
    assert len(rows) <= 420
    for kernel in kernels:
        mine = [r for r in rows if r["kernel"] == kernel]
        assert {r["dtype"] for r in mine} >= {"float32", "float16", "bfloat16"}, kernel
        assert any(r["expects_vectors"] for r in mine), kernel
    # flat rows with a tail (ACON's one-channel plans and fp64 among them) keep 16-byte
    # accesses in their whole tiles
    split = [r for r in rows if r["constexprs"].get("SPLIT")]
    assert split and all(r["tail"] == "flat" and min(r["load"], r["store"]) == 16
                         for r in split)
    assert all(r["constexprs"].get("SPLIT") for r in rows if r["tail"] == "flat")
    assert {r["kernel"] for r in split} >= {"acon_fwd_kernel", "acon_bwd_kernel"}
    assert {r["dtype"] for r in split} == {"float32", "float16", "bfloat16", "float64"}
    # the FP8 kernel: row scaling held and in two passes, block, tensor and its amax pass,
    # elementwise and gated; the amax pass alone stores no tile
    quant = [r for r in rows if r["kernel"] == "act_quant_kernel"]
    assert {(r["constexprs"]["SCALING"], r["constexprs"]["GATED"]) for r in quant} == {
        (1, True), (1, False), (2, True), (2, False), (0, True), (3, True)}
    assert {r["case"] for r in quant} >= {"swiglu bfloat16 row held",
                                         "swiglu bfloat16 row two-pass"}
    assert [r["scalar_store"] for r in quant].count(True) == 1


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_gate_fails_on_lost_vectorization(name):
    got = codegen_triton.rows(kernels=["act_fwd_kernel"], patches=[MUTATIONS[name]])
    assert got and not [r for r in got if r.get("error")], got
    found = codegen_triton.problems(got, codegen_triton.load_baseline())
    assert any("16-byte accesses expected" in line for line in found), found


def test_gate_fails_on_fp64_spills():
    # fp64 at the warps of the narrower dtypes: 16 values a thread spill ACON's backward
    mutation = ("tiling.py", "return 2 * NUM_WARPS if dtype.itemsize == 8 else NUM_WARPS",
                "return NUM_WARPS")
    got = codegen_triton.rows(kernels=["acon_bwd_kernel"], patches=[mutation])
    assert got and not [r for r in got if r.get("error")], got
    found = codegen_triton.problems(got, codegen_triton.load_baseline())
    assert any("float64" in line and ": spills" in line for line in found), found
