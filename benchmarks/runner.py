"""`t5forge bench`: run the kernel and model suites, write results JSON + Markdown report + plots.

    t5forge bench all                         # everything, results under benchmarks/results/<device>/
    t5forge bench model --presets t5-v1_1-base,t5-v1_1-large --batch-size 16
    t5forge bench all --smoke                 # tiny shapes, seconds: what CI runs
    t5forge bench gpu                         # the evidence run: everything we claim, ~8 minutes on one GPU
    t5forge bench model --device cpu --presets t5-small --batch-size 2 --steps 3 --out benchmarks/results/cpu
    t5forge bench model --presets t5-11b --offload never     # depth-reduced extrapolation, no CPU offload

The model suite's `t5forge` provider trains through DeepSpeed on one rank with each preset's ready config
(engine/configs/<preset>.toml) and --batch-size as its micro-batch; see benchmarks/model_providers.py
(how each provider is built and timed) and benchmarks/model_suite.py (how each preset is measured).

Kernel benchmarks are modules `benchmarks/kernels/bench_*.py`, each exposing
`run(smoke: bool, out_dir) -> list[dict]` records ({"kernel", "provider", "shape", "pass", "ms",
"gbps" | "tflops", "peak_mem_mb"}). A module that is absent or fails is reported as such in the results,
never replaced by made-up numbers.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import pathlib
import platform
import subprocess

import torch

from benchmarks import devices, model_providers, model_suite, report

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("bench_rms_norm", "bench_gated_ffn", "bench_attention")
SUITES = ("kernels", "model", "all")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    for name in ("triton", "deepspeed", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_kernels(smoke: bool, out_dir: pathlib.Path, log=print) -> dict:
    """Every kernel benchmark module's records; modules[name] says ok / missing / error."""
    records, modules = [], {}
    for name in KERNEL_MODULES:
        full = f"benchmarks.kernels.{name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:  # the module exists but something it imports does not
                modules[name] = f"error: {e}"
            else:
                modules[name] = "missing: module not written yet"
            log(f"kernels: {name}: {modules[name]}")
            continue
        if not callable(getattr(module, "run", None)):
            modules[name] = "error: module has no run(smoke, out_dir)"
            continue
        try:
            got = module.run(smoke=smoke, out_dir=out_dir)
        except Exception as e:  # noqa: BLE001 -- one broken benchmark must not hide the others
            modules[name] = f"error: {type(e).__name__}: {e}"
            log(f"kernels: {name}: {modules[name]}")
            continue
        bad = [r for r in got if not isinstance(r, dict) or "kernel" not in r or "provider" not in r]
        if bad:
            modules[name] = f"error: {len(bad)} record(s) without 'kernel'/'provider'"
            continue
        modules[name] = f"ok: {len(got)} record(s)"
        log(f"kernels: {name}: {modules[name]}")
        records.extend(got)
    return {"modules": modules, "records": records}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="t5forge bench", description="kernel and model benchmark suites")
    ap.add_argument("suite", nargs="?", default="all", choices=SUITES)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and the tiny preset: seconds, any device")
    ap.add_argument("--out", help="results directory (default benchmarks/results/<device>)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    ap.add_argument("--presets", help="comma-separated presets (default: all ten; --smoke: tiny)")
    ap.add_argument("--providers", default=",".join(model_providers.PROVIDERS),
                    help=f"comma-separated, from {','.join(model_providers.PROVIDERS)}")
    ap.add_argument("--batch-size", type=int, help="sequences per step (default 8; --smoke 2)")
    ap.add_argument("--inputs-length", type=int, help="default 512 (--smoke 32)")
    ap.add_argument("--targets-length", type=int, help="default 114 (--smoke 8)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, help="timed steps (default 5; --smoke 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 2; --smoke 1)")
    ap.add_argument("--memory-limit-gb", type=float, help="plan against this much device memory instead")
    ap.add_argument("--host-memory-limit-gb", type=float,
                    help="plan CPU offload against this much host memory instead of what is available")
    ap.add_argument("--offload", choices=model_suite.OFFLOAD_CHOICES, default="auto",
                    help="t5forge provider: ZeRO-3 + CPU offload of optimizer and parameters; auto = only for "
                         "presets whose own config does not fit the GPU and whose states fit the host (default)")
    ap.add_argument("--compile-on-cpu", action="store_true", help="also run the torch.compile baseline on CPU")
    return ap.parse_args(argv)


def suite_config(args: argparse.Namespace) -> model_suite.ModelSuiteConfig:
    def pick(value, smoke_default, default):
        return value if value is not None else (smoke_default if args.smoke else default)

    presets = tuple(p for p in (args.presets or ("tiny" if args.smoke else ",".join(model_suite.PRESETS))).split(",")
                    if p)
    providers = tuple(p for p in args.providers.split(",") if p)
    unknown = [p for p in providers if p not in model_providers.PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown {', '.join(unknown)}; "
                         f"one of {', '.join(model_providers.PROVIDERS)}")
    from models.config import PRESETS

    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"--presets: unknown {', '.join(unknown)}; one of {', '.join(PRESETS)}")
    scfg = model_suite.ModelSuiteConfig(
        presets=presets, providers=providers, batch_size=pick(args.batch_size, 2, 8),
        inputs_length=pick(args.inputs_length, 32, 512), targets_length=pick(args.targets_length, 8, 114),
        dtype=DTYPES[args.dtype], warmup=pick(args.warmup, 1, 2), steps=pick(args.steps, 2, 5),
        memory_limit_gb=args.memory_limit_gb, host_memory_limit_gb=args.host_memory_limit_gb,
        compile_on_cpu=args.compile_on_cpu, offload=args.offload)
    for name in ("batch_size", "inputs_length", "targets_length", "steps"):
        if getattr(scfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(scfg, name)}")
    if scfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {scfg.warmup}")
    for name in ("memory_limit_gb", "host_memory_limit_gb"):
        value = getattr(scfg, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 GiB, got {value:g}")
    return scfg


def results_dir(args: argparse.Namespace, slug: str) -> pathlib.Path:
    """--out (or benchmarks/results/<device>), checked before any measurement: it must be a directory."""
    out_dir = pathlib.Path(args.out) if args.out else REPO / "benchmarks" / "results" / slug
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out_dir}: {parent} is a file, not a directory")
    return out_dir


def run_bench(argv: list[str], log=print) -> dict[str, pathlib.Path]:
    """Run the suites `argv` asks for; returns the written files (json, markdown, plots)."""
    args = parse_args(argv)
    scfg = suite_config(args)
    info = devices.detect_device(args.device)
    out_dir = results_dir(args, info.slug)
    log(f"device: {info.name} ({info.kind}); results -> {out_dir}")
    ceilings = devices.measure_ceilings(info, scfg.dtype, args.smoke)
    peak, source = devices.peak_tflops(info, scfg.dtype, ceilings["matmul_tflops"])
    log(f"matmul ceiling {ceilings['matmul_tflops']:.2f} TFLOP/s; peak for MFU {peak:.1f} ({source})")
    results = {
        "schema": report.SCHEMA, "suite": args.suite, "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(), "command": "t5forge bench " + " ".join(argv),
        "device": info.to_json(), "versions": versions(), "ceilings": ceilings,
        "peak": {"tflops": peak, "source": source},
        "config": {"batch_size": scfg.batch_size, "inputs_length": scfg.inputs_length,
                   "targets_length": scfg.targets_length, "dtype": args.dtype, "steps": scfg.steps,
                   "warmup": scfg.warmup, "presets": list(scfg.presets), "providers": list(scfg.providers),
                   "offload": scfg.offload, "memory_fraction": scfg.memory_fraction},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.suite in ("kernels", "all"):
        results["kernels"] = run_kernels(args.smoke, out_dir, log)
    if args.suite in ("model", "all"):
        results["model"] = {"records": model_suite.run(scfg, info, peak, ceilings["matmul_tflops"], log)}
    paths = report.write_report(results, out_dir)
    log(f"wrote {paths['json']} and {paths['markdown']}")
    return paths


def bench_main(argv: list[str]) -> int:
    if argv[:1] == ["gpu"]:   # the evidence run: its own options and budget (benchmarks/evidence.py)
        from benchmarks import evidence

        return evidence.main(argv[1:])
    from engine.errors import USER_ERRORS, report

    try:
        run_bench(argv)
    except USER_ERRORS as e:
        return report("bench", e)
    return 0
