"""The kernel boundary: what a kernel backend ("triton", "cuda", "cpu") implements, and loading
one.

``Kernels`` is the whole interface between the host code (``ops/``) and a backend.  The host
lays every tensor out and chooses its tiling plan (``plan.py``); a backend only launches.  Every
data tensor is dense with x's strides and preallocated; parameters (beta, p1, p2, a, b) are
flat, contiguous and in opmath (fp32, fp64 for fp64 data); ``act`` is a kernel id of
``registry.KERNEL_IDS``; ``partial`` is the buffer of per-tile partial sums of parameter
gradients that the host finishes (``plan.channel_sums``, ``plan.acon_sums``), or None when no
parameter gradient is needed.  The gated ops (``glu_*``) walk their tensors as the rows of a
``plan.row_plan``, each tensor with its own row stride (``strides``, in argument order), so the
halves of a packed tensor are read and written in place.  ``triton_kernels.TritonKernels``
and ``_cuda.ExtensionKernels`` implement it, the latter over the C interface of
``csrc/fused_act.h`` (the CUDA kernels, and the CPU kernels of ``csrc/cpu.cpp``).
"""

import logging
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .backend import resolve
from .plan import Plan

log = logging.getLogger("fused_act")


class ChannelParams(NamedTuple):
    """The per-channel parameters of an activation that ``act_quant`` quantises: ``beta`` (a
    tensor beta of swish, or ACON-C's) and, for ACON-C, ``p1`` and ``p2``; each flat, contiguous,
    fp32, of the plan's ``channels`` values (one: the same everywhere).  In a ROWS plan a
    channel is ``run`` consecutive rows of the last dim: row r's channel is
    (r // run) % channels; in a COLS plan it is the column."""

    beta: Tensor
    p1: Tensor | None
    p2: Tensor | None
    run: int


class Kernels(Protocol):
    """The launchers every kernel backend provides (module docstring)."""

    def act_forward(self, x: Tensor, y: Tensor, act: int, beta: Tensor | None,
                    beta_value: float, p: Plan) -> None:
        """y = f(x) for kernel activation ``act`` (beta: a tensor, else ``beta_value``)."""

    def act_backward(self, g: Tensor, x: Tensor, dx: Tensor, act: int, beta: Tensor | None,
                     beta_value: float, partial: Tensor | None, p: Plan) -> None:
        """dx = g f'(x), and g df/dbeta into ``partial`` (``p.partials`` slots)."""

    def acon_forward(self, x: Tensor, y: Tensor, p1: Tensor, p2: Tensor, beta: Tensor,
                     per_sample: bool, p: Plan) -> None:
        """y = ACON-C of x (beta per sample, sample-major, where ``per_sample``)."""

    def acon_backward(self, g: Tensor, x: Tensor, dx: Tensor, p1: Tensor, p2: Tensor,
                      beta: Tensor, per_sample: bool, partial: Tensor | None, p: Plan) -> None:
        """dx = g dy/dx, and the dp1, dp2, dbeta partials (3 x ``p.partials`` slots)."""

    def max_forward(self, x: Tensor, t: Tensor, y: Tensor, code: Tensor | None,
                    p: Plan) -> None:
        """y = max(x, t), and the one-byte win code where ``code`` is given."""

    def max_backward(self, g: Tensor, code: Tensor, dx: Tensor, dt: Tensor, p: Plan) -> None:
        """dx, dt of max(x, t) from g and the win code."""

    def max_affine(self, x: Tensor, t: Tensor, a: Tensor, b: Tensor, y: Tensor,
                   p: Plan) -> None:
        """y = max(x, a t + b) with a, b per channel."""

    def glu_forward(self, gate: Tensor, up: Tensor, out: Tensor, strides: tuple[int, ...],
                    act: int, beta: Tensor | None, beta_value: float, p: Plan) -> None:
        """out = f(gate) * up for kernel activation ``act`` (beta: one value, else
        ``beta_value``); ``strides``: the row strides of gate, up, out."""

    def glu_backward(self, g: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor,
                     strides: tuple[int, ...], act: int, beta: Tensor | None, beta_value: float,
                     partial: Tensor | None, p: Plan) -> None:
        """dgate = g up f'(gate), dup = g f(gate), and g up df/dbeta into ``partial``;
        ``strides``: the row strides of g, gate, up, dgate, dup."""

    def stats(self, x: Tensor, partial: Tensor, p: Plan) -> None:
        """Per tile and channel: the count of x's values, their sum, and the sum of their
        squared distances from the tile's mean of them (3 x ``p.partials`` slots)."""

    def merge_stats(self, partial: Tensor, p: Plan) -> tuple[Tensor, Tensor]:
        """(mean, biased variance) of each channel, in opmath, from the partials ``stats``
        wrote, as ``ops.batchnorm.merge_stats`` computes them.  Optional (``OPTIONAL``)."""

    def batch_norm_backward(self, g: Tensor, x: Tensor, dx: Tensor, act: int, c: Tensor,
                            a: Tensor, b: Tensor, invstd: Tensor, beta_value: float,
                            sums: Tensor, p: Plan) -> None:
        """BatchNorm's training backward for kernel activation ``act`` with a float beta: the
        per-channel sums of dz = g f'(z) and dz (x - c) into ``sums`` (2, C), and dx = a dz +
        k1 (x - c) + k0 with k1 = -a invstd^2 sums[1] / m and k0 = -a sums[0] / m, f'
        evaluated once (``affine_act_backward`` twice).  Optional (``OPTIONAL``)."""

    def affine_act_forward(self, x: Tensor, y: Tensor, act: int, c: Tensor, a: Tensor,
                           b: Tensor, beta: Tensor | None, beta_value: float, p: Plan,
                           acon: tuple[Tensor, Tensor] | None = None) -> None:
        """y = f((x - c) a + b) with c, a, b (and a tensor beta) C values each; with ``acon``
        = (p1, p2), f is ACON-C of p1, p2 and beta (C values each; ``act`` unused)."""

    def affine_act_backward(self, g: Tensor, x: Tensor, dx: Tensor | None, act: int, c: Tensor,
                            a: Tensor, b: Tensor, beta: Tensor | None, beta_value: float,
                            k: tuple[Tensor, Tensor] | None, partial: Tensor | None,
                            p: Plan, acon: tuple[Tensor, Tensor] | None = None) -> None:
        """With ``dx``: dx = a g f'(z) (+ k1 (x - c) + k0 per channel, ``k`` = (k1, k0)); with
        ``partial``: the partials of g f'(z), g f'(z) (x - c), then of the activation's
        parameter gradients: g df/dbeta (3 rows), or with ``acon`` g df/dp1, g df/dp2,
        g df/dbeta (5 rows); ``p.partials`` slots a row."""

    def act_quant(self, gate: Tensor, up: Tensor | None, q: Tensor, scales: Tensor,
                  strides: tuple[int, ...], act: int, beta_value: float, scaling: str,
                  block: int, p: Plan, params: ChannelParams | None = None) -> None:
        """y = f(gate) (* up where given) in opmath, quantised into ``q`` (float8_e4m3fn or
        float8_e5m2, contiguous: its dtype is the format) without writing y, bit for bit as
        ``reference.quantize_fp8`` with ``scaling``: "tensor" by the one fp32 scale in
        ``scales``; "row" writing one fp32 scale a row into ``scales``; "block" one E8M0 byte
        a ``block`` elements; "amax" no q, but one partial amax of |y| (NaN if any y is) a
        tile of ``p.grid`` into ``scales``.  A ``plan.quant_plan`` over rows of the last dim;
        ``strides``: the row strides of gate and up.  With ``params``, f is ``act``
        with the tensor beta, or ACON-C where ``params.p1`` is given (``act`` unused), its
        parameters read per channel; with up as well, swish with a beta of one value (one
        channel).  Optional (``OPTIONAL``)."""


    def quantize(self, y: Tensor, q: Tensor, scales: Tensor, scale: Tensor | None,
                 scaling: str, block: int) -> None:
        """Contiguous fp32 ``y`` quantised into ``q`` (of y's shape, contiguous: its dtype is
        the format) and ``scales`` (contiguous, shaped as ``reference.quantize_fp8`` returns
        them) bit for bit as ``reference.quantize_fp8`` with ``scaling``, "tensor" dividing by
        ``scale`` (one fp32 value) where given: the quantisation of an activation a backend
        without ``act_quant`` wrote.  Optional (``OPTIONAL``)."""


# launchers a backend may lack: the host asks ``offers`` and runs the reference math (for
# merge_stats and batch_norm_backward, torch ops and other launchers) without
OPTIONAL = frozenset({"act_quant", "batch_norm_backward", "merge_stats", "quantize"})


def offers(k: Kernels | None, name: str) -> bool:
    """Whether the kernels ``k`` (None: the reference math) implement launcher ``name``, one of
    ``OPTIONAL`` (every backend implements the others)."""
    if name not in OPTIONAL:
        raise ValueError(f"fused_act.kernels: {name!r} is not an optional launcher")
    return k is not None and callable(getattr(k, name, None))


_loaded: dict[str, Kernels] = {}


def kernels(name: str) -> Kernels:
    """The kernels of backend ``name`` ("triton", "cuda" or "cpu"), loaded on first use: defining
    the Triton kernels reads TRITON_INTERPRET, loading the C++ ones may build them, and users of
    the reference pay for none."""
    if name not in _loaded:
        if name == "cuda":
            from ._cuda import ExtensionKernels, library
            _loaded[name] = ExtensionKernels(library())
        elif name == "cpu":
            from . import _cpu
            from ._cuda import ExtensionKernels
            _loaded[name] = ExtensionKernels(_cpu.library())
        elif name == "triton":
            from .triton_kernels import TritonKernels
            _loaded[name] = TritonKernels()
        else:
            raise ValueError(f"fused_act.kernels: no kernel backend {name!r} (kernel backends: "
                             f"'triton', 'cuda', 'cpu')")
    return _loaded[name]


def launcher(device: torch.device, backend: str) -> Kernels | None:
    """The kernels that ``backend`` (as ``set_backend`` takes it) runs a tensor on ``device``
    with, or None where that is the reference math (``backend.resolve`` decides)."""
    name = resolve(device, backend)
    if name == "reference":
        return None
    try:
        return kernels(name)
    except RuntimeError as e:
        if backend != "auto" or name != "cpu":
            raise
        # "auto" is the fastest implementation that runs here: the reference, when the CPU
        # kernels could not be built (resolve says "reference" from now on)
        log.warning("%s; backend 'auto' runs CPU tensors with the reference", e)
        return None
