"""The eager fast paths on CPU tensors: an activation and a gated activation (of two tensors or
the halves of one), with a float beta or a beta tensor, FReLU's max and ACON-C (Meta-ACON's
per-sample beta too) and BatchNorm with an activation, each as a C++ autograd node of the CPU
kernels' extension (csrc/binding.cpp, EagerActivation, EagerGlu, EagerMax, EagerAcon,
EagerBatchNorm and EagerAffine) in place of the op's
Python Function, whose bookkeeping costs more than the kernels on small tensors
(a 1024-element swiglu forward+backward: 85 us through the Function, 33 us for the eager
expression silu(gate) * up).  The same kernels, plans and saved tensors as the op's "cpu"
backend, so the results are the op's bit for bit, a beta's gradient too; a backward that needs a
graph of its own (create_graph) or gets a gradient the kernels cannot take (batched, a subclass)
runs the reference math, as the op's backward does there.  Each node is a torch::autograd::Node
of its own (EagerNode), not an autograd Function's, whose bookkeeping cost more than torch's own
nodes (a 2^16 fp32 silu forward+backward: 1.13x torch's through one, 1.06x now); compiled
autograd calls its backward opaquely, as a Function's."""

import functools
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .. import plan, reference
from ..backend import get_backend
from ..kernels import launcher
from ..registry import SPECS
from .acon import ACON_C, n_outermost
from .activation import ACTIVATION, _act_plan, _act_reference_backward
from .batchnorm import ACON, affine_differentiable_backward, bn_differentiable_backward
from .frelu import FRELU_MAX
from .glu import GATED, _glu_reference_backward
from .layout import fp32, is_dense
from .op import reference_math

# tensors whose data the kernels read: no dispatch of their own (a Parameter's is disabled)
_PLAIN = (Tensor, torch.nn.Parameter)


def _kernels(*ts: Tensor | None) -> ModuleType | None:
    """The CPU kernels' extension where an eager call on these CPU tensors (None: an argument
    left out) may take its C++ node: plain tensors or parameters (no dispatch of their own, no
    negative view: the op resolves one),
    not compiling, no TorchDispatchMode, no torch.func transform, and backend "cpu" in force
    (also as "auto", which on a CPU tensor is "cpu" where the kernels build, else the
    reference: None)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return None  # a TorchDispatchMode sees the op only (op.dispatches_itself)
    for t in ts:  # a loop, not any(): this runs on every call
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu or t.is_neg()):
            return None
    if not ts[0].numel() or reference_math():
        return None
    backend = get_backend()
    lib = _LOADED.get(backend)
    if lib is None and backend in ("auto", "cpu"):
        k = launcher(torch.device("cpu"), backend)
        if k is not None:  # a build that failed stays failed: only the loaded one is kept
            lib = _LOADED[backend] = _eager(k)
    return lib


# the extension per backend name that ran it ("auto" and "cpu"), once loaded
_LOADED: dict[str, ModuleType] = {}


def run_activation(x: Tensor, act: str, beta: Tensor | None, beta_value: float) -> Tensor:
    """``ACTIVATION`` on validated arguments: a dense CPU tensor takes EagerActivation (module
    docstring); every other call is the op's."""
    lib = _kernels(x, beta)
    if lib is not None and is_dense(x):  # after _kernels: vmap cannot answer is_dense
        # a flat x: the binding makes plan.flat itself
        return lib.eager_activation(x, beta, act, SPECS[act].kernel_id, fp32(beta_value),
                                    plan.BLOCK,
                                    None if beta is None else _act_plan(x, beta).fields())
    return ACTIVATION(x, act, beta, beta_value, mode=act)


def run_glu(gate: Tensor, up: Tensor | None, act: str, beta: Tensor | None, beta_value: float,
            dim: int) -> Tensor:
    """``GATED`` on validated arguments: separate contiguous CPU tensors of one shape and dtype,
    or the halves of one contiguous CPU tensor (``up`` None), take EagerGlu (module docstring);
    every other call is the op's."""
    lib = None
    if up is None or (gate.shape == up.shape and gate.dtype == up.dtype):
        lib = _kernels(gate, up, beta)
    if lib is not None and gate.is_contiguous() and (up is None or up.is_contiguous()):
        return lib.eager_glu(gate, up, beta, act, SPECS[act].kernel_id, fp32(beta_value), dim,
                             plan.BLOCK)
    return GATED(gate, up, act, beta, beta_value, dim, mode="glu")


def call_entry(name: str, args: tuple) -> Tensor | None:
    """A public function's whole eager call in one step, by the CPU kernels' extension's
    function ``name`` (binding.cpp's fast_max), once they are loaded for the backend in force
    (by an earlier call through ``_kernels``), not compiling, no forward-mode AD: that function
    asks the rest of the Python path's questions of ``args`` and runs the call, or gives None
    for every call that path must check (raising its errors) or route elsewhere.  Only FReLU's
    max has one: its kernel runs at torch.maximum's speed, and the Python path's checks and
    routing cost a 2^16-element forward 1.24-1.71x torch.maximum's time.
    (``is_compiling`` asked as Dynamo's fold and the flag it reads, a frame fewer: 5% there.)"""
    if torch.compiler.is_dynamo_compiling() or torch.compiler._is_compiling_flag:
        return None
    lib = _LOADED.get(get_backend())
    if lib is None or forward_ad._current_level >= 0:
        return None
    return getattr(lib, name)(args, plan.BLOCK)


def run_max(x: Tensor, t: Tensor, need_code: bool) -> Tensor:
    """``FRELU_MAX``'s output on validated arguments: a dense CPU ``x`` and a ``t`` of its
    strides take EagerMax (module docstring); every other call is the op's."""
    lib = _kernels(x, t)
    if lib is not None and is_dense(x) and t.stride() == x.stride():
        return lib.eager_max(x, t, need_code, plan.BLOCK)
    return FRELU_MAX(x, t, need_code, mode="frelu_max")


def run_acon(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """``ACON_C`` on validated arguments: a dense CPU ``x`` (N outermost in memory for a
    per-sample beta) takes EagerAcon; every other call is the op's."""
    lib = _kernels(x, p1, p2, beta)
    if lib is not None and is_dense(x):
        per_sample = reference.per_sample(beta, x)
        if not per_sample or n_outermost(x):
            return lib.eager_acon(x, p1, p2, beta, per_sample,
                                  plan.channel_plan(x, p1.numel(), per_sample).fields())
    return ACON_C(x, p1, p2, beta, mode="acon_c")


def eager_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, training: bool,
                     momentum: float, eps: float, act: str, beta: Tensor | None,
                     beta_value: float) -> Tensor | None:
    """``batch_norm_act``'s output on validated arguments by the CPU kernels' extension, for a dense
    CPU ``x`` with an elementwise activation of a float beta, weight and bias of shape (C,)
    (batch_norm_act flattens them) and running statistics that take no gradient: in training as
    EagerBatchNorm (module docstring), which updates the running statistics; in eval without a
    gradient to take (no grad mode, or no input that requires one) as one call of the op's
    kernel on the folded running statistics, with none of its Python work (a bf16 eval BatchNorm
    then silu of 2^16 elements, forward: 1.8x torch's pair through the op, 1.2-1.3x so); in eval
    with one as EagerAffine, the op's affine_act on those coefficients, which take their
    gradients to weight and bias through torch's ops as the op's do. None where the call is the
    op's."""
    if act == ACON or beta is not None:
        return None
    lib = _kernels(x, weight, bias, running_mean, running_var)
    if lib is None or not is_dense(x):
        return None
    # None where the call is the op's: running statistics that take a gradient
    return lib.eager_batch_norm(x, weight, bias, running_mean, running_var, training,
                                float(momentum), float(eps), act, SPECS[act].kernel_id,
                                fp32(beta_value), plan.channel_plan(x, x.shape[1]).fields())


@functools.cache
def _eager(k: object) -> ModuleType:
    """The CPU kernels' extension, told the backwards to run where a gradient needs a graph."""
    k.lib.set_differentiable_backward(_act_reference_backward, _glu_reference_backward,
                                      reference.frelu_max_backward_code,
                                      reference.acon_c_backward, bn_differentiable_backward,
                                      affine_differentiable_backward)
    return k.lib

