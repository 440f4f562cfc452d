"""The DeepSpeed JSON, derived from the run config in one function so batch sizes cannot disagree."""
from __future__ import annotations

from engine.config import RunConfig

# DeepSpeed prints every N steps; the trainer does its own logging, so keep DeepSpeed quiet.
_NEVER = 2**31 - 1


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The `config` dict for `deepspeed.initialize`, for `world_size` data-parallel ranks.

    Precision: fp16 uses DeepSpeed's dynamic loss scaling (an overflowing step is skipped and the scale
    halved, never the weights touched); T5's FFN overflow in the forward is saturated by the model
    (models/t5.py `saturate_fp16`). bf16 at ZeRO 0 is NOT handed
    to DeepSpeed: the trainer autocasts the forward and keeps fp32 weights, so the optimizer steps each
    real parameter; at ZeRO >= 1 DeepSpeed holds bf16 weights and fp32 master partitions, and the engine
    tells our optimizers which parameter slices each partition holds (engines.zero_partition_layouts),
    so Adafactor's factored moments and the RMS statistics stay per parameter.
    """
    ds = cfg.deepspeed
    micro, accum = cfg.batch.micro_batch_size, cfg.batch.grad_accum
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.reduce_bucket_size,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.reduce_bucket_size
        zero["stage3_param_persistence_threshold"] = 100_000
        # Export consolidates with zero_to_fp32 from the sharded files; no 16-bit gather at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        # Our Adafactor / AdamWScale are client optimizers: allow them under ZeRO and under offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if ds.precision == "bf16" and ds.zero_stage > 0:
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif ds.precision == "fp16":
        # hysteresis 1: halve on every overflow at every ZeRO stage (ZeRO 0's FP16_UnfusedOptimizer ignores
        # hysteresis) and like the local engine's GradScaler.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 1, "min_loss_scale": 1}
    return config


def autocast_dtype(cfg: RunConfig):
    """The dtype the trainer autocasts the forward to, or None (see `deepspeed_config`)."""
    import torch

    if cfg.deepspeed.precision == "bf16" and cfg.deepspeed.zero_stage == 0:
        return torch.bfloat16
    return None
