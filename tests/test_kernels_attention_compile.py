"""kernels/_t5_attention_kernels.py compiles for the GPU, checked WITHOUT a GPU.

The interpreter runs the kernels as Python, so it cannot see compiled-only errors (non-constexpr globals,
type clashes between `if` branches, ...). Triton ships ptxas, so the kernels are compiled ahead of time for
sm_90 (H100) with the launch configurations `kernels._t5_attention_launch._blocks` picks, in a subprocess
without TRITON_INTERPRET. The register report guards the tile choice: at head dim 64 no 16-bit variant may spill.
"""
from __future__ import annotations

from tests.aot_compile import run_compile_script

_SCRIPT = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from kernels import _t5_attention_kernels as K
from kernels._t5_attention_launch import _blocks
from tests.aot_compile import resource_usage

ACT = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
F32 = {"LSE", "DELTA", "REL", "DBIAS"}   # REL: the per-call fp32 bias vector over relative positions
I32P = {"BUCKET_LUT", "QPOS", "KPOS", "QSEG", "KSEG", "PREFIX", "SEED"}


def signature(fn, dtype, consts):
    sig = {}
    for a in fn.arg_names:
        sig[a] = ("constexpr" if a in consts else "*" + dtype if a in ACT else "*fp32" if a in F32
                  else "*i32" if a in I32P else "fp32" if a in ("qk_scale", "sm_scale") else "i32")
    return sig


def stack_bytes(kernel):
    return resource_usage(kernel)[0]


def compile_one(fn, dtype, consts, warps, stages):
    src = triton.compiler.ASTSource(fn, signature(fn, dtype, consts), constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


VARIANTS = [  # (name, dtype, head_dim, flags)
    ("enc-pad", "bf16", 64, dict(HAS_SEG=1)),
    ("dec-causal-prefix-pad", "bf16", 64, dict(CAUSAL=True, HAS_PREFIX=True, HAS_SEG=1)),
    ("packed-dec", "fp16", 64, dict(CAUSAL=True, HAS_SEG=2, HAS_QPOS=True, HAS_KPOS=True)),
    ("packed-enc-d128", "bf16", 128, dict(HAS_SEG=2, HAS_QPOS=True, HAS_KPOS=True)),
    ("cross-fp32", "fp32", 64, dict(HAS_BIAS=False, HAS_SEG=2)),
    ("enc-pad-dropout", "bf16", 64, dict(HAS_SEG=1, DROPOUT=True)),
]
base = dict(HAS_BIAS=True, HAS_QPOS=False, HAS_KPOS=False, HAS_SEG=0, CAUSAL=False, HAS_PREFIX=False, UPCAST=False,
            DROPOUT=False)
for name, dtype, d, flags in VARIANTS:
    flags = dict(base, **flags, HEAD_DIM=d, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    cfg = _blocks(d, 4096, flags["HAS_QPOS"], dtype == "fp32")
    runs = [("fwd", K._fwd_kernel, dict(flags, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n), cfg.fwd_warps),
            ("dkdv", K._bwd_dkdv_kernel, dict(flags, BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, NB_PAD=32,
                                               BIAS_GRAD=flags["HAS_BIAS"], DETERMINISTIC=False), cfg.bwd_warps),
            ("dq", K._bwd_dq_kernel, dict(flags, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n), cfg.dq_warps)]
    for kname, fn, consts, warps in runs:
        kernel = compile_one(fn, dtype, consts, warps, cfg.num_stages)
        print(json.dumps(dict(variant=name, kernel=kname, dtype=dtype, head_dim=d, stack=stack_bytes(kernel),
                              dropout=flags["DROPOUT"])), flush=True)
kernel = compile_one(K._bwd_delta_kernel, "bf16", dict(HEAD_DIM=64, BLOCK_M=64), 4, 1)
print(json.dumps(dict(variant="delta", kernel="delta", dtype="bf16", head_dim=64, stack=stack_bytes(kernel))))
'''


def test_kernels_compile_for_sm90_without_spills_at_d64():  # ~15 s
    stdout, rows = run_compile_script(_SCRIPT)
    assert len(rows) == 19, stdout
    print("\n".join(f"{r['variant']:>22} {r['kernel']:>5} d={r['head_dim']} stack {r['stack']} B" for r in rows))
    # fp32 (exact fp32 dots, not a training path on the GPU) and dropout (Philox state) may spill.
    spilled = [r for r in rows if r["head_dim"] == 64 and r["dtype"] != "fp32" and not r.get("dropout")
               and r["stack"] != 0]
    assert not spilled, f"register spills at head dim 64 (retune kernels/_t5_attention_launch.py:_blocks): {spilled}"
