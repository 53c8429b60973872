"""The CUDA C++ kernels (``csrc/``): loads ``fused_act._C``, or builds it on first use.

``setup.py`` builds ``fused_act._C`` when a CUDA build of torch and nvcc are present.  Without
it, the first use of backend "cuda" on a GPU machine compiles ``csrc/`` (shipped with the
package) with ``torch.utils.cpp_extension.load`` and ninja, once, into torch's extension cache,
and says so in one log line.  ``ExtensionKernels`` implements ``kernels.Kernels`` over it (and
over the CPU kernels, ``_cpu.py``, which share its C interface and binding).
"""

import functools
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ._build import CXX_FLAGS, NVCC_FLAGS, SOURCES, nvcc_path
from .plan import Plan

log = logging.getLogger("fused_act")

# csrc/fused_act.h fa_act_quant's selectors
FP8_CODES = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
SCALING_CODES = {"tensor": 0, "row": 1, "block": 2, "amax": 3}


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


class ExtensionKernels:
    """``kernels.Kernels`` over ``fused_act._C`` or the CPU kernels' extension (csrc/binding.cpp,
    which checks the tensors and passes raw pointers and the plan's fields to csrc/fused_act.h)."""

    def __init__(self, lib: ModuleType) -> None:
        self.lib = lib
        if not hasattr(lib, "act_quant"):
            # the CPU kernels' extension has no act_quant: offering none sends kernels.offers
            # callers to the reference math
            self.act_quant = None  # type: ignore[assignment]
        if not hasattr(lib, "quantize"):
            # the CUDA kernels quantise in act_quant, never writing the activation
            self.quantize = None  # type: ignore[assignment]
        if not hasattr(lib, "merge_stats"):
            # on a device, the statistics' merge is a few torch ops on device-resident partials,
            # and the backward's two passes recompute f' rather than keep dz in memory
            self.merge_stats = None  # type: ignore[assignment]
            self.batch_norm_backward = None  # type: ignore[assignment]

    def act_forward(self, x: Tensor, y: Tensor, act: int, beta: Tensor | None,
                    beta_value: float, p: Plan) -> None:
        self.lib.act_forward(x, y, act, beta, beta_value, p.fields())

    def act_backward(self, g: Tensor, x: Tensor, dx: Tensor, act: int, beta: Tensor | None,
                     beta_value: float, partial: Tensor | None, p: Plan) -> None:
        self.lib.act_backward(g, x, dx, act, beta, beta_value, partial, p.fields())

    def acon_forward(self, x: Tensor, y: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
                     per_sample: bool, p: Plan) -> None:
        self.lib.acon_forward(x, y, p1, p2, beta, per_sample, p.fields())

    def acon_backward(self, g: Tensor, x: Tensor, dx: Tensor, p1: Tensor, p2: Tensor,
                      beta: Tensor, per_sample: bool, partial: Tensor | None, p: Plan) -> None:
        self.lib.acon_backward(g, x, dx, p1, p2, beta, per_sample, partial, p.partials,
                               p.fields())

    def max_forward(self, x: Tensor, t: Tensor, y: Tensor, code: Tensor | None,
                    p: Plan) -> None:
        self.lib.max_forward(x, t, y, code, p.fields())

    def max_backward(self, g: Tensor, code: Tensor, dx: Tensor, dt: Tensor, p: Plan) -> None:
        self.lib.max_backward(g, code, dx, dt, p.fields())

    def max_affine(self, x: Tensor, t: Tensor, a: Tensor, b: Tensor, y: Tensor,
                   p: Plan) -> None:
        self.lib.max_affine(x, t, a, b, y, p.fields())

    def glu_forward(self, gate: Tensor, up: Tensor, out: Tensor, strides: tuple[int, ...],
                    act: int, beta: Tensor | None, beta_value: float, p: Plan) -> None:
        self.lib.glu_forward(gate, up, out, strides, act, beta, beta_value, p.fields())

    def glu_backward(self, g: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor,
                     strides: tuple[int, ...], act: int, beta: Tensor | None, beta_value: float,
                     partial: Tensor | None, p: Plan) -> None:
        self.lib.glu_backward(g, gate, up, dgate, dup, strides, act, beta, beta_value, partial,
                              p.fields())

    def act_quant(self, gate: Tensor, up: Tensor | None, q: Tensor, scales: Tensor,
                  strides: tuple[int, ...], act: int, beta_value: float, scaling: str,
                  block: int, p: Plan, params: tuple | None = None) -> None:
        """``kernels.Kernels.act_quant`` (csrc/quant.cu)."""
        if up is not None and up.dtype != gate.dtype:
            # the kernels read gate and up in one dtype: fp32 holds fp16 and bf16 values exactly
            gate, up = gate.float().contiguous(), up.float().contiguous()
            strides = (gate.shape[-1], gate.shape[-1])
        beta, p1, p2, run = params or (None, None, None, 1)
        self.lib.act_quant(gate, up, q, scales, list(strides), act, beta_value,
                           FP8_CODES[q.dtype], SCALING_CODES[scaling], block, beta, p1, p2, run,
                           p.fields())

    def quantize(self, y: Tensor, q: Tensor, scales: Tensor, scale: Tensor | None,
                 scaling: str, block: int) -> None:
        """``kernels.Kernels.quantize`` (csrc/cpu.cpp)."""
        self.lib.quantize(y, q, scales, scale, FP8_CODES[q.dtype], SCALING_CODES[scaling],
                          block)

    def stats(self, x: Tensor, partial: Tensor, p: Plan) -> None:
        self.lib.stats(x, partial.view(3, p.partials), p.partials, p.fields())

    def merge_stats(self, partial: Tensor, p: Plan) -> tuple[Tensor, Tensor]:
        return self.lib.merge_stats(partial.view(3, p.partials), p.channels)

    def batch_norm_backward(self, g: Tensor, x: Tensor, dx: Tensor, act: int, c: Tensor,
                            a: Tensor, b: Tensor, invstd: Tensor, beta_value: float,
                            sums: Tensor, p: Plan) -> None:
        self.lib.batch_norm_backward(g, x, dx, act, c, a, b, invstd, beta_value, sums,
                                     p.fields())

    def affine_act_forward(self, x: Tensor, y: Tensor, act: int, c: Tensor, a: Tensor,
                           b: Tensor, beta: Tensor | None, beta_value: float, p: Plan,
                           acon: tuple[Tensor, Tensor] | None = None) -> None:
        p1, p2 = (None, None) if acon is None else acon
        self.lib.affine_act_forward(x, y, act, c, a, b, _acon_beta(beta, beta_value, acon, p),
                                    beta_value, p1, p2, p.fields())

    def affine_act_backward(self, g: Tensor, x: Tensor, dx: Tensor | None, act: int, c: Tensor,
                            a: Tensor, b: Tensor, beta: Tensor | None, beta_value: float,
                            k: tuple[Tensor, Tensor] | None, partial: Tensor | None,
                            p: Plan, acon: tuple[Tensor, Tensor] | None = None) -> None:
        k1, k0 = (None, None) if k is None else k
        p1, p2 = (None, None) if acon is None else acon
        rows = None if partial is None else partial.view(-1, p.partials)
        self.lib.affine_act_backward(g, x, dx, act, c, a, b,
                                     _acon_beta(beta, beta_value, acon, p), beta_value, p1, p2,
                                     k1, k0, rows, p.partials, p.fields())


def _acon_beta(beta: Tensor | None, beta_value: float, acon: tuple[Tensor, Tensor] | None,
               p: Plan) -> Tensor | None:
    """beta as the kernels read it: ACON-C's is a tensor of C values, beta_value repeated where
    none is given (as the Triton kernels read beta_value)."""
    if acon is None or beta is not None:
        return beta
    return acon[0].new_full((p.channels,), beta_value)
