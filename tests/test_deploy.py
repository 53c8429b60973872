"""Shipping a swapped model (fused_act/deploy.py): ``torch.export`` (the graph, ``ep.module()``, a
dynamic batch, save and load), ``.pt2`` files and AOTInductor packages loaded in a fresh process
that cannot import fused_act, and ONNX export run in onnxruntime; for every module and for
three real models: a Sequential of every fused_act module, timm's resnet10t with mish and a tiny
transformers Llama after ``patch_gated_mlps``.  On the CPU; the CUDA package (our Triton kernels
inside) is a cuda-marked test.
"""

import ctypes
import functools
import importlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import fused_act
from fused_act import deploy, ops
from fused_act import nn as fnn

# the first statement of a serving process: fused_act cannot be imported there
NO_FUSED_ACT = "import sys\nsys.modules['fused_act'] = None\nimport torch\n"
BACKEND_NAMES = {"auto", "triton", "cuda", "reference"}


def _need(package: str):
    try:
        return importlib.import_module(package)
    except Exception as e:  # noqa: BLE001 - any import failure is the reason to skip
        pytest.skip(f"{package} does not import beside torch {torch.__version__}: {e!r}")


def _modules() -> dict[str, nn.Module]:
    """Every fused_act module, on 8 channels of (2, 8, 6, 6) input."""
    return {
        "mish": fnn.Mish(), "mish_inplace": fnn.Mish(inplace=True), "silu": fnn.SiLU(),
        "gelu": fnn.GELU(), "gelu_tanh": fnn.GELU(approximate="tanh"),
        "swish": fnn.Swish(beta=1.5), "swish_learnable": fnn.Swish(learnable=True,
                                                                   num_parameters=8),
        "squared_relu": fnn.SquaredReLU(), "acon_c": fnn.AconC(8), "meta_acon_c": fnn.MetaAconC(8),
        "frelu": fnn.FReLU(8), "glu_gelu": fnn.GLU("gelu", dim=1),
        "glu_swish_learnable": fnn.GLU("swish", dim=1, learnable=True)}


# what each module's ONNX graph must hold: ONNX's own operator where one computes the function
ONNX_OPS = {"mish": {"Mish"}, "mish_inplace": {"Mish"}, "silu": {"Sigmoid", "Mul"},
            "gelu": {"Gelu"}, "gelu_tanh": {"Gelu"}, "swish": {"Sigmoid", "Mul"},
            "frelu": {"Max"}, "glu_gelu": {"Gelu", "Mul"}, "squared_relu": {"Relu"}}


def _random_init(model: nn.Module) -> nn.Module:
    """Parameters and BatchNorm statistics off their defaults (so that a fold or a missed
    parameter shows), in eval mode."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith(
                    ("running_var", "beta")) else torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


def _sequential() -> nn.Module:
    torch.manual_seed(0)
    modules = _modules()
    gated = modules.pop("glu_gelu"), modules.pop("glu_swish_learnable")  # each halves C
    return _random_init(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), *modules.values(),
                                      gated[0], nn.Conv2d(4, 8, 1), gated[1]))


class _Logits(nn.Module):
    """A causal LM as export takes it: token ids in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


def _resnet() -> nn.Module:
    timm = _need("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5, act_layer="mish")
    fused_act.replace_activations(model)
    return _random_init(model)


def _llama() -> nn.Module:
    transformers = _need("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, num_hidden_layers=2, hidden_size=32,
                                   intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=1, use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    fused_act.patch_gated_mlps(model)
    return _Logits(model).eval()


MODELS = {
    "sequential": (_sequential, lambda: torch.randn(2, 4, 6, 6)),
    "timm_resnet10t_mish": (_resnet, lambda: torch.randn(2, 3, 32, 32)),
    "llama": (_llama, lambda: torch.randint(0, 64, (2, 7))),
}


def _ours(graph: torch.fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if str(n.target).startswith("fused_act.")}


def _fresh(code: str, cwd: Path) -> str:
    """Run ``code`` in a new interpreter that cannot import fused_act; its stdout."""
    done = subprocess.run([sys.executable, "-c", NO_FUSED_ACT + code], capture_output=True,
                          text=True, timeout=900, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_export_holds_our_ops_and_no_backend():
    """``torch.export`` keeps our ops (and with them our kernels where the graph runs), with no
    backend argument: the graph is the same whatever backend was in force at export.
    ``ep.module()`` computes the model, with a dynamic batch too, and the program saves and
    loads in a process that imported fused_act."""
    model, x = _sequential(), torch.randn(2, 4, 6, 6)
    want = model(x)
    batch = torch.export.Dim("batch", min=1)
    graphs = []
    for backend in ("auto", "reference"):
        with fused_act.use_backend(backend):
            ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        graphs.append(str(ep.graph))
    assert graphs[0] == graphs[1]
    assert _ours(ep.graph) == {"fused_act.activation.default", "fused_act.acon_c.default",
                               "fused_act.frelu_max_affine.default", "fused_act.glu.default"}
    for node in ep.graph.nodes:
        assert not BACKEND_NAMES & {a for a in node.args if isinstance(a, str)}, node.format_node()
    torch.testing.assert_close(ep.module()(x), want, rtol=0, atol=0)
    x3 = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(ep.module()(x3), model(x3), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.export.load(buffer).module()(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_pt2_decomposed_runs_without_fused_act(name, tmp_path):
    """``ep.run_decompositions(deploy.decompositions())`` leaves none of our ops, and its
    ``.pt2`` file loads and runs in a process without fused_act, giving the model's values."""
    build, inputs = MODELS[name]
    model, x = build(), inputs()
    ep = torch.export.export(model, (x,)).run_decompositions(deploy.decompositions())
    assert not _ours(ep.graph)
    torch.export.save(ep, tmp_path / "model.pt2")
    torch.save((x, model(x)), tmp_path / "io.pt")
    out = _fresh("x, want = torch.load('io.pt')\n"
                 "got = torch.export.load('model.pt2').module()(x)\n"
                 "torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)\n"
                 "assert not [m for m in sys.modules if m.startswith('fused_act.')]\n"
                 "print('ok')\n", tmp_path)
    assert out.strip() == "ok"


def test_pt2_with_our_ops_needs_import_fused_act(tmp_path):
    """A ``.pt2`` that keeps our ops loads after ``import fused_act``; without it, torch's
    error names our op (what torch allows: its loader resolves ops before any hook of ours)."""
    model, x = _sequential(), torch.randn(2, 4, 6, 6)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    torch.save((x, model(x)), tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", NO_FUSED_ACT + "torch.export.load('model.pt2')"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and "fused_act" in done.stderr, done.stderr[-2000:]
    code = ("import torch, fused_act\nx, want = torch.load('io.pt')\n"
            "got = torch.export.load('model.pt2').module()(x)\n"
            "torch.testing.assert_close(got, want, rtol=0, atol=0)\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("name", ["sequential", "llama"])
def test_aoti_package_runs_without_fused_act(name, tmp_path):
    """An AOTInductor package of the program decomposed with ``kernels=True`` (on the CPU: the
    reference math, which Inductor compiles to C++) loads and runs where fused_act cannot be
    imported."""
    build, inputs = MODELS[name]
    model, x = build(), inputs()
    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions(deploy.decompositions(kernels=True))
    assert not _ours(ep.graph)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    torch.save((x, model(x)), tmp_path / "io.pt")
    out = _fresh("x, want = torch.load('io.pt')\n"
                 "got = torch._inductor.aoti_load_package('model.pt2')(x)\n"
                 "torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)\nprint('ok')\n",
                 tmp_path)
    assert out.strip().endswith("ok")


E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class _FP8Out(nn.Module):
    """Activations with FP8 outputs (fused_act::act_quant) on (4, 64) x: every scaling, both
    formats, elementwise, packed and gated, a caller's scale a buffer; ``act`` the elementwise
    activation.  Its outputs flat: q, scales, q, scales, ..."""

    def __init__(self, act: str = "silu", block: bool = True) -> None:
        super().__init__()
        self.act, self.block = getattr(fused_act, act), block
        self.register_buffer("scale", torch.tensor(0.25))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = [*self.act(x, out_dtype=E4M3, scaling="row"),
               *self.act(x, out_dtype=E5M2, scaling="tensor"),
               *self.act(x, out_dtype=E4M3, scaling="tensor", scale=self.scale),
               *fused_act.glu(x[:, :32], x[:, 32:], self.act.__name__, out_dtype=E5M2)]
        if self.block:
            out += [*fused_act.swiglu(x, out_dtype=E4M3, scaling="block"),
                    *fused_act.glu(x[:, :32], x[:, 32:], "gelu", out_dtype=E5M2,
                                   scaling="block", block=16)]
        return tuple(out)


def _fp8_input() -> Tensor:
    """(4, 64) values over FP8's range, with +-inf, a subnormal, zeros and a NaN in rows of
    their own."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * 20
    x[0, :4] = torch.tensor([math.inf, 1e-42, 0.0, -0.0])
    x[1, 40] = -math.inf
    x[2, 7] = math.nan
    return x


def _bits(ts: tuple[Tensor, ...]) -> list[Tensor]:
    """Each tensor's bits: NaNs compared too."""
    return [t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32) for t in ts]


# in a process without fused_act: the outputs bit for bit (this module's _bits)
_SAME_BITS = ("bits = lambda ts: [t.view(torch.uint8) if t.element_size() == 1 else "
              "t.view(torch.int32) for t in ts]\n"
              "assert all(torch.equal(a, b) for a, b in zip(bits(got), bits(want), strict=True))\n"
              "print('ok')\n")


def test_fp8_outputs_decomposed_and_packaged_run_without_fused_act(tmp_path):
    """An exported program with FP8 outputs (``fused_act::act_quant``: row, tensor, a caller's
    scale, block; elementwise, packed and gated) decomposed by ``decompositions()`` runs from
    its ``.pt2`` file without fused_act, and ``decompositions(kernels=True)`` compiled by
    AOTInductor runs too (no block scaling: torch's AOTInductor CPU wrapper does not declare
    float8_e8m0fnu): both equal eager bit for bit, data and scales."""
    x = _fp8_input()
    # torch 2.11's .pt2 serializer cannot write the E8M0 scales' view(dtype), and its
    # AOTInductor C++ wrapper declares no float8 type at all; 2.14 has both but E8M0 in AOTI
    new = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14)
    cases = [("model.pt2", _FP8Out("squared_relu", block=new))]
    if new:
        cases.append(("aoti.pt2", _FP8Out("squared_relu", block=False)))
    for name, model in cases:
        ep = torch.export.export(model, (x,))
        assert _ours(ep.graph) == {"fused_act.act_quant.default"}
        ep = ep.run_decompositions(deploy.decompositions(kernels=name == "aoti.pt2"))
        assert not _ours(ep.graph)
        if name == "model.pt2":
            torch.export.save(ep, tmp_path / name)
        else:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / name))
        torch.save((x, model(x)), tmp_path / f"{name}.io")
    loads = {"model.pt2": "torch.export.load('model.pt2').module()",
             "aoti.pt2": "torch._inductor.aoti_load_package('aoti.pt2')"}
    for name, load in ((name, loads[name]) for name, _ in cases):
        out = _fresh(f"x, want = torch.load('{name}.io')\ngot = {load}(x)\n" + _SAME_BITS,
                     tmp_path)
        assert out.strip().endswith("ok"), name


def test_kernels_refused_where_they_cannot_be_traced():
    """``kernels=True`` with Triton's interpreter in force: its kernels run on the host, so a
    graph would hold no launch; a clear error, never a program that computes nothing."""
    x = torch.randn(2, 8, 6, 6)
    ep = torch.export.export(fnn.Mish(), (x,))
    with fused_act.use_backend("triton"), pytest.raises(RuntimeError, match="interpreter"):
        ep.run_decompositions(deploy.decompositions(kernels=True))


# each op traced as decompositions(kernels=True) makes it on a CUDA tensor, on the CPU: the
# Triton kernels compiled (not interpreted), fake CUDA tensors, Triton reported available
_TRACE_ON_CUDA = """
import torch
import fused_act.backend
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from fused_act import deploy
fused_act.backend.triton_status = lambda: (True, "stand-in")
with FakeTensorMode(allow_non_fake_inputs=True):
    x = torch.empty(2, 8, 6, 6, device="cuda")
    c = torch.empty(8, device="cuda")
    n = torch.empty(2, 8, device="cuda")
ops = torch.ops.fused_act
calls = {
    "activation": lambda x, c, n: ops.activation(x, "gelu_tanh", None, 1.0),
    "swish_beta": lambda x, c, n: ops.activation(x, "swish", c, 1.0),
    "glu": lambda x, c, n: ops.glu(x, None, "silu", None, 1.0, 1),
    "acon_c": lambda x, c, n: ops.acon_c(x, c, c, n),
    "frelu_max": lambda x, c, n: ops.frelu_max(x, x, True),
    "frelu_max_affine": lambda x, c, n: ops.frelu_max_affine(x, x, c, c),
    "act_quant": lambda x, c, n: ops.act_quant(x, None, "swish", 1.0, None,
                                               torch.float8_e4m3fn, "row", None, 32),
}
for name, call in calls.items():
    g = make_fx(call, decomposition_table=deploy.decompositions(kernels=True),
                tracing_mode="fake")(x, c, n)
    targets = [str(node.target) for node in g.graph.nodes]
    assert not [t for t in targets if t.startswith("fused_act.")], (name, targets)
    kernels = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
               for node in g.graph.nodes if "triton_kernel_wrapper" in str(node.target)]
    print(name, *kernels)
"""


def test_kernels_traced_on_cuda_tensors(tmp_path):
    """On CUDA tensors ``decompositions(kernels=True)`` makes each op the launch of its Triton
    kernel (what AOTInductor compiles into a package): traced here on the CPU, where the kernels
    compile but cannot run, with fake CUDA tensors (the GPU test runs the package)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TRACE_ON_CUDA], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert launched == {"activation": "act_fwd_kernel", "swish_beta": "act_fwd_kernel",
                        "glu": "glu_fwd_kernel", "acon_c": "acon_fwd_kernel",
                        "frelu_max": "max_fwd_kernel", "frelu_max_affine": "max_affine_kernel",
                        "act_quant": "act_quant_kernel"}


def test_no_global_registration():
    """ONNX export needs no table of torch's: our ops are in none of its decomposition tables,
    which fake tensors (under symbolic sizes) and Inductor (whose fallback for an op with a
    decomposition is an error where the environment sets CI) also read."""
    import torch._decomp
    ours = {o.forward_op._opoverload for o in fused_act.ops.FAMILIES}
    for table in torch._decomp.global_decomposition_table.values():
        assert not ours & set(table)


def _onnx_run(model: nn.Module, x: Tensor) -> tuple[set[str], Tensor]:
    """(the ONNX operator types, onnxruntime's output) of ``torch.onnx.export(model, (x,),
    dynamo=True)``."""
    _need("onnxscript")
    ort = _need("onnxruntime")
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return {n.op_type for n in proto.graph.node}, torch.from_numpy(out)


@pytest.mark.parametrize("name", list(_modules()))
def test_onnx_export_of_every_module(name):
    """Each module exports to ONNX with no argument of ours, as ONNX's own operator where one
    computes the function (``ONNX_OPS``) and primitive operations otherwise, and onnxruntime
    gives the module's values."""
    torch.manual_seed(0)
    module = _random_init(_modules()[name])
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), module).eval()
    x = torch.randn(2, 8, 6, 6)
    want = model(x.clone())
    kinds, got = _onnx_run(model, x)
    assert ONNX_OPS.get(name, set()) <= kinds, kinds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


MODEL_ONNX_OPS = {"sequential": {"Mish", "Gelu", "Sigmoid", "Max"},
                  "timm_resnet10t_mish": {"Mish"}, "llama": {"Sigmoid", "Mul"}}


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_of_models(name):
    build, inputs = MODELS[name]
    model, x = build(), inputs()
    kinds, got = _onnx_run(model, x)
    assert MODEL_ONNX_OPS[name] <= kinds, kinds
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def _ort_outputs(proto: object, x: Tensor, ort: object) -> tuple[Tensor, ...]:
    """onnxruntime's outputs as tensors of their own dtypes, FP8 too (read from its buffers:
    numpy has no FP8 type for onnxruntime to return)."""
    dtypes = {1: torch.float32, 17: E4M3, 19: E5M2}  # ONNX's element types
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input(session.get_inputs()[0].name, x.numpy())
    for o in session.get_outputs():
        binding.bind_output(o.name, "cpu")
    session.run_with_iobinding(binding)
    outs = []
    for v in binding.get_outputs():
        dtype = dtypes[v.element_type()]
        raw = ctypes.string_at(v.data_ptr(), math.prod(v.shape()) * dtype.itemsize)
        outs.append(torch.frombuffer(bytearray(raw), dtype=dtype).reshape(v.shape()))
    return tuple(outs)


def test_onnx_export_of_fp8_outputs():
    """FP8 outputs export to ONNX as the reference's primitive operations (Div, Clip, IsNaN,
    Where and a Cast to FLOAT8E4M3FN / FLOAT8E5M2) and onnxruntime gives eager's data and
    scales bit for bit (squared_relu: exact activation math in both); block scaling, whose
    E8M0 scales torch.onnx cannot write, is refused by name."""
    _need("onnxscript")
    ort = _need("onnxruntime")
    model, x = _FP8Out("squared_relu", block=False).eval(), _fp8_input()
    proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    assert {"Div", "IsNaN", "Cast"} <= {n.op_type for n in proto.graph.node}
    got = _ort_outputs(proto, x, ort)
    assert all(torch.equal(a, b) for a, b in zip(_bits(got), _bits(model(x)), strict=True))
    with pytest.raises(Exception, match="scaling='block' is not supported"):
        torch.onnx.export(_FP8Out().eval(), (x,), dynamo=True, verbose=False)


@pytest.mark.cuda
def test_aoti_package_on_cuda_holds_our_triton_kernels(tmp_path):
    """On a GPU, ``decompositions(kernels=True)`` turns each op into the launches of our Triton
    kernels, which AOTInductor compiles into its package: the package runs where fused_act
    cannot be imported, with our kernels (their names in the generated code)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, x = _sequential().cuda(), torch.randn(2, 4, 6, 6, device="cuda")
    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions(deploy.decompositions(kernels=True))
    assert not _ours(ep.graph)
    assert any("triton_kernel_wrapper" in str(n.target) for n in ep.graph.nodes)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    torch.save((x.cpu(), model(x).cpu()), tmp_path / "io.pt")
    out = _fresh("x, want = torch.load('io.pt')\n"
                 "got = torch._inductor.aoti_load_package('m.pt2')(x.cuda()).cpu()\n"
                 "torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)\nprint('ok')\n",
                 tmp_path)
    assert out.strip().endswith("ok")
    import zipfile
    names = " ".join(zipfile.ZipFile(path).namelist())
    assert "act_fwd_kernel" in names or "act_fwd_kernel" in str(ep.graph), names[:2000]


def _traced_cases() -> dict:
    """A call of every public function family on CPU tensors: the plain activations (beta as a
    float and as a tensor), the gated forms (two tensors, one packed), FReLU's max, ACON-C and
    Meta-ACON, BatchNorm + activation (training, channels_last, and NCHW, which takes torch's
    BatchNorm), an FP8 output."""
    from .cases import ALL_OPS

    def p(*shape):
        return torch.linspace(0.5, 1.5, math.prod(shape)).reshape(shape)

    cases = {op.name: (lambda x, op=op: op.call(x, op.params(x))) for op in ALL_OPS}
    cases.update({
        "swiglu": lambda x: fused_act.swiglu(x, x.flip(0)),
        "geglu_packed": lambda x: fused_act.geglu(x, None, dim=1),
        "frelu_max": lambda x: fused_act.frelu_max(x, x.flip(0)),
        "acon_c": lambda x: fused_act.acon_c(x, p(4), -p(4), p(4)),
        "meta_acon": lambda x: fused_act.acon_c(x, p(4), -p(4), p(2, 4, 1, 1)),
        "bn_mish_cl": lambda x: fused_act.batch_norm_act(
            x.contiguous(memory_format=torch.channels_last), torch.zeros(4), torch.ones(4), p(4),
            None, True, 0.1, 1e-5, "mish"),
        "bn_silu": lambda x: fused_act.batch_norm_act(x, torch.zeros(4), torch.ones(4), None,
                                                      None, True, 0.1, 1e-5, "silu"),
        "silu_fp8": lambda x: torch.cat([t.float().flatten() for t in fused_act.silu(
            x, out_dtype=torch.float8_e4m3fn)]),
        "act_quant": lambda x: torch.cat([t.float().flatten() for t in ops.act_quant(
            x, None, "gelu", scaling="row", backend="cpu")]),
        "bn_silu_eval_cl": lambda x: fused_act.batch_norm_act(
            x.contiguous(memory_format=torch.channels_last), p(4) - 1, p(4), p(4), p(4), False,
            0.1, 1e-5, "silu"),
    })
    return cases


@pytest.mark.parametrize("grad", [False, True])
def test_make_fx_on_real_tensors(grad):
    """``make_fx`` tracing real CPU tensors (its default mode), and any TorchDispatchMode, meets
    each op as one call: the graph holds it, and running the graph on new inputs gives the
    function's values, gradients too (traced through the backward).  A kernel called directly
    was invisible to the mode: the graph held the output's empty buffer alone."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(f, x):
        if not grad:
            return f(x)
        x = x.detach().requires_grad_()
        y = f(x)
        return y, torch.autograd.grad(y, x, torch.linspace(-1, 1, y.numel()).view(y.shape))

    x = torch.randn(2, 4, 3, 5, dtype=torch.float64).mul(2).float()
    x2 = torch.randn(2, 4, 3, 5, dtype=torch.float64).mul(2).float()
    for name, f in _traced_cases().items():
        if grad and name in ("silu_fp8", "act_quant"):
            continue  # an FP8 output is differentiated straight through: not this test's matter
        g = make_fx(functools.partial(run, f))(x)
        got, want = g(x2), run(f, x2)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


def test_backward_under_a_dispatch_mode_of_a_graph_built_outside():
    """A graph built eagerly outside any mode whose backward is traced by ``make_fx`` (a
    TorchDispatchMode): the C++ eager nodes and GatedMLP's recomputation of h meet the mode
    as ops (not as kernels it cannot see, which left the graph an empty buffer), so the traced
    gradient is the eager one.  Uninitialised memory is filled with NaN, so a graph that reads
    a buffer nothing wrote fails for sure."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    beta = torch.linspace(0.5, 1.5, 4).requires_grad_()
    mlp = fnn.GatedMLP(nn.Linear(8, 5), "silu", gate_proj=nn.Linear(5, 8),
                       up_proj=nn.Linear(5, 8), recompute=True)
    cases = {
        "silu": (x, lambda: fused_act.silu(x)),
        "swish_beta": (beta, lambda: fused_act.swish(x, beta)),
        "swiglu": (x, lambda: fused_act.swiglu(x, x.flip(0))),
        "frelu_max": (x, lambda: fused_act.frelu_max(x, x.flip(0).detach())),
        "acon_c": (beta, lambda: fused_act.acon_c(x, beta, -beta, beta)),
        "gated_mlp": (mlp.down_proj.weight, lambda: mlp(x[..., 0, :])),  # reads h
    }
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)  # empty buffers filled with NaN
    try:
        for name, (leaf, f) in cases.items():
            y = f()
            g = torch.linspace(-1, 1, y.numel()).view(y.shape)

            def grad(y, leaf, g):
                return torch.autograd.grad(y, leaf, g, retain_graph=True)[0]

            traced = make_fx(functools.partial(grad, y, leaf))(g)
            torch.testing.assert_close(traced(g), grad(y, leaf, g), msg=name)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
