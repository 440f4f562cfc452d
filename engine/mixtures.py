"""Multi-task mixtures (T5 paper, section 3.5.2): sample each training example from one of several
tasks with a fixed rate.

    rates = mixing_rates({"sst2": 67_349, "cola": 8_551, "c4_span_corruption": 10**9},
                         method="proportional", limit=2**19)          # examples-proportional, K = 2^19
    mixture = Mixture([text_task_source(get_task("sst2"), "glue_data", "train", tokenizer), ...],
                      method="temperature", limit=2**21, temperature=2.0, seed=0)
    for source_name, example in mixture: ...   # example: {"inputs": [ids..., 1], "targets": [ids..., 1]}

Methods: "proportional" (rate_m = min(e_m, K) / sum_n min(e_n, K); no K = plain proportional),
"temperature" (the proportional rates, each raised to 1/T and renormalised) and "equal". Every source
repeats when exhausted (the paper trains on mixtures for many epochs of the small tasks), and the
unsupervised span-corruption task (or any objective of engine/data/objectives.py) can be one of the
sources, on documents read like pretraining data (multi-task pretraining):

    c4 = span_corruption_source("c4_span_corruption", lambda: C4Reader(files, epochs=1), tokenizer,
                                size=10**9, input_length=512)
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from engine.data.packing import shift_right_ids

METHODS = ("proportional", "temperature", "equal")
TokenExample = dict  # {"inputs": list[int], "targets": list[int]}


def mixing_rates(sizes: Mapping[str, float], method: str = "proportional", limit: float | None = None,
                 temperature: float = 1.0) -> dict[str, float]:
    """Normalised sampling rate of each source from its number of examples."""
    if method not in METHODS:
        raise ValueError(f"mixture method {method!r}: expected one of {', '.join(METHODS)}")
    if not sizes:
        raise ValueError("mixture: no sources")
    for name, size in sizes.items():
        if size <= 0:
            raise ValueError(f"mixture source {name!r}: size must be positive, got {size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"mixture limit K must be positive, got {limit}")
    if temperature <= 0:
        raise ValueError(f"mixture temperature must be positive, got {temperature}")
    if method == "equal":
        return {name: 1.0 / len(sizes) for name in sizes}
    capped = {name: float(min(size, limit) if limit is not None else size) for name, size in sizes.items()}
    if method == "temperature":
        capped = {name: value ** (1.0 / temperature) for name, value in capped.items()}
    total = sum(capped.values())
    return {name: value / total for name, value in capped.items()}


@dataclasses.dataclass
class MixtureSource:
    """A named stream of token examples. `factory` returns a fresh iterable each time it is called, so
    the source can repeat; `size` is its number of examples (what the mixing rates are computed from)."""
    name: str
    factory: Callable[[], Iterable[TokenExample]]
    size: float
    rate: float | None = None  # an explicit rate overrides the method (normalised with the others)


class Mixture:
    """An endless, seeded stream of (source name, token example), resumable through `state_dict`."""

    def __init__(self, sources: Sequence[MixtureSource], method: str = "proportional",
                 limit: float | None = None, temperature: float = 1.0, seed: int = 0):
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture: duplicate source names in {names}")
        self.sources = list(sources)
        rates = mixing_rates({s.name: s.size for s in sources}, method, limit, temperature)
        explicit = {s.name: s.rate for s in sources if s.rate is not None}
        rates.update(explicit)
        total = sum(rates.values())
        self.rates = {name: rates[name] / total for name in names}
        self.seed = seed
        self._rng = random.Random(seed)
        self._consumed = dict.fromkeys(names, 0)  # examples drawn from each source so far
        # Examples drawn in each source's current pass: what a resume skips in a fresh pass. Counted,
        # not derived from `size`, which is only the mixing-rate count (and a guess for big corpora).
        self._position = dict.fromkeys(names, 0)
        self._iterators: dict[str, Iterator[TokenExample]] = {}

    def _next_from(self, source: MixtureSource) -> TokenExample:
        iterator = self._iterators.get(source.name)
        if iterator is None:  # first draw, or resuming: skip what the current pass already gave
            iterator = itertools.islice(iter(source.factory()), self._position[source.name], None)
            self._iterators[source.name] = iterator
        for _ in range(2):
            try:
                example = next(iterator)
                self._consumed[source.name] += 1
                self._position[source.name] += 1
                return example
            except StopIteration:
                iterator = self._iterators[source.name] = iter(source.factory())
                self._position[source.name] = 0
        raise ValueError(f"mixture source {source.name!r} yields no examples")

    def __iter__(self) -> Iterator[tuple[str, TokenExample]]:
        weights = [self.rates[s.name] for s in self.sources]
        while True:
            source = self._rng.choices(self.sources, weights)[0]
            yield source.name, self._next_from(source)

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "consumed": dict(self._consumed), "position": dict(self._position)}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate(_as_tuple(state["rng"]))
        self._consumed = {name: int(state["consumed"].get(name, 0)) for name in self._consumed}
        sizes = {s.name: max(int(s.size), 1) for s in self.sources}
        # States written before passes were counted: the position follows from the source's size.
        position = state.get("position") or {name: count % sizes[name] for name, count in self._consumed.items()}
        self._position = {name: int(position.get(name, 0)) for name in self._consumed}
        self._iterators = {}


def _as_tuple(value):
    # random's state round-trips through JSON as nested lists
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def text_task_source(task, path, split: str, tokenizer, max_input_length: int = 512,
                     max_target_length: int = 128, size: int | None = None, limit: int | None = None,
                     chunk: int = 256) -> MixtureSource:
    """A registered task's examples, tokenized with EOS and truncated (keeping the EOS) in batches."""

    def factory() -> Iterator[TokenExample]:
        examples = task.examples(path, split, limit)
        while True:
            block = list(itertools.islice(examples, chunk))
            if not block:
                return
            yield from tokenize_examples(block, tokenizer, max_input_length, max_target_length)

    if size is None:
        size = sum(1 for _ in itertools.islice(task.records(path, split), limit))
    return MixtureSource(task.name, factory, size)


def tokenize_examples(examples, tokenizer, max_input_length: int, max_target_length: int) -> list[TokenExample]:
    inputs = tokenizer.encode_batch([e.inputs for e in examples], add_eos=True)
    targets = tokenizer.encode_batch([e.targets for e in examples], add_eos=True)
    return [{"inputs": _truncate(i, max_input_length), "targets": _truncate(t, max_target_length)}
            for i, t in zip(inputs, targets)]


def _truncate(ids: list[int], length: int) -> list[int]:
    return ids if len(ids) <= length else ids[: length - 1] + [ids[-1]]


def objective_source(name: str, documents: Callable[[], Iterable[str]], tokenizer, size: float, *,
                     objective: str = "span_corruption", inputs_length: int = 512, targets_length: int | None = None,
                     seed: int = 0, tokenize_batch: int = 64, **params) -> MixtureSource:
    """An unsupervised objective (engine/data/objectives.py) as a mixture source, with the examples the
    pretraining pipeline makes (engine/data/pipeline.py): documents tokenized, each followed by EOS,
    concatenated, cut into raw chunks of `objective.raw_length(inputs_length, targets_length)` tokens,
    one (inputs, targets) example per chunk. Span corruption then fills `inputs_length` exactly.

    `documents()` returns a fresh iterable of texts per pass (e.g. `lambda: C4Reader(files, epochs=1)`).
    The generator is re-seeded each pass, so every pass is the same examples: a resumed mixture (which
    replays the pass up to where it was) regenerates exactly what it skipped. `size` is the number of
    examples the mixing rate counts (T5 caps the unsupervised task with the limit K).
    `params` are the objective's (noise_density, mean_noise_span_length, ...); sentinel, mask and EOS ids
    come from the tokenizer unless given.
    """
    import inspect

    import numpy as np

    from engine.data import objectives

    accepted = inspect.signature(objectives.get_objective(objective, **params).fn).parameters  # validates
    for key, value in (("first_sentinel_id", tokenizer.sentinel_id(0)), ("mask_id", tokenizer.sentinel_id(0)),
                       ("vocab_size", tokenizer.num_pieces), ("eos_id", tokenizer.eos_id)):
        if key in accepted:
            params.setdefault(key, value)
    obj = objectives.get_objective(objective, **params)
    if targets_length is None:  # span corruption: what its inputs length implies; others: as long as inputs
        targets_length = inputs_length
        if obj.fn is objectives.span_corruption:
            _, targets_length = objectives.compute_span_corruption_lengths(
                inputs_length, obj.params.get("noise_density", 0.15), obj.params.get("mean_noise_span_length", 3.0))
    raw_length = obj.raw_length(inputs_length, targets_length)

    def factory() -> Iterator[TokenExample]:
        rng = np.random.default_rng([seed, 0x3A7E])
        texts = iter(documents())
        buffer: list[int] = []
        while True:
            block = list(itertools.islice(texts, tokenize_batch))
            for ids in tokenizer.encode_batch(block, add_eos=True):
                buffer.extend(ids)
            whole = len(buffer) // raw_length
            for i in range(whole):
                inputs, targets = obj(np.asarray(buffer[i * raw_length:(i + 1) * raw_length]), rng)
                yield {"inputs": [int(t) for t in inputs], "targets": [int(t) for t in targets]}
            del buffer[:whole * raw_length]
            if len(block) < tokenize_batch:
                return  # the pass ends; a tail shorter than one chunk is dropped, as the pipeline does

    return MixtureSource(name, factory, size)


def span_corruption_source(name: str, documents: Callable[[], Iterable[str]], tokenizer, size: float,
                           input_length: int = 512, noise_density: float = 0.15,
                           mean_noise_span_length: float = 3.0, seed: int = 0) -> MixtureSource:
    """T5's unsupervised task as a mixture source (multi-task pretraining); see `objective_source`."""
    return objective_source(name, documents, tokenizer, size, objective="span_corruption",
                            inputs_length=input_length, seed=seed, noise_density=noise_density,
                            mean_noise_span_length=mean_noise_span_length)


def collate(examples: Sequence[TokenExample], pad_id: int = 0, decoder_start_id: int = 0,
            input_length: int | None = None, target_length: int | None = None) -> dict[str, torch.Tensor]:
    """Unpacked batch in the engine's layout: inputs/targets padded to the longest (or the given length);
    decoder inputs are the targets shifted right behind the start id; labels are -100 on padding."""
    n = len(examples)
    li = input_length or max(len(e["inputs"]) for e in examples)
    lt = target_length or max(len(e["targets"]) for e in examples)
    input_ids = torch.full((n, li), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, li), dtype=torch.long)
    labels = torch.full((n, lt), -100, dtype=torch.long)
    decoder_input_ids = torch.full((n, lt), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        inputs, targets = example["inputs"][:li], example["targets"][:lt]
        input_ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        attention_mask[row, : len(inputs)] = 1
        labels[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
        decoder_input_ids[row, 0] = decoder_start_id
        decoder_input_ids[row, : len(targets)] = torch.from_numpy(shift_right_ids(targets, decoder_start_id))
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": (labels != -100).long(),
            "labels": labels}
