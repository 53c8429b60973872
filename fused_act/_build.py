"""How the C++ kernels (``csrc/``) are built, in one place: ``setup.py`` (the CUDA kernels, at
install), ``_cuda.py`` and ``_cpu.py`` (first use) and the tests (compile checks, CPU emulation)
all read it.

fused_act adds only optimisation flags.  The C++ standard, the half/bfloat16 defines and the
architecture flags are those of torch's own extension builder, which adds them when the caller
gives none: a torch whose headers need C++20 is built with C++20, an older one with its own
standard.  This module imports nothing from fused_act, so setup.py can load it from the tree.
"""

import inspect
import os
import re
import shutil
from pathlib import Path

SOURCES = ("binding.cpp", "elementwise.cu", "acon.cu", "frelu.cu", "batchnorm.cu", "quant.cu")
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]
CPU_SOURCES = ("binding.cpp", "cpu.cpp")

# The instruction set of torch's SIMD vectors (at::vec) for each CPU capability torch reports:
# the flags and defines torch compiles its own kernels of that capability with.  Any other
# capability builds torch's portable vectors (NEON on aarch64).
CPU_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def cpu_flags(capability: str, openmp: bool = True) -> list[str]:
    """The compiler flags of the CPU kernels for ``torch.backends.cpu.get_cpu_capability()``;
    ``openmp``: torch's threads are OpenMP's (``torch.backends.openmp.is_available()``)."""
    # hidden: the C interface's symbols stay inside the library, apart from the CUDA kernels'
    # (fused_act._C exports the same names) in a process that loads both.  -fopenmp: at::
    # parallel_for is OpenMP code in torch's headers, serial without it; its runtime calls
    # resolve to the OpenMP library torch itself loaded (none is linked here).
    common = [*CXX_FLAGS, "-fvisibility=hidden", "-DFA_CPU", *(["-fopenmp"] if openmp else [])]
    arch = CPU_CAPABILITY_FLAGS.get(capability)
    if arch is None:
        return [*common, "-DCPU_CAPABILITY=DEFAULT"]
    return [*common, *arch, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


def torch_cxx_standard() -> str:
    """The ``-std=c++NN`` flag torch's extension builder compiles extensions with.

    The builder hard-codes it where it assembles compiler flags (no public constant names it),
    so it is read from the builder's source: the newest standard named there.  For callers that
    drive a compiler themselves (the tests) and must match what an install would build with.
    """
    from torch.utils import cpp_extension
    found = re.findall(r"-std=c\+\+(\d\d)\b", inspect.getsource(cpp_extension))
    if not found:
        raise RuntimeError("fused_act: cannot tell which C++ standard torch's extension "
                           "builder uses (no -std=c++NN in torch.utils.cpp_extension)")
    return f"-std=c++{max(int(v) for v in found)}"


def torch_nvcc_defines() -> list[str]:
    """The ``-D`` flags torch's builder passes nvcc (implicit half/bfloat16 conversions off)."""
    from torch.utils import cpp_extension
    return [f for f in cpp_extension.COMMON_NVCC_FLAGS if f.startswith("-D")]


def torch_nvcc_flags() -> list[str]:
    """Every flag torch's builder passes nvcc for any extension: the defines above and the few
    others that change what device code compiles to (``--expt-relaxed-constexpr``)."""
    from torch.utils import cpp_extension
    return list(cpp_extension.COMMON_NVCC_FLAGS)


def nvcc_path() -> str | None:
    """nvcc of torch's CUDA_HOME, else the one on PATH, else None."""
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")
