"""How one stack's attention is masked and biased, built once per stack and call and used by every layer.

With the flash kernel (`Kernels.attention`), the spec carries the bias table and the masking arguments the
kernel reads in every layer (kernels/t5_attention.py). With the PyTorch reference, the relative bias and the
visibility mask are materialised here ONCE as one additive `(B|1, H|1, Lq, Lk)` tensor for SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kernels.t5_attention import compute_attention_mask, compute_position_bias

from .backends import Kernels
from .config import T5Config


@dataclass
class AttentionSpec:
    """What every layer of one stack needs to mask and bias one kind of attention, built once per stack.

    torch backend: `bias` is the materialised additive (B|1, H|1, Lq, Lk) bias with masked keys at the
    dtype's minimum, and `row_valid` (B, 1, Lq, 1) zeroes queries that see no key (packing padding).
    flash kernel: `kernel(q, k, v, table, **kernel_kwargs)`.
    """
    bias: torch.Tensor | None = None
    row_valid: torch.Tensor | None = None
    table: torch.Tensor | None = None
    kernel: Callable | None = None
    kernel_kwargs: dict[str, Any] | None = None


def build_attention_spec(config: T5Config, kernels: Kernels, q: torch.Tensor, *, table: torch.Tensor | None,
                         q_len: int, kv_len: int, bidirectional: bool = True, causal: bool = False,
                         key_padding_mask: torch.Tensor | None = None, prefix_lengths: torch.Tensor | None = None,
                         q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None,
                         q_offset: int = 0) -> AttentionSpec:
    """One stack's attention bias/mask, in the form `kernels.attention` wants. `q` gives device/dtype."""
    positions = dict(q_positions=q_positions, kv_positions=kv_positions, q_offset=q_offset)
    if kernels.attention is not None:
        return AttentionSpec(table=table, kernel=kernels.attention, kernel_kwargs=dict(
            bidirectional=bidirectional, num_buckets=config.relative_attention_num_buckets,
            max_distance=config.relative_attention_max_distance, scale=1.0, key_padding_mask=key_padding_mask,
            causal=causal, prefix_lengths=prefix_lengths, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, deterministic=torch.are_deterministic_algorithms_enabled(),
            **positions))
    bias = None
    if table is not None:
        bias = compute_position_bias(table, q_len, kv_len, bidirectional=bidirectional,
                                     num_buckets=config.relative_attention_num_buckets,
                                     max_distance=config.relative_attention_max_distance, **positions)
        bias = bias.to(q.dtype)
    mask = compute_attention_mask(q_len, kv_len, device=q.device, key_padding_mask=key_padding_mask,
                                  causal=causal, prefix_lengths=prefix_lengths, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, **positions)
    row_valid = None
    if mask is not None:
        # masked_fill (not +min) keeps masked scores finite, so a fully masked row never turns into NaN.
        base = bias if bias is not None else torch.zeros((), dtype=q.dtype, device=q.device)
        bias = base.masked_fill(~mask, torch.finfo(q.dtype).min)
        if q_segment_ids is not None:  # only packing padding can leave a query without any key
            row_valid = mask.any(dim=-1, keepdim=True).to(q.dtype)                      # (B, 1, Lq, 1)
    return AttentionSpec(bias=bias, row_valid=row_valid)
