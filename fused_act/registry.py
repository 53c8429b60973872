"""One spec per elementwise activation: the one place an activation is declared.

The op table of ``ops.py``, the test tables, the benchmark's table and the kernel selectors'
numbers come from here: ``KERNEL_IDS`` assigns each kernel activation its selector, and tests
check ``triton_kernels/math.py`` and ``csrc/activations.cuh`` (its ids and their count
``N_ACT``, over which the CUDA launchers dispatch) against it (a selector that meets an unknown
id fails at compile time, never computes another activation).  Adding an elementwise activation
is its math in the three math files (Triton, CUDA, reference), an id here and one ``Spec``, plus
its public function and module if it has its own (CONTRIBUTING.md).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

from . import reference

Beta = float | Tensor
INF = math.inf

# The selector of each kernel activation: ``<NAME>`` in triton_kernels/math.py and ``ACT_<NAME>``
# in csrc/activations.cuh (ids 0, 1, ...: the CUDA launchers dispatch over every id below its
# ``N_ACT``), picking ``<name>_fwd`` / ``<name>_bwd`` in both.
KERNEL_IDS = {"mish": 0, "swish": 1, "gelu": 2, "gelu_tanh": 3}


@dataclass(frozen=True)
class Spec:
    """A public elementwise activation ``y = f(x)`` (``f(x, beta)`` where ``beta``).

    ``kernel`` names its kernel activation (a key of ``KERNEL_IDS``; silu runs swish's with
    beta 1); ``forward(x, beta)`` and ``backward(grad, x, beta, need_dbeta) -> (dx, dbeta or
    None)`` are the kernel activation's reference math.  Users reach it as
    ``fused_act.<function>(x, **kwargs)`` and PyTorch users as ``torch_fn(x)``.  Tests draw
    inputs as N(0, ``scale``) (the saturating branches are reached) and expect ``limits`` =
    (f(+inf), f(-inf), f'(+inf), f'(-inf)).  ``compile_mode`` is what ``torch.compile`` sees
    unless ``config.compile_mode`` says otherwise (chosen by measurement: bench/NOTES.md).
    ``module`` is its ``fused_act.nn`` class, and ``replaces`` the ``torch.nn`` class that
    ``replace_activations`` swaps for it (its arguments of the same names carry over);
    ``lookalikes`` maps the qualified names of other libraries' classes that compute the same
    function to the further arguments our module needs for them (known by name, so those
    libraries are never imported here).
    """

    name: str
    kernel: str
    forward: Callable[[Tensor, Beta], Tensor]
    backward: Callable[[Tensor, Tensor, Beta, bool], tuple[Tensor, Tensor | None]]
    torch_fn: Callable[[Tensor], Tensor]
    function: str = ""
    kwargs: dict = field(default_factory=dict)
    beta: bool = False
    scale: float = 8.0
    limits: tuple[float, float, float, float] = (INF, 0.0, 1.0, 0.0)
    compile_mode: str = "opaque"
    module: str = ""
    replaces: str = ""
    lookalikes: dict[str, dict] = field(default_factory=dict)

    @property
    def kernel_id(self) -> int:
        return KERNEL_IDS[self.kernel]

    def call(self, x: Tensor, *args: object) -> Tensor:
        """``fused_act.<function>(x, *args, **kwargs)``: what a user writes."""
        import fused_act
        return getattr(fused_act, self.function or self.name)(x, *args, **self.kwargs)


def _plain(fwd: Callable[[Tensor], Tensor], bwd: Callable[[Tensor, Tensor], Tensor]) -> dict:
    """Reference math of an activation without beta, in the specs' uniform signatures."""
    return dict(forward=lambda x, beta: fwd(x),
                backward=lambda g, x, beta, need_dbeta: (bwd(g, x), None))


def _torch_swish(x: Tensor, beta: Beta = 1.0) -> Tensor:
    return x * (beta * x).sigmoid()


def _named(*names: str, **kwargs: object) -> dict[str, dict]:
    return dict.fromkeys(names, kwargs)


# The activation modules of the libraries models are built with: timm (layers.activations and
# its memory-efficient activations_me), transformers (activations, what ``hidden_act`` builds)
# and EfficientNet-PyTorch (utils); each listed class computes exactly this spec's function.
_TIMM, _TIMM_ME, _HF = "timm.layers.activations", "timm.layers.activations_me", \
    "transformers.activations"
_EFFNET = "efficientnet_pytorch.utils"
QUICK_GELU_BETA = 1.702  # "quick GELU" is x sigmoid(1.702 x): a Swish

SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("mish", "mish", torch_fn=F.mish, module="Mish", replaces="Mish",
         lookalikes=_named(f"{_TIMM}.Mish", f"{_TIMM_ME}.MishMe", f"{_HF}.MishActivation"),
         **_plain(reference.mish, reference.mish_backward)),
    Spec("silu", "swish", reference.swish, reference.swish_backward, F.silu, module="SiLU",
         replaces="SiLU",
         lookalikes=_named(f"{_TIMM}.Swish", f"{_TIMM_ME}.SwishMe", f"{_HF}.SiLUActivation",
                           f"{_EFFNET}.MemoryEfficientSwish")),
    Spec("swish", "swish", reference.swish, reference.swish_backward, _torch_swish, beta=True,
         module="Swish",
         lookalikes=_named(f"{_TIMM}.QuickGELU", f"{_HF}.QuickGELUActivation",
                           beta=QUICK_GELU_BETA)),
    Spec("gelu", "gelu", torch_fn=F.gelu, scale=4.0, module="GELU", replaces="GELU",
         lookalikes=_named(f"{_TIMM}.GELU", f"{_HF}.GELUActivation"),
         **_plain(reference.gelu, reference.gelu_backward)),
    Spec("gelu_tanh", "gelu_tanh", function="gelu", kwargs={"approximate": "tanh"},
         torch_fn=lambda x: F.gelu(x, approximate="tanh"), scale=4.0, module="GELU",
         replaces="GELU",
         lookalikes=_named(f"{_TIMM}.GELUTanh", f"{_HF}.GELUTanh", f"{_HF}.NewGELUActivation",
                           f"{_HF}.FastGELUActivation", f"{_HF}.AccurateGELUActivation",
                           approximate="tanh"),
         **_plain(lambda x: reference.gelu(x, "tanh"),
                  lambda g, x: reference.gelu_backward(g, x, "tanh"))),
)}

# a spec of each kernel activation, for its reference math (what ops.py runs for "reference")
KERNELS: dict[str, Spec] = {s.kernel: s for s in SPECS.values()}
if set(KERNELS) != set(KERNEL_IDS):
    raise RuntimeError(f"fused_act.registry: kernel activations {sorted(KERNEL_IDS)} and those "
                       f"of the specs {sorted(KERNELS)} differ")
