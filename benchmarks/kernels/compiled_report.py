"""What the attention kernels compile to on sm_90 (H100/H200), read on a machine WITHOUT a GPU.

    python -m benchmarks.kernels.compiled_report                       # B 8, H 12, L 512, d 64, bf16
    python -m benchmarks.kernels.compiled_report --head-dim 128 --out benchmarks/results/compiled --name d128

Every kernel (forward, dk/dv, dq, and the delta pre-pass) of every mask variant the model uses is compiled
through the project's own launchers (`kernels._t5_attention_launch.forward` / `backward`, so the tile choice
of `_blocks` and triton's real runtime specialisation -- 16-byte alignment of pointers, divisibility of the
integer arguments -- are the ones a GPU run gets): a fake sm_90 driver stands in for CUDA and every
`kernel[grid](...)` becomes `kernel.run(..., warmup=True)` (compile, never launch). Triton's bundled
ptxas assembles the PTX and its cuobjdump reads back the cubin. Beside them, in the same run, a plain
flash-attention forward of our own (no bias, no mask; `_plain_flash_fwd` below) compiled the same way with the
same tiles, and once with the 128 x 64, 3-stage tiles of published Hopper flash kernels: the yardstick.

Per kernel: registers and stack (spill) bytes per thread, spill loads/stores (LDL/STL) in SASS, shared memory,
wgmma count (HGMMA in SASS), asynchronous copies (LDGSTS = cp.async, UTMALDG/UBLKCP = TMA; and the
`async_copy` ops in TTGIR), MUFU (exp2/log2/rcp) and barrier counts, and the SASS instruction count.
`--space` adds the rows of every other tile of the autotuning space (kernels/_t5_attention_tune.py), kernel
by kernel. Writes `<out>/<name>.json` and `<out>/<name>.md`; prints the Markdown table. `--compare BEFORE AFTER` prints
the before/after table of two such JSON files.

Counts are static (instructions in the binary, not executed per tile): they show whether the loop is
pipelined and on wgmma, and how much code each tile carries, not time. Timing needs a GPU
(benchmarks/kernels/bench_attention.py).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "compiled"
SCHEMA = "t5forge-compiled-report/1"
NUM_BUCKETS, MAX_DISTANCE = 32, 128

# name -> (has bias, t5_attention mask keywords as a function of (B, L) -> kwargs). Only the flags and the
# dtypes of the masks shape the compiled code; the values are plausible anyway (a padding tail, 3 segments).
VARIANTS = ("unmasked", "enc-pad", "dec-causal", "dec-causal-pad", "packed-enc", "packed-dec", "cross-pad",
            "cross-packed")
MASKED = tuple(v for v in VARIANTS if v != "unmasked")


def _variant_kwargs(name: str, batch: int, length: int):
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[:, length - length // 8:] = False                       # a padding tail of 1/8
    third = (length + 2) // 3
    idx = torch.arange(length)
    seg = ((idx // third + 1) * pad).contiguous()                # 3 segments, 0 on the padding tail
    pos = (idx - idx // third * third).expand(batch, length).contiguous()   # restarting in each segment
    packed = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    table = {
        "unmasked": (True, True, {}),
        "enc-pad": (True, True, dict(key_padding_mask=pad)),
        "dec-causal": (True, False, dict(causal=True)),
        "dec-causal-pad": (True, False, dict(causal=True, key_padding_mask=pad)),
        "packed-enc": (True, True, dict(packed, key_padding_mask=pad)),
        "packed-dec": (True, False, dict(packed, causal=True)),
        "cross-pad": (False, True, dict(key_padding_mask=pad)),
        "cross-packed": (False, True, dict(q_segment_ids=seg, kv_segment_ids=seg)),
    }
    if name not in table:
        raise SystemExit(f"compiled_report: unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return table[name]


# ---------------------------------------------------------------------------------------------- the yardstick
def _define_plain_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _plain_flash_fwd(Q, K, V, O, stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn,
                         stride_oh, stride_om, L, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        """softmax(q k^T * scale) v for one (batch*head, query block); no bias, no mask but the length."""
        bh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + bh * stride_qh + rows[:, None] * stride_qm + dims[None, :], mask=rows[:, None] < L,
                    other=0.0)
        k_ptr = K + bh * stride_kh + dims[:, None]
        v_ptr = V + bh * stride_vh + dims[None, :]
        run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_M], tl.float32)
        out = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for n0 in range(0, L, BLOCK_N):
            keys = n0 + cols
            kt = tl.load(k_ptr + keys[None, :] * stride_kn, mask=keys[None, :] < L, other=0.0)
            val = tl.load(v_ptr + keys[:, None] * stride_vn, mask=keys[:, None] < L, other=0.0)
            s = tl.where(keys[None, :] < L, tl.dot(q, kt) * qk_scale, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, 1))
            p = tl.exp2(s - new_max[:, None])
            corr = tl.exp2(run_max - new_max)
            run_sum = run_sum * corr + tl.sum(p, 1)
            out = out * corr[:, None] + tl.dot(p.to(val.dtype), val)
            run_max = new_max
        out = out / run_sum[:, None]
        tl.store(O + bh * stride_oh + rows[:, None] * stride_om + dims[None, :], out.to(O.dtype.element_ty),
                 mask=rows[:, None] < L)

    return _plain_flash_fwd


_PLAIN = None


def plain_flash_forward(q, k, v, scale: float = 1.0, *, block_m: int = 64, block_n: int = 32, num_warps: int = 4,
                        num_stages: int = 2):
    """The yardstick kernel's launcher: q, k, v (B, H, L, D) contiguous -> (B, H, L, D)."""
    import triton

    global _PLAIN
    if _PLAIN is None:
        _PLAIN = _define_plain_kernel()
    B, H, L, D = q.shape
    q, k, v = (t.reshape(B * H, L, D).contiguous() for t in (q, k, v))
    o = torch.empty_like(q)
    _PLAIN[(triton.cdiv(L, block_m), B * H)](
        q, k, v, o, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), L, scale * 1.4426950408889634, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages)
    return o.view(B, H, L, D)


# ------------------------------------------------------------------------------------ compiling without a GPU
class _FakeSm90Driver:
    """The few calls triton's JIT makes of its driver before launching: an sm_90 target, device 0, stream 0."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Recorder:
    """While active: `jit_fn[grid](...)` compiles (warmup=True) instead of launching, and is recorded."""

    def __init__(self):
        self.compiled: list[tuple[str, object, dict]] = []

    def __enter__(self):
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        self._jit, self._orig = JITFunction, JITFunction.__getitem__
        recorder = self

        def getitem(fn, grid):
            def compile_only(*args, **kwargs):
                kernel = fn.run(*args, grid=grid, warmup=True, **kwargs)
                launch = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
                launch.update(num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages)
                recorder.compiled.append((fn.fn.__name__, kernel, launch))
                return kernel
            return compile_only

        self._driver = driver._active   # None without a GPU: driver.reset_active() would look for a real one
        driver.set_active(_FakeSm90Driver())
        JITFunction.__getitem__ = getitem
        return self

    def __exit__(self, *exc):
        from triton.runtime import driver

        self._jit.__getitem__ = self._orig
        driver._active = self._driver
        return False


def _tool(name: str) -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def tools_available() -> bool:
    """Triton's bundled ptxas and cuobjdump are what this report needs (no CUDA toolkit, no GPU)."""
    try:
        return _tool("ptxas").exists() and _tool("cuobjdump").exists()
    except ImportError:
        return False


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")


def sass_counts(sass: str) -> dict[str, int]:
    """Opcode counts of a cuobjdump -sass listing (predicates stripped); NOPs are not instructions here."""
    ops: dict[str, int] = {}
    for m in _SASS_LINE.finditer(sass):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    ops.pop("NOP", None)
    return ops


_SASS_ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)[^;]*?(?:\s0x([0-9a-f]+))?\s*;")


def loop_bodies(sass: str) -> list[int]:
    """Instructions (NOPs excluded) of every loop body, in code order: from a backward branch's target to
    the branch. In these kernels each is one tile loop (far / near / far segment, or the mask pre-pass), so
    this is the static cost of one tile of that loop."""
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_ADDR.finditer(sass)]
    bodies = []
    for addr, op, target in instrs:
        if op == "BRA" and target is not None and int(target, 16) < addr:
            lo = int(target, 16)
            bodies.append(sum(1 for a, o, _ in instrs if lo <= a <= addr and o != "NOP"))
    return bodies


def analyse(kernel) -> dict:
    """The figures of one compiled kernel (a triton CompiledKernel with asm['cubin'], ['ttgir'], ['ptx'])."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        res = subprocess.run([str(_tool("cuobjdump")), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([str(_tool("cuobjdump")), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    ops = sass_counts(sass)
    stack, regs = re.search(r"STACK:(\d+)", res), re.search(r"REG:(\d+)", res)
    ttgir = kernel.asm["ttgir"]
    return dict(
        regs=int(regs.group(1)) if regs else -1, stack=int(stack.group(1)) if stack else -1,
        spill_ops=ops.get("LDL", 0) + ops.get("STL", 0), shared=int(kernel.metadata.shared),
        hgmma=ops.get("HGMMA", 0), mma_sync=ops.get("HMMA", 0),
        ldgsts=ops.get("LDGSTS", 0), tma=ops.get("UTMALDG", 0) + ops.get("UBLKCP", 0),
        ttgir_async=len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir)),
        mufu=ops.get("MUFU", 0), bar=ops.get("BAR", 0), sass=sum(ops.values()), loops=loop_bodies(sass),
        warps_per_cta=sorted(set(re.findall(r"warpsPerCTA = \[([0-9, ]+)\]", ttgir))),
    )


# --------------------------------------------------------------------------------------------- the report
class _ForcedTiles:
    """While active, the launchers' tile choice (kernels/_t5_attention_tune.py:choose) returns `tiles[kernel]`
    for the kernels named there and the default for the others."""

    def __init__(self, tiles: dict):
        self.tiles = tiles

    def __enter__(self):
        from kernels import _t5_attention_tune as tune

        self._tune, self._choose = tune, tune.choose
        tune.choose = lambda key, default, launch, device, **_kw: self.tiles.get(key.kernel, default)
        return self

    def __exit__(self, *exc):
        self._tune.choose = self._choose
        return False


def _compile_variant(name, batch, heads, length, head_dim, dtype, tiles=None):
    """Compile forward + backward of one variant through kernels.t5_attention's launchers (with `tiles`,
    {kernel: Tile}, instead of the defaults where given)."""
    from kernels import _t5_attention_launch as L
    from kernels import t5_attention as T

    has_bias, bidirectional, masks = _variant_kwargs(name, batch, length)
    q = torch.zeros(batch, length, heads, head_dim, dtype=dtype).transpose(1, 2)   # the model's layout
    k, v = torch.zeros_like(q), torch.zeros_like(q)
    table = torch.zeros(NUM_BUCKETS, heads) if has_bias else None
    buckets = T._bucket_table(bidirectional, NUM_BUCKETS, MAX_DISTANCE, "cpu") if has_bias else None
    meta = T._make_meta(batch, length, length, bidirectional=bidirectional, num_buckets=NUM_BUCKETS,
                        max_distance=MAX_DISTANCE, scale=1.0, key_padding_mask=masks.get("key_padding_mask"),
                        causal=masks.get("causal", False), prefix_lengths=None,
                        q_segment_ids=masks.get("q_segment_ids"), kv_segment_ids=masks.get("kv_segment_ids"),
                        q_positions=masks.get("q_positions"), kv_positions=masks.get("kv_positions"), q_offset=0,
                        deterministic=False, dropout_p=0.0, streams=batch * heads, device="cpu")
    rel = T._relative_bias(table, buckets) if has_bias else None
    with _Recorder() as rec, _ForcedTiles(tiles or {}):
        o, lse = L.forward(q, k, v, rel, buckets, meta)
        L.backward(torch.zeros_like(o), q, k, v, o, lse, rel, buckets, meta, bias_grad=has_bias)
    names = {"_fwd_kernel": "fwd", "_bwd_delta_kernel": "delta", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}
    return [(names.get(fn, fn), kernel, launch) for fn, kernel, launch in rec.compiled]


def _compile_plain(batch, heads, length, head_dim, dtype, tiles):
    q = torch.zeros(batch, heads, length, head_dim, dtype=dtype)
    with _Recorder() as rec:
        plain_flash_forward(q, q, q, block_m=tiles[0], block_n=tiles[1], num_warps=tiles[2], num_stages=tiles[3])
    return [("fwd", kernel, launch) for _, kernel, launch in rec.compiled]


def space_rows(batch, heads, length, head_dim, tdtype, variants) -> list[dict]:
    """Rows of every autotuning tile (kernels/_t5_attention_tune.py:SPACE_D64) that is not the default, per
    variant and kernel (the tiles of its mask kind, `tune.fits_kind`), marked `space: True` (the default's
    rows are the report's own)."""
    from kernels import _t5_attention_tune as tune

    rows = []
    for name in variants:
        defaults = {k: launch for k, _, launch in _compile_variant(name, batch, heads, length, head_dim, tdtype)}
        flags = {"HAS_QPOS": "q_positions" in _variant_kwargs(name, batch, length)[2]}
        for kname, tiles in tune.SPACE_D64.items():
            d = defaults[kname]
            default = tune.Tile(d["BLOCK_M"], d["BLOCK_N"], d["num_warps"], d["num_stages"])
            for tile in tiles:
                if tile == default or not tune.fits_kind(kname, tile, flags):
                    continue
                for k, kernel, launch in _compile_variant(name, batch, heads, length, head_dim, tdtype,
                                                          {kname: tile}):
                    if k == kname:
                        rows.append(dict(variant=name, kernel=k, space=True, **launch, **analyse(kernel)))
    return rows


def build_report(batch=8, heads=12, length=512, head_dim=64, dtype="bf16", variants=VARIANTS,
                 space: bool = False) -> dict:
    """The report's rows; with `space`, also those of every autotuning tile (see `space_rows`)."""
    import triton

    from kernels import _t5_attention_launch as L

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    rows = []
    for name in variants:
        for kname, kernel, launch in _compile_variant(name, batch, heads, length, head_dim, tdtype):
            rows.append(dict(variant=name, kernel=kname, **launch, **analyse(kernel)))
    if space:
        rows += space_rows(batch, heads, length, head_dim, tdtype, variants)
    cfg = L._blocks(head_dim, length, False)
    for label, tiles in (("plain-flash (our tiles)", (cfg.fwd_m, cfg.fwd_n, cfg.fwd_warps, cfg.num_stages)),
                         ("plain-flash 128x64x3", (128, 64, 8, 3))):
        for kname, kernel, launch in _compile_plain(batch, heads, length, head_dim, tdtype, tiles):
            rows.append(dict(variant=label, kernel=kname, **launch, **analyse(kernel)))
    return dict(schema=SCHEMA, target="sm_90 (fake driver, triton's bundled ptxas)", triton=triton.__version__,
                commit=_git_commit(), shape=dict(batch=batch, heads=heads, length=length, head_dim=head_dim,
                                                 dtype=dtype), rows=rows)


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_COLUMNS = [("variant", "variant"), ("kernel", "kernel"), ("tile", None), ("warps", "num_warps"),
            ("stages", "num_stages"), ("regs", "regs"), ("stack B", "stack"), ("LDL/STL", "spill_ops"),
            ("smem B", "shared"), ("HGMMA", "hgmma"), ("HMMA", "mma_sync"), ("LDGSTS", "ldgsts"), ("TMA", "tma"),
            ("async (ttgir)", "ttgir_async"), ("MUFU", "mufu"), ("BAR", "bar"), ("SASS", "sass"),
            ("loop bodies", "loops")]


def to_markdown(report: dict) -> str:
    s = report["shape"]
    lines = [f"Compiled sm_90 code of the attention kernels (triton {report['triton']}, commit {report['commit']}), "
             f"B {s['batch']}, H {s['heads']}, L {s['length']}, d {s['head_dim']}, {s['dtype']}. Static counts.", "",
             "| " + " | ".join(c for c, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in report["rows"]:
        cells = []
        for title, key in _COLUMNS:
            if key == "variant" and r.get("space"):
                cells.append(f"{r['variant']} (tuning space)")
            elif key is None:
                cells.append(f"{r.get('BLOCK_M', '-')}x{r.get('BLOCK_N', '-')}")
            elif key == "loops":
                cells.append("/".join(map(str, r.get(key, []))) or "-")
            else:
                cells.append(str(r.get(key, "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _per_kscores(r: dict) -> str:
    """Loop bodies per 1024 scores of the kernel's tile (static instructions per thread), e.g. "54/85/54"."""
    scores = r.get("BLOCK_M", 0) * r.get("BLOCK_N", 0)
    return "/".join(str(round(n * 1024 / scores)) for n in r.get("loops", [])) if scores else "-"


def compare(before: dict, after: dict) -> str:
    """Markdown table of two reports, kernel by kernel: `before -> after` for the figures that matter."""
    old = {(r["variant"], r["kernel"]): r for r in before["rows"] if not r.get("space")}
    keys = ("regs", "stack", "ldgsts", "hgmma", "mufu", "sass")
    lines = [f"Before: commit {before['commit']}; after: commit {after['commit']}. Loop bodies per 1k scores: static "
             f"instructions per thread of each tile loop divided by the tile's scores, x 1024.", "",
             "| variant | kernel | tile | " + " | ".join(keys) + " | loop bodies / 1k scores |",
             "|" + "---|" * (len(keys) + 4)]
    for r in after["rows"]:
        b = old.get((r["variant"], r["kernel"]))
        if b is None or r["kernel"] == "delta" or r.get("space"):
            continue
        tile = f"{b.get('BLOCK_M')}x{b.get('BLOCK_N')} -> {r.get('BLOCK_M')}x{r.get('BLOCK_N')}"
        cells = [f"{b[k]} -> {r[k]}" for k in keys]
        lines.append(f"| {r['variant']} | {r['kernel']} | {tile} | " + " | ".join(cells)
                     + f" | {_per_kscores(b)} -> {_per_kscores(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64, choices=(16, 32, 64, 128))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="directory of <name>.json and <name>.md")
    ap.add_argument("--name", default=None, help="file stem (default: report-L<length>-d<head_dim>-<dtype>)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--space", action="store_true", help="also compile every tile of the autotuning space "
                    "(kernels/_t5_attention_tune.py) for each variant")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print the before/after table of two "
                    "report JSON files (compiles nothing)")
    args = ap.parse_args(argv)
    if args.compare:
        before, after = (json.loads(pathlib.Path(f).read_text()) for f in args.compare)
        print(compare(before, after))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter must be off before triton is imported: rerun without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "benchmarks.kernels.compiled_report", *(argv or sys.argv[1:])],
                              env=env, cwd=REPO).returncode
    if not tools_available():
        print("compiled_report: triton's bundled ptxas/cuobjdump not found (is triton installed?)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report = build_report(args.batch, args.heads, args.length, args.head_dim, args.dtype,
                          tuple(v for v in args.variants.split(",") if v), space=args.space)
    md = to_markdown(report)
    print(md)
    if not args.no_write:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = args.name or f"report-L{args.length}-d{args.head_dim}-{args.dtype}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{stem}.md").write_text(md)
        print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
