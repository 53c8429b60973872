"""Test set-up: Triton's interpreter runs the kernels on the CPU when there is no GPU.

TRITON_INTERPRET is read when a kernel is first decorated, so it is set here, before any test
imports fused_act's kernels.  On a GPU machine the GPU tests run with ``pytest -m cuda`` and the
CPU ones with ``TRITON_INTERPRET=1 pytest``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Backend "cuda" runs CUDA tensors only and backend "cpu" CPU tensors only: their
    combinations with the other device are not tests."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        other = bool(params) and (params.get("backend_name"), params.get("device")) in (
            ("cuda", "cpu"), ("cpu", "cuda"))
        (drop if other else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
