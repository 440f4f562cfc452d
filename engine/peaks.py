"""Datasheet peaks of accelerators: the one table that MFU is computed against, in training logs
(engine/metrics.py) and in benchmarks (benchmarks/devices.py) alike.

MFU is only as honest as its denominator: the vendor's dense figure (no 2:4 sparsity), matched by
the CUDA device name, with the matmul ceiling measured in the same run reported beside it by the benchmarks.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Dense datasheet figures for one accelerator (TFLOP/s without sparsity, TB/s of HBM)."""

    name: str
    pattern: str  # regex matched (case-insensitive) against torch.cuda.get_device_name()
    bf16_tflops: float | None  # None: no bf16 tensor cores (V100)
    fp16_tflops: float
    tf32_tflops: float | None
    fp32_tflops: float  # non-tensor-core FP32
    hbm_tbps: float
    memory_gb: float
    source: str


# Order matters: the first matching pattern wins, so the specific variants (NVL, PCIe) precede the
# generic name. Figures are the public datasheets' dense numbers (the datasheets print sparse ones
# twice as large with an asterisk).
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 NVL", r"H100.*NVL", 835.5, 835.5, 417.5, 60.0, 3.9, 94, "NVIDIA H100 datasheet"),
    DevicePeak("H100 PCIe", r"H100.*PCIe", 756.5, 756.5, 378.0, 51.2, 2.0, 80, "NVIDIA H100 datasheet"),
    DevicePeak("H100 SXM", r"H100", 989.4, 989.4, 494.7, 66.9, 3.35, 80, "NVIDIA H100 datasheet (SXM5)"),
    DevicePeak("GH200", r"GH200", 989.4, 989.4, 494.7, 66.9, 4.0, 96, "NVIDIA GH200 datasheet (HBM3)"),
    DevicePeak("H200 NVL", r"H200.*NVL", 835.5, 835.5, 417.5, 60.0, 4.8, 141, "NVIDIA H200 datasheet"),
    DevicePeak("H200 SXM", r"H200", 989.4, 989.4, 494.7, 66.9, 4.8, 141, "NVIDIA H200 datasheet (SXM)"),
    DevicePeak("B200", r"B200", 2250.0, 2250.0, 1100.0, 80.0, 8.0, 180, "NVIDIA HGX B200 datasheet"),
    DevicePeak("A100 PCIe 80GB", r"A100.*PCIE.*80", 312.0, 312.0, 156.0, 19.5, 1.935, 80, "NVIDIA A100 datasheet"),
    DevicePeak("A100 PCIe 40GB", r"A100.*PCIE", 312.0, 312.0, 156.0, 19.5, 1.555, 40, "NVIDIA A100 datasheet"),
    DevicePeak("A100 SXM 80GB", r"A100.*80", 312.0, 312.0, 156.0, 19.5, 2.039, 80, "NVIDIA A100 datasheet"),
    DevicePeak("A100 SXM 40GB", r"A100", 312.0, 312.0, 156.0, 19.5, 1.555, 40, "NVIDIA A100 datasheet"),
    DevicePeak("L40S", r"L40S", 362.05, 362.05, 183.0, 91.6, 0.864, 48, "NVIDIA L40S datasheet"),
    DevicePeak("L4", r"\bL4\b", 121.0, 121.0, 60.0, 30.3, 0.3, 24, "NVIDIA L4 datasheet"),
    DevicePeak("A10", r"\bA10\b", 125.0, 125.0, 62.5, 31.2, 0.6, 24, "NVIDIA A10 datasheet"),
    DevicePeak("RTX 4090", r"4090", 165.2, 165.2, 82.6, 82.6, 1.008, 24, "NVIDIA Ada GPU architecture whitepaper"),
    DevicePeak("V100", r"V100", None, 125.0, None, 15.7, 0.9, 32, "NVIDIA V100 datasheet (SXM2)"),
    DevicePeak("MI300X", r"MI300X", 1307.4, 1307.4, 653.7, 163.4, 5.3, 192, "AMD Instinct MI300X datasheet"),
)


def lookup_peak(device_name: str) -> DevicePeak | None:
    """The datasheet row for a device name as torch reports it, or None when the device is not listed."""
    for peak in PEAKS:
        if re.search(peak.pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None
