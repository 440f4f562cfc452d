"""Gated FFN benchmark: the fused gate alone, and the whole FFN block with its activation memory.

    python -m benchmarks.kernels.bench_gated_ffn            # GPU: 16k tokens, T5 v1.1 base/large/xl + v1.0
    python -m benchmarks.kernels.bench_gated_ffn --smoke    # CPU smoke (CI), interpreter, tiny shapes

Providers for the block: `eager` (ffn_ref), `compile` (torch.compile of ffn_ref), `ours` (Triton up GEMM
with the gate in its epilogue, keeps h for backward), `ours_recompute` (keeps only x, re-runs the up GEMM in
backward), `ours_gate` (cuBLAS GEMMs + the fused elementwise gate, Liger's design). Issue-3 targets on an
H100 in bf16: gate >= 85% of copy bandwidth; block >= 1.15x eager with <= 0.75x its activation memory
(`saved_mb` = bytes autograd keeps for backward, excluding x and weights; `peak_mem_mb` = CUDA peak of
forward + backward above what was allocated before).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.compiled import PerShapeCompiled  # noqa: E402
from benchmarks.kernels.bench_rms_norm import (DEFAULT_OUT, annotate, bench_device, cli,  # noqa: E402
                                               copy_bandwidth, measure, ours_available, saved_bytes, write_results)

# (name, d_model, d_ff, gated, activation) -- T5 v1.1 sizes (gated GELU) and v1.0 base (ReLU).
GPU_BLOCKS = [("v1_1-base", 768, 2048, True, "gelu_tanh"), ("v1_1-large", 1024, 2816, True, "gelu_tanh"),
              ("v1_1-xl", 2048, 5120, True, "gelu_tanh"), ("v1_0-base", 768, 3072, False, "relu")]
SMOKE_BLOCKS = [("smoke-gated", 32, 48, True, "gelu_tanh"), ("smoke-relu", 32, 40, False, "relu")]


def saved_activation_bytes(fn, m: int, d_model: int, d_ff: int, dtype: torch.dtype, device: torch.device,
                           gated: bool = True, activation: str = "gelu_tanh") -> int:
    """Bytes the FFN block `fn(x, wi, wo, gated=..., activation=...)` keeps for backward beyond x and the
    weights (which are alive anyway): the activation memory the block adds per layer."""
    x = torch.randn(m, d_model, device=device).to(dtype).requires_grad_()
    wi = torch.randn((2 if gated else 1) * d_ff, d_model, device=device).to(dtype).requires_grad_()
    wo = torch.randn(d_model, d_ff, device=device).to(dtype).requires_grad_()
    return saved_bytes(lambda: fn(x, wi, wo, gated=gated, activation=activation), [x, wi, wo])


def _ffn_providers(smoke: bool, device: torch.device) -> dict:
    from kernels import ffn as gf

    def ours_gate(x, wi, wo, *, gated, activation):
        if not (gated and activation == "gelu_tanh"):  # the standalone gate is the gelu_tanh gate only
            return gf.ffn(x, wi, wo, gated=gated, activation=activation)
        return F.linear(gf.gelu_tanh_gate(F.linear(x, wi)), wo)

    out = {"eager": gf.ffn_ref}
    if ours_available(device):
        out.update(ours=lambda *a, **k: gf.ffn(*a, recompute=False, **k),
                   ours_recompute=lambda *a, **k: gf.ffn(*a, recompute=True, **k), ours_gate=ours_gate)
    if not smoke or os.environ.get("T5FORGE_BENCH_COMPILE") == "1":
        out["compile"] = PerShapeCompiled(gf.ffn_ref)
    return out


def _bench_gate(smoke, device, dtype, copy_gbps, widths=None) -> list[dict]:
    from kernels import ffn as gf

    rows, default_widths = (32, [48]) if smoke else (16384, [1024, 2048, 2816, 4096])
    widths = widths or default_widths
    records = []
    fns = {"eager": gf.gelu_tanh_gate_ref}
    if ours_available(device):
        fns["ours"] = gf.gelu_tanh_gate
    if not smoke or os.environ.get("T5FORGE_BENCH_COMPILE") == "1":
        fns["compile"] = PerShapeCompiled(gf.gelu_tanh_gate_ref)
    for d_ff in widths:
        mf = rows * d_ff * torch.tensor([], dtype=dtype).element_size()
        # fwd reads h (2 MF) writes g (MF); bwd reads h and dg (3 MF), writes dh (2 MF)
        nbytes = {"forward": 3 * mf, "backward": 5 * mf, "full": 8 * mf}
        for provider, fn in fns.items():
            def make(fn=fn):
                h = torch.randn(rows, 2 * d_ff, device=device).to(dtype).requires_grad_()
                return (h,), lambda: fn(h)

            records += annotate(measure("gelu_tanh_gate", provider, (rows, 2 * d_ff), dtype, device, smoke, make,
                                        nbytes, copy_gbps, exclude=lambda inputs: list(inputs)), fn)
    return records


def _bench_ffn(smoke, device, dtype, copy_gbps, blocks=None) -> list[dict]:
    tokens = 32 if smoke else 16384
    records = []
    providers = _ffn_providers(smoke, device)
    chosen = [b for b in (SMOKE_BLOCKS if smoke else GPU_BLOCKS) if blocks is None or b[0] in blocks]
    for name, d_model, d_ff, gated, activation in chosen:
        width = (2 if gated else 1) * d_ff
        fwd = 2 * tokens * d_model * (width + d_ff)  # up GEMM + down GEMM
        flops = {"forward": fwd, "backward": 2 * fwd, "full": 3 * fwd}  # recompute's extra GEMM not credited
        for provider, fn in providers.items():
            def make(fn=fn):
                gen = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(tokens, d_model, device=device, generator=gen).to(dtype).requires_grad_()
                wi = (torch.randn(width, d_model, device=device, generator=gen) / d_model ** 0.5).to(dtype)
                wo = (torch.randn(d_model, d_ff, device=device, generator=gen) / d_ff ** 0.5).to(dtype)
                wi.requires_grad_()
                wo.requires_grad_()
                return (x, wi, wo), lambda: fn(x, wi, wo, gated=gated, activation=activation)

            for rec in annotate(measure("ffn", provider, (tokens, d_model, d_ff), dtype, device, smoke, make, None,
                                        copy_gbps, exclude=lambda inputs: list(inputs), flops=flops), fn):
                rec["block"] = name
                records.append(rec)
    return records


def run(smoke: bool, out_dir=DEFAULT_OUT, gate_widths: list[int] | None = None,
        blocks: list[str] | None = None) -> list[dict]:
    """`gate_widths` (d_ff values) and `blocks` (GPU_BLOCKS names) narrow the default shapes."""
    device = bench_device(smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = [copy_bandwidth(device, smoke)]
    copy_gbps = records[0]["gbps"]
    records += _bench_gate(smoke, device, dtype, copy_gbps, gate_widths)
    records += _bench_ffn(smoke, device, dtype, copy_gbps, blocks)
    _add_ratios(records)
    write_results("gated_ffn", records, out_dir, device, {"smoke": smoke, "copy_gbps": copy_gbps})
    return records


def _add_ratios(records: list[dict]) -> None:
    """speedup_vs_eager and saved_vs_eager on each FFN record (the issue-3 targets are ratios)."""
    eager = {(r["kernel"], tuple(r["shape"]), r["pass"]): r for r in records if r["provider"] == "eager"}
    for r in records:
        base = eager.get((r["kernel"], tuple(r["shape"]), r["pass"]))
        if base is None or r["kernel"] == "copy":
            continue
        r["speedup_vs_eager"] = round(base["ms"] / r["ms"], 3)
        if r["saved_mb"] is not None and base["saved_mb"]:
            r["saved_vs_eager"] = round(r["saved_mb"] / base["saved_mb"], 3)


def main(argv: list[str] | None = None) -> int:
    return cli(run, argv, "Gated FFN benchmark (ours / eager / torch.compile)")


if __name__ == "__main__":
    sys.exit(main())
