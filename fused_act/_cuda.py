"""The CUDA C++ kernels (``csrc/``): loads ``fused_act._C``, or builds it on first use.

``setup.py`` builds ``fused_act._C`` when a CUDA build of torch and nvcc are present.  Without
it, the first use of backend "cuda" on a GPU machine compiles ``csrc/`` (shipped with the
package) with ``torch.utils.cpp_extension.load`` and ninja, once, into torch's extension cache,
and says so in one log line.  The functions below mirror the Triton modules' (``forward``,
``backward`` per family), so ``ops.py`` calls either backend the same way.
"""

import functools
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from . import plan
from ._build import CXX_FLAGS, NVCC_FLAGS, SOURCES, nvcc_path

log = logging.getLogger("fused_act")


def source_dir() -> Path:
    """csrc/: beside the installed package (wheel), or at the root of a source checkout."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if (d / "fused_act.h").is_file():
            return d
    raise FileNotFoundError(f"fused_act: csrc/ not found beside {here}")


def _prebuilt() -> ModuleType | None:
    try:
        from . import _C
    except ImportError:
        return None
    return _C


@functools.cache
def status() -> tuple[bool, str]:
    """(available, why): prebuilt, or buildable here on first use; never builds."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if _prebuilt() is not None:
        return True, "fused_act._C, built at install"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if os.environ.get("FUSED_ACT_BUILD_CUDA") == "0":
        return False, "not built at install, and FUSED_ACT_BUILD_CUDA=0 forbids building it"
    if nvcc_path() is None:
        return False, "not built at install, and no nvcc to build it (set CUDA_HOME)"
    if shutil.which("ninja") is None:
        return False, "not built at install, and ninja (pip install ninja) is missing to build it"
    try:
        source_dir()
    except FileNotFoundError as e:
        return False, str(e)
    return True, "csrc/ is built on first use (nvcc, ninja; cached by torch)"


@functools.cache
def library() -> ModuleType:
    """fused_act._C, or the same extension built from csrc/ (once per machine)."""
    ok, why = status()
    if not ok:
        raise RuntimeError(f"fused_act: backend 'cuda' is not available: {why}")
    module = _prebuilt()
    if module is not None:
        return module
    from torch.utils import cpp_extension
    src = source_dir()
    log.warning("fused_act: building the CUDA kernels from %s (once; a minute or two)", src)
    return cpp_extension.load(
        name="fused_act_C", sources=[str(src / s) for s in SOURCES],
        extra_include_paths=[str(src)], extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS)


def _elementwise_plan(x: torch.Tensor, beta: torch.Tensor | None) -> plan.Plan:
    return plan.flat(x.numel(), plan.SCALAR) if beta is None else plan.channel_plan(
        x, beta.numel())


def act_forward(x: torch.Tensor, y: torch.Tensor, act: int, beta: torch.Tensor | None,
                beta_value: float) -> None:
    """Write f(x) into ``y`` (as ``triton_kernels.elementwise.forward``)."""
    p = _elementwise_plan(x, beta)
    library().act_forward(x, y, act, beta, beta_value, p.fields())


def act_backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, act: int,
                 beta: torch.Tensor | None, beta_value: float, need_dbeta: bool
                 ) -> torch.Tensor | None:
    """Write grad * f'(x) into ``dx``; return d/dbeta per channel if asked (as
    ``triton_kernels.elementwise.backward``)."""
    p = _elementwise_plan(x, beta)
    partial = torch.empty(p.partials, dtype=plan.accumulator(x),
                          device=x.device) if need_dbeta else None
    library().act_backward(g, x, dx, act, beta, beta_value, partial, p.fields())
    return None if partial is None else plan.channel_sums(partial, p)


def acon_forward(x: torch.Tensor, y: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                 beta: torch.Tensor, per_sample: bool) -> None:
    """Write ACON-C of ``x`` into ``y`` (as ``triton_kernels.acon.forward``)."""
    p = plan.channel_plan(x, p1.numel(), per_sample)
    library().acon_forward(x, y, p1, p2, beta, per_sample, p.fields())


def acon_backward(g: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, p1: torch.Tensor,
                  p2: torch.Tensor, beta: torch.Tensor, per_sample: bool, need_params: bool,
                  out_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Write grad * dy/dx into ``dx``; return (dp1, dp2, dbeta) if asked (as
    ``triton_kernels.acon.backward``)."""
    p = plan.channel_plan(x, p1.numel(), per_sample)
    acc = plan.accumulator(x)
    partial = torch.empty(3 * p.partials, dtype=acc, device=x.device) if need_params else None
    library().acon_backward(g, x, dx, p1, p2, beta, per_sample, partial, p.partials,
                            p.fields())
    if partial is None:
        return None
    return plan.acon_sums(partial, p, x.shape[0], per_sample, out_dtype or acc)


def max_forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, code: torch.Tensor | None
                ) -> None:
    """y = max(x, t), and the win code if given (as ``triton_kernels.frelu.forward``)."""
    library().max_forward(x, t, y, code, plan.flat(x.numel(), plan.SCALAR).fields())


def max_backward(g: torch.Tensor, code: torch.Tensor, dx: torch.Tensor, dt: torch.Tensor
                 ) -> None:
    """dx, dt from the gradient and the win code (as ``triton_kernels.frelu.backward``)."""
    library().max_backward(g, code, dx, dt, plan.flat(g.numel(), plan.SCALAR).fields())


def max_affine(x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               y: torch.Tensor) -> None:
    """y = max(x, a t + b) per channel (as ``triton_kernels.frelu.forward_affine``)."""
    p = plan.channel_plan(x, a.numel())
    library().max_affine(x, t, a, b, y, p.fields())


# the families as ops.py reaches them, named as the Triton modules
elementwise = SimpleNamespace(forward=act_forward, backward=act_backward)
acon = SimpleNamespace(forward=acon_forward, backward=acon_backward)
frelu = SimpleNamespace(forward=max_forward, backward=max_backward, forward_affine=max_affine)
