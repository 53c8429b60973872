"""Builds the CUDA kernels (csrc/) into ``fused_act._C`` when a CUDA build of torch and nvcc are
present; everything else is in pyproject.toml.  FUSED_ACT_BUILD_CUDA=1 makes a missing
toolchain or a failed build an error, FUSED_ACT_BUILD_CUDA=0 skips the build.  Otherwise a failed
build is reported and the package installs without ``_C``: the Triton kernels do not need it,
and backend "cuda" builds csrc/ on first use (fused_act/_cuda.py)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def build_config():
    """fused_act/_build.py (sources and flags), loaded from the tree: the package is not
    importable before it is installed."""
    path = ROOT / "fused_act" / "_build.py"
    spec = importlib.util.spec_from_file_location("fused_act_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_build() -> dict:
    want = os.environ.get("FUSED_ACT_BUILD_CUDA")
    if want == "0":
        return {}
    cfg = build_config()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        missing = "torch is not importable here (build with pip's --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            missing = f"torch {torch.__version__} is not a CUDA build"
        elif cfg.nvcc_path() is None:
            missing = "nvcc not found (set CUDA_HOME)"
        else:
            missing = ""
    if missing:
        if want == "1":
            raise SystemExit(f"FUSED_ACT_BUILD_CUDA=1, but {missing}")
        print(f"fused_act: not building the CUDA kernels: {missing}")
        return {}
    # no -std and no arch flags: torch's builder adds its own (fused_act/_build.py)
    ext = cpp_extension.CUDAExtension(
        "fused_act._C", [f"csrc/{s}" for s in cfg.SOURCES], include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS})

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:
                if want == "1":
                    raise
                print(f"fused_act: building the CUDA kernels failed ({e}); installing without "
                      "them (FUSED_ACT_BUILD_CUDA=1 makes this an error)")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt}}


setup(**cuda_build())
