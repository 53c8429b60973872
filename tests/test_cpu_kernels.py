"""What the test tables do not show of the CPU kernels (backend "cpu", what "auto" runs CPU
tensors with): the build for each instruction set torch may report, the choice of "auto" where
they cannot be built, and parameter gradients that do not depend on the thread count.  Values,
gradients, dtypes, layouts and limits are in the tables (tests/cases.py: backend "cpu")."""

import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_act
from fused_act import backend

from .cases import need_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every op family once, forward and backward, fp32 and bf16, against the reference: run in a
# fresh process whose environment chose the build.
CHECK_EVERY_OP = textwrap.dedent("""
    import torch, fused_act
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 10) * 4
    x.view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    beta = torch.rand(5) + 0.5
    p1, p2, t = torch.randn(5), torch.randn(5), torch.randn(3, 5, 7, 10)
    t.view(-1)[::3] = x.view(-1)[::3]  # frelu_max's ties (and NaNs) in every lane position
    calls = {
        "mish": lambda x: fused_act.mish(x),
        "silu": lambda x: fused_act.silu(x),
        "gelu": lambda x: fused_act.gelu(x),
        "gelu_tanh": lambda x: fused_act.gelu(x, approximate="tanh"),
        "squared_relu": lambda x: fused_act.squared_relu(x),
        "swish_beta": lambda x: fused_act.swish(x, beta.to(x.dtype)),
        "acon_c": lambda x: fused_act.acon_c(x, p1, p2, beta),
        "frelu_max": lambda x: fused_act.frelu_max(x, t.to(x.dtype)),
        "swiglu": lambda x: fused_act.swiglu(x),
        "geglu": lambda x: fused_act.geglu(x),
        "batch_norm_act": lambda x: fused_act.ops.BATCH_NORM_ACT(x, p1, p2, 1e-5, "swish", beta,
                                                                 1.0, None, None)[0],
        "affine_act": lambda x: fused_act.ops.AFFINE_ACT(x, p1, beta, p2, "gelu", None, 1.0,
                                                         None, None),
        "batch_norm_acon_c": lambda x: fused_act.ops.BATCH_NORM_ACT(x, p2, p1, 1e-5, "acon_c",
                                                                    beta, 1.0, p1, p2)[0],
    }
    for dtype in (torch.float32, torch.bfloat16):
        for name, call in calls.items():
            out = {}
            for b in ("cpu", "reference"):
                xb = x.to(dtype).requires_grad_()
                with fused_act.use_backend(b):
                    y = call(xb)
                    y.backward(torch.ones_like(y))
                out[b] = (y, xb.grad)
            for got, want in zip(out["cpu"], out["reference"]):
                rtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(got, want, atol=1e-5, rtol=rtol, equal_nan=True,
                                           msg=lambda m: name + ": " + m)
    print(fused_act.backend.resolve(x.device, "auto"), torch.backends.cpu.get_cpu_capability())
""")


def _python(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **env})


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_every_instruction_set_builds_and_computes(capability):
    """The kernels built for AVX2 and for torch's portable vectors (what a CPU without AVX-512,
    or another architecture, gets) compile, load and match the reference: ATEN_CPU_CAPABILITY
    makes torch report that capability in a fresh process, as it would on such a machine.  This
    machine's own (AVX-512 here) runs the whole test tables."""
    need_backend("cpu", "cpu")
    if platform.machine() not in ("x86_64", "AMD64") or " avx2 " not in _cpu_flags():
        pytest.skip("ATEN_CPU_CAPABILITY selects x86 instruction sets: this CPU lacks AVX2")
    run = _python(CHECK_EVERY_OP, ATEN_CPU_CAPABILITY=capability.lower())
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split()[-2:] == ["cpu", capability], run.stdout


def test_auto_runs_the_reference_where_the_kernels_may_not_be_built():
    """FUSED_ACT_BUILD_CPU=0: "auto" runs CPU tensors with the reference, "cpu" is refused
    naming the reason, and ``python -m fused_act.info`` says why."""
    run = _python(textwrap.dedent("""
        import torch, fused_act, pytest
        from fused_act import backend, info
        x = torch.randn(100)
        assert backend.resolve(x.device, "auto") == "reference"
        torch.testing.assert_close(fused_act.mish(x), torch.nn.functional.mish(x))
        with pytest.raises(RuntimeError, match="FUSED_ACT_BUILD_CPU=0"):
            fused_act.set_backend("cpu")
        print(info.report())
    """), FUSED_ACT_BUILD_CPU="0")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "cpu       no" in run.stdout and "FUSED_ACT_BUILD_CPU=0" in run.stdout, run.stdout


def test_a_failed_build_leaves_auto_on_the_reference():
    """A build that fails (no working compiler, say) is one warning: "auto" computes with the
    reference from then on, and backend "cpu" is refused with the build's error."""
    run = _python(textwrap.dedent("""
        import torch, fused_act, pytest
        from torch.utils import cpp_extension
        def broken(*args, **kwargs):
            raise RuntimeError("c++: command not found")
        cpp_extension.load = broken
        x = torch.randn(100, requires_grad=True)
        y = fused_act.silu(x)
        y.sum().backward()
        torch.testing.assert_close(y, torch.nn.functional.silu(x))
        assert fused_act.backend.resolve(x.device, "auto") == "reference"
        with pytest.raises(RuntimeError, match="command not found"):
            fused_act.set_backend("cpu")
    """))
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stderr.count("c++: command not found") == 1, run.stderr


def test_backend_cpu_refuses_other_devices():
    need_backend("cpu", "cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run a cuda tensor"):
        backend.resolve(torch.device("cuda"), "cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run a meta tensor"):
        backend.resolve(torch.device("meta"), "cpu")


def test_eager_nodes_refuse_what_one_flat_pass_cannot_read():
    """The eager C++ nodes walk their tensors' memory flat (or a packed gate's halves as rows):
    the binding refuses a strided or shorter up, a strided or odd packed gate, a non-dense x, a
    plan of another size, a beta of other than the plan's channels (one value for glu; a value
    per sample and channel for Meta-ACON), ACON-C's p1 and p2 of other than the plan's
    channels, a per-sample x whose N is not outermost, and a t of other strides, whatever the
    Python side checked before."""
    need_backend("cpu", "cpu")
    lib = fused_act.ops.eager._kernels(torch.ones(1))
    big, g = torch.randn(16), torch.randn(8)
    silu = fused_act.registry.SPECS["silu"].kernel_id
    swish = fused_act.registry.SPECS["swish"].kernel_id
    for up in (big[::2], big[:4]):
        with pytest.raises(RuntimeError, match="eager_glu takes contiguous gate and up"):
            lib.eager_glu(g, up, None, "silu", silu, 1.0, -1, 2048)
    with pytest.raises(RuntimeError, match="eager_glu takes a contiguous gate"):
        lib.eager_glu(big.view(4, 4).t(), None, None, "silu", silu, 1.0, -1, 2048)
    with pytest.raises(RuntimeError, match="an even size expected"):
        lib.eager_glu(big.view(2, 8)[:, :3].contiguous(), None, None, "silu", silu, 1.0, 1, 2048)
    with pytest.raises(RuntimeError, match="eager_glu takes a floating beta of one value"):
        lib.eager_glu(g, g, torch.ones(2), "swish", swish, 1.0, -1, 2048)
    flat = fused_act.plan.flat(8, fused_act.plan.SCALAR).fields()
    with pytest.raises(RuntimeError, match="eager_activation takes a dense x"):
        lib.eager_activation(big[::2], None, "silu", silu, 1.0, 2048, flat)
    with pytest.raises(RuntimeError, match="eager_activation takes a channel plan of x's"):
        lib.eager_activation(big, None, "silu", silu, 1.0, 2048, flat)
    with pytest.raises(RuntimeError, match="eager_activation takes a floating beta of the"):
        lib.eager_activation(g, torch.ones(2), "swish", swish, 1.0, 2048, flat)
    m = big.view(4, 4)
    for x, t in ((m[::2], m[::2]), (m, m.t())):
        with pytest.raises(RuntimeError, match="eager_max takes a dense x and a t of its"):
            lib.eager_max(x, t, True, 2048)
    with pytest.raises(RuntimeError, match="a block of 0 elements"):
        lib.eager_activation(g, None, "silu", silu, 1.0, 0, None)
    x = torch.randn(2, 3, 4)
    c3, c2, six = torch.ones(3), torch.ones(2), torch.ones(6)
    per_channel = fused_act.plan.channel_plan(x, 3).fields()
    per_sample = fused_act.plan.channel_plan(x, 3, True).fields()
    for xs, sample in ((x[..., ::2], False), (x.transpose(0, 2), True)):
        with pytest.raises(RuntimeError, match="eager_acon takes a dense x"):
            lib.eager_acon(xs, c3, c3, c3, sample, per_channel)
    # plans that would read past the parameters or mix up samples: of another size, per
    # sample of another N, per channel for a per-sample beta (and back), a COLS plan wider
    # than the channels, tiles of no element
    last = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # channels innermost: COLS
    cols = fused_act.plan.channel_plan(last, 3, True).fields()
    for xs, p, beta, sample in (
            (x, flat, c3, False), (x, fused_act.plan.channel_plan(torch.empty(4, 3, 2), 3,
                                                                  True).fields(), six, True),
            (x, per_channel, six, True), (x, per_sample, c3, False),
            (last, (2, 12, *cols[2:]), six, True),
            (last, (*cols[:6], 0, *cols[7:]), six, True),
            (x, (*per_channel[:5], 0, *per_channel[6:]), c3, False)):
        with pytest.raises(RuntimeError, match="eager_acon takes a channel plan of x's"):
            lib.eager_acon(xs, c3, c3, beta, sample, p)
    for p1, p2, beta, sample, name in ((c2, c3, c3, False, "p1"), (c3, c2, c3, False, "p2"),
                                       (c3, c3, c2, False, "beta"), (c3, c3, c3, True, "beta"),
                                       (c3.int(), c3, c3, False, "p1")):
        with pytest.raises(RuntimeError, match=f"eager_acon takes a floating {name} of"):
            lib.eager_acon(x, p1, p2, beta, sample, per_sample if sample else per_channel)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "per_sample"])
def test_parameter_gradients_do_not_depend_on_threads(layout):
    """Each tile's partial sums are added by one thread in a fixed order, and the partials in a
    fixed order after: the parameter gradients are bit for bit the same for any thread count."""
    need_backend("cpu", "cpu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 24, 24, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    p1, p2 = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    beta = torch.rand(8, 16, generator=gen) if layout == "per_sample" else torch.rand(16,
                                                                                     generator=gen)
    g = torch.randn(x.shape, generator=gen)
    grads = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params = [p.clone().requires_grad_() for p in (p1, p2, beta)]
            xs = x.clone().requires_grad_()
            with fused_act.use_backend("cpu"):
                fused_act.acon_c(xs, *params).backward(g)
                sb = beta.reshape(-1)[:16].clone().requires_grad_()
                fused_act.swish(xs.detach(), sb).backward(g)
            grads.append([xs.grad, *(p.grad for p in params), sb.grad])
    finally:
        torch.set_num_threads(previous)
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("beta", [1.0, -0.75, 3.0, 2e-6, 1e-30, 0.0, -0.0, float("inf"),
                                  -float("inf"), float("nan")])
@pytest.mark.parametrize("form", ["float", "tensor", "channels", "channels last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_beta_of_every_kind_on_edge_values(beta, form, dtype):
    """A beta whose values are all finite and at least 1e-6 in magnitude runs its own
    instantiation (a plain product and a faster exp, silu's path); a 0, a tinier value, an
    infinity or a NaN among them runs the general one.  As a float, a one-element tensor, or
    the last of 4 per-channel values (the others finite: one such channel decides for the whole
    call; channels outer or innermost in memory), each gives the reference's values and
    gradients (beta's too) on the edge values, NaN where the reference's is, and each 0 with
    the reference's sign."""
    need_backend("cpu", "cpu")
    edges = [-float("inf"), -3e38, -1e30, -150.0, -88.5, -20.0, -1.0, -0.0, 0.0, 1e-30, 1.0, 20.0,
             88.5, 150.0, 1e30, 3e38, float("inf"), float("nan")]
    x = torch.tensor(edges + torch.randn(40).mul(6).tolist(), dtype=dtype)
    if form == "channels":
        x = x.expand(2, 4, -1).contiguous()
    elif form == "channels last":
        x = x.expand(4, -1).t().contiguous()  # (N, C): a row holds the C channels
    g = torch.randn(x.shape, dtype=dtype)
    values = {"float": beta, "tensor": torch.tensor([beta], dtype=dtype)}.get(
        form, torch.tensor([1.0, -2.0, 0.5, beta], dtype=dtype))
    out = {}
    for b in ("cpu", "reference"):
        xb = x.clone().requires_grad_()
        bb = values if form == "float" else values.clone().requires_grad_()
        with fused_act.use_backend(b):
            y = fused_act.swish(xb, bb)
            y.backward(g)
        out[b] = (y.detach(), xb.grad) + (() if form == "float" else (bb.grad,))
    for got, want in zip(out["cpu"], out["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)
        zeros = (got == 0) & (want == 0)  # a 0 has the reference's sign (x = -1, beta = inf: -0)
        assert torch.equal(got[zeros].signbit(), want[zeros].signbit())


@pytest.mark.parametrize("bad", ["none", "p1 = p2", "beta = 0", "beta = inf", "beta = nan",
                                 "p1 = inf"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
def test_acon_parameters_of_every_kind_on_edge_values(bad, per_sample, layout):
    """ACON-C whose p1 - p2 and beta are all finite and at least 1e-6 in magnitude runs its own
    instantiation (plain products and a faster exp); one zero, infinite or NaN value among them
    (put in the last channel, and the last sample of a per-sample beta, so that a check that
    stops short misses it) runs the general one.  Each gives the reference's y, dx and
    parameter gradients, NaN where the reference's is, and each 0 with the reference's
    sign."""
    need_backend("cpu", "cpu")
    edges = [-float("inf"), -3e38, -1e30, -150.0, -88.5, -20.0, -1.0, -0.0, 0.0, 1e-30, 1.0,
             20.0, 88.5, 150.0, 1e30, 3e38, float("inf"), float("nan")]
    shape = (12, 4) if layout == "nc" else (3, 4, 6, 10)
    gen = torch.Generator().manual_seed(0)
    # random values, then the edge values repeated over the whole tensor, at every shift (so
    # that each (sample, channel) meets each edge value, with 1 element per (n, c) as well)
    tiled = torch.tensor(edges).repeat(-(-math.prod(shape) // len(edges)) + 1)
    xs = [torch.randn(shape, generator=gen).mul(6)] + [
        tiled[k:k + math.prod(shape)].view(shape) for k in range(len(edges))]
    p1, p2 = torch.tensor([1.5, -1.0, 0.7, 2.0]), torch.tensor([0.5, 0.25, -0.3, -1.0])
    beta = torch.rand((shape[0], 4) if per_sample else (4,), generator=gen) + 0.5
    last = (-1, -1) if per_sample else (-1,)
    if bad == "p1 = p2":
        p1[-1] = p2[-1]
    elif bad == "p1 = inf":
        p1[-1] = float("inf")
    elif bad != "none":
        beta[last] = float(bad.split(" = ")[1])
    view = (1, 4) + (1,) * (len(shape) - 2)
    params = (p1.view(view), p2.view(view),
              beta.view(beta.shape + (1,) * (len(shape) - 2)) if per_sample else beta.view(view))
    for x in xs:
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        g = torch.randn(x.shape, generator=gen)
        out = {}
        for b in ("cpu", "reference"):
            xb = x.clone().requires_grad_()
            pb = [p.clone().requires_grad_() for p in params]
            with fused_act.use_backend(b):
                y = fused_act.acon_c(xb, *pb)
                y.backward(g)
            out[b] = (y.detach(), xb.grad, *(p.grad for p in pb))
        for got, want in zip(out["cpu"], out["reference"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
            zeros = (got == 0) & (want == 0)
            assert torch.equal(got[zeros].signbit(), want[zeros].signbit())


def test_a_tiny_beta_keeps_the_sigmoid_tails_of_its_gradient():
    """With beta = 1e-17 and x = 9e18, z = beta x = 90 lies where torch's fast exp gives 0 and
    the exact one a subnormal; the term x^2 sigma'(z) of beta's gradient is then 0.066, not 0
    (swish and ACON-C's beta, and ACON-C's p1 and p2 through a beta (p1 - p2) x of 90): a beta
    under 1e-6 runs the exact exp."""
    need_backend("cpu", "cpu")
    x = torch.tensor([9e18, -9e18, 8.8e18, -8.8e18, 1.0, 95e17] * 3)
    out = {}
    for b in ("cpu", "reference"):
        beta = torch.tensor([1e-17], requires_grad=True)
        xa = x.view(-1, 2).clone()
        p = [torch.tensor([2.0, 1.5]), torch.tensor([1.0, 0.5]), torch.tensor([1e-17, 1e-17])]
        p = [t.requires_grad_() for t in p]
        with fused_act.use_backend(b):
            fused_act.swish(x, beta).sum().backward()
            fused_act.acon_c(xa, *p).sum().backward()
        out[b] = [beta.grad, *(t.grad for t in p)]
    assert out["reference"][0].abs().item() > 0.1  # the case is what it says
    for got, want in zip(out["cpu"], out["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


# ---- BatchNorm + activation (fused_act/ops/batchnorm.py) on the kernels: the statistics, the
# affine forward and its backward, here with backend "cpu" and in test_csrc_emulated.py with the
# CUDA kernels run on the CPU ---------------------------------------------------------------------

# (shape, channels last): a plan of every kind.  ROWS with row tails and rows not a whole number
# of vectors (the scalar path), ROWS of whole vectors, ROWS of two column blocks, COLS
# (channels_last; (N, C) rows) of a few channels, of whole vectors and several row blocks, of a
# column tail in two row blocks, and one channel (a flat plan).
BN_SHAPES = {
    "nchw": ((3, 4, 5, 7), False),
    "nchw_vec": ((2, 3, 8, 16), False),
    "nchw_wide": ((2, 3, 48, 50), False),
    "channels_last": ((3, 6, 5, 7), True),
    "channels_last_c16": ((4, 16, 9, 10), True),
    "nc": ((300, 5), False),
    "c1": ((4, 1, 9, 11), False),
}
# (op, shape, activation, beta: None (the float beta_value), "channels" (C values) or "one" (a
# one-element tensor), parameter gradients): every activation, each beta with an activation
# that reads it and one that does not (its gradient 0: the third row of partials), the backward
# with and without parameter gradients, and BatchNorm without weight and bias ("bn_plain").
# ACON-C ("acon_c": per-channel p1, p2 and beta; 5 rows of partials with parameter gradients)
# on both layouts and one channel, its beta also "zeros": C values with a zero beta in channel 0
# and p1 = p2 in the last channel (the CPU kernels' general form, not the fast one).
BN_CASES = [
    ("bn", "nchw", "mish", None, True),
    ("bn", "nchw_vec", "swish", "channels", True),
    ("bn", "nchw_wide", "gelu", None, False),
    ("bn", "channels_last", "swish", "one", True),
    ("bn", "channels_last_c16", "gelu_tanh", "channels", True),
    ("bn", "nc", "squared_relu", None, True),
    ("bn", "c1", "swish", "channels", True),
    ("bn_plain", "nchw_vec", "silu", None, True),
    ("bn_plain", "channels_last_c16", "swish", "channels", False),
    ("affine", "nchw", "mish", None, True),
    ("affine", "channels_last_c16", "swish", "channels", True),
    ("affine", "nc", "gelu", "one", False),
    ("affine", "c1", "squared_relu", None, True),
    ("affine", "nchw_wide", "swish", "one", True),
    ("affine", "channels_last", "gelu_tanh", "channels", True),
    ("bn", "nchw", "acon_c", "channels", True),
    ("bn", "nchw_vec", "acon_c", "one", False),
    ("bn", "channels_last_c16", "acon_c", "zeros", True),
    ("bn", "c1", "acon_c", "zeros", True),
    ("bn_plain", "channels_last", "acon_c", "channels", True),
    ("affine", "nchw_wide", "acon_c", "zeros", True),
    ("affine", "channels_last", "acon_c", "channels", False),
    ("affine", "c1", "acon_c", "channels", True),
    ("affine", "nc", "acon_c", "zeros", True),
]
# infinities, NaN, signed zeros and saturating values in the first elements of channel 0 (the
# rest of that channel's batch statistics are NaN then; the other channels must not see them)
BN_EDGES = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 30.0, -30.0, 100.0]
# max |got - want| <= BN_TOL max |want| over the finite values, want in float64 on the same
# (rounded) inputs: BatchNorm's dx is a difference of per-channel sums, so its error follows
# the size of the terms, not of each element
BN_TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def bn_inputs(op: str, key: str, act: str, beta_kind: str | None, dtype: torch.dtype,
              edges: bool, seed: int = 0) -> tuple[torch.Tensor, list, torch.Tensor]:
    """(x, the op's other arguments after x, grad) of one case; x and the parameters float64,
    x already rounded through ``dtype``."""
    shape, last = BN_SHAPES[key]
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype).double()
    if edges:
        x[0, 0].view(-1)[:len(BN_EDGES)] = torch.tensor(BN_EDGES)
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    beta = {None: None, "one": torch.tensor([0.8], dtype=torch.float64),
            "channels": torch.linspace(-1.5, 2.0, c, dtype=torch.float64),
            "zeros": torch.linspace(-1.5, 2.0, c, dtype=torch.float64)}[beta_kind]
    p = lambda: torch.randn(c, generator=gen, dtype=torch.float64)  # noqa: E731
    if op == "affine":
        args = [p(), p().abs() + 0.5, p(), act, beta, -0.75]
    elif op == "bn":
        args = [p(), p(), 1e-5, act, beta, -0.75]
    else:
        args = [None, None, 1e-3, act, beta, -0.75]
    if act == "acon_c":
        p1, p2 = p(), p()
        if beta_kind == "zeros":
            beta[0] = 0.0
            p1[-1] = p2[-1]
        args[-1:] = [1.0, p1, p2]
    else:
        args += [None, None]
    return x, args, torch.randn(shape, generator=gen, dtype=torch.float64)


def bn_run(op: str, x: torch.Tensor, args: list, grad: torch.Tensor, dtype: torch.dtype,
           grads: bool, backend_name: str) -> list[torch.Tensor | None]:
    """The op's outputs and the gradients of x and (with ``grads``) of every tensor argument,
    under ``backend_name``, with x in ``dtype`` and the parameters in its opmath dtype."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    xs = x.to(dtype).requires_grad_()
    ps = [a.to(pdtype).requires_grad_(grads) if isinstance(a, torch.Tensor) else a for a in args]
    with fused_act.use_backend(backend_name):
        if op == "affine":
            outs = [fused_act.ops.AFFINE_ACT(xs, *ps)]
        else:
            outs = list(fused_act.ops.BATCH_NORM_ACT(xs, *ps))
    wrt = [xs, *(a for a in ps if isinstance(a, torch.Tensor) and a.requires_grad)]
    # the reference leaves the gradient of a beta that the activation does not read undefined
    got = torch.autograd.grad(outs[0], wrt, grad.to(dtype), allow_unused=True,
                              materialize_grads=True)
    return [o.detach() for o in outs] + list(got)


def check_bn(op: str, key: str, act: str, beta_kind: str | None, grads: bool,
             dtype: torch.dtype, backend_name: str, edges: bool = False) -> None:
    """Backend ``backend_name`` against the reference in float64: outputs (y; mean and var of
    BatchNorm), dx and the parameter gradients, NaN and infinities where the reference's are."""
    x, args, grad = bn_inputs(op, key, act, beta_kind, dtype, edges)
    got = bn_run(op, x, args, grad, dtype, grads, backend_name)
    want = bn_run(op, x, args, grad, torch.float64, grads, "reference")
    assert len(got) == len(want)
    for i, (o, w) in enumerate(zip(got, want, strict=True)):
        what = f"{op}[{key}, {act}, {beta_kind}, {dtype}, {backend_name}] output {i}"
        o = o.double()
        assert torch.equal(o.isnan(), w.isnan()), what
        inf = w.isinf()
        assert torch.equal(o[inf], w[inf]) and not o[~inf].isinf().any(), what
        finite = w.isfinite()
        if finite.any():
            err = (o[finite] - w[finite]).abs().max().item()
            assert err <= BN_TOL[dtype] * max(w[finite].abs().max().item(), 1e-6), (what, err)


# Channels far from 0 (1e3 + N(0, 1)) with one value at -1e3, inside the channel or its first
# value, in both layouts: sums of x and x^2 about one value of the channel cancel in fp32 there,
# per-slot counts, sums and squared distances from the slot's own mean do not.
BN_FAR = [(key, first) for key in ("nchw", "channels_last") for first in (False, True)]


def check_bn_far(key: str, first: bool, backend_name: str) -> None:
    """fp32 mean and biased variance of BN_FAR's channels within 1e-6 of float64's."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, 24, 24, generator=gen, dtype=torch.float64) + 1e3
    if first:
        x[0, :, 0, 0] = -1e3
    else:
        x[3, :, 7, 11] = -1e3
    x = x.float()
    if key == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with fused_act.use_backend(backend_name):
        _, mean, var = fused_act.ops.BATCH_NORM_ACT(x, None, None, 1e-5, "silu", None, 1.0, None,
                                                    None)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), correction=0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("key, first", BN_FAR)
def test_batch_norm_statistics_far_from_zero(key, first):
    need_backend("cpu", "cpu")
    check_bn_far(key, first, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("op, key, act, beta_kind, grads", BN_CASES)
def test_batch_norm_act(op, key, act, beta_kind, grads, dtype):
    need_backend("cpu", "cpu")
    check_bn(op, key, act, beta_kind, grads, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op, key", [("affine", "nchw"), ("affine", "channels_last"),
                                     ("bn", "nchw"), ("bn", "channels_last"), ("bn", "c1")])
def test_batch_norm_act_edges(op, key, dtype):
    need_backend("cpu", "cpu")
    check_bn(op, key, "swish", "channels", True, dtype, "cpu", edges=True)
    check_bn(op, key, "mish", None, True, dtype, "cpu", edges=True)
    check_bn(op, key, "acon_c", "channels", True, dtype, "cpu", edges=True)
    check_bn(op, key, "acon_c", "zeros", True, dtype, "cpu", edges=True)


def test_batch_norm_act_matches_torch():
    """BatchNorm in training and eval followed by an activation, as torch computes them."""
    need_backend("cpu", "cpu")
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 3, 5, 7, generator=gen, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    with fused_act.use_backend("cpu"):
        y, mean, var = fused_act.ops.BATCH_NORM_ACT(x, w, b, 1e-5, "mish", None, 1.0, None, None)
        got = torch.autograd.grad(y, (x, w, b), g)
    ref = F.mish(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))
    want = torch.autograd.grad(ref, (x, w, b), g)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, x.var((0, 2, 3), correction=0), rtol=1e-10, atol=1e-12)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
    rm, rv = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    invstd = (rv + 1e-5).rsqrt()
    with fused_act.use_backend("cpu"):
        y = fused_act.ops.AFFINE_ACT(x, rm, invstd * w, b, "silu", None, 1.0, None, None)
        got = torch.autograd.grad(y, (x, w, b), g)
    ref = F.silu(F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
    want = torch.autograd.grad(ref, (x, w, b), g)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def acon_c_formula(z: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                   beta: torch.Tensor) -> torch.Tensor:
    """ACON-C of per-channel parameters as its paper writes it: d sigma(beta d) + p2 z,
    d = (p1 - p2) z."""
    def ch(t):
        return t.view(1, -1, *([1] * (z.dim() - 2)))

    d = ch(p1 - p2) * z
    return d * torch.sigmoid(ch(beta) * d) + ch(p2) * z


@pytest.mark.parametrize("last", [False, True], ids=["nchw", "channels_last"])
def test_batch_norm_acon_c_matches_torch(last):
    """BatchNorm in training and eval followed by ACON-C, as torch computes them: values and
    the gradients of x, weight, bias, p1, p2 and beta."""
    need_backend("cpu", "cpu")
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 7, generator=gen, dtype=torch.float64) * 2 + 3
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b, p1, p2 = (torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
                    for _ in range(4))
    beta = torch.tensor([0.7, 0.0, -1.3], dtype=torch.float64, requires_grad=True)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    wrt = (x, w, b, p1, p2, beta)
    with fused_act.use_backend("cpu"):
        y, mean, var = fused_act.ops.BATCH_NORM_ACT(x, w, b, 1e-5, "acon_c", beta, 1.0, p1, p2)
        got = torch.autograd.grad(y, wrt, g)
    ref = acon_c_formula(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), p1, p2, beta)
    want = torch.autograd.grad(ref, wrt, g)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
    rm, rv = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    invstd = (rv + 1e-5).rsqrt()
    with fused_act.use_backend("cpu"):
        y = fused_act.ops.AFFINE_ACT(x, rm, invstd * w, b, "acon_c", beta, 1.0, p1, p2)
        got = torch.autograd.grad(y, wrt, g)
    ref = acon_c_formula(F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), p1, p2, beta)
    want = torch.autograd.grad(ref, wrt, g)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_batch_norm_statistics_do_not_depend_on_threads():
    """The statistics and parameter gradients are sums of per-tile partials in a fixed order:
    the same bits for any thread count."""
    need_backend("cpu", "cpu")
    out = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for key in ("nchw_wide", "channels_last_c16"):
                x, args, grad = bn_inputs("bn", key, "swish", "channels", torch.float32, False)
                out.append(bn_run("bn", x, args, grad, torch.float32, True, "cpu"))
    finally:
        torch.set_num_threads(previous)
    for k in range(2, len(out)):
        for a, b in zip(out[k % 2], out[k], strict=True):
            assert torch.equal(a, b)
