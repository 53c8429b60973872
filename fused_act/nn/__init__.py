"""fused_act's ``nn.Module``s (``modules``) and the model surgery that puts them in place of
other libraries' modules (``swap``: ``replace_activations``, ``patch_gated_mlps``,
``restore_activations``)."""

from .modules import GELU, GLU, AconC, FReLU, FusedModule, GatedMLP, MetaAconC, Mish, SiLU, Swish
from .swap import (
    Left,
    Replacement,
    Swapped,
    patch_gated_mlps,
    replace_activations,
    restore_activations,
)

__all__ = ["GELU", "GLU", "AconC", "FReLU", "FusedModule", "GatedMLP", "Left", "MetaAconC",
           "Mish", "Replacement", "SiLU", "Swapped", "Swish", "patch_gated_mlps",
           "replace_activations", "restore_activations"]
