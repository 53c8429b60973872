"""Benchmarks of fused_act against PyTorch eager and torch.compile (``python -m bench``)."""
