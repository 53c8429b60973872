"""``fused_act.nn.GatedMLP`` recomputing h = act(gate) * up in ``down_proj``'s backward
(``recompute=True``; the default, None, does so off the CPU only): the gradients of the eager
block and of ``recompute=False`` (bit for bit) with every kind of ``down_proj`` (Linear, frozen,
LoRA-style), both backends on the CPU, fp64, fp32 and bf16 autocast, backward twice, double
backward, checkpointing, hooks of the caller and torch.compile; the default's choice by device;
and the bytes autograd keeps for a Llama block and a hand-built one, which are deterministic."""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fused_act
from fused_act import ops
from fused_act.nn import GatedMLP

from .cases import TOL, TORCH_RTOL_FACTOR, need_backend

F64 = torch.float64
HIDDEN, INTER = 8, 12


class LoRA(nn.Module):
    """A LoRA-style down projection: ``base(h) + B(A(h)) * scale``, both paths on the same h
    (each saves it for its weight's gradient, unless frozen)."""

    def __init__(self, base: nn.Linear, rank: int = 3, frozen_base: bool = False) -> None:
        super().__init__()
        self.base = base.requires_grad_(not frozen_base)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)  # not LoRA's zeros: its gradient path is checked

    def forward(self, h: Tensor) -> Tensor:
        return self.base(h) + self.lora_B(self.lora_A(h)) * 0.5


DOWNS = {
    "linear": lambda: nn.Linear(INTER, HIDDEN),
    "frozen": lambda: nn.Linear(INTER, HIDDEN).requires_grad_(False),
    "lora": lambda: LoRA(nn.Linear(INTER, HIDDEN)),
    "lora_frozen_base": lambda: LoRA(nn.Linear(INTER, HIDDEN), frozen_base=True),
}
# down_proj -> how many glu passes one backward adds: none where nothing saves h
RERUNS = {"linear": 1, "frozen": 0, "lora": 1, "lora_frozen_base": 1}
# glu's activation, its arguments, the same in torch; swish's beta a learnable tensor
ACTS = {
    "silu": ("silu", lambda: {}, lambda g, kw: F.silu(g)),
    "gelu_tanh": ("gelu", lambda: {"approximate": "tanh"},
                  lambda g, kw: F.gelu(g, approximate="tanh")),
    "swish_beta": ("swish", lambda: {"beta": torch.tensor([1.3], requires_grad=True)},
                   lambda g, kw: g * torch.sigmoid(kw["beta"].to(g.dtype) * g)),
}


def _block(down: str, packed: bool, act: str, dtype: torch.dtype = torch.float32,
           recompute: bool | None = True) -> tuple[GatedMLP, callable, list[Tensor]]:
    """A seeded GatedMLP (recomputing h on the CPU too, unless told), the same block in torch
    over its modules, and what the gradients are taken of besides x (its parameters that need
    one, swish's beta)."""
    torch.manual_seed(0)
    name, kwargs, torch_act = ACTS[act]
    kw = {k: v.to(dtype).detach().requires_grad_() if isinstance(v, Tensor) else v
          for k, v in kwargs().items()}
    proj = ({"gate_up_proj": nn.Linear(HIDDEN, 2 * INTER)} if packed else
            {"gate_proj": nn.Linear(HIDDEN, INTER), "up_proj": nn.Linear(HIDDEN, INTER)})
    m = GatedMLP(DOWNS[down](), name, **proj, recompute=recompute, **kw).to(dtype)

    def eager(x: Tensor) -> Tensor:
        if packed:
            gate, up = m.gate_up_proj(x).chunk(2, -1)
        else:
            gate, up = m.gate_proj(x), m.up_proj(x)
        return m.down_proj(torch_act(gate, kw) * up)

    wrt = [p for p in m.parameters() if p.requires_grad] + [
        v for v in kw.values() if isinstance(v, Tensor)]
    return m, eager, wrt


def _grads(fn: callable, x: Tensor, wrt: list[Tensor], **kwargs: object) -> list[Tensor]:
    y = fn(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape).to(y.dtype)
    return list(torch.autograd.grad((y * w).sum(), [x, *wrt], **kwargs))


@pytest.fixture
def reruns(monkeypatch) -> list[int]:
    """A list that grows by one at each recompute of h."""
    calls: list[int] = []
    rerun = ops.GATED.rerun

    def counting(*args):
        calls.append(1)
        return rerun(*args)

    monkeypatch.setattr(ops.GATED, "rerun", counting)
    return calls


def _x(dtype: torch.dtype) -> Tensor:
    return torch.randn(2, 5, HIDDEN, dtype=dtype, generator=torch.Generator().manual_seed(1)
                       ).requires_grad_()


def _assert_grads(got: list[Tensor], want: list[Tensor], dtype: torch.dtype) -> None:
    """fp64: to the float64 table's tolerances; otherwise each gradient relative to its
    largest value, to the tolerance of a comparison with PyTorch's own math (the eager block
    rounds act(gate) before the product; the fused op does not)."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if dtype == F64:
            rtol, atol = TOL[F64]
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"gradient {i}")
        else:
            err = (a.double() - b.double()).abs().max() / b.double().abs().max()
            assert err <= TOL[dtype][0] * TORCH_RTOL_FACTOR, (i, err.item())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("down", list(DOWNS))
def test_gradients_match_eager(down, packed, act, dtype, backend, reruns):
    """x's, every projection's and beta's gradients are the eager block's, and those of
    recompute=False bit for bit; a backward adds one glu pass where down_proj saves h (once
    for the two paths of a LoRA), none where it saves nothing (frozen)."""
    need_backend(backend, "cpu")
    m, eager, wrt = _block(down, packed, act, dtype)
    x = _x(dtype)
    with fused_act.use_backend(backend):
        want = _grads(eager, x, wrt)
        m.recompute = False
        kept = _grads(m, x, wrt)
        assert reruns == []
        m.recompute = True
        got = _grads(m, x, wrt)
    assert len(reruns) == RERUNS[down]
    _assert_grads(got, want, dtype)
    for a, b in zip(got, kept, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_bf16_autocast(packed, reruns):
    """Under CPU bf16 autocast (fp32 weights): recompute=False's gradients bit for bit, the
    eager block's within bf16's tolerance; one glu pass recomputes h in bf16."""
    m, eager, wrt = _block("lora", packed, "silu")
    x = _x(torch.float32)
    results = []
    with fused_act.use_backend("triton" if _triton() else "reference"):
        for fn, recompute in ((eager, True), (m, False), (m, True)):
            m.recompute = recompute
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results.append(_grads(fn, x, wrt))
    assert len(reruns) == 1
    _assert_grads(results[2], results[0], torch.bfloat16)
    for a, b in zip(results[2], results[1], strict=True):
        assert torch.equal(a, b)


def _triton() -> bool:
    try:
        need_backend("triton", "cpu")
    except pytest.skip.Exception:
        return False
    return True


def test_backward_twice_with_retain_graph(reruns):
    """retain_graph=True: each backward recomputes h once and gives the same gradients; a
    third backward after the graph is freed raises autograd's own error."""
    m, eager, wrt = _block("lora", False, "silu", F64)
    x = _x(F64)
    want = _grads(eager, x, wrt)
    y = m(x)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)).sum()
    first = torch.autograd.grad(loss, [x, *wrt], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *wrt])
    assert len(reruns) == 2
    _assert_grads(list(first), want, F64)
    _assert_grads(list(second), want, F64)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, [x, *wrt])


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_double_backward(packed, reruns):
    """create_graph=True: the gradient of a function of the first gradients is the eager
    block's (the recomputed h joins glu's node, as the saved h would)."""
    m, eager, wrt = _block("lora", packed, "swish_beta", F64)
    x = _x(F64)
    results = []
    for fn in (eager, m):
        first = _grads(fn, x, wrt, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), [x, *wrt],
                                     allow_unused=True)  # a bias's gradient is not h's
        results.append([torch.zeros_like(t) if g is None else g
                        for g, t in zip(second, [x, *wrt], strict=True)])
    # the second pass runs the forward's LoRA nodes again (lora_B's gradient is a product with
    # lora_A(h), a forward tensor): one recompute each pass
    assert len(reruns) == 2
    _assert_grads(results[1], results[0], F64)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint(reentrant, reruns):
    """Inside torch.utils.checkpoint (both kinds), the eager block's gradients; h is
    recomputed once in the backward (the non-reentrant kind reads gate and up from its own
    recomputation, through the hooks that composes with)."""
    m, eager, wrt = _block("lora", False, "silu", F64)
    x = _x(F64)
    want = _grads(eager, x, wrt)
    y = checkpoint(m, x, use_reentrant=reentrant)
    # .backward(): the reentrant kind refuses autograd.grad
    (y * torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)).sum().backward()
    _assert_grads([t.grad for t in (x, *wrt)], want, F64)
    assert len(reruns) == 1


def test_outer_hooks_compose(reruns):
    """Hooks of the caller (one that packs into its own objects, save_on_cpu) get every
    tensor down_proj saves but h, and gate and up once more in its place; they unpack them,
    and the gradients stay the eager block's."""
    m, eager, wrt = _block("lora", False, "silu", F64)
    x = _x(F64)
    want = _grads(eager, x, wrt)
    seen: set[int] = set()  # the storages of h's size

    def pack(t: Tensor) -> tuple[str, Tensor]:
        if t.numel() == x.numel() // HIDDEN * INTER:
            seen.add(t.untyped_storage().data_ptr())
        return "mine", t.clone()

    def unpack(p: tuple[str, Tensor]) -> Tensor:
        assert p[0] == "mine"
        return p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        got = _grads(m, x, wrt)
    _assert_grads(got, want, F64)
    assert len(seen) == 2  # gate and up; with h kept, h too
    with torch.autograd.graph.save_on_cpu():
        _assert_grads(_grads(m, x, wrt), want, F64)
    assert len(reruns) == 2


def test_compile_fullgraph(reruns):
    """torch.compile(fullgraph=True) traces the plain forward (AOTAutograd decides what to
    save) and gives the eager block's gradients."""
    m, eager, wrt = _block("lora", False, "silu", torch.float32)
    x = _x(torch.float32)
    want = _grads(eager, x, wrt)
    got = _grads(torch.compile(m, fullgraph=True, backend="aot_eager"), x, wrt)
    _assert_grads(got, want, torch.float32)
    assert reruns == []


def test_option_repr_and_state_dict():
    """recompute is an option of the module and of patch_gated_mlps (None by default); it
    changes neither the state_dict keys nor the repr of the default.  A module pickled before
    the option existed recomputes, as it did then."""
    m, _, _ = _block("linear", False, "silu", recompute=None)
    assert m.recompute is None and "recompute" not in repr(m)
    for recompute in (True, False):
        other = GatedMLP(m.down_proj, "silu", gate_proj=m.gate_proj, up_proj=m.up_proj,
                         recompute=recompute)
        assert f"recompute={recompute}" in repr(other)
        assert other.state_dict().keys() == m.state_dict().keys()
    old = GatedMLP.__new__(GatedMLP)
    old.__setstate__({k: v for k, v in m.__dict__.items() if k != "recompute"})
    assert old.recompute is True and "recompute=True" in repr(old)
    for recompute in (None, True, False):
        model = nn.Sequential(HandMLP(HIDDEN, INTER))
        fused_act.patch_gated_mlps(model, recompute=recompute)
        assert type(model[0]) is GatedMLP and model[0].recompute is recompute


def test_default_keeps_h_on_cpu_recomputes_elsewhere(reruns):
    """recompute=None keeps h for CPU tensors (the bytes of recompute=False, no glu pass in
    the backward, the eager block's gradients) and recomputes it on any other device (the meta
    device here: one glu pass)."""
    m, eager, wrt = _block("linear", False, "silu", F64, recompute=None)
    x = _x(F64)
    _assert_grads(_grads(m, x, wrt), _grads(eager, x, wrt), F64)
    assert reruns == []
    kept, recomputed = copy.deepcopy(m), copy.deepcopy(m)
    kept.recompute, recomputed.recompute = False, True
    assert activation_bytes(m, x, False) == activation_bytes(kept, x, False) > \
        activation_bytes(recomputed, x, False)
    m.to("meta")
    y = m(torch.empty(2, 5, HIDDEN, dtype=F64, device="meta", requires_grad=True))
    torch.autograd.grad(y.sum(), list(m.parameters()))
    assert len(reruns) == 1
    # a TorchFunctionMode in force (torch.device's) is no argument that overrides functions:
    # recompute=True still recomputes on the CPU under it
    with torch.device("cpu"):
        torch.autograd.grad(recomputed(x).sum(), list(recomputed.parameters()))
    assert len(reruns) == 2


# ---- bytes autograd keeps ------------------------------------------------------------------------

class HandMLP(nn.Module):
    """A gated MLP block as model code writes it (the layout patch_gated_mlps recognises)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _of_parameter(t: Tensor, params: list[Tensor]) -> bool:
    """``t`` is a parameter, or made from one by casts and views alone (autocast's bf16 copy of
    a weight, its transpose)."""
    if any(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in params):
        return True
    node = t.grad_fn
    while node is not None and len(node.next_functions) == 1 and not hasattr(node, "variable"):
        node = node.next_functions[0][0]
    return node is not None and any(getattr(node, "variable", None) is p for p in params)


def activation_bytes(m: nn.Module, x: Tensor, autocast: bool) -> int:
    """The bytes autograd keeps for ``m(x)``'s backward, each storage once, the parameters and
    their autocast copies left out (they are the same in every form of a block, whatever the
    number of tokens)."""
    saved: dict[int, int] = {}
    params = list(m.parameters())

    def pack(t: Tensor) -> Tensor:
        if not _of_parameter(t, params):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=autocast), fused_act.use_backend("reference"):
        m(x)
    return sum(saved.values())


def _llama_mlp() -> nn.Module:
    try:
        transformers = importlib.import_module("transformers")
    except Exception as e:  # noqa: BLE001 - any import failure is the reason to skip
        pytest.skip(f"transformers does not import beside torch {torch.__version__}: {e!r}")
    from transformers.models.llama.modeling_llama import LlamaMLP
    return LlamaMLP(transformers.LlamaConfig(hidden_size=256, intermediate_size=688))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("block", ["llama", "hand_built"])
def test_saved_bytes(block, autocast):
    """Hidden 256, intermediate 688, 512 tokens: eager keeps x, gate, up, act(gate) and h;
    the fused op without recompute x, gate, up and h (0.77x); with it x, gate and up (0.54x,
    the target 0.60x).  Under bf16 autocast the same in bf16 (x's bf16 copy)."""
    torch.manual_seed(0)
    eager = _llama_mlp() if block == "llama" else HandMLP(256, 688)
    fused = {}
    for recompute in (False, True):
        model = nn.Sequential(copy.deepcopy(eager))
        assert fused_act.patch_gated_mlps(model, recompute=recompute).swapped
        fused[recompute] = model[0]
    x = torch.randn(1, 512, 256, requires_grad=True)
    size = 2 if autocast else 4
    xb, ib = 512 * 256 * size, 512 * 688 * size
    got = [activation_bytes(m, x, autocast) for m in (eager, fused[False], fused[True])]
    assert got == [xb + 4 * ib, xb + 3 * ib, xb + 2 * ib]
    assert got[2] <= 0.60 * got[0]
