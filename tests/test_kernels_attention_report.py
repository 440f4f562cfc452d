"""benchmarks/kernels/compiled_report.py: the sm_90 code of the attention kernels, read without a GPU.

The compiled check (skipped without triton's bundled ptxas/cuobjdump) compiles every attention kernel of
every mask variant at the model's shapes (B 8, H 12, L 512, d 64, bf16) through the project's launchers
and asserts what issue 12 asks of the masked variants: their loads are pipelined (asynchronous copies in the
SASS), the matmuls are on wgmma, and nothing spills; at d = 128 too, and for every tile of the autotuning
space (kernels/_t5_attention_tune.py) at d = 64. The yardstick kernel's numerics are checked under the
interpreter against PyTorch.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.kernels import compiled_report as R
from tests.aot_compile import run_compile_script

_SCRIPT = r'''
import json
from benchmarks.kernels.compiled_report import build_report
for row in build_report(batch=8, heads=12, length=512, head_dim=HEAD_DIM, dtype="bf16")["rows"]:
    print(json.dumps(row), flush=True)
'''


def _report_rows(head_dim: int):
    return run_compile_script(_SCRIPT.replace("HEAD_DIM", str(head_dim)))


def test_masked_variants_are_pipelined_on_wgmma_without_spills_at_d64():  # ~60 s
    stdout, rows = _report_rows(64)
    by = {(r["variant"], r["kernel"]): r for r in rows}
    print("\n".join(f"{r['variant']:>24} {r['kernel']:>5} regs {r['regs']:>3} stack {r['stack']} "
                    f"LDGSTS {r['ldgsts']:>3} HGMMA {r['hgmma']:>3} SASS {r['sass']}" for r in rows))
    for variant in R.VARIANTS:
        for kernel in ("fwd", "dkdv", "dq", "delta"):
            assert (variant, kernel) in by, f"{variant} {kernel} was not compiled: {stdout[-2000:]}"
    problems = []
    for variant in R.MASKED:
        for kernel in ("fwd", "dkdv", "dq"):
            r = by[(variant, kernel)]
            if r["stack"] != 0 or r["spill_ops"] != 0:
                problems.append(f"{variant} {kernel}: spills ({r['stack']} B stack, {r['spill_ops']} LDL/STL)")
            if r["hgmma"] == 0:
                problems.append(f"{variant} {kernel}: no wgmma")
            # (dk/dv of packed rows: its loop for packing's positions; the fallback loop for positions in any
            # order nests the per-bucket loop and is not pipelined.)
            if r["ldgsts"] + r["tma"] == 0:
                problems.append(f"{variant} {kernel}: no asynchronous copies (the tile loop is not pipelined)")
    assert not problems, "\n".join(problems)
    plain = by[("plain-flash (our tiles)", "fwd")]
    assert plain["hgmma"] > 0 and plain["ldgsts"] > 0 and plain["stack"] == 0, plain


def test_d128_kernels_are_on_wgmma_without_spills():  # ~60 s
    """Issue 12 at d = 128: dk/dv without spills (it spilled 16-104 B with 32 x 64 tiles), dq on wgmma (its
    32-row tiles ran mma.sync), every masked variant pipelined (packed dk/dv too: its two loops)."""
    stdout, rows = _report_rows(128)
    problems = []
    for r in rows:
        if r["variant"] not in R.MASKED or r["kernel"] == "delta":
            continue
        name = f"{r['variant']} {r['kernel']} {r['BLOCK_M']}x{r['BLOCK_N']}"
        if r["stack"] or r["spill_ops"]:
            problems.append(f"{name}: spills ({r['stack']} B stack, {r['spill_ops']} LDL/STL)")
        if r["mma_sync"] or not r["hgmma"]:
            problems.append(f"{name}: HMMA {r['mma_sync']}, HGMMA {r['hgmma']}")
        if r["ldgsts"] + r["tma"] == 0:
            problems.append(f"{name}: no asynchronous copies")
    assert len(rows) >= 3 * len(R.MASKED), stdout[-2000:]
    assert not problems, "\n".join(problems)


_SPACE_SCRIPT = r'''
import json
import torch
from benchmarks.kernels.compiled_report import MASKED, space_rows
for row in space_rows(8, 12, 512, 64, torch.bfloat16, MASKED):
    print(json.dumps(row), flush=True)
'''


def test_every_autotuning_tile_is_pipelined_without_spills_at_d64():  # ~4 min
    """kernels/_t5_attention_tune.py may pick any tile of its space: each must compile as well as the default."""
    from kernels import _t5_attention_tune as tune

    stdout, rows = run_compile_script(_SPACE_SCRIPT)
    tiles = {(r["kernel"], r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"]) for r in rows}
    for kernel, space in tune.SPACE_D64.items():
        for t in space[1:]:        # the defaults are checked above
            assert (kernel, t.m, t.n, t.warps, t.stages) in tiles, f"{kernel} {t} not compiled: {stdout[-2000:]}"
    print("\n".join(f"{r['variant']:>16} {r['kernel']:>5} {r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} "
                    f"s{r['num_stages']} regs {r['regs']:>3} stack {r['stack']} LDGSTS {r['ldgsts']}" for r in rows))
    bad = [f"{r['variant']} {r['kernel']} {r['BLOCK_M']}x{r['BLOCK_N']}x{r['num_warps']}x{r['num_stages']}: "
           f"stack {r['stack']} B, LDGSTS {r['ldgsts']}, HGMMA {r['hgmma']}" for r in rows
           if r["stack"] or r["spill_ops"] or not r["ldgsts"] + r["tma"] or not r["hgmma"]]
    assert not bad, "\n".join(bad)
    assert {r["variant"] for r in rows} == set(R.MASKED)


def test_sass_counts_reads_opcodes_and_skips_nops():
    listing = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;              /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0020*/               @P1 HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   MUFU.EX2 R5, R5 ;
        /*0040*/                   NOP ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
    """
    assert R.sass_counts(listing) == {"LDC": 1, "LDGSTS": 1, "HGMMA": 1, "MUFU": 1, "BAR": 1}


def test_loop_bodies_are_the_spans_of_backward_branches():
    listing = """
        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0020*/                   NOP ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   BRA 0x60 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    assert R.loop_bodies(listing) == [2]   # IADD3 + BRA; the NOP and the forward / self branches do not count


def test_compare_lists_each_kernel_before_and_after():
    row = dict(variant="enc-pad", kernel="fwd", BLOCK_M=128, BLOCK_N=32, regs=182, stack=0, ldgsts=0, hgmma=18,
               mufu=88, sass=2239, loops=[281, 982])
    after = dict(row, BLOCK_N=64, regs=172, ldgsts=94, loops=[431, 680])
    md = R.compare(dict(commit="a", rows=[row]), dict(commit="b", rows=[after, dict(after, variant="new")]))
    assert "| enc-pad | fwd | 128x32 -> 128x64 | 182 -> 172 | 0 -> 0 | 0 -> 94 |" in md
    assert "70/246 -> 54/85 |" in md        # 281 and 982 per 4096 scores; 431 and 680 per 8192
    assert "| new |" not in md               # only kernels present in both


@pytest.mark.parametrize("length", [16, 45])
def test_plain_flash_yardstick_matches_torch(length, device):
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 16, generator=gen).to(device) for _ in range(3))
    got = R.plain_flash_forward(q, k, v, 0.25, block_m=16, block_n=16, num_warps=1, num_stages=1)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
