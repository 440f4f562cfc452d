"""Which tokenizer a run uses, how a directory carries it, and whether two are the same.

A tokenizer is named by a *spec*: the path of a SentencePiece model (engine/tokenizer.py), or `byt5`, the
byte-level tokenizer of engine/byt5.py, which has no file. Every key and option that takes a tokenizer
(`data.tokenizer`, `finetune.tokenizer`, `t5forge generate --tokenizer`) takes a spec.

    tok = open_tokenizer(spec)
    spec = find_tokenizer(model_dir)          # spiece.model, tokenizer/*.model, or ByT5's marker; None
    write_tokenizer(spec, out_dir)            # spiece.model, or ByT5's tokenizer_config.json

A directory carries ByT5 the way Hugging Face's does (docs/T5_FAMILY.md): a `tokenizer_config.json`
(or a `config.json`) whose `tokenizer_class` is `ByT5Tokenizer`; transformers' AutoTokenizer loads what
`write_tokenizer` writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

BYT5 = "byt5"
BYT5_CLASS = "ByT5Tokenizer"
_BYT5_CONFIG = {"tokenizer_class": BYT5_CLASS, "extra_ids": 125, "eos_token": "</s>", "pad_token": "<pad>",
                "unk_token": "<unk>"}


def is_byt5(spec) -> bool:
    return os.fspath(spec) == BYT5


def open_tokenizer(spec, **kw):
    """The tokenizer a spec names: `Tokenizer(path, **kw)`, or `ByT5Tokenizer()` for `byt5`."""
    if is_byt5(spec):
        from engine.byt5 import ByT5Tokenizer

        return ByT5Tokenizer()
    from engine.tokenizer import Tokenizer

    return Tokenizer(spec, **kw)


def check_spec_exists(spec, key: str) -> None:
    """A spec that is neither `byt5` nor an existing file: one line naming `key`."""
    if is_byt5(spec):
        return
    path = pathlib.Path(spec)
    if path.is_dir():
        raise ValueError(f"{key} {path}: is a directory; give the SentencePiece .model file (or {BYT5})")
    if not path.is_file():
        raise FileNotFoundError(f"{key}: file not found: {path} (a SentencePiece .model file, or {BYT5})")


def _names_byt5(path: pathlib.Path) -> bool:
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({type(err).__name__})") from None
    return isinstance(data, dict) and data.get("tokenizer_class") == BYT5_CLASS


def find_tokenizer(directory) -> str | None:
    """The tokenizer a model or checkpoint directory carries: its `spiece.model`, a `tokenizer/*.model`
    (our checkpoints), `byt5` when a tokenizer or model config names ByT5's class; else None."""
    d = pathlib.Path(directory)
    for path in (d / "spiece.model", *sorted((d / "tokenizer").glob("*.model"))):
        if path.is_file():
            return str(path)
    if any(_names_byt5(p) for p in (d / "tokenizer_config.json", d / "tokenizer" / "tokenizer_config.json",
                                    d / "config.json")):
        return BYT5
    return None


def write_tokenizer(spec, directory, name: str = "spiece.model") -> None:
    """Put the tokenizer into `directory` (which exists): the SentencePiece file as `name`, or ByT5's
    `tokenizer_config.json`."""
    d = pathlib.Path(directory)
    if is_byt5(spec):
        (d / "tokenizer_config.json").write_text(json.dumps(_BYT5_CONFIG, indent=2) + "\n")
    else:
        shutil.copy2(spec, d / name)


def tokenizer_fingerprint(spec) -> dict:
    """What identifies a tokenizer: the SHA-256 of its bytes (of its name for `byt5`) and its vocabulary
    size (pieces + sentinels)."""
    if is_byt5(spec):
        data = json.dumps(_BYT5_CONFIG, sort_keys=True).encode()
    else:
        with open(os.fspath(spec), "rb") as f:
            data = f.read()
    return {"sha256": hashlib.sha256(data).hexdigest(), "vocab_size": open_tokenizer(spec).vocab_size}


def describe_tokenizer(spec, fp: dict | None = None) -> str:
    fp = fp or tokenizer_fingerprint(spec)
    if is_byt5(spec):
        return f"{BYT5} (byte-level, {fp['vocab_size']} ids)"
    return f"{os.fspath(spec)} (sha256 {fp['sha256'][:12]}, {fp['vocab_size']} ids)"


def check_same_tokenizer(given, reference, where: str) -> None:
    """A one-line ValueError when `given` is not the same tokenizer as `reference` (a spec, or a fingerprint
    saved with a checkpoint); `where` names what the reference belongs to."""
    fp = tokenizer_fingerprint(given)
    ref = reference if isinstance(reference, dict) else tokenizer_fingerprint(reference)
    if fp["sha256"] == ref["sha256"]:
        return
    ref_name = where if isinstance(reference, dict) else describe_tokenizer(reference, ref)
    size = (f"{fp['vocab_size']} ids vs {ref['vocab_size']}" if fp["vocab_size"] != ref["vocab_size"]
            else f"same size, {ref['vocab_size']} ids, but other pieces / ids")
    raise ValueError(f"tokenizer {describe_tokenizer(given, fp)} differs from the one {where} was trained with"
                     f"{'' if isinstance(reference, dict) else ': ' + ref_name} ({size}); use that tokenizer "
                     "(or a new run directory)")


def check_fits_model(tokenizer_vocab: int, model_vocab: int, tokenizer_file, model_where: str) -> None:
    """A tokenizer must fit the model's embedding and leave at most a multiple-of-128 padding unused:
    bigger gives out-of-range ids, much smaller is another model's tokenizer."""
    padded = -(-tokenizer_vocab // 128) * 128
    if tokenizer_vocab > model_vocab or model_vocab > padded:
        how = "more ids than" if tokenizer_vocab > model_vocab else "far fewer ids than"
        raise ValueError(f"tokenizer {tokenizer_file} has {tokenizer_vocab} ids, {how} the vocabulary of "
                         f"{model_where} ({model_vocab}); it is not this model's tokenizer")
