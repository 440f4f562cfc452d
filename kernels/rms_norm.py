"""RMSNorm as T5 defines it ("T5LayerNorm"), and the fused residual-add variant.

T5 semantics (shared/reference/T5.md): no mean subtraction, no bias, variance computed in fp32,
`x * rsqrt(mean(x^2) + eps)`, cast to the weight's dtype when that is half precision, then `* weight`.

The Triton kernels and their autograd.Function are added above the references.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch RMSNorm with T5's numerics (the model's "torch" backend)."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return weight * y


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual; return rms_norm(s), s` -- the pre-norm residual stream step."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s
