"""An activation fused with FP8 quantisation: q = quantise(act(gate)) or quantise(act(gate) * up),
with y computed in fp32 as ``elementwise.py`` and ``gated.py`` compute it and never written.

One kernel, ``act_quant_kernel``, serves every activation (``ACT``), the elementwise and gated
forms (``GATED``), both formats (``FP8``) and every scaling (``SCALING``), as
``fused_act.reference.quantize_fp8`` defines them bit for bit:

* ``BLOCK_SCALES`` (MX): a tile covers whole groups of ``GROUP`` elements of a row; each group's
  E8M0 byte comes from the exponent field of its amax, and q = sat(y 2^-e), in one pass.
* ``ROW``: a program owns ``BLOCK_R`` whole rows.  A row of up to the plan's ``block_l``
  elements is held on chip (y computed once, reduced, divided); a longer one is walked twice in
  chunks, recomputing the activation, since holding it would spill registers.
* ``TENSOR``: q = sat(y / scale) for the one fp32 scale at ``scale_ptr`` (the caller's, or the
  one the host derived from ``AMAX``'s per-tile partial amaxes of |y|).

``PARAMS`` says where the activation's parameters come from: ``beta_value`` (SCALAR_BETA), a
tensor beta read per channel (BETA; gated: the gated op's one value, C = 1), or ACON-C's p1, p2
and beta per channel (ACON), the channel of a row of the last dim being ``(row // RUN) % C``
(``LAYOUT`` ROWS: x is (N, C, *inner)) or its column (COLS: x is (N, C)).

amaxes are taken on the bits of |y|: for non-negative floats the integer order is the float
order, with every NaN above inf, so an integer max is exact, deterministic and propagates NaN
without a separate test.  Scales and q divide with ``div_rn`` (IEEE), not ``/``, which the GPU
lowers to an approximate division.  The fp32 -> fp8 conversion is ``fp8_bits``, integer code of
our own on GPU and interpreter alike: the interpreter's fp8 casts do not round as the GPU's do.
"""

from typing import Protocol

import torch
import triton
import triton.language as tl

from .gated import INT32_MAX, _at
from .math import acon_c_fwd, act_fwd, opmath, settle_cache_keys
from .tiling import NUM_WARPS, Plan, launch, load_channel, tile


class ChannelParams(Protocol):
    """What the launcher reads of the host's per-channel parameters (``fused_act/kernels.py``
    ``ChannelParams``): flat fp32 tensors of the plan's ``channels`` values (p1, p2 None but
    for ACON-C), a channel ``run`` rows of the last dim in a ROWS plan."""

    beta: torch.Tensor
    p1: torch.Tensor | None
    p2: torch.Tensor | None
    run: int


# SCALING selectors
TENSOR = tl.constexpr(0)
ROW = tl.constexpr(1)
BLOCK_SCALES = tl.constexpr(2)
AMAX = tl.constexpr(3)
SCALINGS = {"tensor": 0, "row": 1, "block": 2, "amax": 3}

# FP8 selectors (each format's facts: where the kernels read them)
E4M3 = tl.constexpr(0)
E5M2 = tl.constexpr(1)
FORMATS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
NAN_CODE = tl.constexpr(0x7F)  # reference.FP8_NAN: one code for every NaN, whatever its sign
E8M0_NAN = tl.constexpr(0xFF)
AMAX_FLOOR = tl.constexpr(1e-12)  # reference.AMAX_FLOOR

# PARAMS selectors: where the activation's parameters come from
SCALAR_BETA = tl.constexpr(0)
BETA = tl.constexpr(1)
ACON = tl.constexpr(2)


@triton.jit
def fp8_bits(v, FP8: tl.constexpr):
    """The FP8 code (uint8) of fp32 ``v``: saturated to +-FMAX, rounded to nearest even,
    subnormals included, sign kept (-0 -> 0x80), every NaN -> 0x7F (``reference._to_fp8``)."""
    tl.static_assert(FP8 <= E5M2, "fp8_bits: unknown FP8 selector")
    # the format's mantissa bits, exponent bias and largest finite value as fp32 bits
    MANT: tl.constexpr = 3 if FP8 == E4M3 else 2
    BIAS: tl.constexpr = 7 if FP8 == E4M3 else 15
    FMAX_BITS: tl.constexpr = 0x43E00000 if FP8 == E4M3 else 0x47600000
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    # saturating first equals rounding then saturating: FMAX is a code, and no magnitude at or
    # below it rounds past it; integer order is float order here, inf included
    a = tl.minimum(bits & 0x7FFFFFFF, FMAX_BITS)
    # normal codes: rebias the exponent and round the mantissa's dropped bits to nearest even
    # (plus half an ulp less one, plus the kept lowest bit); a carry steps the exponent
    SHIFT: tl.constexpr = 23 - MANT
    normal = ((a + ((1 << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1)) >> SHIFT) \
        - ((127 - BIAS) << MANT)
    # below the least normal the code is the value in units of the least subnormal,
    # 2^(1 - BIAS - MANT), rounded to nearest even: the significand (implicit bit included;
    # fp32 subnormals have exponent 1 without it) shifted right by the distance of the units
    e = a >> 23
    m = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0).to(tl.uint32)
    # 31 and more shift every significand (< 2^24) to 0, as rounding does
    sh = tl.minimum(151 - BIAS - MANT - tl.maximum(e, 1), 31).to(tl.uint32)
    half = ((sh * 0 + 1) << (sh - 1)) - 1
    sub = (m + half + ((m >> sh) & 1)) >> sh
    code = tl.where(a < ((128 - BIAS) << 23), sub, normal) | sign
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, NAN_CODE, code).to(tl.uint8)


@triton.jit
def abs_bits(y, mask):
    """|y| as int32 bits (0 outside ``mask``): ordered as the floats, every NaN above inf."""
    b = (y.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    if mask is not None:
        b = tl.where(mask, b, 0)
    return b


@triton.jit
def _y(gate_ptr, up_ptr, beta_value, s_gate, s_up, rows, cols, mask, ACT: tl.constexpr,
       GATED: tl.constexpr, beta_ptr, p1_ptr, p2_ptr, RUN, C, PARAMS: tl.constexpr,
       LAYOUT: tl.constexpr):
    """act(gate) (* up) over the tile in fp32, as the elementwise, gated and ACON-C kernels
    compute it."""
    x = opmath(tl.load(_at(gate_ptr, rows, cols, s_gate, False), mask=mask))
    if PARAMS == SCALAR_BETA:
        y = act_fwd(x, beta_value, ACT)
    else:
        # rows of one channel are RUN consecutive rows (ROWS); COLS reads by column
        channel = rows // RUN
        b = load_channel(beta_ptr, channel, cols, C, LAYOUT)
        if PARAMS == BETA:
            y = act_fwd(x, b, ACT)
        else:
            tl.static_assert(PARAMS == ACON, "act_quant_kernel: unknown PARAMS selector")
            p2 = load_channel(p2_ptr, channel, cols, C, LAYOUT)
            y = acon_c_fwd(x, load_channel(p1_ptr, channel, cols, C, LAYOUT) - p2, p2, b)
    if GATED:
        y = y * opmath(tl.load(_at(up_ptr, rows, cols, s_up, False), mask=mask))
    return y


@triton.jit
def _row_scale(amax_bits, FP8: tl.constexpr):
    """max(amax, AMAX_FLOOR) / FMAX, one IEEE division (NaN stays NaN: no max() to drop it)."""
    FMAX: tl.constexpr = 448.0 if FP8 == E4M3 else 57344.0
    amax = amax_bits.to(tl.float32, bitcast=True)
    return tl.math.div_rn(tl.where(amax < AMAX_FLOOR, AMAX_FLOOR, amax), FMAX)


@triton.jit
def _block_quant(y, mask, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                 FP8: tl.constexpr):
    """(codes, E8M0 bytes (BLOCK_R, BLOCK_K // GROUP)) of the tile ``y``: reference
    ``_e8m0_exponent`` (the FLOOR rule on amax's exponent field), q = sat(y 2^-e)."""
    EMAX: tl.constexpr = 8 if FP8 == E4M3 else 15  # floor(log2(FMAX))
    NG: tl.constexpr = BLOCK_K // GROUP
    amax = tl.max(tl.reshape(abs_bits(y, mask), (BLOCK_R, NG, GROUP)), axis=2)
    biased = amax >> 23
    byte = tl.minimum(tl.maximum(biased - EMAX, 0), 254)
    # 2^-e from its exponent field: always a normal fp32, so the product is exact
    mult = ((254 - byte) << 23).to(tl.float32, bitcast=True)
    poisoned = biased == 0xFF
    v = tl.where(poisoned[:, :, None], float("nan"),
                 tl.reshape(y, (BLOCK_R, NG, GROUP)) * mult[:, :, None])
    q = tl.reshape(fp8_bits(v, FP8), (BLOCK_R, BLOCK_K))
    return q, tl.where(poisoned, E8M0_NAN, byte).to(tl.uint8)


@triton.jit
def _row_chunk(gate_ptr, up_ptr, beta_value, s_gate, s_up, rows, row_mask, cols, K,
               ACT: tl.constexpr, GATED: tl.constexpr, beta_ptr, p1_ptr, p2_ptr, RUN, C,
               PARAMS: tl.constexpr, LAYOUT: tl.constexpr):
    """(y, cols, mask) of the columns ``cols`` of whole rows walked in chunks."""
    mask = row_mask[:, None] & (cols[None, :] < K)
    return _y(gate_ptr, up_ptr, beta_value, s_gate, s_up, rows, cols, mask, ACT, GATED,
              beta_ptr, p1_ptr, p2_ptr, RUN, C, PARAMS, LAYOUT), cols, mask


@triton.jit
def act_quant_kernel(gate_ptr, up_ptr, q_ptr, scale_ptr, beta_value, s_gate, s_up, R, K,
                     beta_ptr, p1_ptr, p2_ptr, RUN, C,
                     ACT: tl.constexpr, GATED: tl.constexpr, SCALING: tl.constexpr,
                     FP8: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr, INT64: tl.constexpr, PARAMS: tl.constexpr,
                     LAYOUT: tl.constexpr):
    pid = tl.program_id(0)
    if SCALING == ROW:
        # whole rows a program: the tile walks along them
        if INT64:
            pid = pid.to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        lanes = tl.arange(0, BLOCK_K)
        if BLOCK_K >= K:
            # the row held: one read, one activation
            mask = row_mask[:, None] & (lanes[None, :] < K)
            y = _y(gate_ptr, up_ptr, beta_value, s_gate, s_up, rows, lanes, mask, ACT, GATED,
                   beta_ptr, p1_ptr, p2_ptr, RUN, C, PARAMS, LAYOUT)
            scale = _row_scale(tl.max(abs_bits(y, mask), axis=1), FP8)
            q = fp8_bits(tl.math.div_rn(y, scale[:, None]), FP8)
            tl.store(q_ptr + rows[:, None] * K + lanes[None, :], q, mask=mask)
        else:
            # while, not for: triton 3.6's interpreter cannot run a loop over a runtime range
            amax = tl.zeros((BLOCK_R,), tl.int32)
            start = 0
            while start < K:
                y, cols, mask = _row_chunk(gate_ptr, up_ptr, beta_value, s_gate, s_up, rows,
                                           row_mask, start + lanes, K, ACT, GATED, beta_ptr,
                                           p1_ptr, p2_ptr, RUN, C, PARAMS, LAYOUT)
                amax = tl.maximum(amax, tl.max(abs_bits(y, mask), axis=1))
                start += BLOCK_K
            scale = _row_scale(amax, FP8)
            start = 0
            while start < K:
                y, cols, mask = _row_chunk(gate_ptr, up_ptr, beta_value, s_gate, s_up, rows,
                                           row_mask, start + lanes, K, ACT, GATED, beta_ptr,
                                           p1_ptr, p2_ptr, RUN, C, PARAMS, LAYOUT)
                q = fp8_bits(tl.math.div_rn(y, scale[:, None]), FP8)
                tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
                start += BLOCK_K
        tl.store(scale_ptr + rows, scale, mask=row_mask)
    else:
        _, rb, pid_l, rows, cols, offs, mask, row_mask = tile(pid, R, K, 1, BLOCK_R, BLOCK_K,
                                                              False, INT64)
        y = _y(gate_ptr, up_ptr, beta_value, s_gate, s_up, rows, cols, mask, ACT, GATED,
               beta_ptr, p1_ptr, p2_ptr, RUN, C, PARAMS, LAYOUT)
        if SCALING == AMAX:
            tl.store(scale_ptr + pid, tl.max(tl.max(abs_bits(y, mask), axis=1), axis=0)
                     .to(tl.float32, bitcast=True))
        elif SCALING == TENSOR:
            tl.store(q_ptr + offs, fp8_bits(tl.math.div_rn(y, tl.load(scale_ptr)), FP8),
                     mask=mask)
        elif SCALING == BLOCK_SCALES:
            q, byte = _block_quant(y, mask, BLOCK_R, BLOCK_K, GROUP, FP8)
            tl.store(q_ptr + offs, q, mask=mask)
            NG: tl.constexpr = BLOCK_K // GROUP
            groups = pid_l * NG + tl.arange(0, NG)
            # K is a multiple of GROUP: a group lies wholly inside the row or wholly outside
            tl.store(scale_ptr + rows[:, None] * (K // GROUP) + groups[None, :], byte,
                     mask=row_mask[:, None] & (groups[None, :] < K // GROUP))
        else:
            tl.static_assert(False, "act_quant_kernel: unknown SCALING selector")


def act_quant(gate: torch.Tensor, up: torch.Tensor | None, q: torch.Tensor,
              scales: torch.Tensor, strides: tuple[int, ...], act: int, beta_value: float,
              scaling: str, block: int, p: Plan, params: ChannelParams | None = None) -> None:
    """Quantise act(gate) (* up) into ``q`` (its fp8 dtype picks the format) by ``scaling``
    ("tensor": by the one fp32 scale in ``scales``; "row", "block": writing the scales; "amax":
    no q, one partial amax of |y| a tile into ``scales``); ``strides``: the row strides of gate
    and up; ``params``: per-channel parameters (``kernels.ChannelParams``)."""
    fp8 = FORMATS[q.dtype]
    mode = SCALINGS[scaling]
    rows_grid = mode == SCALINGS["row"]
    grid = (p.row_blocks,) if rows_grid else p.grid
    int64 = (p.int64 or (p.rows - 1) * max(strides) + p.cols > INT32_MAX
             or grid[0] * p.block_r * p.block_l > INT32_MAX)
    launch(act_quant_kernel)[grid](
        gate, gate if up is None else up, q.view(torch.uint8), scales.view(torch.uint8)
        if scales.element_size() == 1 else scales, beta_value, strides[0], strides[-1], p.rows,
        p.cols, *(gate if t is None else t for t in (params or (None,) * 3)[:3]),
        1 if params is None else params.run, p.channels, ACT=max(act, 0), GATED=up is not None,
        SCALING=mode, FP8=fp8, GROUP=block if scaling == "block" else 1,
        BLOCK_R=p.block_r, BLOCK_K=p.block_l, INT64=int64,
        PARAMS=0 if params is None else 1 if params.p1 is None else 2, LAYOUT=p.layout,
        num_warps=max(NUM_WARPS, p.block_r * p.block_l // 1024))


# kernel cache keys that do not depend on launch order (math.settle_cache_keys)
settle_cache_keys(globals())
