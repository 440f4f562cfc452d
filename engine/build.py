"""Builders: a run config turned into device, threads, data, model config and a ready Trainer.

The commands (engine/train.py, engine/finetune.py) and the benchmarks build through these, so a run is
set up the same way whichever of them starts it.
"""
from __future__ import annotations

import glob
import os
import pathlib
import random

import numpy as np
import torch

from engine.config import RunConfig
from engine.tokenizer_files import check_spec_exists, open_tokenizer, tokenizer_fingerprint


def pick_device(cfg: RunConfig) -> torch.device:
    want = cfg.run.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("config key 'run.device': cuda requested but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_threads(cfg: RunConfig) -> None:
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
        return
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_procs)))


def set_determinism(cfg: RunConfig, device: torch.device) -> bool:
    """`run.deterministic`: PyTorch's deterministic algorithms (auto: on the CPU only); True when on.

    On the CPU the one run-to-run difference at more than one thread was the relative-position bias
    gradient: the backward of `table[buckets]` accumulates with atomic adds from several threads, in an
    order that changes run to run; the deterministic path sorts the indices first (and is faster there).
    On a GPU it also selects cuBLAS's fixed-workspace mode and the attention kernel's deterministic
    bias-gradient reduction (models/attention_spec.py reads the switch)."""
    mode = cfg.run.deterministic
    on = mode == "on" or (mode == "auto" and device.type == "cpu")
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
    # warn_only: an op without a deterministic kernel warns instead of stopping the run.
    torch.use_deterministic_algorithms(on, warn_only=True)
    return on


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_data(cfg: RunConfig) -> tuple[list[str], str]:
    """The data files and tokenizer model: the user's, or the built-in corpus made on first use."""
    if not cfg.data.paths:
        from engine.data import builtin

        import fcntl

        # Made once and cached (engine/data/builtin.py). Ranks of one machine start together under a
        # launcher: a file lock lets the first build it while the others wait and then reuse it.
        cache = pathlib.Path(builtin.cache_dir())
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            paths, tokenizer_file = builtin.ensure_builtin()
        tokenizer = cfg.data.tokenizer or tokenizer_file
        return [str(p) for p in paths], str(tokenizer)
    files: list[str] = []
    for pattern in cfg.data.paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"config key 'data.paths': no file matches {pattern!r}")
        files.extend(matches)
    if not cfg.data.tokenizer:
        raise ValueError("config key 'data.tokenizer': a SentencePiece model (or byt5) is required with "
                         "data.paths (the real T5 vocabulary is spiece.model)")
    check_spec_exists(cfg.data.tokenizer, "config key 'data.tokenizer'")
    return files, cfg.data.tokenizer


def target_length(cfg: RunConfig) -> int:
    if cfg.data.target_length > 0:
        return cfg.data.target_length
    from engine.data.objectives import compute_span_corruption_lengths

    _, targets = compute_span_corruption_lengths(cfg.data.input_length, cfg.data.noise_density,
                                                 cfg.data.mean_noise_span_length)
    return targets


def build_data(cfg: RunConfig, files: list[str], tokenizer, rank: int, world_size: int):
    from engine.data.pipeline import build_pretrain_dataset

    objective_params = {}
    if cfg.data.objective in ("span_corruption", "iid_denoising", "bert", "mask_every_token", "drop_corrupted",
                              "denoise"):
        objective_params["noise_density"] = cfg.data.noise_density
        if cfg.data.objective in ("span_corruption", "denoise"):
            objective_params["mean_noise_span_length"] = cfg.data.mean_noise_span_length
    return build_pretrain_dataset(
        files, tokenizer, cfg.data.objective, objective_params, inputs_length=cfg.data.input_length,
        targets_length=target_length(cfg), batch_size=cfg.batch.micro_batch_size, pack=cfg.data.pack,
        seed=cfg.run.seed, rank=rank, world_size=world_size, shuffle_buffer=cfg.data.shuffle_buffer,
        num_workers=cfg.data.num_workers, strict=cfg.data.strict)


def model_overrides(cfg: RunConfig) -> dict:
    """What the run's [model] section changes in a model config, whatever the config comes from (a preset,
    a checkpoint to fine-tune, a saved run): kernels, activation checkpointing, dropout when set."""
    out = {"kernel_backend": cfg.model.kernel_backend, "gradient_checkpointing": cfg.model.gradient_checkpointing}
    if cfg.model.dropout_rate >= 0:
        out["dropout_rate"] = cfg.model.dropout_rate
    return out


def build_model_config(cfg: RunConfig, tokenizer_vocab: int):
    from models.config import T5Config

    vocab = cfg.model.vocab_size or -(-tokenizer_vocab // 128) * 128
    if vocab < tokenizer_vocab:
        raise ValueError(f"config key 'model.vocab_size': {vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    try:
        return T5Config.from_preset(cfg.model.preset, vocab_size=vocab, **model_overrides(cfg))
    except (KeyError, ValueError) as err:
        raise ValueError(f"config key 'model.preset': {err}") from None


def build_trainer(cfg: RunConfig, data=None, tokenizer_file: str | None = None, tokenizer_vocab: int | None = None):
    """Model, optimizer, engine and trainer from a run config (data may be injected, as tests do)."""
    from engine.engines import build_engine, choose_engine
    from engine.optim import build_optimizer
    from engine.trainer import Trainer
    from engine.distributed.zero3 import build_model
    from models.t5 import T5ForConditionalGeneration

    from models.config import PRESETS

    if cfg.model.preset not in PRESETS:  # checked before any data is built
        raise ValueError(f"config key 'model.preset': unknown preset {cfg.model.preset!r}; one of {', '.join(PRESETS)}")
    device = pick_device(cfg)
    set_threads(cfg)
    set_determinism(cfg, device)
    kind = choose_engine(cfg, device)
    if data is None:
        files, tokenizer_file = resolve_data(cfg)
        tokenizer = open_tokenizer(tokenizer_file)
        tokenizer_vocab = tokenizer.vocab_size
    model_config = build_model_config(cfg, tokenizer_vocab)
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    # ZeRO-3: built partitioned (engine/distributed/zero3.py), the same weights as this plain build.
    model = build_model(lambda: T5ForConditionalGeneration(model_config), cfg, kind, device)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    engine = build_engine(kind, model, optimizer, cfg, device)
    # Dropout masks and data shuffles differ per rank; a resume restores these states exactly.
    seed_everything(cfg.run.seed + 1000 * (engine.rank + 1))
    if data is None:
        data = build_data(cfg, files, tokenizer, engine.rank, engine.world_size)
    flops = model_config.flops_per_token(cfg.data.input_length, target_length(cfg))
    extra = {"model_config": model_config.to_hf_dict()}
    if tokenizer_file:  # what export / finetune / generate compare a tokenizer with
        extra["tokenizer"] = tokenizer_fingerprint(tokenizer_file)
    trainer = Trainer(cfg, engine, data, flops_per_token=flops, tokenizer_file=tokenizer_file, device=device,
                      extra_state=extra)
    return trainer, model_config
