"""Triton kernels of fused_act, installed as ``fused_act.triton_kernels``."""
