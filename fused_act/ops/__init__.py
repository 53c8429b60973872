"""The ops: one declared schema per family, built into custom ops with autograd by ``op.Op``.

``op.py`` is the builder (schemas, custom ops, autograd, the path of each call); ``layout.py``
how tensors reach the kernels; one file per family: ``activation.py`` (mish, swish/silu, gelu,
... as ``fused_act::activation``), ``glu.py`` (their gated forms act(gate) * up), ``acon.py``
(ACON-C, Meta-ACON), ``fp8_linear.py`` (an activation, gated or not, quantised to FP8 into
its down projection, with a straight-through backward), ``frelu.py`` (FReLU's max step and its
BatchNorm-folded eval form), ``batchnorm.py`` (BatchNorm + activation, training and eval);
``eager.py`` the C++ autograd nodes that eager calls of the activations, their gated forms,
FReLU's max and ACON-C take on CPU tensors.

Backward saves only the inputs (x and the parameters), except frelu_max, which saves a one-byte
code of which side won instead of x and t, and batch_norm_act, which saves its C-sized batch
statistics too.  Double backward (``create_graph=True``) runs the
reference's explicit backward math in eager mode; under ``torch.compile`` the opaque backward
ops have no derivative and say so.  Dense inputs of any strides (channels_last, permuted) run in
place of their memory with outputs of the same strides (the gated ops: any rows of contiguous
runs, such as the halves of a packed tensor, with contiguous outputs); other inputs are copied
once to contiguous; parameter tensors reach the kernels flat, contiguous and in opmath.
"""

from .acon import (
    ACON_C,
    acon_backward_impl,
    acon_c_backward_op,
    acon_c_op,
    acon_forward_impl,
)
from .activation import (
    ACTIVATION,
    activation_backward_op,
    activation_op,
    apply_,
    backward_impl,
    forward_impl,
)
from .batchnorm import (
    AFFINE_ACT,
    BATCH_NORM_ACT,
    affine_act_backward_op,
    affine_act_op,
    batch_norm_act_backward_op,
    batch_norm_act_op,
)
from .eager import call_entry, eager_batch_norm, run_acon, run_activation, run_glu, run_max
from .fp8_linear import act_fp8_linear, matmul_path
from .frelu import (
    FRELU_MAX,
    FRELU_MAX_AFFINE,
    frelu_backward_impl,
    frelu_forward_impl,
    frelu_max_affine_backward_impl,
    frelu_max_affine_backward_op,
    frelu_max_affine_impl,
    frelu_max_affine_op,
    frelu_max_backward_op,
    frelu_max_op,
)
from .glu import GATED, glu_backward_impl, glu_backward_op, glu_forward_impl, glu_op
from .layout import dense, flat_param, is_dense, like, row_stride, row_walk
from .op import Op, Schema, reference_math
from .quant import act_quant, act_quant_op, run_act_quant

FAMILIES: tuple[Op, ...] = (ACTIVATION, GATED, ACON_C, FRELU_MAX, FRELU_MAX_AFFINE, AFFINE_ACT,
                            BATCH_NORM_ACT)

__all__ = [
    "ACON_C", "ACTIVATION", "AFFINE_ACT", "BATCH_NORM_ACT", "FAMILIES", "FRELU_MAX",
    "FRELU_MAX_AFFINE", "GATED", "Op", "Schema",
    "act_fp8_linear", "act_quant", "act_quant_op", "acon_backward_impl", "acon_c_backward_op",
    "acon_c_op",
    "acon_forward_impl",
    "affine_act_backward_op", "affine_act_op", "batch_norm_act_backward_op", "batch_norm_act_op",
    "activation_backward_op", "activation_op", "apply_", "backward_impl", "run_act_quant",
    "call_entry", "eager_batch_norm", "run_acon", "run_activation", "run_glu", "run_max", "dense",
    "flat_param", "forward_impl", "frelu_backward_impl", "frelu_forward_impl",
    "frelu_max_affine_backward_impl", "frelu_max_affine_backward_op", "frelu_max_affine_impl",
    "frelu_max_affine_op", "frelu_max_backward_op", "frelu_max_op",
    "glu_backward_impl", "glu_backward_op", "glu_forward_impl", "glu_op",
    "is_dense", "like", "matmul_path", "reference_math", "row_stride", "row_walk"]
