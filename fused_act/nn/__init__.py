"""fused_act's ``nn.Module``s (``modules``) and the model surgery that puts them in place of
other libraries' modules (``swap``: ``replace_activations``, ``patch_gated_mlps``,
``patch_batchnorm_acts``, ``restore_activations``)."""

from .modules import *  # noqa: F403  (its __all__: every module class, generated ones too)
from .modules import __all__ as _modules
from .swap import (
    Left,
    Replacement,
    Swapped,
    patch_batchnorm_acts,
    patch_gated_mlps,
    replace_activations,
    restore_activations,
)

__all__ = [*_modules, "Left", "Replacement", "Swapped", "patch_batchnorm_acts", "patch_gated_mlps",
           "replace_activations", "restore_activations"]
