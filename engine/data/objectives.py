"""Pretraining objectives of the T5 paper (Raffel et al., sections 3.3 and 3.4; facts in docs/T5.md).

Every objective maps one 1-D array of token ids (a raw chunk of the concatenated corpus) and a numpy
`Generator` to `(inputs, targets)`, both ending in EOS. They are selected by name from `OBJECTIVES`:

    obj = get_objective("span_corruption", noise_density=0.15, mean_noise_span_length=3.0)
    raw_len = obj.raw_length(512, 114)              # 568: tokens to cut from the stream per example
    inputs, targets = obj(tokens, rng)              # one example
    inputs, targets = obj.batch(tokens_2d, rng)     # (B, raw_len) -> lists / arrays, same results

| name              | inputs                                   | targets                         |
|-------------------|------------------------------------------|---------------------------------|
| span_corruption   | noise spans -> one unique sentinel each  | sentinel + dropped span, ...    |
| iid_denoising     | i.i.d. noise tokens, runs -> sentinels   | sentinel + dropped run, ...     |
| bert              | noise tokens -> mask (90%) / random (10%)| the original text               |
| mask_every_token  | each noise token -> the mask id          | the original text               |
| drop_corrupted    | noise tokens dropped                     | the dropped tokens only         |
| prefix_lm         | a random-length prefix                   | the rest                        |
| deshuffling       | the tokens shuffled                      | the original text               |

The general `denoise` objective exposes the three knobs those rows combine (`noise_mask`:
random_spans | iid; `inputs_mode`: sentinel_spans | mask | random_or_mask | drop; `targets_mode`:
sentinel_spans | original | noise_only) with any `noise_density` and `mean_noise_span_length`.

`span_corruption` follows T5/seqio exactly: noise = round(n * density) tokens, spans = round(noise /
mean) (>= 1), the noise and non-noise counts each cut into `spans` pieces by a uniformly random
segmentation, spans alternating non-noise / noise starting with non-noise; sentinels count down from
`first_sentinel_id` (<extra_id_0> = 32099). Randomness: one `rng.random(K)` draw per example, ranked
to choose segment boundaries, so the batched path's `rng.random((B, K))` gives identical results.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import numpy as np

EOS_ID = 1


# --------------------------------------------------------------------------------------------------
# lengths

def _span_corruption_counts(n: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a raw chunk of n tokens, as seqio's random_spans_noise_mask."""
    length = max(n, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    # seqio would fail when there are fewer non-noise tokens than spans (density near 1); we clamp.
    num_spans = min(num_spans, length - num_noise)
    return num_noise, num_spans


def compute_span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                                    mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw_tokens_length, targets_length) so span-corrupted inputs are exactly `inputs_length`.

    T5's random_spans_helper: the largest raw length whose inputs (non-noise + one sentinel per span
    + EOS) fit; at density 0.5, when targets come out longer than inputs, both lose one token.
    """
    if inputs_length < 2:
        raise ValueError(f"inputs_length must be >= 2, got {inputs_length}")

    def lengths(t: int) -> tuple[int, int]:
        noise = int(round(t * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return t - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


# --------------------------------------------------------------------------------------------------
# span corruption: one example (plain loops over spans, the reference) and a batch (vectorised)

def _segment_lengths(keys: np.ndarray, num_items: int, num_segments: int) -> list[int]:
    """Random segmentation of num_items into num_segments non-empty pieces: the segment boundaries
    are the num_segments-1 gaps whose keys rank lowest among the num_items-1 gaps."""
    order = np.argsort(keys, kind="stable")
    cuts = sorted(int(i) + 1 for i in order[:num_segments - 1])
    edges = [0] + cuts + [num_items]
    return [edges[i + 1] - edges[i] for i in range(num_segments)]


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """Boolean noise mask of one example (True = noise), non-noise first, spans alternating."""
    n = max(length, 2)
    num_noise, num_spans = _span_corruption_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise = n - num_noise
    keys = rng.random((num_noise - 1) + (num_nonnoise - 1))
    noise_lengths = _segment_lengths(keys[:num_noise - 1], num_noise, num_spans)
    nonnoise_lengths = _segment_lengths(keys[num_noise - 1:], num_nonnoise, num_spans)
    mask = np.zeros(n, dtype=bool)
    pos = 0
    for keep, drop in zip(nonnoise_lengths, noise_lengths):
        pos += keep
        mask[pos:pos + drop] = True
        pos += drop
    return mask[:length]


def _sentinel_spans(tokens: np.ndarray, mask: np.ndarray, first_sentinel_id: int) -> np.ndarray:
    """Each run of masked tokens -> one sentinel (counting down from first_sentinel_id)."""
    prev = np.concatenate([[False], mask[:-1]])
    first = mask & ~prev
    out = np.where(first, first_sentinel_id + 1 - np.cumsum(first), tokens)
    return out[~(mask & prev)]


def _sentinel_targets(tokens: np.ndarray, mask: np.ndarray, first_sentinel_id: int) -> np.ndarray:
    """Each run of masked tokens, introduced by the sentinel that replaces it in the inputs. Equals
    T5's inverted-mask targets when the sequence starts with non-noise (random spans always do); with
    an i.i.d. mask starting with noise, T5's convention would pair sentinels and spans off by one."""
    prev = np.concatenate([[False], mask[:-1]])
    first = np.flatnonzero(mask & ~prev)
    where = np.cumsum(mask)[first] - 1  # run starts inside the compressed noise tokens
    return np.insert(tokens[mask], where, first_sentinel_id - np.arange(len(first)))


def span_corruption(tokens, rng: np.random.Generator, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, first_sentinel_id: int = 32099,
                    eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """T5's objective on one example: (inputs, targets), both ending in EOS."""
    tokens = np.asarray(tokens, dtype=np.int64)
    mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    inputs = _sentinel_spans(tokens, mask, first_sentinel_id)
    targets = _sentinel_spans(tokens, ~mask, first_sentinel_id)
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def _smallest_keys(keys: np.ndarray, count: int) -> np.ndarray:
    """Bool (B, m): True at the `count` smallest keys of each row, ties broken by position, i.e. the
    first `count` entries of a stable argsort. A partition is O(m) where the argsort was O(m log m)
    (the argsort of the ~480 non-noise gap keys was half the batch's time)."""
    b, m = keys.shape
    if count <= 0 or count >= m:
        return np.full((b, m), count > 0)
    thr = np.partition(keys, count - 1, axis=1)[:, count - 1:count]  # each row's count-th smallest
    sel = keys <= thr
    if np.count_nonzero(sel) == b * count:
        return sel  # no tie at the threshold (the usual case with float64 keys)
    less = keys < thr
    ties = keys == thr
    need = count - np.count_nonzero(less, axis=1, keepdims=True)
    return less | (ties & (np.cumsum(ties, axis=1) <= need))


def span_corruption_batch(tokens, rng: np.random.Generator, noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0, first_sentinel_id: int = 32099,
                          eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """`span_corruption` on every row of a (B, n) array, with no Python loop over rows or tokens.

    Rows of equal length have equal noise/span counts, so the outputs are dense (B, L_in), (B, L_tgt)
    arrays, equal row by row to B successive `span_corruption` calls on the same generator.

    No (B, n) mask is built: each kept / dropped token's segment number gives its place in the raw
    chunk and in the inputs / targets directly (one gather and one scatter per side). Inputs are
    keep_0, sentinel_0, keep_1, sentinel_1, ..., EOS; targets sentinel_0, noise_0, sentinel_1, ..., EOS.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    b, length = tokens.shape
    num_noise, num_spans = _span_corruption_counts(length, noise_density, mean_noise_span_length)
    num_keep = length - num_noise
    if length < 2 or b == 0 or num_spans > num_noise:  # degenerate sizes: the loop shares the edge cases
        pairs = [span_corruption(row, rng, noise_density, mean_noise_span_length, first_sentinel_id, eos_id)
                 for row in tokens]
        return (np.stack([p[0] for p in pairs]).reshape(b, -1), np.stack([p[1] for p in pairs]).reshape(b, -1))
    keys = rng.random((b, (num_noise - 1) + (num_keep - 1)))
    rows = np.arange(b)[:, None]

    def segments(k: np.ndarray, items: int) -> tuple[np.ndarray, np.ndarray]:
        # the segment boundaries are the num_spans-1 gaps with the lowest keys (as _segment_lengths):
        # start of each segment (B, num_spans) and segment number of each item (B, items)
        cut = _smallest_keys(k, num_spans - 1)
        starts = np.zeros((b, num_spans), np.int64)
        starts[:, 1:] = np.nonzero(cut)[1].reshape(b, num_spans - 1) + 1  # row-major: sorted per row
        seg = np.zeros((b, items), np.int64)
        np.cumsum(cut, axis=1, out=seg[:, 1:])
        return starts, seg

    noise_starts, noise_seg = segments(keys[:, :num_noise - 1], num_noise)
    keep_starts, keep_seg = segments(keys[:, num_noise - 1:], num_keep)
    keep_ends = np.empty_like(keep_starts)
    keep_ends[:, :-1] = keep_starts[:, 1:]
    keep_ends[:, -1] = num_keep
    spans = np.arange(num_spans)
    sentinels = first_sentinel_id - spans
    # kept token i of segment s sits after the noise of segments < s in the chunk, after s sentinels
    # in the inputs; noise token j of segment s sits after the kept tokens of segments <= s in the
    # chunk, after s + 1 sentinels in the targets
    inputs = np.empty((b, num_keep + num_spans + 1), np.int64)
    items = np.arange(num_keep)
    inputs[rows, items + keep_seg] = tokens[rows, items + noise_starts[rows, keep_seg]]
    inputs[rows, keep_ends + spans] = sentinels
    inputs[:, -1] = eos_id
    targets = np.empty((b, num_noise + num_spans + 1), np.int64)
    items = np.arange(num_noise)
    targets[rows, items + noise_seg + 1] = tokens[rows, items + keep_ends[rows, noise_seg]]
    targets[rows, noise_starts + spans] = sentinels
    targets[:, -1] = eos_id
    return inputs, targets


# --------------------------------------------------------------------------------------------------
# the paper's other objectives

def iid_noise_mask(length: int, rng: np.random.Generator, noise_density: float) -> np.ndarray:
    """Each token is noise with probability noise_density, and exactly round(n * density) are: a
    uniformly random subset, so example lengths are fixed and fit their row (the paper's i.i.d. rate)."""
    num_noise = min(int(round(length * noise_density)), length)
    mask = np.zeros(length, dtype=bool)
    mask[rng.permutation(length)[:num_noise]] = True
    return mask


def denoise(tokens, rng: np.random.Generator, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
            noise_mask: str = "random_spans", inputs_mode: str = "sentinel_spans",
            targets_mode: str = "sentinel_spans", random_token_prob: float = 0.1, mask_id: int = 32099,
            first_sentinel_id: int = 32099, vocab_size: int = 32000, eos_id: int = EOS_ID):
    """The paper's denoising family: how noise is chosen x what the inputs show x what is predicted."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if noise_mask == "random_spans":
        mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    elif noise_mask == "iid":
        mask = iid_noise_mask(len(tokens), rng, noise_density)
    else:
        raise ValueError(f"objective param noise_mask: {noise_mask!r} is not random_spans | iid")
    if inputs_mode == "sentinel_spans":
        inputs = _sentinel_spans(tokens, mask, first_sentinel_id)
    elif inputs_mode == "mask":
        inputs = np.where(mask, mask_id, tokens)
    elif inputs_mode == "random_or_mask":
        # BERT: each noise token becomes a random token with random_token_prob, else the mask id.
        use_random = rng.random(len(tokens)) < random_token_prob
        random_tokens = rng.integers(3, vocab_size, len(tokens))  # never pad/eos/unk
        inputs = np.where(mask, np.where(use_random, random_tokens, mask_id), tokens)
    elif inputs_mode == "drop":
        inputs = tokens[~mask]
    else:
        raise ValueError(f"objective param inputs_mode: {inputs_mode!r} is not sentinel_spans | mask | "
                         "random_or_mask | drop")
    if targets_mode == "sentinel_spans":
        targets = _sentinel_targets(tokens, mask, first_sentinel_id)
    elif targets_mode == "original":
        targets = tokens
    elif targets_mode == "noise_only":
        targets = tokens[mask]
    else:
        raise ValueError(f"objective param targets_mode: {targets_mode!r} is not sentinel_spans | original | noise_only")
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def prefix_lm(tokens, rng: np.random.Generator, eos_id: int = EOS_ID):
    """Split at a uniformly random point (at least one token each side): predict the rest."""
    tokens = np.asarray(tokens, dtype=np.int64)
    split = int(rng.integers(1, len(tokens))) if len(tokens) > 1 else len(tokens)
    return np.append(tokens[:split], eos_id), np.append(tokens[split:], eos_id)


def deshuffling(tokens, rng: np.random.Generator, eos_id: int = EOS_ID):
    """Inputs are the tokens in a random order; the target is the original text."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return np.append(rng.permutation(tokens), eos_id), np.append(tokens, eos_id)


# --------------------------------------------------------------------------------------------------
# the registry

@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    fn: Callable
    defaults: dict          # parameters fixed by the preset, overridable by the run config
    doc: str


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "span_corruption": ObjectiveSpec(span_corruption, {}, "T5's default: noise spans -> unique sentinels"),
    "iid_denoising": ObjectiveSpec(denoise, dict(noise_mask="iid"),
                                   "i.i.d. noise tokens, runs replaced by sentinels (paper Table 4 'replace spans')"),
    "bert": ObjectiveSpec(denoise, dict(noise_mask="iid", inputs_mode="random_or_mask", targets_mode="original"),
                          "BERT-style: 15% noise, 90% mask / 10% random token, target = original"),
    "mask_every_token": ObjectiveSpec(denoise, dict(noise_mask="iid", inputs_mode="mask", targets_mode="original"),
                                      "every noise token -> mask id, target = original (MASS-style)"),
    "drop_corrupted": ObjectiveSpec(denoise, dict(noise_mask="iid", inputs_mode="drop", targets_mode="noise_only"),
                                    "noise tokens dropped from the inputs, target = the dropped tokens"),
    "denoise": ObjectiveSpec(denoise, {}, "the general family: noise_mask x inputs_mode x targets_mode"),
    "prefix_lm": ObjectiveSpec(prefix_lm, {}, "random split: prefix -> continuation"),
    "deshuffling": ObjectiveSpec(deshuffling, {}, "shuffled tokens -> original"),
}


class Objective:
    """An objective bound to its parameters; callable on one example, `.batch` on a (B, n) array."""

    def __init__(self, name: str, **params):
        if name not in OBJECTIVES:
            raise ValueError(f"objective: unknown name {name!r}; one of: {', '.join(OBJECTIVES)}")
        spec = OBJECTIVES[name]
        known = [p for p in inspect.signature(spec.fn).parameters if p not in ("tokens", "rng")]
        for key in params:
            if key not in known:
                raise ValueError(f"objective {name!r}: unknown parameter {key!r} (known: {', '.join(known)})")
        self.name = name
        self.fn = spec.fn
        self.params = {**spec.defaults, **params}
        density = self.params.get("noise_density", 0.15)
        if "noise_density" in known and not 0.0 < density < 1.0:
            raise ValueError(f"objective {name!r}: noise_density must be in (0, 1), got {density}")
        if self.params.get("mean_noise_span_length", 3.0) < 1.0:
            raise ValueError(f"objective {name!r}: mean_noise_span_length must be >= 1")

    def __call__(self, tokens, rng: np.random.Generator):
        return self.fn(tokens, rng, **self.params)

    def batch(self, tokens: np.ndarray, rng: np.random.Generator):
        """Examples of every row; span corruption is vectorised, the others run row by row."""
        if self.fn is span_corruption:
            return span_corruption_batch(tokens, rng, **self.params)
        pairs = [self.fn(row, rng, **self.params) for row in np.asarray(tokens)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def raw_length(self, inputs_length: int, targets_length: int) -> int:
        """Raw tokens per example so that inputs and targets (with EOS) always fit their lengths."""
        if self.fn is span_corruption:
            density = self.params.get("noise_density", 0.15)
            mean = self.params.get("mean_noise_span_length", 3.0)
            raw, need = compute_span_corruption_lengths(inputs_length, density, mean)
            if need > targets_length:
                raise ValueError(f"targets_length {targets_length} is too short for span corruption at inputs "
                                 f"{inputs_length}, density {density}, mean span {mean}: needs {need}")
            return raw
        if self.fn is prefix_lm:
            return max(2, min(inputs_length, targets_length))  # any split fits both sides
        density = self.params.get("noise_density", 0.15)
        mode_in, mode_tgt = self.params.get("inputs_mode", "sentinel_spans"), self.params.get("targets_mode",
                                                                                             "sentinel_spans")
        for n in range(max(inputs_length, targets_length), 1, -1):  # worst-case lengths, largest n that fits
            noise = min(int(round(max(n, 2) * density)), n)
            max_in = n + 1 if mode_in != "drop" else n - noise + 1
            if mode_in == "sentinel_spans" and self.params.get("noise_mask", "iid") == "random_spans":
                max_in = n + 1
            max_tgt = {"original": n + 1, "noise_only": noise + 1}.get(mode_tgt, 2 * noise + 1)
            if self.fn is deshuffling:
                max_in, max_tgt = n + 1, n + 1
            if max_in <= inputs_length and max_tgt <= targets_length:
                return n
        raise ValueError(f"objective {self.name!r}: inputs_length {inputs_length} / targets_length "
                         f"{targets_length} leave no room for an example")


def get_objective(name: str, **params) -> Objective:
    return Objective(name, **params)
