"""Model suite: one full training step (forward, backward, optimizer) per preset, ours vs Hugging Face.

The providers (benchmarks/model_providers.py, where each is built and timed): t5forge, the engine
through DeepSpeed on one rank with the preset's ready config; t5forge-torch, models/t5.py in a plain-torch
set-up; hf-sdpa and hf-sdpa-compile, transformers' T5 in the same set-up. Every provider trains the same
random batch. This module decides how each (preset, provider) is measured and turns what was measured
into a record (FLOPs, throughput, MFU, the activation count the plan predicts).

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

import torch

from benchmarks import devices, model_providers, plan

PRESETS = ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b",
           "t5-v1_1-small", "t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl")
OFFLOAD_CHOICES = ("auto", "always", "never")  # when the t5forge provider may use ZeRO-3 + CPU offload
# bf16 params (2) + bf16 grads (2) + fp32 master (4) + Adam moments (8): the plain-torch set-up
# (model_providers.MasterWeightAdamW).
STATE_BYTES_PER_PARAM = 16
EXTRAPOLATION_DEPTHS = (1, 2)
# Fields of a measurement that say how it ran, kept when points are extrapolated.
HOW_IT_RAN = ("attn_implementation", "kernel_backend", "compiled", "compile_backend", "dynamic", "graphs",
              "signatures", "recompile_budget_per_signature")


@dataclasses.dataclass
class ModelSuiteConfig:
    presets: tuple[str, ...] = PRESETS
    providers: tuple[str, ...] = model_providers.PROVIDERS
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
            **{k: last[k] for k in HOW_IT_RAN if k in last},
            "measured_points": [{"depth": d, **{k: r[k] for k in ("step_s", "peak_mem_mb", "params")}}
                                for d, r in points]}


# ----------------------------------------------------------------------------------------------------
# One record per (preset, provider)
# ----------------------------------------------------------------------------------------------------

def _run_engine_provider(preset: str, scfg: ModelSuiteConfig, info: devices.DeviceInfo, on_cpu: bool) -> dict:
    run_cfg = model_providers.engine_run_config(preset, scfg, on_cpu)
    mcfg = model_providers.engine_model_config(preset, run_cfg)
    decision = plan_engine_run(mcfg, run_cfg, scfg, info)
    if decision["method"] == "offload":
        run_cfg = model_providers.engine_run_config(preset, scfg, on_cpu, offload=True)
    record = {"kernel_backend": mcfg.kernel_backend, "num_layers": mcfg.num_layers,
              **model_providers.engine_fields(run_cfg),
              "planned_mem_gb": decision["planned_mem_gb"], "plan": decision["plan"]}
    device = info.torch_device
    if decision["method"] == "extrapolated":
        measure = lambda depth: model_providers.measure_engine_step(  # noqa: E731
            run_cfg, model_providers.engine_model_config(preset, run_cfg, depth), scfg, device)
        return {**record, **_extrapolated(measure, mcfg, decision["plan"])}
    m = model_providers.measure_engine_step(run_cfg, mcfg, scfg, device)
    return {**record, **m, "method": "measured", "status": "ok"}


def _run_torch_provider(preset: str, provider: str, scfg: ModelSuiteConfig, info: devices.DeviceInfo,
                        on_cpu: bool) -> dict:
    checkpointing = False
    with contextlib.suppress(FileNotFoundError):  # same recomputation as the preset's ready config
        checkpointing = model_providers.engine_run_config(preset, scfg, on_cpu).model.gradient_checkpointing
    cfg = model_providers.load_config(preset, on_cpu=on_cpu, checkpointing=checkpointing)
    bf16 = scfg.dtype != torch.float32
    # For transformers the implementation it chose is read back from the model (model_providers.how_it_ran).
    record = {"kernel_backend": cfg.kernel_backend if provider == "t5forge-torch" else None,
              "num_layers": cfg.num_layers, "engine": "torch", "zero_stage": None, "offload": "none",
              "precision": "bf16 params, fp32 master" if bf16 else "fp32", "optimizer": "adamw (fused, torch)",
              "gradient_checkpointing": checkpointing}
    if provider.endswith("-compile") and on_cpu and not scfg.compile_on_cpu:
        return {**record, "status": "skipped",
                "reason": "torch.compile on the CPU is off by default (minutes of start-up); --compile-on-cpu"}
    ok, need, budget = fits(cfg, scfg, info)
    record["planned_mem_gb"] = need / 2 ** 30
    if ok:
        return {**record, **model_providers.measure_step(provider, cfg, scfg, info.torch_device),
                "method": "measured", "status": "ok"}
    measure = lambda depth: model_providers.measure_step(  # noqa: E731
        provider, model_providers.load_config(preset, depth, on_cpu, checkpointing), scfg, info.torch_device)
    return {**record, **_extrapolated(measure, cfg, f"planned {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB")}


def run_preset(preset: str, provider: str, scfg: ModelSuiteConfig, info: devices.DeviceInfo,
               peak_tflops: float, ceiling_tflops: float) -> dict:
    on_cpu = info.kind == "cpu"
    record = {"preset": preset, "provider": provider, "batch_size": scfg.batch_size,
              "inputs_length": scfg.inputs_length, "targets_length": scfg.targets_length,
              "dtype": str(scfg.dtype).replace("torch.", "")}
    try:
        if provider == model_providers.ENGINE_PROVIDER:
            record.update(_run_engine_provider(preset, scfg, info, on_cpu))
        else:
            record.update(_run_torch_provider(preset, provider, scfg, info, on_cpu))
    except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203 -- one preset's OOM must not end the suite
        model_providers.free_memory(info.torch_device)
        return {**record, "status": "oom", "reason": str(e).splitlines()[0]}
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as e:
        return {**record, "status": "missing", "reason": f"{type(e).__name__}: {e}"}
    if record.get("status") != "ok":
        return record
    cfg = model_providers.load_config(preset)
    flops = training_flops(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length)
    step_s = record["step_s"]
    tflops = flops / step_s / 1e12
    record.update(flops_per_step=flops, tflops=tflops,
                  seqs_per_s=scfg.batch_size / step_s,
                  tokens_per_s=scfg.batch_size * (scfg.inputs_length + scfg.targets_length) / step_s,
                  mfu=tflops / peak_tflops, mfu_of_ceiling=tflops / ceiling_tflops)
    if record.get("saved_activation_mb") is not None:
        profile = activation_profile(info.kind, record["kernel_backend"])
        mcfg = model_providers.load_config(preset, on_cpu=on_cpu, checkpointing=record["gradient_checkpointing"])
        predicted = plan.activation_bytes(mcfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length,
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
                model_providers.free_memory(info.torch_device)
            if rec.get("status") == "ok":
                how = rec["method"] + (f", ZeRO-{rec['zero_stage']}" if rec.get("zero_stage") is not None else "")
                how += f", offload {rec['offload']}" if rec.get("offload", "none") != "none" else ""
                log(f"  {how}: {rec['step_s'] * 1e3:.1f} ms/step, {rec['seqs_per_s']:.2f} seq/s, "
                    f"MFU {rec['mfu'] * 100:.1f}%")
            else:
                log(f"  {rec['status']}: {rec.get('reason', '')}")
            records.append(rec)
    return records
