"""Attention with T5's learned relative position bias: the plain-PyTorch reference.

T5 (shared/reference/T5.md) uses NO 1/sqrt(d) scaling (scale = 1.0) and adds a learned bias looked
up from a `[num_buckets, heads]` table by a bucketed relative position (key position - query
position). The encoder buckets both directions, decoder self-attention only the past, and
cross-attention has no bias at all.

The reference materialises the `[B|1, H, Lq, Lk]` bias and a boolean visibility mask. The model's
"torch" backend builds both ONCE per stack and reuses them in every layer (`attention_ref_with_bias`);
the Triton flash kernel computes the same bias inside the kernel from the table.
"""
from __future__ import annotations

import math

import torch


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bucket of `relative_position = key_pos - query_pos`, as T5 defines it.

    Bidirectional: half the buckets for each sign (positive offsets in the upper half). Unidirectional:
    only the past counts (future offsets fall in bucket 0). Within a half, the first half of the buckets
    are exact distances, the rest logarithmic up to `max_distance`, clamped to the last bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only avoids log(0); those entries take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def _positions(positions: torch.Tensor | None, length: int, offset: int, device) -> torch.Tensor:
    """(B|1, L) long positions; default `offset + arange(L)`."""
    if positions is None:
        return (torch.arange(length, device=device) + offset).unsqueeze(0)
    return positions if positions.dim() == 2 else positions.unsqueeze(0)


def compute_position_bias(bias_table: torch.Tensor, q_len: int, kv_len: int, *, bidirectional: bool,
                          num_buckets: int = 32, max_distance: int = 128,
                          q_positions: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None,
                          q_offset: int = 0) -> torch.Tensor:
    """The materialised bias `(B|1, H, Lq, Lk)` from the `(num_buckets, H)` table."""
    qp = _positions(q_positions, q_len, q_offset, bias_table.device)
    kp = _positions(kv_positions, kv_len, 0, bias_table.device)
    relative = kp[:, None, :] - qp[:, :, None]                        # (B|1, Lq, Lk)
    buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    return bias_table[buckets].permute(0, 3, 1, 2)                    # (B|1, H, Lq, Lk)


def compute_attention_mask(q_len: int, kv_len: int, *, device=None, key_padding_mask=None, causal=False,
                           prefix_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                           q_positions=None, kv_positions=None, q_offset: int = 0) -> torch.Tensor | None:
    """Boolean visibility `(B|1, 1, Lq, Lk)` (True = query may attend to key), or None if all visible."""
    mask = None

    def _and(m, new):
        return new if m is None else m & new

    if causal or prefix_lengths is not None:
        qp = _positions(q_positions, q_len, q_offset, device)
        kp = _positions(kv_positions, kv_len, 0, device)
        visible = kp[:, None, :] <= qp[:, :, None]                    # (B|1, Lq, Lk)
        if prefix_lengths is not None:
            in_prefix = torch.arange(kv_len, device=device)[None, :] < prefix_lengths[:, None]  # (B, Lk)
            visible = visible | in_prefix[:, None, :]
        mask = _and(mask, visible)
    if key_padding_mask is not None:
        mask = _and(mask, key_padding_mask.bool()[:, None, :])
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = _and(mask, same & (kv_segment_ids[:, None, :] != 0))
    return None if mask is None else mask[:, None]


def attention_ref_with_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                            mask: torch.Tensor | None, scale: float = 1.0, dropout_p: float = 0.0,
                            training: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with a boolean mask; rows with no visible key give zeros.

    Softmax runs in fp32 and is cast back, as T5 implementations do.
    """
    scores = torch.matmul(q, k.transpose(-1, -2))                     # (B, H, Lq, Lk)
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1)
    if mask is not None:
        # A fully masked row softmaxes to uniform weights over masked keys; zero it (no NaN, no leak).
        probs = probs.masked_fill(~mask, 0.0)
    probs = probs.to(v.dtype)
    if dropout_p > 0.0 and training:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def t5_attention_ref(q, k, v, bias_table=None, *, bidirectional=True, num_buckets=32, max_distance=128,
                     scale=1.0, key_padding_mask=None, causal=False, prefix_lengths=None,
                     q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None,
                     q_offset=0, deterministic=False):
    """Reference for the flash kernel: same arguments, materialised bias and mask. (B, H, L, D) layout."""
    del deterministic  # the reference is always deterministic
    q_len, kv_len = q.shape[-2], k.shape[-2]
    bias = None
    if bias_table is not None:
        bias = compute_position_bias(bias_table, q_len, kv_len, bidirectional=bidirectional,
                                     num_buckets=num_buckets, max_distance=max_distance,
                                     q_positions=q_positions, kv_positions=kv_positions,
                                     q_offset=q_offset).to(q.dtype)
    mask = compute_attention_mask(q_len, kv_len, device=q.device, key_padding_mask=key_padding_mask,
                                  causal=causal, prefix_lengths=prefix_lengths, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                                  kv_positions=kv_positions, q_offset=q_offset)
    return attention_ref_with_bias(q, k, v, bias, mask, scale)
