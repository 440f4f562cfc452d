"""`GenerationConfig`: the decoding options `generate` takes, with Hugging Face's names and meanings.

    cfg = resolve(model, dict(max_new_tokens=12, num_beams=4))   # defaults <- generation_config.json <- kwargs
    cfg.new_tokens()                                              # tokens generated at most (12)

Defaults are Hugging Face's `GenerationConfig` defaults (max_length 20 decoder positions including the start
token, top_k 50 when sampling, ...), except the beam-search length penalty: T5X's brevity penalty
`log_prob / ((5 + length) / 6) ** length_penalty` with `length_penalty` 0.6 (the T5 paper's alpha), where
Hugging Face divides by `length ** length_penalty` (default 1.0). `length_normalization="hf"` (our key)
selects Hugging Face's formula. See docs/GENERATION.md.

A checkpoint's `generation_config.json` supplies defaults (`read_generation_config`); keys we do not
implement are accepted only at their Hugging Face default or null, anything else is an error naming
the file and key, never silently ignored. `write_generation_config` writes the file on save.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"
EARLY_STOPPING = (False, True, "never")
LENGTH_NORMALIZATIONS = ("t5x", "hf")
CACHE_IMPLEMENTATIONS = ("static", "dynamic")
COMPILE_MODES = ("reduce-overhead", "cuda-graph", "aot_eager", "eager")  # models/compiled_step.py
DECODE_KERNELS = ("auto", "model", "reference", "sdpa-attention")           # models/compiled_step.py
# Hugging Face generate arguments we do not implement: named in the error, so a user knows it is not a typo.
_HF_UNSUPPORTED = {  # name: its Hugging Face default (the value at which it does nothing)
    "num_beam_groups": 1, "diversity_penalty": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "min_p": None, "top_h": None, "penalty_alpha": None, "bad_words_ids": None, "force_words_ids": None,
    "constraints": None, "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "output_attentions": False, "output_hidden_states": False, "output_logits": None,
    "renormalize_logits": False, "remove_invalid_values": False, "max_time": None, "stop_strings": None,
    "low_memory": None, "watermarking_config": None, "logits_processor": None, "stopping_criteria": None,
    "prefix_allowed_tokens_fn": None, "assistant_model": None, "streamer": None, "decoder_input_ids": None,
    "encoder_outputs": None, "inputs_embeds": None, "synced_gpus": None, "dola_layers": None,
}
_FILE_IGNORED = ("transformers_version", "use_cache", "bos_token_id", "is_encoder_decoder")


@dataclass
class GenerationConfig:
    max_length: int = 20                  # decoder positions including the start token (HF's meaning)
    max_new_tokens: int | None = None     # generated tokens at most; overrides max_length
    min_length: int = 0                   # EOS is banned while the decoder sequence (start token included) is shorter
    min_new_tokens: int | None = None     # EOS is banned before this many generated tokens
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0              # only when sampling
    top_k: int | None = 50                # only when sampling; 0 / None = off
    top_p: float = 1.0                    # only when sampling; 1.0 = off
    repetition_penalty: float = 1.0       # CTRL's penalty over the decoder sequence (start token included)
    no_repeat_ngram_size: int = 0
    length_penalty: float = 0.6           # beams: T5X's alpha (or HF's exponent with length_normalization="hf")
    length_normalization: str = "t5x"     # ours: "t5x" ((5 + L) / 6) ** lp, "hf" L ** lp
    early_stopping: bool | str = False    # HF: False heuristic, True at num_beams finished, "never" exact
    output_scores: bool = False
    return_dict_in_generate: bool = False
    cache_implementation: str = "static"  # "static" preallocated KV cache, "dynamic" the torch.cat cache
    compile_step: bool | str = False      # ours: the decode step under torch.compile (models/compiled_step.py)
    decode_kernels: str = "auto"          # ours: the decode step's kernels (models/compiled_step.py)
    decoder_start_token_id: int | None = None   # None: from the model's config
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def replace(self, **changes: Any) -> "GenerationConfig":
        check_names(changes, "generate()")
        return dataclasses.replace(self, **changes)

    def new_tokens(self) -> int:
        """How many tokens are generated at most (the decoder start token is not generated)."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_length - 1

    def min_tokens(self) -> int:
        """Generated tokens before EOS is allowed (min_new_tokens, min_length - 1, whichever is larger)."""
        return max(self.min_new_tokens or 0, self.min_length - 1, 0)

    def validate(self, where: str = "generate()") -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{where}: {name}={getattr(self, name)!r}: {why}")

        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(name, f"must be an integer >= {low}")

        integer("max_length", 1)
        integer("max_new_tokens", 1, optional=True)
        integer("min_length", 0)
        integer("min_new_tokens", 0, optional=True)
        integer("num_beams", 1)
        integer("num_return_sequences", 1)
        integer("no_repeat_ngram_size", 0)
        integer("top_k", 0, optional=True)
        if self.max_new_tokens is None and self.max_length < 2:
            fail("max_length", "counts the decoder start token, so it must be >= 2 to generate anything")
        for name in ("do_sample", "output_scores", "return_dict_in_generate"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                fail(name, "must be a number > 0")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            fail("length_penalty", "must be a number")
        if self.length_normalization == "t5x" and self.length_penalty < 0:
            fail("length_penalty", "T5X's brevity penalty takes alpha >= 0 (length_normalization='hf' takes any)")
        if self.length_normalization not in LENGTH_NORMALIZATIONS:
            fail("length_normalization", f"expected one of {LENGTH_NORMALIZATIONS}")
        if not any(self.early_stopping is v if isinstance(v, bool) else self.early_stopping == v
                   for v in EARLY_STOPPING):
            fail("early_stopping", "expected true, false or 'never'")
        if self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            fail("cache_implementation", f"expected one of {CACHE_IMPLEMENTATIONS}")
        if not (isinstance(self.compile_step, bool) or self.compile_step in COMPILE_MODES):
            fail("compile_step", f"expected true, false or one of {COMPILE_MODES}")
        if self.decode_kernels not in DECODE_KERNELS:
            fail("decode_kernels", f"expected one of {DECODE_KERNELS}")
        if self.compile_step is not False and self.cache_implementation != "static":
            fail("compile_step", "compiles the step over the static cache: needs cache_implementation='static'")
        if self.num_return_sequences > 1 and self.num_beams == 1 and not self.do_sample:
            fail("num_return_sequences", "greedy search returns one sequence; use num_beams or do_sample=True")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            fail("num_return_sequences", f"must be <= num_beams={self.num_beams}")
        for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            integer(name, 0, optional=True)


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def check_names(kwargs: dict, where: str) -> None:
    """TypeError naming the first argument that is not a generation option we implement."""
    for name in kwargs:
        if name in FIELDS:
            continue
        if name in _HF_UNSUPPORTED:
            raise TypeError(f"{where}: {name!r} is a Hugging Face generation argument that t5forge does not "
                            f"support")
        raise TypeError(f"{where}: unexpected argument {name!r} (supported: {', '.join(FIELDS)}, generator)")


def from_model(model) -> GenerationConfig:
    """The model's defaults: its `generation_config` (read from the checkpoint) or the library defaults."""
    base = getattr(model, "generation_config", None)
    return dataclasses.replace(base) if isinstance(base, GenerationConfig) else GenerationConfig()


def resolve(model, kwargs: dict, generation_config: GenerationConfig | dict | None = None) -> GenerationConfig:
    """defaults <- model.generation_config <- `generation_config` <- kwargs, validated, token ids filled in."""
    cfg = from_model(model)
    if isinstance(generation_config, dict):
        cfg = cfg.replace(**generation_config)
    elif isinstance(generation_config, GenerationConfig):
        cfg = dataclasses.replace(generation_config)
    elif generation_config is not None:
        raise TypeError(f"generate(): generation_config must be a GenerationConfig or a dict, got "
                        f"{type(generation_config).__name__}")
    cfg = cfg.replace(**kwargs)
    mc = model.config
    for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, name) is None:
            setattr(cfg, name, getattr(mc, name))
    cfg.validate()
    return cfg


def _is_off(key: str, value: Any) -> bool:
    """A key we do not implement that is at its Hugging Face default (or null) changes nothing."""
    if value is None or key not in _HF_UNSUPPORTED:
        return value is None
    default = _HF_UNSUPPORTED[key]
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def read_generation_config(directory: str | os.PathLike) -> GenerationConfig | None:
    """`generation_config.json` of a checkpoint directory (None without one), checked key by key."""
    path = Path(directory) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    kwargs = {}
    for key, value in data.items():
        if key in FIELDS:
            kwargs[key] = value[0] if key == "eos_token_id" and isinstance(value, list) and value else value
        elif key.startswith("_") or key in _FILE_IGNORED or _is_off(key, value):
            continue
        else:
            raise ValueError(f"{path}: key {key!r}={value!r} is not supported by t5forge's generate")
    cfg = GenerationConfig(**kwargs)
    cfg.validate(where=str(path))
    return cfg


def write_generation_config(config: GenerationConfig, directory: str | os.PathLike, model_config) -> None:
    """The token ids and every option that differs from our defaults; transformers reads the file too
    (it keeps `length_normalization` as an unknown attribute)."""
    defaults = GenerationConfig()
    out = {name: getattr(config, name) for name in FIELDS if getattr(config, name) != getattr(defaults, name)}
    for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
        out[name] = getattr(config, name) if getattr(config, name) is not None else getattr(model_config, name)
    path = Path(directory) / GENERATION_CONFIG_NAME
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
