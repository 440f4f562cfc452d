"""Checkpoints in the Hugging Face T5 layout, both ways.

A directory holds `config.json` and the weights as `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin` (optionally sharded with its `.index.json`).
Pickled `.bin` files are read with `torch.load(weights_only=True)`, which refuses to execute code.

Names are Hugging Face's. Our model runs wide GEMMs: the gated FFN's `wi_fused` = cat([wi_0, wi_1]),
self-attention's `qkv` = cat([q, k, v]) and cross-attention's `kv` = cat([k, v]) (`FUSED`); this module
is the adapter that merges them on load and splits them on save (torchtitan's state-dict-adapter idea).
Aliases that Hugging Face checkpoints may carry (`encoder.embed_tokens`, `decoder.embed_tokens`, a tied
`lm_head`, the unused cross-attention bias table of the released v1.0 files) are accepted and dropped; an
untied model loaded from a checkpoint without `lm_head` (transformers >= 5 saves v1.1 models tied) starts
its head as a copy of the embedding, which gives the same logits.

    model = from_pretrained("path/to/t5-v1_1-base")          # or T5ForConditionalGeneration.from_pretrained
    save_pretrained(model, "out/")                           # transformers can load "out/"
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import T5Config
from .generation_config import GenerationConfig, read_generation_config, write_generation_config
from .t5 import T5ForConditionalGeneration

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Our fused weights and the Hugging Face tensors they are stacked from (along dim 0, in this order).
FUSED: dict[str, tuple[str, ...]] = {
    "DenseReluDense.wi_fused.weight": ("wi_0", "wi_1"),
    "SelfAttention.qkv.weight": ("q", "k", "v"),
    "EncDecAttention.kv.weight": ("k", "v"),
}
# Tensors some released checkpoints carry that the model does not use: the stacks' copies of the shared
# embedding, and a cross-attention bias table in the released t5-small..11b files (cross-attention has no
# position bias; transformers ignores it on load too).
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _fused_parts(name: str) -> list[str] | None:
    """The Hugging Face names a fused weight of ours is stacked from, or None for an unfused one."""
    for suffix, parts in FUSED.items():
        if name == suffix or name.endswith("." + suffix):
            stem = name[: -len(suffix)] + suffix.rsplit(".", 2)[0] + "."
            return [f"{stem}{part}.weight" for part in parts]
    return None


# ------------------------------------------------------------------------ state-dict adapter
def to_hf_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors named as our parameters (weights, or their gradients) -> Hugging Face names: every fused
    weight split into its parts (views, no copy). Adapter layers have no counterpart and are left out
    (models/adapters.py saves them apart)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".adapter." in name:
            continue
        parts = _fused_parts(name)
        if parts is None:
            out[name] = tensor
        else:
            out.update(zip(parts, tensor.chunk(len(parts), dim=0)))
    return out


def hf_state_dict(model: T5ForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (`to_hf_names` of the state dict)."""
    return to_hf_names(model.state_dict())


def _shown(name: str) -> str:
    """A fused weight as a user knows it: `...SelfAttention.q|k|v.weight`."""
    parts = _fused_parts(name)
    if parts is None:
        return name
    stem = parts[0].rsplit(".", 2)[0]
    return f"{stem}.{'|'.join(p.rsplit('.', 2)[1] for p in parts)}.weight"


def _take_fused(hf: dict, name: str, parts: list[str], shape: torch.Size) -> torch.Tensor | None:
    """Pop and stack the Hugging Face parts of fused weight `name` (None when one is missing), each
    checked against its share of the fused `shape`."""
    tensors = [hf.pop(part, None) for part in parts]
    if any(t is None for t in tensors):
        return None
    want = (shape[0] // len(parts), *shape[1:])
    for part, t in zip(parts, tensors):
        if tuple(t.shape) != want:
            raise ValueError(f"checkpoint weight {part} has shape {tuple(t.shape)}, the config expects {want}")
    return torch.cat(tensors, dim=0)


def convert_hf_state_dict(model: T5ForConditionalGeneration, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our names, checked against `model`: missing, unexpected, wrong shape."""
    hf = dict(hf)
    for alias in _ALIASES:
        hf.pop(alias, None)
    if not hasattr(model, "decoder"):  # encoder-only (models/encoder.py): a whole model's decoder is not needed
        hf = {k: v for k, v in hf.items() if not k.startswith("decoder.")}
    if not hasattr(model, "lm_head"):
        hf.pop("lm_head.weight", None)             # tied (HF may store it; it equals shared.weight) or encoder-only
    elif "lm_head.weight" not in hf and "shared.weight" in hf:
        hf["lm_head.weight"] = hf["shared.weight"].clone()
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in expected.items():
        parts = _fused_parts(name)
        if parts is not None:
            fused = _take_fused(hf, name, parts, tensor.shape)
            if fused is not None:
                out[name] = fused
        elif name in hf:
            out[name] = hf.pop(name)
    missing = [_shown(n) for n in expected if n not in out]
    if missing and any(n.startswith("decoder.") for n in expected) and not any(n.startswith("decoder.") for n in out):
        raise ValueError("checkpoint has no decoder: it is encoder-only (T5EncoderModel-style); load it with "
                         "models.encoder.T5EncoderModel (docs/T5_FAMILY.md), or start from a whole model")
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s): {_first(missing)}")
    if hf:
        raise ValueError(f"checkpoint has {len(hf)} unexpected weight(s) for this config: {_first(hf)}")
    for name, tensor in out.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"checkpoint weight {name} has shape {tuple(tensor.shape)}, "
                             f"the config expects {tuple(expected[name].shape)}")
    return out


def load_hf_state_dict(model: T5ForConditionalGeneration, hf: dict[str, torch.Tensor]) -> None:
    """Copy Hugging Face tensors into `model` (in place, cast to the model's dtypes)."""
    model.load_state_dict(convert_hf_state_dict(model, hf), strict=True)


# --------------------------------------------------------------------------------- reading
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON document, or a one-line error naming the file (missing, a directory, binary, invalid)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: {what} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): a damaged {what}?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}): a damaged {what}?") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    doc = read_json(path, what)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got a JSON {type(doc).__name__}")
    return doc


def verify_safetensors(path: str | os.PathLike) -> dict:
    """Check a safetensors file's structure without reading its tensors: the 8-byte header length, the
    JSON header, and that the tensors' data offsets cover the rest of the file exactly (a truncated or
    padded file fails). Returns the header; raises a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    bad = f"{path}: damaged safetensors file"
    if size < 8:
        raise ValueError(f"{bad} ({size} bytes, shorter than its header; truncated?)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_HEADER):
            raise ValueError(f"{bad} (header of {n} bytes in a {size}-byte file; truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{bad} (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (its header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{bad} (tensor {name!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    data = size - 8 - n
    if end != data:
        raise ValueError(f"{bad} (its tensors need {end} data bytes, the file holds {data}; "
                         f"{'truncated' if end > data else 'trailing bytes'}?)")
    return header


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        verify_safetensors(path)
        return load_file(str(path))
    # weights_only=True: only tensors and plain containers are unpickled, never arbitrary code.
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: damaged or unreadable weights file ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, from whichever of the supported layouts it has."""
    d = Path(directory)
    for single, index in ((SAFETENSORS_NAME, SAFETENSORS_INDEX), (BIN_NAME, BIN_INDEX)):
        if (d / single).is_file():
            return _load_file(d / single)
        if (d / index).is_file():
            weight_map = read_json_object(d / index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{d / index}: no 'weight_map' object")
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(_load_file(d / shard))
            absent = [k for k in weight_map if k not in tensors]
            if absent:
                raise ValueError(f"{d / index} lists weights that no shard holds: {_first(absent)}")
            return tensors
    raise FileNotFoundError(f"no weights in {d}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, "
                            f"{BIN_NAME} or {BIN_INDEX}")


def read_config(directory: str | os.PathLike, **overrides: Any) -> T5Config:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"checkpoint directory has no {CONFIG_NAME}: {d}")
    doc = read_json_object(d / CONFIG_NAME, "model config")
    try:
        return T5Config.from_hf_dict(doc, **overrides)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{d / CONFIG_NAME}: {e}") from None


def from_pretrained(directory: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", model_class: type = T5ForConditionalGeneration,
                    **overrides: Any) -> T5ForConditionalGeneration:
    """Build the model (`model_class`, e.g. models.encoder.T5EncoderModel) from a Hugging Face T5-family
    checkpoint directory.

    `dtype="auto"` keeps the checkpoint's dtype; `overrides` change config fields (e.g. kernel_backend,
    dropout_rate). The model is built on the meta device and the loaded tensors are assigned, so the
    weights are held in memory once.
    """
    config = read_config(directory, **overrides)
    tensors = read_weights(directory)
    with torch.device("meta"):
        model = model_class(config)
    try:
        state = convert_hf_state_dict(model, tensors)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None
    if dtype != "auto":
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # generate()'s defaults for this checkpoint (models/generation_config.py), when it has the file.
    if hasattr(model, "generate"):
        model.generation_config = read_generation_config(directory) or GenerationConfig()
    return model.to(device)


# --------------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def save_pretrained(model: T5ForConditionalGeneration, directory: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB") -> None:
    """Write `config.json`, `generation_config.json` (the model's `generation_config`, else the defaults)
    and safetensors weights (sharded with an index above `max_shard_size`)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Weights of another layout left in the directory would shadow or mix with the new ones on load.
    for stale in [d / SAFETENSORS_NAME, d / SAFETENSORS_INDEX, d / BIN_NAME, d / BIN_INDEX,
                  *d.glob("model-*-of-*.safetensors"), *d.glob("pytorch_model-*-of-*.bin")]:
        stale.unlink(missing_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in hf_state_dict(model).items()}
    dtypes = {t.dtype for t in tensors.values()}
    config = model.config.to_hf_dict()
    if getattr(model, "hf_architecture", None):
        config["architectures"] = [model.hf_architecture]
    config["torch_dtype"] = str(max(dtypes, key=lambda t: t.itemsize)).removeprefix("torch.")
    (d / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if hasattr(model, "generate"):
        generation = getattr(model, "generation_config", None)
        write_generation_config(generation if isinstance(generation, GenerationConfig) else GenerationConfig(),
                                d, model.config)

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without this tag
    if len(shards) == 1:
        save_file(shards[0], str(d / SAFETENSORS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname), metadata=metadata)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
