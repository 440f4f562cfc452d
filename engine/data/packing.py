"""Packing (inputs, targets) examples into fixed-size rows, and the batch dicts the trainer consumes.

Packed batch (docs/T5.md: several examples per row; attention never crosses segments; relative positions
restart per segment; decoder inputs restart with 0 at each segment start), all int64 numpy arrays:

    input_ids            (B, L_in)   examples' inputs one after another, 0 = padding
    encoder_segment_ids  (B, L_in)   1, 2, ... per example in the row, 0 on padding
    encoder_positions    (B, L_in)   0.. within each segment, 0 on padding
    decoder_input_ids    (B, L_tgt)  targets shifted right inside each segment, 0 at segment starts
    decoder_segment_ids  (B, L_tgt)
    decoder_positions    (B, L_tgt)
    labels               (B, L_tgt)  targets, -100 on padding (no loss there)

Unpacked batch (one example per row): input_ids, attention_mask, decoder_input_ids,
decoder_attention_mask, labels. Rows are filled greedily in order ("next fit"): a row is closed when
the next example does not fit in both its encoder and its decoder part, so packing is deterministic
and resumable. An example longer than a row is cut to the row (T5's trim) and counted in `Trimmed`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE_INDEX = -100
PACKED_KEYS = ("input_ids", "encoder_segment_ids", "encoder_positions", "decoder_input_ids",
               "decoder_segment_ids", "decoder_positions", "labels")
UNPACKED_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")

Example = tuple[np.ndarray, np.ndarray]


def trim(example: Example, inputs_length: int, targets_length: int) -> tuple[Example, bool]:
    inp, tgt = example
    cut = len(inp) > inputs_length or len(tgt) > targets_length
    return (inp[:inputs_length], tgt[:targets_length]), cut


def next_fit_rows(lengths: Sequence[tuple[int, int]], inputs_length: int, targets_length: int,
                  max_rows: int | None = None) -> list[list[int]]:
    """Example indices per row, in order. Only rows that are known to be closed are returned when
    `max_rows` is given (the row still open at the end is not, so its examples can wait for more)."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used_in = used_tgt = 0
    for i, (li, lt) in enumerate(lengths):
        li, lt = min(li, inputs_length), min(lt, targets_length)
        if cur and (used_in + li > inputs_length or used_tgt + lt > targets_length):
            rows.append(cur)
            if max_rows is not None and len(rows) == max_rows:
                return rows
            cur, used_in, used_tgt = [], 0, 0
        cur.append(i)
        used_in += li
        used_tgt += lt
    if cur and max_rows is None:
        rows.append(cur)
    return rows


def shift_right_ids(tgt, start_id: int = 0) -> np.ndarray:
    """One example's decoder inputs: its targets shifted one to the right behind `start_id` (T5's start id
    is the pad id, 0: docs/T5.md). The data-side twin of models.t5.shift_right, which does the same to a
    batch of labels; every data path (packing, unpacked rows, task mixtures) builds its rows with this one."""
    tgt = np.asarray(tgt, dtype=np.int64)
    return np.concatenate([[start_id], tgt[:-1]]).astype(np.int64) if len(tgt) else tgt


def packed_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], inputs_length: int,
                 targets_length: int) -> dict[str, np.ndarray]:
    """Build the packed arrays for `rows` (lists of indices into `examples`). One slice assignment per
    example (never per token)."""
    b = len(rows)
    out = {k: np.zeros((b, targets_length if k.startswith("decoder") or k == "labels" else inputs_length),
                       dtype=np.int64) for k in PACKED_KEYS}
    out["labels"].fill(IGNORE_INDEX)
    for r, idxs in enumerate(rows):
        pin = ptg = 0
        for seg, i in enumerate(idxs, start=1):
            inp, tgt = examples[i]
            inp, tgt = inp[:inputs_length - pin], tgt[:targets_length - ptg]
            n, m = len(inp), len(tgt)
            out["input_ids"][r, pin:pin + n] = inp
            out["encoder_segment_ids"][r, pin:pin + n] = seg
            out["encoder_positions"][r, pin:pin + n] = np.arange(n)
            out["labels"][r, ptg:ptg + m] = tgt
            out["decoder_input_ids"][r, ptg:ptg + m] = shift_right_ids(tgt)
            out["decoder_segment_ids"][r, ptg:ptg + m] = seg
            out["decoder_positions"][r, ptg:ptg + m] = np.arange(m)
            pin += n
            ptg += m
    return out


def dense_packed_batch(inputs: np.ndarray, targets: np.ndarray, inputs_length: int,
                       targets_length: int) -> dict[str, np.ndarray]:
    """Fast path for one example per row given as dense (B, n) / (B, m) arrays (span corruption cut
    to exactly fill 512/114): same result as `packed_batch` with one index per row."""
    b, n = inputs.shape
    m = targets.shape[1]
    if n > inputs_length or m > targets_length:
        raise ValueError(f"dense examples {n}/{m} longer than the row {inputs_length}/{targets_length}")
    out = {k: np.zeros((b, targets_length if k.startswith("decoder") or k == "labels" else inputs_length),
                       dtype=np.int64) for k in PACKED_KEYS}
    out["input_ids"][:, :n] = inputs
    out["encoder_segment_ids"][:, :n] = 1
    out["encoder_positions"][:, :n] = np.arange(n)
    out["labels"].fill(IGNORE_INDEX)
    out["labels"][:, :m] = targets
    out["decoder_input_ids"][:, 1:m] = targets[:, :m - 1]   # shift_right_ids on every row at once (start id 0)
    out["decoder_segment_ids"][:, :m] = 1
    out["decoder_positions"][:, :m] = np.arange(m)
    return out


def unpacked_batch(examples: Sequence[Example], inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
    """One example per row, padded with 0; masks 1 on real tokens; labels -100 on padding."""
    b = len(examples)
    out = {k: np.zeros((b, targets_length if k.startswith("decoder") or k == "labels" else inputs_length),
                       dtype=np.int64) for k in UNPACKED_KEYS}
    out["labels"].fill(IGNORE_INDEX)
    for r, (inp, tgt) in enumerate(examples):
        inp, tgt = inp[:inputs_length], tgt[:targets_length]
        out["input_ids"][r, :len(inp)] = inp
        out["attention_mask"][r, :len(inp)] = 1
        out["labels"][r, :len(tgt)] = tgt
        out["decoder_input_ids"][r, :len(tgt)] = shift_right_ids(tgt)
        out["decoder_attention_mask"][r, :len(tgt)] = 1
    return out


def unpack_batch(batch: dict[str, np.ndarray]) -> list[Example]:
    """The examples of a packed batch, in order (tests and debugging: the inverse of packing)."""
    examples: list[Example] = []
    for r in range(batch["input_ids"].shape[0]):
        enc_seg, dec_seg = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
        for seg in range(1, int(max(enc_seg.max(initial=0), dec_seg.max(initial=0))) + 1):
            examples.append((batch["input_ids"][r][enc_seg == seg], batch["labels"][r][dec_seg == seg]))
    return examples
