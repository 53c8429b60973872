"""Drop-in use: replace_activations, whole-model torch.compile, autocast, DDP, the example."""

import importlib.util
import os
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
    swapped = fused_act.replace_activations(model)
    assert [name for name, _, _ in swapped] == ["1", "3", "4", "5", "6", "7", "8", "9", "11.1"]
    assert dict((n, new) for n, _, new in swapped)["8"] == "fused_act.nn.MetaAconC"
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
    assert fused_act.replace_activations(model) == []  # idempotent


@pytest.mark.parametrize("spec", [s for s in registry.SPECS.values() if s.replaces],
                         ids=lambda s: s.name)
def test_every_spec_replaces_its_torch_module(spec):
    """The registry's class map: torch.nn's module of each spec becomes the spec's fused module,
    with the same arguments, and computes the same function."""
    original = getattr(nn, spec.replaces)(**spec.kwargs)
    model = nn.Sequential(original)
    swapped = fused_act.replace_activations(model)
    assert [new for _, _, new in swapped] == [f"fused_act.nn.{spec.module}"]
    x = torch.randn(4, 33, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)


def test_replace_activations_include_exclude():
    model = _zoo()
    swapped = fused_act.replace_activations(model, include=["Mish", "FReLU"], exclude=["11"])
    assert [n for n, _, _ in swapped] == ["1", "9"]
    swapped = fused_act.replace_activations(model, exclude=["GELU", "7"])
    assert [n for n, _, _ in swapped] == ["3", "6", "8", "11.1"]


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
        for ours, theirs in ((fused_act.mish, nn.functional.mish),
                             (fused_act.silu, nn.functional.silu),
                             (fused_act.gelu, nn.functional.gelu)):
            assert ours(h).dtype == theirs(h).dtype == torch.bfloat16
            assert ours(x).dtype == theirs(x).dtype == torch.float32
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
