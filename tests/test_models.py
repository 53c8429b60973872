"""Real clients: small random-init models that timm, transformers and torchvision build, swapped
by ``replace_activations`` and compared with the unswapped model, eagerly (fp32 values, input and
parameter gradients; one bf16-autocast training step) and under ``torch.compile(fullgraph=True)``
in a fresh process.  The swapped models run the Triton kernels (the interpreter on the CPU).

These packages are test dependencies (the ``[test]`` extra); where one cannot be installed beside
the torch under test, its models skip with the import error as the reason.
"""

import copy
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import fused_act

from .cases import ROOT


def _need(package: str):
    try:
        return importlib.import_module(package)
    except Exception as e:  # noqa: BLE001 - any import failure is the reason to skip
        pytest.skip(f"{package} does not import beside torch {torch.__version__}: {e!r}")


@dataclass(frozen=True)
class Case:
    """A model: how to build it (seeded, fp32), an input for it, and what a swap must find."""

    name: str
    package: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    classes: tuple[str, ...]  # the qualified activation classes the model is built with
    # BatchNorm on running statistics in train mode: at 32 x 32 the last stages of some models
    # are 1 x 1, where batch statistics of two samples turn rounding into sign flips
    frozen_bn: bool = False


def _image() -> dict:
    return {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _tokens() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        timm = _need("timm")
        if "act" in kwargs:  # a timm activation class by its attribute path
            module, cls = kwargs.pop("act").rsplit(".", 1)
            kwargs["act_layer"] = getattr(importlib.import_module(module), cls)
        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    return build


def _lm(config: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        transformers = _need("transformers")
        cfg = getattr(transformers, config)(vocab_size=64, num_hidden_layers=2, **kwargs)
        if config == "BertConfig":
            return transformers.BertForMaskedLM(cfg)
        return transformers.AutoModelForCausalLM.from_config(cfg)
    return build


_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
CASES = [
    Case("timm resnet10t mish (torch.nn, inplace)", "timm", _timm("resnet10t", act_layer="mish"),
         _image, ("torch.nn.modules.activation.Mish",)),
    Case("timm convnext_atto", "timm", _timm("convnext_atto"), _image,
         ("timm.layers.activations.GELU",)),
    Case("timm resnet10t MishMe", "timm",
         _timm("resnet10t", act="timm.layers.activations_me.MishMe"), _image,
         ("timm.layers.activations_me.MishMe",)),
    Case("timm resnet10t Swish", "timm", _timm("resnet10t", act="timm.layers.activations.Swish"),
         _image, ("timm.layers.activations.Swish",)),
    Case("transformers Llama", "transformers",
         _lm("LlamaConfig", num_key_value_heads=1, **_TINY), _tokens,
         ("transformers.activations.SiLUActivation",)),
    Case("transformers GPT-2", "transformers", _lm("GPT2Config", n_embd=32, n_head=2), _tokens,
         ("transformers.activations.NewGELUActivation",)),
    Case("transformers BERT", "transformers", _lm("BertConfig", **_TINY), _tokens,
         ("transformers.activations.GELUActivation",)),
    Case("transformers Gemma", "transformers",
         _lm("GemmaConfig", num_key_value_heads=1, head_dim=16, **_TINY), _tokens,
         ("transformers.activations.GELUTanh",)),
    Case("torchvision efficientnet_b0", "torchvision",
         lambda: _need("torchvision").models.efficientnet_b0(num_classes=5), _image,
         ("torch.nn.modules.activation.SiLU",), frozen_bn=True),
]


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.build().float()


def _train(model: nn.Module, case: Case, mode: bool = True) -> None:
    model.train(mode)
    if case.frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _out(model: nn.Module, inputs: dict) -> Tensor:
    if "x" in inputs:
        return model(inputs["x"])
    return model(**inputs).logits


def _activations(model: nn.Module) -> dict[str, str]:
    return {name: f"{type(m).__module__}.{type(m).__qualname__}"
            for name, m in model.named_modules() if not list(m.children())
            and type(m).__qualname__.split(".")[-1] in _ACTIVATION_NAMES}


_ACTIVATION_NAMES = {"Mish", "MishMe", "Swish", "SwishMe", "SiLU", "GELU", "GELUTanh",
                     "SiLUActivation", "NewGELUActivation", "GELUActivation"}


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _flat_grads(model: nn.Module, original: nn.Module) -> tuple[Tensor, Tensor]:
    """Both models' parameter gradients as one vector each (some are zero up to rounding, e.g.
    an attention key's bias: they are compared at the scale of the whole gradient)."""
    ours, theirs = _grads(model), _grads(original)
    assert ours.keys() == theirs.keys()
    return tuple(torch.cat([g[n].reshape(-1) for n in theirs]) for g in (ours, theirs))


def _close(got: Tensor, want: Tensor, what: str, rtol: float) -> float:
    """max |got - want| relative to max |want|, asserted below ``rtol``."""
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(
        1e-30)).item()
    assert err <= rtol, f"{what}: relative difference {err:.3g} > {rtol}"
    return err


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_swapped_model_matches(case):
    """Every activation the model is built with is swapped (none left; one after BatchNorm with
    its BatchNorm), and the swapped model gives the original's outputs, input gradients and
    parameter gradients in fp32."""
    original = _build(case)
    found = _activations(original)
    assert found and set(found.values()) == set(case.classes), found
    model = copy.deepcopy(original)
    report = fused_act.replace_activations(model)
    now = dict(model.named_modules())
    # a BatchNorm -> activation pair is swapped as one module at BatchNorm's name: the
    # activation's slot is an Identity (a Sequential pair) or the fused module's act (timm's)
    fused = {n for n, m in now.items() if isinstance(m, fused_act.nn.BatchNormAct2d)}
    paired = {n for n in found if isinstance(now[n], nn.Identity)
              or n.rpartition(".")[0] in fused}
    assert {s.name for s in report.swapped} == set(found) - paired | fused \
        and report.left == [], str(report)
    assert all("(fused" in repr(now[n]) for n in set(found) - paired | fused)
    inputs = case.inputs()
    for m in (original, model):
        _train(m, case)
    diffs = {}
    with fused_act.use_backend("triton"):
        ys, xgrads = [], []
        for m in (original, model):
            torch.manual_seed(2)  # the same dropout masks
            if "x" in inputs:
                x = inputs["x"].clone().requires_grad_()
                y = m(x)
            else:
                x = m.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
                y = m(inputs_embeds=x).logits
            y.square().mean().backward()
            ys.append(y.detach())
            xgrads.append(x.grad)
    diffs["out"] = _close(ys[1], ys[0], "output", 1e-4)
    diffs["dx"] = _close(xgrads[1], xgrads[0], "input gradient", 1e-4)
    diffs["dparams"] = _close(*_flat_grads(model, original), "parameter gradients", 1e-3)
    print(f"\n{case.name}: {len(found)} swapped, max relative differences {diffs}")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "timm resnet10t mish (torch.nn, inplace)", "timm convnext_atto", "transformers Llama")],
    ids=lambda c: c.name)
def test_bf16_autocast_training_step(case):
    """One SGD step under CPU bf16 autocast: the same loss and the same updated parameters."""
    original = _build(case)
    model = copy.deepcopy(original)
    # BatchNorm pairs kept apart: fused, they round once in bf16 where the original rounds
    # BatchNorm's output and then the activation's, and this random-init network in train mode
    # turns any such difference into 8% of the loss and whole gradients (its own bf16 gradients
    # are that far from fp32's; torch's BatchNorm computed in fp32 moves them as much).  The
    # fused pair under autocast is checked layer by layer against float64 (test_batchnorm.py)
    fused_act.replace_activations(model, exclude=["BatchNorm2d"])
    inputs = case.inputs()
    losses, after = [], []
    with fused_act.use_backend("triton"):
        for m in (original, model):
            _train(m, case)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            torch.manual_seed(2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _out(m, inputs).float().square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            after.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    _close(losses[1], losses[0], "bf16 loss", 2e-2)
    _close(after[1], after[0], "parameters after one bf16 step", 2e-2)


# ---- whole-model torch.compile, in a fresh process ---------------------------------------------

def compile_all(names: list[str]) -> dict:
    """Compile each named case's swapped model with ``fullgraph=True`` and run forward and
    backward in train and eval mode; return per model its graph breaks (0: compile would have
    raised otherwise) and the largest difference from the eager swapped model."""
    results = {}
    for case in (c for c in CASES if c.name in names):
        model = _build(case)
        fused_act.replace_activations(model)
        inputs = case.inputs()
        worst = 0.0
        with fused_act.use_backend("triton"):
            for train in (True, False):
                torch._dynamo.reset()
                _train(model, case, train)
                compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
                for m in (model, compiled):
                    torch.manual_seed(2)
                    model.zero_grad()
                    y = _out(m, inputs)
                    y.square().mean().backward()
                    if m is model:
                        want = (y.detach(), _grads(model))
                got = (y.detach(), _grads(model))
                assert got[1].keys() == want[1].keys()
                worst = max(worst, _close(got[0], want[0], "compiled output", 1e-4),
                            _close(*(torch.cat([g[n].reshape(-1) for n in want[1]])
                                     for g in (got[1], want[1])), "compiled gradients", 1e-3))
        results[case.name] = {"graph_breaks": 0, "max_rel_diff": worst}
    return results


def test_whole_models_compile_fullgraph_in_a_fresh_process():
    """Every swapped model of the table compiles with fullgraph=True, from a fresh process (no
    warning state or cache left by the other tests), in train and eval mode, forward and
    backward, and matches its eager run."""
    names = [c.name for c in CASES if importlib.util.find_spec(c.package)]
    if not names:
        pytest.skip("none of timm, transformers, torchvision is installed")
    code = ("import json, sys; from tests.test_models import compile_all; "
            "print('RESULT', json.dumps(compile_all(json.loads(sys.argv[1]))))")
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning:torch._dynamo"}
    run = subprocess.run([sys.executable, "-c", code, json.dumps(names)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert set(results) == set(names), results
    print("\n" + "\n".join(f"{k}: {v}" for k, v in results.items()))


# ---- patch_gated_mlps on the transformer MLPs --------------------------------------------------

GATED = [
    ("LlamaConfig", dict(num_key_value_heads=1, **_TINY), "gate_proj"),
    ("GemmaConfig", dict(num_key_value_heads=1, head_dim=16, **_TINY), "gate_proj"),
    ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=0, **_TINY), "gate_up_proj"),
]


@pytest.mark.parametrize(("config", "kwargs", "projection"), GATED, ids=[g[0] for g in GATED])
def test_patch_gated_mlps_matches_eager_and_compiled(config, kwargs, projection):
    """Every MLP block of a tiny Llama / Gemma / Phi-3 (packed gate_up_proj) is patched after
    the probe; the model gives the unpatched one's outputs and gradients, eagerly and compiled
    with fullgraph=True; restore_activations puts the blocks back."""
    torch.manual_seed(0)
    original = _lm(config, **kwargs)().float()
    model = copy.deepcopy(original)
    params = {n: p for n, p in model.named_parameters()}
    report = fused_act.patch_gated_mlps(model)
    assert [s.name for s in report.swapped] == [f"model.layers.{i}.mlp" for i in range(2)]
    assert report.left == [], str(report)
    mlp = model.model.layers[0].mlp
    assert type(mlp) is fused_act.nn.GatedMLP and hasattr(mlp, projection)
    assert dict(model.named_parameters()) == params  # the same parameter objects
    inputs = _tokens()
    with fused_act.use_backend("triton"):
        results = []
        for m in (original, model, torch.compile(model, fullgraph=True, backend="aot_eager")):
            m.zero_grad()
            torch.manual_seed(2)
            y = _out(m, inputs)
            y.square().mean().backward()
            grads = original if m is original else model
            results.append((y.detach(), torch.cat([p.grad.reshape(-1)
                                                    for p in grads.parameters()])))
    for y, g in results[1:]:
        _close(y, results[0][0], "patched output", 1e-5)
        _close(g, results[0][1], "patched gradients", 1e-4)
    assert fused_act.restore_activations(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert type(model.model.layers[0].mlp) is type(original.model.layers[0].mlp)
    assert model.state_dict().keys() == original.state_dict().keys()


def test_patch_gated_mlps_leaves_other_blocks():
    class UpGated(nn.Module):  # the activation on the other projection: another function
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(8, 16), nn.Linear(8, 16),
                                                            nn.Linear(16, 8))
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    class Relu(UpGated):
        def __init__(self):
            super().__init__()
            self.act_fn = nn.ReLU()

    model = nn.Sequential(UpGated(), Relu())
    report = fused_act.patch_gated_mlps(model)
    assert report.swapped == [] and [x.name for x in report.left] == ["0", "1"]
    assert "another function" in report.left[0].reason and "ReLU" in report.left[1].reason


# real transformers blocks with the gated layout whose forward does more: a clamp of gate and up
# (swiglu_limit), dropout in training, a parameter of the block's own
_MORE = [("deepseek_v4", "DeepseekV4MLP", "another function"),
         ("glm5_next", "Glm5NextTextMLP", "another function"),
         ("seed_oss", "SeedOssMLP", "train mode"),
         ("gte", "GteMLP", "submodules the patch would drop (dropout)"),
         ("inkling", "InklingMLP", "of its own (global_scale)")]


@pytest.mark.parametrize(("module", "cls", "reason"), _MORE, ids=[m[1] for m in _MORE])
def test_patch_gated_mlps_leaves_blocks_that_compute_more(module, cls, reason):
    from types import SimpleNamespace
    _need("transformers")
    try:
        block = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                        cls)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"this transformers has no {cls}: {e!r}")
    torch.manual_seed(0)
    config = SimpleNamespace(hidden_size=16, intermediate_size=24, mlp_bias=False,
                             hidden_act="silu", swiglu_limit=10.0, residual_dropout=0.1,
                             hidden_dropout_prob=0.1, rms_norm_eps=1e-6)
    model = nn.Sequential(block(config))
    keys = model.state_dict().keys()
    report = fused_act.patch_gated_mlps(model)
    assert report.swapped == [] and type(model[0]).__name__ == cls
    assert [x.name for x in report.left] == ["0"] and reason in report.left[0].reason, str(report)
    assert model.state_dict().keys() == keys


def test_patch_gated_mlps_hooks_meta_and_restore_after_replace():
    """A hook anywhere in a block leaves it (and the probe never fires it); a block on the meta
    device is left with the reason; one restore_activations undoes replace_activations and
    patch_gated_mlps together."""
    config = dict(num_key_value_heads=1, **_TINY)
    with torch.device("meta"):
        meta = _lm("LlamaConfig", **config)()
    report = fused_act.patch_gated_mlps(meta)
    assert report.swapped == [] and all("meta" in x.reason for x in report.left)
    torch.manual_seed(0)
    model = _lm("LlamaConfig", **config)().float()
    seen = []
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    replaced = fused_act.replace_activations(model)
    assert [x.name for x in replaced.left] == ["model.layers.0.mlp.act_fn"]
    report = fused_act.patch_gated_mlps(model)
    assert [s.name for s in report.swapped] == ["model.layers.1.mlp"] and seen == []
    assert "hooks" in report.left[0].reason
    restored = fused_act.restore_activations(model)
    assert sorted(restored) == ["model.layers.1.mlp", "model.layers.1.mlp.act_fn"]
    assert not any(isinstance(m, fused_act.nn.FusedModule) for m in model.modules())
