"""How every kernel backend walks a dense tensor, and how it finishes parameter-gradient sums.

A dense tensor (no gaps, no overlaps, any dim order: contiguous, channels_last, permuted) is
processed in place of its memory, viewed as a matrix of ``rows`` x ``cols`` in tiles of
``block_r`` x ``block_l``, so that a per-channel (or per-sample) parameter costs one index per
row or column instead of a division per element:

* no parameter: one row of ``numel`` columns (``flat``);
* ROWS: channels outer to a contiguous run (NCHW): a row is a run of ``inner = stride(1)``
  elements, its channel is ``row % C`` and, when N is outermost, its sample ``row // (R / N)``;
* COLS: channels innermost (channels_last, (N, C) after a Linear): a row holds the ``C``
  channels of one position, the channel is the column.  With per-sample parameters the rows of
  each of the ``samples`` samples are tiled apart, so no tile straddles two samples.

Per-tile partial sums (parameter gradients) go to one slot per (column block, row) in ROWS and
per (row block, column) in COLS; every slot is written on every call, and ``channel_sums`` /
``acon_sums`` add the small buffer up in a fixed order: deterministic, no atomics, nothing to
zero.  The Triton kernels (``triton_kernels/tiling.py``) and the CUDA kernels (``csrc/tile.cuh``)
share these tiles and slots.
"""

import dataclasses
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

BLOCK = 2048  # elements a tile (bench/NOTES.md)
MAX_COLS_BLOCK = 64  # COLS tiles: at least BLOCK // 64 rows reduced into each partial
INT64_THRESHOLD = 2**31  # numel from which offsets are computed in 64 bits

SCALAR, ROWS, COLS = 0, 1, 2  # layouts; SCALAR: no parameter tensor


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Plan:
    """An R x L matrix in ``block_r`` x ``block_l`` tiles, rows split evenly into ``samples``;
    ``batch`` is N when a ROWS plan carries a per-sample parameter (else 0)."""

    rows: int
    cols: int
    channels: int
    layout: int
    block_r: int
    block_l: int
    samples: int = 1
    batch: int = 0

    @property
    def flat(self) -> bool:
        return self.rows == 1 and self.block_r == 1

    @property
    def int64(self) -> bool:
        """Whether offsets need 64 bits (the plan covers every element: rows x cols)."""
        return self.rows * self.cols >= INT64_THRESHOLD

    @property
    def row_blocks(self) -> int:
        return self.samples * cdiv(self.rows // self.samples, self.block_r)

    @property
    def col_blocks(self) -> int:
        return cdiv(self.cols, self.block_l)

    @property
    def grid(self) -> tuple[int]:
        return (self.row_blocks * self.col_blocks,)

    @property
    def partials(self) -> int:
        """Partial-sum slots per reduced quantity."""
        if self.layout == COLS:
            return self.row_blocks * self.cols
        return self.col_blocks * self.rows

    def fields(self) -> tuple[int, ...]:
        """The fields in declaration order: the plan as the CUDA kernels take it (csrc/fused_act.h
        ``fa_plan``, whose members are these, typed as ``C_TYPES``)."""
        return _FIELD_VALUES(self)


# The source of the C layout: fa_plan (csrc/fused_act.h) declares Plan's fields in their order
# with these C types (<type>_t).  tests/test_csrc.py checks the header's struct and its
# FA_PLAN_FIELDS (binding.cpp's check of a plan) against Plan and this table, and the emulated
# kernels' ctypes struct (tests/test_csrc_emulated.py) is built from them.
C_TYPES = {"rows": "int64", "cols": "int64", "channels": "int64", "layout": "int32",
           "block_r": "int32", "block_l": "int32", "samples": "int64", "batch": "int64"}
# Plan.fields(), as dataclasses.astuple without its deep copy (50x the cost, paid every launch)
_FIELD_VALUES = operator.attrgetter(*(f.name for f in dataclasses.fields(Plan)))


_R = TypeVar("_R")


def memo(fn: Callable[..., _R]) -> Callable[..., _R]:
    """``fn`` cached on its arguments, for the layout decisions every launch makes (a frozen
    Plan is a value, and building one costs a microsecond).  Arguments holding a symbolic size
    (a trace with dynamic shapes) have no hash: there ``fn`` runs uncached."""
    cached = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def lookup(*args: object) -> _R:
        try:
            hash(args)
        except TypeError:
            return fn(*args)
        return cached(*args)
    return lookup


@memo
def flat(n: int, layout: int = ROWS) -> Plan:
    """One row of ``n`` elements (``layout`` SCALAR when no parameter tensor is read)."""
    return Plan(1, n, 1, layout, 1, BLOCK)


def channel_plan(x: torch.Tensor, channels: int, per_sample: bool = False) -> Plan:
    """Tile a dense ``x`` of shape (N, C, *) for parameters of ``channels`` (1 or C) values per
    channel, or per (sample, channel) when ``per_sample`` (then N must be outermost in memory)."""
    return _channel_plan(x.numel(), x.shape[0] if x.dim() else 1, x.stride(1) if x.dim() > 1
                         else 1, channels, per_sample)


@memo
def _channel_plan(n: int, n0: int, inner: int, channels: int, per_sample: bool) -> Plan:
    """channel_plan of an x of ``n`` elements, ``n0`` samples and channel stride ``inner``."""
    batch = n0 if per_sample else 0
    if channels == 1:
        if not per_sample:
            return flat(n)
        inner = n // n0
        block_l = min(next_power_of_2(inner), BLOCK)
        return Plan(n0, inner, 1, ROWS, BLOCK // block_l, block_l, batch=batch)
    # an (N, C) input with a per-sample beta has a beta per element: as ROWS of one element its
    # tiles stay BLOCK long, where COLS would tile each one-row sample apart (tiles of C
    # elements, and more programs than a launch allows from N = 2^31)
    if inner == 1 and not (per_sample and n == n0 * channels):
        samples = n0 if per_sample else 1
        rows_per_sample = next_power_of_2(n // channels // samples)
        # few rows per sample: wide, short tiles
        block_l = min(next_power_of_2(channels), max(MAX_COLS_BLOCK, BLOCK // rows_per_sample))
        block_r = min(BLOCK // block_l, rows_per_sample)
        return Plan(n // channels, channels, channels, COLS, block_r, block_l, samples)
    block_l = min(next_power_of_2(inner), BLOCK)
    return Plan(n // inner, inner, channels, ROWS, BLOCK // block_l, block_l, batch=batch)


@memo
def row_plan(rows: int, cols: int, layout: int) -> Plan:
    """``rows`` rows of ``cols`` contiguous elements whose row strides the kernel takes per
    tensor (the gated ops: the halves of a packed tensor are such rows); one row is flat.
    A parameter is one value (``layout`` ROWS with one channel, or SCALAR)."""
    if rows == 1:
        return flat(cols, layout)
    block_l = min(next_power_of_2(cols), BLOCK)
    return Plan(rows, cols, 1, layout, BLOCK // block_l, block_l)


# row scaling holds rows of up to ROW_HOLD elements on chip (y computed once: LLM widths such
# as 11008 and 14336 in one pass); longer rows are walked twice in chunks of ROW_CHUNK, the
# activation recomputed.  A held row takes block_l / 1024 warps (triton_kernels/quant.py), 32
# values a thread: at 16384, 16 warps and 61 registers on sm_90 without spills, fewer than
# 8192's 80 at 8 warps (bench/codegen_triton.py's widest held row)
ROW_HOLD = 16384
ROW_CHUNK = 2048


@memo
def quant_plan(rows: int, cols: int, scaling: str, block: int, channels: int = 1,
               layout: int = SCALAR) -> Plan:
    """Tiles of the fused quantising kernels over ``rows`` rows of ``cols`` (the last dim):
    for "row", ``block_r`` whole rows a program, walked in ``block_l`` chunks (one chunk: the
    row held); otherwise ``block_r`` x ``block_l`` tiles, ``block_l`` a multiple of the MX
    ``block`` for "block", whose groups then never straddle two tiles.  With per-channel
    parameters (``channels`` values), ``layout`` says where a row's channel comes from: ROWS
    from its row (a run of rows a channel), COLS from its column (a 2-D (N, C) input)."""
    width = next_power_of_2(cols)
    if scaling == "row":
        block_l = width if width <= ROW_HOLD else ROW_CHUNK
    else:
        block_l = max(min(width, BLOCK), block if scaling == "block" else 1)
    return Plan(rows, cols, channels, layout,
                min(max(1, BLOCK // block_l), next_power_of_2(rows)), block_l)


def accumulator(x: torch.Tensor) -> torch.dtype:
    """The dtype partial sums are kept in: fp32, fp64 for fp64 data."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def channel_sums(partial: torch.Tensor, p: Plan) -> torch.Tensor:
    """The per-channel totals (``p.channels`` values) of one quantity's partials."""
    return partial.view(-1, p.channels).sum(0)


def acon_sums(partial: torch.Tensor, p: Plan, n: int, per_sample: bool,
              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dp1 (C,), dp2 (C,), dbeta (C,) or (N, C)) in ``out_dtype`` from the 3 x ``p.partials``
    partials of ACON-C's backward."""
    # Slot k of a partial belongs to channel k % C in both layouts (ROWS: k = block * R + row
    # with R a multiple of C; COLS: k = row block * C + channel), so one sum finishes all three
    # per-channel gradients.  A per-sample beta keeps its samples apart: ROWS slots run
    # (column block, sample, row in sample), COLS slots (sample, row block, channel).
    c = p.channels
    if not per_sample:
        sums = partial.view(3, -1, c).sum(1).to(out_dtype)
        return sums[0], sums[1], sums[2]
    if p.layout == ROWS:
        by_sample = partial.view(3, p.col_blocks, n, -1, c).sum((1, 3))  # (3, N, C)
    else:
        by_sample = partial.view(3, n, -1, c).sum(2)
    dp = by_sample[:2].sum(1).to(out_dtype)
    return dp[0], dp[1], by_sample[2].to(out_dtype)
