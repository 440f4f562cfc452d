"""What the machine can do at best: datasheet peaks and a measured matmul ceiling.

MFU is only as honest as its denominator. We report it against the vendor's dense (no 2:4 sparsity)
bf16 peak, and put the matmul ceiling measured in the same run beside it, because no real kernel reaches
the datasheet: on an H100 80GB HBM3 a bf16 8192^3 matmul reaches about 798 of the 989 TFLOP/s
(docs/ANCHORS.md). CPUs have no datasheet row; there the measured ceiling is the peak and
the report says so.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import time

import torch

from engine.peaks import DevicePeak, lookup_peak  # noqa: F401 -- one peak table, engine/peaks.py


def slugify(name: str) -> str:
    """A directory name for a device: `NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def host_memory_bytes() -> tuple[int, int]:
    """(total, available) host RAM from /proc/meminfo; (0, 0) where it cannot be read."""
    values = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@dataclasses.dataclass
class DeviceInfo:
    """The device a benchmark ran on, as written into every results file."""

    kind: str  # "cuda" or "cpu"
    name: str
    slug: str  # results directory name: "cpu" for any CPU, else the slugified GPU name
    memory_bytes: int  # device memory (host RAM for the CPU)
    host_memory_bytes: int
    cpu_count: int
    threads: int
    peak: DevicePeak | None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind)

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "slug": self.slug, "memory_bytes": self.memory_bytes,
                "host_memory_bytes": self.host_memory_bytes, "cpu_count": self.cpu_count,
                "threads": self.threads, "peak": dataclasses.asdict(self.peak) if self.peak else None}


def detect_device(kind: str | None = None) -> DeviceInfo:
    """The CUDA device when there is one (or `kind` says so), else the CPU."""
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"benchmarks/devices.py: unknown device kind {kind!r}; use 'cuda' or 'cpu'")
    host_total, _ = host_memory_bytes()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("benchmarks/devices.py: --device cuda asked for, but torch sees no CUDA device")
        props = torch.cuda.get_device_properties(0)
        name = props.name
        return DeviceInfo("cuda", name, slugify(name), props.total_memory, host_total, os.cpu_count() or 1,
                          torch.get_num_threads(), lookup_peak(name))
    # All CPU results share one directory: the model name goes into the JSON, and CPU figures are only
    # ever a smoke or ratio check, never the published throughput.
    return DeviceInfo("cpu", _cpu_name(), "cpu", host_total, host_total, os.cpu_count() or 1,
                      torch.get_num_threads(), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int = 1, iters: int = 3) -> float:
    """Median wall seconds of `fn()` after `warmup` calls, synchronising the device around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                          iters: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n matmul: the ceiling that MFU is compared with in the report."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: torch.mm(a, b), device, warmup=2, iters=iters)
    return 2.0 * n ** 3 / seconds / 1e12


def measure_copy_tbps(device: torch.device, n_bytes: int = 1 << 30, iters: int = 10) -> float:
    """Achieved TB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 2, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warmup=2, iters=iters)
    return 2.0 * src.numel() * src.element_size() / seconds / 1e12


def measure_ceilings(info: DeviceInfo, dtype: torch.dtype, smoke: bool) -> dict:
    """Matmul and copy ceilings for the results file; small sizes in smoke mode and on the CPU."""
    device = info.torch_device
    big = info.kind == "cuda" and not smoke
    n = 8192 if big else (256 if smoke else 1024)
    copy_bytes = (1 << 30) if big else (1 << 22 if smoke else 1 << 26)
    iters = 10 if big else 3
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_tflops": measure_matmul_tflops(device, dtype, n, iters),
            "copy_bytes": copy_bytes, "copy_tbps": measure_copy_tbps(device, copy_bytes, iters)}


def peak_tflops(info: DeviceInfo, dtype: torch.dtype, measured_matmul_tflops: float) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from) for the MFU denominator."""
    if info.peak is not None:
        table = {torch.bfloat16: info.peak.bf16_tflops, torch.float16: info.peak.fp16_tflops,
                 torch.float32: info.peak.tf32_tflops or info.peak.fp32_tflops}
        value = table.get(dtype)
        if value:
            return value, f"datasheet dense {str(dtype).replace('torch.', '')} ({info.peak.source})"
    return measured_matmul_tflops, "measured matmul ceiling (no datasheet peak for this device)"
