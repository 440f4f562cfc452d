"""Private Triton kernels of kernels/t5_attention.py (flash attention with T5's relative position bias).

Layout and conventions shared by every kernel here:
- grid = (blocks along the length the program owns, H, B); the batch and head come from axes 1 and 2, so
  no axis ever exceeds CUDA's 65535 limit on y/z for realistic H and B.
- Scores live in the log2 domain: `s2 = (q.k) * scale * log2(e) + bias * log2(e)`, so the softmax uses
  `exp2` (one MUFU op); LSE is stored in log2 units. `ds` (the gradient of the natural-log score) is what dq, dk and dbias need.
- The bias is `REL[h, idx]`, ONE gather per score: a per-call (H, 2 * D_MAX + 1) fp32 vector of the bias
  at every clamped relative position `idx = clamp(k_pos - q_pos, -D_MAX, D_MAX) + D_MAX` (never negative;
  see docs/MACHINE_NOTES.md: a negative index corrupts the heap under the interpreter), already scaled by log2(e)
  (kernels/t5_attention.py builds it from the learned table and the bucket of every relative position).
  The bias gradient still goes by bucket: dk/dv reads `BUCKET_LUT[idx]` (a tiny int32 table from the
  reference bucket function, bit-identical to Hugging Face's fp32 log arithmetic) for the scores it reduces.
- Tiles entirely beyond +-D_MAX have ONE bias value and ONE bucket (the bucket saturates there). With
  index-ordered positions the key loop is split in three segments, far-before / near-diagonal / far-after,
  each its own loop so register allocation sees no gather in the far loops: they add a scalar bias and
  (backward) reduce the tile's dS with one sum. Only the near segment (~(2 * D_MAX + block) / block tiles
  per row) gathers and reduces by bucket. With explicit positions (packing) every tile takes the gather path.
- Visibility: row/col in range, causal `k_pos <= q_pos` (or key index < prefix length), and with
  HAS_SEG == 2 same segment and key segment != 0; HAS_SEG == 1 is key padding alone (key id != 0),
  a per-key vector that costs no [M, N] compare.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._t5_attention_tiles import (_bias_at, _block_pos_seg, _bucket_grad_by_diagonal, _dropout_scale,
                                  _program_block, _query_block, _segment_bounds, _tile_scores, _visible_range)


@triton.jit
def _dropout_mask_kernel(OUT, SEED, Lq, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The multipliers the attention kernels use, materialised (B*H, Lq, Lk) fp32: for tests only."""
    bh = tl.program_id(2)
    seed = tl.load(SEED)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    z = _dropout_scale(seed + bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
    ptrs = OUT + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :]
    tl.store(ptrs, z, mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, qpos, qseg, prefix, offs_m, kt_base, v_base, KPOS, KSEG, rel_h, stride_tb,
               BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX, bias_const, lo, hi,
               BIAS_MODE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, seed_bh, dropout_p, DROPOUT: tl.constexpr):
    """Online-softmax over key blocks [lo, hi). BIAS_MODE as in `_tile_scores`."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        kpos, kseg = _block_pos_seg(KPOS, KSEG, offs_n, Lk, 0, HAS_KPOS, HAS_SEG)
        kt = tl.load(kt_base + offs_n[None, :] * stride_kn, mask=offs_n[None, :] < Lk, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=offs_n[:, None] < Lk, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s, vis, _ = _tile_scores(tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale, offs_m[:, None],
                                 offs_n[None, :], Lq, Lk, qpos[:, None], kpos[None, :], qseg[:, None],
                                 kseg[None, :], prefix, D_MAX, rel_h, stride_tb, BUCKET_LUT, bias_const,
                                 BIAS_MODE, CAUSAL, HAS_PREFIX, HAS_SEG, False)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:   # l_i keeps the undropped sum: dropout acts on the normalised probabilities
            pv = p * _dropout_scale(seed_bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
        else:
            pv = p
        acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, REL, BUCKET_LUT, QPOS, KPOS, QSEG, KSEG, PREFIX,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_om, stride_od,
                stride_tb, stride_th, stride_qpos_b, stride_kpos_b, stride_qseg_b, stride_kseg_b,
                H, Lq, Lk, q_offset, qk_scale, D_MAX, SEED, dropout_p,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr,
                HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """One program per query block: online softmax over the key blocks; stores O and the LSE."""
    INDEX_POS: tl.constexpr = not HAS_QPOS and not HAS_KPOS
    b, h, seed_bh, start_m, offs_m = _program_block(SEED, H, BLOCK_M, CAUSAL and INDEX_POS, DROPOUT)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Lq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kt_base = K + b64 * stride_kb + h64 * stride_kh + offs_d[:, None] * stride_kd
    v_base = V + b64 * stride_vb + h64 * stride_vh + offs_d[None, :] * stride_vd

    rel_h = REL + h * stride_th   # the head's row of the (H, 2 * D_MAX + 1) bias vector
    kpos_row = KPOS + b * stride_kpos_b
    kseg_row = KSEG + b * stride_kseg_b
    qpos, qseg, prefix, lo, hi = _query_block(QPOS + b * stride_qpos_b, QSEG + b * stride_qseg_b, kpos_row, kseg_row,
                                              PREFIX, b, start_m, offs_m, Lq, Lk, q_offset, BLOCK_M, BLOCK_N, HAS_QPOS,
                                              HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not HAS_BIAS or not INDEX_POS:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, qpos, qseg, prefix, offs_m, kt_base, v_base, kpos_row, kseg_row,
                                   rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX,
                                   0.0, lo, hi, 1 if HAS_BIAS else 0, BLOCK_N, HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX,
                                   UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT)
    else:   # far-before (one bias: the first table entry), near (gathered), far-after (the last entry)
        b1, b2 = _segment_bounds(lo, hi, start_m + q_offset, start_m + BLOCK_M - 1 + q_offset, 0, 0,
                                 D_MAX, BLOCK_N, True)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, qpos, qseg, prefix, offs_m, kt_base, v_base, kpos_row, kseg_row,
                                   rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX,
                                   _bias_at(rel_h, stride_tb, BUCKET_LUT, 0), lo, b1, 2, BLOCK_N, HAS_KPOS,
                                   HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, qpos, qseg, prefix, offs_m, kt_base, v_base, kpos_row, kseg_row,
                                   rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX,
                                   0.0, b1, b2, 1, BLOCK_N, HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX,
                                   UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, qpos, qseg, prefix, offs_m, kt_base, v_base, kpos_row, kseg_row,
                                   rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX,
                                   _bias_at(rel_h, stride_tb, BUCKET_LUT, 2 * D_MAX), b2, hi, 2, BLOCK_N, HAS_KPOS,
                                   HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT)

    has_any = l_i > 0.0
    o = acc / tl.where(has_any, l_i, 1.0)[:, None]
    o_ptrs = O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=offs_m[:, None] < Lq)
    # Empty rows store 0: the backward masks them out by visibility, so any finite value works.
    lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), 0.0)
    tl.store(LSE + (b64 * H + h) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                      stride_dob, stride_doh, stride_dom, stride_dod, H, Lq,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term (fp32)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row = offs_m[:, None] < Lq
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=row, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=row, other=0.0).to(tl.float32)
    tl.store(DELTA + (b64 * H + h) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_inner(dk, dv, dbias, k, v, kpos, kseg, prefix, offs_n, start_n, q_base, do_base, lse_row, delta_row,
                QPOS, QSEG, rel_h, stride_tb, BUCKET_LUT, stride_qm, stride_dom, Lq, Lk, q_offset, qk_scale, D_MAX,
                bias_const, bucket_const, diag_shift, lo, hi,
                BIAS_MODE: tl.constexpr, BIAS_GRAD: tl.constexpr, NB_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                HAS_QPOS: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                seed_bh, dropout_p, DROPOUT: tl.constexpr, DIAGONAL: tl.constexpr):
    """dk, dv and the bias partial over query blocks [lo, hi), transposed [N, M] orientation.

    BIAS_MODE 1 (near tiles): gather the bias, and reduce dS by bucket: with DIAGONAL (every visible pair at
    relative position key index - query index + diag_shift) by diagonals, loop-free; otherwise one masked sum
    per bucket present in the tile (a nested loop). BIAS_MODE 2 (far tiles): one bias value and one bucket
    for the whole tile, one sum.
    """
    offs_mb = tl.arange(0, BLOCK_M)
    offs_bk = tl.arange(0, NB_PAD)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        qpos, qseg = _block_pos_seg(QPOS, QSEG, offs_m, Lq, q_offset, HAS_QPOS, HAS_SEG == 2)
        m_ok = offs_m[:, None] < Lq
        q = tl.load(q_base + offs_m[:, None] * stride_qm, mask=m_ok, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom, mask=m_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_row + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(delta_row + offs_m, mask=offs_m < Lq, other=0.0)
        st, vis, bucket = _tile_scores(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale,
                                       offs_m[None, :], offs_n[:, None], Lq, Lk, qpos[None, :], kpos[:, None],
                                       qseg[None, :], kseg[:, None], prefix, D_MAX, rel_h, stride_tb,
                                       BUCKET_LUT, bias_const, BIAS_MODE, CAUSAL, HAS_PREFIX, HAS_SEG,
                                       BIAS_GRAD)  # [N, M]
        pt = tl.where(vis, tl.exp2(st - lse[None, :]), 0.0)
        if DROPOUT:   # dv = (P o Z)^T dO, dP = (dO V^T) o Z; delta = rowsum(dO o O) still holds
            zt = _dropout_scale(seed_bh, offs_m[None, :], offs_n[:, None], Lk, dropout_p)
            dv += tl.dot((pt * zt).to(do.dtype), do, input_precision=INPUT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION) * zt
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=INPUT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=INPUT_PRECISION)
        if BIAS_GRAD:
            if BIAS_MODE == 1 and DIAGONAL:   # rel = const + (key row - query col)
                dbias += _bucket_grad_by_diagonal(dst, start_n - start_m + diag_shift, D_MAX, BUCKET_LUT, NB_PAD,
                                                  offs_n.shape[0], BLOCK_M)
            elif BIAS_MODE == 1:
                b_lo = tl.min(tl.where(vis, bucket, NB_PAD))
                b_hi = tl.max(tl.where(vis, bucket, -1))
                for bk in range(b_lo, b_hi + 1):
                    # Reduce along the query axis only (within a warp for the dot's layout) into a
                    # per-key-row partial; the cross-warp reduction happens once per program.
                    part = tl.sum(tl.where(bucket == bk, dst, 0.0), 1)                      # [N]
                    dbias += tl.where(offs_bk[None, :] == bk, part[:, None], 0.0)
            else:
                dbias += tl.where(offs_bk[None, :] == bucket_const, tl.sum(dst, 1)[:, None], 0.0)
    return dk, dv, dbias


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DBIAS, REL, BUCKET_LUT,
                     QPOS, KPOS, QSEG, KSEG, PREFIX,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                     stride_tb, stride_th, stride_qpos_b, stride_kpos_b, stride_qseg_b, stride_kseg_b,
                     H, Lq, Lk, q_offset, qk_scale, sm_scale, D_MAX, NUM_BUCKETS, SEED, dropout_p,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     NB_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                     DETERMINISTIC: tl.constexpr,
                     HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """One program per key block: loops over query blocks, accumulates dk, dv and the block's dbias.

    The bias gradient is reduced in registers into a [BLOCK_N, NB_PAD] partial, summed over its rows once
    and written ONCE per program: to its
    own slot of a partial buffer (deterministic; the host sums in a fixed order) or with NB_PAD atomic
    adds (fast mode). Never one atomic per score.
    """
    INDEX_POS: tl.constexpr = not HAS_QPOS and not HAS_KPOS
    b, h, seed_bh, start_n, offs_n = _program_block(SEED, H, BLOCK_N, False, DROPOUT)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_bk = tl.arange(0, NB_PAD)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    n_ok = offs_n[:, None] < Lk
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + offs_d[None, :] * stride_qd
    do_base = DO + b64 * stride_dob + h64 * stride_doh + offs_d[None, :] * stride_dod
    row_base = (b64 * H + h) * Lq
    lse_row = LSE + row_base
    delta_row = DELTA + row_base

    kpos, kseg = _block_pos_seg(KPOS + b * stride_kpos_b, KSEG + b * stride_kseg_b, offs_n, Lk, 0, HAS_KPOS, HAS_SEG)
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)

    lo = 0
    if CAUSAL and INDEX_POS:
        # Queries before position start_n see none of these keys (unless the keys lie in the prefix).
        lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
        if HAS_PREFIX:
            lo = tl.where(start_n < prefix, 0, lo)
    rel_h = REL + h * stride_th   # the head's row of the (H, 2 * D_MAX + 1) bias vector
    qpos_row = QPOS + b * stride_qpos_b
    qseg_row = QSEG + b * stride_qseg_b
    hi = Lq
    aligned = hi < 0   # False: reduce the bias gradient bucket by bucket unless the pre-pass shows alignment
    PREPASS: tl.constexpr = HAS_SEG == 2 or (CAUSAL and not INDEX_POS)
    # Two loops (diagonal / per bucket) for explicit positions, at every head dim (d = 128 with its 16 x 64 tile
    # on 8 warps: no spills, pipelined; with the older 32 x 64 tile they spilled there).
    TWO_LOOPS: tl.constexpr = HAS_BIAS and BIAS_GRAD and PREPASS and not INDEX_POS
    if PREPASS:
        lo, hi, aligned = _visible_range(lo, hi, offs_n, kpos, kseg, qpos_row, qseg_row, Lq, Lk, prefix, start_n,
                                         q_offset, BLOCK_M, False, HAS_QPOS, HAS_SEG == 2, CAUSAL, HAS_PREFIX, HAS_SEG,
                                         TWO_LOOPS)
    elif HAS_SEG == 1:   # key padding alone: every query block or, for an all-padding key block, none
        hi = tl.where(tl.max(tl.where(offs_n < Lk, kseg, 0), 0) == 0, lo, hi)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dbias = tl.zeros([BLOCK_N, NB_PAD], tl.float32)   # per key row, per bucket; summed over rows at the end
    if TWO_LOOPS:
        if aligned:   # packing's positions: the diagonal reduction, in its own (pipelined) loop
            dk, dv, dbias = _dkdv_inner(dk, dv, dbias, k, v, kpos, kseg, prefix, offs_n, start_n, q_base, do_base,
                                        lse_row, delta_row, qpos_row, qseg_row, rel_h, stride_tb, BUCKET_LUT,
                                        stride_qm, stride_dom, Lq, Lk, q_offset, qk_scale, D_MAX, 0.0, 0, 0, lo, hi,
                                        1, BIAS_GRAD, NB_PAD, BLOCK_M, HAS_QPOS, HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST,
                                        INPUT_PRECISION, seed_bh, dropout_p, DROPOUT, True)
        else:         # arbitrary positions: bucket by bucket
            dk, dv, dbias = _dkdv_inner(dk, dv, dbias, k, v, kpos, kseg, prefix, offs_n, start_n, q_base, do_base,
                                        lse_row, delta_row, qpos_row, qseg_row, rel_h, stride_tb, BUCKET_LUT,
                                        stride_qm, stride_dom, Lq, Lk, q_offset, qk_scale, D_MAX, 0.0, 0, 0, lo, hi,
                                        1, BIAS_GRAD, NB_PAD, BLOCK_M, HAS_QPOS, HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST,
                                        INPUT_PRECISION, seed_bh, dropout_p, DROPOUT, False)
    elif not HAS_BIAS or not INDEX_POS:
        dk, dv, dbias = _dkdv_inner(dk, dv, dbias, k, v, kpos, kseg, prefix, offs_n, start_n, q_base, do_base,
                                    lse_row, delta_row, qpos_row, qseg_row, rel_h, stride_tb, BUCKET_LUT, stride_qm,
                                    stride_dom, Lq, Lk, q_offset, qk_scale, D_MAX, 0.0, 0, 0, lo, hi,
                                    1 if HAS_BIAS else 0, BIAS_GRAD, NB_PAD, BLOCK_M, HAS_QPOS, HAS_SEG, CAUSAL,
                                    HAS_PREFIX, UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT, False)
    else:
        # Early query blocks see these keys at rel = k - q >= D_MAX (last table entry), late ones at <= -D_MAX.
        b1, b2 = _segment_bounds(lo, hi, q_offset, 0, start_n, start_n + BLOCK_N - 1, D_MAX, BLOCK_M,
                                 False)
        last = 2 * D_MAX
        dk, dv, dbias = _dkdv_inner(dk, dv, dbias, k, v, kpos, kseg, prefix, offs_n, start_n, q_base, do_base,
                                    lse_row, delta_row, qpos_row, qseg_row, rel_h, stride_tb, BUCKET_LUT, stride_qm,
                                    stride_dom, Lq, Lk, q_offset, qk_scale, D_MAX,
                                    _bias_at(rel_h, stride_tb, BUCKET_LUT, last), tl.load(BUCKET_LUT + last), 0, lo,
                                    b1, 2, BIAS_GRAD, NB_PAD, BLOCK_M, HAS_QPOS, HAS_SEG, CAUSAL,
                                    HAS_PREFIX, UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT, False)
        dk, dv, dbias = _dkdv_inner(dk, dv, dbias, k, v, kpos, kseg, prefix, offs_n, start_n, q_base, do_base,
                                    lse_row, delta_row, qpos_row, qseg_row, rel_h, stride_tb, BUCKET_LUT, stride_qm,
                                    stride_dom, Lq, Lk, q_offset, qk_scale, D_MAX, 0.0, 0, -q_offset, b1, b2,
                                    1, BIAS_GRAD, NB_PAD, BLOCK_M, HAS_QPOS, HAS_SEG, CAUSAL,
                                    HAS_PREFIX, UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT, True)
        dk, dv, dbias = _dkdv_inner(dk, dv, dbias, k, v, kpos, kseg, prefix, offs_n, start_n, q_base, do_base,
                                    lse_row, delta_row, qpos_row, qseg_row, rel_h, stride_tb, BUCKET_LUT, stride_qm,
                                    stride_dom, Lq, Lk, q_offset, qk_scale, D_MAX,
                                    _bias_at(rel_h, stride_tb, BUCKET_LUT, 0), tl.load(BUCKET_LUT), 0, b2, hi,
                                    2, BIAS_GRAD, NB_PAD, BLOCK_M, HAS_QPOS, HAS_SEG, CAUSAL,
                                    HAS_PREFIX, UPCAST, INPUT_PRECISION, seed_bh, dropout_p, DROPOUT, False)

    dk_ptrs = DK + b64 * stride_dkb + h64 * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b64 * stride_dvb + h64 * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)
    if BIAS_GRAD:
        dbias = tl.sum(dbias, 0)
        if DETERMINISTIC:
            slot = ((b64 * H + h) * tl.num_programs(0) + tl.program_id(0)) * NB_PAD
            tl.store(DBIAS + slot + offs_bk, dbias)
        else:
            tl.atomic_add(DBIAS + h * NB_PAD + offs_bk, dbias, mask=offs_bk < NUM_BUCKETS)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, qpos, qseg, prefix, offs_m, k_base, vt_base, KPOS, KSEG, rel_h, stride_tb,
              BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX, bias_const, lo, hi,
              BIAS_MODE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, seed_bh, dropout_p, DROPOUT: tl.constexpr):
    """dq over key blocks [lo, hi), P recomputed from the stored LSE. BIAS_MODE as in `_tile_scores`."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        kpos, kseg = _block_pos_seg(KPOS, KSEG, offs_n, Lk, 0, HAS_KPOS, HAS_SEG)
        k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=offs_n[:, None] < Lk, other=0.0)
        vt = tl.load(vt_base + offs_n[None, :] * stride_vn, mask=offs_n[None, :] < Lk, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s, vis, _ = _tile_scores(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale,
                                 offs_m[:, None], offs_n[None, :], Lq, Lk, qpos[:, None], kpos[None, :],
                                 qseg[:, None], kseg[None, :], prefix, D_MAX, rel_h, stride_tb, BUCKET_LUT,
                                 bias_const, BIAS_MODE, CAUSAL, HAS_PREFIX, HAS_SEG, False)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        if DROPOUT:
            dp = dp * _dropout_scale(seed_bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, REL, BUCKET_LUT, QPOS, KPOS, QSEG, KSEG, PREFIX,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                   stride_tb, stride_th, stride_qpos_b, stride_kpos_b, stride_qseg_b, stride_kseg_b,
                   H, Lq, Lk, q_offset, qk_scale, sm_scale, D_MAX, SEED, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr,
                   HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                   UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """One program per query block: recomputes P from the stored LSE and accumulates dq (no atomics)."""
    INDEX_POS: tl.constexpr = not HAS_QPOS and not HAS_KPOS
    b, h, seed_bh, start_m, offs_m = _program_block(SEED, H, BLOCK_M, CAUSAL and INDEX_POS, DROPOUT)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    m_ok = offs_m[:, None] < Lq
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=m_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = (b64 * H + h) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh + offs_d[None, :] * stride_kd
    vt_base = V + b64 * stride_vb + h64 * stride_vh + offs_d[:, None] * stride_vd

    rel_h = REL + h * stride_th   # the head's row of the (H, 2 * D_MAX + 1) bias vector
    kpos_row = KPOS + b * stride_kpos_b
    kseg_row = KSEG + b * stride_kseg_b
    qpos, qseg, prefix, lo, hi = _query_block(QPOS + b * stride_qpos_b, QSEG + b * stride_qseg_b, kpos_row, kseg_row,
                                              PREFIX, b, start_m, offs_m, Lq, Lk, q_offset, BLOCK_M, BLOCK_N, HAS_QPOS,
                                              HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not HAS_BIAS or not INDEX_POS:
        dq = _dq_inner(dq, q, do, lse, delta, qpos, qseg, prefix, offs_m, k_base, vt_base, kpos_row, kseg_row,
                       rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX, 0.0, lo, hi,
                       1 if HAS_BIAS else 0, BLOCK_N, HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST, INPUT_PRECISION,
                       seed_bh, dropout_p, DROPOUT)
    else:   # the forward's three segments
        b1, b2 = _segment_bounds(lo, hi, start_m + q_offset, start_m + BLOCK_M - 1 + q_offset, 0, 0,
                                 D_MAX, BLOCK_N, True)
        dq = _dq_inner(dq, q, do, lse, delta, qpos, qseg, prefix, offs_m, k_base, vt_base, kpos_row, kseg_row,
                       rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX,
                       _bias_at(rel_h, stride_tb, BUCKET_LUT, 0), lo, b1,
                       2, BLOCK_N, HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST, INPUT_PRECISION,
                       seed_bh, dropout_p, DROPOUT)
        dq = _dq_inner(dq, q, do, lse, delta, qpos, qseg, prefix, offs_m, k_base, vt_base, kpos_row, kseg_row,
                       rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX, 0.0, b1, b2,
                       1, BLOCK_N, HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST, INPUT_PRECISION,
                       seed_bh, dropout_p, DROPOUT)
        dq = _dq_inner(dq, q, do, lse, delta, qpos, qseg, prefix, offs_m, k_base, vt_base, kpos_row, kseg_row,
                       rel_h, stride_tb, BUCKET_LUT, stride_kn, stride_vn, Lq, Lk, qk_scale, D_MAX,
                       _bias_at(rel_h, stride_tb, BUCKET_LUT, 2 * D_MAX), b2, hi,
                       2, BLOCK_N, HAS_KPOS, HAS_SEG, CAUSAL, HAS_PREFIX, UPCAST, INPUT_PRECISION,
                       seed_bh, dropout_p, DROPOUT)

    dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok)
