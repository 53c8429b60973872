"""The CUDA C++ backend without a GPU: every csrc/*.cu compiles to PTX for sm_80 with no warning
(the codegen gate, test_codegen_cuda.py, compiles each through ptxas for sm_90, warnings as
errors too, which is where the time goes: about 3x the PTX's), its math
(csrc/activations.cuh) matches the reference on the host, and asking for the backend where it
cannot run is a clear error.  test_csrc_emulated.py runs the kernels on the
CPU.  On a GPU, the tables of test_kernels, test_acon, test_frelu and test_autograd run with
backend "cuda" (``pytest -m cuda``), and test_gpu.py compares it with backend "triton"."""

import dataclasses
import functools
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import fused_act
from fused_act import _build, _cuda, plan, reference, registry

from .cases import EDGES as CASE_EDGES
from .cases import ROOT, TOL, expected

CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
need_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled")
ARCHS = ["-gencode", "arch=compute_80,code=compute_80"]


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "of unknown version"


@functools.cache
def toolchain_gap(nvcc: str, std: str) -> str | None:
    """None if ``nvcc`` (and its host compiler) can compile ``std``, else the one-line reason
    a test that needs it skips with, naming the versions."""
    probe = "#include <cuda_runtime.h>\n#include <vector>\nint main() { return 0; }\n"
    out = subprocess.run([nvcc, std, "-x", "cu", "-E", "-", "-o", os.devnull], input=probe,
                         capture_output=True, text=True)
    if out.returncode == 0:
        return None
    return (f"nvcc {nvcc_version(nvcc)} cannot compile {std}, which torch {torch.__version__}'s "
            "extension builder uses")


def _nvcc(args: list[str], cwd) -> None:
    """nvcc with the flags of torch's extension builder, all warnings as errors; skips where the
    local toolchain cannot compile the C++ standard the installed torch needs."""
    std = _build.torch_cxx_standard()
    gap = toolchain_gap(NVCC, std)
    if gap:
        pytest.skip(gap)
    out = subprocess.run([NVCC, std, "-O3", "-Werror", "all-warnings", *args],
                         cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr[-4000:]


def test_every_source_is_built():
    """What the two builds compile is every source there is: the CUDA kernels' and the CPU
    kernels', which share the binding."""
    sources = [*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")]
    assert sorted({*_build.SOURCES, *_build.CPU_SOURCES}) == sorted(p.name for p in sources)


@need_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_compiles_to_ptx_for_sm80(source, tmp_path):
    _nvcc([*ARCHS, *_build.torch_nvcc_defines(), "-ptx", str(CSRC / source), "-o",
           str(tmp_path / "k.ptx")], tmp_path)


@need_nvcc
def test_binding_type_checks_against_torch(tmp_path):
    """binding.cpp against this torch's headers (nvcc supplies CUDA's), all warnings as errors.
    A CPU build of torch ships c10/cuda's headers but not the one its CMake generates; the
    stand-in defines what a shared-library build defines."""
    from torch.utils import cpp_extension
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    system = [tmp_path, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    args = ["-Xcompiler", "-fsyntax-only,-Wall,-Wextra,-Werror", f"-I{CSRC}",
            "-DTORCH_EXTENSION_NAME=_C", "-c", str(CSRC / "binding.cpp"), "-o",
            str(tmp_path / "binding.o")]
    for p in system:
        args[:0] = ["-isystem", str(p)]
    _nvcc(args, tmp_path)


def test_build_flags_follow_torch():
    """The C++ standard is the one torch's builder uses, read from it; fused_act's own flags
    name no standard (the builder adds its own only when none is given)."""
    std = _build.torch_cxx_standard()
    assert re.fullmatch(r"-std=c\+\+(17|20|23)", std)
    assert std in inspect.getsource(cpp_extension)
    assert not [f for f in _build.CXX_FLAGS + _build.NVCC_FLAGS if f.startswith("-std")]


@need_nvcc
def test_toolchain_gap_is_a_skip_naming_versions(tmp_path):
    """A toolchain that cannot compile torch's standard skips the compile tests with one line
    naming nvcc's and torch's versions (here: an nvcc that rejects every source)."""
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Cuda compilation tools, "
                    "release 11.0, V11.0.1' && exit 0\nexit 1\n")
    fake.chmod(0o755)
    reason = toolchain_gap(str(fake), "-std=c++20")
    assert reason == (f"nvcc 11.0 cannot compile -std=c++20, which torch {torch.__version__}'s "
                      "extension builder uses")


def test_setup_build_cuda_1_needs_a_cuda_toolchain(tmp_path):
    """FUSED_ACT_BUILD_CUDA=1 where the CUDA kernels cannot be built is an error naming what is
    missing: a CPU build of torch, or (with a CUDA build) nvcc."""
    env = {**os.environ, "FUSED_ACT_BUILD_CUDA": "1"}
    if torch.version.cuda is None:
        want = "is not a CUDA build"
    else:
        want = "nvcc not found"
        env.update(CUDA_HOME=str(tmp_path), PATH=os.pathsep.join(
            d for d in env["PATH"].split(os.pathsep) if not (Path(d) / "nvcc").exists()))
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, text=True,
                         capture_output=True, env=env)
    assert out.returncode != 0 and want in out.stderr + out.stdout, out.stderr + out.stdout


# the host program's columns: per kernel activation (by id) its value, d/dx and d/dbeta, then
# ACON-C's value and derivatives
KERNELS = sorted(registry.KERNEL_IDS, key=registry.KERNEL_IDS.get)
COLUMNS = [f"{k}{part}" for k in KERNELS for part in ("", "'", " dbeta")] + [
    "acon", "acon dx", "acon dp1", "acon dp2", "acon dbeta"]


def _host_math(xs: list[float], beta: float, a: float, p2: float, acon_beta: float):
    """(float results, double results), each (len(xs), len(COLUMNS)), from
    csrc/activations.cuh."""
    exe = _host_math.exe
    text = f"{beta} {a} {p2} {acon_beta}\n" + "\n".join(repr(x) for x in xs) + "\n"
    out = subprocess.run([exe], input=text, capture_output=True, text=True, check=True)
    rows = torch.tensor([[float(v) for v in line.split()] for line in out.stdout.splitlines()],
                        dtype=torch.float64)
    # the program writes a column triple per id below activations.cuh's N_ACT
    assert rows.shape == (len(xs), 2 * len(COLUMNS)), "N_ACT is not the registry's count"
    return rows[:, :len(COLUMNS)], rows[:, len(COLUMNS):]


@pytest.fixture(scope="module")
def host_math(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    exe = tmp_path_factory.mktemp("csrc") / "math"
    # built with a compile-time check that activations.cuh's ids are the registry's
    checks = [f"fused_act::ACT_{k.upper()} == {i}" for k, i in registry.KERNEL_IDS.items()]
    checks.append(f"fused_act::N_ACT == {len(KERNELS)}")
    ids = exe.parent / "ids.h"
    ids.write_text('#include "activations.cuh"\n' + "".join(
        f'static_assert({c}, "{c}, as fused_act/registry.py KERNEL_IDS");\n' for c in checks))
    _nvcc(["-I", str(CSRC), str(ROOT / "tests" / "csrc_math.cu"), "-include", str(ids),
           "-o", str(exe)], exe.parent)
    _host_math.exe = str(exe)
    return _host_math


def _reference(x: torch.Tensor, beta: float, a: float, p2: float, acon_beta: float):
    """The same columns from fused_act.reference in float64."""
    one = torch.ones_like(x)
    cols = []
    for name in KERNELS:
        spec = registry.KERNELS[name]
        cols += [spec.forward(x, beta), spec.backward(one, x, beta, False)[0]]
        # d/dbeta per element: one beta per row of x as (n, 1), a per-sample parameter
        db = spec.backward(one.reshape(-1, 1), x.reshape(-1, 1),
                           torch.full_like(x, beta).reshape(-1, 1), True)[1] if spec.beta \
            else None
        cols.append(torch.zeros_like(x) if db is None else db.reshape(-1))
    p1t = torch.tensor([a + p2], dtype=torch.float64)
    p2t = torch.tensor([p2], dtype=torch.float64)
    bt = torch.tensor([acon_beta], dtype=torch.float64)
    xc = x.reshape(-1, 1)
    acon = reference.acon_c(xc, p1t, p2t, bt).reshape(-1)
    s2, sn2 = reference.sigmoid_pair(acon_beta * (a * x))
    q = s2 * sn2
    zq = torch.where(q == 0, 0.0, acon_beta * a * x * q)
    big_s = s2 + zq
    adx = reference.acon_c_backward(one.reshape(-1, 1), xc, p1t, p2t, bt)[0].reshape(-1)
    mz = lambda c, v: torch.where(c == 0, 0.0, c * v)  # noqa: E731
    cols += [acon, adx, mz(big_s, x), mz(sn2 - zq, x), torch.where(q == 0, 0.0, (a * x) ** 2 * q)]
    return torch.stack(cols, 1)


# the tables' edge values and, past mish's saturation point and around zero, the host program's
EDGES = [*CASE_EDGES, 100.0, 20.5, 1e-30, -1e-30]


@pytest.mark.parametrize("beta, a, p2, acon_beta", [(1.0, 1.5, 0.5, 1.0), (-0.75, -2.0, 1.25,
                                                                           0.3)])
def test_host_math_matches_reference(host_math, beta, a, p2, acon_beta):
    """Every value and derivative of activations.cuh in float and double against the float64
    reference, within the test tolerances, on random inputs and the edge values (an infinity
    exactly where the reference overflows the program's type: ``cases.expected``)."""
    gen = torch.Generator().manual_seed(0)
    xs = (torch.randn(2000, generator=gen, dtype=torch.float64) * 8).tolist() + EDGES
    got32, got64 = host_math(xs, beta, a, p2, acon_beta)
    x64 = torch.tensor(xs, dtype=torch.float64)
    want = _reference(x64, beta, a, p2, acon_beta)
    # the float program sees x rounded to float; compare against the reference at that x
    want32 = _reference(x64.float().double(), beta, a, p2, acon_beta)
    for got, ref, dtype in ((got32, want32, torch.float32), (got64, want, torch.float64)):
        rtol, atol = TOL[dtype]
        for j, name in enumerate(COLUMNS):
            o, r = got[:, j], expected(ref[:, j], dtype)
            ok = ((o - r).abs() <= atol + rtol * r.abs()) | (o.isnan() & r.isnan()) | (o == r)
            bad = (~ok).nonzero().reshape(-1)[:5].tolist()
            assert not bad, f"{name} {dtype}: {[(xs[i], o[i].item(), r[i].item()) for i in bad]}"


def test_max_code_matches_reference(host_math):
    """The win codes of csrc are the reference's (checked through the header's text: the
    numbering is the ABI the backward reads)."""
    header = (CSRC / "activations.cuh").read_text()
    assert "X_WINS = 0, T_WINS = 1, TIE = 2, NAN_SEEN = 3" in header
    x = torch.tensor([1.0, 0.0, 2.0, float("nan")])
    t = torch.tensor([0.0, 1.0, 2.0, 0.0])
    assert reference.frelu_max_code(x, t).tolist() == [0, 1, 2, 3]


def test_plan_struct_is_plan_py():
    """csrc/fused_act.h's fa_plan declares fused_act/plan.py Plan's fields, in their order, with
    the C types of plan.C_TYPES; FA_PLAN_FIELDS (what binding.cpp checks a plan's length
    against) counts them; Plan.fields() gives them in that order."""
    abi = re.sub(r"//[^\n]*", "", (CSRC / "fused_act.h").read_text())
    body = re.search(r"typedef struct \{([^}]*)\} fa_plan;", abi)
    assert body, "typedef struct {...} fa_plan; not found"
    members = []
    for decl in filter(None, (d.strip() for d in body.group(1).split(";"))):
        ctype, names = decl.split(None, 1)
        members += [(name.strip(), ctype) for name in names.split(",")]
    names = [f.name for f in dataclasses.fields(plan.Plan)]
    assert list(plan.C_TYPES) == names
    assert members == [(name, f"{plan.C_TYPES[name]}_t") for name in names]
    assert re.search(r"\bFA_PLAN_FIELDS = (\d+)\b", abi).group(1) == str(len(names))
    assert "FA_PLAN_FIELDS" in (CSRC / "binding.cpp").read_text()
    for p in (plan.flat(5000), plan.channel_plan(torch.empty(2, 3, 4, 5), 3, True)):
        assert p.fields() == dataclasses.astuple(p)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_backend_without_gpu_is_a_clear_error():
    ok, why = fused_act.backend.cuda_status()
    assert not ok and why == "no CUDA device"
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: no CUDA device"):
        fused_act.set_backend("cuda")
    assert fused_act.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="not available"):
        _cuda.library()
