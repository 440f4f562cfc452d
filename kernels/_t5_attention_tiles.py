"""Tile-level helpers of the attention kernels in kernels/_t5_attention_kernels.py (its docstring gives the
layout and conventions): positions and segments of a block, scores with bias and visibility, the mask
pre-pass that turns masks into loop bounds, the far / near / far segments, a program's block, and the
bias-gradient reduction by diagonals.
"""
from __future__ import annotations

import triton
import triton.language as tl

_BIG = tl.constexpr(1 << 30)  # "no segment / position" sentinel for masked min/max reductions


@triton.jit
def _block_pos_seg(POS, SEG, offs, L, pos_offset, HAS_POS: tl.constexpr, LOAD_SEG: tl.constexpr):
    """Positions and segment ids of the query or key indices `offs` (POS/SEG: the batch's row).

    Without explicit positions a position is the index plus `pos_offset` (q_offset for queries, 0 for
    keys). Without loaded ids `seg` is the index itself, a placeholder only compile-time-dead code reads.
    """
    if HAS_POS:
        pos = tl.load(POS + offs, mask=offs < L, other=0)
    else:
        pos = offs + pos_offset
    seg = offs
    if LOAD_SEG:
        seg = tl.load(SEG + offs, mask=offs < L, other=0)
    return pos, seg


@triton.jit
def _tile_scores(s, qi, kj, Lq, Lk, qpos, kpos, qseg, kseg, prefix, D_MAX, rel_h, stride_tb, BUCKET_LUT, bias_const,
                 BIAS_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_SEG: tl.constexpr,
                 NEED_BUCKET: tl.constexpr):
    """The tile's scores `s` (log2 units) plus the bias, their visibility, and their buckets (BIAS_MODE 1 and
    NEED_BUCKET; otherwise the unread relative index), from broadcastable query-side (qi, qpos, qseg) and
    key-side operands.

    BIAS_MODE 0: no bias, 1: gathered at the relative position clamped to [-D_MAX, D_MAX] and shifted to
    be >= 0 (never a negative index), 2: `bias_const` (a far segment). Callers pass row/column-expanded
    vectors, so the same code serves the [M, N] orientation and the transposed [N, M] one of the dk/dv
    kernel. Mask and bias in one helper: under the interpreter every device-function call re-patches
    triton.language, which dominates the test time.
    """
    vis = (qi < Lq) & (kj < Lk)
    if CAUSAL:
        ok = kpos <= qpos
        if HAS_PREFIX:
            ok = ok | (kj < prefix)
        vis = vis & ok
    if HAS_SEG == 2:
        vis = vis & (qseg == kseg) & (kseg != 0)
    elif HAS_SEG == 1:    # key padding only: a [1, N] (or [N, 1]) vector, no query-side compare
        vis = vis & (kseg != 0)
    idx = tl.minimum(tl.maximum(kpos - qpos, -D_MAX), D_MAX) + D_MAX
    bucket = idx
    if BIAS_MODE == 1:
        s += tl.load(rel_h + idx * stride_tb)   # ONE gather per score; the bucket only for the gradient
        if NEED_BUCKET:
            bucket = tl.load(BUCKET_LUT + idx)
    elif BIAS_MODE == 2:
        s += bias_const
    return s, vis, bucket


@triton.jit
def _tile_is_empty(offs_m, offs_n, Lq, Lk, qpos, kpos, qseg, kseg, prefix, start_n,
                   CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_SEG: tl.constexpr):
    """True when no (query, key) pair of the tile can be visible: disjoint segment ranges, an all-padding
    key block, or (causal) every key position after every query position. Works for arbitrary positions
    and segment orders (it checks ranges, it assumes no sorting); packed rows skip most off-diagonal tiles.
    """
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    empty = tl.max(n_ok.to(tl.int32), 0) == 0
    if HAS_SEG == 1:
        empty = empty | (tl.max(tl.where(n_ok, kseg, 0), 0) == 0)
    if HAS_SEG == 2:
        q_lo = tl.min(tl.where(m_ok, qseg, _BIG), 0)
        q_hi = tl.max(tl.where(m_ok, qseg, -1), 0)
        k_real = n_ok & (kseg != 0)
        k_lo = tl.min(tl.where(k_real, kseg, _BIG), 0)
        k_hi = tl.max(tl.where(k_real, kseg, -1), 0)
        empty = empty | (k_hi < 0) | (q_hi < k_lo) | (k_hi < q_lo)
    if CAUSAL:
        q_last = tl.max(tl.where(m_ok, qpos, -_BIG), 0)
        k_first = tl.min(tl.where(n_ok, kpos, _BIG), 0)
        after = k_first > q_last
        if HAS_PREFIX:
            after = after & (start_n >= prefix)
        empty = empty | after
    return empty


@triton.jit
def _visible_range(lo, hi, offs_o, pos_o, seg_o, POS_I, SEG_I, Lq, Lk, prefix, start_k, pos_offset_i,
                   BLOCK: tl.constexpr, KEYS_INNER: tl.constexpr, HAS_POS_I: tl.constexpr, LOAD_SEG_I: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_SEG: tl.constexpr,
                   CHECK_ALIGNED: tl.constexpr):
    """[first, end): the inner blocks of [lo, hi) from the first to the last one holding a visible pair with the
    program's outer block (offs_o, pos_o, seg_o); an empty range when none does. Third result (CHECK_ALIGNED,
    dk/dv with explicit positions): whether every same-segment pair lies at relative position
    `key index - query index` (positions restart per contiguous segment, as packing makes them), which lets
    dk/dv reduce the bias gradient by diagonals.

    The masks become loop bounds: this cheap pre-pass reads only positions and segment ids (no K, V, no
    dot), so the main loop over [first, end) has no per-tile branch and triton pipelines its loads; tiles
    inside the range that are partly (or, with holes, wholly) masked are masked elementwise. KEYS_INNER:
    the inner blocks are key blocks (forward, dq), otherwise query blocks (dk/dv, keys `offs_o` from
    `start_k`). FlexAttention's block mask, computed per program instead of stored.
    """
    offs_b = tl.arange(0, BLOCK)
    first = hi
    end = lo
    aligned = lo == lo
    for start in range(lo, hi, BLOCK):
        offs_i = start + offs_b
        if KEYS_INNER:
            pos_i, seg_i = _block_pos_seg(POS_I, SEG_I, offs_i, Lk, pos_offset_i, HAS_POS_I, LOAD_SEG_I)
            empty = _tile_is_empty(offs_o, offs_i, Lq, Lk, pos_o, pos_i, seg_o, seg_i, prefix, start, CAUSAL,
                                   HAS_PREFIX, HAS_SEG)
        else:
            pos_i, seg_i = _block_pos_seg(POS_I, SEG_I, offs_i, Lq, pos_offset_i, HAS_POS_I, LOAD_SEG_I)
            empty = _tile_is_empty(offs_i, offs_o, Lq, Lk, pos_i, pos_o, seg_i, seg_o, prefix, start_k, CAUSAL,
                                   HAS_PREFIX, HAS_SEG)
            if CHECK_ALIGNED:   # [keys, queries]: pairs that can be visible must share pos - index
                pair = (offs_o[:, None] < Lk) & (offs_i[None, :] < Lq)
                if HAS_SEG == 2:
                    pair = pair & (seg_o[:, None] == seg_i[None, :]) & (seg_o[:, None] != 0)
                shift = (pos_o - offs_o)[:, None] - (pos_i - offs_i)[None, :]
                aligned = aligned & (tl.max(tl.where(pair, tl.abs(shift), 0)) == 0)
        first = tl.where(empty, first, tl.minimum(first, start))
        end = tl.where(empty, end, start + BLOCK)
    return first, tl.maximum(end, first), aligned


@triton.jit
def _bias_at(rel_h, stride_tb, BUCKET_LUT, idx):
    """The head's bias (log2 units, fp32) at relative index `idx`: the one bias of a far segment."""
    return tl.load(rel_h + idx * stride_tb)


@triton.jit
def _dropout_scale(seed_bh, qi, kj, Lk, dropout_p):
    """Attention-dropout multiplier per (query, key): 1 / (1 - p) where kept, 0 where dropped.

    Counter-based (Philox via tl.rand): the stream of (batch, head) is `seed_bh`, the counter the score's
    flat index `q * Lk + k`, so forward, dk/dv and dq regenerate the same mask in any tile orientation
    without storing it.
    """
    r = tl.rand(seed_bh, qi * Lk + kj)
    return tl.where(r >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _segment_bounds(lo, hi, q_first, q_last, k_first_off, k_last_off, D_MAX, BLOCK: tl.constexpr,
                    KEYS_INNER: tl.constexpr):
    """[lo, b1) / [b1, b2) / [b2, hi): the far / near / far segments of the inner loop, block aligned.

    KEYS_INNER (forward, dq): the loop runs over key blocks n for query positions [q_first, q_last]; a key
    block is far-before when n + BLOCK - 1 - q_first <= -D_MAX and far-after when n - q_last >= D_MAX.
    Otherwise (dk/dv): the loop runs over query blocks m (position m + q_first .. m + BLOCK - 1 + q_first)
    for keys [k_first_off, k_last_off]; small m lie far-after (rel >= D_MAX), large m far-before.
    Divisions only see non-negative numerators (C semantics, docs/MACHINE_NOTES.md).
    """
    if KEYS_INNER:
        near_lo = tl.maximum(q_first - D_MAX - BLOCK + 2, 0)
        near_hi = tl.maximum(q_last + D_MAX, 0)
    else:
        near_lo = tl.maximum(k_first_off - BLOCK + 2 - q_first - D_MAX, 0)
        near_hi = tl.maximum(k_last_off - q_first + D_MAX, 0)
    b1 = tl.minimum(tl.maximum((near_lo + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    b2 = tl.minimum(tl.maximum((near_hi + BLOCK - 1) // BLOCK * BLOCK, b1), hi)
    return b1, b2


@triton.jit
def _program_block(SEED, H, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr, DROPOUT: tl.constexpr):
    """A program's batch and head (grid axes 2 and 1), its dropout stream (the call's seed, drawn on the
    device, read from SEED), and the first row and rows of the block it owns along axis 0. LAST_FIRST
    launches the last block first (causal, index-ordered positions: the last query blocks see the most keys)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    seed_bh = 0
    if DROPOUT:
        seed_bh = tl.load(SEED) + b * H + h   # one dropout stream per (batch, head)
    if LAST_FIRST:
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid = tl.program_id(0)
    start = pid * BLOCK
    return b, h, seed_bh, start, start + tl.arange(0, BLOCK)


@triton.jit
def _query_block(QPOS, QSEG, KPOS, KSEG, PREFIX, b, start_m, offs_m, Lq, Lk, q_offset, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """What a forward or dq program needs of its query block besides the tiles: the rows' positions and
    segments, the batch's prefix length, and the key blocks [lo, hi) of its loop (causal with index-ordered
    positions: up to just past the block's last query position, or past the prefix when that is longer;
    with padding, segments or explicit causal positions, trimmed by `_visible_range`)."""
    qpos, qseg = _block_pos_seg(QPOS, QSEG, offs_m, Lq, q_offset, HAS_QPOS, HAS_SEG == 2)
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    hi = Lk
    if CAUSAL and not HAS_QPOS and not HAS_KPOS:
        hi = tl.minimum(Lk, q_offset + start_m + BLOCK_M)
        if HAS_PREFIX:
            hi = tl.maximum(hi, tl.minimum(prefix, Lk))
    lo = 0
    if HAS_SEG or (CAUSAL and (HAS_QPOS or HAS_KPOS)):
        lo, hi, _ = _visible_range(0, hi, offs_m, qpos, qseg, KPOS, KSEG, Lq, Lk, prefix, 0, 0, BLOCK_N, True,
                                   HAS_KPOS, HAS_SEG != 0, CAUSAL, HAS_PREFIX, HAS_SEG, False)
    return qpos, qseg, prefix, lo, hi


@triton.jit
def _bucket_grad_by_diagonal(dst, c, D_MAX, BUCKET_LUT, NB_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_M: tl.constexpr):
    """The [BLOCK_N, NB_PAD] bias-gradient partial of one near [N, M] dS tile with index-ordered positions,
    where key row j and query column i lie at relative position c + j - i: the tile is sheared (one
    register gather) so that each diagonal becomes a column, the columns are summed (one reduction: the
    gradient per relative position), and those DIAGS sums are mapped to buckets with a one-hot sum. Row 0
    holds the result, the other rows zeros (the caller sums its partial over rows once per program).
    Branch-free and loop-free: the dk/dv tile loop stays the innermost loop, which triton pipelines.
    Invisible scores need no mask here: their dS is 0.
    """
    DIAGS: tl.constexpr = 2 * BLOCK_N if BLOCK_N >= BLOCK_M else 2 * BLOCK_M   # a power of 2 >= M + N - 1
    rows = tl.arange(0, BLOCK_N)
    u = tl.arange(0, DIAGS)                                  # diagonal j - i = u - (M - 1)
    row = u[:, None] + tl.arange(0, BLOCK_M)[None, :] - (BLOCK_M - 1)   # [DIAGS, M]: the key row on it
    on = (row >= 0) & (row < BLOCK_N)
    sheared = tl.where(on, tl.gather(dst, tl.minimum(tl.maximum(row, 0), BLOCK_N - 1), 0), 0.0)
    per_rel = tl.sum(sheared, 1)                             # [DIAGS]
    idx = tl.minimum(tl.maximum(c + u - (BLOCK_M - 1), -D_MAX), D_MAX) + D_MAX
    bucket = tl.load(BUCKET_LUT + idx)
    offs_bk = tl.arange(0, NB_PAD)
    per_bucket = tl.sum(tl.where(bucket[:, None] == offs_bk[None, :], per_rel[:, None], 0.0), 0)    # [NB_PAD]
    return tl.where(rows[:, None] == 0, per_bucket[None, :], 0.0)
