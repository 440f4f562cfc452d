"""Attention with T5's learned relative position bias: Triton flash kernel and plain-PyTorch reference.

T5 (docs/T5.md) uses NO 1/sqrt(d) scaling (scale = 1.0) and adds a learned bias looked
up from a `[num_buckets, heads]` table by a bucketed relative position (key position - query
position). The encoder buckets both directions, decoder self-attention only the past, and
cross-attention has no bias at all.

Fast path `t5_attention` (kernels in kernels/_t5_attention_kernels.py): flash attention (tiled, online
softmax in fp32, LSE stored, backward recomputes P) with the bias read INSIDE the kernel, one gather per
score, from a per-call `(H, 2 * max_distance + 1)` vector of the learned table at every clamped relative
position, and the gradient of the bias table reduced per tile by bucket through a cached relative-position
-> bucket table (no L x L tensor, no atomic per score). Masks, as loop bounds plus elementwise masks:
key padding, causal, prefix-LM, packed segments with per-segment positions; a row with no visible key
gives zeros. Optional in-kernel attention dropout. Decoding: a query block against a KV cache (q_offset).
The kernels run as the custom ops `t5forge::t5_attention_fwd` / `_bwd` (kernels/_t5_attention_ops.py):
torch.compile traces a model through them without a graph break, CUDA graphs capture them; tiles are
tuned per GPU (kernels/_t5_attention_tune.py), launched by kernels/_t5_attention_launch.py.

The reference materialises the `[B|1, H, Lq, Lk]` bias and a boolean visibility mask. The model's
"torch" backend builds both ONCE per stack and reuses them in every layer (`attention_ref_with_bias`).
"""
from __future__ import annotations

import math

import torch

try:
    import triton

    from . import _t5_attention_kernels as _k
    from ._t5_attention_ops import t5_attention_op
except ImportError:  # the references below still work without triton
    triton = None
    _k = None
from ._t5_attention_launch import LOG2E as _LOG2E
from ._t5_attention_launch import Meta
from ._triton_utils import is_interpreter

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

_BUCKET_CACHE: dict[tuple, torch.Tensor] = {}


def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """int32 bucket of every relative position in [-D, D], D = max_distance (cached per configuration).

    Beyond +-max_distance the bucket saturates (the log bucket reaches the last bucket of its half), so
    clamping the relative position to [-D, D] is exact. Built with the reference bucket function so the
    kernel matches Hugging Face's fp32 log arithmetic bit for bit at bucket boundaries. The learned table
    itself is read by the kernels directly: nothing is derived from its values on the host.

    Cached in eager mode only: under torch.compile it is built in the graph (from constants: folded), and
    during CUDA-graph capture it is not cached (a tensor made there holds its values only on replay).
    """
    key = (bool(bidirectional), int(num_buckets), int(max_distance), torch.device(device))
    cacheable = not torch.compiler.is_compiling() and not (torch.cuda.is_available()
                                                           and torch.cuda.is_current_stream_capturing())
    buckets = _BUCKET_CACHE.get(key) if cacheable else None
    if buckets is None:
        rel = torch.arange(-max_distance, max_distance + 1, device=device)
        buckets = relative_position_bucket(rel, bidirectional, num_buckets, max_distance).to(torch.int32)
        buckets = buckets.contiguous()                                                 # (2D+1,)
        if cacheable:
            _BUCKET_CACHE[key] = buckets
    return buckets


def _as_rows(t: torch.Tensor, name: str, batch: int, length: int) -> torch.Tensor:
    """(L,) or (B|1, L) integer/bool tensor -> contiguous int32 (B|1, L)."""
    t = t.unsqueeze(0) if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[1] != length or t.shape[0] not in (1, batch):
        raise ValueError(f"t5_attention: {name} has shape {tuple(t.shape)}, expected ({batch}, {length}) "
                         f"or ({length},)")
    return t.to(torch.int32).contiguous()


def _draw_dropout_seed(streams: int, device) -> torch.Tensor:
    """Seed of one call's dropout mask, a (1,) int32 tensor drawn on `device` by its generator and read by the
    kernels: reproducible under torch.manual_seed, replayed by activation checkpointing (it restores the
    RNG states), no host sync, and a fresh draw on every replay of a CUDA graph (graph-safe RNG)."""
    return torch.randint(0, 2**31 - 1 - streams, (1,), device=device, dtype=torch.int32)


def _relative_bias(table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """The (H, 2 * max_distance + 1) fp32 bias at every clamped relative position, scaled by log2(e) for the
    kernels' exp2 softmax: one gather per score in-kernel. Built per call (the table changes every step),
    outside the custom op, without a graph (the table's gradient comes from the kernels)."""
    with torch.no_grad():
        return (table.detach().index_select(0, buckets).t().float() * _LOG2E).contiguous()


def _dropout_scales(batch: int, heads: int, q_len: int, kv_len: int, seed: torch.Tensor, dropout_p: float,
                    device) -> torch.Tensor:
    """The (B, H, Lq, Lk) dropout multipliers (0 or 1/(1-p)) the kernels apply for `seed`: for tests."""
    out = torch.empty((batch * heads, q_len, kv_len), dtype=torch.float32, device=device)
    grid = (triton.cdiv(q_len, 32), triton.cdiv(kv_len, 32), batch * heads)
    _k._dropout_mask_kernel[grid](out, seed, q_len, kv_len, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return out.view(batch, heads, q_len, kv_len)


def t5_attention(q, k, v, bias_table=None, *, bidirectional=True, num_buckets=32, max_distance=128,
                 scale=1.0, key_padding_mask=None, causal=False, prefix_lengths=None,
                 q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None,
                 q_offset=0, deterministic=False, dropout_p=0.0, training=False):
    """Flash attention with T5's relative position bias computed in-kernel; differentiable in q, k, v and
    `bias_table` (num_buckets, H). q: (B, H, Lq, D), k, v: (B, H, Lk, D), any strides; returns (B, H, Lq, D).

    Semantics are those of `t5_attention_ref` (see the contract in kernels/t5_attention.py's references).
    `deterministic=True` reduces the bias-table gradient through per-program partial buffers summed in a
    fixed order (bit-exact across runs); otherwise each program adds its partial with num_buckets atomics.
    dq, dk, dv never use atomics. `dropout_p` (applied when `training`, as Hugging Face T5 drops attention
    probabilities) draws its mask in-kernel from a seed drawn on q's device (no host sync).
    """
    if triton is None:
        raise RuntimeError("t5_attention: triton is not installed; use kernel_backend='torch' "
                           "(t5_attention_ref)")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"t5_attention: tensors on {q.device} need CUDA, or TRITON_INTERPRET=1 set before "
                         f"triton is imported; use kernel_backend='torch' on CPU")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"t5_attention: q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape != (B, H, Lk, D) or v.shape != k.shape:
        raise ValueError(f"t5_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, H={H}, Lk, "
                         f"D={D}) like q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"t5_attention: q, k, v must share one of float16/bfloat16/float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    others = [t for t in (k, v, bias_table, key_padding_mask, prefix_lengths, q_segment_ids, kv_segment_ids,
                          q_positions, kv_positions) if t is not None]
    if any(t.device != q.device for t in others):
        raise ValueError(f"t5_attention: every tensor must be on q's device {q.device}; got "
                         f"{sorted({str(t.device) for t in others})}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"t5_attention: head dim {D} unsupported; expected one of {SUPPORTED_HEAD_DIMS}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"t5_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if q_offset < 0:
        raise ValueError(f"t5_attention: q_offset must be >= 0, got {q_offset}")
    if bias_table is not None:
        if bias_table.shape != (num_buckets, H):
            raise ValueError(f"t5_attention: bias_table has shape {tuple(bias_table.shape)}, expected "
                             f"(num_buckets={num_buckets}, H={H})")
        max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        if max_exact < 1 or max_distance <= max_exact or (bidirectional and num_buckets % 2):
            raise ValueError(f"t5_attention: num_buckets={num_buckets}, max_distance={max_distance} is not a valid "
                             f"T5 bucketing (needs >= {4 if bidirectional else 2} buckets, even when "
                             f"bidirectional, and max_distance > {max(max_exact, 1)})")
    if Lq == 0 or Lk == 0:
        return t5_attention_ref(q, k, v, bias_table, bidirectional=bidirectional, num_buckets=num_buckets,
                                max_distance=max_distance, scale=scale, key_padding_mask=key_padding_mask,
                                causal=causal, prefix_lengths=prefix_lengths, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                                kv_positions=kv_positions, q_offset=q_offset, dropout_p=dropout_p,
                                training=training)
    meta = _make_meta(B, Lq, Lk, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance,
                      scale=scale, key_padding_mask=key_padding_mask, causal=causal, prefix_lengths=prefix_lengths,
                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                      kv_positions=kv_positions, q_offset=q_offset, deterministic=deterministic,
                      dropout_p=dropout_p if training else 0.0, streams=B * H, device=q.device)
    buckets = rel = None
    if bias_table is not None:
        buckets = _bucket_table(bidirectional, num_buckets, max_distance, q.device)
        rel = _relative_bias(bias_table, buckets)
    return t5_attention_op(q, k, v, bias_table, rel, buckets, meta)


def _make_meta(B, Lq, Lk, *, bidirectional, num_buckets, max_distance, scale, key_padding_mask, causal,
               prefix_lengths, q_segment_ids, kv_segment_ids, q_positions, kv_positions, q_offset,
               deterministic, dropout_p, streams, device) -> Meta:
    """The kernels' normalised masks and flags (also what benchmarks/kernels/compiled_report.py launches)."""
    meta = Meta(num_buckets=int(num_buckets), max_distance=int(max_distance), scale=float(scale),
                q_offset=int(q_offset), causal=bool(causal) or prefix_lengths is not None,
                deterministic=bool(deterministic))
    if dropout_p > 0.0:
        if Lq * Lk >= 2**31:
            raise ValueError(f"t5_attention: attention dropout needs Lq * Lk < 2**31 (its Philox counter), got "
                             f"{Lq} x {Lk}")
        meta.dropout_p, meta.seed = float(dropout_p), _draw_dropout_seed(streams, device)
    if q_positions is not None:
        meta.q_pos = _as_rows(q_positions, "q_positions", B, Lq)
    if kv_positions is not None:
        meta.kv_pos = _as_rows(kv_positions, "kv_positions", B, Lk)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("t5_attention: q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is not None:
        meta.q_seg = _as_rows(q_segment_ids, "q_segment_ids", B, Lq)
        meta.kv_seg = _as_rows(kv_segment_ids, "kv_segment_ids", B, Lk)
    if key_padding_mask is not None:
        # Padding is the key side of the segment rule: key id 1 (real) or 0 (never visible); with segments,
        # padded keys get id 0.
        kpm = _as_rows(key_padding_mask.bool(), "key_padding_mask", B, Lk)
        if meta.kv_seg is None:
            meta.kv_seg = kpm
        else:
            meta.kv_seg = (meta.kv_seg * kpm).contiguous()
    if prefix_lengths is not None:
        if prefix_lengths.shape != (B,):
            raise ValueError(f"t5_attention: prefix_lengths has shape {tuple(prefix_lengths.shape)}, expected ({B},)")
        meta.prefix = prefix_lengths.to(torch.int32).contiguous()
    return meta


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
                     q_offset=0, deterministic=False, dropout_p=0.0, training=False):
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
    return attention_ref_with_bias(q, k, v, bias, mask, scale, dropout_p, training)
