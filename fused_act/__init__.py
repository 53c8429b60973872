"""fused_act: fused GPU kernels for activation functions, as drop-in torch ops and modules.

    import fused_act
    y = fused_act.mish(x)                       # also silu, swish(x, beta), gelu(x, approximate)
    y = fused_act.acon_c(x, p1, p2, beta)       # ACON-C; a (N, C) beta is Meta-ACON
    y = fused_act.frelu_max(x, t)               # FReLU's max step; saves 1 byte per element
    y = fused_act.swiglu(gate, up)              # act(gate) * up: also geglu, glu(activation=)
    fused_act.set_backend("reference")          # or "auto", "triton"; FUSED_ACT_BACKEND
    with fused_act.use_backend("triton"): ...
    model = nn.Sequential(..., fused_act.nn.Mish(), ...)
    fused_act.replace_activations(model)        # swap torch.nn / timm / transformers / paper
    fused_act.restore_activations(model)        # modules in place (BatchNorm2d -> activation
                                                # as one module), and back
"""

from . import config, deploy, distributed, nn, reference
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .functional import *  # noqa: F403  (its __all__: every public function)
from .functional import __all__ as _functions
from .nn import (
    patch_batchnorm_acts,
    patch_gated_mlps,
    replace_activations,
    restore_activations,
)

distributed.install()  # DTensor sharding rules, once torch.distributed.tensor is imported
deploy.install()  # the ops' forms in an ONNX export

__version__ = "0.1.0"

__all__ = ["BACKENDS", "config", "deploy", "get_backend", "nn", "patch_batchnorm_acts",
           "patch_gated_mlps", "reference",
           "replace_activations", "restore_activations", "set_backend", "use_backend",
           *_functions]
