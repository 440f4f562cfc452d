"""Which implementation of each fused op the model runs: the Triton kernels or their PyTorch references.

The model imports both directly and decides once per device (`choose_kernels`, a pure function of the
config and the device, so torch.compile folds it): the chosen `Kernels` is then carried explicitly from
the model's entry points through every stack, block and sub-layer. `config.kernel_backend`:

- "torch": the references everywhere; attention materialises its bias and mask once per stack.
- "triton": every Triton kernel, or an error naming why one cannot run (no triton, a CPU without the
  interpreter, a head width the attention kernel does not take). Never a silent fallback.
- "auto": Triton on CUDA devices where triton imports, the references elsewhere. A head width the flash
  kernel does not take keeps the references for attention alone; `Kernels.note` says so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from kernels._triton_utils import why_triton_cannot_run
from kernels.ffn import ffn, ffn_ref
from kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.t5_attention import SUPPORTED_HEAD_DIMS, t5_attention

from .config import T5Config


@dataclass(frozen=True)
class Kernels:
    """The functions one forward pass uses. `attention` None: the reference path (SDPA over a bias and mask
    built once per stack, models/attention_spec.py)."""

    backend: str                   # "triton" | "torch": what rms_norm / add_rms_norm / ffn are
    rms_norm: Callable
    add_rms_norm: Callable
    ffn: Callable
    attention: Callable | None
    note: str = ""                 # why "auto" kept a reference somewhere, for logs


REFERENCE = Kernels("torch", rms_norm_ref, add_rms_norm_ref, ffn_ref, None)
TRITON = Kernels("triton", rms_norm, add_rms_norm, ffn, t5_attention)


def choose_kernels(config: T5Config, device: torch.device) -> Kernels:
    """The kernels for a model with `config` whose activations live on `device` (see the module doc)."""
    backend = config.kernel_backend
    if backend == "torch":
        return REFERENCE
    why = why_triton_cannot_run(device)
    head_ok = config.d_kv in SUPPORTED_HEAD_DIMS
    if backend == "triton":
        if why is not None:
            raise ValueError(f"kernel_backend='triton': {why}; use kernel_backend='torch' or 'auto'")
        if not head_ok:
            raise ValueError(f"kernel_backend='triton': the attention kernel takes head dims {SUPPORTED_HEAD_DIMS}, "
                             f"the config has d_kv={config.d_kv}; use kernel_backend='auto' (reference attention)")
        return TRITON
    if why is not None or device.type != "cuda":
        return REFERENCE
    if not head_ok:
        return dataclasses.replace(TRITON, attention=None,
                                   note=f"attention: PyTorch reference (the flash kernel takes head dims "
                                        f"{SUPPORTED_HEAD_DIMS}, d_kv is {config.d_kv})")
    return TRITON


def describe(kernels: Kernels) -> str:
    """One line for start-up logs: which implementation each op runs."""
    attention = "flash kernel" if kernels.attention is not None else "PyTorch reference"
    text = f"kernels: {kernels.backend} (RMSNorm, FFN), attention: {attention}"
    return f"{text}; {kernels.note}" if kernels.note else text
