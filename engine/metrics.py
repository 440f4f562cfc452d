"""Training metrics: RUN_DIR/metrics.jsonl (one JSON object per logged step), TensorBoard when installed,
and model FLOPs utilisation.

MFU = achieved model FLOPs / peak FLOPs, with the model FLOPs from the config's training FLOPs per
token (forward + backward, no recomputation counted: the PaLM definition) times tokens per second.
"""
from __future__ import annotations

import json
import pathlib

import torch

from engine.peaks import lookup_peak

def device_peak_tflops(device: torch.device, override: float = 0.0) -> float:
    """Peak TFLOP/s of one device, or 0.0 when unknown (the CPU): then no MFU is reported."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    peak = lookup_peak(torch.cuda.get_device_name(device))   # the one table: engine/peaks.py
    return (peak.bf16_tflops or peak.fp16_tflops) if peak is not None else 0.0


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float, num_devices: int) -> float | None:
    if peak_tflops <= 0 or flops_per_token <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * num_devices)


class MetricsLogger:
    """Appends records to metrics.jsonl on rank 0 (other ranks hold a disabled logger).

    On resume, `truncate_after(step)` drops records written after the checkpoint being resumed, so the
    file of a killed-and-resumed run equals the uninterrupted run's.
    """

    def __init__(self, run_dir: pathlib.Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
