"""The FP8 quantisation reference against an oracle that gets there another way.

Casts: the nearest of the 256 codes' decoded values (torch's fp8 -> fp32 cast is exact), ties to
the even code, after saturating at the largest finite value, searched in float64.  Tensor and
row scales: numpy float32 arithmetic on the amax.  E8M0 exponents: ``math.frexp``.  Everything is
compared bit for bit (codes as uint8, scales with ``torch.equal``).
"""

import math

import numpy as np
import pytest
import torch

from fused_act import reference
from fused_act.reference import blocked_scales, dequantize_fp8, quantize_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
F8 = [E4M3, E5M2]
# the formats' facts, written out here rather than taken from the module
FMAX = {E4M3: 448.0, E5M2: 57344.0}
EMAX = {E4M3: 8, E5M2: 15}  # floor(log2(FMAX))
MANT = {E4M3: 3, E5M2: 2}  # mantissa bits
MIN_EXP = {E4M3: -6, E5M2: -14}  # exponent of the least normal
NAN_CODE = 0x7F
F32 = np.float32
INF, NAN = math.inf, math.nan
SHAPES = [(7, 64), (2, 3, 96), (1, 32)]
YDTYPES = [torch.float32, torch.float16, torch.bfloat16]


def decode_table(dtype):
    return torch.arange(256, dtype=torch.uint8).view(dtype).double().numpy()


def oracle_codes(values, dtype):
    """The code of each float64 value: saturate, then round to nearest, ties to the even code."""
    shape, values = np.shape(values), np.ravel(values)
    table = decode_table(dtype)
    codes = np.arange(128)[np.isfinite(table[:128])]
    mags = table[codes]
    a = np.minimum(np.abs(values), FMAX[dtype])
    d = np.abs(mags[None, :] - a[:, None])
    tie = d == d.min(1, keepdims=True)
    even = tie & (codes % 2 == 0)[None, :]
    pick = np.where(even.any(1), even.argmax(1), tie.argmax(1))
    out = codes[pick] | np.where(np.signbit(values), 0x80, 0)
    return np.where(np.isnan(values), NAN_CODE, out).astype(np.uint8).reshape(shape)


def oracle_tensor_scale(vals, dtype):
    """(float32 scale, codes) of one group of float32 values, in numpy float32 arithmetic."""
    a = np.abs(vals)
    amax = F32(NAN) if np.isnan(a).any() else (a.max() if a.size else F32(0))
    if not np.isnan(amax):
        amax = max(amax, F32(1e-12))
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = F32(amax) / F32(FMAX[dtype])
        q = vals / scale
    assert scale.dtype == np.float32 and q.dtype == np.float32
    return scale, oracle_codes(q.astype(np.float64), dtype)


def oracle_block(vals, dtype):
    """(E8M0 byte, codes) of one block of float32 values, the exponent from math.frexp."""
    v = vals.astype(np.float64)
    amax = float(np.abs(v).max())
    if not math.isfinite(amax):
        return 0xFF, np.full(v.shape, NAN_CODE, np.uint8)
    e = -127 if amax == 0 else min(127, max(-127, math.frexp(amax)[1] - 1 - EMAX[dtype]))
    return e + 127, oracle_codes(np.ldexp(v, -e), dtype)


def oracle(y, dtype, scaling, block=32):
    yf = y.float().numpy()
    k = yf.shape[-1] if yf.ndim else 1
    rows = yf.reshape(-1, k)
    if scaling == "tensor":
        scale, q = oracle_tensor_scale(yf.reshape(-1), dtype)
        return q.reshape(yf.shape), torch.tensor(scale)
    if scaling == "row":
        pairs = [oracle_tensor_scale(r, dtype) for r in rows]
        scales = np.array([s for s, _ in pairs], np.float32).reshape(*yf.shape[:-1], 1)
        return np.stack([q for _, q in pairs]).reshape(yf.shape), torch.from_numpy(scales)
    pairs = [oracle_block(b, dtype) for b in rows.reshape(-1, block)]
    scales = np.array([s for s, _ in pairs], np.uint8).reshape(*yf.shape[:-1], k // block)
    q = np.stack([q for _, q in pairs]).reshape(yf.shape)
    return q, torch.from_numpy(scales).view(torch.float8_e8m0fnu)


def check(y, dtype, scaling, block=32):
    q, s = quantize_fp8(y, dtype, scaling, block=block)
    want_q, want_s = oracle(y, dtype, scaling, block)
    assert q.dtype == dtype and q.shape == y.shape
    assert torch.equal(q.view(torch.uint8), torch.from_numpy(want_q))
    assert s.dtype == want_s.dtype and s.shape == want_s.shape
    if scaling == "block":
        assert torch.equal(s.view(torch.uint8), want_s.view(torch.uint8))
    else:
        assert torch.equal(s.view(torch.int32), want_s.view(torch.int32))  # NaN bits too
    return q, s


def make(shape, ydtype, specials, seed=0):
    """Normal values over several binades; with specials, row 0 all zero, an inf in row 1, a NaN
    in row 2, row 3 tiny (an fp32-subnormal amax; fp16 has none: its own subnormals) and row 4
    far beyond FP8's range."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 7, shape, generator=g))
    rows = y.view(-1, shape[-1])
    if specials:
        tiny = 2.0**-20 if ydtype == torch.float16 else 2.0**-136
        fills = [lambda r: r.zero_(), lambda r: r.index_fill_(0, torch.tensor([3]), INF),
                 lambda r: r.index_fill_(0, torch.tensor([5]), NAN), lambda r: r.mul_(tiny),
                 lambda r: r.mul_(100.0 if ydtype == torch.float16 else 1e30)]
        for r, fill in zip(rows, fills, strict=False):
            fill(r)
    y = y.to(ydtype)
    if specials and rows.shape[0] > 3 and ydtype != torch.float16:
        assert 0 < y.view(-1, shape[-1])[3].float().abs().amax() < 2.0**-126
    return y


@pytest.mark.parametrize("scaling", ["tensor", "row", "block"])
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
@pytest.mark.parametrize("dtype", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("ydtype", YDTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_oracle(shape, ydtype, dtype, specials, scaling):
    check(make(shape, ydtype, specials), dtype, scaling)


def cast_values(dtype):
    """Every finite code's value, the midpoints between neighbours (ties) and one fp32 ulp either
    side, the band between FMAX and FMAX + half an ulp, subnormal outputs, random magnitudes,
    and the specials; both signs."""
    table = decode_table(dtype)
    mags = np.unique(np.abs(table[np.isfinite(table)]))
    mids = ((mags[1:] + mags[:-1]) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(mids, F32(0)), np.nextafter(mids, F32(INF))])
    fmax, half_ulp = FMAX[dtype], 2.0 ** (EMAX[dtype] - MANT[dtype] - 1)
    sub = 2.0 ** (MIN_EXP[dtype] - MANT[dtype])
    edge = [fmax + 1, fmax + half_ulp, np.nextafter(F32(fmax + half_ulp), F32(0)),
            np.nextafter(F32(fmax + half_ulp), F32(INF)), 2 * fmax, 1e30, 3.4028235e38, INF,
            sub / 2, np.nextafter(F32(sub / 2), F32(1)), sub * 1.5, sub * 2.5, 2.0**-149, 1e-30]
    rng = np.random.default_rng(0)
    rand = np.exp2(rng.uniform(MIN_EXP[dtype] - 5, EMAX[dtype] + 3, 2000))
    pos = np.concatenate([mags, mids, near, np.array(edge), rand]).astype(np.float32)
    return np.concatenate([pos, -pos, np.array([NAN, -NAN], np.float32)])


@pytest.mark.parametrize("dtype", F8, ids=["e4m3", "e5m2"])
def test_cast_is_saturate_then_round_to_nearest_even(dtype):
    v = cast_values(dtype)
    assert v.size > 2000
    y = torch.from_numpy(v)
    assert torch.signbit(y[-1]) and torch.isnan(y[-1])  # a negative NaN gets the one NaN code
    q, s = quantize_fp8(y, dtype, "tensor", scale=torch.tensor([1.0]))
    assert s.shape == () and s.item() == 1.0
    assert torch.equal(q.view(torch.uint8), torch.from_numpy(oracle_codes(v.astype(float), dtype)))


def test_torch_amax_propagates_nan():
    # the tensor and row scales rely on it
    y = torch.tensor([[1.0, NAN, 3.0], [NAN, -INF, 2.0]])
    assert y.abs().amax().isnan()
    assert y.abs().amax(-1).isnan().all()


@pytest.mark.parametrize("dtype", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("case", ["zeros", "inf", "neg_inf", "nan", "subnormal", "empty"])
def test_tensor_scale_specials(dtype, case):
    y = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    if case == "zeros":
        y.zero_()[0, 0] = -0.0
    elif case in ("inf", "neg_inf"):
        y[1, 2] = INF if case == "inf" else -INF
    elif case == "nan":
        y[3, 31] = NAN
    elif case == "subnormal":
        y *= 1e-40
    else:
        y = y[:0]
    q, s = check(y, dtype, "tensor")
    if case in ("zeros", "subnormal", "empty"):
        assert s.item() == F32(F32(1e-12) / F32(FMAX[dtype]))
        assert not q.float().abs().gt(0).any()
    elif case == "nan":
        assert s.isnan() and q.float().isnan().all()
    else:
        assert s.item() == INF
        assert q.float().isnan().sum() == 1 and (q.float().nan_to_num() == 0).all()
    assert reference.AMAX_FLOOR == 1e-12


@pytest.mark.parametrize("dtype", F8, ids=["e4m3", "e5m2"])
def test_delayed_scale_saturates(dtype):
    y = make((7, 64), torch.float32, False) * 1e3
    scale = torch.tensor(0.125)
    q, s = quantize_fp8(y, dtype, "tensor", scale=scale)
    want = oracle_codes((y.numpy() / F32(0.125)).astype(float), dtype)
    assert torch.equal(q.view(torch.uint8), torch.from_numpy(want))
    assert s.shape == () and s.dtype == torch.float32 and s.item() == 0.125
    assert (q.float().abs() == FMAX[dtype]).sum() > 10  # some beyond the range


@pytest.mark.parametrize("dtype", F8, ids=["e4m3", "e5m2"])
def test_e8m0_exponent_sweep(dtype):
    """Block amaxes at and either side of powers of two over fp32's whole range, subnormals,
    the largest finite fp32 and the FP8 maxima."""
    amaxes = [2.0**-149, 2.0**-140, 2.0**-127, 2.0**-126, 1.5 * 2.0**-126, 1e-30, 3.4028235e38,
              FMAX[dtype], 2.0 ** (EMAX[dtype] + 1), 1.0, 0.0]
    for k in range(-126, 128, 7):
        p = F32(2.0**k)
        amaxes += [p, np.nextafter(p, F32(0)), np.nextafter(p, F32(INF)), p * F32(1.75)]
    a = torch.tensor(np.array(amaxes, np.float32))
    a = a[a.isfinite()]
    y = torch.rand(len(a), 32, generator=torch.Generator().manual_seed(2)) * a[:, None]
    y[:, 7] = -a  # the amax itself, negative
    for block in (32, 16, 2):
        check(y, dtype, "block", block=block)


@pytest.mark.parametrize("dtype", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("block", [2, 16, 64])
def test_other_blocks(dtype, block):
    y = make((2, 3, 128), torch.bfloat16, True, seed=3)
    _, s = check(y, dtype, "block", block=block)
    assert s.shape == (2, 3, 128 // block)


def test_fp64_input_is_its_fp32_value():
    y = make((7, 64), torch.float32, True).double() * (1 + 2.0**-40)
    for scaling in ("tensor", "row", "block"):
        for a, b in zip(quantize_fp8(y, E4M3, scaling), quantize_fp8(y.float(), E4M3, scaling),
                        strict=True):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def half_ulp(v, dtype):
    """Half the FP8 spacing at each float64 magnitude v (the subnormal spacing below normals)."""
    ex = np.frexp(np.abs(v))[1] - 1
    return np.exp2(np.maximum(ex, MIN_EXP[dtype]) - MANT[dtype] - 1)


@pytest.mark.parametrize("scaling", ["tensor", "row", "block"])
@pytest.mark.parametrize("dtype", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("ydtype", YDTYPES, ids=["fp32", "fp16", "bf16"])
def test_dequantize_round_trip(ydtype, dtype, scaling):
    y = make((2, 3, 96), ydtype, True, seed=4)
    if scaling == "tensor":  # one inf or NaN poisons the whole tensor
        y = make((2, 3, 96), ydtype, False, seed=4)
    y.view(-1, 96)[-1, 0] = 500.0  # 1.95 * 2^8: its block's amax, beyond e4m3's 448 * 2^e
    q, s = quantize_fp8(y, dtype, scaling)
    d = dequantize_fp8(q, s, scaling)
    assert d.dtype == torch.float32 and d.shape == y.shape
    yf = y.float().double().numpy()
    if scaling == "block":
        mult = s.float().double().numpy().repeat(32, -1)
    else:
        mult = np.broadcast_to(s.double().numpy(), yf.shape)
    finite = np.isfinite(mult)
    assert finite.sum() >= yf.size // 2
    assert np.isnan(d.numpy()[~finite]).all()  # poisoned groups stay NaN
    v, m, dn = yf[finite] / mult[finite], mult[finite], d.double().numpy()[finite]
    inside = np.abs(v) <= FMAX[dtype] * (1 + 2.0**-20)
    err = np.abs(dn - yf[finite])
    tol = half_ulp(v, dtype) * m + np.abs(yf[finite]) * 2.0**-22 + 2.0**-149
    assert (err <= tol)[inside].all()
    assert (np.abs(dn[~inside]) == FMAX[dtype] * m[~inside]).all()  # the MX FLOOR rule saturates
    if scaling == "block":
        assert (~inside).any()


def test_dequantize_e8m0_decoding():
    q = torch.ones(1, 96).to(E4M3)
    s = torch.tensor([[0, 127, 0xFF]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    d = dequantize_fp8(q, s, "block")
    assert (d[0, :32] == 2.0**-127).all() and (d[0, 32:64] == 1).all() and d[0, 64:].isnan().all()


def scale_of(value, shape=(), dtype=torch.float32):
    return torch.full(shape, value, dtype=dtype)


Y = torch.ones(4, 64)
ERRORS = [
    (lambda: quantize_fp8(torch.ones(4, 64, dtype=torch.int32), E4M3, "tensor"), TypeError,
     "y must"),
    (lambda: quantize_fp8(Y.numpy(), E4M3, "tensor"), TypeError, "y must"),
    (lambda: quantize_fp8(Y, torch.float16, "tensor"), ValueError, "dtype must"),
    (lambda: quantize_fp8(Y, torch.float8_e4m3fnuz, "tensor"), ValueError, "dtype must"),
    (lambda: quantize_fp8(Y, E4M3, "column"), ValueError, "scaling must"),
    (lambda: quantize_fp8(Y, E4M3, "row", scale=scale_of(1.0)), ValueError, "scale is for"),
    (lambda: quantize_fp8(Y, E4M3, "block", scale=scale_of(1.0)), ValueError, "scale is for"),
    (lambda: quantize_fp8(Y, E4M3, "tensor", scale=1.0), TypeError, "scale must"),
    (lambda: quantize_fp8(Y, E4M3, "tensor", scale=scale_of(1.0, (2,))), ValueError,
     r"scale must.*shape \(2,\)"),
    (lambda: quantize_fp8(Y, E4M3, "tensor", scale=scale_of(1.0, (), torch.float64)),
     ValueError, "scale must.*float64"),
    (lambda: quantize_fp8(Y, E4M3, "tensor", scale=scale_of(0.0)), ValueError,
     "scale must.*value 0.0"),
    (lambda: quantize_fp8(Y, E4M3, "tensor", scale=scale_of(-1.0)), ValueError, "scale must"),
    (lambda: quantize_fp8(Y, E4M3, "tensor", scale=scale_of(INF)), ValueError, "scale must"),
    (lambda: quantize_fp8(Y, E4M3, "tensor", scale=scale_of(NAN)), ValueError,
     "scale must.*nan"),
    (lambda: quantize_fp8(torch.ones(()), E4M3, "row"), ValueError, "y must have"),
    (lambda: quantize_fp8(torch.ones(4, 40), E4M3, "block"), ValueError,
     "block must.*block=32.*dimension of 40"),
    (lambda: quantize_fp8(Y, E4M3, "block", block=48), ValueError, "block must.*48"),
    (lambda: quantize_fp8(Y, E4M3, "block", block=1), ValueError, "block must"),
    (lambda: quantize_fp8(Y, E4M3, "block", block=128), ValueError, "block must"),
    (lambda: dequantize_fp8(Y.to(E4M3), torch.ones(()), "col"), ValueError, "scaling must"),
    (lambda: dequantize_fp8(torch.ones(4, 40).to(E4M3), torch.ones(4, 1), "block"), ValueError,
     "block must"),
    (lambda: blocked_scales(torch.ones(4, dtype=torch.uint8)), ValueError, "scales must"),
    (lambda: blocked_scales(torch.ones(4, 4)), ValueError, "scales must"),
]


@pytest.mark.parametrize("call, error, match", ERRORS)
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def ceil_to(n, m):
    return -(-n // m) * m


@pytest.mark.parametrize("kb", [1, 4, 5])
@pytest.mark.parametrize("m", [1, 128, 130])
def test_blocked_scales_layout(m, kb):
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(kb), indexing="ij")
    by_row = blocked_scales((rows + 1).to(torch.uint8).view(torch.float8_e8m0fnu))
    by_col = blocked_scales((cols + 1).to(torch.uint8))
    assert by_row.dtype == torch.float8_e8m0fnu and by_col.dtype == torch.uint8
    mp, kp = ceil_to(m, 128), ceil_to(kb, 4)
    assert by_row.shape == by_col.shape == (mp * kp,)
    # where each (row, col) of the padded grid lands: 128 x 4 tiles, row-major, each tile its
    # row r, column c at (r % 32) * 16 + (r // 32) * 4 + c
    want_row = np.zeros(mp * kp, np.uint8)
    want_col = np.zeros(mp * kp, np.uint8)
    for r in range(mp):
        for c in range(kp):
            tile = (r // 128) * (kp // 4) + c // 4
            p = tile * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4
            if r < m and c < kb:
                want_row[p], want_col[p] = r + 1, c + 1
    assert torch.equal(by_row.view(torch.uint8), torch.from_numpy(want_row))
    assert torch.equal(by_col, torch.from_numpy(want_col))


def test_blocked_scales_hand_checked():
    # (row, col) -> flat position for a 130 x 5 matrix (two tile rows, two tile columns)
    s = torch.zeros(130, 5, dtype=torch.uint8)
    spots = {(0, 0): 0, (0, 1): 1, (1, 0): 16, (31, 3): 499, (32, 0): 4, (97, 2): 16 + 12 + 2,
             (0, 4): 512, (127, 4): 512 + 31 * 16 + 12, (128, 0): 1024, (129, 4): 1536 + 16}
    for i, (r, c) in enumerate(spots, 1):
        s[r, c] = i
    out = blocked_scales(s)
    assert out.numel() == 256 * 8
    for i, p in enumerate(spots.values(), 1):
        assert out[p] == i
    assert out.count_nonzero() == len(spots)


# ---- the fused kernel: ops.quant.act_quant ----------------------------------------------------
# Under the interpreter (backend "triton" on CPU tensors), every q and scale must equal, bit for
# bit, quantize_fp8 of the same backend's own fp32 activation: the existing op on the fp32 input
# (16-bit inputs upcast: the kernel computes from them in fp32).

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_act import kernels, ops, registry  # noqa: E402
from fused_act.ops import quant  # noqa: E402
from fused_act.triton_kernels.quant import fp8_bits  # noqa: E402

from .cases import need_backend  # noqa: E402

KACTS = list(registry.KERNEL_IDS)
BETA = 0.7  # swish's beta (the others take none)
MODES = ["elementwise", "gated", "packed"]
# (scaling, the caller's scale or None): "delayed" is tensor scaling with a caller's scale
SCALINGS = {"tensor": ("tensor", None), "delayed": ("tensor", 0.03125), "row": ("row", None),
            "block": ("block", None)}
QSHAPES = [(3, 96), (5, 160), (2, 32)]  # rows not a multiple of any tile; a row of one block


def interpreted():
    need_backend("triton", "cpu")


def op_y32(g, u, act, backend="triton"):
    """The backend's own fp32 activation of the inputs' fp32 values."""
    name = registry.KERNELS[act].name
    if u is None:
        return ops.forward_impl(g.float(), name, None, BETA, backend)
    return ops.glu_forward_impl(g.float(), u.float(), name, None, BETA, -1, backend)


def inputs(mode, shape, ydtype, seed=0):
    """(gate, up, dim) as act_quant takes them, and the (gate, up) halves they stand for;
    "packed": one (..., 2K) tensor whose halves are read in place (row stride 2K)."""
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = (torch.randn(*shape[:-1], 2 * k, generator=g) * 4).to(ydtype)
    x.view(-1)[::7] *= 8  # some values far out (several binades; the saturating branches)
    if mode == "elementwise":
        return (x[..., :k].contiguous(), None, None), (x[..., :k], None)
    if mode == "gated":
        return (x[..., :k].contiguous(), x[..., k:].contiguous(), None), (x[..., :k], x[..., k:])
    return (x, None, -1), (x[..., :k], x[..., k:])


def same(got, want):
    """Bit for bit: codes as bytes, scales as their bits (NaN: any NaN), shapes and dtypes."""
    (q, s), (wq, ws) = got, want
    assert q.dtype == wq.dtype and q.shape == wq.shape
    bad = (q.view(torch.uint8) != wq.view(torch.uint8)).nonzero()
    assert not len(bad), f"{len(bad)} codes differ, first at {bad[:4].tolist()}: " \
        f"{q.view(torch.uint8)[tuple(bad[0])]} vs {wq.view(torch.uint8)[tuple(bad[0])]}"
    assert s.dtype == ws.dtype and s.shape == ws.shape
    if s.element_size() == 1:
        assert torch.equal(s.view(torch.uint8), ws.view(torch.uint8))
    else:
        sf, wf = s.reshape(-1), ws.reshape(-1)
        both_nan = sf.isnan() & wf.isnan()
        assert torch.equal(sf.view(torch.int32)[~both_nan], wf.view(torch.int32)[~both_nan])
        assert torch.equal(sf.isnan(), wf.isnan())


def run(args, act, fp8, scaling, backend="triton"):
    gate, up, dim = args
    mode, scale = SCALINGS[scaling]
    return quant.act_quant(gate, up, act, BETA, dim, fp8, mode,
                           None if scale is None else torch.tensor(scale), 32, backend)


def expect(halves, act, fp8, scaling, backend="triton"):
    mode, scale = SCALINGS[scaling]
    return quantize_fp8(op_y32(*halves, act, backend), fp8, mode,
                        None if scale is None else torch.tensor(scale))


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("ydtype", YDTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", KACTS)
def test_act_quant_kernel_is_bit_exact(act, mode, ydtype, fp8, scaling):
    interpreted()
    shape = QSHAPES[(KACTS.index(act) + MODES.index(mode) + list(SCALINGS).index(scaling))
                    % len(QSHAPES)]
    args, halves = inputs(mode, shape, ydtype, seed=KACTS.index(act))
    got = run(args, act, fp8, scaling)
    same(got, expect(halves, act, fp8, scaling))


@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("layout", ["slices", "transposed"])
@pytest.mark.parametrize("scaling", ["tensor", "row", "block"])
def test_act_quant_strided_rows(scaling, layout, fp8):
    """Rows a row stride apart (slices of wider tensors, read in place; gate and up with
    different strides) and rows that are no evenly spaced runs (transposed: copied once)."""
    interpreted()
    g = torch.Generator().manual_seed(5)
    if layout == "slices":
        gate = (torch.randn(6, 200, generator=g) * 4)[1:, 8:104]
        up = torch.randn(5, 130, generator=g)[:, 32:128]
        assert quant.row_stride(gate, 1) == 200 and quant.row_stride(up, 1) == 130
    else:
        gate = (torch.randn(96, 5, generator=g) * 4).t()
        up = torch.randn(96, 5, generator=g).t()
        assert quant.row_stride(gate, 1) is None
    for u in (None, up):
        got = quant.act_quant(gate, u, "gelu", 1.0, None, fp8, scaling, None, 32, "triton")
        y = ops.forward_impl(gate.contiguous(), "gelu", None, 1.0, "triton")
        if u is not None:
            y = ops.glu_forward_impl(gate.contiguous(), up.contiguous(), "gelu", None, 1.0, -1,
                                     "triton")
        same(got, quantize_fp8(y, fp8, scaling))


def edge_rows(case, fp8, rows=40, k=64):
    """y (rows x k, fp32): normal rows, and in row 35 (past the first tile of a strided walk)
    the case: all zero with -0s, one inf, one -inf, one NaN, far beyond FMAX, or outputs
    subnormal in the format (a tiny row beside large ones)."""
    g = torch.Generator().manual_seed(6)
    y = torch.randn(rows, k, generator=g) * 3
    r = y[35]
    if case == "zeros":
        r.zero_()[::3] = -0.0
    elif case in ("inf", "neg_inf", "nan"):
        r[17] = {"inf": INF, "neg_inf": -INF, "nan": NAN}[case]
    elif case == "huge":
        r *= 1e30
    elif case == "subnormal":
        r *= 2.0 ** (MIN_EXP[fp8] - 4)  # row-scaled up, but not beside row 0's large values
    return y


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("case", ["zeros", "inf", "neg_inf", "nan", "huge", "subnormal"])
def test_act_quant_edge_values(case, fp8, scaling):
    """y = squared_relu(1) * up = up exactly, so up places any value: poisoned rows, amax 0,
    saturation, subnormal codes, -0 (kept: 0x80), in a strided walk of two tiles (the tensor
    amax: partials reduced across them)."""
    interpreted()
    y = edge_rows(case, fp8)
    up = torch.cat([y, torch.zeros(40, 16)], 1)[:, :64]  # a row stride: tiles of 32 rows
    gate = torch.ones(40, 64)
    mode, scale = SCALINGS[scaling]
    scale = None if scale is None else torch.tensor(scale)
    got = quant.act_quant(gate, up, "squared_relu", 1.0, None, fp8, mode, scale, 32, "triton")
    assert torch.equal(op_y32(gate, up, "squared_relu").view(torch.int32), y.view(torch.int32))
    same(got, quantize_fp8(y, fp8, mode, scale))
    q = got[0].view(torch.uint8)
    if case == "zeros" and scaling != "tensor":
        assert (q[35, ::3] == 0x80).all() and (q[35, 1::3] == 0).all()
    if case == "nan" and scaling != "delayed":
        poisoned = {"tensor": q, "row": q[35], "block": q[35, :32]}[scaling]
        assert (poisoned == NAN_CODE).all() and (q[34] != NAN_CODE).all() != (scaling == "tensor")


@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["delayed", "block"])
def test_act_quant_ties_and_every_code(fp8, scaling):
    """The cast sweep (every code's value, midpoints: exact ties, +-1 fp32 ulp, the band past
    FMAX, subnormal outputs, specials) through the whole kernel: scale 1 keeps each value as it
    is, and block scaling moves it by an exact power of two."""
    interpreted()
    v = cast_values(fp8)
    v = np.concatenate([v, np.zeros(-len(v) % 32, np.float32)]).reshape(-1, 32)
    y = torch.from_numpy(v)
    scale = torch.tensor(1.0) if scaling == "delayed" else None
    mode = "tensor" if scaling == "delayed" else "block"
    got = quant.act_quant(torch.ones_like(y), y, "squared_relu", 1.0, None, fp8, mode, scale, 32,
                          "triton")
    same(got, quantize_fp8(y, fp8, mode, scale))
    if scaling == "delayed":
        assert torch.equal(got[0].view(torch.uint8),
                           torch.from_numpy(oracle_codes(v.astype(float), fp8)))


@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
def test_act_quant_long_rows_two_passes(fp8):
    """Rows longer than plan.ROW_HOLD: walked twice in chunks, the amax carried across chunks
    (a NaN in a late chunk poisons its row)."""
    interpreted()
    k = quant.plan.ROW_HOLD + 32  # MX blocks, one past the widest held row
    assert quant.plan.quant_plan(2, k, "row", 32).block_l < k
    gate = torch.randn(2, k, generator=torch.Generator().manual_seed(7)) * 4
    gate[1, k - 100] = NAN
    up = torch.randn(2, k, generator=torch.Generator().manual_seed(8))
    for u in (None, up):
        got = quant.act_quant(gate, u, "mish", 1.0, None, fp8, "row", None, 32, "triton")
        same(got, quantize_fp8(op_y32(gate, u, "mish"), fp8, "row"))
        assert got[1][1].isnan() and not got[1][0].isnan()


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", KACTS)
def test_act_quant_reference_path(act, mode, scaling):
    """Backend "reference": quantize_fp8 of the reference activation in fp32, exactly; fp64
    inputs take it on every backend (their fp32 value)."""
    args, halves = inputs(mode, (3, 96), torch.bfloat16)
    fp8 = E4M3
    y = registry.KERNELS[act].forward(halves[0].float(), torch.tensor(BETA))
    if halves[1] is not None:
        y = y * halves[1].float()
    mode_, scale = SCALINGS[scaling]
    scale = None if scale is None else torch.tensor(scale)
    want = quantize_fp8(y, fp8, mode_, scale)
    same(run(args, act, fp8, scaling, "reference"), want)
    if scaling == "row" and act == "gelu":
        need_backend("triton", "cpu")
        g, u, dim = args
        got64 = quant.act_quant(g.double(), None if u is None else u.double(), act, BETA, dim,
                                fp8, mode_, scale, 32, "triton")
        same(got64, want)


def code_order(q):
    """FP8 codes as integers in the order of their values (-0 and +0 both 0)."""
    c = q.view(torch.uint8).int()
    return torch.where(c >= 0x80, -(c & 0x7F), c)


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("act", KACTS)
def test_act_quant_kernel_near_reference_path(act, scaling):
    """The kernel against the reference path: where the two fp32 activations agree to a few
    ulps they may still cross a rounding boundary, but by no more than one code; scales within
    rel 1e-6.  (Deep in gelu's negative tail the kernel's 0.5 (1 + erf) is off from the
    reference by an absolute ~1e-8, within the fp32 tolerance but many ulps of the tiny value:
    there the codes may differ more, and are checked against each path's own y elsewhere.)"""
    interpreted()
    for mode, fp8 in (("gated", E4M3), ("packed", E5M2), ("elementwise", E4M3)):
        args, halves = inputs(mode, (5, 160), torch.float32, seed=9)
        (q, s), (rq, rs) = (run(args, act, fp8, scaling, b)
                            for b in ("triton", "reference"))
        y, ry = op_y32(*halves, act), registry.KERNELS[act].forward(halves[0], torch.tensor(BETA))
        if halves[1] is not None:
            ry = ry * halves[1]
        close = (y - ry).abs() <= 4e-7 * ry.abs()
        assert close.float().mean() > 0.9
        assert (code_order(q) - code_order(rq)).abs()[close].max() <= 1
        if s.element_size() == 1:
            assert torch.equal(s.view(torch.uint8), rs.view(torch.uint8))
        else:
            torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)


def test_act_quant_kernels_without_it_run_their_own_activation():
    """The CPU kernels have no fused act_quant: their own fp32 activation (elementwise, gated,
    packed; a tensor beta, ACON-C), then quantize_fp8 in torch operations, bit for bit."""
    need_backend("cpu", "cpu")
    assert not kernels.offers(kernels.launcher(torch.device("cpu"), "cpu"), "act_quant")
    for i, mode in enumerate(MODES):
        args, halves = inputs(mode, QSHAPES[i], torch.bfloat16, seed=i)
        for j, scaling in enumerate(SCALINGS):
            act, fp8 = KACTS[(i + j) % len(KACTS)], F8[(i + j) % 2]
            same(run(args, act, fp8, scaling, "cpu"), expect(halves, act, fp8, scaling, "cpu"))
    for act in PACTS:
        check_params(act, torch.bfloat16, E5M2, "cpu", seed=5)


def test_cpu_quantiser_edges_and_every_code():
    """The CPU kernels' quantiser (the second pass of their act_quant) on the edge rows of every
    scaling and format (poisoned rows, amax 0, saturation, subnormal outputs, -0) and on the cast
    sweep with every fp32 of zero low half and its neighbours (several threads' rows), bit for
    bit, in MX blocks of 32 and of 16: y = squared_relu(1) * up = up (NaN payloads aside)."""
    need_backend("cpu", "cpu")
    assert kernels.offers(kernels.launcher(torch.device("cpu"), "cpu"), "quantize")
    for fp8 in F8:
        ys = [edge_rows(case, fp8) for case in ("zeros", "inf", "neg_inf", "nan", "huge",
                                                "subnormal")]
        v = torch.cat([torch.from_numpy(cast_values(fp8)), _all_top_halves()])
        ys.append(torch.cat([v, v.new_zeros(-len(v) % 32)]).reshape(-1, 32))
        for y in ys:
            gate = torch.ones_like(y)
            y32 = op_y32(gate, y, "squared_relu", "cpu")
            torch.testing.assert_close(y32, y, rtol=0, atol=0, equal_nan=True)
            for mode, scale in SCALINGS.values():
                scale = None if scale is None else torch.tensor(scale)
                got = quant.act_quant(gate, y, "squared_relu", 1.0, None, fp8, mode, scale, 32,
                                      "cpu")
                same(got, quantize_fp8(y32, fp8, mode, scale))
            # groups of another length than the MX block's 32 (a loop of a runtime length)
            got = quant.act_quant(gate, y, "squared_relu", 1.0, None, fp8, "block", None, 16,
                                  "cpu")
            same(got, quantize_fp8(y32, fp8, "block", block=16))


def test_act_quant_errors():
    x = torch.ones(4, 64)
    with pytest.raises(ValueError, match="act must"):
        quant.act_quant(x, None, "silu")
    with pytest.raises(ValueError, match="up must"):
        quant.act_quant(x, torch.ones(4, 32), "swish")
    with pytest.raises(ValueError, match="block must"):
        quant.act_quant(x, None, "gelu", block=48)
    with pytest.raises(ValueError, match="scale is for"):
        quant.act_quant(x, None, "gelu", scaling="row", scale=torch.tensor(1.0))
    q, s = quant.act_quant(x[:0], None, "gelu", scaling="tensor", backend="reference")
    assert q.shape == (0, 64) and s.shape == ()


def _all_top_halves():
    """Every fp32 whose low 16 bits are 0, and its neighbours +-1 ulp: all exponents of both
    signs, fp32 subnormals, +-inf, NaNs of many payloads, +-0."""
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    bits = torch.cat([top, top + 1, top - 1]) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(
        torch.float32)


@triton.jit
def _encode_kernel(v_ptr, q_ptr, N, FP8: tl.constexpr, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(q_ptr + o, fp8_bits(tl.load(v_ptr + o, mask=o < N), FP8), mask=o < N)


@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
def test_fp8_encoder_sweep(fp8):
    """The kernels' integer encoder alone against reference._to_fp8 (and the oracle's codes on
    the cast sweep): every code, midpoints +-1 ulp, subnormals, specials, and every fp32 with
    zero low half and its neighbours."""
    interpreted()
    sweep = torch.from_numpy(cast_values(fp8))
    v = torch.cat([sweep, _all_top_halves()])
    q = torch.empty(v.shape, dtype=torch.uint8)
    _encode_kernel[(triton.cdiv(v.numel(), 1 << 16),)](v, q, v.numel(), FP8=[E4M3, E5M2].index(
        fp8), B=1 << 16)
    assert torch.equal(q, reference._to_fp8(v, fp8).view(torch.uint8))
    assert torch.equal(q[:len(sweep)], torch.from_numpy(oracle_codes(sweep.double().numpy(),
                                                                     fp8)))


# ---- the public functions' out_dtype: each call reaches act_quant with its activation ----------

import fused_act  # noqa: E402

# (the public call with out_dtype, its kernel activation and beta, mode); x: (4, 64), or the
# (4, 128) packed gate_up of the gated calls
PUBLIC = {
    "silu": (lambda x, **q: fused_act.silu(x, **q), "swish", 1.0, "elementwise"),
    "mish": (lambda x, **q: fused_act.mish(x, **q), "mish", 1.0, "elementwise"),
    "squared_relu": (lambda x, **q: fused_act.squared_relu(x, **q), "squared_relu", 1.0,
                     "elementwise"),
    "swish": (lambda x, **q: fused_act.swish(x, 1.5, **q), "swish", 1.5, "elementwise"),
    "gelu": (lambda x, **q: fused_act.gelu(x, **q), "gelu", 1.0, "elementwise"),
    "gelu_tanh": (lambda x, **q: fused_act.gelu(x, approximate="tanh", **q), "gelu_tanh", 1.0,
                  "elementwise"),
    "swiglu": (lambda x, **q: fused_act.swiglu(x, **q), "swish", 1.0, "packed"),
    "geglu_tanh": (lambda x, **q: fused_act.geglu(x[:, :64], x[:, 64:], "tanh", **q),
                   "gelu_tanh", 1.0, "gated"),
    "glu_swish": (lambda x, **q: fused_act.glu(x[:, :64], x[:, 64:], "swish", beta=0.5, **q),
                  "swish", 0.5, "gated"),
    "glu_mish": (lambda x, **q: fused_act.glu(x, activation="mish", **q), "mish", 1.0,
                 "packed"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_out_dtype(name, scaling, backend):
    """``fused_act.<op>(..., out_dtype=...)`` is act_quant of its activation, bit for bit, on
    inputs that require grad under no_grad (grad mode off: nothing to refuse)."""
    if backend == "triton":
        interpreted()
    call, act, beta, mode = PUBLIC[name]
    mode_, scale = SCALINGS[scaling]
    x = torch.randn(4, 128 if mode != "elementwise" else 64, dtype=torch.bfloat16,
                    requires_grad=True)
    kw = dict(out_dtype=E4M3, scaling=mode_, scale=None if scale is None else torch.tensor(scale))
    with fused_act.use_backend(backend), torch.no_grad():
        got = call(x, **kw)
        gate, up, dim = ((x, None, None) if mode == "elementwise" else
                         (x, None, -1) if mode == "packed" else (x[:, :64], x[:, 64:], None))
        want = quant.act_quant(gate, up, act, beta, dim, E4M3, mode_, kw["scale"], 32, backend)
    same(got, want)


def test_public_out_dtype_errors():
    x = torch.randn(4, 64)
    for kw, err, match in [
            (dict(out_dtype=torch.float16), ValueError, "out_dtype must be"),
            (dict(out_dtype=E4M3, scaling="column"), ValueError, "scaling must be"),
            (dict(out_dtype=E4M3, scaling="block", block=48), ValueError, "block must be"),
            (dict(out_dtype=E4M3, scaling="block", block=128), ValueError, "dividing the last"),
            (dict(out_dtype=E4M3, scaling="row", scale=torch.tensor(1.0)), ValueError,
             "scaling='tensor' only"),
            (dict(out_dtype=E4M3, scaling="tensor", scale=torch.ones(2)), ValueError,
             "one-element float32"),
            (dict(out_dtype=E4M3, scaling="tensor", scale=torch.tensor(1.0).double()),
             ValueError, "one-element float32"),
            (dict(out_dtype=E4M3, scaling="tensor", scale=torch.tensor(math.inf)), ValueError,
             "finite and > 0"),
            (dict(out_dtype=E4M3, scaling="tensor", scale=torch.tensor(0.0)), ValueError,
             "finite and > 0"),
            (dict(out_dtype=E4M3, scaling="tensor", scale=torch.tensor(math.nan)), ValueError,
             "finite and > 0")]:
        with pytest.raises(err, match=match):
            fused_act.silu(x, **kw)
    with pytest.raises(ValueError, match="0-d tensor"):
        fused_act.mish(torch.tensor(1.0), out_dtype=E4M3)
    with pytest.raises(ValueError, match="inplace=True"):
        fused_act.silu(x, inplace=True, out_dtype=E4M3)
    with pytest.raises(ValueError, match=r"glu: out_dtype must be .*e5m2, got torch.float16"):
        fused_act.glu(x, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="glu_fp8_linear: out_dtype must be .*float8_e5m2, got"):
        fused_act.glu_fp8_linear(x, x, torch.ones(8, 64), out_dtype=torch.float16)
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="autograd carries no gradient"):
        fused_act.silu(xg, out_dtype=E4M3)
    with pytest.raises(RuntimeError, match="autograd carries no gradient"):
        fused_act.swiglu(torch.randn(4, 64), torch.randn(4, 64, requires_grad=True),
                         out_dtype=E4M3)


@pytest.mark.parametrize("scaling", ["row", "delayed", "block"])
def test_public_out_dtype_compiles(scaling):
    """torch.compile(fullgraph=True) traces the opaque fused_act::act_quant: the eager result,
    bit for bit, a caller's scale an input of the graph (its value is not read there)."""
    mode, scale = SCALINGS[scaling]
    x = torch.randn(6, 128)
    s = None if scale is None else torch.tensor(scale)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    f = torch.compile(lambda t, s: fused_act.swiglu(t, out_dtype=E5M2, scaling=mode, scale=s),
                      fullgraph=True, backend=backend)
    same(f(x, s), fused_act.swiglu(x, out_dtype=E5M2, scaling=mode, scale=s))
    assert any("act_quant" in t for t in seen), seen


@pytest.mark.parametrize("name", ["swiglu", "gelu_tanh", "acon_c"])
def test_public_out_dtype_compiles_decomposed(name, monkeypatch):
    """Compile mode "decompose" (the call's own key: glu's, the activation's) traces the
    reference math instead of the op: equal to backend "reference" bit for bit."""
    x = torch.randn(2, 3, 64)
    p = torch.rand(3) + 0.5
    call = {"swiglu": lambda t: fused_act.swiglu(t, out_dtype=E4M3),
            "gelu_tanh": lambda t: fused_act.gelu(t, "tanh", out_dtype=E4M3, scaling="block"),
            "acon_c": lambda t: fused_act.acon_c(t, p, -p, p, out_dtype=E4M3)}[name]
    key = "glu" if name == "swiglu" else name
    for mode, has_op in (("decompose", False), ("opaque", True)):
        monkeypatch.setattr(fused_act.config, "compile_mode", {key: mode})
        seen = []

        def backend(gm, inputs, seen=seen):
            seen.extend(str(n.target) for n in gm.graph.nodes)
            return gm
        torch._dynamo.reset()
        got = torch.compile(call, fullgraph=True, backend=backend)(x)
        assert any("act_quant" in t for t in seen) == has_op, (mode, seen)
        if not has_op:
            with fused_act.use_backend("reference"):
                same(got, call(x))


def test_public_out_dtype_under_vmap():
    """torch.func transforms take the reference math, which batches (its FP8 cast reads no
    bits through view(dtype), which torch 2.11's vmap cannot batch): per-sample row scales."""
    x = torch.randn(3, 4, 64)
    q, s = torch.func.vmap(lambda t: fused_act.gelu(t, out_dtype=E4M3))(x)
    same((q, s), quantize_fp8(reference.gelu(x), E4M3, "row"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("scaling", ["row", "tensor", "block"])
def test_public_out_dtype_layouts_and_ownership(scaling, backend):
    """q is row-major and the scales contiguous whatever x's strides (as the fake kernel says, so
    Inductor's stride checks hold), and the scales never share a caller's scale's memory."""
    if backend == "triton":
        interpreted()
    x = torch.randn(2, 64, 4, 4).to(memory_format=torch.channels_last)
    for t in (x, x.transpose(-1, -2), torch.randn(64, 8).t()):
        with fused_act.use_backend(backend):
            q, s = fused_act.silu(t, out_dtype=E4M3, scaling=scaling, block=2)
        assert q.is_contiguous() and s.is_contiguous(), (t.stride(), q.stride(), s.stride())
        same((q, s), quantize_fp8(ops.forward_impl(t.float(), "silu", None, 1.0, backend),
                                  E4M3, scaling, block=2))
    scale = torch.tensor(0.25)
    with fused_act.use_backend(backend):
        _, s = fused_act.silu(x, out_dtype=E4M3, scaling="tensor", scale=scale)
    scale.mul_(4)
    assert s.item() == 0.25 and s.untyped_storage().data_ptr() != scale.untyped_storage().data_ptr()


def test_public_out_dtype_inductor_strided():
    """Inductor checks the op's outputs against the fake kernel's strides."""
    x = torch.randn(2, 64, 4, 4).to(memory_format=torch.channels_last)
    f = torch.compile(lambda t: fused_act.mish(t, out_dtype=E5M2, scaling="row"), fullgraph=True)
    same(f(x), fused_act.mish(x, out_dtype=E5M2, scaling="row"))


def test_public_out_dtype_refusals_before_any_launch():
    x = torch.randn(4, 4096)
    with pytest.raises(ValueError, match="from 2 to 2048"):
        fused_act.silu(x, out_dtype=E4M3, scaling="block", block=4096)



def test_public_out_dtype_subclass_dispatches_itself():
    """A tensor subclass with a dispatch of its own meets the custom op (TwoTensor: each half
    quantised as alone); DTensor's rule is test_distributed's."""
    from torch.testing._internal.two_tensor import TwoTensor
    x = torch.randn(4, 64)
    q, s = fused_act.gelu(TwoTensor(x, 2 * x), out_dtype=E4M3)
    same((q.a, s.a), fused_act.gelu(x, out_dtype=E4M3))
    same((q.b, s.b), fused_act.gelu(2 * x, out_dtype=E4M3))


# ---- per-channel parameters: swish with a tensor beta, ACON-C ---------------------------------

# x layouts: NCHW (a channel a run of rows of the last dim), 2-D (N, C) (the channel is the
# column), channels_last (copied once) and a slice of a wider last dim (rows read in place)
PLAYOUTS = ["nchw", "2d", "channels_last", "sliced"]
PACTS = ["acon_c", "swish"]


def param_inputs(act, layout, ydtype, one, seed=0):
    """(x, dict of the parameters act_quant takes) with 1 (``one``) or C values each, in x's
    dtype, some of them (1, C, 1, 1)-shaped as the modules hold them."""
    g = torch.Generator().manual_seed(seed)
    shape = (6, 64) if layout == "2d" else (2, 3, 4, 32)
    x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4
    x.view(-1)[::7] *= 8
    x = x[..., :shape[-1]] if layout == "sliced" else x[..., shape[-1]:].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = 1 if one else shape[1]
    pshape = (c,) if layout == "2d" or one else (1, c, 1, 1)
    beta = (torch.rand(pshape, generator=g) * 2 + 0.25).to(ydtype)
    params = {"beta": beta}
    if act == "acon_c":
        params.update(p1=torch.randn(pshape, generator=g).to(ydtype),
                      p2=torch.randn(pshape, generator=g).to(ydtype))
    return x.to(ydtype), params


def param_y32(x, act, params, backend):
    """``backend``'s own fp32 activation of x's fp32 values (the parameters upcast alike)."""
    if act == "acon_c":
        return ops.acon_forward_impl(x.float(), params["p1"], params["p2"], params["beta"],
                                     backend)
    return ops.forward_impl(x.float(), "swish", params["beta"], 1.0, backend)


def check_params(act, ydtype, fp8, backend, seed):
    """Every scaling, the layouts and one or C parameter values in turn: bit for bit against
    quantize_fp8 of the backend's own fp32 activation."""
    for j, scaling in enumerate(SCALINGS):
        layout = PLAYOUTS[(seed + j) % len(PLAYOUTS)]
        x, params = param_inputs(act, layout, ydtype, one=(seed + j) % 3 == 2, seed=seed + j)
        mode, scale = SCALINGS[scaling]
        scale = None if scale is None else torch.tensor(scale)
        got = quant.act_quant(x, None, act, 1.0, None, fp8, mode, scale, 32, backend, **params)
        same(got, quantize_fp8(param_y32(x, act, params, backend), fp8, mode, scale))


@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", PACTS)
def test_act_quant_params_kernel_is_bit_exact(act, ydtype, fp8):
    interpreted()
    check_params(act, ydtype, fp8, "triton", PACTS.index(act) + 2 * F8.index(fp8))


def test_act_quant_params_long_rows():
    """Rows past plan.ROW_HOLD walked twice in chunks, a channel a row (x of shape (1, C, K))."""
    interpreted()
    x = torch.randn(1, 2, quant.plan.ROW_HOLD + 32, generator=torch.Generator().manual_seed(10))
    x = x * 4
    params = {"beta": torch.tensor([0.5, 2.0]), "p1": torch.tensor([1.0, -0.5]),
              "p2": torch.tensor([0.25, 0.75])}
    got = quant.act_quant(x, None, "acon_c", 1.0, None, E5M2, "row", None, 32, "triton",
                          **params)
    same(got, quantize_fp8(param_y32(x, "acon_c", params, "triton"), E5M2, "row"))


@pytest.mark.parametrize("act", PACTS)
def test_act_quant_params_reference_path(act):
    """Backend "reference": quantize_fp8 of the reference activation in fp32, exactly."""
    for j, scaling in enumerate(SCALINGS):
        x, params = param_inputs(act, PLAYOUTS[j], torch.bfloat16, one=j == 3, seed=j)
        mode, scale = SCALINGS[scaling]
        scale = None if scale is None else torch.tensor(scale)
        y = (reference.acon_c(x.float(), params["p1"], params["p2"], params["beta"])
             if act == "acon_c" else reference.swish(x.float(), params["beta"]))
        same(quant.act_quant(x, None, act, 1.0, None, E4M3, mode, scale, 32, "reference",
                             **params), quantize_fp8(y, E4M3, mode, scale))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_params_out_dtype(backend):
    """fused_act.acon_c and fused_act.swish with a tensor beta, out_dtype given: act_quant of
    the same parameters, on learnable parameters under no_grad."""
    if backend == "triton":
        interpreted()
    for act, layout, one in (("acon_c", "nchw", False), ("swish", "2d", False),
                             ("swish", "nchw", True)):
        x, params = param_inputs(act, layout, torch.float32, one)
        params = {k: torch.nn.Parameter(v) for k, v in params.items()}
        with fused_act.use_backend(backend), torch.no_grad():
            got = (fused_act.acon_c(x, params["p1"], params["p2"], params["beta"],
                                    out_dtype=E4M3, scaling="block")
                   if act == "acon_c" else
                   fused_act.swish(x, params["beta"], out_dtype=E4M3, scaling="block"))
            want = quant.act_quant(x, None, act, 1.0, None, E4M3, "block", None, 32, backend,
                                   **params)
        same(got, want)


def test_public_params_out_dtype_errors():
    x = torch.randn(2, 3, 4, 32)
    p = torch.ones(3)
    with pytest.raises(ValueError, match="per-sample beta"):
        fused_act.acon_c(x, p, p, torch.ones(2, 3), out_dtype=E4M3)
    with pytest.raises(ValueError, match=r"beta must have one element or C=3"):
        fused_act.swish(x, torch.ones(4), out_dtype=E4M3)
    with pytest.raises(ValueError, match="block must be"):
        fused_act.acon_c(x, p, p, p, out_dtype=E4M3, scaling="block", block=64)
    with pytest.raises(RuntimeError, match="autograd carries no gradient"):
        fused_act.swish(x, torch.nn.Parameter(p), out_dtype=E4M3)
    with pytest.raises(RuntimeError, match="autograd carries no gradient"):
        fused_act.acon_c(x, p, torch.nn.Parameter(p), p, out_dtype=E5M2)
    for kw, match in [(dict(act="acon_c", beta=p), "takes p1, p2 and beta"),
                      (dict(act="gelu", beta=p), "parameter tensors are for"),
                      (dict(act="swish", beta=p, p1=p), "parameter tensors are for"),
                      (dict(act="swish", beta=torch.ones(2)), "1 or C=3 values"),
                      (dict(act="swish", beta=p, dim=-1), "elementwise call")]:
        with pytest.raises(ValueError, match=match):
            quant.act_quant(x, None, kw.pop("act"), 1.0, kw.pop("dim", None), **kw)


# ---- gated swish with a tensor beta (one value, as the gated op takes it) ----------------------

def gated_beta_case(ydtype, fp8, seed, j):
    """(act_quant's gate, up, dim, beta) and the (gate, up) halves of case ``j``: gated and
    packed in turn (alternating with ``fp8``), beta of one value in x's dtype shaped (), (1,) or
    (1, 1)."""
    mode = ("gated", "packed")[(j + F8.index(fp8)) % 2]
    (gate, up, dim), halves = inputs(mode, QSHAPES[(seed + j) % len(QSHAPES)], ydtype,
                                     seed=seed + j)
    beta = torch.tensor(0.4 + 0.45 * j, dtype=ydtype).reshape((1,) * (j % 3))
    return (gate, up, dim, beta), halves


def check_gated_beta(ydtype, fp8, backend, seed):
    """Every scaling: bit for bit against quantize_fp8 of the backend's own fp32 gated forward
    (``glu_forward_impl``, which reads the tensor beta as the gated op does)."""
    for j, scaling in enumerate(SCALINGS):
        (gate, up, dim, beta), (g, u) = gated_beta_case(ydtype, fp8, seed, j)
        mode, scale = SCALINGS[scaling]
        scale = None if scale is None else torch.tensor(scale)
        got = quant.act_quant(gate, up, "swish", 1.0, dim, fp8, mode, scale, 32, backend,
                              beta=beta)
        y = ops.glu_forward_impl(g.float(), u.float(), "swish", beta, 1.0, -1, backend)
        same(got, quantize_fp8(y, fp8, mode, scale))


@pytest.mark.parametrize("fp8", F8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_act_quant_gated_beta_kernel_is_bit_exact(ydtype, fp8):
    interpreted()
    check_gated_beta(ydtype, fp8, "triton", 2 * F8.index(fp8))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_gated_beta_out_dtype(backend):
    """fused_act.glu (gate and up; packed) and nn.GLU(learnable=True) with a tensor beta,
    out_dtype given: act_quant of that beta, on learnable parameters under no_grad; the
    reference backend is quantize_fp8 of the reference gated swish exactly."""
    if backend == "triton":
        interpreted()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3)) * 4
    beta = torch.nn.Parameter(torch.tensor([0.7]))
    module = fused_act.nn.GLU("swish", learnable=True, fp8="row", beta=0.7)
    with fused_act.use_backend(backend), torch.no_grad():
        for got, (gate, up, dim) in (
                (fused_act.glu(x[:, :64], x[:, 64:], "swish", beta=beta, out_dtype=E4M3,
                               scaling="block"), (x[:, :64], x[:, 64:], None)),
                (fused_act.glu(x, activation="swish", beta=beta, out_dtype=E4M3,
                               scaling="block"), (x, None, -1))):
            same(got, quant.act_quant(gate, up, "swish", 1.0, dim, E4M3, "block", None, 32,
                                      backend, beta=beta))
        same(module(x), quant.act_quant(x, None, "swish", 1.0, -1, E4M3, "row", None, 32,
                                        backend, beta=module.beta))
    if backend == "reference":
        y = reference.swish(x[:, :64], beta.detach()) * x[:, 64:]
        same(got, quantize_fp8(y, E4M3, "block"))


def test_public_gated_beta_out_dtype_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="glu: beta must be a float or a one-element tensor"):
        fused_act.glu(x, activation="swish", beta=torch.ones(2), out_dtype=E4M3)
    with pytest.raises(RuntimeError, match="glu: out_dtype=.* autograd carries no gradient"):
        fused_act.glu(x, activation="swish", beta=torch.nn.Parameter(torch.ones(1)),
                      out_dtype=E4M3)
    with pytest.raises(ValueError, match="gated call .* takes swish's beta of one value"):
        quant.act_quant(x, None, "swish", 1.0, -1, beta=torch.ones(4))


def test_public_params_out_dtype_compiles():
    """torch.compile (aot_eager, fullgraph) traces act_quant with the parameters as inputs."""
    x, params = param_inputs("acon_c", "nchw", torch.float32, False)
    f = torch.compile(lambda t, p1, p2, b: fused_act.acon_c(t, p1, p2, b, out_dtype=E4M3),
                      fullgraph=True, backend="aot_eager")
    args = (x, params["p1"], params["p2"], params["beta"])
    same(f(*args), fused_act.acon_c(*args, out_dtype=E4M3))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_act_quant_of_a_tensor_requiring_grad_under_a_mode_and_compile(backend):
    """``ops.act_quant`` (no gradient: FP8 data carries none) of an input that requires grad,
    eagerly, under a TorchDispatchMode and under torch.compile: the same values, and an output
    that requires no grad (the op it meets under a mode or a trace has no autograd formula)."""
    from torch.utils.flop_counter import FlopCounterMode
    need_backend(backend, "cpu")
    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)

    def f(x):
        return quant.act_quant(x, None, "gelu", scaling="row", backend=backend)

    want = f(x)
    with FlopCounterMode(display=False):
        under_mode = f(x)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    for got in (want, under_mode, compiled):
        assert not got[0].requires_grad
        assert torch.equal(got[0].float(), want[0].float()) and torch.equal(got[1], want[1])
