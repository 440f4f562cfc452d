"""Where `t5forge finetune` starts from (engine/finetune.py): the init model and its tokenizer.

`finetune.init` is a Hugging Face directory, one of our local-engine checkpoints (or a run directory: its
latest complete checkpoint), or "preset:NAME" (random T5 init); `finetune.tokenizer` must be the init's own
tokenizer when it carries one. Every problem is a one-line error naming the config key and the path.
"""
from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import torch

from engine import config as run_config

if TYPE_CHECKING:
    from engine.config import FinetuneSection


def own_tokenizer(init: pathlib.Path) -> str | None:
    """The tokenizer an init directory (or a run directory's latest checkpoint) carries, or None."""
    from engine import checkpoint as ckpt
    from engine.tokenizer_files import find_tokenizer

    if (init / "checkpoints").is_dir():
        init = ckpt.latest_checkpoint(init / "checkpoints") or init
    return find_tokenizer(init)


def init_tokenizer(ft: FinetuneSection, init: pathlib.Path) -> str:
    """`finetune.tokenizer`, else the init directory's own; a given one must be the init's own (the same
    bytes, or both ByT5) when it has one (the model learned those ids)."""
    from engine.tokenizer_files import check_same_tokenizer, check_spec_exists

    own = own_tokenizer(init)
    if ft.tokenizer:
        check_spec_exists(ft.tokenizer, "config key 'finetune.tokenizer'")
        if own:
            try:
                check_same_tokenizer(ft.tokenizer, own, f"finetune.init {init}")
            except ValueError as err:
                raise ValueError(f"config key 'finetune.tokenizer': {err}") from None
        return ft.tokenizer
    if not own:
        raise FileNotFoundError(f"config key 'finetune.tokenizer': no tokenizer in {init} (no spiece.model, "
                                "tokenizer/*.model or ByT5 tokenizer_config.json); set finetune.tokenizer")
    return own


def load_init_model(ft: FinetuneSection, cfg, kind: str = "local", device: torch.device | None = None):
    """The starting model and its tokenizer file: a Hugging Face directory, or one of our local-engine
    checkpoints (model.safetensors + trainer state holding the run config, tokenizer/ next to it).
    At ZeRO-3 the model is built partitioned and the weights loaded one module at a time, read by
    rank 0 only (engine/distributed/zero3.py)."""
    from engine import checkpoint as ckpt
    from engine.build import model_overrides
    from engine.distributed.zero3 import build_model, builds_partitioned, load_partitioned
    from models.hf_checkpoint import convert_hf_state_dict, from_pretrained, read_config, read_weights
    from models.t5 import T5ForConditionalGeneration

    device = device or torch.device("cpu")
    partitioned = builds_partitioned(cfg, kind)

    if ft.init.startswith("preset:"):  # from scratch: a preset with random T5 init (demos, ablations)
        from engine.tokenizer_files import check_spec_exists, open_tokenizer
        from models.config import T5Config

        if not ft.tokenizer:
            raise ValueError("config key 'finetune.tokenizer': required with finetune.init = 'preset:...'")
        check_spec_exists(ft.tokenizer, "config key 'finetune.tokenizer'")
        vocab = -(-open_tokenizer(ft.tokenizer).vocab_size // 128) * 128
        try:
            config = T5Config.from_preset(ft.init[len("preset:"):], vocab_size=vocab, **model_overrides(cfg))
        except (KeyError, ValueError) as err:
            raise ValueError(f"config key 'finetune.init': {err}") from None
        return build_model(lambda: T5ForConditionalGeneration(config), cfg, kind, device), ft.tokenizer
    init = pathlib.Path(ft.init)
    if not init.is_dir():
        raise FileNotFoundError(f"config key 'finetune.init': directory not found: {init}")
    if (init / "checkpoints").is_dir():  # a run directory: its latest checkpoint
        latest = ckpt.latest_checkpoint(init / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"config key 'finetune.init': {init}/checkpoints has no complete checkpoint")
        init = latest
    if (init / "trainer_state.json").is_file():  # one of our checkpoints: verified before use
        try:
            ckpt.verify_checkpoint(init)
        except ValueError as err:
            raise ValueError(f"config key 'finetune.init': {err}") from None
    elif not (init / "config.json").is_file():
        raise FileNotFoundError(f"config key 'finetune.init': {init} has neither config.json (a Hugging Face "
                                "directory) nor trainer_state.json (a t5forge checkpoint)")
    tokenizer_file = init_tokenizer(ft, init)
    overrides = model_overrides(cfg)
    if (init / "config.json").is_file():
        if not partitioned:
            return from_pretrained(init, **overrides), tokenizer_file
        config = read_config(init, **overrides)
        # No random draws (as from_pretrained's meta build): the adapters drawn next match the plain path's.
        model = build_model(lambda: T5ForConditionalGeneration(config), cfg, kind, device, init=False)

        def read_hf():  # Hugging Face names -> ours, checked against a weightless model of the config
            with torch.device("meta"):
                shapes = T5ForConditionalGeneration(config)
            try:
                return convert_hf_state_dict(shapes, read_weights(init))
            except ValueError as err:
                raise ValueError(f"config key 'finetune.init': {init}: {err}") from None

        load_partitioned(model, read_hf)
        return model, tokenizer_file
    if (init / "model.safetensors").is_file():
        from safetensors.torch import load_file, load_model

        from engine.build import build_model_config
        from engine.tokenizer_files import open_tokenizer

        saved = run_config.config_from_dict(ckpt.load_trainer_state(init)["config"])
        for key, value in model_overrides(cfg).items():   # [model] keys of the same names
            setattr(saved.model, key, value)
        config = build_model_config(saved, open_tokenizer(tokenizer_file).vocab_size)
        if not partitioned:
            model = T5ForConditionalGeneration(config)
            load_model(model, str(init / "model.safetensors"))
            return model, tokenizer_file
        # Initialized although overwritten: the plain path makes these random draws too (adapters are drawn next).
        model = build_model(lambda: T5ForConditionalGeneration(config), cfg, kind, device)
        load_partitioned(model, lambda: load_file(str(init / "model.safetensors")),
                         where=f"config key 'finetune.init': {init / 'model.safetensors'}: ")
        return model, tokenizer_file
    raise FileNotFoundError(f"config key 'finetune.init': {init} has neither config.json (Hugging Face) nor "
                            "model.safetensors (our checkpoint; export DeepSpeed runs with `t5forge export`)")
