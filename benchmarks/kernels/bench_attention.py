"""Relative-bias attention benchmark: ours (Triton flash, bias + its gradient in-kernel) against
SDPA with a materialised bias, FlexAttention with a bucket score_mod, and SDPA/flash WITHOUT bias (the
ceiling, which T5 cannot use), forward / backward / full, TFLOP/s and peak memory.

    python -m benchmarks.kernels.bench_attention                  # GPU: L 512..4096, 16k tokens, H 12, d 64/128, bf16
    python -m benchmarks.kernels.bench_attention --smoke          # CPU smoke (CI): tiny shapes, interpreter
    python -m benchmarks.kernels.bench_attention --lengths 1024 --head-dims 64 --modes enc

Issue-4 targets (one H100, bf16, full pass): >= 2x SDPA+bias, >= 1.2x Flex, >= 60% of no-bias flash,
memory linear in L. FLOPs counted the FlashAttention way for every provider alike: forward 4*B*H*Lq*Lk*D,
backward 2.5x that, halved for causal (padding is not subtracted: every provider gets the same count). Modes:
"enc" (bidirectional buckets and a key padding mask, the encoder as the model runs it: row b keeps
`valid_lengths` keys, 100% down to 75% of L) and "dec" (unidirectional buckets + causal, decoder
self-attention; d=64 only). The no-bias flash ceiling runs without any mask (flash takes none): an upper bound. The CPU smoke run leaves
FlexAttention out (no CPU backward) and times the interpreter, so its numbers mean nothing. Each shape also records the
max |ours - SDPA+bias| of the forward output ("max_err_vs_sdpa") as a compiled correctness spot check.
Results go to `<out>/t5_attention_<device>_<date>.json`.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.compiled import PerShapeCompiled  # noqa: E402
from benchmarks.kernels.bench_rms_norm import (DEFAULT_OUT, annotate, bench_device, measure,  # noqa: E402
                                               ours_available, write_results)

TOKENS = 16384
HEADS = 12
NUM_BUCKETS, MAX_DISTANCE = 32, 128


def _flops(batch: int, heads: int, length: int, head_dim: int, causal: bool) -> dict:
    fwd = 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
    return {"forward": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}


def _providers(smoke: bool, device: torch.device, causal: bool) -> dict[str, Callable]:
    """name -> fn(q, k, v, table) -> out, each differentiable in q, k, v and table."""
    from kernels.t5_attention import compute_position_bias, relative_position_bucket, t5_attention

    bidirectional = not causal
    out: dict[str, Callable] = {}
    if ours_available(device):
        def ours(q, k, v, t):
            pad = None if causal else padding_mask(q.shape[0], q.shape[2], q.device)
            return t5_attention(q, k, v, t, bidirectional=bidirectional, causal=causal, key_padding_mask=pad,
                                num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE)

        out["ours"] = ours

    def sdpa_bias(q, k, v, table):
        # What Hugging Face T5 does: a materialised bias, causal or padding folded in as the dtype's minimum.
        L = q.shape[2]
        bias = compute_position_bias(table, L, L, bidirectional=bidirectional, num_buckets=NUM_BUCKETS,
                                     max_distance=MAX_DISTANCE).to(q.dtype).expand(q.shape[0], -1, -1, -1)
        if causal:
            keep = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        else:
            keep = padding_mask(q.shape[0], L, q.device)[:, None, None, :]
        bias = bias.masked_fill(~keep, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)

    out["sdpa_bias"] = sdpa_bias
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        flex_attention = None
    if flex_attention is not None and device.type == "cuda":   # Flex has no backward on the CPU
        flex = flex_attention if smoke else PerShapeCompiled(flex_attention)
        rel = torch.arange(-MAX_DISTANCE, MAX_DISTANCE + 1, device=device)
        bucket_lut = relative_position_bucket(rel, bidirectional, NUM_BUCKETS, MAX_DISTANCE)
        masks: dict[int, object] = {}

        def flex_bucket(q, k, v, table):
            # The bucket of the clamped relative position from a captured LUT, then the captured table: the
            # table's gradient goes through Flex's captured-buffer path (atomic adds).
            def score_mod(score, b, h, q_idx, kv_idx):
                idx = (kv_idx - q_idx).clamp(-MAX_DISTANCE, MAX_DISTANCE) + MAX_DISTANCE
                return score + table[bucket_lut[idx], h].to(score.dtype)

            B, L = q.shape[0], q.shape[2]
            if (B, L) not in masks:
                if causal:
                    masks[B, L] = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, L, L,
                                                    device=str(q.device))
                else:
                    lengths = valid_lengths(B, L, q.device)
                    masks[B, L] = create_block_mask(lambda b, h, qi, ki: ki < lengths[b], B, None, L, L,
                                                    device=str(q.device))
            block_mask = masks[B, L]
            return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)

        flex_bucket.compiled = flex   # the record says how Flex ran (benchmarks/compiled.py)
        out["flex_bucket"] = flex_bucket

    def sdpa_nobias(q, k, v, table):
        del table   # the ceiling: no bias at all, flash backend where available
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)

    out["sdpa_nobias"] = sdpa_nobias
    return out


def valid_lengths(batch: int, length: int, device) -> torch.Tensor:
    """Keys kept per row in "enc" mode: 100% of L for the first row down to 75% for the last."""
    frac = torch.linspace(1.0, 0.75, batch) if batch > 1 else torch.ones(1)
    return (frac * length).long().clamp_min(1).to(device)


def padding_mask(batch: int, length: int, device) -> torch.Tensor:
    """(B, L) bool, True where a key is kept (the model's attention_mask)."""
    return torch.arange(length, device=device)[None, :] < valid_lengths(batch, length, device)[:, None]


def _inputs(batch, heads, length, head_dim, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, generator=gen).mul(0.3).to(dtype)
               .requires_grad_() for _ in range(3))
    table = torch.randn(NUM_BUCKETS, heads, device=device, generator=gen).requires_grad_()
    return q, k, v, table


def run(smoke: bool, out_dir=DEFAULT_OUT, lengths=None, head_dims=None, modes=None) -> list[dict]:
    device = bench_device(smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if smoke:
        lengths, head_dims, modes, tokens, heads = lengths or [48], head_dims or [64], modes or ["enc", "dec"], 96, 2
    else:
        lengths, head_dims, modes, tokens, heads = (lengths or [512, 1024, 2048, 4096], head_dims or [64, 128],
                                                    modes or ["enc", "dec"], TOKENS, HEADS)
    records = []
    for mode in modes:
        causal = mode == "dec"
        for head_dim in head_dims:
            if causal and head_dim != 64 and not smoke:
                continue
            for length in lengths:
                batch = max(1, tokens // length)
                shape = (batch, heads, length, head_dim)
                kernel = f"t5_attention_{mode}"
                flops = _flops(batch, heads, length, head_dim, causal)
                outputs = {}
                for provider, fn in _providers(smoke, device, causal).items():
                    def make(fn=fn):
                        q, k, v, table = _inputs(batch, heads, length, head_dim, dtype, device)
                        return (q, k, v, table), lambda: fn(q, k, v, table)

                    try:
                        inputs, forward = make()
                        with torch.no_grad():
                            outputs[provider] = forward().float()
                        recs = measure(kernel, provider, shape, dtype, device, smoke, make, None, 0.0,
                                       exclude=lambda inputs: list(inputs), flops=flops)
                    except Exception as e:  # noqa: BLE001 -- e.g. out of memory for the materialised bias
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        recs = [{"kernel": kernel, "provider": provider, "shape": list(shape),
                                 "dtype": str(dtype).replace("torch.", ""), "pass": p, "ms": None, "tflops": None,
                                 "peak_mem_mb": None, "error": msg} for p in ("forward", "backward", "full")]
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    annotate(recs, getattr(fn, "compiled", None))
                    for r in recs:
                        r["mode"] = mode
                    records += recs
                if "ours" in outputs and "sdpa_bias" in outputs:
                    err = (outputs["ours"] - outputs["sdpa_bias"]).abs().max().item()
                    for r in records:
                        if r["provider"] == "ours" and r["shape"] == list(shape) and r.get("mode") == mode:
                            r["max_err_vs_sdpa"] = err
    write_results("t5_attention", records, out_dir, device, {"smoke": smoke, "tokens": tokens, "heads": heads,
                                                             "num_buckets": NUM_BUCKETS, "max_distance": MAX_DISTANCE})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="T5 relative-bias attention benchmark")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter (CI)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the JSON results")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 512,1024")
    parser.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 64,128")
    parser.add_argument("--modes", type=lambda s: s.split(","), help="enc,dec")
    args = parser.parse_args(argv)
    records = run(args.smoke, args.out, args.lengths, args.head_dims, args.modes)
    base = {(r["mode"], tuple(r["shape"]), r["pass"]): r["ms"] for r in records if r["provider"] == "ours"}
    for r in records:
        ours_ms = base.get((r["mode"], tuple(r["shape"]), r["pass"]))
        ratio = f"{r['ms'] / ours_ms:5.2f}x" if r["ms"] and ours_ms else "   - "
        print(f"{r['mode']:>3} {r['provider']:>12} {str(r['shape']):>22} {r['pass']:>8} "
              f"{r['ms'] if r['ms'] is not None else float('nan'):9.3f} ms {r['tflops'] or 0:7.1f} TFLOP/s "
              f"ours is {ratio} faster  peak {r['peak_mem_mb']} MB {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
