"""fused_act's ``nn.Module``s: drop-ins with the constructor arguments and state_dicts of the
modules they replace (torch.nn's, and the ACON and FReLU papers' published modules).

The modules of plain activations (``Mish``, ``SiLU``) are generated from the registry at the end
of this file.  Every module's repr says "fused".
"""

import inspect

import torch
from torch import Tensor, nn

from .. import functional, ops, reference
from ..backend import get_backend
from ..registry import SPECS, Spec


class FusedModule(nn.Module):
    """The base of every fused_act module: its repr says "fused", and ``torch.jit.script`` is
    refused with a clear error (``forward`` calls the fused ops through Python;
    ``torch.jit.trace`` records the reference math and works)."""

    def extra_repr(self) -> str:
        details = self._details()
        return f"fused, {details}" if details else "fused"

    def _details(self) -> str:
        """The module's arguments in its repr, after "fused"."""
        return ""

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(f"fused_act.nn.{type(self).__name__} cannot be compiled by "
                           "torch.jit.script; use torch.compile or torch.export (or "
                           "torch.jit.trace, which records the reference math)")


def _check_counts(module: str, **counts: object) -> None:
    """Each of ``counts`` (channels, kernel size, ...) is an integer >= 1."""
    for arg, n in counts.items():
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise TypeError(f"fused_act.nn.{module}: {arg} must be an int (got "
                            f"{type(n).__name__})")
        if n < 1:
            raise ValueError(f"fused_act.nn.{module}: {arg} must be >= 1 (got {n})")


def _check_gated_args(module: str, activation: str, kwargs: dict) -> None:
    """What ``fused_act.glu`` checks of its activation arguments, naming the module (a tensor
    beta's device is checked against the input, in forward)."""
    op = f"nn.{module}"
    _, beta = functional._gated_activation(op, activation, dict(kwargs))
    if isinstance(beta, Tensor):
        functional._check_dtype(op, "beta", beta)
        if beta.numel() != 1:
            raise ValueError(f"fused_act.{op}: beta must be a float or a one-element tensor "
                             f"(got shape {tuple(beta.shape)})")
    elif beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float))):
        raise TypeError(f"fused_act.{op}: beta must be a float or a tensor "
                        f"(got {type(beta).__name__})")


class _InplaceActivation(FusedModule):
    """The registry spec ``op``, computed by its public function, with torch.nn's ``inplace``
    (the input ends as torch.nn's module leaves it, also when a gradient is needed)."""

    op = ""  # a spec name of fused_act/registry.py

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        public = SPECS[self.op].public
        if inplace and "inplace" not in inspect.signature(getattr(functional, public)).parameters:
            raise ValueError(f"fused_act.nn.{type(self).__name__}: inplace=True needs "
                             f"fused_act.{public} to take inplace (it does not)")
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        # one call, whatever x is: torch.fx traces it as one node (the function decides how to
        # write in place, where a branch on x would stop the tracer); an aliased spec's function
        # (gelu) takes no inplace
        spec = SPECS[self.op]
        return spec.call(x, inplace=True) if self.inplace else spec.call(x)

    def _details(self) -> str:
        return "inplace=True" if self.inplace else ""


class GELU(FusedModule):
    """GELU with ``approximate="none"`` or ``"tanh"``; a drop-in for ``torch.nn.GELU``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"fused_act.nn.GELU: approximate must be 'none' or 'tanh' "
                             f"(got {approximate!r})")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return functional.gelu(x, self.approximate)

    def _details(self) -> str:
        return f"approximate={self.approximate!r}"


class Swish(FusedModule):
    """Swish, ``x * sigmoid(beta * x)`` with a fixed or learnable beta.

    ``learnable=True`` makes ``beta`` a parameter of ``num_parameters`` values initialised to
    ``beta``: 1 (shared) or C = ``x.shape[1]`` (per channel, as ``torch.nn.PReLU``).
    """

    def __init__(self, beta: float = 1.0, learnable: bool = False, num_parameters: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        _check_counts("Swish", num_parameters=num_parameters)
        if num_parameters != 1 and not learnable:
            raise ValueError("fused_act.nn.Swish: num_parameters > 1 needs learnable=True")
        self.learnable = learnable
        self.num_parameters = num_parameters
        if learnable:
            self.beta = nn.Parameter(torch.full((num_parameters,), float(beta), device=device,
                                                dtype=dtype))
        else:
            self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return functional.swish(x, self.beta)

    def _details(self) -> str:
        if self.learnable:
            return f"learnable=True, num_parameters={self.num_parameters}"
        return f"beta={self.beta}"


class AconC(FusedModule):
    """ACON-C (Ma et al., "Activate or Not", 2021): ``(p1 - p2) x sigmoid(beta (p1 - p2) x) +
    p2 x`` with learnable per-channel ``p1``, ``p2``, ``beta`` of shape (1, C, 1, 1).

    Parameter names, shapes and initialisation (randn, randn, ones) match the paper's published
    module, so its state_dicts load as they are.  Takes (N, C, H, W) or (N, C) input.  Keep the
    parameters out of weight decay.
    """

    def __init__(self, c1: int) -> None:
        super().__init__()
        _check_counts("AconC", c1=c1)
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return functional.acon_c(x, self.p1, self.p2, self.beta)


class MetaAconC(FusedModule):
    """Meta-ACON: ACON-C with a per-sample, per-channel ``beta = sigmoid(fc2(fc1(mean of x
    over H, W))))``, ``k`` x ``k`` convolutions through ``c2 = max(r, c1 // r)`` channels.

    ``bn=False`` (default) is the form most detection code ships; ``bn=True`` adds ``bn1`` and
    ``bn2``, as the ACON authors' original module.  Both forms' checkpoints load as they are.
    The beta network runs in PyTorch; the activation is the fused per-sample ACON-C.
    """

    def __init__(self, c1: int, k: int = 1, s: int = 1, r: int = 16, bn: bool = False) -> None:
        super().__init__()
        _check_counts("MetaAconC", c1=c1, k=k, s=s, r=r)
        c2 = max(r, c1 // r)
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.fc1 = nn.Conv2d(c1, c2, k, s, bias=True)
        self.bn1 = nn.BatchNorm2d(c2) if bn else nn.Identity()
        self.fc2 = nn.Conv2d(c2, c1, k, s, bias=True)
        self.bn2 = nn.BatchNorm2d(c1) if bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)  # as the published module
        beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(y)))))
        return functional.acon_c(x, self.p1, self.p2, beta)


class FReLU(FusedModule):
    """FReLU (Ma et al., "Funnel Activation for Visual Recognition", 2020):
    ``max(x, bn(conv(x)))`` with a depthwise ``k`` x ``k`` convolution, named and shaped as the
    paper's published module.

    The convolution runs in PyTorch and the max step is fused.  In eval mode (BatchNorm on its
    running statistics) BatchNorm folds into the max kernel as a per-channel ``a t + b``, making
    no pass of its own, whatever the grad mode: a and b are computed from BatchNorm's parameters
    by differentiable torch operations, so gradients reach its weight and bias, and an exported
    or compiled eval model holds the folded op.  Both ops follow compile mode "frelu_max".
    """

    def __init__(self, c1: int, k: int = 3) -> None:
        super().__init__()
        _check_counts("FReLU", c1=c1, k=k)
        self.conv = nn.Conv2d(c1, c1, k, 1, k // 2, groups=c1, bias=False)
        self.bn = nn.BatchNorm2d(c1)

    def forward(self, x: Tensor) -> Tensor:
        t = self.conv(x)
        bn = self.bn
        # the fold needs both running statistics, which BatchNorm uses only outside training;
        # torch.fx records the form right in either mode, as its graph may run in both
        if (isinstance(t, torch.fx.Proxy) or bn.training or bn.running_mean is None
                or bn.running_var is None):
            return functional.frelu_max(x, bn(t))
        functional._check_frelu_pair("nn.FReLU", x, t)
        # fp32, or fp64; chosen in Python, so that an exported graph holds no node for it
        acc = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
        a = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.to(acc)
        b = -bn.running_mean.to(acc) * a
        if bn.bias is not None:
            b = b + bn.bias.to(acc)
        return ops.FRELU_MAX_AFFINE(x, t, a, b, mode="frelu_max")


class GLU(FusedModule):
    """``activation(gate) * up``, fused (``fused_act.glu``): ``forward(gate, up)``, or
    ``forward(x)`` with ``x`` split in halves along ``dim``, gate first (torch.nn.GLU gates the
    other way round).  ``activation`` takes its function's arguments (``approximate`` for gelu,
    ``beta`` for swish); ``learnable=True`` makes swish's ``beta`` a one-value parameter.

    ``fp8="row"``, ``"tensor"`` or ``"block"`` (default None: the result in the input's dtype)
    makes ``forward`` return ``(q, scales)``, the result quantised to ``fp8_dtype`` as
    ``fused_act.glu(..., out_dtype=fp8_dtype, scaling=fp8)`` gives it (MX blocks of 32): for
    inference, as no gradient flows through FP8 data (a learnable beta: under
    ``torch.no_grad()``; training: ``GatedMLP(fp8=...)``).
    """

    def __init__(self, activation: str = "silu", dim: int = -1, learnable: bool = False,
                 fp8: str | None = None, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 **activation_kwargs: object) -> None:
        super().__init__()
        if learnable and activation != "swish":
            raise ValueError("fused_act.nn.GLU: learnable=True needs activation='swish'")
        _check_gated_args("GLU", activation, activation_kwargs)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"fused_act.nn.GLU: dim must be an int (got {type(dim).__name__})")
        _check_fp8("GLU", fp8, fp8_dtype)
        self.activation, self.dim, self.learnable = activation, dim, learnable
        self.fp8, self.fp8_dtype = fp8, fp8_dtype
        if learnable:
            beta = float(activation_kwargs.pop("beta", 1.0))
            self.beta = nn.Parameter(torch.full((1,), beta))
        self.activation_kwargs = activation_kwargs

    def _kwargs(self) -> dict:
        return {**self.activation_kwargs, **({"beta": self.beta} if self.learnable else {})}

    fp8: str | None = None  # the defaults, also for a module pickled before the option existed
    fp8_dtype = torch.float8_e4m3fn

    def forward(self, gate: Tensor, up: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if self.fp8 is not None:
            return functional.glu(gate, up, self.activation, self.dim, out_dtype=self.fp8_dtype,
                                  scaling=self.fp8, **self._kwargs())
        return functional.glu(gate, up, self.activation, self.dim, **self._kwargs())

    def _details(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.activation_kwargs.items())
        return f"activation={self.activation!r}{args}" + (
            f", dim={self.dim}" if self.dim != -1 else "") + (
            ", learnable=True" if self.learnable else "") + _fp8_details(self)


def _check_fp8(module: str, fp8: object, fp8_dtype: object) -> None:
    """``fp8`` is None or a scaling of ``reference.SCALINGS``, ``fp8_dtype`` an FP8 format."""
    if fp8 is not None and fp8 not in reference.SCALINGS:
        raise ValueError(f"fused_act.nn.{module}: fp8 must be None or one of "
                         f"{reference.SCALINGS}, got {fp8!r}")
    if fp8_dtype not in reference.FP8_MAX:
        raise ValueError(f"fused_act.nn.{module}: fp8_dtype must be torch.float8_e4m3fn or "
                         f"torch.float8_e5m2, got {fp8_dtype}")


def _fp8_details(m: nn.Module) -> str:
    """The FP8 options in a module's repr, where set."""
    if m.fp8 is None:
        return ""
    return f", fp8={m.fp8!r}" + (
        "" if m.fp8_dtype == torch.float8_e4m3fn else f", fp8_dtype={m.fp8_dtype}")


class _SavedH:
    """Where ``down_proj`` saved h, or a view of it: what ``as_strided`` on the recomputed h
    gives back."""

    __slots__ = ("offset", "size", "stride")

    def __init__(self, t: Tensor) -> None:
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class _RecomputeH:
    """The saved-tensor hooks of one ``GatedMLP`` forward that recomputes h: ``down_proj``'s
    saved tensors that are h (its storage, unmodified) become a ``_SavedH``, and come back as
    ``ops.GATED.rerun`` of glu's inputs; every other tensor goes through the hooks in force
    outside (only the innermost pair runs, so ours hand theirs what they do not keep).

    glu's inputs are kept as those outer hooks pack them, once, at the first save of h: an
    offloading hook moves them too, and reading them takes nothing from glu's backward (its
    own saved copies are not unpacked twice, which checkpointing forbids).  Not h: its memory
    goes with the forward.  One rerun serves all the views of h a backward pass unpacks (a LoRA
    wrapper saves h twice); it is dropped once each has been unpacked.
    """

    def __init__(self, h: Tensor, node: torch.autograd.graph.Node,
                 inputs: tuple[Tensor | None, ...]) -> None:
        self.node, self.raw = node, inputs  # raw: until the forward ends, or h is saved
        self.ptr, self.device, self.dtype = h.untyped_storage().data_ptr(), h.device, h.dtype
        self.version = h._version  # a tensor written in place after glu is not glu's result
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.inputs: tuple[object, ...] | None = None  # raw, packed by the outer hooks
        self.saved = 0  # how many of down_proj's saved tensors are h
        self.unpacked = 0  # in the backward pass under way
        self.h: Tensor | None = None

    def pack(self, t: Tensor) -> object:
        if (type(t) is Tensor and t.layout == torch.strided and t.dtype == self.dtype
                and t.device == self.device and t._version == self.version
                and t.untyped_storage().data_ptr() == self.ptr):
            if self.inputs is None:
                self.inputs = tuple(self._outer_pack(i) for i in self.raw)
            self.saved += 1
            return _SavedH(t)
        return self._outer_pack(t)

    def _outer_pack(self, t: Tensor | None) -> object:
        return t if self.outer is None or t is None else self.outer[0](t)

    def _outer_unpack(self, packed: object) -> Tensor | None:
        return packed if self.outer is None or packed is None else self.outer[1](packed)

    def unpack(self, packed: object) -> Tensor:
        if not isinstance(packed, _SavedH):
            return self._outer_unpack(packed)
        h = self.h
        if h is None:
            h = ops.GATED.rerun(self.node, *map(self._outer_unpack, self.inputs))
        self.unpacked += 1
        # kept for the other saved views of h until the last of them is unpacked
        self.h, self.unpacked = (None, 0) if self.unpacked >= self.saved else (h, self.unpacked)
        return h.as_strided(packed.size, packed.stride, packed.offset)


class GatedMLP(FusedModule):
    """``down_proj(activation(gate) * up)`` with the gated product fused, over a transformer MLP
    block's own projections (``gate_proj`` and ``up_proj``, or a packed ``gate_up_proj``, gate
    then up): what ``patch_gated_mlps`` puts in place of a block, keeping its state_dict keys.

    Recomputing keeps h = activation(gate) * up out of autograd's memory: ``down_proj`` (any
    module: a Linear, a LoRA wrapper, frozen or not) runs under saved-tensor hooks that replace
    each tensor it saves that is h by a note, and its backward computes h again, by one fused
    glu pass (the forward's backend) from gate and up, which glu's own backward keeps anyway;
    the views of h one backward pass reads share that pass.  Where nothing in ``down_proj``
    saves h (frozen weights) nothing is recomputed.  The gradients are those of keeping h, bit
    for bit.  ``recompute=None`` (the default) recomputes where h lives on an accelerator (any
    device but the CPU) and keeps h on CPU tensors, decided at each forward: on the CPU the
    extra pass cost 2-3% of a Llama MLP block's forward+backward (256 -> 688, 512 tokens,
    fp32, one thread: 1.019-1.031x the original block, 0.996-0.998x keeping h), and memory
    rarely limits training there.  ``recompute=True`` recomputes on every device (a CPU user
    short of memory), ``False`` keeps h on every device.

    Saved-tensor hooks of the caller (a saved-bytes counter, CPU offload, non-reentrant
    ``torch.utils.checkpoint``) still get every tensor ``down_proj`` saves but h, and in h's
    place gate and up a second time (an offloading hook copies them twice; a counter that
    goes by storage counts nothing more).  Under ``torch.compile`` and export the plain forward
    is traced and AOTAutograd decides what to save; under no_grad, FX tracing, torch.func
    transforms, DTensor, or where saved-tensor hooks are disabled, h is kept as without
    recompute.

    ``fp8="row"``, ``"tensor"`` or ``"block"`` (default None: the high-precision block) trains
    through FP8: ``down_proj`` (an ``nn.Linear``, whose forward and hooks are then not called)
    is computed by ``fused_act.glu_fp8_linear`` from h quantised to ``fp8_dtype`` with that
    scaling (MX blocks of 32 for "block") and its weight in e4m3, the backward straight-through
    the quantisation (that function's docstring); h is never kept, so nothing is recomputed.
    A tensor (learnable) beta trains too: its gradient is the unquantised glu's for the
    straight-through dh.  The state_dict is the same.  Measured on a small block (64 -> 192 ->
    64, fp32, e4m3, 25 Adam steps on a random regression whose loss falls 20-fold,
    tests/test_fp8_training.py): the loss stays within 1.7% ("row"), 2.3% ("tensor") and 3.6%
    ("block") of the fp32 block's from the same init at every step, and within 2.0%, 2.2% and
    3.9% of the bf16 block's (bf16 parameters and data, three seeds).
    """

    # a module pickled before the option existed recomputed on every device
    recompute: bool | None = True
    # the defaults, also for a module pickled before the options existed
    fp8: str | None = None
    fp8_dtype = torch.float8_e4m3fn

    def __init__(self, down_proj: nn.Module, activation: str, *,
                 gate_proj: nn.Module | None = None, up_proj: nn.Module | None = None,
                 gate_up_proj: nn.Module | None = None, recompute: bool | None = None,
                 fp8: str | None = None, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 **activation_kwargs: object) -> None:
        super().__init__()
        if (gate_up_proj is None) == (gate_proj is None or up_proj is None) or (
                gate_up_proj is not None and (gate_proj is not None or up_proj is not None)):
            raise ValueError("fused_act.nn.GatedMLP: give gate_proj and up_proj, or "
                             "gate_up_proj")
        _check_gated_args("GatedMLP", activation, activation_kwargs)
        for name, m in (("gate_proj", gate_proj), ("up_proj", up_proj),
                        ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if m is not None:
                self.add_module(name, m)
        self.activation, self.activation_kwargs = activation, activation_kwargs
        self.recompute = None if recompute is None else bool(recompute)
        self.use_fp8(fp8, fp8_dtype)

    def use_fp8(self, fp8: str | None, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        """Set the FP8 options of the constructor (None: the high-precision block), checked
        against this block: ``down_proj`` an ``nn.Linear`` (or a subclass with its forward),
        and for "block" K divisible by 32."""
        _check_fp8("GatedMLP", fp8, fp8_dtype)
        if fp8 is not None:
            down = self.down_proj
            if not isinstance(down, nn.Linear) or type(down).forward is not nn.Linear.forward:
                raise TypeError(f"fused_act.nn.GatedMLP: fp8 needs down_proj to be an "
                                f"nn.Linear, whose weight it quantises (got "
                                f"{type(down).__name__})")
            if fp8 == "block" and down.in_features % reference.MX_BLOCK:
                raise ValueError(f"fused_act.nn.GatedMLP: fp8='block' needs down_proj's "
                                 f"in_features {down.in_features} to be a multiple of "
                                 f"{reference.MX_BLOCK}")
        self.fp8, self.fp8_dtype = fp8, fp8_dtype

    def forward(self, x: Tensor) -> Tensor:
        if "gate_up_proj" in self._modules:
            gate, up = self.gate_up_proj(x), None
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.fp8 is not None:
            down = self.down_proj
            return functional.glu_fp8_linear(gate, up, down.weight, down.bias, self.activation,
                                             out_dtype=self.fp8_dtype, scaling=self.fp8,
                                             **self.activation_kwargs)
        # recomputing h needs glu's op node (the CPU fast path's C++ node cannot be rerun);
        # arguments that override functions (FX proxies, tensor-likes) meet the public function
        recompute = not _overrides_functions(gate, up) and self._recomputes(gate.device)
        if recompute:
            h = functional._gated("glu", gate, up, self.activation, -1, self.activation_kwargs,
                                  eager=False)
        else:
            h = functional.glu(gate, up, self.activation, **self.activation_kwargs)
        node = self._glu_node(h) if recompute else None
        if node is None:
            return self.down_proj(h)
        beta = self.activation_kwargs.get("beta")
        hooks = _RecomputeH(h, node, (gate, up, beta if isinstance(beta, Tensor) else None))
        try:
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                return self.down_proj(h)
        finally:
            hooks.raw = ()  # what outlives the forward holds glu's inputs only as packed

    def _recomputes(self, device: torch.device) -> bool:
        """Whether this forward is to recompute h (for a ``glu`` node that allows it)."""
        recompute = device.type != "cpu" if self.recompute is None else self.recompute
        return (recompute and not torch.compiler.is_compiling() and torch.is_grad_enabled()
                and torch._C._autograd._saved_tensors_hooks_is_enabled())

    @staticmethod
    def _glu_node(h: Tensor) -> torch.autograd.graph.Node | None:
        """glu's op node, where h is to be recomputed from it."""
        node = ops.GATED.node_of(h)
        # an empty h shares its null data pointer with every other empty tensor
        return node if node is not None and h.numel() else None

    def _details(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.activation_kwargs.items())
        recompute = "" if self.recompute is None else f", recompute={self.recompute}"
        return f"activation={self.activation!r}{args}{recompute}" + _fp8_details(self)


def _overrides_functions(*ts: object) -> bool:
    """Whether an argument hands functions to its own ``__torch_function__`` (an FX proxy, a
    tensor-like, a subclass keeping the protocol); a TorchFunctionMode in force does not count
    (``has_torch_function`` says True under any, ``torch.device(...)`` among them)."""
    return any(t is not None and type(t) not in (Tensor, nn.Parameter)
               and getattr(type(t), "__torch_function__", None)
               is not torch._C._disabled_torch_function_impl for t in ts)


def activation_form(act: nn.Module) -> tuple[str, dict] | None:
    """(the public activation, its arguments) that one of our activation modules computes, as
    ``fused_act.glu`` and ``fused_act.batch_norm_act`` take them; None for a module that is
    not an elementwise activation of ours (ACON-C, FReLU, ...)."""
    if isinstance(act, GELU):
        return "gelu", {"approximate": act.approximate}
    if isinstance(act, Swish):
        return "swish", {"beta": act.beta}
    if isinstance(act, _InplaceActivation):
        return act.op, {}
    if type(act) is AconC:  # Meta-ACON's beta depends on the activation's input: not fused
        return "acon_c", {"p1": act.p1, "p2": act.p2, "beta": act.beta}
    return None


class BatchNormAct2d(nn.BatchNorm2d, FusedModule):
    """``torch.nn.BatchNorm2d`` followed by an activation, fused (``fused_act.batch_norm_act``):
    BatchNorm2d's arguments, parameters and buffers, and the activation module ``act``.

    ``act`` is one of our elementwise activation modules (``Mish()``, ``SiLU()``,
    ``GELU(approximate=...)``, ``Swish(...)`` with a fixed or learnable beta, ``AconC(C)``;
    not ``MetaAconC``, whose beta is computed from BatchNorm's output), or the name of one
    (``"mish"``, ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ...); its parameters are this
    module's ``act.*``, as in timm's BatchNormAct2d, whose state_dict it shares.  In training
    the fused op's batch statistics take one read of x and the normalised activation one more,
    and its backward saves only x (never BatchNorm's output); the running statistics update as
    BatchNorm2d's (``momentum=None``: a cumulative average).  In eval the running statistics
    fold into one pass.

    Eager calls on CPU tensors run torch's BatchNorm2d then ``act``'s function (our op, under
    the backend in force) instead, in training and eval alike, whatever the backend but
    "triton": torch's CPU BatchNorm was the faster one there when this was chosen (the fused
    op's per-channel host work made small CPU layers 1.8-4x slower in training; in training
    ``fused_act.batch_norm_act`` has since run as a C++ node, at 0.78-1.2x torch's time for
    2^16 elements), and CPU memory is rarely what limits training.  The choice rests on the
    device alone, so activation checkpointing, which recomputes the forward under whatever
    backend is in force at backward time, meets the same graph (the Triton interpreter,
    backend "triton" on CPU tensors, is the one exception).
    torch.compile, torch.export and CUDA tensors run the fused op.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 act: nn.Module | str = "silu", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        nn.BatchNorm2d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype)
        if isinstance(act, str):
            if act not in SPECS or not SPECS[act].module or SPECS[act].beta:
                names = sorted(n for n, s in SPECS.items() if s.module and not s.beta)
                raise ValueError(f"fused_act.nn.BatchNormAct2d: act {act!r} is not one of "
                                 f"{names} (or an activation module)")
            spec = SPECS[act]
            act = MODULES[spec.module](**spec.kwargs)
        if activation_form(act) is None:
            raise TypeError(f"fused_act.nn.BatchNormAct2d: act must be one of fused_act.nn's "
                            f"elementwise activation modules (got {type(act).__name__})")
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            # torch.fx records the module as one call, as it does BatchNorm2d (a leaf there):
            # the graph then reads the mode and counts batches each time it runs
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        self._check_input_dim(x)
        if self._torch_pair(x):
            # the activation's forward, not a module call: its hooks never run on the fused
            # path either
            return self.act.forward(nn.BatchNorm2d.forward(self, x))
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = not self.training or self.track_running_stats
        activation, kwargs = activation_form(self.act)
        return functional.batch_norm_act(
            x, self.running_mean if tracked else None, self.running_var if tracked else None,
            self.weight, self.bias,
            self.training or (self.running_mean is None and self.running_var is None),
            factor, self.eps, activation, **kwargs)

    def _torch_pair(self, x: Tensor) -> bool:
        """Whether this call runs torch's BatchNorm2d then ``act`` (the class docstring)."""
        # not with running statistics that are negative views: torch's BatchNorm leaves them
        # as they were in training (torch 2.14), where batch_norm_act updates them
        return (x.device.type == "cpu" and type(x) is Tensor and get_backend() != "triton"
                and not torch.compiler.is_compiling()
                and not any(t is not None and t.is_neg()
                            for t in (self.running_mean, self.running_var)))

    extra_repr = FusedModule.extra_repr  # "fused", ahead of BatchNorm's in the MRO

    def _details(self) -> str:
        return nn.BatchNorm2d.extra_repr(self)


def _activation_module(spec: Spec) -> type[_InplaceActivation]:
    """The module class ``spec.module`` of a plain activation: its public function with
    torch.nn's ``inplace`` argument, documented by that function's summary."""
    if spec.beta:
        raise RuntimeError(f"fused_act.nn: activation {spec.name!r} takes a beta, so its module "
                           f"{spec.module} is written by hand (as Swish)")
    function = spec.public
    summary = inspect.cleandoc(getattr(functional, function).__doc__ or "").split("\n\n")[0]
    call = f"fused_act.{function}(x{''.join(f', {k}={v!r}' for k, v in spec.kwargs.items())})"
    drop_in = f"; a drop-in for ``torch.nn.{spec.replaces}``" if spec.replaces else ""
    doc = f"{summary}\n\n``{call}`` as a module with torch.nn's ``inplace``{drop_in}."
    return type(spec.module, (_InplaceActivation,), {
        "__doc__": doc, "__module__": __name__, "__qualname__": spec.module, "op": spec.name})


# every module class by name: those written here, and one generated for each other module that
# a registry spec names (adding a plain activation needs no edit here)
MODULES: dict[str, type[FusedModule]] = {c.__name__: c for c in (
    GELU, Swish, AconC, MetaAconC, FReLU, GLU, GatedMLP, BatchNormAct2d)}
_GENERATED: dict[str, type[_InplaceActivation]] = {}
for _spec in SPECS.values():
    if _spec.module in _GENERATED:
        raise RuntimeError(f"fused_act.nn: specs {_GENERATED[_spec.module].op!r} and "
                           f"{_spec.name!r} both name module {_spec.module}: a module for "
                           "several specs is written by hand (as GELU)")
    if _spec.module and _spec.module not in MODULES:
        _GENERATED[_spec.module] = _activation_module(_spec)
MODULES.update(_GENERATED)
globals().update(_GENERATED)  # module attributes, as pickle finds a class by its module's

__all__ = ["FusedModule", *sorted(MODULES)]
