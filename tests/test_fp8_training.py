"""FP8 training through an MLP: ``fused_act.glu_fp8_linear`` (gated), ``act_fp8_linear``
(elementwise) and ``GatedMLP(fp8=...)``.

Forward: the fused quantisation of h (``glu(..., out_dtype=)`` or the activation's, itself
``quantize_fp8`` of the backend's fp32 h bit for bit: test_quantize) times the quantised weight,
dequantised, within fp32 summation-order error; ``torch._scaled_mm`` and the dequantised product
agree.  Backward, straight-through: the input's gradients (dgate/dup, dx) and a tensor beta's bit
for bit the unquantised op's own backward of dh = dout @ W, dW = dout^T @ dequant(q_h) and db =
sum(dout) bit for bit.  Then errors, torch.compile, and the loss of a small block trained in FP8
against the same block in fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_act
from fused_act import reference
from fused_act.nn import GLU, GatedMLP
from fused_act.ops import fp8_linear

from .cases import need_backend

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SCALINGS = ["row", "tensor", "block"]
K, N = 64, 48  # h's features (two MX blocks), the down projection's outputs
# fp32 products of the same FP8 operands summed in another order (torch._scaled_mm's, or a
# compiled graph's): relative to the output's largest value
SUM_ORDER_TOL = 1e-5


def _inputs(dtype=torch.float32, packed=False, bias=True):
    torch.manual_seed(0)
    gate = torch.randn(2, 3, 2 * K if packed else K, dtype=dtype) * 3
    up = None if packed else torch.randn(2, 3, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    b = torch.randn(N, dtype=dtype) if bias else None
    return gate, up, w, b


def _dequant(q, s, scaling):
    """dequant(q_h) of a fused quantisation's (q, scales), as (M, K) fp32."""
    s = s if scaling == "tensor" else s.reshape(-1, s.shape[-1])
    return reference.dequantize_fp8(q.reshape(-1, K), s, scaling)


def _expected(h, w, b, scaling):
    """(M, N) dequant(q_h) @ dequant(q_w)^T + b in fp32, for the (M, K) ``h`` = dequant(q_h)."""
    q_w, s_w = reference.quantize_fp8(w, E4M3, scaling)
    out = h @ reference.dequantize_fp8(q_w, s_w, scaling).t()
    return out if b is None else out + b.float()


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_forward_is_the_dequantised_product(backend_name, scaling):
    need_backend(backend_name, "cpu")
    gate, up, w, b = _inputs()
    with fused_act.use_backend(backend_name):
        want = _expected(_dequant(*fused_act.glu(gate, up, out_dtype=E4M3, scaling=scaling),
                                  scaling), w, b, scaling).reshape(2, 3, N)
        got = fused_act.glu_fp8_linear(gate, up, w, b, scaling=scaling)
    assert got.dtype == gate.dtype and got.shape == (2, 3, N)
    torch.testing.assert_close(got, want, rtol=0, atol=SUM_ORDER_TOL * want.abs().max().item())
    # and it is an FP8 product: not the unquantised one
    exact = F.linear(F.silu(gate) * up, w, b)
    assert (got - exact).abs().max() > 1e-3


@pytest.mark.parametrize("scaling", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_and_dequantised_paths_agree(scaling, dtype):
    """The path is queryable; both give the same product (bf16: within one rounding)."""
    gate, up, w, b = _inputs(dtype)
    path = fp8_linear.matmul_path(gate.device, E4M3, dtype, scaling, K, N, True, 6)
    if torch.__version__ >= "2.14":  # its CPU _scaled_mm takes tensor and row scales
        assert path == fp8_linear.SCALED_MM
    assert fp8_linear.matmul_path(gate.device, E4M3, dtype, "block", K, N, True, 6) == "dequant"
    with fused_act.use_backend("reference"):
        outs = [fp8_linear.act_fp8_linear(gate, up, None, w, b, "silu", 1.0, -1, E4M3, scaling,
                                          32, p) for p in (path, fp8_linear.DEQUANT)]
    tol = SUM_ORDER_TOL if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=tol,
                               atol=tol * outs[1].abs().max().item())


def _check_straight_through(backend_name, scaling, fp8, plain, ins, w, b):
    """``fp8(*ins, w, b, scaling=)`` against its definition, ``plain(*ins)`` the unquantised
    activation (``plain(*ins, out_dtype=, scaling=)`` its fused quantisation): the forward is
    the dequantised product; the gradients of ``ins`` are bit for bit plain's backward of dh =
    dout @ W, dW = dout^T @ dequant(q_h) and db = sum(dout)."""
    need_backend(backend_name, "cpu")
    ins = [t.detach().requires_grad_() for t in ins]
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    torch.manual_seed(1)
    with fused_act.use_backend(backend_name):
        out = fp8(*ins, w, b, scaling=scaling)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [*ins, w, b], dout)
        with torch.no_grad():
            q, s = plain(*ins, out_dtype=E4M3, scaling=scaling)
        d2 = dout.reshape(-1, N)
        dh = (d2 @ w.detach()).reshape(q.shape)
        plain_ins = [t.detach().requires_grad_() for t in ins]
        want = torch.autograd.grad(plain(*plain_ins), plain_ins, dh)
    h = _dequant(q, s, scaling)
    expected = _expected(h, w.detach(), b.detach(), scaling).reshape(out.shape)
    torch.testing.assert_close(out, expected, rtol=0,
                               atol=SUM_ORDER_TOL * expected.abs().max().item())
    for i, (g, wg) in enumerate(zip(grads, [*want, d2.t() @ h, d2.sum(0)], strict=True)):
        assert torch.equal(g, wg), i


def _glu_forms(packed, **act):
    """(fp8, plain) of ``_check_straight_through`` for glu with activation ``act`` (its beta
    a tensor among the inputs where "beta" is in ``act``), packed or not."""
    beta = act.pop("beta", None)

    def split(t):  # (gate, up, *beta) of the inputs
        return ((t[0], None) if packed else t[:2]), {} if beta is None else {"beta": t[-1]}

    def fp8(*t, scaling):
        (gate, up), kw = split(t[:-2])
        return fused_act.glu_fp8_linear(gate, up, *t[-2:], scaling=scaling, **act, **kw)

    def plain(*t, **quant):
        (gate, up), kw = split(t)
        return fused_act.glu(gate, up, **act, **kw, **quant)

    return fp8, plain


@pytest.mark.parametrize(("backend_name", "scaling", "packed"), [
    ("reference", "row", False), ("reference", "block", True), ("triton", "row", True),
    ("triton", "tensor", False), ("triton", "block", False), ("cpu", "row", False)])
def test_backward_is_straight_through(backend_name, scaling, packed):
    gate, up, w, b = _inputs(packed=packed)
    _check_straight_through(backend_name, scaling, *_glu_forms(packed),
                            [gate] if packed else [gate, up], w, b)


def _act_forms(activation, **act):
    """(fp8, plain) of ``_check_straight_through`` for ``act_fp8_linear`` and the public
    activation function (a tensor beta: the inputs' second)."""
    def fp8(x, *t, scaling):
        kw = {"beta": t[0]} if len(t) == 3 else {}
        return fused_act.act_fp8_linear(x, *t[-2:], activation, scaling=scaling, **act, **kw)

    def plain(x, *beta, **quant):
        return getattr(fused_act, activation)(x, *beta, **act, **quant)

    return fp8, plain


@pytest.mark.parametrize(("backend_name", "scaling", "activation", "act"), [
    ("reference", "row", "gelu", {}), ("reference", "tensor", "squared_relu", {}),
    ("triton", "block", "gelu", {"approximate": "tanh"}), ("triton", "row", "swish",
                                                           {"beta": 0.7}),
    ("triton", "tensor", "mish", {}), ("cpu", "row", "silu", {}),
    ("cpu", "block", "gelu", {})], ids=lambda v: "-".join(map(str, v.values()))
                                     if isinstance(v, dict) else None)
def test_elementwise_forward_and_straight_through_backward(backend_name, scaling, activation,
                                                           act):
    """act_fp8_linear: the forward and backward of the gated tests, dx by the activation's own
    backward."""
    x, _, w, b = _inputs()
    _check_straight_through(backend_name, scaling, *_act_forms(activation, **act), [x], w, b)


@pytest.mark.parametrize(("backend_name", "scaling"), [
    ("reference", "row"), ("triton", "block"), ("cpu", "tensor")])
def test_acon_c_gets_the_unquantised_gradients(backend_name, scaling):
    """act_fp8_linear with ACON-C: x (N, C, K) and per-channel p1, p2, beta; dx, dp1, dp2
    and dbeta bit for bit ACON-C's own backward of dh."""
    x, _, w, b = _inputs()
    params = [torch.tensor(v) for v in ([1.0, 0.5, -0.25], [0.1, -0.3, 0.2], [0.8, 1.5, 2.0])]

    def fp8(x, p1, p2, beta, *t, scaling):
        return fused_act.act_fp8_linear(x, *t, "acon_c", scaling=scaling, p1=p1, p2=p2,
                                        beta=beta)

    _check_straight_through(backend_name, scaling, fp8, fused_act.acon_c, [x, *params], w, b)


@pytest.mark.parametrize(("backend_name", "scaling", "form"), [
    ("reference", "row", "glu"), ("triton", "block", "packed"), ("cpu", "tensor", "glu"),
    ("reference", "tensor", "per feature"), ("triton", "row", "per feature"),
    ("cpu", "block", "one value")])
def test_tensor_beta_gets_the_unquantised_gradient(backend_name, scaling, form):
    """A learnable swish beta (one value for glu; one or one per feature of a (M, K) x for the
    elementwise form) reaches the forward, and its gradient is bit for bit the unquantised
    op's for dh."""
    gate, up, w, b = _inputs(packed=form == "packed")
    beta = torch.full((K,) if form == "per feature" else (1,), 0.8)
    if form in ("glu", "packed"):
        fp8, plain = _glu_forms(form == "packed", activation="swish", beta=beta)
        ins = [gate, beta] if form == "packed" else [gate, up, beta]
    else:
        fp8, plain = _act_forms("swish")
        ins = [gate.reshape(-1, K), beta]
    _check_straight_through(backend_name, scaling, fp8, plain, ins, w, b)


def _mlp(fp8=None, packed=False, hidden=K, inter=192, seed=0, activation="silu", **act):
    torch.manual_seed(seed)
    if packed:
        return GatedMLP(nn.Linear(inter, hidden), activation,
                        gate_up_proj=nn.Linear(hidden, 2 * inter), fp8=fp8, **act)
    return GatedMLP(nn.Linear(inter, hidden), activation, gate_proj=nn.Linear(hidden, inter),
                    up_proj=nn.Linear(hidden, inter), fp8=fp8, **act)


def test_modules_and_patch():
    """GatedMLP(fp8=) keeps its state_dict keys and says fp8 in its repr; GLU(fp8=) returns
    the functional FP8 result; patch_gated_mlps passes fp8 to each block it swaps."""
    plain, fp8 = _mlp(), _mlp("row", packed=True)
    assert plain.state_dict().keys() == _mlp("block").state_dict().keys()
    assert "fp8='row'" in repr(fp8) and "fp8" not in repr(plain)
    x = torch.randn(5, K)
    with torch.no_grad():
        q, s = GLU(fp8="tensor", fp8_dtype=E5M2)(x)
        want = fused_act.glu(x, out_dtype=E5M2, scaling="tensor")
    assert q.dtype == E5M2 and torch.equal(q.view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(s, want[1])

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(K, 96), nn.Linear(K, 96)
            self.down_proj, self.act_fn = nn.Linear(96, K), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    model = nn.Sequential(Block())
    keys = model.state_dict().keys()
    fused_act.patch_gated_mlps(model, fp8="tensor")
    assert type(model[0]) is GatedMLP and model[0].fp8 == "tensor"
    assert model.state_dict().keys() == keys


def test_errors():
    gate, up, w, b = _inputs()
    with pytest.raises(TypeError, match="GatedMLP: fp8 needs down_proj to be an nn.Linear"):
        GatedMLP(nn.Sequential(nn.Linear(96, K)), "silu", gate_proj=nn.Linear(K, 96),
                 up_proj=nn.Linear(K, 96), fp8="row")
    with pytest.raises(ValueError, match="GatedMLP: fp8 must be None or one of"):
        _mlp(fp8="rows")
    with pytest.raises(ValueError, match="GLU: fp8 must be None or one of"):
        GLU(fp8=True)
    with pytest.raises(ValueError, match="in_features 48 to be a multiple of 32"):
        _mlp(fp8="block", inter=48)
    with pytest.raises(ValueError, match="glu_fp8_linear: block must be a power of two"):
        fused_act.glu_fp8_linear(gate[..., :48], up[..., :48], w[:, :48], scaling="block")
    with pytest.raises(ValueError, match=r"glu_fp8_linear: weight must be \(N, K\) with K=64"):
        fused_act.glu_fp8_linear(gate, up, w.t())
    with pytest.raises(ValueError, match=r"glu_fp8_linear: bias must be \(N,\)"):
        fused_act.glu_fp8_linear(gate, up, w, b[:3])
    with pytest.raises(ValueError, match="glu_fp8_linear: beta must be a float or a one-elem"):
        fused_act.glu_fp8_linear(gate, up, w, activation="swish", beta=torch.ones(2))
    with pytest.raises(RuntimeError, match="glu_fp8_linear: torch.func transforms"):
        torch.func.grad(lambda g: fused_act.glu_fp8_linear(g, up, w).sum())(gate)
    g = gate.clone().requires_grad_()
    out = fused_act.glu_fp8_linear(g, up, w, b)
    with pytest.raises(RuntimeError, match="glu_fp8_linear: double backward"):
        torch.autograd.grad(out.sum(), g, create_graph=True)


def test_elementwise_errors():
    x, _, w, b = _inputs()
    for error, match, args, kwargs in [
            (TypeError, "x must be a torch.Tensor", (x.tolist(), w), {}),
            (ValueError, r"weight must be \(N, K\) with K=64, the last dimension of "
             r"activation\(x\)", (x, w.t()), {}),
            (ValueError, r"bias must be \(N,\)", (x, w, b[:3]), {}),
            (ValueError, "out_dtype must be", (x, w), {"out_dtype": torch.float16}),
            (ValueError, "beta must have one element or C=3 elements", (x, w, None, "swish"),
             {"beta": torch.ones(K)}),
            (TypeError, "activation 'acon_c' takes p1, p2 and beta", (x, w, None, "acon_c"),
             {}),
            (ValueError, "activation 'acon_c' takes a per-channel beta",
             (x, w, None, "acon_c"), {"p1": torch.ones(3), "p2": torch.ones(3),
                                      "beta": torch.ones(2, 3)}),
            (ValueError, "unknown activation 'relu'", (x, w, None, "relu"), {}),
            (ValueError, "x must have a last dimension", (x[0, 0, 0], w), {})]:
        with pytest.raises(error, match=f"act_fp8_linear: {match}"):
            fused_act.act_fp8_linear(*args, **kwargs)
    with pytest.raises(RuntimeError, match="act_fp8_linear: torch.func transforms"):
        torch.func.grad(lambda t: fused_act.act_fp8_linear(t, w).sum())(x)
    xi = x.clone().requires_grad_()
    out = fused_act.act_fp8_linear(xi, w, b)
    with pytest.raises(RuntimeError, match="act_fp8_linear: double backward"):
        torch.autograd.grad(out.sum(), xi, create_graph=True)


def _compiled_is_eager(f, x, params):
    """torch.compile(f, fullgraph=True) forward and backward, under the Triton kernels (the
    interpreter): the eager outputs and gradients, bit for bit."""
    need_backend("triton", "cpu")
    results = []
    with fused_act.use_backend("triton"):
        for g in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
            xi = x.clone().requires_grad_()
            y = g(xi)
            grads = torch.autograd.grad(y.square().sum(), [xi, *params])
            results.append((y, *grads))
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("scaling", ["row", "block"])
def test_compile_fullgraph_is_eager(scaling):
    """The FP8 block, with a learnable swish beta for "block"."""
    learnable = [nn.Parameter(torch.full((1,), 0.8))] if scaling == "block" else []
    act = {"activation": "swish", "beta": learnable[0]} if learnable else {}
    m = _mlp(scaling, inter=96, **act)
    _compiled_is_eager(m, torch.randn(2, 3, K), [*m.parameters(), *learnable])


@pytest.mark.parametrize("activation", ["swish", "acon_c"])
def test_compile_fullgraph_elementwise_is_eager(activation):
    """fc2(act(fc1(x))) through act_fp8_linear with learnable per-feature parameters: swish's
    beta, or ACON-C's p1, p2 and beta."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(K, K), nn.Linear(K, N)
    names = ("beta",) if activation == "swish" else ("p1", "p2", "beta")
    params = {k: nn.Parameter(torch.rand(K) + 0.5) for k in names}

    def f(x):
        return fused_act.act_fp8_linear(fc1(x), fc2.weight, fc2.bias, activation, **params)

    _compiled_is_eager(f, torch.randn(6, K), [*fc1.parameters(), *fc2.parameters(),
                                              *params.values()])


# measured max over the 25 steps of |loss_fp8 - loss_fp32| / loss_fp32 (e4m3; the loss falls
# 20-fold, from 0.65 to 0.032): row 1.7%, tensor 2.3%, block 3.6% (other seeds: up to 1.7%,
# 2.3%, 5.1%); the bounds are a little above
LOSS_BOUND = {"row": 0.03, "tensor": 0.04, "block": 0.06}


def _train(m, x, target, steps=25):
    """The loss at each of ``steps`` Adam steps of ``m`` on (x, target)."""
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    run = []
    for _ in range(steps):
        loss = F.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.append(loss.item())
    return torch.tensor(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_training_loss_follows_the_high_precision_block(dtype):
    """A 64 -> 192 -> 64 block trained 25 Adam steps on a fixed random regression, in FP8 (each
    scaling) and in high precision (fp32, or bf16 parameters and data) from the same init: the
    losses stay within LOSS_BOUND of each other.  Measured against the bf16 block (seeds 1-3):
    row up to 2.0%, tensor 2.2%, block 3.9%."""
    torch.manual_seed(1)
    x = torch.randn(64, K)
    target = torch.tanh(x @ torch.randn(K, K) / 4)
    x, target = x.to(dtype), target.to(dtype)
    with fused_act.use_backend("reference"):
        base = _train(_mlp().to(dtype), x, target)
        assert base[-1] < 0.5 * base[0]  # it learns
        rel = {s: ((_train(_mlp(s).to(dtype), x, target) - base).abs() / base).max().item()
               for s in SCALINGS}
    assert all(rel[s] < LOSS_BOUND[s] for s in SCALINGS), rel
