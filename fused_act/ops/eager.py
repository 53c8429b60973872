"""The eager fast paths on CPU tensors: an activation, and a gated activation of two separate
tensors, each as a C++ autograd node of the CPU kernels' extension (csrc/binding.cpp,
EagerActivation and EagerGlu) in place of the op's Python Function, whose bookkeeping costs more
than the kernels on small tensors (a 1024-element swiglu forward+backward: 85 us through the
Function, 33 us for the eager expression silu(gate) * up).  The same kernels, flat plan and
saved tensors as the op's "cpu" backend, so the results are the op's bit for bit; a backward
that needs a graph of its own (create_graph) or gets a gradient the kernels cannot take (batched,
a subclass) runs the reference math, as the op's backward does there."""

import functools
from types import ModuleType

import torch
from torch import Tensor

from .. import plan
from ..backend import get_backend
from ..kernels import launcher
from ..registry import SPECS
from .activation import ACTIVATION, _act_reference_backward
from .glu import GATED, _glu_reference_grads
from .layout import fp32, is_dense
from .op import reference_math


def _kernels(*ts: Tensor) -> ModuleType | None:
    """The CPU kernels' extension where an eager call on these plain CPU tensors may take its
    C++ node: not compiling, no torch.func transform, and backend "cpu" in force (also as "auto",
    which on a CPU tensor is "cpu" where the kernels build, else the reference: None)."""
    if (torch.compiler.is_compiling() or any(type(t) is not Tensor or not t.is_cpu for t in ts)
            or not ts[0].numel() or reference_math()):
        return None
    backend = get_backend()
    k = launcher(ts[0].device, backend) if backend in ("auto", "cpu") else None
    return None if k is None else _eager(k)


def run_activation(x: Tensor, act: str, beta: Tensor | None, beta_value: float) -> Tensor:
    """``ACTIVATION`` on validated arguments: a dense CPU tensor without a beta tensor takes
    EagerActivation (module docstring); every other call is the op's."""
    lib = _kernels(x) if beta is None else None
    if lib is not None and is_dense(x):  # after _kernels: vmap cannot answer is_dense
        return lib.eager_activation(x, act, SPECS[act].kernel_id, fp32(beta_value), plan.BLOCK)
    return ACTIVATION(x, act, beta, beta_value, mode=act)


def run_glu(gate: Tensor, up: Tensor | None, act: str, beta: Tensor | None, beta_value: float,
            dim: int) -> Tensor:
    """``GATED`` on validated arguments: separate contiguous CPU tensors of one shape and dtype
    without a beta tensor take EagerGlu (module docstring); every other call is the op's."""
    lib = None
    if beta is None and up is not None and gate.shape == up.shape and gate.dtype == up.dtype:
        lib = _kernels(gate, up)
    if lib is not None and gate.is_contiguous() and up.is_contiguous():
        return lib.eager_glu(gate, up, act, SPECS[act].kernel_id, fp32(beta_value), plan.BLOCK)
    return GATED(gate, up, act, beta, beta_value, dim, mode="glu")


@functools.cache
def _eager(k: object) -> ModuleType:
    """The CPU kernels' extension, told the backwards to run where a gradient needs a graph."""
    k.lib.set_differentiable_backward(_activation_backward, _glu_backward)
    return k.lib


def _activation_backward(grad: Tensor, x: Tensor, act: str, beta_value: float) -> Tensor:
    """dx of EagerActivation where the kernels cannot give it: the reference math."""
    return _act_reference_backward(grad, x, act, None, beta_value, False)[0]


def _glu_backward(grad: Tensor, gate: Tensor, up: Tensor, act: str,
                  beta_value: float) -> tuple[Tensor, Tensor]:
    """(dgate, dup) of EagerGlu where the kernels cannot give them: the reference math."""
    return _glu_reference_grads(grad, gate, up, act, None, beta_value, False)[:2]
