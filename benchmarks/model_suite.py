"""Model suite: one full training step (forward, backward, optimizer) per preset, ours vs Hugging Face.

Every provider trains the SAME random batch (inputs / targets of fixed length, no padding) in the same
precision regime: bf16 parameters and activations, fp32 master weights and AdamW moments (what DeepSpeed
bf16 does), so the ratios measure the model code, not the optimizer set-up. Providers:
  t5forge          models/t5.py (kernel backend "auto" on GPU, "torch" on the CPU)
  hf-sdpa          transformers' T5ForConditionalGeneration, attn_implementation="sdpa"
  hf-sdpa-compile  the same under torch.compile (compile time excluded: it runs during warm-up)

A preset too large for the device is measured depth-reduced: the same width with 1 and 2 layers per stack,
and the step time and memory extrapolated linearly per layer to the full depth; such records carry
`method: "extrapolated"` and the report labels them. Nothing here reports a figure it did not measure.
"""
from __future__ import annotations

import dataclasses
import gc
import re
import time

import torch

from benchmarks import devices, plan

PRESETS = ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b",
           "t5-v1_1-small", "t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl")
PROVIDERS = ("t5forge", "hf-sdpa", "hf-sdpa-compile")
# bf16 params (2) + bf16 grads (2) + fp32 master (4) + Adam moments (8): the optimizer set-up below.
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
    compile_on_cpu: bool = False


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

def load_config(preset: str, depth: int | None = None, on_cpu: bool = False):
    from models.config import T5Config

    cfg = T5Config.from_preset(preset)
    changes: dict = {"dropout_rate": 0.0}  # v1.1 pretraining runs without dropout; it keeps runs comparable
    if depth is not None:
        changes.update(num_layers=depth, num_decoder_layers=depth)
    if on_cpu and hasattr(cfg, "kernel_backend"):
        changes["kernel_backend"] = "torch"  # the Triton interpreter is a test tool, not a fast path
    return cfg.replace(**changes)


def build_model(provider: str, cfg, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if provider == "t5forge":
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
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "torch.cuda.max_memory_allocated"
    return _rss_peak_mb(), "process peak RSS (VmHWM; includes the Python process and other models)"


def measure_step(provider: str, cfg, scfg: ModelSuiteConfig, device: torch.device) -> dict:
    """Build one provider, train `warmup + steps` steps on the fixed batch, return timings and memory."""
    model = build_model(provider, cfg, device, scfg.dtype)
    opt = MasterWeightAdamW(model.parameters())
    batch = make_batch(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length, device)
    forward = torch.compile(model) if provider.endswith("-compile") else model

    def step():
        loss = forward(**batch).loss
        loss.backward()
        opt.step()
        return loss.detach()

    compile_start = time.perf_counter()
    for _ in range(scfg.warmup):
        step()
    warmup_s = time.perf_counter() - compile_start
    _reset_peak(device)
    times, loss = [], None
    for _ in range(scfg.steps):
        devices._sync(device)
        start = time.perf_counter()
        loss = step()
        devices._sync(device)
        times.append(time.perf_counter() - start)
    peak, mem_kind = _peak_mb(device)
    saved = None
    if provider == "t5forge":
        # One more (untimed) forward under the saved-tensor hook: the plan's activation count, measured.
        saved = plan.measure_saved_bytes(lambda: forward(**batch).loss, model)
        model.zero_grad(set_to_none=True)
    n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    del model, opt, forward, batch
    _free(device)
    times.sort()
    return {"step_s": times[len(times) // 2], "step_s_min": times[0], "step_s_all": times,
            "warmup_s": warmup_s, "peak_mem_mb": peak, "mem_kind": mem_kind, "loss": float(loss),
            "params": n_params, "saved_activation_mb": None if saved is None else saved / 2 ** 20}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(cfg, scfg: ModelSuiteConfig, info: devices.DeviceInfo) -> tuple[bool, float, float]:
    """(fits, planned bytes, budget bytes) for a plain single-device run of this config."""
    total, _ = plan.count_params(cfg)
    act = plan.activation_bytes(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length,
                                backend=activation_profile(info.kind, getattr(cfg, "kernel_backend", None)),
                                bytes_per_el=torch.finfo(scfg.dtype).bits // 8)
    need = total * STATE_BYTES_PER_PARAM + act["total"]
    limit = (scfg.memory_limit_gb * 2 ** 30) if scfg.memory_limit_gb else info.memory_bytes
    return need <= limit * scfg.memory_fraction, need, limit * scfg.memory_fraction


def _extrapolate(points: list[tuple[int, dict]], depth: int, key: str) -> float | None:
    (d1, r1), (d2, r2) = points
    if r1.get(key) is None or r2.get(key) is None:
        return None
    slope = (r2[key] - r1[key]) / (d2 - d1)
    return r1[key] + slope * (depth - d1)


def run_preset(preset: str, provider: str, scfg: ModelSuiteConfig, info: devices.DeviceInfo,
               peak_tflops: float, ceiling_tflops: float) -> dict:
    device = info.torch_device
    on_cpu = info.kind == "cpu"
    cfg = load_config(preset, on_cpu=on_cpu)
    record = {"preset": preset, "provider": provider, "batch_size": scfg.batch_size,
              "inputs_length": scfg.inputs_length, "targets_length": scfg.targets_length,
              "dtype": str(scfg.dtype).replace("torch.", ""),
              "kernel_backend": getattr(cfg, "kernel_backend", None) if provider == "t5forge" else "sdpa",
              "optimizer": "AdamW, fp32 master weights, bf16 params" if scfg.dtype != torch.float32 else "AdamW fp32",
              "num_layers": cfg.num_layers,
              # The preset's ZeRO config (engine/configs) is not applied yet: one process, no DeepSpeed.
              "engine": "single process, no DeepSpeed"}
    if provider.endswith("-compile") and on_cpu and not scfg.compile_on_cpu:
        return {**record, "status": "skipped",
                "reason": "torch.compile on the CPU is off by default (minutes of start-up); --compile-on-cpu"}
    ok, need, budget = fits(cfg, scfg, info)
    record["planned_mem_gb"] = need / 2 ** 30
    try:
        if ok:
            m = measure_step(provider, cfg, scfg, device)
            record.update(m, method="measured", status="ok")
        else:
            points = []
            for depth in EXTRAPOLATION_DEPTHS:
                small = load_config(preset, depth=depth, on_cpu=on_cpu)
                points.append((depth, measure_step(provider, small, scfg, device)))
            record.update(method="extrapolated", status="ok", layers_measured=list(EXTRAPOLATION_DEPTHS),
                          reason=f"planned {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB: "
                                 f"measured at depth {EXTRAPOLATION_DEPTHS} per stack, extrapolated per layer",
                          step_s=_extrapolate(points, cfg.num_layers, "step_s"),
                          peak_mem_mb=_extrapolate(points, cfg.num_layers, "peak_mem_mb"),
                          mem_kind="extrapolated " + points[-1][1]["mem_kind"],
                          params=plan.count_params(cfg)[0], loss=None,
                          measured_points=[{"depth": d, **{k: r[k] for k in ("step_s", "peak_mem_mb", "params")}}
                                           for d, r in points])
    except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203 -- one preset's OOM must not end the suite
        _free(device)
        return {**record, "status": "oom", "reason": str(e).splitlines()[0]}
    except (ImportError, ModuleNotFoundError) as e:
        return {**record, "status": "missing", "reason": f"{type(e).__name__}: {e}"}
    flops = training_flops(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length)
    step_s = record["step_s"]
    tflops = flops / step_s / 1e12
    record.update(flops_per_step=flops, tflops=tflops,
                  seqs_per_s=scfg.batch_size / step_s,
                  tokens_per_s=scfg.batch_size * (scfg.inputs_length + scfg.targets_length) / step_s,
                  mfu=tflops / peak_tflops, mfu_of_ceiling=tflops / ceiling_tflops)
    if provider == "t5forge" and record.get("saved_activation_mb") is not None:
        profile = activation_profile(info.kind, record["kernel_backend"])
        predicted = plan.activation_bytes(cfg, scfg.batch_size, scfg.inputs_length, scfg.targets_length,
                                          backend=profile, bytes_per_el=torch.finfo(scfg.dtype).bits // 8)
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
                log(f"  {rec['method']}: {rec['step_s'] * 1e3:.1f} ms/step, {rec['seqs_per_s']:.2f} seq/s, "
                    f"MFU {rec['mfu'] * 100:.1f}%")
            else:
                log(f"  {rec['status']}: {rec.get('reason', '')}")
            records.append(rec)
    return records
