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
unsupervised span-corruption task can be one of the sources (multi-task pretraining).
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

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
        self._iterators: dict[str, Iterator[TokenExample]] = {}

    def _next_from(self, source: MixtureSource) -> TokenExample:
        iterator = self._iterators.get(source.name)
        if iterator is None:
            # Resuming: skip what was already drawn in the current pass over this source.
            iterator = iter(source.factory())
            already = self._consumed[source.name] % max(int(source.size), 1)
            iterator = itertools.islice(iterator, already, None)
            self._iterators[source.name] = iterator
        for _ in range(2):
            try:
                example = next(iterator)
                self._consumed[source.name] += 1
                return example
            except StopIteration:
                iterator = self._iterators[source.name] = iter(source.factory())
        raise ValueError(f"mixture source {source.name!r} yields no examples")

    def __iter__(self) -> Iterator[tuple[str, TokenExample]]:
        weights = [self.rates[s.name] for s in self.sources]
        while True:
            source = self._rng.choices(self.sources, weights)[0]
            yield source.name, self._next_from(source)

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "consumed": dict(self._consumed)}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate(_as_tuple(state["rng"]))
        self._consumed = {name: int(state["consumed"].get(name, 0)) for name in self._consumed}
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


def span_corruption_source(name: str, documents: Callable[[], Iterable[str]], tokenizer, size: float,
                           input_length: int = 512, noise_density: float = 0.15,
                           mean_noise_span_length: float = 3.0, seed: int = 0) -> MixtureSource:
    """The unsupervised objective as a mixture source: documents tokenized, joined with EOS, cut into
    raw chunks whose corrupted inputs are exactly `input_length` long (engine/data/objectives.py)."""
    import numpy as np

    from engine.data import objectives

    raw_length, _ = objectives.compute_span_corruption_lengths(input_length, noise_density, mean_noise_span_length)
    sentinel = tokenizer.sentinel_id(0)

    def factory() -> Iterator[TokenExample]:
        rng = np.random.default_rng(seed)
        buffer: list[int] = []
        for text in documents():
            buffer.extend(tokenizer.encode(text, add_eos=True))
            while len(buffer) >= raw_length:
                chunk, buffer[:] = buffer[:raw_length], buffer[raw_length:]
                inputs, targets = objectives.span_corruption(
                    np.asarray(chunk), rng, noise_density=noise_density,
                    mean_noise_span_length=mean_noise_span_length, first_sentinel_id=sentinel,
                    eos_id=tokenizer.eos_id)
                yield {"inputs": [int(t) for t in inputs], "targets": [int(t) for t in targets]}

    return MixtureSource(name, factory, size)


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
        decoder_input_ids[row, 1: len(targets)] = torch.tensor(targets[:-1], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": (labels != -100).long(),
            "labels": labels}
