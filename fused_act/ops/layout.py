"""How the host lays tensors out for the kernels: dense tensors in place of their memory,
parameters flat in opmath, scalars rounded once, and the rows a gated op walks."""

import math
import struct

import torch
from torch import Tensor

from .. import plan


def is_dense(x: Tensor) -> bool:
    """True if ``x`` covers a gap-free, non-overlapping block of memory in some dim order."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return True  # the common layouts, answered in C++ (this runs on every call)
    expected = 1
    dims = sorted((st, s) for s, st in zip(x.shape, x.stride(), strict=True) if s != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def dense(x: Tensor) -> Tensor:
    """``x`` itself when dense, else one contiguous copy."""
    return x if is_dense(x) else x.contiguous()


def like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with ``x``'s strides (``x`` dense): a copy only when they differ, e.g. an
    expanded gradient from ``.sum()``."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def flat_param(p: Tensor, x: Tensor) -> Tensor:
    """A parameter as every kernel reads it: flat, contiguous (a strided view is copied: the
    kernels index it with unit stride) and in x's opmath dtype (fp32, or fp64 for fp64 x)."""
    return p.reshape(-1).to(plan.accumulator(x)).contiguous()


def fp32(v: float, like: Tensor | None = None) -> float | Tensor:
    """``v`` rounded to fp32, as every kernel takes a scalar: the one rounding of a float beta,
    applied on every path (kernels, the reference backend, the decomposed and the reference
    math), so that all agree bit for bit.  Where Dynamo traces, ``v`` may be symbolic and
    Python's rounding does not trace.  There, for math on ``like`` in fp32 (every dtype but
    fp64), ``v`` stays as it is: each fp32 op rounds a Python scalar once, as here, and the math
    keeps the float form of a beta (a tensor beta's form saves a mask of x's size for the
    backward, which made compiled silu 3-5x Inductor's own on CPU).  For fp64 math it is a 0-d
    fp32 tensor on ``like``'s device (the rounding traced).  Elsewhere (eager, and the fake
    kernels and decompositions that export runs on concrete arguments) it is a Python float: a
    tensor made there would be a constant of the graph, which export's functional graphs
    refuse."""
    if torch.compiler.is_dynamo_compiling() or isinstance(v, torch.SymFloat):
        if like is not None and like.dtype != torch.float64:
            # the math tests a float beta against 0 in Python: a beta fp32 rounds to 0 must be 0
            return v if not abs(v) <= 2.0 ** -150 else v * 0.0
        return torch.tensor(v, dtype=torch.float32, device=None if like is None else like.device)
    return struct.unpack("f", struct.pack("f", v))[0]



def row_stride(t: Tensor, k: int) -> int | None:
    """The distance between rows of ``t`` walked as prod(shape[:k]) rows of the prod(shape[k:])
    elements behind each, if those are contiguous and the rows evenly spaced; else None."""
    return _row_stride(tuple(t.shape), t.stride(), k)


def _row_stride(shape: tuple[int, ...], strides: tuple[int, ...], k: int) -> int | None:
    expected = 1
    for size, stride in zip(reversed(shape[k:]), reversed(strides[k:]), strict=True):
        if size != 1 and stride != expected:
            return None
        expected *= size
    row = None
    for size, stride in zip(reversed(shape[:k]), reversed(strides[:k]), strict=True):
        if size == 1:
            continue
        if row is None:
            row = stride
        elif stride != expected:
            return None
        expected = stride * size
    return expected if row is None else row


def row_walk(reads: tuple[Tensor, ...], writes: tuple[Tensor, ...]
             ) -> tuple[int, int, tuple[Tensor, ...], tuple[int, ...]]:
    """(rows, cols, reads, row strides of reads and writes): the split of the common shape into
    rows of contiguous elements that fits every written tensor and the most read ones, which
    are then used in place (the halves of a packed tensor: rows two halves apart); a read tensor
    that does not fit is copied once to contiguous.  Rows evenly spaced in every tensor are one
    flat row."""
    shape = writes[0].shape
    tensors = (*reads, *writes)
    if all(t.is_contiguous() and t.shape == shape for t in tensors):
        n = writes[0].numel()  # the common case, answered without the search below
        return 1, n, reads, (n,) * len(tensors)
    dims = (tuple((tuple(t.shape), t.stride()) for t in reads),
            tuple((tuple(t.shape), t.stride()) for t in writes))
    rows, cols, fits, strides = _split(*dims)
    return rows, cols, tuple(t if f else t.contiguous() for t, f in zip(reads, fits,
                                                                        strict=True)), strides


Dims = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


@plan.memo  # the split depends on sizes and strides alone: searched once per layout
def _split(reads: Dims, writes: Dims) -> tuple[int, int, tuple[bool, ...], tuple[int, ...]]:
    """row_walk's search on (sizes, strides) pairs: (rows, cols, which reads are used in place,
    row strides)."""
    shape = writes[0][0]
    best = None
    for k in range(len(shape) + 1):
        w = [_row_stride(*d, k) for d in writes]
        if None in w:
            continue
        r = [_row_stride(*d, k) for d in reads]
        fits = sum(s is not None for s in r)
        if best is None or fits > best[0]:
            best = fits, k, r, w
        if fits == len(reads):
            break
    _, k, r, w = best  # contiguous buffers fit every k
    rows, cols = math.prod(shape[:k]), math.prod(shape[k:])
    fit = tuple(s is not None for s in r)
    strides = tuple(cols if s is None else s for s in r) + tuple(w)
    if all(s == cols for s in strides):
        return 1, rows * cols, fit, strides
    return rows, cols, fit, strides
