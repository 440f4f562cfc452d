"""ZeRO-3 model construction: the model is built partitioned, so no rank ever holds it whole.

At `deepspeed.zero_stage = 3` with the DeepSpeed engine, the model is constructed inside
`deepspeed.zero.Init` (the run's own DeepSpeed config): each module's parameters are split across the
ranks as its `__init__` returns. The T5 init or a checkpoint is then written one module at a time,
gathered with `GatheredParameters(modifier_rank=0)`, so a rank holds at most one module's whole
weights (plus its shards). Anywhere else `build_model(build, ...)` is just `build()`.

    model = build_model(lambda: T5ForConditionalGeneration(config), cfg, kind, device)
    model = build_model(lambda: T5ForConditionalGeneration(config), cfg, kind, device, init=False)
    load_partitioned(model, read_state)          # read_state() runs on rank 0 only
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Callable

import torch

from engine.config import RunConfig
from engine.distributed.deepspeed_config import deepspeed_config


def builds_partitioned(cfg: RunConfig, kind: str) -> bool:
    return kind == "deepspeed" and cfg.deepspeed.zero_stage == 3


@contextlib.contextmanager
def model_init_context(cfg: RunConfig, kind: str, device: torch.device):
    """Construct the model inside this: `deepspeed.zero.Init` at ZeRO-3 with the DeepSpeed engine
    (partitions on the CPU with `deepspeed.offload_params`), nothing otherwise."""
    if not builds_partitioned(cfg, kind):
        yield
        return
    import deepspeed
    import torch.distributed as dist

    from engine.distributed.process_group import init_distributed

    init_distributed(device)
    ds_config = deepspeed_config(cfg, dist.get_world_size())
    # dtype=None: DeepSpeed takes it from the config (bf16, fp16, else fp32). Given explicitly, DeepSpeed
    # 0.19's zero.Init drops an fp32 dtype on CPUs it deems without fp16 (docs/MACHINE_NOTES.md).
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None,
                             remote_device="cpu" if cfg.deepspeed.offload_params else None):
        yield


def build_model(build: Callable[[], torch.nn.Module], cfg: RunConfig, kind: str, device: torch.device, *,
                init: bool = True) -> torch.nn.Module:
    """`build()`; at ZeRO-3 inside `model_init_context`, then given the model's init module by module
    (`init_partitioned`) unless `init` is False (weights loaded next with `load_partitioned`).

    The partitioned build leaves the CPU generator where the plain build leaves it: untouched by the
    construction itself (its draws are replayed on the CPU, see `replay_default_init`), then advanced by
    the init; with init=False untouched, as a build on the meta device.
    """
    if not builds_partitioned(cfg, kind):
        return build()
    with torch.random.fork_rng(devices=[]):  # on an accelerator the constructors draw there, not here
        with model_init_context(cfg, kind, device):
            model = build()
    if init:
        replay_default_init(model)
        init_partitioned(model)
    return model


@torch.no_grad()
def replay_default_init(model: torch.nn.Module) -> None:
    """Make the CPU random draws the plain build's constructors make, in their order, into throwaway
    float32 CPU tensors of one module's size at a time.

    The plain build draws torch.nn's default init (`reset_parameters` of every Linear and Embedding,
    in construction order = `modules()` order; T5's own modules draw nothing) and then `init_weights`
    continues from that generator state. Under zero.Init the constructors may draw from the
    accelerator's generator instead, so they are replayed here on the CPU whatever device they ran on.
    """
    for module in model.modules():
        reset = getattr(type(module), "reset_parameters", None)
        if reset is None or not any(p is not None for p in module._parameters.values()):
            continue
        standin = copy.copy(module)  # shares nothing that reset_parameters writes: _parameters is replaced
        standin._parameters = {name: None if p is None else torch.nn.Parameter(
            torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=torch.float32), requires_grad=False)
            for name, p in module._parameters.items()}
        reset(standin)


@torch.no_grad()
def init_partitioned(model: torch.nn.Module) -> None:
    """`model.init_weights()` for a partitioned model, bit-identical to the unpartitioned build.

    Under zero.Init the `init_weights` call in `__init__` finds empty parameters (no draws); here the
    same draws are made in the same order (`init_order` / `init_module`), one module gathered at a time.
    They are made into float32 CPU tensors, as the plain build makes them: the gathered weights
    themselves when they are float32 on the CPU, else scratch copied into them (16-bit, or on the
    accelerator). Every rank draws, so the CPU generator advances as in the plain build; rank 0's
    values are kept (`modifier_rank=0`).
    """
    import deepspeed

    for module in model.init_order():
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            gathered = [p.data for p in params]
            if all(w.dtype == torch.float32 and w.device.type == "cpu" for w in gathered):
                model.init_module(module)  # drawn in place
            else:
                try:
                    for p in params:
                        p.data = torch.empty(tuple(p.ds_shape), dtype=torch.float32)
                    model.init_module(module)
                    for p, whole in zip(params, gathered):
                        whole.copy_(p.data)
                finally:
                    for p, whole in zip(params, gathered):
                        p.data = whole
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Gathering one module after another frees whole tensors between ZeRO's shards; glibc keeps those
    holes, and the embedding and head (the largest modules, last) cannot reuse them. A 2-rank fp32
    t5-v1_1-base build on the CPU peaked 1.36 GB above its start on rank 0 without this, 0.79 GB with it
    (the plain build: 0.95 GB).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _agree_on_error(error: Exception | None) -> None:
    """Rank 0's error (or None) raised on every rank, so no rank is left waiting in a collective."""
    import torch.distributed as dist

    kinds = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}  # what the CLIs report in one line
    box = [None]
    if error is not None:
        box = [(next((name for name, t in kinds.items() if isinstance(error, t)), "RuntimeError"), str(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        name, message = box[0]
        raise kinds.get(name, RuntimeError)(message)


@torch.no_grad()
def load_partitioned(model: torch.nn.Module, read_state: Callable[[], dict[str, torch.Tensor]],
                     where: str = "") -> None:
    """Copy a whole state dict into a partitioned model, one module gathered at a time (collective).

    Only rank 0 calls `read_state()` (our parameter names, whole shapes) and holds its tensors; names
    and shapes are checked there and a mismatch (its message starting with `where`) is raised on every rank.
    """
    import deepspeed
    import torch.distributed as dist

    state, error = None, None
    if dist.get_rank() == 0:
        try:
            state = read_state()
            expected = {name: tuple(p.ds_shape) for name, p in model.named_parameters()}
            missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
            if missing or unexpected:
                raise ValueError(f"{where}checkpoint does not match the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            for name, shape in expected.items():
                if tuple(state[name].shape) != shape:
                    raise ValueError(f"{where}checkpoint weight {name} has shape {tuple(state[name].shape)}, "
                                     f"the model expects {shape}")
        except Exception as err:  # noqa: BLE001 - re-raised here, and sent to the other ranks
            error = err
    _agree_on_error(error)
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
            if state is not None:
                for name, p in own:
                    p.data.copy_(state[f"{prefix}.{name}" if prefix else name])
        release_freed_memory()
