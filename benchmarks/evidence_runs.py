"""Parts 3-6 of `t5forge bench gpu`: kernel timings, training steps, a real pretraining run, t5-11b.

Each function takes a `Slot` (seconds this part may use, the scale of its step counts, smoke or not) and
returns a JSON-able dict with a `status`. Nothing here installs anything; a missing package is a status
('missing: ...') naming it, and the other parts still run.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import devices, model_providers, model_suite

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Slot:
    seconds: float      # what this part may use
    scale: float        # step counts multiply by this (--budget / the default budget)
    smoke: bool
    device: torch.device
    out_dir: pathlib.Path

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def __post_init__(self):
        self.start = time.monotonic()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def steps(self, n: int, least: int = 1) -> int:
        return max(least, round(n * self.scale))


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


# ------------------------------------------------------------------------------------------ kernels
def kernels(slot: Slot) -> dict:
    """RMSNorm and the gate against eager and torch.compile (GB/s vs the copy ceiling), the FFN block with
    its activation memory, attention against SDPA + bias, Flex and no-bias flash; headline shapes only."""
    from benchmarks.kernels import bench_attention, bench_gated_ffn, bench_rms_norm

    out, smoke = {}, slot.smoke
    jobs = [
        ("rms_norm", lambda: bench_rms_norm.run(smoke, slot.out_dir, widths=None if smoke else [768, 4096])),
        ("gated_ffn", lambda: bench_gated_ffn.run(smoke, slot.out_dir, gate_widths=None if smoke else [2048],
                                                  blocks=None if smoke else ["v1_1-base"])),
        ("attention", lambda: bench_attention.run(smoke, slot.out_dir, lengths=None if smoke else [512, 2048],
                                                  head_dims=None if smoke else [64])),
    ]
    for name, job in jobs:
        if slot.left() <= 0:
            out[name] = {"status": "skipped", "reason": "out of this part's time"}
            continue
        start = time.monotonic()
        try:
            out[name] = {"status": "ok", "records": job()}
        except Exception as e:  # noqa: BLE001 -- one broken benchmark must not hide the others
            out[name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        out[name]["seconds"] = time.monotonic() - start
    from kernels._t5_attention_tune import choices

    # The attention tiles the autotuner chose on this GPU, per key (none under the interpreter).
    out["attention_tiles"] = [{"key": [str(x) for x in key], "tile": dataclasses.asdict(tile)}
                              for key, tile in choices().items()]
    return {"status": "ok", **out}


# ------------------------------------------------------------------------------------------- host ops
def host_ops(slot: Slot) -> dict:
    """Aten operations per step phase (benchmarks/op_counts.py) for t5-v1_1-base on this device, with the
    optimizer step's time, fused against the reference implementation (tiny with --smoke)."""
    from benchmarks.op_counts import count_step_ops

    preset = "tiny" if slot.smoke else "t5-v1_1-base"
    return {"status": "ok", **count_step_ops(preset, slot.device, time_repeats=slot.steps(5, least=2))}


# ------------------------------------------------------------------------------------ training steps
def model_steps(slot: Slot, peak: float, ceiling: float) -> dict:
    """One training step of t5-v1_1-base at 512/114 bf16 by every provider, then -large and -xl (ours)."""
    lacking = missing("deepspeed", "transformers")
    providers = [p for p in model_providers.PROVIDERS
                 if not (p == "t5forge" and "deepspeed" in lacking) and not (p.startswith("hf") and "transformers" in lacking)]
    info = devices.detect_device(slot.device.type)
    plan = [("tiny", providers)] if slot.smoke else [
        ("t5-v1_1-base", providers), ("t5-v1_1-large", ["t5forge", "t5forge-torch"]),
        ("t5-v1_1-xl", ["t5forge", "t5forge-torch"])]
    records = []
    for preset, provs in plan:
        if slot.left() <= 0:
            records.append({"preset": preset, "status": "skipped", "reason": "out of this part's time"})
            continue
        scfg = model_suite.ModelSuiteConfig(
            presets=(preset,), providers=tuple(p for p in provs if p in providers),
            batch_size=2 if slot.smoke else 16, inputs_length=32 if slot.smoke else 512,
            targets_length=8 if slot.smoke else 114, warmup=1 if slot.smoke else 2,
            steps=slot.steps(2 if slot.smoke else 5, least=2), offload="never")
        records += model_suite.run(scfg, info, peak, ceiling, log=lambda *_: None)
    return {"status": "ok", "records": records,
            **({"missing": f"not importable: {', '.join(lacking)} (their providers left out)"} if lacking else {})}


# ------------------------------------------------------------------------------------------- decoding
def decode(slot: Slot) -> dict:
    """Greedy and beam-4 decoding tokens/s: static cache eager and compiled (CUDA graphs on a GPU), the
    torch.cat cache and transformers (benchmarks/decode_bench.py)."""
    from benchmarks import decode_bench

    rows = decode_bench.run(slot.device, slot.smoke, budget_s=max(5.0, slot.left()), log=lambda *_: None)
    return {"status": "ok", "records": rows}


# ------------------------------------------------------------------------------------------ pretrain
def pretrain(slot: Slot) -> dict:
    """`t5forge pretrain` of t5-v1_1-base from its ready config at ZeRO-2 on one device, as a user runs it
    (the built-in corpus), for the part's time: tokens/s and MFU from its own metrics.jsonl."""
    if missing("deepspeed"):
        return {"status": "missing", "reason": "deepspeed is not importable (carry its wheels: README)"}
    from engine.metrics import read_metrics

    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="t5forge-evidence-"))
    argv = ["--config", str(REPO / "engine/configs" / ("tiny.toml" if slot.smoke else "t5-v1_1-base.toml")),
            "--run.engine", "deepspeed", "--deepspeed.zero_stage", "2", "--run.dir", str(run_dir),
            "--run.max_steps", "4" if slot.smoke else "1000000", "--run.log_every", "1" if slot.smoke else "10",
            "--run.demo", "false", "--run.progress", "false", "--run.tensorboard", "false",
            "--checkpoint.every", "1000000", "--deepspeed.precision", "bf16"]
    if slot.smoke:
        argv += ["--model.kernel_backend", "torch"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(model_providers.free_port()))  # a fixed one may be held
    log = run_dir / "stdout.log"
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "engine.train", *argv], cwd=REPO, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=max(10.0, slot.left() - 30))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)   # the trainer saves a checkpoint and exits; its metrics stay
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - start
    rows = [r for r in read_metrics(run_dir) if "tokens_per_s" in r] if (run_dir / "metrics.jsonl").exists() else []
    tail = log.read_text(errors="replace").splitlines()[-5:]
    if not rows:
        return {"status": "error", "reason": f"no metrics (exit {proc.returncode})", "log_tail": tail,
                "seconds": seconds}
    steady = rows[1:] or rows   # the first record includes start-up
    tps = sorted(r["tokens_per_s"] for r in steady)
    mfus = sorted(r["mfu"] for r in steady if "mfu" in r)
    return {"status": "ok", "command": "python -m engine.train " + " ".join(argv), "seconds": seconds,
            "exit_code": proc.returncode, "steps": rows[-1]["step"], "records": len(rows),
            "tokens_per_s_median": tps[len(tps) // 2], "mfu_median": mfus[len(mfus) // 2] if mfus else None,
            "last_loss": rows[-1]["loss"], "log_tail": tail}


# --------------------------------------------------------------------------------------------- t5-11b
def eleven_b(slot: Slot, peak: float) -> dict:
    """t5-11b on the one device: bf16 weights, Adafactor (factored: no fp32 moments), activation checkpointing,
    a few steps at 512/114; tokens/s, MFU and peak memory. tiny with --smoke."""
    from benchmarks.model_providers import make_batch
    from engine.config import OptimSection
    from engine.optim import build_optimizer
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    if slot.left() < (0 if slot.smoke else 120):
        return {"status": "skipped", "reason": f"{slot.left():.0f} s left; t5-11b needs about 2 minutes"}
    preset, batch_size, lq, lt = ("tiny", 2, 32, 8) if slot.smoke else ("t5-11b", 8, 512, 114)
    cfg = T5Config.from_preset(preset).replace(dropout_rate=0.0, gradient_checkpointing=True)
    dev = slot.device
    torch.manual_seed(0)
    with torch.device(dev):
        model = T5ForConditionalGeneration(cfg).to(torch.bfloat16).train()
    opt = build_optimizer(model.parameters(), OptimSection(name="adafactor"))
    batch = make_batch(cfg, batch_size, lq, lt, dev)
    times, losses = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2 + slot.steps(3)):
        devices._sync(dev)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        devices._sync(dev)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if slot.left() <= 0:
            break
    timed = sorted(times[1:] or times)
    step_s = timed[len(timed) // 2]
    flops = model_suite.training_flops(cfg, batch_size, lq, lt)
    out = {"status": "ok", "preset": preset, "batch_size": batch_size, "inputs_length": lq, "targets_length": lt,
           "precision": "bf16 weights and grads, Adafactor (factored) states", "gradient_checkpointing": True,
           "steps": len(times), "step_s": step_s, "tokens_per_s": batch_size * (lq + lt) / step_s,
           "mfu": flops / step_s / 1e12 / peak if peak else None, "losses": losses,
           "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None}
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def write_json(path: pathlib.Path, data: dict) -> None:
    """Atomically: a run cut short leaves the previous complete file, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
