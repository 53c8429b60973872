"""torch.distributed beyond DDP (test_dropin.py): FSDP2 with the fused modules, and tensor
parallelism with DTensor inputs to every op (fused_act/distributed.py's sharding rules).

Per backend, one spawn of 2 processes on gloo (file:// rendezvous) runs the FSDP2 training and
every tensor-parallel case in one go (a spawn costs seconds of start-up: torch, DTensor, FSDP
imports) and hands the results back in a file; the comparisons with the single-process run are
made here, one test per case, so a failure names its case.
"""

import os
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import fused_act
from fused_act import ops, registry

from .cases import need_device

WORLD = 2
N, C, L = 4, 6, 5  # L = 5 splits unevenly over 2 ranks (3 + 2)


@pytest.fixture(scope="module", params=["reference", "triton"])
def run(request) -> tuple[str, dict]:
    """(backend, results of the FSDP2 and tensor-parallel workers on 2 ranks), spawned once per
    backend."""
    backend = request.param
    if backend == "triton":
        need_device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_run, args=(backend, os.path.join(tmp, "init"), out), nprocs=WORLD)
        return backend, torch.load(out)


def _run(rank: int, backend: str, init_file: str, out: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # a rank that fails leaves the other waiting in a collective: bound the wait
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        fused_act.set_backend(backend)
        result = {"fsdp": _guarded(_fsdp_worker, rank), "tp": _tp_worker(rank)}
        if rank == 0:
            torch.save(result, out)
        # tear down together: a rank leaving while the other still talks aborts gloo
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _guarded(fn: Callable, *args: object) -> object:
    """``fn(*args)``, or its error: both ranks fail alike, so the run goes on and the test of
    that part reports the error."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


# ---- FSDP2 ---------------------------------------------------------------------------------

def _fsdp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), fused_act.nn.AconC(8), fused_act.nn.MetaAconC(8, r=4),
        nn.Conv2d(8, 8, 1), fused_act.nn.Swish(learnable=True, num_parameters=8),
        fused_act.nn.Swish(beta=0.5, learnable=True), nn.Flatten(), nn.Linear(8 * 25, 4))


def _steps(model: nn.Module, x: Tensor, y: Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _fsdp_batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def _fsdp_worker(rank: int) -> dict[str, Tensor]:
    from torch.distributed.fsdp import fully_shard

    x, y = _fsdp_batch()
    model = _fsdp_model()
    for layer in (model[1], model[2], model[4], model[5]):
        fully_shard(layer)
    fully_shard(model)
    half = len(x) // WORLD
    _steps(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def test_fsdp2_two_processes_match_one(run):
    """fully_shard over the ACON and learnable-Swish modules: their parameters are sharded,
    gathered for the ops and their gradients reduce-scattered like any parameter's."""
    backend, results = run
    sharded = results["fsdp"]
    assert "error" not in sharded, sharded.get("error")
    x, y = _fsdp_batch()
    single = _fsdp_model()
    with fused_act.use_backend(backend):
        _steps(single, x, y)
    for name, value in single.named_parameters():
        torch.testing.assert_close(sharded[name], value.detach(), rtol=1e-5, atol=1e-6,
                                   msg=name)
    start = dict(_fsdp_model().named_parameters())
    unmoved = [n for n in ("1.p1", "1.p2", "1.beta", "2.p1", "2.fc1.weight", "4.beta",
                           "5.beta") if torch.equal(start[n], sharded[n])]
    assert not unmoved, f"not trained: {unmoved}"


# ---- tensor parallelism: DTensor inputs ------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """A tensor argument beside x: its shape, and which of its dims runs along which of x's
    (x dim -> its dim); it is sharded with x on those dims and replicated otherwise."""

    shape: tuple[int, ...]
    along: dict[int, int]


@dataclass(frozen=True)
class Case:
    """A public call ``fn(x, *params)`` with x of shape (N, C, L), which runs the custom op
    ``fused_act::<op>`` and, where ``backward``, its backward."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[Param, ...] = ()
    op: str = "activation"
    backward: bool = True
    packed: int | None = None  # glu of x's halves along this dim: sharding it must gather


CHANNEL = Param((C,), {1: 0})
CHANNEL_3D = Param((1, C, 1), {1: 1})
SCALAR = Param((1,), {})


def _spec_cases(spec: registry.Spec) -> list[Case]:
    if not spec.beta:
        return [Case(spec.name, spec.call)]
    return [Case(f"{spec.name}_float", lambda x: spec.call(x, -0.75)),
            Case(f"{spec.name}_scalar", spec.call, (SCALAR,)),
            Case(f"{spec.name}_channel", spec.call, (CHANNEL,)),
            Case(f"{spec.name}_channel_3d", spec.call, (CHANNEL_3D,))]


CASES = {case.name: case for case in (
    *(case for spec in registry.SPECS.values() for case in _spec_cases(spec)),
    Case("acon_c", fused_act.acon_c, (CHANNEL_3D, CHANNEL_3D, CHANNEL_3D), "acon_c"),
    Case("acon_c_per_sample", fused_act.acon_c,
         (CHANNEL, CHANNEL_3D, Param((N, C, 1), {0: 0, 1: 1})), "acon_c"),
    Case("acon_c_per_sample_2d", fused_act.acon_c,
         (CHANNEL, CHANNEL, Param((N, C), {0: 0, 1: 1})), "acon_c"),
    Case("frelu_max", fused_act.frelu_max, (Param((N, C, L), {0: 0, 1: 1, 2: 2}),),
         "frelu_max"),
    # FReLU's eval-mode step: max(x, a t + b), a and b per channel
    Case("frelu_max_affine", ops.FRELU_MAX_AFFINE,
         (Param((N, C, L), {0: 0, 1: 1, 2: 2}), CHANNEL, CHANNEL), "frelu_max_affine"),
    # the gated op: act(gate) * up with x the gate, and of x's halves (packed gate and up)
    *(Case(f"glu_{s.name}", lambda x, u, *b, s=s: fused_act.glu(
        x, u, s.function or s.name, **s.kwargs, **({"beta": b[0] if b else -0.75}
                                                    if s.beta else {})),
           (Param((N, C, L), {0: 0, 1: 1, 2: 2}), *((SCALAR,) if s.beta else ())), "glu")
      for s in registry.SPECS.values()),
    Case("glu_packed", lambda x: fused_act.swiglu(x, None, dim=1), (), "glu", packed=1),
)}

# x replicated, and sharded on the batch, the channels and (unevenly) the length
PLACEMENTS = ["replicate", "shard0", "shard1", "shard2"]


def _placement(name: str, dim_map: dict[int, int] | None = None) -> object:
    """The placement named ``name`` for x, or for a tensor whose dims run along x's by
    ``dim_map`` (replicated where none runs along x's sharded dim)."""
    from torch.distributed.tensor import Replicate, Shard

    if name == "replicate":
        return Replicate()
    dim = int(name[len("shard"):])
    if dim_map is None:
        return Shard(dim)
    return Shard(dim_map[dim]) if dim in dim_map else Replicate()


def _inputs(case: Case) -> tuple[Tensor, list[Tensor], Tensor]:
    """x, the params and the incoming gradient, in float64 (the sharded and the single run sum
    parameter gradients in different orders; float64 keeps that far below the tolerance)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    x = 3 * torch.randn(N, C, L, generator=gen, dtype=torch.float64)
    params = [torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5
              for p in case.params]
    shape = [N, C, L]
    if case.packed is not None:
        shape[case.packed] //= 2
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, params, grad


def _single(case: Case, backend: str) -> tuple[Tensor, list[Tensor]]:
    """Output and gradients (x's, then the params'; none without backward) of the
    single-process run."""
    x, params, grad = _inputs(case)
    leaves = [t.requires_grad_(case.backward) for t in (x, *params)]
    with fused_act.use_backend(backend):
        out = case.fn(x, *params)
        if case.backward:
            out.backward(grad)
    return out.detach(), [t.grad for t in leaves if t.grad is not None]


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops called on the DTensors (DTensor then runs them on the local shards)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def _tp_worker(rank: int) -> dict:
    from torch.distributed.tensor import DeviceMesh

    mesh = DeviceMesh("cpu", list(range(WORLD)))
    results = {}
    for case in CASES.values():
        for where in PLACEMENTS:
            results[case.name, where] = _guarded(_tp_case, mesh, case, where)
    for name in FP8_CASES:
        for where in PLACEMENTS:
            results[name, where] = _guarded(_fp8_case, mesh, name, where)
    return results


# FP8 outputs (out_dtype) of x of shape (N, C, 8), fp32 (the kernels' input): rows sharded on
# dims 0 and 1 quantise on their own ranks; the last dim (shard2) and tensor scaling from the
# whole result's amax gather first
FP8_CASES = {
    "silu_row": lambda x, s: fused_act.silu(x, out_dtype=torch.float8_e4m3fn),
    "mish_block": lambda x, s: fused_act.mish(x, out_dtype=torch.float8_e5m2, scaling="block",
                                              block=4),
    "gelu_delayed": lambda x, s: fused_act.gelu(x, out_dtype=torch.float8_e4m3fn,
                                                scaling="tensor", scale=s),
    "silu_tensor": lambda x, s: fused_act.silu(x, out_dtype=torch.float8_e4m3fn,
                                               scaling="tensor"),
    "swiglu_packed_row": lambda x, s: fused_act.swiglu(x, out_dtype=torch.float8_e4m3fn),
    # the gated op's tensor beta (one value, replicated: here 0.5 from the replicated s)
    "glu_beta_packed_row": lambda x, s: fused_act.glu(x, activation="swish", beta=8 * s,
                                                      out_dtype=torch.float8_e4m3fn),
}


def _fp8_inputs(name: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return 3 * torch.randn(N, C, 8, generator=gen), torch.tensor(0.0625)


def _fp8_case(mesh: object, name: str, where: str) -> dict:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    def whole(t: DTensor) -> Tensor:
        # gathered as bytes: gloo has no float8 dtypes
        local = t.to_local()
        if local.element_size() == 1:
            local = local.view(torch.uint8)
        return DTensor.from_local(local, mesh, t.placements).full_tensor()

    x, scale = _fp8_inputs(name)
    xd = distribute_tensor(x, mesh, [_placement(where)])
    sd = distribute_tensor(scale, mesh, [Replicate()])
    with CommDebugMode() as comm:
        q, s = FP8_CASES[name](xd, sd)
    return {"comms": {str(k): v for k, v in comm.get_comm_counts().items()},
            "type": type(q).__name__,
            "placements": [repr(tuple(t.placements)) for t in (q, s)],
            "q": whole(q), "s": whole(s)}


def _tp_case(mesh: object, case: Case, where: str) -> dict:
    """One case on 2 ranks: what its test checks, as plain data (the parent loads it with
    torch.load(weights_only=True))."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    x, params, grad = _inputs(case)
    xd = distribute_tensor(x, mesh, [_placement(where)]).requires_grad_(case.backward)
    pd = [distribute_tensor(t, mesh, [_placement(where, p.along)])
          for t, p in zip(params, case.params, strict=True)]
    gd = distribute_tensor(grad, mesh, [_placement(where)])
    # first the same shapes and placements with the ops' flags off (no FReLU win code,
    # no parameter gradients: empty outputs): DTensor's sharding cache must not hand
    # those to the run below
    with torch.no_grad():
        case.fn(xd, *pd)
    if case.backward:
        case.fn(xd, *pd).backward(gd)
        xd.grad = None
    for t in pd:
        t.requires_grad_(case.backward)
    with CommDebugMode() as comm, _OpLog() as log:
        out = case.fn(xd, *pd)
        if case.backward:
            out.backward(gd)
    grads = [t.grad for t in (xd, *pd) if t.grad is not None]
    return {
        "comms": {str(k): v for k, v in comm.get_comm_counts().items()},
        "ops": sorted(log.names), "type": type(out).__name__,
        "placements": [repr(tuple(t.placements)) for t in (out, *grads)],
        "out": out.full_tensor(), "grads": [g.full_tensor() for g in grads]}


@pytest.mark.parametrize("where", PLACEMENTS)
@pytest.mark.parametrize("name", list(CASES))
def test_dtensor_sharded_matches_single_process(run, name, where):
    """A DTensor x (and its params, sharded with it or replicated) runs through the fused ops
    on the local shards: no collective in forward or backward, the output and x's gradient keep
    x's placement, a parameter's gradient is sharded with it or a partial sum, and the values
    equal the single-process run."""
    from torch.distributed.tensor import Partial, Replicate

    backend, results = run
    case = CASES[name]
    got = results["tp"][name, where]
    assert "error" not in got, got.get("error")
    out, grads = _single(case, backend)
    assert got["type"] == "DTensor"
    fused = {f"fused_act::{case.op}", *([f"fused_act::{case.op}_backward"] * case.backward)}
    assert fused <= set(got["ops"]), f"the fused ops did not run on DTensors: {got['ops']}"
    if where == f"shard{case.packed}":  # gate and up halves on different ranks: gathered
        torch.testing.assert_close(got["out"], out, msg=f"{name} output")
        return
    assert not got["comms"], f"collectives issued: {got['comms']}"
    x_placement = _placement(where)
    expected = [x_placement, x_placement]
    for p in case.params if case.backward else ():
        placement = _placement(where, p.along)
        expected.append(Partial() if where != "replicate" and placement == Replicate()
                        else placement)
    assert got["placements"] == [repr((p,)) for p in expected[:1 + len(grads)]]
    torch.testing.assert_close(got["out"], out, msg=f"{name} output")
    for i, (g, ref) in enumerate(zip(got["grads"], grads, strict=True)):
        torch.testing.assert_close(g, ref, msg=f"{name} gradient {i}")


@pytest.mark.parametrize("where", PLACEMENTS)
@pytest.mark.parametrize("name", list(FP8_CASES))
def test_dtensor_fp8_output(run, name, where):
    """out_dtype on a DTensor: the single-process q and scales bit for bit; rows sharded on a
    dim before the last quantise in place (no collective; q and row or block scales sharded
    with them, a caller's scale replicated); the last dim and tensor amax scaling gather."""
    from torch.distributed.tensor import Replicate, Shard

    backend, results = run
    got = results["tp"][name, where]
    assert "error" not in got, got.get("error")
    x, scale = _fp8_inputs(name)
    with fused_act.use_backend(backend):
        q, s = FP8_CASES[name](x, scale)
    assert got["type"] == "DTensor"
    assert torch.equal(got["q"], q.view(torch.uint8)), name
    assert torch.equal(got["s"].reshape(-1).view(torch.uint8), s.reshape(-1).view(torch.uint8))
    if where in ("shard0", "shard1") and name != "silu_tensor":
        d = int(where[-1])
        assert not got["comms"], f"collectives issued: {got['comms']}"
        scales = Replicate() if name == "gelu_delayed" else Shard(d)
        assert got["placements"] == [repr((Shard(d),)), repr((scales,))]


def test_every_op_has_a_sharding_rule():
    """Every custom op of fused_act has a rule in distributed.RULES (a new op needs its line),
    and the rule's positions fit the op's schema: tensors where it names tensors, a bool flag,
    one entry per output.  batch_norm_act has none: its statistics reduce over the batch, so a
    pointwise rule would normalise each shard by its own (``test_batchnorm``: refused)."""
    from fused_act import distributed

    ours = {name for name in dir(torch.ops.fused_act)
            if isinstance(getattr(torch.ops.fused_act, name), torch._ops.OpOverloadPacket)}
    # act_quant's rule is distributed.quant_strategies (test_dtensor_fp8_output)
    assert ours - {"batch_norm_act", "batch_norm_act_backward", "act_quant"} == set(
        distributed.RULES)
    for name, rule in distributed.RULES.items():
        schema = getattr(torch.ops.fused_act, name).default._schema
        types = [str(a.type) for a in schema.arguments]
        tensors = [types[i] for i in rule.data + rule.params]
        assert set(tensors) <= {"Tensor", "Optional[Tensor]"}, (name, tensors)
        assert rule.flag is None or types[rule.flag] == "bool", name
        assert len(rule.outputs) == len(schema.returns), name


@pytest.mark.parametrize("before", ["", "importlib.util.find_spec('torch.distributed.tensor')"],
                         ids=["import", "find_spec_then_import"])
def test_rules_register_when_dtensor_is_first_imported(before):
    """``import fused_act`` leaves torch.distributed.tensor alone (about half a second), and
    the rules are in place as soon as anything imports it, also after a look-up that finds the
    module without loading it (an availability check)."""
    code = ("import importlib.util, sys, fused_act, fused_act.distributed as d\n"
            "from fused_act.after_import import AfterImport\n"
            f"{before}\n"
            "assert 'torch.distributed.tensor' not in sys.modules and not d._registered\n"
            "from torch.distributed.tensor import DTensor\n"
            "assert d._registered\n"
            "assert not any(isinstance(f, AfterImport) and f.name == 'torch.distributed.tensor'\n"
            "               for f in sys.meta_path)\n"
            "prop = DTensor._op_dispatcher.sharding_propagator\n"
            "assert torch.ops.fused_act.acon_c.default in prop.op_strategy_funcs\n")
    subprocess.run([sys.executable, "-c", "import torch\n" + code], check=True, timeout=120)


def test_rules_register_at_the_first_dtensor_call_where_the_import_hook_missed():
    """torch.distributed.tensor loaded past the import hook (a finder ahead of it, a reset
    ``sys.meta_path``): the first DTensor to reach an op registers the rules, and the op runs."""
    code = ("import sys, tempfile, torch, torch.distributed as dist\n"
            "import fused_act, fused_act.distributed as d\n"
            "from fused_act.after_import import AfterImport\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, AfterImport)]\n"
            "from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor\n"
            "assert not d._registered\n"
            "x = torch.randn(4, 3)\n"
            "with tempfile.TemporaryDirectory() as t:\n"
            "    dist.init_process_group('gloo', init_method=f'file://{t}/i', rank=0,\n"
            "                            world_size=1)\n"
            "    y = fused_act.mish(distribute_tensor(x, DeviceMesh('cpu', [0]), [Shard(0)]))\n"
            "    torch.testing.assert_close(y.full_tensor(), torch.nn.functional.mish(x))\n"
            "    dist.destroy_process_group()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_param_dim_aligns_from_the_left():
    from fused_act.distributed import param_dim

    x = (N, C, L)
    assert [param_dim((C,), x, d) for d in range(3)] == [None, 0, None]
    assert [param_dim((1, C, 1), x, d) for d in range(3)] == [None, 1, None]
    assert [param_dim((N, C), x, d) for d in range(3)] == [0, 1, None]
    assert [param_dim((1,), x, d) for d in range(3)] == [None] * 3
    assert param_dim((1, 1), (1, 1, L), 0) is None  # a size-1 dim is broadcast, not sharded
