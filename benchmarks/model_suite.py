"""Model suite: one full training step (forward, backward, optimizer) per preset, ours vs Hugging Face.

Every provider trains the SAME random batch (inputs / targets of fixed length, no padding). Providers:
  t5forge          the engine as a user trains with it: the preset's ready config (engine/configs/
                   <preset>.toml: ZeRO stage, precision regime, optimizer, activation checkpointing) with
                   the micro-batch overridden for this machine and grad_accum 1, the DeepSpeed JSON derived
                   by engine/deepspeed_config.py, `deepspeed.initialize` on one rank (gloo on the CPU)
  t5forge-torch    models/t5.py in the baselines' plain-torch set-up (below): the model code alone
  hf-sdpa          transformers' T5ForConditionalGeneration, attn_implementation="sdpa"
  hf-sdpa-compile  the same under torch.compile (compile time excluded: it runs during warm-up)
The plain-torch providers share one regime: bf16 parameters and activations, fp32 master weights and
AdamW moments, so t5forge-torch : hf-sdpa measures the model code; t5forge : hf-sdpa adds the engine
(DeepSpeed, the preset's optimizer, e.g. Adafactor). All providers follow the ready config's activation
checkpointing, so every provider does the same work.

A preset too large for the device under its own ZeRO config runs the t5forge provider with ZeRO-3 and
CPU offload of optimizer and parameters when `t5forge plan`'s estimates say the device and the host
memory allow it (records say `offload: "optimizer+params"`); otherwise, and for the plain-torch
providers, it is measured depth-reduced: the same width with 1 and 2 layers per stack, step time and
memory extrapolated linearly per layer to the full depth (`method: "extrapolated"`, labelled in the
report). Nothing here reports a figure it did not measure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
import socket
import time

import torch

from benchmarks import devices, plan

PRESETS = ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b",
           "t5-v1_1-small", "t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl")
PROVIDERS = ("t5forge", "t5forge-torch", "hf-sdpa", "hf-sdpa-compile")
ENGINE_PROVIDER = "t5forge"
OFFLOAD_CHOICES = ("auto", "always", "never")  # when the t5forge provider may use ZeRO-3 + CPU offload
# bf16 params (2) + bf16 grads (2) + fp32 master (4) + Adam moments (8): the plain-torch set-up below.
STATE_BYTES_PER_PARAM = 16
EXTRAPOLATION_DEPTHS = (1, 2)


@dataclasses.dataclass
class ModelSuiteConfig:
    presets: tuple[str, ...] = PRESETS
    providers: tuple[str, ...] = PROVIDERS
    batch_size: int = 8
    inputs_length: int = 512
    targets_length: int = 114
    dtype: torch.dtype = torch.bfloat16
    warmup: int = 2
    steps: int = 5
    # Fraction of device memory a measured run may plan to use; beyond it the preset is extrapolated.
    memory_fraction: float = 0.85
    memory_limit_gb: float | None = None  # override of the device memory (tests force extrapolation)
    host_memory_limit_gb: float | None = None  # override of the available host memory (offload planning)
    compile_on_cpu: bool = False
    # auto: ZeRO-3 + CPU offload for the t5forge provider only where the preset's own config does not fit
    # a GPU (on a CPU "offloading" to the same memory gains nothing); always: every preset; never: none.
    offload: str = "auto"


def training_flops(cfg, batch: int, inputs_length: int, targets_length: int) -> float:
    """Matmul FLOPs of one training step: models/config.py `flops_per_sequence` (its docstring has the
    count; PaLM's MFU convention, backward = 2x forward) times the batch."""
    return float(cfg.flops_per_sequence(inputs_length, targets_length)) * batch


def activation_profile(info_kind: str, kernel_backend: str | None) -> str:
    """The benchmarks/plan.py activation profile matching how a provider runs on this device."""
    if info_kind == "cpu":
        return "torch-cpu"
    if kernel_backend == "torch":
        return "torch-cuda"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch-cuda"
    return "triton"


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
    from engine.train import build_model_config
    from models.config import T5Config

    # The ready configs pin vocab_size; the preset's own size stands in for a tokenizer (tiny pins none).
    cfg = build_model_config(run_cfg, T5Config.from_preset(preset).vocab_size)
    return cfg if depth is None else cfg.replace(num_layers=depth, num_decoder_layers=depth)


def engine_fields(run_cfg) -> dict:
    """What a t5forge record says about the engine set-up it ran under."""
    from engine.deepspeed_config import autocast_dtype

    ds = run_cfg.deepspeed
    offload = "+".join(n for n, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on)
    # The regime the engine derives from the precision key (engine/deepspeed_config.py): at ZeRO 0 bf16 is
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
        raise ValueError(f"benchmarks/model_suite.py: unknown provider {provider!r}; one of {PROVIDERS}")
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
    forward = torch.compile(model) if provider.endswith("-compile") else model

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
    del model, opt, forward, batch
    _free(device)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_world(device: torch.device):
    """A world of one rank for `deepspeed.initialize`, without a launcher; the environment is restored after.

    The process group is created once and kept: DeepSpeed caches its groups, and a destroyed group cannot
    be made again in the same process. The launcher variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*)
    are only set while an engine is built and stepped (DeepSpeed reads LOCAL_RANK then), so nothing run
    later in the process mistakes itself for a launched rank (engine.engines.launched_distributed).
    """
    import torch.distributed as dist

    saved = dict(os.environ)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    try:
        if not dist.is_initialized():
            from engine.engines import start_process_group

            os.environ["MASTER_PORT"] = str(_free_port())  # other jobs on this machine may hold a fixed one
            start_process_group(device)
        elif dist.get_world_size() != 1:
            raise ValueError("benchmarks/model_suite.py: the model suite measures one rank; run it without a "
                             f"launcher (this process is in a world of {dist.get_world_size()})")
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def measure_engine_step(run_cfg, mcfg, scfg: ModelSuiteConfig, device: torch.device) -> dict:
    """The t5forge provider: the engine's model, optimizer and DeepSpeed engine from `run_cfg`, one rank."""
    from engine.deepspeed_config import deepspeed_config
    from engine.engines import build_engine
    from engine.optim import build_optimizer
    from engine.zero3 import build_model
    from models.t5 import T5ForConditionalGeneration

    with one_rank_world(device):
        torch.manual_seed(run_cfg.run.seed)
        # As build_trainer: at ZeRO-3 built partitioned (engine/zero3.py).
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
            inner = getattr(engine, "engine", None)  # deepspeed's own engine: drop its hooks and buffers
            if inner is not None and hasattr(inner, "destroy"):
                inner.destroy()
            del engine, model, batch
            _free(device)
    # A skipped update (non-finite gradients) is not a training step: say how many there were.
    return {**out, "params": n_params, "steps_skipped": sum(skipped[scfg.warmup:]),
            "deepspeed_config": deepspeed_config(run_cfg, 1)}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Planning: what fits, and how the preset is measured
# ----------------------------------------------------------------------------------------------------

def _budgets(scfg: ModelSuiteConfig, info: devices.DeviceInfo) -> tuple[float, float]:
    """(device bytes, host bytes) a run may plan to use."""
    device = (scfg.memory_limit_gb * 2 ** 30) if scfg.memory_limit_gb else info.memory_bytes
    host = (scfg.host_memory_limit_gb * 2 ** 30) if scfg.host_memory_limit_gb else devices.host_memory_bytes()[1]
    return device * scfg.memory_fraction, host * scfg.memory_fraction


def _activations(cfg, scfg: ModelSuiteConfig, info: devices.DeviceInfo) -> float:
    return plan.activation_bytes(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length,
                                 checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)),
                                 backend=activation_profile(info.kind, getattr(cfg, "kernel_backend", None)),
                                 bytes_per_el=torch.finfo(scfg.dtype).bits // 8)["total"]


def fits(cfg, scfg: ModelSuiteConfig, info: devices.DeviceInfo) -> tuple[bool, float, float]:
    """(fits, planned bytes, budget bytes) for a plain-torch single-device run of this config."""
    total, _ = plan.count_params(cfg)
    need = total * STATE_BYTES_PER_PARAM + _activations(cfg, scfg, info)
    budget, _ = _budgets(scfg, info)
    return need <= budget, need, budget


def _state_option(options, stage: int, offload_optimizer: bool, offload_params: bool):
    """plan.zero_options' row for a ZeRO set-up; on one rank ZeRO-1 with offload costs what ZeRO-2's does."""
    for stage_try in ((stage, 2) if stage == 1 else (stage,)):
        for o in options:
            if (o.stage, o.offload_optimizer, o.offload_param) == (stage_try, offload_optimizer, offload_params):
                return o
    raise ValueError(f"benchmarks/model_suite.py: no memory estimate for ZeRO-{stage} "
                     f"(offload optimizer {offload_optimizer}, params {offload_params})")


def plan_engine_run(mcfg, run_cfg, scfg: ModelSuiteConfig, info: devices.DeviceInfo) -> dict:
    """How the t5forge provider measures this preset: its own ZeRO config, ZeRO-3 + CPU offload, or
    depth-reduced extrapolation. Model states from DeepSpeed's estimators (`t5forge plan`, one GPU),
    activations from the plan's formula for this micro-batch and the config's checkpointing."""
    total, largest = plan.count_params(mcfg)
    act = _activations(mcfg, scfg, info)
    options = plan.zero_options(total, largest, gpus_per_node=1, nodes=1)
    ds = run_cfg.deepspeed
    own = _state_option(options, ds.zero_stage, ds.offload_optimizer, ds.offload_params)
    off = _state_option(options, 3, True, True)
    budget, host_budget = _budgets(scfg, info)
    gib = 2 ** 30

    def verdict(opt) -> tuple[bool, str]:
        need = opt.gpu_bytes + act
        ok = need <= budget and opt.host_bytes_per_node <= host_budget
        return ok, (f"{opt.name}: device {need / gib:.1f} of {budget / gib:.1f} GiB, host "
                    f"{opt.host_bytes_per_node / gib:.1f} of {host_budget / gib:.1f} GiB")

    own_ok, own_why = verdict(own)
    off_ok, off_why = verdict(off)
    base = {"planned_mem_gb": (own.gpu_bytes + act) / gib, "plan": own_why}
    if scfg.offload == "always":
        return {**base, "method": "offload", "planned_mem_gb": (off.gpu_bytes + act) / gib,
                "plan": off_why + " (--offload always)"}
    if own_ok:
        return {**base, "method": "measured"}
    # On a CPU the "device" is the host memory: offloading to it gains nothing.
    if scfg.offload == "auto" and info.kind == "cuda" and off_ok:
        return {**base, "method": "offload", "planned_mem_gb": (off.gpu_bytes + act) / gib,
                "plan": f"{own_why}: does not fit; {off_why}"}
    why = f"{own_why}: does not fit"
    if scfg.offload == "never":
        why += "; offload off (--offload never)"
    elif info.kind != "cuda":
        why += "; no offload on a CPU device"
    else:
        why += f"; {off_why}: does not fit either"
    return {**base, "method": "extrapolated", "plan": why}


def _extrapolate(points: list[tuple[int, dict]], depth: int, key: str) -> float | None:
    (d1, r1), (d2, r2) = points
    if r1.get(key) is None or r2.get(key) is None:
        return None
    slope = (r2[key] - r1[key]) / (d2 - d1)
    return r1[key] + slope * (depth - d1)


def _extrapolated(measure, cfg, budget_note: str) -> dict:
    """Measure at EXTRAPOLATION_DEPTHS layers per stack (`measure(depth)`), extrapolate to cfg's depth."""
    points = [(depth, measure(depth)) for depth in EXTRAPOLATION_DEPTHS]
    last = points[-1][1]
    return {"method": "extrapolated", "status": "ok", "layers_measured": list(EXTRAPOLATION_DEPTHS),
            "reason": f"{budget_note}: measured at depth {EXTRAPOLATION_DEPTHS} per stack, extrapolated per layer",
            "step_s": _extrapolate(points, cfg.num_layers, "step_s"),
            "peak_mem_mb": _extrapolate(points, cfg.num_layers, "peak_mem_mb"),
            "mem_kind": "extrapolated " + last["mem_kind"], "params": plan.count_params(cfg)[0], "loss": None,
            **({"deepspeed_config": last["deepspeed_config"]} if "deepspeed_config" in last else {}),
            "measured_points": [{"depth": d, **{k: r[k] for k in ("step_s", "peak_mem_mb", "params")}}
                                for d, r in points]}


# ----------------------------------------------------------------------------------------------------
# One record per (preset, provider)
# ----------------------------------------------------------------------------------------------------

def _run_engine_provider(preset: str, scfg: ModelSuiteConfig, info: devices.DeviceInfo, on_cpu: bool) -> dict:
    run_cfg = engine_run_config(preset, scfg, on_cpu)
    mcfg = engine_model_config(preset, run_cfg)
    decision = plan_engine_run(mcfg, run_cfg, scfg, info)
    if decision["method"] == "offload":
        run_cfg = engine_run_config(preset, scfg, on_cpu, offload=True)
    record = {"kernel_backend": mcfg.kernel_backend, "num_layers": mcfg.num_layers, **engine_fields(run_cfg),
              "planned_mem_gb": decision["planned_mem_gb"], "plan": decision["plan"]}
    device = info.torch_device
    if decision["method"] == "extrapolated":
        measure = lambda depth: measure_engine_step(run_cfg, engine_model_config(preset, run_cfg, depth), scfg, device)  # noqa: E731
        return {**record, **_extrapolated(measure, mcfg, decision["plan"])}
    m = measure_engine_step(run_cfg, mcfg, scfg, device)
    return {**record, **m, "method": "measured", "status": "ok"}


def _run_torch_provider(preset: str, provider: str, scfg: ModelSuiteConfig, info: devices.DeviceInfo,
                        on_cpu: bool) -> dict:
    checkpointing = False
    with contextlib.suppress(FileNotFoundError):  # same recomputation as the preset's ready config
        checkpointing = engine_run_config(preset, scfg, on_cpu).model.gradient_checkpointing
    cfg = load_config(preset, on_cpu=on_cpu, checkpointing=checkpointing)
    bf16 = scfg.dtype != torch.float32
    record = {"kernel_backend": cfg.kernel_backend if provider == "t5forge-torch" else "sdpa",
              "num_layers": cfg.num_layers, "engine": "torch", "zero_stage": None, "offload": "none",
              "precision": "bf16 params, fp32 master" if bf16 else "fp32", "optimizer": "adamw (fused, torch)",
              "gradient_checkpointing": checkpointing}
    if provider.endswith("-compile") and on_cpu and not scfg.compile_on_cpu:
        return {**record, "status": "skipped",
                "reason": "torch.compile on the CPU is off by default (minutes of start-up); --compile-on-cpu"}
    ok, need, budget = fits(cfg, scfg, info)
    record["planned_mem_gb"] = need / 2 ** 30
    if ok:
        return {**record, **measure_step(provider, cfg, scfg, info.torch_device), "method": "measured", "status": "ok"}
    measure = lambda depth: measure_step(  # noqa: E731
        provider, load_config(preset, depth, on_cpu, checkpointing), scfg, info.torch_device)
    return {**record, **_extrapolated(measure, cfg, f"planned {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB")}


def run_preset(preset: str, provider: str, scfg: ModelSuiteConfig, info: devices.DeviceInfo,
               peak_tflops: float, ceiling_tflops: float) -> dict:
    on_cpu = info.kind == "cpu"
    record = {"preset": preset, "provider": provider, "batch_size": scfg.batch_size,
              "inputs_length": scfg.inputs_length, "targets_length": scfg.targets_length,
              "dtype": str(scfg.dtype).replace("torch.", "")}
    try:
        if provider == ENGINE_PROVIDER:
            record.update(_run_engine_provider(preset, scfg, info, on_cpu))
        else:
            record.update(_run_torch_provider(preset, provider, scfg, info, on_cpu))
    except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203 -- one preset's OOM must not end the suite
        _free(info.torch_device)
        return {**record, "status": "oom", "reason": str(e).splitlines()[0]}
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as e:
        return {**record, "status": "missing", "reason": f"{type(e).__name__}: {e}"}
    if record.get("status") != "ok":
        return record
    cfg = load_config(preset)
    flops = training_flops(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length)
    step_s = record["step_s"]
    tflops = flops / step_s / 1e12
    record.update(flops_per_step=flops, tflops=tflops,
                  seqs_per_s=scfg.batch_size / step_s,
                  tokens_per_s=scfg.batch_size * (scfg.inputs_length + scfg.targets_length) / step_s,
                  mfu=tflops / peak_tflops, mfu_of_ceiling=tflops / ceiling_tflops)
    if record.get("saved_activation_mb") is not None:
        profile = activation_profile(info.kind, record["kernel_backend"])
        predicted = plan.activation_bytes(load_config(preset, on_cpu=on_cpu, checkpointing=record["gradient_checkpointing"]),
                                          scfg.batch_size, scfg.inputs_length, scfg.targets_length,
                                          checkpointing=record["gradient_checkpointing"], backend=profile,
                                          bytes_per_el=torch.finfo(scfg.dtype).bits // 8)
        record.update(predicted_activation_mb=predicted["saved"] / 2 ** 20, activation_profile=profile)
    return record


def run(scfg: ModelSuiteConfig, info: devices.DeviceInfo, peak_tflops: float, ceiling_tflops: float,
        log=print) -> list[dict]:
    records = []
    for preset in scfg.presets:
        for provider in scfg.providers:
            log(f"model: {preset} / {provider} ...")
            try:
                rec = run_preset(preset, provider, scfg, info, peak_tflops, ceiling_tflops)
            except Exception as e:  # noqa: BLE001 -- a broken provider is a result, reported as such
                rec = {"preset": preset, "provider": provider, "status": "error",
                       "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                _free(info.torch_device)
            if rec.get("status") == "ok":
                how = rec["method"] + (f", ZeRO-{rec['zero_stage']}" if rec.get("zero_stage") is not None else "")
                how += f", offload {rec['offload']}" if rec.get("offload", "none") != "none" else ""
                log(f"  {how}: {rec['step_s'] * 1e3:.1f} ms/step, {rec['seqs_per_s']:.2f} seq/s, "
                    f"MFU {rec['mfu'] * 100:.1f}%")
            else:
                log(f"  {rec['status']}: {rec.get('reason', '')}")
            records.append(rec)
    return records
