"""`t5forge bench gpu`: the evidence run. One command that measures what we claim, in about 8 minutes on
one GPU, because GPU time comes rarely and in small pieces.

    PYTHONPATH=.:/tmp/site python -m engine bench gpu                  # on a bare GPU machine (README)
    t5forge bench gpu --budget 300                                     # scale step counts to 5 minutes
    TRITON_INTERPRET=1 t5forge bench gpu --smoke --out /tmp/evidence   # the same code path on a CPU, seconds

In order, the results file rewritten (atomically) after each part, so a run cut short keeps what it measured:
  1. environment: device, driver, versions, what is missing; matmul and copy ceilings
  2. correctness: every kernel against its reference, compiled, bf16 and fp16, ragged shapes; the model with
     the Triton backend against the torch backend (benchmarks/evidence_checks.py)
  3. kernels: RMSNorm, the gate, the FFN block and attention against their baselines at headline shapes
  4. host_ops: aten operations per step phase and the optimizer step's time, fused vs reference
  5. model_steps: one training step of t5-v1_1-base at 512/114 bf16 by every provider, then -large and -xl
  6. decode: greedy and beam-4 tokens/s, static cache eager / compiled (CUDA graphs) vs torch.cat cache vs HF
  7. pretrain: `t5forge pretrain` of t5-v1_1-base at ZeRO-2 for its share of the budget, from its metrics
  8. t5_11b: with the time left, t5-11b on the one GPU (bf16 weights, Adafactor) for a few steps
(parts 3-8: benchmarks/evidence_runs.py). JSON, Markdown and PNG go to benchmarks/results/<device>/
(benchmarks/evidence_report.py); the last lines printed are the summary against every target.
It installs nothing: what it lacks (deepspeed, transformers) is named in part 1 and the parts that need it
say so. On a GPU the kernels run compiled: TRITON_INTERPRET set there is an error.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import time

import torch

from benchmarks import devices, evidence_checks, evidence_report, evidence_runs
from benchmarks.runner import REPO, git_commit, versions

DEFAULT_BUDGET_S = 480.0
# Share of the budget each part may use; what a part leaves goes to the next ones (t5_11b takes the rest).
SHARES = {"environment": 0.04, "correctness": 0.09, "kernels": 0.21, "host_ops": 0.04, "model_steps": 0.21,
          "decode": 0.09, "pretrain": 0.19, "t5_11b": 0.13}
NEEDED = ("triton", "deepspeed", "transformers", "matplotlib", "sentencepiece")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="t5forge bench gpu", description="the evidence run: everything, one budget")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:g}); step counts scale with it")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and models: the same code path on a CPU")
    ap.add_argument("--out", help="results directory (default benchmarks/results/<device>)")
    args = ap.parse_args(argv)
    if args.budget < 60:
        ap.error(f"--budget must be at least 60 seconds, got {args.budget:g}")
    return args


def environment(info: devices.DeviceInfo, smoke: bool) -> dict:
    lacking = evidence_runs.missing(*NEEDED)
    out = {"status": "ok", "device": info.to_json(), "versions": versions(), "missing": lacking,
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if info.kind == "cuda":
        props = torch.cuda.get_device_properties(0)
        out["cuda"] = {"capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                       "memory_gb": props.total_memory / 2 ** 30, "driver": _driver()}
    out["ceilings"] = devices.measure_ceilings(info, torch.bfloat16, smoke)
    return out


def _driver() -> str:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def check_machine(info: devices.DeviceInfo, smoke: bool) -> None:
    if info.kind == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("TRITON_INTERPRET=1 is set: on a GPU the kernels must run compiled; unset it")
    if info.kind != "cuda" and not smoke:
        raise ValueError("no CUDA device: the evidence run needs a GPU (--smoke runs its code path on a CPU)")


def run_parts(args, info: devices.DeviceInfo, results: dict, json_path: pathlib.Path, log) -> None:
    scale = args.budget / DEFAULT_BUDGET_S
    start = time.monotonic()
    peak = ceiling = 0.0
    for name, share in SHARES.items():
        spent = time.monotonic() - start
        left_shares = sum(s for n, s in SHARES.items() if list(SHARES).index(n) >= list(SHARES).index(name))
        seconds = 3600.0 if args.smoke else (args.budget - spent) * share / left_shares
        slot = evidence_runs.Slot(seconds, scale, args.smoke, info.torch_device, pathlib.Path(results["out_dir"]))
        log(f"[{spent:5.0f} s] {name} (up to {seconds:.0f} s) ...")
        t0 = time.monotonic()
        try:
            if name == "environment":
                part = environment(info, args.smoke)
                ceiling = part["ceilings"]["matmul_tflops"]
                peak = devices.peak_tflops(info, torch.bfloat16, ceiling)[0]
            elif name == "correctness":
                part = evidence_checks.run(info.torch_device, args.smoke)
            elif name == "kernels":
                part = evidence_runs.kernels(slot)
            elif name == "host_ops":
                part = evidence_runs.host_ops(slot)
            elif name == "model_steps":
                part = evidence_runs.model_steps(slot, peak, ceiling)
            elif name == "decode":
                part = evidence_runs.decode(slot)
            elif name == "pretrain":
                part = evidence_runs.pretrain(slot)
            else:
                part = evidence_runs.eleven_b(slot, peak)
        except Exception as e:  # noqa: BLE001 -- a broken part is a result; the run goes on
            part = {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            devices_free(info)
        part["seconds"] = time.monotonic() - t0
        results["parts"][name] = part
        results["elapsed_s"] = time.monotonic() - start
        evidence_runs.write_json(json_path, results)
        log(f"        {name}: {part['status']} {part.get('reason', '')} ({part['seconds']:.1f} s)")


def devices_free(info: devices.DeviceInfo) -> None:
    if info.kind == "cuda":
        torch.cuda.empty_cache()


def run(argv: list[str], log=print) -> dict[str, pathlib.Path]:
    args = parse_args(argv)
    info = devices.detect_device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    check_machine(info, args.smoke)
    out_dir = pathlib.Path(args.out) if args.out else REPO / "benchmarks" / "results" / info.slug
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file; give a directory for the results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    base = out_dir / f"evidence{'-smoke' if args.smoke else ''}-{stamp.strftime('%Y-%m-%dT%H%M')}"
    results = {"schema": "t5forge-evidence/1", "command": "t5forge bench gpu " + " ".join(argv),
               "date": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), "git_commit": git_commit(), "smoke": args.smoke,
               "budget_s": args.budget, "out_dir": str(out_dir), "parts": {}}
    paths = {"json": base.with_suffix(".json")}
    log(f"t5forge bench gpu: {info.name}; budget {args.budget:g} s; results -> {paths['json']}")
    run_parts(args, info, results, paths["json"], log)
    lines = evidence_report.summary(results)
    results["summary"] = lines
    evidence_runs.write_json(paths["json"], results)
    paths["markdown"] = base.with_suffix(".md")
    paths["markdown"].write_text(evidence_report.markdown(results, lines))
    png = evidence_report.plot(results, base.with_suffix(".png"))
    if png is not None:
        paths["png"] = png
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    log("summary against the targets (docs/ANCHORS.md):")
    for line in lines:
        log(f"  {line}")
    return paths


def main(argv: list[str]) -> int:
    from engine.errors import USER_ERRORS, report

    try:
        run(argv)
    except USER_ERRORS as e:
        return report("bench gpu", e)
    return 0
