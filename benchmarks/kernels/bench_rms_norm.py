"""RMSNorm benchmark: ours (Triton) vs eager PyTorch vs torch.compile, forward / backward / full.

    python -m benchmarks.kernels.bench_rms_norm                 # GPU: 16k rows, widths 768..4096, bf16
    python -m benchmarks.kernels.bench_rms_norm --smoke         # CPU smoke (CI): tiny shapes, interpreter
    python -m benchmarks.kernels.bench_rms_norm --out benchmarks/results

Reports ms (median), effective GB/s over the ideal bytes a fused kernel must move (the same byte count for
every provider, so GB/s compares like with like), that figure as a % of the device copy bandwidth measured
in the same run (the issue-3 target: >= 85%), peak CUDA memory of the pass and the bytes saved for backward.
Results go to `<out>/rms_norm_<device>_<date>.json`. The timing helpers here are shared with
bench_gated_ffn.py.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from benchmarks.compiled import PerShapeCompiled  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "results"


# ------------------------------------------------------------------------------------ shared helpers
def bench_device(smoke: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ours_available(device: torch.device) -> bool:
    from kernels._triton_utils import triton_available

    return triton_available(torch.empty(0, device=device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, smoke: bool,
            grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median wall time of `fn` in ms. On CUDA triton's do_bench (L2 flushed between runs)."""
    if device.type == "cuda" and not smoke:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for i in range(4 if smoke else 20):
        for t in grad_to_none or ():
            t.grad = None
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i:  # the first call pays compilation / caches
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mem_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory above what was allocated before the call (None on the CPU: not measurable)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def saved_bytes(fn: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `fn` (activation memory),
    not counting `exclude` (parameters and inputs that live anyway)."""
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def copy_bandwidth(device: torch.device, smoke: bool) -> dict:
    """Device-to-device copy, bytes read + written per second (the '% of bandwidth' denominator)."""
    n = (1 << 20) if smoke else (1 << 28)  # 1 GiB of fp32 on the GPU: far beyond L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, smoke)
    gbps = 2 * src.numel() * src.element_size() / ms / 1e6  # bytes read + written per ms -> GB/s
    return {"kernel": "copy", "provider": "torch", "shape": [n], "dtype": "float32", "pass": "copy",
            "ms": round(ms, 5), "gbps": round(gbps, 2), "pct_copy_bw": 100.0, "tflops": None,
            "peak_mem_mb": None, "saved_mb": None, "device": device_name(device)}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_results(kernel: str, records: list[dict], out_dir, device: torch.device, extra: dict) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(device).replace(" ", "_").replace("/", "_")
    path = out / f"{kernel}_{name}_{datetime.date.today().isoformat()}.json"
    meta = {"device": device_name(device), "torch": torch.__version__, "date": datetime.datetime.now().isoformat(),
            **extra}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return path


def measure(kernel: str, provider: str, shape, dtype, device, smoke: bool, make: Callable, nbytes: dict | None,
            copy_gbps: float, exclude: Callable[[tuple], list], flops: dict | None = None) -> list[dict]:
    """Time forward, backward and full pass of `make() -> (inputs, forward_fn)`; one record per pass.
    `nbytes` / `flops` per pass give GB/s (memory-bound kernels) / TFLOP/s (GEMM blocks)."""
    inputs, forward = make()
    leaves = [t for t in inputs if t.requires_grad]

    def full():
        outs = forward()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    outs = forward()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    records = []
    passes = {
        "forward": (lambda: forward(), None),
        "backward": (lambda: torch.autograd.backward(outs, grads, retain_graph=True), leaves),
        "full": (full, leaves),
    }
    for name, (fn, to_none) in passes.items():
        ms = time_ms(fn, device, smoke, grad_to_none=to_none)
        gbps = nbytes[name] / ms / 1e6 if nbytes else None
        rec = {"kernel": kernel, "provider": provider, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
               "pass": name, "ms": round(ms, 5), "gbps": None if gbps is None else round(gbps, 2),
               "pct_copy_bw": round(100 * gbps / copy_gbps, 1) if copy_gbps and gbps else None,
               "tflops": round(flops[name] / ms / 1e9, 2) if flops else None,
               "peak_mem_mb": None, "saved_mb": None, "device": device_name(device)}
        if name == "full":
            for t in leaves:
                t.grad = None
            rec["peak_mem_mb"] = peak_mem_mb(full, device)
            rec["saved_mb"] = round(saved_bytes(forward, exclude(inputs)) / 2**20, 3)
        records.append(rec)
    return records


def providers(smoke: bool, fns: dict[str, Callable], device: torch.device) -> dict[str, Callable]:
    """ours / eager / compile; compile is left out of the smoke run (minutes of inductor on the CPU)."""
    out = {}
    if ours_available(device):
        out["ours"] = fns["ours"]
    out["eager"] = fns["eager"]
    if not smoke or os.environ.get("T5FORGE_BENCH_COMPILE") == "1":
        out["compile"] = PerShapeCompiled(fns["eager"])
    return out


def annotate(records: list[dict], fn) -> list[dict]:
    """A compiled baseline's records say how it ran (compiled, graphs, its own recompile budget)."""
    info = fn.info() if isinstance(fn, PerShapeCompiled) else {}
    for r in records:
        r.update(info)
    return records


def cli(run: Callable, argv: list[str] | None, description: str) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter (CI)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the JSON results")
    args = parser.parse_args(argv)
    records = run(smoke=args.smoke, out_dir=args.out)
    for r in records:
        print(f"{r['kernel']:>14} {r['provider']:>15} {str(r['shape']):>18} {r['pass']:>8} {r['ms'] or 0:9.4f} ms "
              f"{r['gbps'] or 0:9.1f} GB/s {r.get('pct_copy_bw') or 0:6.1f}% copy "
              f"{r.get('tflops') or 0:7.1f} TFLOP/s  peak {r['peak_mem_mb']} MB  "
              f"saved {r['saved_mb']} MB")
    return 0


# -------------------------------------------------------------------------------------------- RMSNorm
def run(smoke: bool, out_dir=DEFAULT_OUT, widths: list[int] | None = None) -> list[dict]:
    from kernels import rms_norm as rn

    device = bench_device(smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, default_widths = (64, [64, 200]) if smoke else (16384, [768, 1024, 2048, 4096])
    widths = widths or default_widths
    records = [copy_bandwidth(device, smoke)]
    copy_gbps = records[0]["gbps"]
    kernels = {
        "rms_norm": {"ours": rn.rms_norm, "eager": rn.rms_norm_ref},
        "add_rms_norm": {"ours": rn.add_rms_norm, "eager": rn.add_rms_norm_ref},
    }
    for width in widths:
        e = torch.tensor([], dtype=dtype).element_size()
        mn = rows * width * e
        # Ideal traffic: fwd reads x, writes y (+ fp32 rstd); bwd reads x, dy, rstd, writes dx.
        nbytes = {"rms_norm": {"forward": 2 * mn + 4 * rows, "backward": 3 * mn + 4 * rows},
                  # fwd reads x, r, writes y, s; bwd reads dy, ds, s, writes one gradient for both inputs.
                  "add_rms_norm": {"forward": 4 * mn + 4 * rows, "backward": 4 * mn + 4 * rows}}
        for kernel, fns in kernels.items():
            nb = dict(nbytes[kernel], full=sum(nbytes[kernel].values()))
            for provider, fn in providers(smoke, fns, device).items():
                def make(fn=fn, kernel=kernel):
                    gen = torch.Generator(device=device).manual_seed(0)
                    x = torch.randn(rows, width, device=device, generator=gen).to(dtype).requires_grad_()
                    w = torch.ones(width, device=device, dtype=dtype, requires_grad=True)
                    if kernel == "rms_norm":
                        return (x, w), lambda: fn(x, w)
                    r = torch.randn(rows, width, device=device, generator=gen).to(dtype).requires_grad_()
                    return (x, r, w), lambda: fn(x, r, w)

                records += annotate(measure(kernel, provider, (rows, width), dtype, device, smoke, make, nb,
                                            copy_gbps, exclude=lambda inputs: list(inputs)), fn)
    write_results("rms_norm", records, out_dir, device, {"smoke": smoke, "copy_gbps": copy_gbps})
    return records


def main(argv: list[str] | None = None) -> int:
    return cli(run, argv, "RMSNorm benchmark (ours / eager / torch.compile)")


if __name__ == "__main__":
    sys.exit(main())
