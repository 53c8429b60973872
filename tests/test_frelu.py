"""FReLU: the fused max step (ties, NaNs, the saved win code), its eval-mode BatchNorm fold, and
the module against the paper's published form."""

import functools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fused_act
from fused_act import ops, reference

from .cases import BACKENDS, CPU_BACKENDS, DEVICES, DTYPES, need_backend, saved_by

SHAPES = {
    "odd": (7,),
    "blocks_tail": (2 * 2048 + 37,),
    "nchw": (2, 5, 17, 19),
    "channels_last": (2, 6, 9, 13),
    "transposed": (37, 53),
    "strided": (33, 70),
    "empty": (0, 3),
}
LAYOUTS = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
           "transposed": lambda t: t.t(), "strided": lambda t: t[:, ::2]}


def make(key, dtype, device, ties=True, seed=0):
    """x and t with exact ties (t copies a quarter of x), signed zeros and NaNs on both sides."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[key]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if ties and x.numel() > 8:
        flat_x, flat_t = x.view(-1), t.view(-1)
        flat_t[::4] = flat_x[::4]
        flat_x[1], flat_t[1] = -0.0, 0.0
        flat_x[2] = float("nan")
        flat_t[3] = float("nan")
        flat_x[5], flat_t[5] = float("nan"), float("nan")
    layout = LAYOUTS.get(key, lambda v: v)
    x, t = layout(x.to(device)), layout(t.to(device))
    return x.requires_grad_(), t.requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", list(SHAPES))
def test_matches_torch_maximum_exactly(key, dtype, backend_name, device):
    """Values and gradients equal torch.maximum's bit for bit, ties and NaNs included."""
    need_backend(backend_name, device)
    x, t = make(key, dtype, device)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(device)
    with fused_act.use_backend(backend_name):
        y = fused_act.frelu_max(x, t)
        dx, dt = torch.autograd.grad(y, [x, t], g) if x.numel() else (x, t)
    want = torch.maximum(x, t)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    if ops.is_dense(x):
        assert y.stride() == x.stride()
    if x.numel():
        wx, wt = torch.autograd.grad(want, [x, t], g)
        torch.testing.assert_close(dx, wx, rtol=0, atol=0)
        torch.testing.assert_close(dt, wt, rtol=0, atol=0)
        # bit for bit includes the sign of the zeros the loser gets
        assert torch.equal(dx.signbit(), wx.signbit()) and torch.equal(dt.signbit(), wt.signbit())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_tie_and_nan_routing(backend_name, device):
    need_backend(backend_name, device)
    nan = float("nan")
    x = torch.tensor([1.0, 3.0, 2.0, nan, 1.0, nan, -0.0], device=device, requires_grad=True)
    t = torch.tensor([3.0, 1.0, 2.0, 1.0, nan, nan, 0.0], device=device, requires_grad=True)
    with fused_act.use_backend(backend_name):
        dx, dt = torch.autograd.grad(fused_act.frelu_max(x, t), [x, t], torch.full((7,), 4.0,
                                                                                   device=device))
    assert dx.tolist() == [0.0, 4.0, 2.0, 4.0, 4.0, 4.0, 2.0]
    assert dt.tolist() == [4.0, 0.0, 2.0, 4.0, 4.0, 4.0, 2.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gradcheck(backend_name, device):
    need_backend(backend_name, device)
    x, t = make("nchw", torch.float64, device, ties=False)
    x, t = (v.detach()[:1, :2, :3, :3].clone().requires_grad_() for v in (x, t))
    with fused_act.use_backend(backend_name):
        assert torch.autograd.gradcheck(fused_act.frelu_max, (x, t))
        assert torch.autograd.gradgradcheck(fused_act.frelu_max, (x, t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_opcheck(backend_name, device):
    need_backend(backend_name, device)
    x, t = make("channels_last", torch.float32, device, ties=True)
    x, t = x.detach().nan_to_num(), t.detach().nan_to_num()
    with fused_act.use_backend(backend_name):
        for need in (False, True):
            torch.library.opcheck(ops.frelu_max_op, (x.requires_grad_(need),
                                                     t.requires_grad_(need), need, backend_name))
        code = reference.frelu_max_code(x, t)
        torch.library.opcheck(ops.frelu_max_backward_op,
                              (torch.randn_like(x.detach()), code, backend_name))
        g = torch.randn_like(x.detach())
        for need in (False, True):
            a, b = (torch.randn(6, device=device).requires_grad_(need) for _ in range(2))
            torch.library.opcheck(ops.frelu_max_affine_op, (x.detach().requires_grad_(),
                                                            t.detach(), a, b, backend_name))
            torch.library.opcheck(ops.frelu_max_affine_backward_op,
                                  (g, x.detach(), t.detach(), a.detach(), b.detach(), need,
                                   backend_name))


def _affine_args(x, t, a=None, b=None):
    """Per-channel a, b for x of shape (N, C, ...) (random unless given), as leaves."""
    gen = torch.Generator().manual_seed(1)
    c = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = torch.randn(c, generator=gen, dtype=acc) if a is None else torch.full((c,), a, dtype=acc)
    b = torch.randn(c, generator=gen, dtype=acc) if b is None else torch.full((c,), b, dtype=acc)
    return x, t, a.to(x.device).requires_grad_(), b.to(x.device).requires_grad_()


def _torch_affine(x, t, a, b):
    """max(x, a t + b) in plain torch: what the unfused eval module computes."""
    shape = (1, -1, *([1] * (x.dim() - 2)))
    return torch.maximum(x, t * a.view(shape).to(t.dtype) + b.view(shape).to(t.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("key", ["nchw", "channels_last"])
def test_affine_routes_as_torch_maximum(key, dtype, backend_name, device):
    """With a = 1, b = 0 (z = t exactly) the affine op's gradients are torch.maximum's: ties
    and signed zeros split half and half, NaN on either side sends the gradient to both."""
    need_backend(backend_name, device)
    args = _affine_args(*make(key, dtype, device), a=1.0, b=0.0)
    g = torch.randn(args[0].shape, dtype=torch.float64).to(dtype).to(device)
    with fused_act.use_backend(backend_name):
        y = ops.FRELU_MAX_AFFINE(*args)
        got = torch.autograd.grad(y, args, g)
    want = _torch_affine(*args)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    wants = torch.autograd.grad(want, args, g)
    for d, w in zip(got[:2], wants[:2], strict=True):
        torch.testing.assert_close(d, w, rtol=0, atol=0)
    for d, w in zip(got[2:], wants[2:], strict=True):  # sums over N, H, W: NaN where t is
        torch.testing.assert_close(d, w, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_affine_gradcheck(backend_name, device):
    """gradcheck and gradgradcheck of max(x, a t + b) in x, t, a and b, through the eager path
    and through the custom op's autograd registration."""
    need_backend(backend_name, device)
    x, t = make("nchw", torch.float64, device, ties=False)
    x, t = (v.detach()[:2, :3, :3, :4].clone().requires_grad_() for v in (x, t))
    args = _affine_args(x, t)
    with fused_act.use_backend(backend_name):
        assert torch.autograd.gradcheck(ops.FRELU_MAX_AFFINE, args)
        assert torch.autograd.gradgradcheck(ops.FRELU_MAX_AFFINE, args)
        assert torch.autograd.gradcheck(
            lambda *v: ops.frelu_max_affine_op(*v, backend_name), args)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_saves_one_byte_per_element(backend_name):
    need_backend(backend_name, "cpu")
    x, t = make("nchw", torch.float32, "cpu")
    y, saved = saved_by(lambda: fused_act.frelu_max(x, t), backend_name)
    assert [(v.dtype, v.numel()) for v in saved] == [(torch.uint8, x.numel())]
    y.sum().backward()
    with torch.no_grad():  # nothing is kept without grad, and no code is written
        assert ops.frelu_forward_impl(x, t, need_code=False, backend=backend_name)[1] is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_saved_code_in_every_lane(backend_name, dtype):
    """The saved code is the reference's for each of the four outcomes in every lane position of
    a vector and in every length of tail (the C++ kernels write the codes 8 lanes at a time)."""
    need_backend(backend_name, "cpu")
    nan = float("nan")
    gen = torch.Generator().manual_seed(3)
    pairs = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.5, 1.5], [nan, 1.0], [1.0, nan], [nan, nan],
                          [-0.0, 0.0], [float("inf"), float("inf")]], dtype=dtype)
    for n in [*range(1, 41), 67, 2048 + 61]:
        xt = pairs[torch.randint(len(pairs), (n,), generator=gen)]
        x, t = (v.clone().requires_grad_() for v in xt.unbind(1))
        _, saved = saved_by(functools.partial(fused_act.frelu_max, x, t), backend_name)
        assert torch.equal(saved[0], reference.frelu_max_code(x.detach(), t.detach())), n


def test_bad_arguments():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"frelu_max: t must have x's shape \(2, 3\)"):
        fused_act.frelu_max(x, torch.randn(1, 3))
    with pytest.raises(TypeError, match="frelu_max: t must have x's dtype"):
        fused_act.frelu_max(x, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="frelu_max: t is on meta"):
        fused_act.frelu_max(x, torch.randn(2, 3, device="meta"))
    with pytest.raises(TypeError, match="frelu_max: x must be a floating-point tensor"):
        fused_act.frelu_max(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3,
                                                                           dtype=torch.int64))
    with pytest.raises(TypeError, match="frelu_max: t must be a torch.Tensor"):
        fused_act.frelu_max(x, 0.0)


class _Sub(torch.Tensor):
    pass


class _PassFunction(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append((func, len(args), sorted(kwargs or {})))
        return func(*args, **(kwargs or {}))


class _PassDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_one_step_cpu_entry_takes_only_plain_calls(monkeypatch):
    """frelu_max's one-step C++ entry (fast_max, by ops.call_entry) runs a plain eager CPU
    call as the Python path would (EagerMax, the win code only where a gradient will be taken),
    and leaves None, so the Python path's checks and routing, for everything else: bad
    arguments (with the Python path's errors), other than two positional arguments, a subclass,
    an empty tensor, a negative view, another device on either side, t of other strides, a
    non-dense x, a TorchFunctionMode (which sees the call as made) or a TorchDispatchMode, a
    torch.func transform, forward-mode AD, a jit trace, a compile session, and backends other
    than "auto" and "cpu"."""
    need_backend("cpu", "cpu")
    ops.eager._kernels(torch.ones(1))  # the extension loaded: the entry may answer
    lib = ops.eager._LOADED["auto"]
    x, t = make("nchw", torch.float32, "cpu")
    x, t = x.detach(), t.detach()
    want = torch.maximum(x, t)
    monkeypatch.setattr(fused_act.functional, "_check_frelu_pair", None)  # not reached
    for a, b in ((x, t), (nn.Parameter(x.clone()), t), (x, nn.Parameter(t.clone())),
                 (LAYOUTS["channels_last"](x), LAYOUTS["channels_last"](t))):
        y = fused_act.frelu_max(a, b)
        torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True, check_stride=False)
        assert y.stride() == a.stride()
        assert (y.grad_fn is None) == (not a.requires_grad and not b.requires_grad)
        if y.grad_fn is not None:
            assert y.grad_fn.name() == "EagerMaxBackward"
            with torch.no_grad():
                assert fused_act.frelu_max(a, b).grad_fn is None
    monkeypatch.undo()

    def refused(*args):
        return lib.fast_max(args, fused_act.plan.BLOCK) is None

    m = torch.randn(4, 4)
    for args in ((x,), (x, t, t), (x, 0.0), (1.0, t), (x.double(), t), (x, t[:1]),
                 (x.int(), t.int()), (x.as_subclass(_Sub), t), (x, t.as_subclass(_Sub)),
                 (x[:0], t[:0]), (torch._neg_view(x), t), (x, torch._neg_view(t)),
                 (x, t.to("meta")), (x.to("meta"), t), (m, m.t()), (m[::2], m[::2])):
        assert refused(*args), [type(a) for a in args]
    with pytest.raises(ValueError, match="frelu_max: t is on cpu but x is on meta"):
        fused_act.frelu_max(x.to("meta"), t)
    with _PassFunction() as mode:
        assert refused(x, t)
        fused_act.frelu_max(x, t=t)
        with pytest.raises(TypeError, match="missing 1 required positional argument"):
            fused_act.frelu_max(x)
    assert mode.seen == [(fused_act.frelu_max, 1, ["t"]), (fused_act.frelu_max, 1, [])]
    assert fused_act.frelu_max.__wrapped__ is fused_act.functional._WRITTEN["frelu_max"]
    with _PassDispatch():
        assert refused(x, t)
    seen = []
    torch.func.vmap(lambda a, b: seen.append(refused(a, b)) or a)(x, t)
    torch.jit.trace(lambda a, b: seen.append(refused(a, b)) or a * 1, (x, t), check_trace=False)
    assert seen == [True, True]
    with torch.autograd.forward_ad.dual_level():
        assert ops.call_entry("fast_max", (x, t)) is None
    for name in ("reference", "triton"):
        with fused_act.use_backend(name):
            assert ops.call_entry("fast_max", (x, t)) is None
    with fused_act.use_backend("cpu"):
        ops.eager._kernels(x)
        assert ops.call_entry("fast_max", (x, t)) is not None
    # the flag is_compiling reads (set under export, and by newer torch for a compile session's
    # backend Python): the op's, as _kernels says
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert ops.call_entry("fast_max", (x, t)) is None
    monkeypatch.undo()
    test_bad_arguments()  # the Python path's errors, with the entry loaded


# ---- the module ----------------------------------------------------------------------------

class PlainFReLU(nn.Module):
    """The published module, written here in plain PyTorch."""

    def __init__(self, c1, k=3):
        super().__init__()
        self.conv = nn.Conv2d(c1, c1, k, 1, k // 2, groups=c1, bias=False)
        self.bn = nn.BatchNorm2d(c1)

    def forward(self, x):
        return torch.max(x, self.bn(self.conv(x)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_module_matches_published(dtype, backend_name, device):
    need_backend(backend_name, device)
    torch.manual_seed(0)
    theirs = PlainFReLU(6).to(device, dtype)
    ours = fused_act.nn.FReLU(6).to(device, dtype)
    assert sorted(theirs.state_dict()) == sorted(ours.state_dict())
    with torch.no_grad():  # non-trivial statistics and affine parameters
        theirs.bn.weight.uniform_(0.5, 2.0)
        theirs.bn.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = (torch.randn(4, 6, 11, 9, dtype=torch.float64) * 2).to(device, dtype)
    exact = dict(rtol=0, atol=0) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    # eval mode folds BatchNorm into the max, which rounds differently from BatchNorm's pass
    folded = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else \
        dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else exact
    with fused_act.use_backend(backend_name):
        for train in (True, False):
            tol = exact if train else folded
            theirs.train(train)
            ours.train(train)
            outs = []
            for m in (theirs, ours):
                xg = x.clone().requires_grad_()
                y = m(xg)
                y.square().sum().backward()
                outs.append((y.detach(), xg.grad, [p.grad.clone() for p in m.parameters()]))
                m.zero_grad()
            (ya, gxa, gpa), (yb, gxb, gpb) = outs
            torch.testing.assert_close(yb, ya, **tol)
            # in bf16 BatchNorm's output is rounded to bf16 and the fold's is not: where x and
            # bn(t) lie within that rounding the winner, and so the gradient's route, differs
            if train or dtype != torch.bfloat16:
                torch.testing.assert_close(gxb, gxa, **tol)
                for a, b in zip(gpb, gpa, strict=True):
                    torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean)
            torch.testing.assert_close(ours.bn.running_var, theirs.bn.running_var)
            if not train:
                with torch.no_grad():
                    yi = ours(x)
                torch.testing.assert_close(yi, ya, **folded)


def test_eval_makes_no_batchnorm_pass(monkeypatch):
    """In eval() the module calls the fused affine max, not BatchNorm, whatever the grad mode
    and whichever parameters need gradients; in train() BatchNorm runs as usual."""
    m = fused_act.nn.FReLU(4).eval()
    calls = []
    monkeypatch.setattr(m.bn, "forward", lambda t: calls.append("bn") or t)
    with torch.no_grad():
        m(torch.randn(2, 4, 5, 5))
    m(torch.randn(2, 4, 5, 5, requires_grad=True))
    m.requires_grad_(False)
    m(torch.randn(2, 4, 5, 5))
    assert calls == []
    m.train()(torch.randn(2, 4, 5, 5))
    assert calls == ["bn"]


def test_saved_bytes_vs_plain_module():
    """Autograd memory of the max step: one byte per element against the plain module's
    second full tensor (torch.max saves both of its inputs)."""

    def saved_bytes(m, x):
        saved = {}

        def pack(v):
            saved[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            return v

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            m(x)
        return sum(saved.values())

    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    ours, theirs = fused_act.nn.FReLU(8), PlainFReLU(8)
    n = x.numel()
    b_ours, b_theirs = saved_bytes(ours, x), saved_bytes(theirs, x)
    # both keep x (the convolution's input) and t (BatchNorm's input); the max keeps 1 byte
    # per element for ours, bn(t) for the plain module
    assert b_theirs - b_ours == n * (4 - 1), (b_ours / n, b_theirs / n)


# ---- eval mode: the folded op whatever the grad mode, in eager, export and compile ----------

def _fused_act_ops(graph):
    """The names of the fused_act ops a traced graph calls."""
    return {str(n.target).split(".")[1] for n in graph.nodes
            if str(n.target).startswith("fused_act.")}


def _eval_pair(dtype, device="cpu"):
    """The plain module and ours in eval mode, with the same non-trivial weights and running
    statistics (BatchNorm's weight of both signs)."""
    torch.manual_seed(0)
    theirs = PlainFReLU(6).to(device, dtype)
    with torch.no_grad():
        theirs.bn.weight.uniform_(-2.0, 2.0)
        theirs.bn.bias.uniform_(-1.0, 1.0)
        theirs.bn.running_mean.uniform_(-1.0, 1.0)
        theirs.bn.running_var.uniform_(0.5, 2.0)
    ours = fused_act.nn.FReLU(6).to(device, dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_eval_gradients_match_unfused(frozen, backend_name, device):
    """In eval mode the module runs the folded op with grad enabled too, and its value and
    gradients (x's, the convolution weight's, BatchNorm's weight's and bias's) are the unfused
    module's, in float64; with every parameter frozen, x's."""
    need_backend(backend_name, device)
    theirs, ours = (m.requires_grad_(not frozen) for m in _eval_pair(torch.float64, device))
    x = torch.randn(3, 6, 10, 9, dtype=torch.float64, device=device) * 2
    results = []
    with fused_act.use_backend(backend_name):
        for m in (theirs, ours):
            xg = x.clone().requires_grad_()
            y = m(xg)
            leaves = [xg, *(p for p in m.parameters() if p.requires_grad)]
            results.append((y, *torch.autograd.grad(y.square().sum(), leaves)))
    assert type(results[1][0].grad_fn).__name__ == "FreluMaxAffineBackward"
    assert len(results[1]) == (2 if frozen else 5)
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_export_eval_holds_the_folded_op(grad):
    """torch.export of the eval module holds frelu_max_affine, not the training op, with grad
    enabled (the default) or not; of the train module, frelu_max."""
    m = fused_act.nn.FReLU(4)
    x = torch.randn(2, 4, 5, 5)
    with torch.set_grad_enabled(grad):
        assert _fused_act_ops(torch.export.export(m.eval(), (x,)).graph) == {"frelu_max_affine"}
        assert _fused_act_ops(torch.export.export(m.train(), (x,)).graph) == {"frelu_max"}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("compile_mode", ["decompose", {"frelu_max": "decompose"}],
                         ids=["all", "frelu_max"])
def test_decompose_exports_no_fused_op(compile_mode, grad, monkeypatch):
    """With compile mode "decompose" the exported eval module is plain torch operations (the
    folded op's reference math) and computes the unfused module's values."""
    monkeypatch.setattr(fused_act.config, "compile_mode", compile_mode)
    theirs, ours = _eval_pair(torch.float32)
    x = torch.randn(2, 6, 7, 8)
    with torch.set_grad_enabled(grad):
        exported = torch.export.export(ours, (x,))
    assert _fused_act_ops(exported.graph) == set()
    torch.testing.assert_close(exported.module()(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["opaque", "decompose"])
def test_compile_eval_fullgraph(mode, monkeypatch):
    """torch.compile(fullgraph=True) of the eval module, with grad and without: eager's values
    and gradients, and the graphs hold the folded op (opaque) or no fused_act op (decompose)."""
    monkeypatch.setattr(fused_act.config, "compile_mode", {"frelu_max": mode})
    torch._dynamo.reset()
    _, m = _eval_pair(torch.float32)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.graph)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    x = torch.randn(2, 6, 7, 8)
    results = []
    for f in (m, torch.compile(m, fullgraph=True, backend=backend)):
        xg = x.clone().requires_grad_()
        y = f(xg)
        grads = torch.autograd.grad(y.square().sum(), [xg, *m.parameters()])
        with torch.no_grad():
            results.append((y, *grads, f(x)))
    torch._dynamo.reset()
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_ops = {"frelu_max_affine"} if mode == "opaque" else set()
    assert len(graphs) == 2 and all(_fused_act_ops(g) == want_ops for g in graphs), graphs
