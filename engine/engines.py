"""Two engines with one interface, the `Engine` protocol: DeepSpeed (any number of ranks and nodes;
engine/distributed/zero_engine.py) and a local single process (`LocalEngine`, here).

The trainer only talks to this interface, so the same `Trainer` code runs the CPU default (no
DeepSpeed start-up, no process group) and multi-node ZeRO runs, and the tests cover both:

    out = engine.forward(batch)           # the model's output (autocast applied here)
    engine.backward(loss)                 # loss of one micro-batch; accumulation is the engine's job
    info = engine.micro_step(boundary, lr)  # after every micro-batch; at the boundary applies the update
    engine.all_reduce_sum(tensor)         # across data-parallel ranks (identity locally)
    engine.loss_scale                     # fp16: the current dynamic loss scale; None otherwise
    engine.save(ckpt_root, tag) / engine.load(ckpt_root, tag)   # model + optimizer, every rank calls
    engine.load_portable(step_dir)        # the same from `t5forge reshard`'s files, on any number of ranks
"""
from __future__ import annotations

import contextlib
import pathlib
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.config import RunConfig
from engine.distributed.deepspeed_config import autocast_dtype
from engine.distributed.process_group import launched_distributed
from engine.optim_state import PORTABLE_OPTIMIZER, PORTABLE_WEIGHTS, load_named_state, read_named_state, \
    write_layout_record


@dataclass
class StepInfo:
    applied: bool  # False: the update was skipped (non-finite gradients, or an fp16 overflow)
    grad_norm: float | None


class Engine(Protocol):
    """What the Trainer uses of an engine (engine/trainer.py); both engines implement it."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    module: torch.nn.Module  # the model (under DeepSpeed: the module it wraps)

    @property
    def loss_scale(self) -> float | None: ...
    def forward(self, batch: dict): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def micro_step(self, boundary: bool, lr: float) -> StepInfo | None: ...
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def barrier(self) -> None: ...
    def save(self, ckpt_root: pathlib.Path, tag: str) -> None: ...
    def load(self, ckpt_root: pathlib.Path, tag: str) -> None: ...
    def load_portable(self, directory: pathlib.Path) -> None: ...
    def close(self) -> None: ...


def compile_enabled(cfg: RunConfig, device: torch.device) -> bool:
    """`run.compile`: auto = on for CUDA runs."""
    return cfg.run.compile == "on" or (cfg.run.compile == "auto" and device.type == "cuda")


def choose_engine(cfg: RunConfig, device: torch.device) -> str:
    if cfg.run.engine != "auto":
        return cfg.run.engine
    return "deepspeed" if launched_distributed() or device.type == "cuda" else "local"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LocalEngine:
    """One process, no torch.distributed: gradient accumulation, clipping and the step done here."""

    rank = 0
    local_rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig,
                 device: torch.device):
        if cfg.deepspeed.zero_stage != 0:
            raise ValueError("config key 'deepspeed.zero_stage': ZeRO needs run.engine = deepspeed")
        self.device = device
        self.module = model.to(device)
        # The compiled module shares the parameters: saving, loading and the optimizer use self.module.
        self._call = torch.compile(self.module, backend=cfg.run.compile_backend) \
            if compile_enabled(cfg, device) else self.module
        self.optimizer = optimizer
        if hasattr(optimizer, "name_whole_tensors"):  # so set_frozen can find them by name
            optimizer.name_whole_tensors(self.module.named_parameters())
        self.accum = cfg.batch.grad_accum
        self.clip = cfg.optim.clip_grad_norm
        # bf16: fp32 weights, the forward autocast (as DeepSpeed ZeRO 0 runs it, see deepspeed_config).
        self.amp_dtype = autocast_dtype(cfg)
        self.scaler = None
        if cfg.deepspeed.precision == "fp16":
            # fp16: fp32 master weights, the forward autocast, a dynamic loss scale starting where
            # DeepSpeed's does (2**16, doubled after 1000 clean steps, halved on every overflow).
            self.amp_dtype = torch.float16
            self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_interval=1000)

    @property
    def loss_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def forward(self, batch: dict):
        with autocast(self.device, self.amp_dtype):
            return self._call(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        (loss / self.accum).backward()

    def micro_step(self, boundary: bool, lr: float) -> StepInfo | None:
        if not boundary:
            return None
        set_lr(self.optimizer, lr)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # max_norm=inf still returns the global norm, which is logged every step.
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else float("inf"))
        if self.scaler is None:
            self.optimizer.step()
            applied = not getattr(self.optimizer, "last_step_skipped", False)
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # not called when unscale_ found inf / NaN
            self.scaler.update()  # halves the scale exactly when the step was skipped
            applied = self.scaler.get_scale() >= scale and not getattr(self.optimizer, "last_step_skipped", False)
            if self.scaler.get_scale() < 1.0:  # DeepSpeed's min_loss_scale: give up as it does
                raise FloatingPointError("fp16 gradients overflow at every loss scale; use deepspeed.precision = bf16")
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(applied=applied, grad_norm=float(norm))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    def save(self, ckpt_root: pathlib.Path, tag: str) -> None:
        from safetensors.torch import save_model

        directory = ckpt_root / tag
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(directory / "model.safetensors"))  # handles the tied embedding
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        if hasattr(self.optimizer, "name_whole_tensors"):  # ours: for `t5forge reshard` (engine/optim_state.py)
            write_layout_record(directory, 0, self.optimizer)
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), directory / "grad_scaler.pt")

    def load(self, ckpt_root: pathlib.Path, tag: str) -> None:
        from safetensors.torch import load_model

        directory = ckpt_root / tag
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"{directory}: no model.safetensors (a DeepSpeed checkpoint? set run.engine)")
        load_model(self.module, str(directory / "model.safetensors"), device=str(self.device))
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)
        if self.scaler is not None and (directory / "grad_scaler.pt").is_file():  # absent: saved without fp16
            self.scaler.load_state_dict(torch.load(directory / "grad_scaler.pt", weights_only=True))

    def load_portable(self, directory: pathlib.Path) -> None:
        """Weights and by-name optimizer state of a resharded checkpoint (engine/reshard.py); the fp16 loss
        scale starts afresh."""
        from safetensors.torch import load_model

        load_model(self.module, str(directory / PORTABLE_WEIGHTS), device=str(self.device))
        load_named_state(self.optimizer, read_named_state(directory / PORTABLE_OPTIMIZER), str(directory))

    def close(self) -> None:
        return None


def build_engine(kind: str, model, optimizer, cfg: RunConfig, device: torch.device) -> Engine:
    if kind == "local":
        return LocalEngine(model, optimizer, cfg, device)
    from engine.distributed.zero_engine import ZeroEngine

    return ZeroEngine(model, optimizer, cfg, device)
