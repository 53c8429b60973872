"""What nvcc makes of every kernel instantiation of csrc/, compiled for sm_90 on any machine
(``bench/codegen_cuda.py``): no spill, registers within the checked-in baseline, 16-byte loads
and stores wherever a kernel is instantiated for vectors; and the gate fails on a change that
costs the kernels their 16-byte stores or makes them spill."""

import pytest

from bench import codegen_cuda

from .test_csrc import toolchain_gap

TOOLS = codegen_cuda.tools()
pytestmark = pytest.mark.skipif(
    TOOLS is None, reason="nvcc or cuobjdump not found: CUDA sources not compiled")

# one-line changes, each compiled into a copy of csrc/ (frelu.cu alone: the fastest source
# with vector instantiations): a plain store of the vector word, which nvcc splits into one
# store per element, and 8 resident blocks, which cap registers at 32
MUTATIONS = {
    "plain vector store": (
        "tile.cuh", "__stwb(reinterpret_cast<word_t<T, VEC>*>(p), w);",
        "*reinterpret_cast<word_t<T, VEC>*>(p) = w;", "16-byte accesses expected"),
    "registers capped at 32": (
        "tile.cuh", "constexpr int MIN_BLOCKS = 4;", "constexpr int MIN_BLOCKS = 8;", "spills"),
}


@pytest.fixture(scope="module", autouse=True)
def toolchain():
    gap = toolchain_gap(TOOLS[0], codegen_cuda.nvcc_flags()[0])
    if gap:
        pytest.skip(gap)


@pytest.fixture(scope="module")
def rows():
    return codegen_cuda.rows()


def test_gate_passes(rows):
    found = codegen_cuda.problems(rows, codegen_cuda.load_baseline())
    assert not found, "\n".join(found)


def test_rows_cover_every_op_and_the_baseline(rows):
    """Every source's op of every dtype is there, vector widths come from the VEC template
    parameter (16 bytes for every float but fp64, which runs scalar), and the baseline names
    every instantiation, or its op's of another activation: an activation added later is held to
    those (refresh it with ``python -m bench.codegen_cuda --write-baseline``)."""
    assert {r["source"] for r in rows} == {p.name for p in codegen_cuda.CSRC.glob("*.cu")}
    for r in rows:
        assert r["vector_bytes"] == (16 if r["vec"] > 1 else codegen_cuda.STORAGE_BYTES[
            r["storage"]]), r["kernel"]
    vectorized = [r for r in rows if r["vec"] > 1]
    assert {r["storage"] for r in vectorized} == {"float", "__half", "__nv_bfloat16"}
    ops = {r["kernel"].split("<")[1] for r in rows}
    assert ops == {"MapOp", "GradOp", "GluOp", "GluGradOp", "MaxForward", "MaxBackward",
                   "MaxAffine", "StatsOp", "AffineGradOp", "Source", "ChannelSource",
                   "GatedBetaSource"}
    assert codegen_cuda.sums_only_ops() == {"StatsOp"}
    assert all(r["ldg128"] and (r["stg128"] or r["sums_only"]) for r in vectorized)
    missing = ({codegen_cuda.activation_free(r["mangled"]) for r in rows}
               - set(codegen_cuda.limits(codegen_cuda.load_baseline())))
    assert not missing, sorted(missing)[:5]


def test_sass_and_ptxas_parsing():
    sass = """
        Function : _Z1kPf
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0090*/                   LDG.E.U16.CONSTANT R8, desc[UR4][R2.64] ;
        /*00a0*/                   STG.E.64 desc[UR4][R6.64], R4 ;
        Function : _Z1jPf
        /*0080*/              @!P0 STG.E.U8 desc[UR4][R6.64], R4 ;
"""
    assert codegen_cuda._sass_widths(sass) == {"_Z1kPf": (16, 8), "_Z1jPf": (0, 1)}
    log = ("ptxas info    : Function properties for _Z1kPf\n"
           "    288 bytes stack frame, 494 bytes spill stores, 536 bytes spill loads\n")
    assert codegen_cuda._ptxas_spills(log) == {"_Z1kPf": (494, 536)}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_gate_fails_on_a_mutation(name):
    file, old, new, expect = MUTATIONS[name]
    got = codegen_cuda.rows(["frelu.cu"], patches=[(file, old, new)])
    assert got and not [r for r in got if r.get("error")], got
    found = codegen_cuda.problems(got, codegen_cuda.load_baseline())
    assert any(expect in line for line in found), found
