"""Kernel benchmarks: ours vs eager PyTorch vs torch.compile (and attention baselines)."""
