"""The DeepSpeed engine: `deepspeed.initialize` around our model and optimizer, behind the `Engine`
protocol of engine/engines.py, with the fixes DeepSpeed 0.19 needs (fp16 loss scaling at ZeRO 0, its
initial fp16 step, ZeRO-3 leaf modules)."""
from __future__ import annotations

import os
import pathlib

import torch

from engine.config import RunConfig
from engine.distributed.deepspeed_config import autocast_dtype, deepspeed_config
from engine.distributed.partitions import whole_tensor_names, zero_partition_layouts
from engine.distributed.process_group import init_distributed
from engine.engines import StepInfo, autocast, compile_enabled, set_lr
from engine.optim_state import PORTABLE_OPTIMIZER, PORTABLE_WEIGHTS, load_named_state, read_named_state, \
    write_layout_record


def check_precision_supported(cfg: RunConfig) -> None:
    """DeepSpeed refuses a precision its accelerator lacks (fp16 on CPUs without oneDNN fp16, e.g. without
    AVX-512; docs/MACHINE_NOTES.md) with a traceback deep in its engine: one line naming the key instead."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}.get(cfg.deepspeed.precision)
    if supported is not None and not supported():
        raise ValueError(f"config key 'deepspeed.precision': {cfg.deepspeed.precision} is not supported by "
                         f"DeepSpeed's {acc.device_name()} accelerator on this machine; use "
                         f"{'bf16 or ' if cfg.deepspeed.precision == 'fp16' else ''}fp32 (or run.engine = \"local\")")


class ZeroEngine:
    """deepspeed.initialize around the model and our optimizer (ZeRO 0-3); gloo on the CPU, NCCL on GPUs.

    `ds` is DeepSpeed's own engine; everything else is the `Engine` protocol of engine/engines.py."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig,
                 device: torch.device):
        import deepspeed
        import torch.distributed as dist

        self._dist = dist
        init_distributed(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self.base_optimizer = optimizer
        self.amp_dtype = autocast_dtype(cfg)
        ds_config = deepspeed_config(cfg, self.world_size)
        check_precision_supported(cfg)
        if cfg.deepspeed.zero_stage == 3:
            _prepare_zero3(model)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.ds.module
        if compile_enabled(cfg, device):   # DeepSpeed's own hook: compiles the module inside its engine
            self.ds.compile(backend=cfg.run.compile_backend)
        self.zero_stage = cfg.deepspeed.zero_stage
        self._layouts, self._whole = [], []  # what the base optimizer steps (load_portable writes into them)
        if cfg.deepspeed.zero_stage > 0 and hasattr(optimizer, "set_partition_layout"):
            names = {id(p): n for n, p in self.module.named_parameters()}
            self._layouts = zero_partition_layouts(self.ds.optimizer, names)
            for flat, layout in self._layouts:
                optimizer.set_partition_layout(flat, layout)
        elif hasattr(optimizer, "name_whole_tensors"):
            self._whole = whole_tensor_names(self.ds.optimizer, self.module)
            optimizer.name_whole_tensors(self._whole)
        self._fp16 = cfg.deepspeed.precision == "fp16"
        self._bf16_ds = "bf16" in ds_config
        # DeepSpeed 0.19's engine.backward applies the fp16 loss scale for ZeRO optimizers only, while
        # ZeRO 0's FP16_(Unfused)Optimizer still divides the gradients by it in step(): without scaling
        # here its gradients would be 1/65536 of the true ones (tests/test_engine_fp16.py checks this).
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        self._scale_loss_here = self._fp16 and not isinstance(self.ds.optimizer, ZeROOptimizer)
        if self._scale_loss_here:
            _undo_fp16_init_step(self.ds.optimizer, optimizer)

    @property
    def loss_scale(self) -> float | None:
        return float(self.ds.optimizer.loss_scale) if self._fp16 else None

    def forward(self, batch: dict):
        with autocast(self.device, self.amp_dtype):
            return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        if self._scale_loss_here:
            loss = loss * self.ds.optimizer.loss_scale
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps

    def micro_step(self, boundary: bool, lr: float) -> StepInfo | None:
        if boundary != self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("trainer and DeepSpeed disagree on the gradient-accumulation boundary")
        if boundary:
            set_lr(self.base_optimizer, lr)
        # ZeRO 3 calls the optimizer once per sub-group: count skips over the whole step, not the last call.
        skipped_before = getattr(self.base_optimizer, "skipped_steps", 0)
        self.ds.step()
        if not boundary:
            return None
        applied = self.ds.was_step_applied() and getattr(self.base_optimizer, "skipped_steps", 0) == skipped_before
        norm = self.ds.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = float(norm)
        return StepInfo(applied=applied, grad_norm=None if norm is None or norm < 0 else norm)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        self._dist.barrier()

    def save(self, ckpt_root: pathlib.Path, tag: str) -> None:
        # save_latest=False: our `latest` pointer is written only after the directory is complete.
        self.ds.save_checkpoint(str(ckpt_root), tag=tag, client_state={}, save_latest=False)
        if hasattr(self.base_optimizer, "set_partition_layout"):  # ours: for `t5forge reshard`
            write_layout_record(ckpt_root / tag, self.rank, self.base_optimizer, self._state_order())

    def _state_order(self) -> list | None:
        """The base optimizer's tensors in the order of the state_dict DeepSpeed saved, where its param groups
        do not hold them: ZeRO-3 appends each sub-group's fp32 partition to its param group only around a
        step or a save (stage3.py `_set_fp32_optimizer_param_groups`)."""
        zero = self.ds.optimizer
        if not hasattr(zero, "fp32_partitioned_groups_flat"):
            return None
        to_group = zero.sub_group_to_group_id
        return [zero.fp32_partitioned_groups_flat[sub] for g in range(len(self.base_optimizer.param_groups))
                for sub in range(len(zero.fp32_partitioned_groups_flat)) if to_group[sub] == g]

    def load(self, ckpt_root: pathlib.Path, tag: str) -> None:
        path, _ = self.ds.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{ckpt_root / tag}: DeepSpeed found no checkpoint to load "
                                    "(a local-engine checkpoint? set run.engine = local)")

    def load_portable(self, directory: pathlib.Path) -> None:
        """The weights and by-name optimizer state of a resharded checkpoint (engine/reshard.py), cut for
        this run's partitions: the module's parameters (at ZeRO-3 this rank's shard of each),
        the fp32 masters the base optimizer steps, its state. The fp16 loss scale starts afresh."""
        from safetensors.torch import load_file

        weights = load_file(str(directory / PORTABLE_WEIGHTS))
        full = {}  # parameter name -> its weights (a tied head, stored once, under either of its names)
        for name, p in self.module.named_parameters():
            aliases = [n for n, q in self.module.named_parameters(remove_duplicate=False) if q is p]
            found = [weights[n] for n in aliases if n in weights]
            if not found:
                raise ValueError(f"{directory / PORTABLE_WEIGHTS}: no weights for parameter {name}")
            full[name] = found[0]
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                _set_module_param(p, full[name], self.zero_stage)
            for flat, layout in self._layouts:  # ZeRO 1-3: this rank's slices of the fp32 masters
                for s in layout.slices:
                    value = full[layout.names[s.param]].reshape(-1)[s.param_start:s.param_start + s.numel]
                    flat.view(-1)[s.flat_start:s.flat_start + s.numel].copy_(value)
            for name, master in self._whole:  # ZeRO 0 (with fp16: DeepSpeed's fp32 masters of the halves)
                master.copy_(full[name].reshape(master.shape))
        load_named_state(self.base_optimizer, read_named_state(directory / PORTABLE_OPTIMIZER), str(directory))

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.barrier()


def _set_module_param(p: torch.nn.Parameter, full: torch.Tensor, zero_stage: int) -> None:
    """One parameter's whole value into the module (cast to its dtype as DeepSpeed casts the fp32 masters):
    at ZeRO-3 into this rank's shard `ds_tensor`, elements [rank * partition_numel, ...) of the flattened
    parameter (the layout engine/distributed/partitions.py reads)."""
    if zero_stage == 3:
        import torch.distributed as dist

        part = p.partition_numel()
        start = dist.get_rank(group=p.ds_process_group) * part
        numel = max(0, min(part, p.ds_numel - start))
        p.ds_tensor.data.view(-1)[:numel].copy_(full.reshape(-1)[start:start + numel])
        return
    p.data.copy_(full.reshape(p.shape))


def _undo_fp16_init_step(fp16_optimizer, base: torch.optim.Optimizer) -> None:
    """DeepSpeed 0.19's FP16_UnfusedOptimizer (fp16 at ZeRO 0) steps the base optimizer once on zero
    gradients to create its state, so Adam / Adafactor would count a step that never happened (bias
    correction, decay schedule) and weight decay would already have moved the fp32 masters. Drop that
    state and copy the masters back from the fp16 weights they were made from."""
    base.state.clear()
    with torch.no_grad():
        for masters, halves in zip(getattr(fp16_optimizer, "fp32_groups", []), getattr(fp16_optimizer, "fp16_groups", [])):
            for master, half in zip(masters, halves):
                master.copy_(half)


def _prepare_zero3(model: torch.nn.Module) -> None:
    """Tell ZeRO-3 where T5 uses weights outside the owning module's forward, so they are gathered.

    The FFN and attention modules read their weights directly (the fused / Triton kernels take weight
    tensors, not Linear calls): make them ZeRO-3 leaf modules, gathered whole on entry. The relative
    bias tables (owned by block 0, used by the model to build the bias once per stack) and a tied
    embedding used as the head are external parameters of the top-level model.
    """
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from models.zero3_layout import external_parameters, leaf_modules  # named by the model package

    leaf_types = leaf_modules(model)
    if leaf_types:
        set_z3_leaf_modules(model, leaf_types)
    for param in external_parameters(model):
        deepspeed.zero.register_external_parameter(model, param)
