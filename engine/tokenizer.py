"""T5's tokenizer: a SentencePiece unigram model plus 100 sentinel ids, and `t5forge tokenizer train`.

    t5forge tokenizer train --input c4-train.*.json.gz --vocab-size 32000 --out my_spm
    # -> my_spm.model, my_spm.vocab (pad 0, eos 1, unk 2, as T5)

Ids are laid out as in the released T5 vocabulary (docs/T5.md): the SentencePiece pieces
first (`<pad>`=0, `</s>`=1, `<unk>`=2), then the sentinels counting DOWN from the top, so
`<extra_id_0>` = vocab_size - 1 (32099 with the real vocabulary) and `<extra_id_99>` = 32000. The
model's embedding has 32128 rows (rounded up to a multiple of 128); `vocab_size` here is 32100.

Text is encoded the way Hugging Face's `T5Tokenizer` does it: special-token strings written in the text
(`<extra_id_N>`, `</s>`, `<pad>`, `<unk>`) become their ids, and each stretch of text between them is
encoded on its own by SentencePiece. Batches go to SentencePiece's C++ thread pool in one call.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import re
import sys
import zlib
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

NUM_SENTINELS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

# HF's T5Tokenizer splits on its added special tokens before running the model; sentinel numbers
# beyond the 100 that exist stay plain text there too.
_SPECIAL_RE = re.compile(r"<extra_id_(\d{1,2})>|</s>|<pad>|<unk>")
_SPECIAL_FIXED = {"</s>": EOS_ID, "<pad>": PAD_ID, "<unk>": UNK_ID}


class Tokenizer:
    """A SentencePiece model file with T5's 100 sentinels appended (highest id = `<extra_id_0>`)."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, model_file: str | os.PathLike, num_sentinels: int = NUM_SENTINELS,
                 num_threads: int = -1, parse_special: bool = True):
        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        self.model_file = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
        for name, want in (("pad", PAD_ID), ("eos", EOS_ID), ("unk", UNK_ID)):
            got = getattr(self.sp, f"{name}_id")()
            if got != want:
                raise ValueError(f"{path}: {name} id is {got}, T5 needs {want} (train with `t5forge tokenizer train`)")
        self.num_pieces = self.sp.get_piece_size()
        self.num_sentinels = num_sentinels
        # -1: let SentencePiece pick (one thread per core); batches are split over them in C++.
        self.num_threads = num_threads
        self.parse_special = parse_special

    @property
    def vocab_size(self) -> int:
        """Pieces + sentinels (32100 for T5); the model pads its embedding up to a multiple of 128."""
        return self.num_pieces + self.num_sentinels

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} out of range [0, {self.num_sentinels})")
        return self.vocab_size - 1 - i

    def _split(self, text: str) -> list[str | int]:
        """Text chunks and special ids in order (chunks never contain special-token strings)."""
        if not self.parse_special or "<" not in text:
            return [text]
        parts: list[str | int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.group(1) is not None:
                n = int(m.group(1))
                if n >= self.num_sentinels or (len(m.group(1)) > 1 and m.group(1)[0] == "0"):
                    continue  # "<extra_id_07>" / "<extra_id_100>" are not tokens
                tok = self.sentinel_id(n)
            else:
                tok = _SPECIAL_FIXED[m.group(0)]
            if m.start() > pos:
                parts.append(text[pos:m.start()])
            parts.append(tok)
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return parts

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Token ids of one text; `add_eos=True` appends `</s>` as HF does by default."""
        return self.encode_batch([text], add_eos=add_eos)[0]

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False) -> list[list[int]]:
        """Token ids of many texts in one SentencePiece call (its C++ threads do the work)."""
        splits = [self._split(t) for t in texts]
        chunks = [p for parts in splits for p in parts if isinstance(p, str)]
        encoded = iter(self.sp.encode(chunks, num_threads=self.num_threads)) if chunks else iter(())
        out: list[list[int]] = []
        for parts in splits:
            if len(parts) == 1 and isinstance(parts[0], str):
                ids = next(encoded)  # the common case: no special strings in the text
            else:
                ids = []
                for p in parts:
                    if isinstance(p, str):
                        ids.extend(next(encoded))
                    else:
                        ids.append(p)
            if add_eos:
                ids.append(EOS_ID)
            out.append(ids)
        return out

    def id_to_piece(self, i: int) -> str:
        if i >= self.num_pieces:
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        return self.sp.id_to_piece(i)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ids; sentinels are written `<extra_id_N>`; pad/eos are dropped, and with
        `skip_special` the sentinels too. Ids past the vocabulary (embedding padding) are dropped."""
        pieces: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i in (PAD_ID, EOS_ID) or i < 0 or i >= self.vocab_size:
                continue
            if i >= self.num_pieces:
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    pieces.append(self.id_to_piece(i))
            else:
                run.append(i)
        if run:
            pieces.append(self.sp.decode(run))
        return " ".join(p for p in pieces if p)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------------
# training

def iter_text_files(paths: Sequence[str], max_chars_per_doc: int = 0) -> Iterator[str]:
    """Documents of JSON-lines files (the `text` field) or lines of plain text files, gzip or not.

    Strict: the input must be UTF-8 text (a binary file such as an executable is refused at its first
    undecodable line, never trained on as replacement characters); errors name the file and line."""
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"{path}: tokenizer training input is a directory, not a file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training input not found: {path}")
        yield from _file_sentences(path, max_chars_per_doc)


def _file_sentences(path: str, max_chars_per_doc: int) -> Iterator[str]:
    is_json = ".json" in os.path.basename(path)
    lineno = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if b"\0" in raw:
                    raise ValueError(f"{path}:{lineno}: NUL byte: a binary file, not text")
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.strip():
                    continue
                if is_json:
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"{path}:{lineno}: not a JSON object with a 'text' field") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: 'text' is not a string")
                else:
                    text = line
                if max_chars_per_doc:
                    text = text[:max_chars_per_doc]
                # SentencePiece trains on "sentences"; one per line keeps each under its length limit.
                for sentence in text.split("\n"):
                    if sentence.strip():
                        yield sentence
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {err.start} of the line; a binary file?)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: damaged gzip file after line {lineno} ({err})") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_prefix: str, *,
                    character_coverage: float = 0.9995, input_sentence_size: int = 2_000_000,
                    seed_sentencepiece_size: int = 1_000_000, num_threads: int = 0) -> str:
    """Train a unigram SentencePiece model with T5's special ids; returns the `.model` path.

    `vocab_size` counts the pieces only (32000 for T5); the 100 sentinels are added by `Tokenizer`.
    The vocabulary size is a soft limit so a small corpus still gives a model (with fewer pieces).
    """
    if vocab_size < 8:
        raise ValueError(f"--vocab-size must be at least 8, got {vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    feed = _Feed(iter(texts))
    try:
        _train_spm(feed, vocab_size, out_prefix, character_coverage, input_sentence_size, seed_sentencepiece_size,
                   num_threads)
    except RuntimeError:
        if feed.error is not None:  # our reader's one-line error, not SentencePiece's "INTERNAL: ..." wrapping
            raise feed.error from None
        raise
    return out_prefix + ".model"


class _Feed:
    """The sentence iterator handed to SentencePiece; keeps an exception the input raised, which the C++
    trainer would otherwise turn into a RuntimeError with a C++ location and a Python frame in it."""

    def __init__(self, it: Iterator[str]):
        self.it, self.error = it, None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self.it)
        except StopIteration:
            raise
        except Exception as err:
            self.error = err
            raise


def _train_spm(sentences, vocab_size, out_prefix, character_coverage, input_sentence_size, seed_sentencepiece_size,
               num_threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=out_prefix, model_type="unigram",
        vocab_size=vocab_size, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentencepiece_size,
        hard_vocab_limit=False, num_threads=num_threads or (os.cpu_count() or 1),
        minloglevel=2,  # the trainer's per-iteration log is noise for a CLI user
    )


def tokenizer_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="t5forge tokenizer", description="tokenizer tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a unigram SentencePiece model with T5's ids (pad 0, eos 1, unk 2)")
    tr.add_argument("--input", nargs="+", required=True, help="JSON-lines (with 'text') or plain text files, .gz ok")
    tr.add_argument("--vocab-size", type=int, default=32000, help="pieces, without the 100 sentinels")
    tr.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    tr.add_argument("--character-coverage", type=float, default=0.9995)
    tr.add_argument("--input-sentence-size", type=int, default=2_000_000, help="sentences sampled for training")
    args = parser.parse_args(argv)
    from engine.errors import USER_ERRORS, one_line

    try:
        sentences = iter_text_files(args.input)
        first = next(sentences, None)  # an empty corpus is the user's mistake, not SentencePiece's INTERNAL error
        if first is None:
            raise ValueError(f"no text to train on in --input {' '.join(args.input)} (empty files?)")
        model = train_tokenizer(itertools.chain([first], sentences), args.vocab_size, args.out,
                                character_coverage=args.character_coverage,
                                input_sentence_size=args.input_sentence_size)
        tok = Tokenizer(model)
    except (*USER_ERRORS, RuntimeError) as exc:
        print(f"t5forge tokenizer: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {model} ({tok.num_pieces} pieces + {tok.num_sentinels} sentinels = {tok.vocab_size} ids)")
    return 0
