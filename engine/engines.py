"""Two engines with one interface: DeepSpeed (any number of ranks and nodes) and a local single process.

The trainer only talks to this interface, so the same `Trainer` code runs the CPU default (no
DeepSpeed start-up, no process group) and multi-node ZeRO runs, and the tests cover both:

    out = engine.forward(batch)           # the model's output (autocast applied here)
    engine.backward(loss)                 # loss of one micro-batch; accumulation is the engine's job
    info = engine.micro_step(boundary, lr)  # after every micro-batch; at the boundary applies the update
    engine.all_reduce_sum(tensor)         # across data-parallel ranks (identity locally)
    engine.loss_scale                     # fp16: the current dynamic loss scale; None otherwise
    engine.save(ckpt_root, tag) / engine.load(ckpt_root, tag)   # model + optimizer, every rank calls
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from dataclasses import dataclass

import torch

from engine.config import RunConfig
from engine.deepspeed_config import autocast_dtype, deepspeed_config


@dataclass
class StepInfo:
    applied: bool  # False: the update was skipped (non-finite gradients, or an fp16 overflow)
    grad_norm: float | None


def launched_distributed() -> bool:
    """True under the deepspeed / torchrun launchers (they set WORLD_SIZE and LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def choose_engine(cfg: RunConfig, device: torch.device) -> str:
    if cfg.run.engine != "auto":
        return cfg.run.engine
    return "deepspeed" if launched_distributed() or device.type == "cuda" else "local"


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _autocast(device: torch.device, dtype):
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
        with _autocast(self.device, self.amp_dtype):
            return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        (loss / self.accum).backward()

    def micro_step(self, boundary: bool, lr: float) -> StepInfo | None:
        if not boundary:
            return None
        _set_lr(self.optimizer, lr)
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

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    def save(self, ckpt_root: pathlib.Path, tag: str) -> None:
        from safetensors.torch import save_model

        directory = ckpt_root / tag
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(directory / "model.safetensors"))  # handles the tied embedding
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
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

    def close(self) -> None:
        return None


def init_distributed(device: torch.device) -> None:
    """The process group (once): the launcher's, or without a launcher (a plain `t5forge pretrain
    --run.engine deepspeed`) a world of one. Gloo on the CPU, NCCL on GPUs."""
    import torch.distributed as dist

    if dist.is_initialized():
        # A group made by someone else (a benchmark in this process, a test): DeepSpeed reads these.
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))  # launchers set it; else one host
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:   # one process, no launcher: any free port (a fixed one may be held)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    start_process_group(device)


def start_process_group(device: torch.device) -> None:
    """deepspeed.init_distributed (gloo on the CPU, NCCL on GPUs) from the launcher variables already in
    the environment, with this module's two clean-ups: the /dev/shm buffer is unlinked at once, and a gloo
    group is destroyed at interpreter exit."""
    import atexit

    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    release_shm_buffer()
    if backend == "gloo":  # NCCL's teardown can wait on a peer's collective; only gloo needs this one
        atexit.register(destroy_process_group)


def destroy_process_group() -> None:
    """Tear the default group down while the interpreter is still whole. Left to interpreter finalization,
    a gloo group can still hold finished asynchronous work (ZeRO-3's prefetching all-gathers) whose tensors
    are freed from a C++ thread after Python is gone: the rank dies with SIGABRT ("terminate called without
    an active exception") after its run succeeded, and the launcher reports the job failed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp).

    On the CPU with all ranks on one host, `deepspeed.init_distributed` makes every rank create a ~66 MB
    shared-memory file named by user id, MASTER_ADDR, MASTER_PORT and rank, and map every other rank's;
    DeepSpeed 0.19 never unlinks them, so each launch (tests pick a new port every time) left its files in
    RAM-backed /dev/shm until the machine ran out of memory. After a barrier every rank has mapped all of
    them, so the names can go at once: the mappings stay valid and the memory is freed when the processes
    exit, however they exit (SIGKILL included). A no-op without such a file (GPUs, multi-node).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or not os.path.isdir("/dev/shm"):
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if not os.path.exists(name):
        return
    dist.barrier()  # every rank has opened every buffer (shm_initialize waits for all of them)
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


class DeepSpeedEngine:
    """deepspeed.initialize around the model and our optimizer; gloo on the CPU, NCCL on GPUs."""

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
        if cfg.deepspeed.zero_stage == 3:
            _prepare_zero3(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        if cfg.deepspeed.zero_stage > 0 and hasattr(optimizer, "set_partition_layout"):
            names = {id(p): n for n, p in self.module.named_parameters()}
            for flat, layout in zero_partition_layouts(self.engine.optimizer, names):
                optimizer.set_partition_layout(flat, layout)
        elif hasattr(optimizer, "name_whole_tensors"):
            optimizer.name_whole_tensors(whole_tensor_names(self.engine.optimizer, self.module))
        self._fp16 = cfg.deepspeed.precision == "fp16"
        self._bf16_ds = "bf16" in ds_config
        # DeepSpeed 0.19's engine.backward applies the fp16 loss scale for ZeRO optimizers only, while
        # ZeRO 0's FP16_(Unfused)Optimizer still divides the gradients by it in step(): without scaling
        # here its gradients would be 1/65536 of the true ones (tests/test_engine_fp16.py checks this).
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        self._scale_loss_here = self._fp16 and not isinstance(self.engine.optimizer, ZeROOptimizer)
        if self._scale_loss_here:
            _undo_fp16_init_step(self.engine.optimizer, optimizer)

    @property
    def loss_scale(self) -> float | None:
        return float(self.engine.optimizer.loss_scale) if self._fp16 else None

    def forward(self, batch: dict):
        with _autocast(self.device, self.amp_dtype):
            return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        if self._scale_loss_here:
            loss = loss * self.engine.optimizer.loss_scale
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps

    def micro_step(self, boundary: bool, lr: float) -> StepInfo | None:
        if boundary != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("trainer and DeepSpeed disagree on the gradient-accumulation boundary")
        if boundary:
            _set_lr(self.base_optimizer, lr)
        # ZeRO 3 calls the optimizer once per sub-group: count skips over the whole step, not the last call.
        skipped_before = getattr(self.base_optimizer, "skipped_steps", 0)
        self.engine.step()
        if not boundary:
            return None
        applied = self.engine.was_step_applied() and getattr(self.base_optimizer, "skipped_steps", 0) == skipped_before
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = float(norm)
        return StepInfo(applied=applied, grad_norm=None if norm is None or norm < 0 else norm)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        self._dist.barrier()

    def save(self, ckpt_root: pathlib.Path, tag: str) -> None:
        # save_latest=False: our `latest` pointer is written only after the directory is complete.
        self.engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={}, save_latest=False)

    def load(self, ckpt_root: pathlib.Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{ckpt_root / tag}: DeepSpeed found no checkpoint to load "
                                    "(a local-engine checkpoint? set run.engine = local)")

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.barrier()


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

    leaf_types = {type(m) for m in model.modules() if type(m).__name__ in ("T5DenseReluDense", "T5Attention")}
    if leaf_types:
        set_z3_leaf_modules(model, sorted(leaf_types, key=lambda t: t.__name__))
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name, None)
        if stack is not None and hasattr(stack, "bias_table"):
            deepspeed.zero.register_external_parameter(model, stack.bias_table)
    if getattr(model.config, "tie_word_embeddings", False):
        deepspeed.zero.register_external_parameter(model, model.shared.weight)


def zero_partition_layouts(zero_optimizer, names: dict) -> list:
    """(flat fp32 partition, PartitionLayout) for every partition DeepSpeed hands the base optimizer.

    Read from DeepSpeed's own bookkeeping (0.19): ZeRO 1/2 (`DeepSpeedZeroOptimizer`) and ZeRO 1 with
    bf16 (`BF16_Optimizer`) link every model parameter to its fragment of the rank's flat partition
    (`_hp_mapping`, what `safe_get_full_fp32_param` reads); ZeRO 3 (`DeepSpeedZeroOptimizer_Stage3`)
    gives each parameter a `ds_tensor` of `partition_numel()` elements starting at rank * that in the
    flattened parameter, laid end to end per sub-group in `fp32_partitioned_groups_flat`. `names` maps
    id(param) -> name (the optimizer keys its per-parameter state by it).
    """
    import torch.distributed as dist

    from engine.optim import ParamSlice, PartitionLayout

    def name_of(p):
        return names.get(id(p), f"param{id(p)}")

    layouts = []
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO 3
        for i, params in enumerate(zero_optimizer.fp16_groups):
            flat = zero_optimizer.fp32_partitioned_groups_flat[i]
            if flat is None:
                raise ValueError("config key 'deepspeed.offload_params': NVMe-swapped partitions are not supported "
                                 "by engine/optim.py's per-parameter statistics")
            group = zero_optimizer.sub_group_process_groups[i]
            rank = dist.get_rank(group=group)
            slices, offset = [], 0
            for j, p in enumerate(params):
                part = p.partition_numel()
                start = rank * part
                numel = max(0, min(part, p.ds_numel - start))  # the last ranks hold padding
                if numel:
                    slices.append(ParamSlice(j, offset, start, numel))
                offset += part
            if offset != flat.numel():
                raise RuntimeError(f"ZeRO-3 sub-group {i}: {offset} partition elements, flat holds {flat.numel()}")
            layouts.append((flat, PartitionLayout([name_of(p) for p in params], [tuple(p.ds_shape) for p in params],
                                                  slices, group)))
        return layouts
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # ZeRO 1/2
        lp_groups, flats = zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups
    elif hasattr(zero_optimizer, "fp32_groups_flat_partition"):  # ZeRO 1 + bf16
        lp_groups, flats = zero_optimizer.bf16_groups, zero_optimizer.fp32_groups_flat_partition
    else:
        raise RuntimeError(f"{type(zero_optimizer).__name__}: unknown ZeRO optimizer, cannot map its partitions "
                           "to parameters")
    for i, params in enumerate(lp_groups):
        slices = []
        for j, p in enumerate(params):
            frag = getattr(p, "_hp_mapping", None)
            if frag is not None:
                slices.append(ParamSlice(j, frag.hp_fragment_address.start, frag.lp_fragment_address.start,
                                         frag.hp_fragment_address.numel))
        layouts.append((flats[i], PartitionLayout([name_of(p) for p in params], [tuple(p.shape) for p in params],
                                                  slices, zero_optimizer.real_dp_process_group[i])))
    return layouts


def whole_tensor_names(wrapper, module: torch.nn.Module) -> list:
    """(name, tensor) for the tensors the base optimizer steps at ZeRO 0: the model's parameters, or with
    fp16 the fp32 masters DeepSpeed's FP16_UnfusedOptimizer made of them (`fp32_groups`, in the order
    of `fp16_groups`)."""
    names = {id(p): n for n, p in module.named_parameters()}
    halves, masters = getattr(wrapper, "fp16_groups", None), getattr(wrapper, "fp32_groups", None)
    if halves is None or masters is None:
        return list(module.named_parameters())
    return [(names[id(half)], master) for hs, ms in zip(halves, masters) for half, master in zip(hs, ms)
            if id(half) in names]


def build_engine(kind: str, model, optimizer, cfg: RunConfig, device: torch.device):
    if kind == "local":
        return LocalEngine(model, optimizer, cfg, device)
    return DeepSpeedEngine(model, optimizer, cfg, device)
