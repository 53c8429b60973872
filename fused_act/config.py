"""Run-time settings of fused_act.

``compile_mode`` decides what ``torch.compile`` sees for an op: "opaque" traces our custom op (our
fused kernel runs, and saves only its input for backward), "decompose" traces the reference math
so Inductor can fuse the activation with its neighbours (bias add, BatchNorm, residual add).  It
is one string for every op, or a dict from op name (an elementwise activation of
``registry.SPECS``, "acon_c", "frelu_max" for both of FReLU's max ops, the training one and the
eval-mode one with BatchNorm folded in, "glu", the gated activations, or "batch_norm_act",
BatchNorm + activation in training and eval) to a string, ops left out taking their default
(``Spec.compile_mode``; "opaque" for acon_c, frelu_max, glu and batch_norm_act).
The defaults are to be set per op from the compile-pipeline benchmark (bench/NOTES.md).
Changing it recompiles graphs that use the op.
"""

from .registry import SPECS

COMPILE_MODES = ("opaque", "decompose")

compile_mode: str | dict[str, str] = {}


def mode_for(op: str) -> str:
    """The compile mode in force for ``op``."""
    default = SPECS[op].compile_mode if op in SPECS else "opaque"
    mode = compile_mode.get(op, default) if isinstance(compile_mode, dict) else compile_mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"fused_act.config.compile_mode: {mode!r} for {op!r} is not one of "
                         f"{COMPILE_MODES}")
    return mode
