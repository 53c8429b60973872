"""The CUDA C++ kernels run on the CPU: csrc/ compiled as plain C++ with tests/cuda_emu.h (each
block's threads as std::threads meeting at barriers and shuffles), called through the same
fused_act/_cuda.py as on a GPU, and checked against the float64 reference on the suites' own
tables: every op, dtype, shape and layout (vector and scalar paths, tails, several tiles a block,
per-sample beta, ties and NaNs for the max).  This proves the kernels' indexing and reductions
without a GPU; it says nothing of their speed or of the GPU memory model."""

import ctypes
import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

import fused_act
from fused_act import _build, _cuda, kernels

from . import test_acon as acon_tables
from . import test_autograd as autograd_tables
from . import test_cpu_kernels as cpu_tables
from . import test_frelu as frelu_tables
from . import test_kernels as kernel_tables
from . import test_quantize as quant_tables
from .cases import ROOT, make_x
from .test_csrc import toolchain_gap

CSRC = ROOT / "csrc"
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class Plan(ctypes.Structure):
    """csrc/fused_act.h fa_plan, from fused_act/plan.py (test_csrc.py checks the header)."""
    _fields_ = [(f.name, getattr(ctypes, f"c_{fused_act.plan.C_TYPES[f.name]}"))
                for f in dataclasses.fields(fused_act.plan.Plan)]


def _p(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _strides(strides: tuple[int, ...]) -> ctypes.Array:
    return (ctypes.c_int64 * len(strides))(*strides)


class Emulated:
    """What binding.cpp offers, over the CPU-compiled kernels (host pointers, no stream)."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        for name in ("fa_act_forward", "fa_act_backward", "fa_acon_forward", "fa_acon_backward",
                     "fa_max_forward", "fa_max_backward", "fa_max_affine", "fa_glu_forward",
                     "fa_glu_backward", "fa_stats", "fa_affine_act_forward",
                     "fa_affine_act_backward", "fa_act_quant"):
            getattr(self.lib, name).restype = ctypes.c_int
        self.lib.fa_error_string.restype = ctypes.c_char_p

    def _ok(self, err: int) -> None:
        assert err == 0, self.lib.fa_error_string(err)

    def act_forward(self, x, y, act, beta, beta_value, plan):
        self._ok(self.lib.fa_act_forward(_p(x), _p(y), CODES[x.dtype], act, _p(beta),
                                         ctypes.c_float(beta_value), Plan(*plan), None))

    def act_backward(self, g, x, dx, act, beta, beta_value, partial, plan):
        self._ok(self.lib.fa_act_backward(_p(g), _p(x), _p(dx), CODES[x.dtype], act, _p(beta),
                                          ctypes.c_float(beta_value), _p(partial), Plan(*plan),
                                          None))

    def acon_forward(self, x, y, p1, p2, beta, per_sample, plan):
        self._ok(self.lib.fa_acon_forward(_p(x), _p(y), CODES[x.dtype], _p(p1), _p(p2),
                                          _p(beta), int(per_sample), Plan(*plan), None))

    def acon_backward(self, g, x, dx, p1, p2, beta, per_sample, partial, n_partial, plan):
        self._ok(self.lib.fa_acon_backward(_p(g), _p(x), _p(dx), CODES[x.dtype], _p(p1),
                                           _p(p2), _p(beta), int(per_sample), _p(partial),
                                           ctypes.c_int64(n_partial), Plan(*plan), None))

    def max_forward(self, x, t, y, code, plan):
        self._ok(self.lib.fa_max_forward(_p(x), _p(t), _p(y), _p(code), CODES[x.dtype],
                                         Plan(*plan), None))

    def max_backward(self, g, code, dx, dt, plan):
        self._ok(self.lib.fa_max_backward(_p(g), _p(code), _p(dx), _p(dt), CODES[g.dtype],
                                          Plan(*plan), None))

    def max_affine(self, x, t, a, b, y, plan):
        self._ok(self.lib.fa_max_affine(_p(x), _p(t), _p(a), _p(b), _p(y), CODES[x.dtype],
                                        Plan(*plan), None))

    def glu_forward(self, gate, up, out, strides, act, beta, beta_value, plan):
        self._ok(self.lib.fa_glu_forward(_p(gate), _p(up), _p(out), _strides(strides),
                                         CODES[gate.dtype], act, _p(beta),
                                         ctypes.c_float(beta_value), Plan(*plan), None))

    def glu_backward(self, g, gate, up, dgate, dup, strides, act, beta, beta_value, partial,
                     plan):
        self._ok(self.lib.fa_glu_backward(_p(g), _p(gate), _p(up), _p(dgate), _p(dup),
                                          _strides(strides), CODES[gate.dtype], act, _p(beta),
                                          ctypes.c_float(beta_value), _p(partial), Plan(*plan),
                                          None))

    def act_quant(self, gate, up, q, scales, strides, act, beta_value, fp8, scaling, block,
                  beta, p1, p2, run, plan):
        self._ok(self.lib.fa_act_quant(_p(gate), _p(up), _p(q), _p(scales), _strides(strides),
                                       CODES[gate.dtype], act, ctypes.c_float(beta_value), fp8,
                                       scaling, block, _p(beta), _p(p1), _p(p2),
                                       ctypes.c_int64(run), Plan(*plan), None))

    def stats(self, x, partial, n_partial, plan):
        self._ok(self.lib.fa_stats(_p(x), _p(partial), ctypes.c_int64(n_partial),
                                   CODES[x.dtype], Plan(*plan), None))

    def affine_act_forward(self, x, y, act, c, a, b, beta, beta_value, p1, p2, plan):
        self._ok(self.lib.fa_affine_act_forward(_p(x), _p(y), CODES[x.dtype], act, _p(c), _p(a),
                                                _p(b), _p(beta), ctypes.c_float(beta_value),
                                                _p(p1), _p(p2), Plan(*plan), None))

    def affine_act_backward(self, g, x, dx, act, c, a, b, beta, beta_value, p1, p2, k1, k0,
                            partial, n_partial, plan):
        self._ok(self.lib.fa_affine_act_backward(
            _p(g), _p(x), _p(dx), CODES[x.dtype], act, _p(c), _p(a), _p(b), _p(beta),
            ctypes.c_float(beta_value), _p(p1), _p(p2), _p(k1), _p(k0), _p(partial),
            0 if partial is None else partial.shape[0], ctypes.c_int64(n_partial), Plan(*plan),
            None))


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: no CUDA headers to compile csrc/ against")
    std = _build.torch_cxx_standard()  # as an install builds csrc/
    gap = toolchain_gap(nvcc, std)
    if gap:
        pytest.skip(gap)
    sources = [CSRC / s for s in _build.SOURCES if s.endswith(".cu")]
    # nvcc as the C++ driver brings CUDA's headers; cuda_emu.h answers the runtime calls
    cmd = [nvcc, std, "-O1", "-x", "c++", "-cudart", "none", "-shared", "-Xcompiler", "-fPIC",
           "-include", str(ROOT / "tests" / "cuda_emu.h"), f"-I{CSRC}", *map(str, sources)]
    # one build for the session's xdist workers (about two CPU-minutes each), in the directory
    # their temporary directories share, named by what it is built from; the first to lock it
    # builds, the others wait for its lock (which the kernel frees should that worker die)
    digest = hashlib.sha256(" ".join(cmd).encode())
    for path in sorted({*sources, *CSRC.glob("*.cuh"), *CSRC.glob("*.h"),
                        ROOT / "tests" / "cuda_emu.h"}):
        digest.update(path.read_bytes())
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    lib = shared / f"libfused_act_emu_{digest.hexdigest()[:16]}.so"
    with open(f"{lib}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            out = subprocess.run([*cmd, "-o", f"{lib}.part"], capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0, out.stderr[-4000:]
            os.replace(f"{lib}.part", lib)
    # every runtime call is answered by cuda_emu.h: none may bind to a CUDA runtime that the
    # process has loaded (torch's CUDA wheels ship one)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True,
                               text=True, check=True).stdout.split()
    assert not [s for s in undefined if s.startswith("cuda")], undefined
    return Emulated(str(lib))


@pytest.fixture
def cuda_on_cpu(emulated, monkeypatch):
    """Backend "cuda" runs CPU tensors through the emulated kernels for this test."""
    monkeypatch.setattr(_cuda, "library", lambda: emulated)
    monkeypatch.setattr(fused_act.backend, "cuda_status", lambda: (True, "emulated on the CPU"))
    monkeypatch.setattr(kernels, "resolve",
                        lambda device, name: "reference" if name == "auto" else name)
    kernels._loaded.pop("cuda", None)
    yield
    kernels._loaded.pop("cuda", None)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, shape, table", kernel_tables.CASES)
def test_elementwise(op, shape, table, dtype, cuda_on_cpu):
    x = make_x(shape, dtype, "cpu", op.scale, table).requires_grad_()
    kernel_tables._check(op, x, dtype, "cuda")


def test_elementwise_misaligned(cuda_on_cpu):
    """A view one element in: the scalar path."""
    for op in kernel_tables.OPS:
        x = torch.randn(4099, dtype=torch.float64).mul(8).float()[1:].requires_grad_()
        assert x.data_ptr() % 16
        kernel_tables._check(op, x, torch.float32, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta_kind", acon_tables.BETAS)
@pytest.mark.parametrize("key", list(acon_tables.SHAPES))
def test_acon(key, beta_kind, dtype, cuda_on_cpu):
    x, params = acon_tables.make(key, dtype, "cpu", beta_kind)
    acon_tables.check(x, params, dtype, "cuda", f"acon_c[{key}, {beta_kind}, {dtype}, emulated]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", list(frelu_tables.SHAPES))
def test_frelu_max(key, dtype, cuda_on_cpu):
    frelu_tables.test_matches_torch_maximum_exactly(key, dtype, "cuda", "cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_frelu_module(dtype, cuda_on_cpu):
    """The module in train and eval (the eval step folds BatchNorm into max(x, a t + b))."""
    frelu_tables.test_module_matches_published(dtype, "cuda", "cpu")


def test_frelu_eval_fold_channels_last(cuda_on_cpu):
    """The folded step with channels innermost (a, b per column)."""
    torch.manual_seed(0)
    theirs, ours = frelu_tables.PlainFReLU(6), fused_act.nn.FReLU(6)
    with torch.no_grad():
        theirs.bn.running_mean.uniform_(-1, 1)
        theirs.bn.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 6, 9, 13).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fused_act.use_backend("cuda"):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, key, act, beta_kind, grads", cpu_tables.BN_CASES)
def test_batch_norm_act(op, key, act, beta_kind, grads, dtype, cuda_on_cpu):
    """BatchNorm + activation and its eval form on every plan of test_cpu_kernels's table: the
    statistics, the forward, and the backward with and without dx, correction, parameter
    sums and their rows after the first two (d/dbeta, or ACON-C's d/dp1, d/dp2, d/dbeta)."""
    cpu_tables.check_bn(op, key, act, beta_kind, grads, dtype, "cuda")


@pytest.mark.parametrize("op, key", [("affine", "nchw"), ("bn", "channels_last"), ("bn", "c1")])
def test_batch_norm_act_edges(op, key, cuda_on_cpu):
    cpu_tables.check_bn(op, key, "swish", "channels", True, torch.float32, "cuda", edges=True)
    cpu_tables.check_bn(op, key, "acon_c", "zeros", True, torch.float32, "cuda", edges=True)


@pytest.mark.parametrize("key, first", cpu_tables.BN_FAR)
def test_batch_norm_statistics_far_from_zero(key, first, cuda_on_cpu):
    """fp32 statistics of channels at 1e3 with a value at -1e3: the slots' counts, sums and
    squared distances from their own means (merged in the kernel by Chan et al.'s formula)."""
    cpu_tables.check_bn_far(key, first, "cuda")


def test_batch_norm_act_misaligned(cuda_on_cpu):
    """x and the gradient one element into their storage: the scalar path of every kernel."""
    x, args, grad = cpu_tables.bn_inputs("bn", "nchw_vec", "swish", "channels", torch.float32,
                                         False)

    def shifted(t):
        return torch.empty(t.numel() + 1)[1:].view(t.shape).copy_(t)

    out = {}
    for name, xs, gs in (("cuda", shifted(x), shifted(grad)),
                         ("reference", x.float(), grad.float())):
        assert (xs.data_ptr() % 16 != 0) == (name == "cuda")
        xs.requires_grad_()
        ps = [a.float().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        with fused_act.use_backend(name):
            y, mean, var = fused_act.ops.BATCH_NORM_ACT(xs, *ps)
        wrt = [xs, *(a for a in ps if isinstance(a, torch.Tensor))]
        out[name] = [y, mean, var, *torch.autograd.grad(y, wrt, gs)]
    for got, want in zip(out["cuda"], out["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(autograd_tables.MODELS))
def test_models_eager_and_compiled(family, cuda_on_cpu, monkeypatch):
    """Each family's small model: backend "cuda" equals the reference in eager mode, and
    torch.compile(fullgraph=True) with the op opaque equals eager (train, then eval)."""
    monkeypatch.setattr(fused_act.config, "compile_mode", "opaque")
    torch._dynamo.reset()
    torch.manual_seed(0)
    factory, shape = autograd_tables.MODELS[family]
    model = factory()
    x = torch.randn(shape) * 3

    def run(m, backend_name):
        with fused_act.use_backend(backend_name):
            model.zero_grad()
            y = m(x)
            y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()]

    want = run(model, "reference")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for got in (run(model, "cuda"), run(compiled, "cuda")):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad(), fused_act.use_backend("cuda"):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


# ---- act_quant (csrc/quant.cu): q and scales bit for bit against quantize_fp8 of the emulated
# backend's own fp32 activation (the existing kernels on the inputs' fp32 values), on
# test_quantize.py's tables

QDTYPES = [torch.float32, torch.bfloat16]


def _y32(gate, up, act):
    """Backend "cuda"'s own fp32 activation of the inputs' fp32 values."""
    name = fused_act.registry.KERNELS[act].name
    if up is None:
        return fused_act.ops.forward_impl(gate.float(), name, None, quant_tables.BETA, "cuda")
    return fused_act.ops.glu_forward_impl(gate.float(), up.float(), name, None,
                                          quant_tables.BETA, -1, "cuda")


def _quant(gate, up, act, fp8, scaling, dim=None):
    mode, scale = quant_tables.SCALINGS[scaling]
    return fused_act.ops.quant.act_quant(gate, up, act, quant_tables.BETA, dim, fp8, mode,
                                         None if scale is None else torch.tensor(scale), 32,
                                         "cuda")


def _want(y, fp8, scaling):
    mode, scale = quant_tables.SCALINGS[scaling]
    return quant_tables.quantize_fp8(y, fp8, mode, None if scale is None else torch.tensor(scale))


def test_act_quant_is_offered(cuda_on_cpu):
    """The CUDA kernels offer act_quant; the CPU kernels' extension (no such entry) does not."""
    assert kernels.offers(kernels.kernels("cuda"), "act_quant")
    assert not kernels.offers(_cuda.ExtensionKernels(object()), "act_quant")


@pytest.mark.parametrize("dtype", QDTYPES, ids=str)
@pytest.mark.parametrize("mode", quant_tables.MODES)
@pytest.mark.parametrize("act", quant_tables.KACTS)
def test_act_quant(act, mode, dtype, cuda_on_cpu):
    """Every activation, elementwise, gated and packed (halves read in place), both formats, every
    scaling (the tensor amax: partials over tiles), on the odd shapes of test_quantize.py."""
    i = quant_tables.KACTS.index(act) + quant_tables.MODES.index(mode)
    for j, scaling in enumerate(quant_tables.SCALINGS):
        shape = quant_tables.QSHAPES[(i + j) % len(quant_tables.QSHAPES)]
        args, halves = quant_tables.inputs(mode, shape, dtype, seed=i)
        for fp8 in quant_tables.F8:
            got = _quant(args[0], args[1], act, fp8, scaling, args[2])
            quant_tables.same(got, _want(_y32(*halves, act), fp8, scaling))


@pytest.mark.parametrize("case", ["zeros", "inf", "neg_inf", "nan", "huge", "subnormal"])
def test_act_quant_edge_values(case, cuda_on_cpu):
    """squared_relu(1) * up = up exactly, so up places the value: rows of zeros (-0 kept), +-inf,
    NaN, far past FMAX, subnormal codes; up a row stride apart, gate contiguous."""
    for fp8 in quant_tables.F8:
        y = quant_tables.edge_rows(case, fp8)
        up = torch.cat([y, torch.zeros(40, 16)], 1)[:, :64]
        gate = torch.ones(40, 64)
        assert torch.equal(_y32(gate, up, "squared_relu").view(torch.int32), y.view(torch.int32))
        for scaling in quant_tables.SCALINGS:
            quant_tables.same(_quant(gate, up, "squared_relu", fp8, scaling),
                              _want(y, fp8, scaling))


@pytest.mark.parametrize("scaling", ["delayed", "block"])
def test_act_quant_every_code(scaling, cuda_on_cpu):
    """The cast sweep (every code, ties, +-1 ulp, past FMAX, subnormals, specials) through the
    kernel's encoder: a scale of 1 keeps each value, block scales move it by a power of two."""
    for fp8 in quant_tables.F8:
        v = quant_tables.cast_values(fp8)
        y = torch.from_numpy(v)
        y = torch.cat([y, y.new_zeros(-len(y) % 32)]).reshape(-1, 32)
        got = _quant(torch.ones_like(y), y, "squared_relu", fp8, scaling)
        quant_tables.same(got, _want(y, fp8, scaling))


def test_act_quant_long_rows_and_strides(cuda_on_cpu):
    """Rows past plan.ROW_HOLD (two walks, a NaN in a late chunk poisoning its row), gate and up
    slices of wider tensors with strides of their own, and gate and up of two dtypes."""
    k = 9024
    gate = torch.randn(2, k, generator=torch.Generator().manual_seed(7)) * 4
    gate[1, 8000] = torch.nan
    up = torch.randn(2, k, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(5)
    sliced = ((torch.randn(6, 200, generator=g) * 4)[1:, 8:104],
              torch.randn(5, 130, generator=g)[:, 32:128])
    for fp8 in quant_tables.F8:
        for u in (None, up):
            quant_tables.same(_quant(gate, u, "mish", fp8, "row"),
                              _want(_y32(gate, u, "mish"), fp8, "row"))
        for scaling in quant_tables.SCALINGS:
            quant_tables.same(_quant(*sliced, "gelu", fp8, scaling),
                              _want(_y32(*sliced, "gelu"), fp8, scaling))
            mixed = (sliced[0], sliced[1].bfloat16())
            quant_tables.same(_quant(*mixed, "swish", fp8, scaling),
                              _want(_y32(*mixed, "swish"), fp8, scaling))


@pytest.mark.parametrize("dtype", QDTYPES, ids=str)
@pytest.mark.parametrize("act", quant_tables.PACTS)
def test_act_quant_params(act, dtype, cuda_on_cpu):
    """Swish with a tensor beta and ACON-C, their parameters read per channel: every scaling,
    both formats, NCHW, 2-D, channels_last and sliced x, one or C values."""
    for fp8 in quant_tables.F8:
        quant_tables.check_params(act, dtype, fp8, "cuda",
                                  quant_tables.PACTS.index(act) + 2 * quant_tables.F8.index(fp8))


@pytest.mark.parametrize("dtype", QDTYPES, ids=str)
def test_act_quant_gated_beta(dtype, cuda_on_cpu):
    """Gated swish with the gated op's tensor beta (one value, read on the device), gate and up
    or packed: every scaling, both formats."""
    for fp8 in quant_tables.F8:
        quant_tables.check_gated_beta(dtype, fp8, "cuda", 1 + quant_tables.F8.index(fp8))
