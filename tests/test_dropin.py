"""Drop-in use: replace_activations, whole-model torch.compile, autocast, DDP, the example."""

import copy
import importlib.util
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_act
from fused_act import registry

from .cases import ROOT, need_device
from .test_acon import PlainAconC, PlainMetaAconC
from .test_frelu import PlainFReLU


def _example():
    spec = importlib.util.spec_from_file_location("train_digits",
                                                  ROOT / "examples" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the published modules carry these class names; replace_activations goes by name and layout
PaperAconC = type("AconC", (PlainAconC,), {})
PaperMetaAconC = type("MetaAconC", (PlainMetaAconC,), {})
PaperFReLU = type("FReLU", (PlainFReLU,), {})


class OtherAconC(nn.Module):
    """Named like the paper's module but shaped otherwise: must be left alone."""

    def __init__(self):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(3))


OtherAconC.__name__ = "AconC"


def _zoo() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Mish(inplace=True),
        nn.Conv2d(16, 16, 1), nn.SiLU(), nn.GELU(approximate="tanh"), nn.GELU(),
        PaperAconC(16), PaperMetaAconC(16, r=4), PaperMetaAconC(16, r=4, bn=True),
        PaperFReLU(16), nn.ReLU(), nn.Sequential(nn.Conv2d(16, 16, 1), nn.Mish()), OtherAconC(),
    ).double()


@pytest.mark.filterwarnings("ignore:fused_act.nn.Mish\\(inplace=True\\)")
def test_replace_activations_swaps_and_keeps_state():
    ref, model = _zoo(), _zoo()
    model[8].bn1.running_mean.uniform_()  # a buffer that must survive the swap
    ref.load_state_dict(model.state_dict())
    model.eval()
    ref.eval()
    report = fused_act.replace_activations(model)
    assert [s.name for s in report.swapped] == ["1", "3", "4", "5", "6", "7", "8", "9", "11.1"]
    assert {s.name: s.new for s in report.swapped}["8"].startswith("fused_act.nn.MetaAconC(")
    assert [(x.name, x.reason) for x in report.left] == [
        ("12", "its layout is not the published AconC's")]
    kinds = [type(m) for m in model]
    assert kinds[1] is fused_act.nn.Mish and model[1].inplace
    assert kinds[4] is fused_act.nn.GELU and model[4].approximate == "tanh"
    assert kinds[9] is fused_act.nn.FReLU and type(model[10]) is nn.ReLU
    assert type(model[12]) is OtherAconC  # not the paper's layout
    assert not model[9].training and model[6].p1.dtype == torch.float64
    assert torch.equal(model[8].bn1.running_mean, ref[8].bn1.running_mean)
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    body = slice(0, 12)  # the last module is a stand-in that takes no input
    with torch.no_grad():
        torch.testing.assert_close(model[body](x), ref[body](x))
    model.train()
    ref.train()
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    model[body](xg).sum().backward()
    ref[body](xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, msg=name)
    assert fused_act.replace_activations(model).swapped == []  # idempotent


@pytest.mark.parametrize("spec", [s for s in registry.SPECS.values() if s.replaces],
                         ids=lambda s: s.name)
def test_every_spec_replaces_its_torch_module(spec):
    """The registry's class map: torch.nn's module of each spec becomes the spec's fused module,
    with the same arguments, and computes the same function."""
    original = getattr(nn, spec.replaces)(**spec.kwargs)
    model = nn.Sequential(original)
    swapped = fused_act.replace_activations(model).swapped
    assert [s.new.split("(")[0] for s in swapped] == [f"fused_act.nn.{spec.module}"]
    x = torch.randn(4, 33, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", [s for s in registry.SPECS.values() if s.module],
                         ids=lambda s: s.name)
def test_every_spec_has_its_module_and_plain_ones_are_generated(spec):
    """Each spec's module is exported; a plain activation's is generated from the registry: its
    public function with ``inplace``, picklable by name."""
    cls = getattr(fused_act.nn, spec.module)
    assert fused_act.nn.modules.MODULES[spec.module] is cls and spec.module in fused_act.nn.__all__
    if spec.module in ("GELU", "Swish"):  # written by hand
        return
    assert (cls.__module__, cls.__qualname__, cls.op) == ("fused_act.nn.modules", spec.module,
                                                          spec.name)
    assert f"``fused_act.{spec.function or spec.name}(x" in cls.__doc__
    model = pickle.loads(pickle.dumps(nn.Sequential(cls(inplace=True))))
    x = torch.randn(4, 33, dtype=torch.float64)
    want = spec.call(x)
    assert type(model[0]) is cls and model[0](x) is x
    torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_generated_module_of_an_aliased_spec_and_those_written_by_hand():
    """A spec whose function takes arguments (``gelu_tanh``: gelu, approximate="tanh") gets a
    module computing just that; a spec with a beta, or a module shared by two specs, needs one
    written by hand."""
    import dataclasses

    from fused_act.nn import modules
    cls = modules._activation_module(dataclasses.replace(registry.SPECS["gelu_tanh"],
                                                         module="GELUTanh"))
    x = torch.randn(4, 33, dtype=torch.float64)
    torch.testing.assert_close(cls()(x), fused_act.gelu(x, approximate="tanh"), rtol=0, atol=0)
    assert "``fused_act.gelu(x, approximate='tanh')`` as a module" in cls.__doc__
    with pytest.raises(ValueError, match="needs fused_act.gelu to take inplace"):
        cls(inplace=True)
    with pytest.raises(RuntimeError, match="takes a beta"):
        modules._activation_module(dataclasses.replace(registry.SPECS["swish"], module="Other"))


def test_pickled_model_with_swapped_modules():
    """A swapped model pickles with its originals, so the copy can be restored too."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Mish(), fused_act.nn.AconC(4),
                          nn.SiLU(inplace=True), nn.GELU(approximate="tanh"))
    fused_act.replace_activations(model)
    loaded = pickle.loads(pickle.dumps(model))
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert loaded[3].inplace and loaded[4].approximate == "tanh"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    assert fused_act.restore_activations(loaded) == ["1", "3", "4"]
    assert [type(m) for m in loaded] == [nn.Conv2d, nn.Mish, fused_act.nn.AconC, nn.SiLU, nn.GELU]

def test_replace_activations_include_exclude():
    model = _zoo()
    report = fused_act.replace_activations(model, include=["Mish", "FReLU"], exclude=["11"])
    assert [s.name for s in report.swapped] == ["1", "9"]
    assert "11.1" in [x.name for x in report.left if x.reason.startswith("excluded")]
    report = fused_act.replace_activations(model, exclude=["GELU", "7"])
    assert [s.name for s in report.swapped] == ["3", "6", "8", "11.1"]


def _digits_net(device):
    torch.manual_seed(0)
    return _example().DigitsNet().to(device)


@pytest.mark.parametrize("device", [pytest.param("cpu"),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
def test_whole_model_compile(device):
    """The example's CNN under torch.compile(fullgraph=True): no graph break, eager's values."""
    need_device(device)
    torch._dynamo.reset()
    model = _digits_net(device)
    x = torch.randn(8, 1, 8, 8, device=device)
    with fused_act.use_backend("triton"):
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        modes = ["default", "reduce-overhead"] if device == "cuda" else ["default"]
        for mode in modes:
            torch._dynamo.reset()
            results = []
            for m in (model, torch.compile(model, fullgraph=True, mode=mode)):
                for _ in range(3 if m is not model else 1):  # CUDA graphs record, then replay
                    model.zero_grad()
                    y = m(x)
                    y.square().mean().backward()
                results.append((y.detach().clone(), [p.grad.clone() for p in model.parameters()]))
            (y0, g0), (y1, g1) = results
            torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
            for a, b in zip(g1, g0, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_autocast_cpu_bf16():
    """Under autocast the ops take what autocast hands them and return that dtype, as the torch
    functions do; gradients stay finite. ACON-C returns x's dtype (the plain formula would
    promote to its fp32 parameters)."""
    need_device("cpu")
    model = _digits_net("cpu")
    x = torch.randn(8, 1, 8, 8)
    lin = nn.Linear(8, 8)
    with fused_act.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(torch.randn(4, 8))
        for spec in registry.SPECS.values():  # each as users call it, and PyTorch's function
            assert spec.call(h).dtype == spec.torch_fn(h).dtype == torch.bfloat16, spec.name
            assert spec.call(x).dtype == spec.torch_fn(x).dtype == torch.float32, spec.name
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_grad_scaler(dtype):
    need_device("cuda")
    model = _digits_net("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=dtype):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert loss.isfinite()
    assert all(p.grad.isfinite().all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---- DDP ----------------------------------------------------------------------------------

def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), fused_act.nn.AconC(8), fused_act.nn.MetaAconC(8, r=4),
        fused_act.nn.FReLU(8), nn.Conv2d(8, 8, 1),
        fused_act.nn.Swish(learnable=True, num_parameters=8), nn.Flatten(), nn.Linear(8 * 25, 4))
    # BatchNorm in eval: per-sample results independent of how the batch is split
    model[3].bn.eval()
    return model


def _ddp_steps(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _ddp_worker(rank, world, init_file, x, y, out):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        fused_act.set_backend("triton")
        model = nn.parallel.DistributedDataParallel(_ddp_model())
        model.module[3].bn.eval()
        half = len(x) // world
        _ddp_steps(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save(model.module.state_dict(), out)
        # tear down together: a rank leaving while the other still talks aborts gloo (seen
        # once in CI as SIGABRT, "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one():
    need_device("cpu")
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 5, 5), torch.randint(0, 4, (8,))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), x, y, out), nprocs=2)
        ddp_state = torch.load(out)
    single = _ddp_model()
    with fused_act.use_backend("triton"):
        _ddp_steps(single, x, y)
    trained = ["1.p1", "1.p2", "1.beta", "2.p1", "2.fc1.weight", "3.conv.weight",
               "3.bn.weight", "5.beta"]
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n in trained if not torch.equal(_ddp_model().state_dict()[n], ddp_state[n])]
    assert moved == trained


def test_example_one_short_epoch():
    """The example trains, and the fused (interpreted Triton) and reference runs agree."""
    need_device("cpu")
    example = _example()
    fused = example.train(1, "triton", limit=96, batch=32, quiet=True)
    ref = example.train(1, "reference", limit=96, batch=32, quiet=True)
    fused_act.set_backend("auto")
    assert abs(fused[0][0] - ref[0][0]) < 1e-4 and fused[0][1] == ref[0][1]


# ---- what replace_activations recognises, checks, reports and undoes -----------------------------

def _lookalikes():
    """Every (qualified class name, spec) that the registry lists, importable here."""
    out = []
    for spec in registry.SPECS.values():
        for name in spec.lookalikes:
            module, cls = name.rsplit(".", 1)
            out.append(pytest.param(module, cls, spec, id=f"{cls}-{spec.name}"))
    return out


@pytest.mark.parametrize(("module", "cls", "spec"), _lookalikes())
def test_every_lookalike_class_is_swapped_and_computes_the_same(module, cls, spec):
    """Each class the registry names (timm, transformers, ...) is swapped for the spec's module
    without a probe, and computes the same function in fp32 (values and gradients)."""
    try:
        original = getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        pytest.skip(f"{module} is not installed here ({e})")
    model = nn.Sequential(original)
    report = fused_act.replace_activations(model)
    assert [(s.old, s.probed) for s in report.swapped] == [(f"{module}.{cls}", False)]
    assert type(model[0]).__name__ == spec.module and "fused" in repr(model[0])
    x = torch.linspace(-6, 6, 999).reshape(9, 111).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    with fused_act.use_backend("triton"):
        y = model(x)
        y.square().sum().backward()
    want = original(x2)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_lookalike_names_never_collide():
    """A class name the registry lists belongs to one module with one set of arguments."""
    known = fused_act.nn.swap._known()
    by_name = {}
    for qualified, hit in known.items():
        by_name.setdefault(qualified.rsplit(".", 1)[1], set()).add((hit[0], tuple(hit[1].items())))
    assert all(len(v) == 1 for v in by_name.values()), by_name


class _SubSiLU(nn.SiLU):
    """A subclass computing the same function: swapped after the probe."""


class _TanhGELU(nn.GELU):
    """A subclass computing another function: left, with the difference."""

    def forward(self, x):
        return nn.functional.gelu(x, approximate="tanh")


def _unknown_mish():
    """A class of an unknown package named like a known one."""
    return type("Mish", (nn.Module,), {"forward": lambda self, x: nn.functional.mish(x),
                                       "__module__": "somepackage.layers"})()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_unfamiliar_classes_are_checked_on_a_probe(dtype):
    patched = nn.SiLU()
    patched.forward = lambda x: 2 * x  # an instance whose forward was replaced
    hooked = nn.Mish()
    hooked.register_forward_hook(lambda m, i, o: None)
    model = nn.Sequential(nn.Linear(4, 4), _SubSiLU(), _TanhGELU(), patched, _unknown_mish(),
                          hooked).to(dtype)
    report = fused_act.replace_activations(model)
    # tanh-GELU is 5e-4 from GELU: below bf16's rounding, but another function, so it is left
    # in every dtype (the probe runs in float64)
    assert [(s.name, s.probed) for s in report.swapped] == [("1", True), ("4", True)]
    left = {x.name: x.reason for x in report.left}
    assert left.keys() == {"2", "3", "5"}
    assert "hooks" in left["5"] and "another function" in left["3"] and "float64" in left["2"]
    assert type(model[1]) is fused_act.nn.SiLU and type(model[4]) is fused_act.nn.Mish


def test_probe_leaves_state_alone_and_failing_modules_in_place():
    class Broken(nn.Mish):
        def forward(self, x):
            raise RuntimeError("no")

    bn_model = nn.Sequential(nn.Conv2d(3, 8, 1), type("FReLU", (PlainFReLU,), {})(8), Broken())
    bn = bn_model[1].bn
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    report = fused_act.replace_activations(bn_model)
    assert [s.name for s in report.swapped] == ["1"]
    assert torch.equal(bn_model[1].bn.running_mean, before[0])
    assert torch.equal(bn_model[1].bn.num_batches_tracked, before[1])
    assert [x.name for x in report.left] == ["2"] and "RuntimeError: no" in report.left[0].reason


def test_shared_module_stays_shared_and_restore_undoes_the_swap():
    torch.manual_seed(0)
    act = nn.SiLU()
    model = nn.Sequential(act, nn.Sequential(act), PaperAconC(4), nn.GELU(approximate="tanh"))
    original = [type(m) for m in model]
    x = torch.randn(3, 4, 2, 2)
    want = model(x)
    report = fused_act.replace_activations(model)
    assert sorted(s.name for s in report.swapped) == ["0", "1.0", "2", "3"]
    assert model[0] is model[1][0] and type(model[0]) is fused_act.nn.SiLU
    torch.testing.assert_close(model(x), want)
    with torch.no_grad():
        model[2].p1.add_(1.0)  # trained after the swap: restore keeps it
    trained = model[2].p1.detach().clone()
    model.eval()
    assert sorted(fused_act.restore_activations(model)) == ["0", "1.0", "2", "3"]
    assert [type(m) for m in model] == original and not model[2].training
    assert model[0] is model[1][0] is act
    assert torch.equal(model[2].p1, trained) and model[3].approximate == "tanh"
    assert fused_act.restore_activations(model) == []


def test_report_is_printed_when_verbose(capsys):
    model = nn.Sequential(nn.Mish(), _TanhGELU())
    report = fused_act.replace_activations(model, verbose=True)
    out = capsys.readouterr().out
    assert out.strip() == str(report)
    assert "1 swapped, 1 left" in out and "torch.nn.modules.activation.Mish" in out
    assert repr(model[0]) == "Mish(fused)"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inplace_modules_write_into_their_input_as_torch_does(backend):
    """A block that reads its input after an in-place activation (``a = act(h); a + h``) gets
    torch.nn's values and gradients, with a gradient needed or not, and no warning."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(6, 6), nn.SiLU(inplace=True)
            self.act2 = nn.Mish(inplace=True)

        def forward(self, x):
            h = self.lin(x)
            a = self.act(h)
            return self.act2(a + h) + h

    torch.manual_seed(0)
    original = Block()
    model = copy.deepcopy(original)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fused_act.replace_activations(model).swapped) == 2
        x = torch.randn(4, 6) * 3
        with fused_act.use_backend(backend):
            y = model(x)
            y.square().sum().backward()
            with torch.no_grad():
                y_nograd = model(x)
    want = original(x)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_nograd, want.detach(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    leaf = torch.randn(3, requires_grad=True)  # as torch.nn's: an in-place write into a leaf
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        model.act(leaf)


# ---- a swap never changes what a model computes or trains --------------------------------------

def _frelu_with(**conv):
    """The paper's FReLU with a YOLO-style BatchNorm (eps 1e-3, momentum 0.03) and ``conv``'s
    further arguments."""
    m = PaperFReLU(4)
    m.conv = nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False, **conv)
    m.bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.03)
    with torch.no_grad():
        m.bn.running_var.fill_(1e-3)  # eps matters
    return m


class _ScaledAconC(PlainAconC):
    """Named and shaped as the paper's AconC, computing something else."""

    def forward(self, x):
        return 2 * super().forward(x)


_ScaledAconC.__name__ = "AconC"


class _DropoutGELU(nn.GELU):
    """GELU with dropout in training only: the same function in eval mode."""

    def forward(self, x):
        return nn.functional.dropout(super().forward(x), 0.5, self.training)


def _quick_gelu_named_gelu():
    """x sigmoid(1.702 x), of an unknown package, named GELU: within bf16's rounding of GELU."""
    return type("GELU", (nn.Module,), {"forward": lambda self, x: x * torch.sigmoid(1.702 * x),
                                       "__module__": "somepackage.layers"})()


@pytest.mark.parametrize("train", [False, True])
def test_paper_modules_carry_batchnorm_settings_and_are_probed(train):
    torch.manual_seed(0)
    model = nn.Sequential(_frelu_with(), _frelu_with(padding_mode="reflect"), _ScaledAconC(4))
    original = copy.deepcopy(model).train(train)
    model.train(train)
    report = fused_act.replace_activations(model)
    assert [(s.name, s.probed) for s in report.swapped] == [("0", True)]
    assert model[0].bn.eps == 1e-3 and model[0].bn.momentum == 0.03
    left = {x.name: x.reason for x in report.left}
    assert "layout" in left["1"] and "another function" in left["2"]
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(model[0](x), original[0](x))
    if train:  # the running statistics move alike
        torch.testing.assert_close(model[0].bn.running_var, original[0].bn.running_var)


def test_swap_keeps_parameter_objects_frozen_flags_and_dtypes():
    """The replacement holds the original's own tensors: an optimizer built before the swap
    steps it, and frozen parameters stay frozen."""
    torch.manual_seed(0)
    acon = PaperAconC(4)
    acon.p2.requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), acon)
    tensors = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert [s.name for s in fused_act.replace_activations(model).swapped] == ["1"]
    assert type(model[1]) is fused_act.nn.AconC
    for name, t in model.named_parameters():
        assert t is tensors[name], name
    assert not model[1].p2.requires_grad and model[1].p1.requires_grad
    before = model[1].p1.detach().clone()
    model(torch.randn(2, 4, 3, 3)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[1].p1, before) and model[1].p2.grad is None


def test_mixed_dtype_module_keeps_its_dtypes_through_swap_and_restore():
    torch.manual_seed(0)
    frelu = PaperFReLU(4)
    frelu.conv.to(torch.float64)
    model = nn.Sequential(frelu)
    mean = frelu.bn.running_mean.clone()
    assert [s.name for s in fused_act.replace_activations(model).swapped] == ["0"]
    assert model[0].conv.weight.dtype == torch.float64
    assert model[0].bn.running_mean.dtype == torch.float32
    assert fused_act.restore_activations(model) == ["0"] and model[0] is frelu
    assert frelu.conv.weight.dtype == torch.float64 and frelu.bn.weight.dtype == torch.float32
    assert torch.equal(frelu.bn.running_mean, mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_functions_that_only_agree_in_eval_or_at_low_precision_are_left(dtype):
    model = nn.Sequential(_DropoutGELU(), _quick_gelu_named_gelu(), nn.GELU()).to(dtype)
    report = fused_act.replace_activations(model)
    assert [s.name for s in report.swapped] == ["2"]
    left = {x.name: x.reason for x in report.left}
    assert "train mode" in left["0"] and "another function" in left["1"]


def test_compiled_submodule_is_left_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), torch.compile(PaperAconC(4), backend="eager"),
                          torch.compile(nn.Sequential(nn.SiLU()), backend="eager"))
    report = fused_act.replace_activations(model)
    assert [s.name for s in report.swapped] == ["2._orig_mod.0"]
    assert [(x.name, "torch.compile" in x.reason) for x in report.left] == [("1._orig_mod", True)]


def test_shared_module_include_exclude_decides_once():
    act = nn.SiLU()
    for exclude in (["0"], ["1.0"]):
        model = nn.Sequential(act, nn.Sequential(act))
        report = fused_act.replace_activations(model, exclude=exclude)
        assert report.swapped == [] and model[0] is model[1][0] is act
        assert sorted(x.name for x in report.left) == ["0", "1.0"]


def test_meta_device_model():
    """On the meta device (deferred initialisation) a known class swaps, a stateless one is
    probed on the CPU, and one whose probe needs its meta parameters is left with the reason,
    not an error."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), _SubSiLU(), PaperAconC(4))
    report = fused_act.replace_activations(model)
    assert [(s.name, s.probed) for s in report.swapped] == [("1", False), ("2", True)]
    assert [x.name for x in report.left] == ["3"] and "meta" in report.left[0].reason


def test_report_order_and_a_model_that_is_an_activation():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Mish()), nn.SiLU())
    assert [s.name for s in fused_act.replace_activations(model).swapped] == ["0.1", "1"]
    report = fused_act.replace_activations(nn.GELU())
    assert report.swapped == [] and "the model itself" in report.left[0].reason


def test_gated_modules_check_their_arguments_when_built():
    with pytest.raises(ValueError, match="relu"):
        fused_act.nn.GatedMLP(nn.Linear(4, 2), "relu", gate_proj=nn.Linear(2, 4),
                              up_proj=nn.Linear(2, 4))
    assert repr(fused_act.nn.GLU(dim=0)) == "GLU(fused, activation='silu', dim=0)"
    with pytest.raises(ValueError, match=r"fused_act\.nn\.GatedMLP: give gate_proj and up_proj"):
        fused_act.nn.GatedMLP(nn.Linear(4, 2), "silu", gate_proj=nn.Sequential(),  # falsy
                              gate_up_proj=nn.Linear(2, 8))
    with pytest.raises(ValueError, match=r"fused_act\.nn\.GatedMLP: .*approximate"):
        fused_act.nn.GatedMLP(nn.Linear(4, 2), "gelu", gate_up_proj=nn.Linear(2, 8),
                              approximate="erf")
    with pytest.raises(TypeError, match=r"fused_act\.nn\.GLU: dim must be an int"):
        fused_act.nn.GLU(dim=1.0)
    with pytest.raises(TypeError, match=r"fused_act\.nn\.GLU: beta must be a float or a tensor"):
        fused_act.nn.GLU("swish", beta="2")
    with pytest.raises(TypeError, match=r"fused_act\.nn\.GLU: beta must be a floating-point"):
        fused_act.nn.GLU("swish", beta=torch.tensor(2))
    with pytest.raises(ValueError, match=r"fused_act\.nn\.GLU: beta must be .* one-element"):
        fused_act.nn.GLU("swish", beta=torch.ones(2))
    # a tensor beta's device is the input's business, checked in forward
    assert fused_act.nn.GLU("swish", beta=torch.tensor(2.0, device="meta")).activation == "swish"


@pytest.mark.parametrize(("build", "kind", "match"), [
    (lambda: fused_act.nn.AconC(0), ValueError, r"nn\.AconC: c1 must be >= 1 \(got 0\)"),
    (lambda: fused_act.nn.MetaAconC(8, r=0), ValueError, r"nn\.MetaAconC: r must be >= 1"),
    (lambda: fused_act.nn.FReLU(8, k=3.0), TypeError, r"nn\.FReLU: k must be an int"),
    (lambda: fused_act.nn.Swish(learnable=True, num_parameters=True), TypeError,
     r"nn\.Swish: num_parameters must be an int"),
])
def test_modules_check_their_arguments_when_built(build, kind, match):
    with pytest.raises(kind, match=match):
        build()


class _Block(nn.Module):
    """A gated MLP block of the Llama layout, ``down(act(gate(x)) * up(x)) * scale``."""

    def __init__(self, act=None, scale=1.0, down=None):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.down_proj = down or nn.Linear(16, 8, bias=False)
        self.act_fn, self.scale = act or nn.SiLU(), scale

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * self.scale


class _SiLU105(nn.SiLU):
    def forward(self, x):
        return super().forward(1.05 * x)


@pytest.mark.parametrize(("dtype", "off"), [(torch.bfloat16, 1.05), (torch.float16, 1.01),
                                            (torch.float32, 1.0001)])
def test_patch_leaves_blocks_that_differ_slightly(dtype, off):
    """A block whose activation is another function is left in every dtype (the activation is
    probed in float64), and so is one whose forward is off by a few of its dtype's ulps (the
    block runs in place, in its dtype); tied projections do not stop a patch."""
    torch.manual_seed(0)
    tied = _Block()
    tied.up_proj.weight = tied.gate_proj.weight
    model = nn.Sequential(_Block(), _Block(scale=off), _Block(_SiLU105()),
                          _Block(_quick_gelu_named_gelu()), tied).to(dtype)
    report = fused_act.patch_gated_mlps(model)
    assert [s.name for s in report.swapped] == ["0", "4"], str(report)
    assert [x.name for x in report.left] == ["1", "2", "3"]
    assert "another function" in report.left[0].reason
    assert all("not an activation" in x.reason for x in report.left[1:])


def test_swaps_keep_random_state_buffers_and_modes():
    """Neither call draws from or reseeds the random generators, the block probe moves no
    buffer, and submodules keep their own modes."""
    torch.manual_seed(0)
    block = _Block(down=nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(3)))
    block.gate_proj.eval()
    model = nn.Sequential(block, PaperAconC(3), PaperFReLU(3), _SubSiLU())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    assert len(fused_act.replace_activations(model).swapped) == 4
    assert [s.name for s in fused_act.patch_gated_mlps(model).swapped] == ["0"]
    drawn = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model[0].training and not model[0].gate_proj.training and model[0].up_proj.training


def test_restore_is_all_or_nothing_and_nested_blocks():
    """A block inside a patched block's projections still runs, and is patched; one inside its
    dropped activation is not visited; restore puts a shared activation back in every slot,
    and changes nothing where one replacement cannot go back."""
    torch.manual_seed(0)
    shared = _Block()
    model = nn.Sequential(shared, shared, _Block(down=nn.Sequential(nn.Linear(16, 8), _Block())),
                          nn.Mish())
    report = fused_act.patch_gated_mlps(model)
    assert [s.name for s in report.swapped] == ["0", "1", "2", "2.down_proj.1"]
    assert model[0] is model[1] and type(model[2].down_proj[1]) is fused_act.nn.GatedMLP
    act = nn.SiLU()
    model = nn.Sequential(_Block(act), act)
    fused_act.replace_activations(model)
    fused_act.patch_gated_mlps(model)
    assert sorted(fused_act.restore_activations(model)) == ["0", "0.act_fn", "1"]
    assert model[0].act_fn is model[1] is act
    shared = _Block()
    model = nn.Sequential(shared, shared, _Block(), nn.Mish())
    fused_act.patch_gated_mlps(model)
    fused_act.replace_activations(model)
    model[2].gate_proj = nn.Sequential(model[2].gate_proj)  # wrapped after the patch
    with pytest.raises(ValueError, match="2 cannot be restored"):
        fused_act.restore_activations(model)
    assert type(model[0]) is fused_act.nn.GatedMLP and type(model[3]) is fused_act.nn.Mish


class _Observed(nn.Linear):
    """A Linear with an observer buffer its forward replaces (as an amax history does), and a
    stride-0 buffer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("amax", torch.zeros(()))
        self.register_buffer("ones", torch.ones(1).expand(4))

    def forward(self, x):
        self.amax = torch.maximum(self.amax, x.abs().max())
        return super().forward(x)


def test_block_probe_leaves_buffers_and_matmul_precision_as_they_were():
    torch.manual_seed(0)
    block = _Block()
    block.gate_proj = _Observed(8, 16, bias=False)
    model = nn.Sequential(block)
    amax, ones = block.gate_proj.amax, block.gate_proj.ones
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [b.fp32_precision for b in backends]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the per-backend setting
        assert [s.name for s in fused_act.patch_gated_mlps(model).swapped] == ["0"]
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision == before[1]
    finally:
        for b, p in zip(backends, before, strict=True):
            b.fp32_precision = p
    assert model[0].gate_proj.amax is amax and amax.item() == 0
    assert model[0].gate_proj.ones is ones
