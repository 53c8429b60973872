"""Which implementation runs an op: "auto" | "triton" | "cuda" | "cpu" | "reference".

The default comes from ``FUSED_ACT_BACKEND`` (else "auto").  "auto" sends CUDA tensors to the
Triton kernels (to the CUDA C++ kernels where Triton is missing and those are built or buildable),
CPU tensors to the CPU C++ kernels (``csrc/cpu.cpp``, built on first use; the reference where they
cannot be built), and everything else to the reference.  "triton" also runs CPU tensors, through
Triton's interpreter, when ``TRITON_INTERPRET=1`` was set before the kernels were first used; a CPU
tensor without it is a clear error.  "cuda" names the CUDA C++ kernels (``csrc/``, ``_cuda.py``):
CUDA tensors only, and asking for it where they cannot run says why; "cpu" names the CPU kernels,
CPU tensors only.  Availability is probed once and explained by ``python -m fused_act.info``.

``set_backend`` sets the process-wide default; ``use_backend`` overrides it for its block in the
current thread only, so threads serving different models do not see each other's blocks.  A
new thread starts from the default.

The backend in force when an op's forward runs is recorded with its autograd node and runs that
node's backward, wherever the backward is called (as torch does for autocast): with
``use_backend("triton"): y = model(x)`` then ``y.backward()`` outside the block, the backward is
Triton's too.  Under ``torch.compile`` the backend in force when a graph is traced is part of the
graph (changing it recompiles), as ``config.compile_mode`` is.  A ``torch.export`` graph holds
no backend: it runs each op with the backend in force where and when it runs.
"""

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch

from . import _cpu, _cuda

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fused_act: unknown backend {name!r}; choose one of {BACKENDS}")
    if name in ("cuda", "cpu"):
        ok, why = cuda_status() if name == "cuda" else cpu_status()
        if not ok:
            raise RuntimeError(f"fused_act: backend {name!r} is not available: {why}")
    return name


_default = _check(os.environ.get("FUSED_ACT_BACKEND", "auto"))


class _Scoped(threading.local):
    """The innermost ``use_backend`` block of each thread (None outside one).  A thread-local,
    not a context variable: torch.compile traces (and guards on) attribute reads of a
    threading.local on every supported torch, but not ContextVar.get before 2.15.  Every
    thread's storage holds ``name`` from its start (``__init__`` runs once per thread), so the
    read is a plain attribute read (getattr with a default pays a caught AttributeError on
    every op) and Dynamo guards on the thread's own value: a class default would be guarded as
    the class's, and a compiled graph would not follow a later ``use_backend``."""

    def __init__(self) -> None:
        self.name: str | None = None


_scoped = _Scoped()


def set_backend(name: str) -> None:
    """Select the process-wide default implementation for later calls: "auto", "triton", "cuda",
    "cpu" or "reference".  A ``use_backend`` block in force keeps its own choice until it ends."""
    global _default
    _default = _check(name)


def get_backend() -> str:
    """The backend in force here: the innermost ``use_backend`` block of this thread, else the
    default that ``set_backend`` or ``FUSED_ACT_BACKEND`` chose."""
    return _scoped.name or _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with ``name`` as the backend in this thread, then restore the previous one.
    Backward passes of ops run in the block use ``name`` too, even when called after it."""
    previous, _scoped.name = _scoped.name, _check(name)
    try:
        yield
    finally:
        _scoped.name = previous


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(available, why) for the Triton kernels on this machine."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton cannot be imported ({e})"
    if interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1): runs CPU tensors"
    if torch.cuda.is_available():
        return True, f"Triton on {torch.cuda.get_device_name()}"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


def cuda_status() -> tuple[bool, str]:
    """(available, why) for the CUDA C++ kernels: built, or buildable on first use."""
    return _cuda.status()


def cpu_status() -> tuple[bool, str]:
    """(available, why) for the CPU C++ kernels: built, or buildable on first use."""
    return _cpu.status()


def resolve(device: torch.device, name: str) -> str:
    """The implementation that backend ``name`` (as ``set_backend`` takes it; an op records the
    one in force at its forward) runs a tensor on ``device`` with: "triton", "cuda", "cpu" or
    "reference"."""
    if name == "reference":
        return name
    if name == "auto":
        if device.type == "cpu":
            return "cpu" if cpu_status()[0] else "reference"
        if device.type != "cuda":
            return "reference"
        if triton_status()[0]:
            return "triton"
        return "cuda" if cuda_status()[0] else "reference"
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(
                f"fused_act: backend 'cuda' cannot run a {device.type} tensor; use backend "
                "'auto' or 'reference' for it")
        return name
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(
                f"fused_act: backend 'cpu' cannot run a {device.type} tensor; use backend "
                "'auto' or 'reference' for it")
        return name
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"fused_act: backend 'triton' is not available: {why}")
        return name
    raise RuntimeError(
        f"fused_act: backend 'triton' cannot run a {device.type} tensor: Triton needs a CUDA "
        "device, or TRITON_INTERPRET=1 (set before fused_act's kernels are first used) to run on "
        "the CPU; use backend 'auto' or 'reference' for CPU tensors")
