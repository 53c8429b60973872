"""The CPU kernels (``csrc/cpu.cpp`` with ``csrc/binding.cpp``): built on first use.

Backend "auto" runs CPU tensors with them, and backend "cpu" names them.  The first use on a
machine compiles them with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja), for the
vector instruction set torch itself uses there (``torch.backends.cpu.get_cpu_capability()``),
once per torch version and instruction set, into torch's extension cache, and says so in one log
line; later processes load the cached library silently.  Where they cannot be built, "auto" runs
the reference and ``python -m fused_act.info`` says why; ``FUSED_ACT_BUILD_CPU=0`` forbids the
build.
"""

import functools
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from ._build import CPU_SOURCES, cpu_flags

log = logging.getLogger("fused_act")

# why the build failed in this process, once it has (then "auto" runs the reference)
_failed: list[str] = []
_lock = threading.Lock()


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def status() -> tuple[bool, str]:
    """(available, why): built in this process, or buildable here; never builds."""
    if _failed:
        return False, _failed[0]
    if os.environ.get("FUSED_ACT_BUILD_CPU") == "0":
        return False, "FUSED_ACT_BUILD_CPU=0 forbids building them"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler ({compiler}) to build them"
    if shutil.which("ninja") is None:
        return False, "ninja (pip install ninja) is missing to build them"
    from ._cuda import source_dir
    try:
        source_dir()
    except FileNotFoundError as e:
        return False, str(e)
    return True, f"csrc/cpu.cpp for {_capability()}, built on first use (cached by torch)"


def library() -> ModuleType:
    """The CPU kernels' extension, built here once per torch version and instruction set."""
    with _lock:  # one build, whichever thread first needs it
        return _load()


@functools.cache
def _load() -> ModuleType:
    ok, why = status()
    if not ok:
        raise RuntimeError(f"fused_act: backend 'cpu' is not available: {why}")
    from torch.utils import cpp_extension

    from ._cuda import source_dir
    src = source_dir()
    cap = _capability()
    name = "fused_act_cpu_" + re.sub(r"\W", "_", f"{torch.__version__}_{cap}")
    if not _cached(cpp_extension, name):
        log.warning("fused_act: building the CPU kernels for %s from %s (once per torch "
                    "version; about half a minute)", cap, src)
    try:
        return cpp_extension.load(name=name, sources=[str(src / s) for s in CPU_SOURCES],
                                  extra_include_paths=[str(src)],
                                  extra_cflags=cpu_flags(cap, _openmp()))
    except Exception as e:
        _failed.append(f"building them failed ({type(e).__name__}: {e})")
        status.cache_clear()
        raise RuntimeError(f"fused_act: building the CPU kernels failed: {e}") from e


def _openmp() -> bool:
    """Whether to build with torch's OpenMP threads: where torch has them, except with Apple's
    compiler, which has no -fopenmp (there the kernels run on one thread)."""
    return torch.backends.openmp.is_available() and sys.platform != "darwin"


def _cached(cpp_extension: ModuleType, name: str) -> bool:
    """Whether torch's extension cache already holds a build of ``name`` (then loading it takes
    a second, and deserves no warning)."""
    try:
        # private, but the only way to the directory load() uses without building
        root = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # noqa: BLE001 - a torch without it: warn, as for a first build
        return False
    return any(root.glob(f"{name}*.so"))
