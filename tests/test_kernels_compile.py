"""kernels/rms_norm.py and kernels/ffn.py compile for the GPU, checked WITHOUT a GPU.

The interpreter runs the kernels as Python and cannot see compiled-only errors (type clashes, non-constexpr
control flow, shared-memory overflow, spills). Triton bundles ptxas, so every @triton.jit kernel is compiled
ahead of time for sm_90 (H100) in a subprocess without TRITON_INTERPRET, with the constexprs, warps and
stages the launchers pick for T5 widths (taken from the launchers themselves: `_block_shape`, `_gate_blocks`,
the autotune configs of `_ffn_up_kernel`) and with the divisibility-by-16 hints the runtime would attach for
those shapes (they decide whether loads vectorise and whether the matmul loop is pipelined at all).

Asserted: everything compiles; no non-autotuned kernel exceeds the H100's shared memory; for every variant of
the autotuned up-projection at least one config fits (the autotuner skips OutOfResources configs, so a variant
where none fits would fail at runtime); no spills in the 16-bit row / elementwise kernels. Spill (stack) bytes
and shared memory of the rest are printed, not asserted (run `pytest -s` to see the table).
"""
from __future__ import annotations

import json

from tests.aot_compile import run_compile_script
H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

_SCRIPT = r'''
import json
import torch, triton
from triton.backends.compiler import GPUTarget
from kernels import rms_norm as R, ffn as G
from tests.aot_compile import resource_usage

TOKENS = 16384  # rows: 16k tokens, divisible by 16 like any real batch x length product
SEEN = set()


def compile_one(fn, ptrs, ints, consts, warps, stages):
    """ptrs: pointer arg -> dtype; ints: int arg -> the value the launcher would pass (for the /16 hint)."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a in ptrs:
            sig[a] = "*" + ptrs[a]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif a == "eps":
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
            if ints[a] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    key = (fn.__name__, json.dumps(sig, sort_keys=True), json.dumps(sorted(map(str, attrs))),
           json.dumps(consts, sort_keys=True, default=str), warps, stages)
    if key in SEEN:  # e.g. width 1024 compiles to exactly what 768 does
        return None
    SEEN.add(key)
    src = triton.compiler.ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def emit(kind, name, dtype, shape, kernel, warps, stages, consts, autotuned=False):
    if kernel is None:
        return
    stack, regs = resource_usage(kernel)
    ptx = kernel.asm["ptx"]
    print(json.dumps(dict(kind=kind, name=name, dtype=dtype, shape=shape, stack=stack, regs=regs,
                          shared=kernel.metadata.shared, warps=warps, stages=stages, autotuned=autotuned,
                          wgmma="wgmma.mma_async" in ptx, pipelined="cp.async" in ptx,
                          tiles={k: v for k, v in consts.items() if k.startswith(("BLOCK", "GROUP"))})), flush=True)


# ------------------------------------------------------------------------ RMSNorm (plain and fused residual)
DT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
for width in (768, 1024, 1000, 2048, 4096):
    bm, bn, warps = R._block_shape(width)
    ints = dict(n_rows=TOKENS, n_cols=width, stride_x=width, stride_r=width, stride_y=width, stride_s=width,
                stride_dy=width, stride_ds=width, stride_dx=width)
    # (x dtype, weight dtype): same dtype, and bf16 activations with fp32 weights (y and dy then fp32)
    pairs = [("bf16", "bf16"), ("fp16", "fp16")]
    if width in (1000, 4096):  # fp32 paths: same code at every width, two widths keep the run short
        pairs += [("fp32", "fp32"), ("bf16", "fp32")]
    for xd, wd in pairs:
        half_w = wd != "fp32"
        for res in (False, True):
            consts = dict(HAS_RESIDUAL=res, HALF_WEIGHT=half_w, RNE_BF16=False, BLOCK_M=bm, BLOCK_N=bn)
            ptrs = dict(X=xd, R=xd, W=wd, Y=wd, S=xd if res else wd, RSTD="fp32")
            k = compile_one(R._rms_norm_fwd_kernel, ptrs, ints, consts, warps, 3)
            emit("row", "rms_fwd" + ("+res" if res else ""), f"{xd}/{wd}", width, k, warps, 3, consts)
            consts = dict(HAS_DY=True, HAS_DS=res, HALF_WEIGHT=half_w, RNE_BF16=False, BLOCK_M=bm, BLOCK_N=bn)
            ptrs = dict(DY=wd, X=xd, W=wd, RSTD="fp32", DS=xd, DX=xd, DW_PARTIAL="fp32")
            k = compile_one(R._rms_norm_bwd_kernel, ptrs, ints, consts, warps, 3)
            emit("row", "rms_bwd" + ("+ds" if res else ""), f"{xd}/{wd}", width, k, warps, 3, consts)

# ------------------------------------------------------------------------------- the elementwise gate
for d_ff in (2048, 10240, 1000):  # 10240 compiles to what 2048 does (same blocks, same /16 hints)
    bm, bn, warps = G._gate_blocks(d_ff)
    for dt in ("bf16", "fp16", "fp32") if d_ff == 2048 else ("bf16", "fp16"):
        for gated, gelu in ((True, True), (False, False)):  # v1.1 gated-GELU, v1.0 ReLU
            width = 2 * d_ff if gated else d_ff
            ints = dict(n_rows=TOKENS, n_cols=d_ff, stride_h=width, stride_g=d_ff, stride_dg=d_ff, stride_dh=width)
            consts = dict(GATED=gated, ACT_GELU=gelu, RNE_BF16=False, BLOCK_M=bm, BLOCK_N=bn)
            tag = "gelu_gate" if gated else "relu"
            k = compile_one(G._gate_fwd_kernel, dict(H=dt, G=dt), ints, consts, warps, 3)
            emit("elementwise", tag + "_fwd", dt, d_ff, k, warps, 3, consts)
            for store_g in (False, True):
                c = dict(consts, STORE_G=store_g)
                k = compile_one(G._gate_bwd_kernel, dict(H=dt, DG=dt, DH=dt, G=dt), ints, c, warps, 3)
                emit("elementwise", tag + "_bwd" + ("+g" if store_g else ""), dt, d_ff, k, warps, 3, c)

# ------------------------------------------- the up-projection GEMM with the activation / gate epilogue
UP = G._ffn_up_kernel  # an Autotuner: the runtime benchmarks every config, so compile every config
assert len(UP.configs) > 1, "expected the GPU autotune list (TRITON_INTERPRET leaked into the subprocess?)"
# (name, gated, gelu, backward, store_g, store_h): every combination the launchers issue
PATHS = [("gated_fwd+h", True, True, False, True, True),        # training, h kept for backward
         ("gated_bwd_recompute", True, True, True, True, False),  # recompute=True backward, g for dwo
         ("gated_fwd", True, True, False, True, False),           # inference / recompute forward
         ("gated_bwd_nog", True, True, True, False, False),       # dropout path: g not needed
         ("relu_fwd", False, False, False, True, False),
         ("relu_bwd_recompute", False, False, True, True, False)]
FP32_CONFIGS = G._prune_up_configs(UP.configs, {"X": torch.empty(0)})  # what the launcher keeps for fp32
for d_model, d_ff in ((768, 2048), (4096, 10240), (1000, 2730)):  # 4096x10240 dedupes onto 768x2048
    ragged = d_model % 16 != 0
    for name, gated, gelu, bwd, store_g, store_h in PATHS:
        hw = 2 * d_ff if gated else d_ff
        ints = dict(M=TOKENS, N=d_ff, K=d_model, M_BUCKET=G.m_bucket(TOKENS), stride_xm=d_model, stride_wn=d_model, stride_gm=d_ff,
                    stride_hm=hw, stride_dgm=d_ff, stride_dhm=hw)
        main = name in ("gated_fwd+h", "gated_bwd_recompute")
        # Every config for the two bf16 training paths (the autotuner benchmarks them all); the other paths
        # and dtypes differ in the epilogue or the operand type only: first config (fp32: what it keeps).
        plan = [("bf16", UP.configs if main and not ragged else UP.configs[:1])]
        if not ragged:
            plan += [("fp16", UP.configs[:1])] if main else []
            plan += [("fp32", FP32_CONFIGS if name == "gated_fwd+h" else FP32_CONFIGS[:1])] if main else []
        elif name != "gated_fwd+h":
            continue  # the unaligned shape: one path shows what losing the /16 hints costs
        for dt, configs in plan:
            for cfg in configs:
                consts = dict(GATED=gated, ACT_GELU=gelu, BACKWARD=bwd, STORE_G=store_g, STORE_H=store_h,
                              UPCAST=False, DOT_PRECISION="ieee", RNE_BF16=False, **cfg.kwargs)
                ptrs = dict(X=dt, W=dt, G=dt, H=dt, DG=dt, DH=dt)
                k = compile_one(UP.fn, ptrs, ints, consts, cfg.num_warps, cfg.num_stages)
                emit("gemm", "up_" + name, dt, f"{d_model}x{d_ff}", k, cfg.num_warps, cfg.num_stages, consts, True)
print("DONE", flush=True)
'''


def test_rms_norm_and_ffn_kernels_compile_for_sm90():  # ~35 s cold on 2 shared cores (see the final report)
    stdout, rows = run_compile_script(_SCRIPT, fresh_cache=True)
    assert stdout.rstrip().endswith("DONE"), stdout[-2000:]
    print()
    for r in rows:
        print(f"{r['name']:>22} {r['dtype']:>9} {str(r['shape']):>10} w{r['warps']} s{r['stages']} "
              f"{json.dumps(r['tiles'])} regs {r['regs']} stack {r['stack']} B shared {r['shared']} B"
              f"{' wgmma' if r['wgmma'] else ''}{' pipelined' if r['pipelined'] else ''}")
    names = {r["name"] for r in rows}
    assert {"rms_fwd", "rms_fwd+res", "rms_bwd", "rms_bwd+ds", "gelu_gate_fwd", "gelu_gate_bwd", "relu_bwd+g",
            "up_gated_fwd+h", "up_gated_bwd_recompute", "up_relu_fwd"} <= names, names
    too_big = [r for r in rows if not r["autotuned"] and r["shared"] > H100_SMEM]
    assert not too_big, f"kernels over the H100 shared memory (retune the launcher): {too_big}"
    variants = {}
    for r in rows:
        if r["autotuned"]:
            variants.setdefault((r["name"], r["dtype"], r["shape"]), []).append(r["shared"] <= H100_SMEM)
    no_fit = [v for v, fits in variants.items() if not any(fits)]
    assert not no_fit, f"no autotune config of kernels/ffn.py:_up_configs fits shared memory for {no_fit}"
    # Whole rows in registers: a 16-bit row kernel that spills means _block_shape picked too much per program.
    spilled = [r for r in rows if r["kind"] != "gemm" and r["dtype"].split("/")[0] != "fp32" and r["stack"] != 0]
    assert not spilled, f"register spills in row/elementwise kernels (retune _block_shape/_gate_blocks): {spilled}"
    # The 16-bit training matmuls must run on the tensor cores (wgmma) with a pipelined K loop when the
    # shapes are multiples of 16, as T5's are.
    slow = [r for r in rows if r["kind"] == "gemm" and r["dtype"] != "fp32" and r["shape"] != "1000x2730"
            and not (r["wgmma"] and r["pipelined"])]
    assert not slow, f"up-projection not on wgmma / not pipelined: {slow}"
