"""The model suite's providers: how each one is built, and how one of its training steps is timed.

Every provider trains the SAME random batch (`make_batch`: inputs / targets of fixed length, no padding):
  t5forge          the engine as a user trains with it: the preset's ready config (engine/configs/
                   <preset>.toml: ZeRO stage, precision regime, optimizer, activation checkpointing) with
                   the micro-batch overridden for this machine and grad_accum 1, the DeepSpeed JSON derived
                   by engine/distributed/deepspeed_config.py, `deepspeed.initialize` on one rank (gloo on the CPU)
  t5forge-torch    models/t5.py in the baselines' plain-torch set-up (below): the model code alone
  hf-sdpa          transformers' T5ForConditionalGeneration, attn_implementation="sdpa"
  hf-sdpa-compile  the same under torch.compile (compile time excluded: it runs during warm-up)
The plain-torch providers share one regime: bf16 parameters and activations, fp32 master weights and
AdamW moments (`MasterWeightAdamW`), so t5forge-torch : hf-sdpa measures the model code; t5forge : hf-sdpa
adds the engine (DeepSpeed, the preset's optimizer, e.g. Adafactor). All providers follow the ready
config's activation checkpointing, so every provider does the same work.

Timing (`measure_step`, `measure_engine_step`): `warmup` untimed steps, then the median of `steps` timed
ones, split into forward / backward / optimizer (`PhaseClock`), with the peak memory of the timed steps.
Which presets and providers run, and whether at full depth, under ZeRO-3 + CPU offload or depth-reduced,
benchmarks/model_suite.py decides.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import socket
import time
from typing import TYPE_CHECKING

import torch

from benchmarks import devices, plan
from benchmarks.compiled import PerShapeCompiled

if TYPE_CHECKING:
    from benchmarks.model_suite import ModelSuiteConfig

PROVIDERS = ("t5forge", "t5forge-torch", "hf-sdpa", "hf-sdpa-compile")
ENGINE_PROVIDER = "t5forge"


# ----------------------------------------------------------------------------------------------------
# Building the providers
# ----------------------------------------------------------------------------------------------------

def load_config(preset: str, depth: int | None = None, on_cpu: bool = False, checkpointing: bool = False):
    """The model config the plain-torch providers build (the engine provider's comes from its run config)."""
    from models.config import T5Config

    cfg = T5Config.from_preset(preset)
    # v1.1 pretraining runs without dropout; it keeps runs comparable
    changes: dict = {"dropout_rate": 0.0, "gradient_checkpointing": checkpointing}
    if depth is not None:
        changes.update(num_layers=depth, num_decoder_layers=depth)
    if on_cpu and hasattr(cfg, "kernel_backend"):
        changes["kernel_backend"] = "torch"  # the Triton interpreter is a test tool, not a fast path
    return cfg.replace(**changes)


def engine_run_config(preset: str, scfg: ModelSuiteConfig, on_cpu: bool, offload: bool = False):
    """The preset's ready run config with this machine's overrides, through the engine's own loader.

    Overrides: micro-batch = the suite's batch, grad_accum 1 (one micro-batch per optimizer step: the
    step measured), precision from --dtype, dropout 0 (as the baselines), the torch kernels on a CPU,
    and with `offload` ZeRO-3 with optimizer and parameters on the CPU.
    """
    from engine.config import load_run_config, preset_config_path

    path = preset_config_path(preset)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ready config for preset {preset!r} (the t5forge provider runs it)")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[scfg.dtype]
    argv = ["--config", str(path), "--batch.micro_batch_size", str(scfg.batch_size), "--batch.grad_accum", "1",
            "--deepspeed.precision", precision, "--run.engine", "deepspeed", "--model.dropout_rate", "0"]
    if on_cpu:
        argv += ["--model.kernel_backend", "torch"]
    if offload:
        argv += ["--deepspeed.zero_stage", "3", "--deepspeed.offload_optimizer", "true",
                 "--deepspeed.offload_params", "true"]
    return load_run_config(argv)


def engine_model_config(preset: str, run_cfg, depth: int | None = None):
    from engine.build import build_model_config
    from models.config import T5Config

    # The ready configs pin vocab_size; the preset's own size stands in for a tokenizer (tiny pins none).
    cfg = build_model_config(run_cfg, T5Config.from_preset(preset).vocab_size)
    return cfg if depth is None else cfg.replace(num_layers=depth, num_decoder_layers=depth)


def engine_fields(run_cfg) -> dict:
    """What a t5forge record says about the engine set-up it ran under."""
    from engine.distributed.deepspeed_config import autocast_dtype

    ds = run_cfg.deepspeed
    offload = "+".join(n for n, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on)
    # The regime the engine derives from the precision key (engine/distributed/deepspeed_config.py): at ZeRO 0 bf16 is
    # an autocast over fp32 weights, from ZeRO 1 on DeepSpeed holds bf16 weights and fp32 master partitions.
    if autocast_dtype(run_cfg) is not None:
        regime = f"{ds.precision} autocast, fp32 weights"
    elif ds.precision in ("bf16", "fp16"):
        regime = f"{ds.precision} weights, fp32 master"
    else:
        regime = ds.precision
    return {"engine": "deepspeed", "zero_stage": ds.zero_stage, "offload": offload or "none",
            "precision": regime, "optimizer": run_cfg.optim.name,
            "gradient_checkpointing": run_cfg.model.gradient_checkpointing,
            "run_config": f"engine/configs/{run_cfg.model.preset}.toml; micro_batch_size "
                          f"{run_cfg.batch.micro_batch_size}, grad_accum 1, precision {ds.precision}, dropout 0"
                          + (", ZeRO-3 + offload optimizer and params" if offload == "optimizer+params" else "")}


def build_model(provider: str, cfg, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if provider == "t5forge-torch":
        from models.t5 import T5ForConditionalGeneration

        model = T5ForConditionalGeneration(cfg)
    elif provider.startswith("hf-"):
        import transformers  # baseline only: never imported by the engine

        hf_cfg = transformers.T5Config(**cfg.to_hf_dict())
        model = transformers.T5ForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa")
        if not cfg.tie_word_embeddings and model.lm_head.weight is model.shared.weight:
            # transformers 5 ties the head for v1.1 configs too (it only turns off the output scaling);
            # untie it so the baseline trains the same parameters as the real v1.1 model and ours.
            model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        if cfg.gradient_checkpointing:  # the same recomputation as ours, so both do the same work
            # transformers 5 renamed it (the old name warns); older releases only have the old one.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
    else:
        raise ValueError(f"benchmarks/model_providers.py: unknown provider {provider!r}; one of {PROVIDERS}")
    return model.to(device=device, dtype=dtype).train()


class MasterWeightAdamW:
    """AdamW over fp32 master copies of low-precision parameters, written back after each step."""

    def __init__(self, params, lr: float = 1e-4):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in self.params]
        # fused: one kernel over all tensors, on CUDA and (5x faster than foreach here) on the CPU too.
        self.opt = torch.optim.AdamW(self.master, lr=lr, fused=True)

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            if m is not p:
                m.grad = p.grad.float()
        self.opt.step()
        with torch.no_grad():
            low = [(p, m) for p, m in zip(self.params, self.master) if m is not p]
            if low:
                torch._foreach_copy_([p for p, _ in low], [m for _, m in low])
        for m, p in zip(self.master, self.params):
            p.grad = None
            m.grad = None


def make_batch(cfg, batch: int, inputs_length: int, targets_length: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    # Ids from 2 up: 0 is pad and 1 is EOS, so nothing is masked and every provider sees the same work.
    input_ids = torch.randint(2, cfg.vocab_size, (batch, inputs_length), generator=g)
    labels = torch.randint(2, cfg.vocab_size, (batch, targets_length), generator=g)
    decoder_input_ids = torch.cat([torch.zeros(batch, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    # No attention masks: nothing is padded, and a mask of ones would only make both models build a
    # (B, H, L, L) bias instead of a (1, H, L, L) one.
    out = {"input_ids": input_ids, "decoder_input_ids": decoder_input_ids, "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------

def _rss_peak_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "torch.cuda.max_memory_allocated"
    return _rss_peak_mb(), "process peak RSS (VmHWM; includes the Python process and other models)"


class PhaseClock:
    """Where a step's time goes: forward, backward, optimizer (with whatever the engine does around it).

    CUDA events on the GPU, so marking a phase never synchronises inside the timed step; wall time on
    the CPU, where every op is synchronous anyway.
    """

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.rows: list[list[float]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self) -> None:
        self.marks.append(self._now())

    def close_step(self) -> None:
        """After the device is synchronised: turn this step's marks into phase durations."""
        m, self.marks = self.marks, []
        if len(m) == len(self.PHASES) + 1:
            self.rows.append([m[i].elapsed_time(m[i + 1]) / 1e3 if self.cuda else m[i + 1] - m[i]
                              for i in range(len(self.PHASES))])

    def medians(self) -> dict[str, float]:
        if not self.rows:
            return {}
        return {name: sorted(r[i] for r in self.rows)[len(self.rows) // 2] for i, name in enumerate(self.PHASES)}


def _time_steps(step, clock: PhaseClock, scfg: ModelSuiteConfig, device: torch.device) -> dict:
    """Run `warmup` untimed then `steps` timed calls of `step()`; median time, peak memory, last loss.

    `step` marks `clock` after its forward and its backward; the step's start and end are marked here."""
    start = time.perf_counter()
    for _ in range(scfg.warmup):
        step()
    warmup_s = time.perf_counter() - start
    _reset_peak(device)
    times, loss = [], None
    clock.rows, clock.marks = [], []
    for _ in range(scfg.steps):
        devices._sync(device)
        start = time.perf_counter()
        clock.mark()
        loss = step()
        clock.mark()
        devices._sync(device)
        times.append(time.perf_counter() - start)
        clock.close_step()
    peak, mem_kind = _peak_mb(device)
    times.sort()
    out = {"step_s": times[len(times) // 2], "step_s_min": times[0], "step_s_all": times,
           "phase_s": clock.medians(), "warmup_s": warmup_s, "peak_mem_mb": peak, "mem_kind": mem_kind,
           "loss": float(loss)}
    if device.type == "cuda":  # the host side too: what CPU offload moves there
        out["host_peak_mem_mb"] = _rss_peak_mb()
    return out


def _n_params(model: torch.nn.Module) -> int:
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


def measure_step(provider: str, cfg, scfg: ModelSuiteConfig, device: torch.device) -> dict:
    """A plain-torch provider: build it, train `warmup + steps` steps on the fixed batch, time them."""
    model = build_model(provider, cfg, device, scfg.dtype)
    opt = MasterWeightAdamW(model.parameters())
    batch = make_batch(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length, device)
    # Its own compilation and recompile budget: a suite of many presets never falls back to eager.
    forward = PerShapeCompiled(model) if provider.endswith("-compile") else model

    clock = PhaseClock(device)

    def step():
        loss = forward(**batch).loss
        clock.mark()
        loss.backward()
        clock.mark()
        opt.step()
        return loss.detach()

    out = _time_steps(step, clock, scfg, device)
    if provider == "t5forge-torch":
        # One more (untimed) forward under the saved-tensor hook: the plan's activation count, measured.
        # (Not on the engine provider: autocast's bf16 weight copies would count as saved tensors there.)
        saved = plan.measure_saved_bytes(lambda: forward(**batch).loss, model)
        model.zero_grad(set_to_none=True)
        out["saved_activation_mb"] = saved / 2 ** 20
    out["params"] = _n_params(model)
    out.update(how_it_ran(provider, model, forward))
    del model, opt, forward, batch
    free_memory(device)
    return out


def how_it_ran(provider: str, model, forward) -> dict:
    """What a plain-torch record states about its run: for transformers, the attention implementation it
    actually chose (read back from the built model, never assumed); for a compiled one, that it ran compiled."""
    out = {}
    if provider.startswith("hf-"):
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None) or "unknown"
        out["kernel_backend"] = out["attn_implementation"]
    if isinstance(forward, PerShapeCompiled):
        out.update(forward.info())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_world(device: torch.device):
    """A world of one rank for `deepspeed.initialize`, without a launcher; the environment is restored after.

    The process group is created once and kept: DeepSpeed caches its groups, and a destroyed group cannot
    be made again in the same process. The launcher variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*)
    are only set while an engine is built and stepped (DeepSpeed reads LOCAL_RANK then), so nothing run
    later in the process mistakes itself for a launched rank (engine.distributed.process_group.launched_distributed).
    """
    import torch.distributed as dist

    saved = dict(os.environ)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    try:
        if not dist.is_initialized():
            from engine.distributed.process_group import start_process_group

            os.environ["MASTER_PORT"] = str(free_port())  # other jobs on this machine may hold a fixed one
            start_process_group(device)
        elif dist.get_world_size() != 1:
            raise ValueError("benchmarks/model_providers.py: the model suite measures one rank; run it without "
                             f"a launcher (this process is in a world of {dist.get_world_size()})")
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def measure_engine_step(run_cfg, mcfg, scfg: ModelSuiteConfig, device: torch.device) -> dict:
    """The t5forge provider: the engine's model, optimizer and DeepSpeed engine from `run_cfg`, one rank."""
    from engine.distributed.deepspeed_config import deepspeed_config
    from engine.engines import build_engine
    from engine.optim import build_optimizer
    from engine.distributed.zero3 import build_model
    from models.t5 import T5ForConditionalGeneration

    with one_rank_world(device):
        torch.manual_seed(run_cfg.run.seed)
        # As build_trainer: at ZeRO-3 built partitioned (engine/distributed/zero3.py).
        model = build_model(lambda: T5ForConditionalGeneration(mcfg), run_cfg, "deepspeed", device)
        n_params = mcfg.num_parameters()  # the whole model's (a ZeRO-3 rank holds only shards)
        engine = build_engine("deepspeed", model, build_optimizer(model.parameters(), run_cfg.optim), run_cfg, device)
        batch = make_batch(mcfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length, device)
        lr, skipped = run_cfg.optim.lr, []

        clock = PhaseClock(device)

        def step():
            loss = engine.forward(batch).loss
            clock.mark()
            engine.backward(loss)
            clock.mark()
            info = engine.micro_step(True, lr)
            skipped.append(not info.applied)
            return loss.detach()

        try:
            out = _time_steps(step, clock, scfg, device)
        finally:
            inner = getattr(engine, "ds", None)  # deepspeed's own engine: drop its hooks and buffers
            if inner is not None and hasattr(inner, "destroy"):
                inner.destroy()
            del engine, model, batch
            free_memory(device)
    # A skipped update (non-finite gradients) is not a training step: say how many there were.
    return {**out, "params": n_params, "steps_skipped": sum(skipped[scfg.warmup:]),
            "deepspeed_config": deepspeed_config(run_cfg, 1)}


def free_memory(device: torch.device) -> None:
    """Drop what a finished (or failed) provider left behind before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
