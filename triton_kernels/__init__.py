"""Triton kernels of fused_act, installed as ``fused_act.triton_kernels``.

They import nothing from the host package: the host lays tensors out, chooses the plan and
finishes partial sums (``fused_act/ops/``, ``fused_act/plan.py``); ``TritonKernels`` is the
launchers as ``fused_act.kernels.Kernels`` names them.
"""

from . import acon, batchnorm, elementwise, frelu, gated, quant


class TritonKernels:
    """``fused_act.kernels.Kernels`` by Triton (each launcher's docstring: its module's)."""

    act_forward = staticmethod(elementwise.forward)
    act_backward = staticmethod(elementwise.backward)
    acon_forward = staticmethod(acon.forward)
    acon_backward = staticmethod(acon.backward)
    max_forward = staticmethod(frelu.forward)
    max_backward = staticmethod(frelu.backward)
    max_affine = staticmethod(frelu.forward_affine)
    glu_forward = staticmethod(gated.forward)
    glu_backward = staticmethod(gated.backward)
    stats = staticmethod(batchnorm.stats)
    affine_act_forward = staticmethod(batchnorm.affine_act_forward)
    affine_act_backward = staticmethod(batchnorm.affine_act_backward)
    act_quant = staticmethod(quant.act_quant)
