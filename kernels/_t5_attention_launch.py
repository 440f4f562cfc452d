"""Launchers of the attention kernels (kernels/_t5_attention_kernels.py): tiles, arguments, outputs.

Private to kernels/t5_attention.py: `forward` and `backward` allocate their outputs, read nothing on the
host from a device tensor and cache no tensor, so kernels/_t5_attention_ops.py can register them as
PyTorch custom ops that torch.compile and CUDA graphs take as single nodes. Tiles: `_blocks` gives the
default of each kernel, kernels/_t5_attention_tune.py may replace it per GPU and shape (autotuning).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _t5_attention_tune as tune
from ._triton_utils import is_interpreter

try:
    import triton

    from . import _t5_attention_kernels as _k
except ImportError:  # kernels/t5_attention.py refuses the fast path without triton
    triton = None
    _k = None

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class _Blocks:
    fwd_m: int
    fwd_n: int
    bwd_m: int    # dk/dv kernel: query block it iterates over
    bwd_n: int    # dk/dv kernel: key block it owns
    dq_m: int
    dq_n: int
    fwd_warps: int
    bwd_warps: int
    dq_warps: int
    num_stages: int

    def tile(self, kernel: str) -> tune.Tile:
        """The default tile of one kernel ("fwd", "dkdv", "dq")."""
        m, n, w = {"fwd": (self.fwd_m, self.fwd_n, self.fwd_warps), "dkdv": (self.bwd_m, self.bwd_n, self.bwd_warps),
                   "dq": (self.dq_m, self.dq_n, self.dq_warps)}[kernel]
        return tune.Tile(m, n, w, self.num_stages)


# Tile edge under TRITON_INTERPRET=1: small enough that ragged test lengths span several tiles, large
# enough that the interpreter's per-tile overhead stays low (tests may lower it to 16).
_INTERPRET_BLOCK = 32


def _blocks(head_dim: int, q_len: int, gather_everywhere: bool, fp32: bool = False) -> _Blocks:
    """Default tile sizes per kernel (what runs under the interpreter, during CUDA-graph capture before a
    tuned choice exists, in deterministic mode, and what autotuning starts from).

    Chosen from the sm_90 register report of AOT-compiled kernels (triton 3.9 + its ptxas, see
    tests/test_kernels_attention_compile.py): tiles whose kernels do not spill for d=64 under every mask
    kind (padding, causal, prefix, packing), and spill least for d=128 (benchmarks/kernels/compiled_report.py
    shows them per kernel). `fp32` inputs (exact fp32 dots: operands in registers, not a training path) keep
    32-key steps in the forward and dq, which spill kilobytes at 64.
    """
    if is_interpreter():
        n = _INTERPRET_BLOCK
        return _Blocks(n, n, n, n, n, n, 1, 1, 1, 1)
    # A short query block (decoding: Lq = 1) must not pay for 128 rows; tl.dot needs >= 16.
    short = max(16, triton.next_power_of_2(q_len))
    # (BLOCK_M, BLOCK_N, num_warps).
    # 64-key steps at d <= 64: one accumulator rescale per 64 scores, not per 32 (sm_90 report: ~12-21% fewer
    # instructions per score, 172-178 registers, no spills, pipelined).
    wide = head_dim <= 64 and not fp32
    if wide:
        fwd = (min(128, short), 64, 8 if short >= 64 else 4)   # decode steps: one 16-row tile, 4 warps
    elif not gather_everywhere:
        fwd = (min(128, short), 32, 8 if short >= 64 else 4)
    else:
        fwd = (min(64, short), 32, 4)
    # dk/dv: 128 keys on 8 warps, so each warpgroup owns 64 distinct key rows of the score tile (a 64-key tile
    # on 8 warps has warpsPerCTA [8, 1] on 64 rows: both warpgroups computed the same S and dP, twice the
    # MUFU and wgmma per score); 16 queries per step keeps it at ~227 registers without spills (d <= 64).
    # d = 128: 16 x 64 on 8 warps, warpsPerCTA [4, 2] (each warpgroup half of dk / dv's 128 columns): 229-252
    # registers, no spills in any variant (32 x 64 spilled 16-104 B, 16 x 128 96 B, 16 warps 280+ B).
    dkdv = (16, 128, 8) if head_dim <= 64 else (16, 64, 8)
    # dq at d = 128: 128 x 32 on 8 warps is on wgmma (32-row tiles fell back to mma.sync), 163-172 registers.
    dq = (128, 64 if wide else 32, 8) if head_dim <= 64 or not fp32 else (32, 32, 4)
    return _Blocks(fwd[0], fwd[1], dkdv[0], dkdv[1], dq[0], dq[1], fwd[2], dkdv[2], dq[2], num_stages=2)


@dataclass
class Meta:
    """Normalised masks/positions (int32, (B|1, L) with batch stride 0 when broadcast) and flags."""
    num_buckets: int
    max_distance: int
    scale: float
    q_offset: int
    causal: bool
    deterministic: bool
    dropout_p: float = 0.0   # > 0 only when training with attention dropout
    seed: torch.Tensor | None = None   # (1,) int32 on the device: base of the per-(batch, head) Philox streams
    q_pos: torch.Tensor | None = None
    kv_pos: torch.Tensor | None = None
    q_seg: torch.Tensor | None = None
    kv_seg: torch.Tensor | None = None
    prefix: torch.Tensor | None = None


def _b_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.shape[0] == 1 else t.stride(0)


def _flags(q, meta: Meta, rel) -> dict:
    """The constexpr flags every kernel takes (besides its tile)."""
    interp_bf16 = is_interpreter() and q.dtype == torch.bfloat16
    return dict(HEAD_DIM=q.shape[-1], HAS_BIAS=rel is not None,
                HAS_QPOS=meta.q_pos is not None, HAS_KPOS=meta.kv_pos is not None,
                # 0: no segments/padding, 1: key padding only, 2: segment ids on both sides.
                HAS_SEG=0 if meta.kv_seg is None else (1 if meta.q_seg is None else 2),
                CAUSAL=meta.causal, HAS_PREFIX=meta.prefix is not None,
                # The interpreter's bf16 tl.dot is broken (docs/MACHINE_NOTES.md): upcast tiles to fp32 there.
                UPCAST=interp_bf16,
                # fp32 inputs get true fp32 dots (torch's matmul default), not TF32.
                INPUT_PRECISION="ieee" if q.dtype == torch.float32 or interp_bf16 else "tf32",
                DROPOUT=meta.dropout_p > 0.0)


def _common(q, meta: Meta, rel):
    """Arguments shared by every kernel (after the tensors), the dropout seed pointer, and the flags."""
    dummy = q.new_empty(1, dtype=torch.int32)
    tensors = [meta.q_pos if meta.q_pos is not None else dummy, meta.kv_pos if meta.kv_pos is not None else dummy,
               meta.q_seg if meta.q_seg is not None else dummy, meta.kv_seg if meta.kv_seg is not None else dummy,
               meta.prefix if meta.prefix is not None else dummy]
    strides = [rel.stride(1) if rel is not None else 0, rel.stride(0) if rel is not None else 0,
               _b_stride(meta.q_pos), _b_stride(meta.kv_pos),
               _b_stride(meta.q_seg), _b_stride(meta.kv_seg)]
    return tensors, strides, (meta.seed if meta.seed is not None else dummy), _flags(q, meta, rel)


def _defaults(q, meta: Meta) -> _Blocks:
    return _blocks(q.shape[-1], q.shape[2], meta.q_pos is not None or meta.kv_pos is not None,
                   q.dtype == torch.float32)


def _tile(kernel: str, q, k, meta: Meta, flags: dict, launch) -> tune.Tile:
    """The tile one kernel runs with: the default, or the tuned one for this GPU and shape (see tune.choose)."""
    key = tune.Key(kernel, q.dtype, q.shape[-1], q.shape[2], k.shape[2], tuple(sorted(flags.items())))
    return tune.choose(key, _defaults(q, meta).tile(kernel), launch, q.device, deterministic=meta.deterministic)


def forward(q, k, v, rel, buckets, meta: Meta):
    """(o, lse): o (B, H, Lq, D) on (B, Lq, H, D) storage (the model's merge of heads is a free reshape),
    lse (B, H, Lq) fp32 in log2 units."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    tensors, strides, seed, flags = _common(q, meta, rel)

    def launch(t: tune.Tile):
        _k._fwd_kernel[(triton.cdiv(Lq, t.m), H, B)](
            q, k, v, o, lse, rel if rel is not None else lse, buckets if buckets is not None else lse, *tensors,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *strides,
            H, Lq, Lk, meta.q_offset, meta.scale * LOG2E, meta.max_distance, seed, meta.dropout_p,
            **flags, BLOCK_M=t.m, BLOCK_N=t.n, num_warps=t.warps, num_stages=t.stages)

    launch(_tile("fwd", q, k, meta, flags, launch))
    return o, lse


def backward(do, q, k, v, o, lse, rel, buckets, meta: Meta, bias_grad: bool):
    """(dq, dk, dv, dtable): dtable (num_buckets, H) fp32 when `bias_grad`, else None."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    delta = torch.empty_like(lse)
    # Memory-bound row sums: small tiles, no register pressure.
    delta_m = min(_defaults(q, meta).dq_m, 64)
    _k._bwd_delta_kernel[(triton.cdiv(Lq, delta_m), H, B)](
        o, do, delta, *o.stride(), *do.stride(), H, Lq, HEAD_DIM=D, BLOCK_M=delta_m)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    nb_pad = triton.next_power_of_2(meta.num_buckets)
    tab = rel if rel is not None else lse           # never read without HAS_BIAS
    bkt = buckets if buckets is not None else lse
    tensors, strides, seed, flags = _common(q, meta, rel)
    deterministic = bias_grad and meta.deterministic
    dbias = [None]

    def launch_dkdv(t: tune.Tile):
        n_kv_blocks = triton.cdiv(Lk, t.n)
        if deterministic:   # one slot per program, every slot written: summed below in a fixed order
            dbias[0] = torch.empty((B, H, n_kv_blocks, nb_pad), dtype=torch.float32, device=q.device)
        else:               # atomics: zeroed for every launch (autotuning launches several)
            dbias[0] = torch.zeros((H, nb_pad), dtype=torch.float32, device=q.device)
        _k._bwd_dkdv_kernel[(n_kv_blocks, H, B)](
            q, k, v, do, lse, delta, dk, dv, dbias[0], tab, bkt, *tensors,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *strides,
            H, Lq, Lk, meta.q_offset, meta.scale * LOG2E, meta.scale, meta.max_distance, meta.num_buckets,
            seed, meta.dropout_p, NB_PAD=nb_pad, BIAS_GRAD=bias_grad, DETERMINISTIC=meta.deterministic, **flags,
            BLOCK_M=t.m, BLOCK_N=t.n, num_warps=t.warps, num_stages=t.stages)

    def launch_dq(t: tune.Tile):
        _k._bwd_dq_kernel[(triton.cdiv(Lq, t.m), H, B)](
            q, k, v, do, lse, delta, dq, tab, bkt, *tensors,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *strides,
            H, Lq, Lk, meta.q_offset, meta.scale * LOG2E, meta.scale, meta.max_distance, seed, meta.dropout_p,
            **flags, BLOCK_M=t.m, BLOCK_N=t.n, num_warps=t.warps, num_stages=t.stages)

    dkdv_flags = dict(flags, BIAS_GRAD=bias_grad, DETERMINISTIC=meta.deterministic)
    launch_dkdv(_tile("dkdv", q, k, meta, dkdv_flags, launch_dkdv))
    launch_dq(_tile("dq", q, k, meta, flags, launch_dq))

    dtable = None
    if bias_grad:
        sums = dbias[0].sum(dim=(0, 2)) if deterministic else dbias[0]
        dtable = sums[:, :meta.num_buckets].t().contiguous()          # (num_buckets, H)
    return dq, dk, dv, dtable
