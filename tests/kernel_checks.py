"""Checks shared by the kernel tests (not a test module itself): our kernel's error against a float64
reference, measured against the error PyTorch itself makes in the same low precision."""
import torch


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def assert_like_torch(name, ours, torch_lowp, ref64, dtype):
    """ours vs fp64 within 2x PyTorch's own error in `dtype`, plus a floor of a few fp32 ulps of the scale
    (fp32 accumulation order differs from PyTorch's; for half dtypes the 2x term dominates)."""
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = 16 * torch.finfo(torch.float32).eps * (scale + 1.0)
    err, base = _err(ours, ref64), _err(torch_lowp, ref64)
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} vs torch {dtype} error {base:.3e} (floor {floor:.1e})"


def record_kernel_calls(monkeypatch, *names: str) -> dict:
    """Make models choose wrapped Triton kernels (`models.backends.TRITON`) that record the positional
    arguments of every call: {name: [args, ...]}. The model then really runs the kernels it reports."""
    import dataclasses

    import models.backends as backends

    calls: dict = {name: [] for name in names}

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            calls[name].append(args)
            return fn(*args, **kwargs)
        return recorded

    wrapped = {name: wrap(name, getattr(backends.TRITON, name)) for name in names}
    monkeypatch.setattr(backends, "TRITON", dataclasses.replace(backends.TRITON, **wrapped))
    return calls
