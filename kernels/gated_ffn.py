"""T5's feed-forward block: v1.0 `wo(relu(wi x))` and v1.1 gated-GELU `wo(gelu_tanh(wi_0 x) * wi_1 x)`.

The gated form keeps `wi_0` and `wi_1` as ONE concatenated weight `wi = cat([wi_0, wi_1], 0)` of shape
(2 * d_ff, d_model) so both projections run as a single matmul; checkpoints keep the Hugging Face names
and models/checkpoint.py splits and merges them.

The Triton kernels and their autograd.Function are added above the references.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _act_ref(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"unknown FFN activation {activation!r}; expected 'gelu_tanh' or 'relu'")


def gelu_tanh_gate_ref(h: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(a) * b` for `h = [a | b]` split in halves along the last dim."""
    a, b = h.chunk(2, dim=-1)
    return F.gelu(a, approximate="tanh") * b


def ffn_ref(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, *, gated: bool,
            activation: str = "gelu_tanh", dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Plain-PyTorch FFN (the model's "torch" backend). Dropout sits before `wo`, as in Hugging Face."""
    h = F.linear(x, wi)
    if gated:
        a, b = h.chunk(2, dim=-1)
        h = _act_ref(a, activation) * b
    else:
        h = _act_ref(h, activation)
    if dropout_p > 0.0 and training:
        h = F.dropout(h, p=dropout_p, training=True)
    return F.linear(h.to(wo.dtype), wo)
