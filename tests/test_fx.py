"""torch.fx: swapped models trace, each fused activation as one call of its public function.

``torch.fx.symbolic_trace`` and timm's ``create_feature_extractor`` (torchvision's FX feature
extraction, which detection and segmentation backbones are built on) reach the public functions
through the ``__torch_function__`` protocol, as they reach torch.nn.functional's; the traced
graph must compute what the untraced model does, values and gradients.
"""

import copy
import importlib
import inspect
import pickle

import pytest
import torch
from torch import nn
from torch.fx import symbolic_trace

import fused_act
from fused_act import functional, registry
from fused_act.nn import FusedModule


def _fused_calls(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's calls of fused_act's public functions."""
    public = list(registry.FUNCTIONS.values())
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in public]


class _Recorder:
    """A tensor-like that is no tensor: it sees every call through ``__torch_function__``."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func, args, kwargs or {}


@pytest.mark.parametrize("name", functional.__all__)
def test_every_public_function_hands_a_tensor_like_to_its_torch_function(name):
    """The override sees the public function itself, with the call's arguments untouched."""
    function = getattr(fused_act, name)
    required = [p for p in inspect.signature(function).parameters.values()
                if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    like = _Recorder()
    func, args, kwargs = function(*[like] * len(required))
    assert func is function and args == (like,) * len(required) and kwargs == {}


def _model() -> nn.Module:
    """Every kind of fused module: torch.nn's activations to be swapped, and fused_act.nn's
    published-style and learnable ones, on (N, 8, H, W) features."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Mish(), nn.SiLU(), nn.GELU(),
        nn.GELU(approximate="tanh"), fused_act.nn.Swish(0.7, learnable=True, num_parameters=8),
        fused_act.nn.AconC(8), fused_act.nn.MetaAconC(8, r=4), fused_act.nn.FReLU(8),
        fused_act.nn.SquaredReLU(), fused_act.nn.GLU(dim=1),
        fused_act.nn.GLU("swish", dim=1, learnable=True, beta=1.3))


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.detach().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, {"x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_symbolic_trace_of_every_swapped_module(train):
    model = _model()
    fused_act.replace_activations(model)
    assert sum(isinstance(m, FusedModule) for m in model) == 11
    model.train(train)
    traced = symbolic_trace(copy.deepcopy(model))
    calls = _fused_calls(traced)
    assert {n.target.__name__ for n in calls} == {
        "mish", "silu", "gelu", "swish", "acon_c", "frelu_max", "squared_relu", "glu"}
    assert {n.args[1] for n in calls if n.target is fused_act.gelu} == {"none", "tanh"}
    # the fused modules are traced through, down to one call each
    assert len(calls) == 11 and not any(
        isinstance(traced.get_submodule(n.target), FusedModule)
        for n in traced.graph.nodes if n.op == "call_module")

    x = torch.randn(2, 3, 6, 6)
    want, want_grads = _grads(model, x)
    got, got_grads = _grads(traced, x)
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, msg=name)
    if not train:  # without gradients FReLU folds BatchNorm eagerly; the graph runs it
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x))
    shipped = pickle.loads(pickle.dumps(traced))
    torch.testing.assert_close(shipped(x), got)


# fused_act.nn's modules with torch.nn's inplace argument, and their public functions
INPLACE = [pytest.param(getattr(fused_act.nn, s.module), getattr(fused_act, s.public), id=s.module)
           for s in registry.SPECS.values() if s.module
           and "inplace" in inspect.signature(getattr(fused_act.nn, s.module)).parameters]


@pytest.mark.parametrize("module, function", INPLACE)
def test_traced_inplace_module_writes_into_its_input(module, function):
    traced = symbolic_trace(nn.Sequential(module(inplace=True)))
    (call,) = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert call.target is function and call.kwargs == {"inplace": True}
    x = torch.randn(300) * 4
    want = module()(x)
    assert traced(x).data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, want)
    # a gradient needed: still into the input, with the out-of-place function's gradient
    leaf = torch.randn(5, requires_grad=True)
    h = leaf * 1
    y = traced(h)
    assert y.data_ptr() == h.data_ptr()
    (got,) = torch.autograd.grad(y.sum(), leaf)
    (expected,) = torch.autograd.grad(module()(leaf).sum(), leaf)
    torch.testing.assert_close(got, expected)


def _timm():
    try:
        return importlib.import_module("timm")
    except Exception as e:  # noqa: BLE001 - any import failure is the reason to skip
        pytest.skip(f"timm does not import beside torch {torch.__version__}: {e!r}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_timm_feature_extractor_of_a_swapped_resnet(train):
    """The FX feature extraction of detection backbones, on a swapped timm resnet with in-place
    Mish: the same features as the unswapped model with the same weights."""
    timm = _timm()
    from timm.models import create_feature_extractor

    torch.manual_seed(0)
    original = timm.create_model("resnet10t", act_layer="mish", pretrained=False)
    swapped = timm.create_model("resnet10t", act_layer="mish", pretrained=False)
    swapped.load_state_dict(original.state_dict())
    fused_act.replace_activations(swapped)
    assert isinstance(swapped.act1, fused_act.nn.Mish) and swapped.act1.inplace
    nodes = ["act1", "layer1", "layer2.0.act1", "layer3", "layer4"]
    ours, theirs = (create_feature_extractor(m, return_nodes=nodes).train(train)
                    for m in (swapped, original))
    assert {n.target for n in _fused_calls(ours)} == {fused_act.mish}
    x = torch.randn(2, 3, 64, 64)
    got, want = ours(x), theirs(x)
    assert list(got) == nodes
    for name in nodes:
        torch.testing.assert_close(got[name], want[name], msg=name)
