"""The Triton side of the tiling every kernel family shares (``fused_act/plan.py``: the plans,
their layouts and partial-sum slots): a program's tile, its partial sums, its parameters, and
the store every kernel writes through."""

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

import triton
import triton.language as tl

from .math import INTERPRETED, fp32_to_bf16_bits, opmath, settle_cache_keys


class Plan(Protocol):
    """What a launcher reads of the plan the host chose (``fused_act/plan.py`` ``Plan``): the
    kernels import nothing from the host package."""

    rows: int
    cols: int
    channels: int
    layout: int
    block_r: int
    block_l: int
    samples: int

    @property
    def flat(self) -> bool: ...
    @property
    def int64(self) -> bool: ...
    @property
    def grid(self) -> tuple[int]: ...
    @property
    def partials(self) -> int: ...

NUM_WARPS = 4  # with plan.BLOCK 2048: 16 (bf16) or 8 (fp32) elements a thread (bench/NOTES.md)


def num_warps(dtype) -> int:
    """Warps a program of a plan's tile runs for data of ``dtype``: ``NUM_WARPS``, twice that for
    fp64, whose 16 values a thread (and twice as many registers each) spill the larger kernels;
    at 8 a thread they stay in registers, with the tile, and so the plan, unchanged."""
    return 2 * NUM_WARPS if dtype.itemsize == 8 else NUM_WARPS


@triton.jit
def tile(pid, R, L, S, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, FLAT: tl.constexpr,
         INT64: tl.constexpr):
    """This program's tile: (sample, row block, column block, rows, cols, offsets, mask,
    row mask); the row block counts across samples."""
    if INT64:
        pid = pid.to(tl.int64)
    rows_per_sample = R // S
    n_l = tl.cdiv(L, BLOCK_L)
    n_r = tl.cdiv(rows_per_sample, BLOCK_R)
    pid_l = pid % n_l
    t = pid // n_l
    sample = t // n_r
    pid_r = t % n_r
    r_in = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = sample * rows_per_sample + r_in
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    if FLAT:
        # one row (R == 1, BLOCK_R == 1): offsets without the row multiply, which the compiler
        # sees as contiguous and aligned whatever L is; still, the mask limits the accesses to
        # 16 bytes only where L is a multiple of 16 (``whole``)
        offs = cols[None, :]
    else:
        # rows start on 16-byte boundaries only where L is a multiple of 16, all Triton knows
        # of L: other row lengths get one-element accesses, masked or not
        offs = rows[:, None] * L + cols[None, :]
    row_mask = r_in < rows_per_sample
    mask = row_mask[:, None] & (cols[None, :] < L)
    return sample, sample * n_r + pid_r, pid_l, rows, cols, offs, mask, row_mask


_tracing = threading.local()


@contextlib.contextmanager
def traced_launches() -> Iterator[None]:
    """Within the block, every launcher's kernels are recorded into a graph being traced (as
    ``torch.library.wrap_triton`` records them) instead of run: a traced program, such as an
    AOTInductor package, then holds these kernels themselves (fused_act/deploy.py)."""
    previous, _tracing.on = getattr(_tracing, "on", False), True
    try:
        yield
    finally:
        _tracing.on = previous


def launch(kernel: triton.JITFunction) -> object:
    """``kernel``, launchable as ``launch(kernel)[grid](...)``; a traceable launch within
    ``traced_launches``."""
    if not getattr(_tracing, "on", False):
        return kernel
    if INTERPRETED.value:
        # the interpreter's kernels run on the host: a graph would hold no launch at all
        raise RuntimeError("fused_act: Triton kernels run by the interpreter "
                           "(TRITON_INTERPRET=1) cannot be traced into a graph")
    from torch.library import wrap_triton
    return wrap_triton(kernel)


def tail_apart(p: Plan) -> bool:
    """Whether a kernel runs the tiles of plan ``p`` unmasked but for the last (the ``SPLIT``
    its ``whole`` takes): for a flat row whose length is not a multiple of 16, where the mask
    ``cols < L`` would make every access of the kernel one element wide (the compiler cannot
    prove it uniform over 16 bytes)."""
    return p.flat and p.cols % 16 != 0


@triton.jit
def whole(pid, L, BLOCK_L: tl.constexpr, INT64: tl.constexpr, SPLIT: tl.constexpr):
    """With SPLIT (``tail_apart``), whether the flat tile of program ``pid`` lies wholly
    inside the row, to run with mask None; else False, for a kernel with one masked body."""
    if SPLIT:
        if INT64:
            pid = pid.to(tl.int64)
        # the tile's last column, written so that nothing overflows near 2^31
        r = pid * BLOCK_L <= L - BLOCK_L
    else:
        r = False
    return r


@triton.jit
def keep(v, mask):
    """``v`` where ``mask`` (None: everywhere), else 0: a tile's terms of a partial sum."""
    if mask is None:
        r = v
    else:
        r = tl.where(mask, v, 0.0)
    return r


@triton.jit
def store_rounded(ptrs, v, mask):
    """Store ``v`` at ``ptrs`` in their element type, a narrower float rounded to nearest even
    (as torch's ``.to``): every kernel stores through here, the one place that says how."""
    ty = ptrs.dtype.element_ty
    if INTERPRETED and ty == tl.bfloat16:
        out = fp32_to_bf16_bits(v)
    else:
        # the default of triton 3.6 to 3.9 (arith.truncf, cvt.rn on NVIDIA), asked for by name
        out = v.to(ty, fp_downcast_rounding="rtne")
    tl.store(ptrs, out, mask=mask)


@triton.jit
def store_partial(partial_ptr, v, block_r_id, pid_l, rows, cols, row_mask, R, L,
                  LAYOUT: tl.constexpr):
    """Reduce the tile ``v`` to one partial per row (ROWS) or per column (COLS) and store it."""
    if LAYOUT == 1:
        store_rounded(partial_ptr + pid_l * R + rows, tl.sum(v, axis=1), row_mask)
    else:
        store_rounded(partial_ptr + block_r_id * L + cols, tl.sum(v, axis=0), cols < L)


@triton.jit
def load_channel(ptr, rows, cols, C, LAYOUT: tl.constexpr):
    """A per-channel parameter, broadcastable against the tile, upcast like the data."""
    if LAYOUT == 1:
        v = tl.load(ptr + rows % C)[:, None]
    else:
        v = tl.load(ptr + cols, mask=cols < C, other=1.0)[None, :]
    return opmath(v)


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
