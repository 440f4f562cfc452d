"""The attention kernels as PyTorch custom ops (torch.library), so torch.compile and CUDA graphs take them.

`t5forge::t5_attention_fwd` and `t5forge::t5_attention_bwd` wrap kernels/_t5_attention_launch.py's
launchers, with fake (meta) implementations that give the outputs' shapes, dtypes and strides without running
anything, and the forward's autograd registered with `register_autograd`: torch._dynamo traces the model
through them as one node each (no graph break, never into Triton or its interpreter), AOTAutograd puts the
backward op in the backward graph. Nothing inside allocates a tensor that outlives the call but the outputs,
nor caches one, nor reads a device value on the host: the bucket table, the per-call bias vector and the
dropout seed are inputs (kernels/t5_attention.py builds them outside, where dynamo sees them).

Registered with `torch.library.custom_op` (as kernels/rms_norm.py and kernels/ffn.py are) rather than
`triton_op`: the launchers choose tiles by timing (kernels/_t5_attention_tune.py) and run under the
interpreter on the CPU, which a traced `wrap_triton` launch does not allow; the op is opaque to inductor.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _t5_attention_launch as L


def _meta(num_buckets, max_distance, scale, q_offset, causal, deterministic, dropout_p, seed, q_pos, kv_pos,
          q_seg, kv_seg, prefix) -> L.Meta:
    return L.Meta(num_buckets=num_buckets, max_distance=max_distance, scale=scale, q_offset=q_offset,
                  causal=causal, deterministic=deterministic, dropout_p=dropout_p, seed=seed, q_pos=q_pos,
                  kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg, prefix=prefix)


@torch.library.custom_op("t5forge::t5_attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], rel: Optional[Tensor],
                  buckets: Optional[Tensor], q_pos: Optional[Tensor], kv_pos: Optional[Tensor],
                  q_seg: Optional[Tensor], kv_seg: Optional[Tensor], prefix: Optional[Tensor],
                  seed: Optional[Tensor], num_buckets: int, max_distance: int, scale: float, q_offset: int,
                  causal: bool, deterministic: bool, dropout_p: float) -> tuple[Tensor, Tensor]:
    """(o, lse). `table` (num_buckets, H) is an input for its gradient only: the kernels read `rel`."""
    meta = _meta(num_buckets, max_distance, scale, q_offset, causal, deterministic, dropout_p, seed, q_pos,
                 kv_pos, q_seg, kv_seg, prefix)
    return L.forward(q, k, v, rel, buckets, meta)


@attention_fwd.register_fake
def _(q, k, v, table, rel, buckets, q_pos, kv_pos, q_seg, kv_seg, prefix, seed, num_buckets, max_distance, scale,
      q_offset, causal, deterministic, dropout_p):
    B, H, Lq, D = q.shape
    o = q.new_empty((B, Lq, H, D)).transpose(1, 2)              # the launcher's (B, Lq, H, D) storage
    return o, q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("t5forge::t5_attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, rel: Optional[Tensor],
                  buckets: Optional[Tensor], q_pos: Optional[Tensor], kv_pos: Optional[Tensor],
                  q_seg: Optional[Tensor], kv_seg: Optional[Tensor], prefix: Optional[Tensor],
                  seed: Optional[Tensor], num_buckets: int, max_distance: int, scale: float, q_offset: int,
                  causal: bool, deterministic: bool, dropout_p: float,
                  bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dtable); dtable is (num_buckets, H) fp32 when `bias_grad`, else an empty (0,) tensor."""
    meta = _meta(num_buckets, max_distance, scale, q_offset, causal, deterministic, dropout_p, seed, q_pos,
                 kv_pos, q_seg, kv_seg, prefix)
    dq, dk, dv, dtable = L.backward(do, q, k, v, o, lse, rel, buckets, meta, bias_grad)
    return dq, dk, dv, dtable if dtable is not None else q.new_empty((0,), dtype=torch.float32)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, rel, buckets, q_pos, kv_pos, q_seg, kv_seg, prefix, seed, num_buckets, max_distance,
      scale, q_offset, causal, deterministic, dropout_p, bias_grad):
    shape = (num_buckets, q.shape[1]) if bias_grad else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(shape, dtype=torch.float32))


_FWD_TENSORS = 12     # q, k, v, table, rel, buckets, q_pos, kv_pos, q_seg, kv_seg, prefix, seed


def _setup_context(ctx, inputs, output):
    q, k, v, table, rel, buckets, *masks = inputs[:_FWD_TENSORS]
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, rel, buckets, *masks)
    ctx.scalars = inputs[_FWD_TENSORS:]
    ctx.table_dtype = None if table is None else table.dtype
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, rel, buckets, *masks = ctx.saved_tensors
    bias_grad = rel is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dtable = attention_bwd(do, q, k, v, o, lse, rel, buckets, *masks, *ctx.scalars, bias_grad)
    dtable = dtable.to(ctx.table_dtype) if bias_grad else None
    return (dq, dk, dv, dtable) + (None,) * (len(ctx.needs_input_grad) - 4)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def t5_attention_op(q, k, v, table, rel, buckets, meta: L.Meta) -> Tensor:
    """The attention output (B, H, Lq, D) through the custom ops (differentiable in q, k, v and `table`)."""
    o, _ = attention_fwd(q, k, v, table, rel, buckets, meta.q_pos, meta.kv_pos, meta.q_seg, meta.kv_seg,
                         meta.prefix, meta.seed, meta.num_buckets, meta.max_distance, meta.scale, meta.q_offset,
                         meta.causal, meta.deterministic, meta.dropout_p)
    return o
