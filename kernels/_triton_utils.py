"""Helpers shared by the Triton kernels: the import guard, interpreter detection, launch sizing.

Triton is optional: without it (or on a CPU without TRITON_INTERPRET=1) the kernel modules still import,
their `*_ref` functions work, and `why_triton_cannot_run(device)` is the one place that says whether the
kernels can run on a device (models/backends.py decides the model's kernels with it).
"""
from __future__ import annotations

import functools
import os
import types

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the references still work; kernels raise if called
    HAS_TRITON = False

    def _identity_decorator(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    # Enough of triton's surface for the kernel modules to be *defined* (never run) without triton.
    triton = types.SimpleNamespace(jit=_identity_decorator, heuristics=lambda *_a, **_k: _identity_decorator,
                                   autotune=lambda *_a, **_k: _identity_decorator, Config=dict,
                                   cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = types.SimpleNamespace(constexpr=object)


@triton.jit
def cast_to(x, DTYPE: tl.constexpr, RNE_BF16: tl.constexpr):
    """`x.to(DTYPE)`, rounding to nearest even for bf16 when RNE_BF16 (pass `is_interpreter()`).

    The interpreter converts fp32 -> bf16 by truncation (seen with triton 3.9, `fp_downcast_rounding`
    ignored), one bf16 ulp off where the GPU rounds to nearest; emulate the rounding there on the bits.
    """
    if RNE_BF16:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# Triton reads TRITON_INTERPRET when it is imported (docs/MACHINE_NOTES.md), so it is read once here too:
# a constant that torch.compile folds instead of guarding on the environment.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1 set before triton was imported)."""
    return _INTERPRETER


def why_triton_cannot_run(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device`; otherwise the reason, as one clause."""
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and _INTERPRETER):
        return None
    return (f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
            f"imported (got device {device})")


def triton_available(t: torch.Tensor) -> bool:
    """Can the Triton kernels run on tensor `t`'s device?"""
    return why_triton_cannot_run(t.device) is None


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """One clear line when the Triton path is called where it cannot run."""
    if not HAS_TRITON:
        raise RuntimeError(f"kernels/{name}: triton is not installed; use the *_ref function or "
                           "kernel_backend='torch'")
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"kernels/{name}: all tensors must be on one device, got {dev} and {t.device}")
    why = why_triton_cannot_run(dev)
    if why is not None:
        raise ValueError(f"kernels/{name}: {why}")


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_persistent(device: torch.device, work_items: int, per_sm: int = 2) -> int:
    """Grid size of a persistent kernel: a fixed number per device (so reductions are deterministic).

    Under the interpreter programs run one after another, so a handful keeps the loop structure exercised
    without paying for many partial rows.
    """
    if device.type == "cuda":
        cap = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    else:
        cap = 4
    return max(1, min(cap, work_items))
