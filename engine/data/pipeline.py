"""The pretraining input pipeline the trainer calls: C4 JSON lines -> tokens -> objective -> batches.

    from engine.data.pipeline import build_pretrain_dataset
    data = build_pretrain_dataset(["c4/en/c4-train.*.json.gz"], tokenizer, "span_corruption", {},
                                  inputs_length=512, targets_length=114, batch_size=128, pack=True,
                                  seed=0, rank=rank, world_size=world_size)
    for batch in data:             # dict of torch.LongTensor, keys: engine.data.packing.PACKED_KEYS
        ...                        # (or UNPACKED_KEYS with pack=False)
        ckpt["data"] = data.state_dict()
    data.load_state_dict(ckpt["data"])   # the next batch is the one that would have come next

docs/T5.md: documents are tokenized, each followed by EOS, concatenated, and cut into raw chunks of
`objective.raw_length(inputs_length, targets_length)` tokens (568 for span corruption at 512/114);
each chunk becomes one (inputs, targets) example. Span corruption fills a 512/114 row exactly, so
it runs dense and vectorised (one numpy pass per batch); other objectives give examples of varying
length, packed several per row in order.

One process per data-parallel rank reads its own shard of the documents (engine.data.c4), or with
`num_workers` > 0 that many DataLoader workers per rank, each its own shard (engine.data.workers); the state
(reader position and shuffle buffer, tokens not yet used, examples waiting for a row, the objective's
random generator) is a JSON-able dict. Iteration is infinite by default (`epochs=None`).
"""
from __future__ import annotations

import base64
import dataclasses
import inspect
import itertools
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from engine.data.c4 import C4Reader
from engine.data.objectives import Objective, get_objective, span_corruption
from engine.data.packing import dense_packed_batch, next_fit_rows, packed_batch, unpacked_batch

if TYPE_CHECKING:  # torch is imported only when workers are used
    from engine.data.workers import MultiWorkerPretrainDataset


def _pack_ids(a: np.ndarray) -> str:
    return base64.b64encode(np.asarray(a, dtype="<i4").tobytes()).decode("ascii")


def _unpack_ids(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<i4").astype(np.int64)


class PretrainDataset:
    """Iterable of pretraining batches with exact resume; see the module docstring."""

    def __init__(self, reader: C4Reader, tokenizer, objective: Objective, inputs_length: int,
                 targets_length: int, batch_size: int, pack: bool = True, seed: int = 0,
                 tokenize_batch: int = 128, as_torch: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.reader, self.tokenizer, self.objective = reader, tokenizer, objective
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.batch_size, self.pack, self.tokenize_batch, self.as_torch = batch_size, pack, tokenize_batch, as_torch
        self.raw_length = objective.raw_length(inputs_length, targets_length)
        self.dense = objective.fn is span_corruption  # fixed-length examples: the vectorised path
        self.seed = seed
        self.rng = np.random.default_rng([seed, reader.shard_index, 0x0B1E])
        self._tokens = np.zeros(0, dtype=np.int64)   # tokenized, not yet cut into chunks
        self._examples: list[tuple[np.ndarray, np.ndarray]] = []  # waiting for a row
        self._docs: Iterator[str] | None = None
        self._exhausted = False

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "tokens": _pack_ids(self._tokens),
                "examples": [[_pack_ids(a), _pack_ids(b)] for a, b in self._examples],
                "rng": self.rng.bit_generator.state, "exhausted": self._exhausted}

    def bad_input_counts(self) -> dict[str, int]:
        """Bad input lines the reader skipped so far, by kind (what the data state records; cheap)."""
        return {kind: int(n) for kind, n in self.reader.stats.bad.items() if n}

    def load_state_dict(self, state: dict) -> None:
        if "workers" in state:
            raise ValueError(f"data state was saved with num_workers={state.get('num_workers')}; the batch order "
                             "depends on it, so resume with the same num_workers (not 0)")
        self.reader.load_state_dict(state["reader"])
        self._tokens = _unpack_ids(state["tokens"])
        self._examples = [(_unpack_ids(a), _unpack_ids(b)) for a, b in state["examples"]]
        self.rng.bit_generator.state = state["rng"]
        self._exhausted = state["exhausted"]
        self._docs = None  # a fresh document iterator picks up the reader's restored position

    def load_resharded_state(self, states: list, step: int) -> None:
        """Continue a stream that ranks of another world size read (their `state_dict()`s, one per old
        rank, single-process or worker states alike): this shard's reader starts where every old reader
        had got to (engine.data.c4.C4Reader.resharded_state), with no tokens or examples waiting and the
        objective's generator drawn afresh from (seed, shard, step)."""
        self.reader.load_state_dict(self.reader.resharded_state(reader_states(states), step))
        self._tokens = np.zeros(0, dtype=np.int64)
        self._examples = []
        self.rng = np.random.default_rng([self.seed, self.reader.shard_index, 0x0B1E, step])
        self._exhausted = False
        self._docs = None

    # ---- stages -------------------------------------------------------------------------------------
    def _fill_tokens(self, need: int) -> bool:
        """Tokenize documents (each + EOS) until `need` tokens wait; False when the data ran out."""
        if self._docs is None:
            self._docs = iter(self.reader)
        while len(self._tokens) < need and not self._exhausted:
            docs = []
            for doc in self._docs:
                docs.append(doc)
                if len(docs) == self.tokenize_batch:
                    break
            if len(docs) < self.tokenize_batch:
                self._exhausted = True
            if docs:
                ids = self.tokenizer.encode_batch(docs, add_eos=True)
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))
                self._tokens = np.concatenate([self._tokens, flat])
        return len(self._tokens) >= need

    def _take_chunks(self, n: int) -> np.ndarray:
        chunks = self._tokens[:n * self.raw_length].reshape(n, self.raw_length)
        self._tokens = self._tokens[n * self.raw_length:]
        return chunks

    def _to_output(self, batch: dict) -> dict:
        if not self.as_torch:
            return batch
        import torch
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def _dense_batch(self) -> dict | None:
        b, r = self.batch_size, self.raw_length
        if not self._fill_tokens(b * r):
            return None  # a short final batch would change the shapes; the tail is dropped
        inputs, targets = self.objective.batch(self._take_chunks(b), self.rng)
        if self.pack:
            return dense_packed_batch(inputs, targets, self.inputs_length, self.targets_length)
        return unpacked_batch(list(zip(inputs, targets)), self.inputs_length, self.targets_length)

    def _generic_batch(self) -> dict | None:
        b = self.batch_size
        while True:
            if self.pack:
                lengths = [(len(i), len(t)) for i, t in self._examples]
                rows = next_fit_rows(lengths, self.inputs_length, self.targets_length, max_rows=b)
                if len(rows) == b or (self._exhausted and not len(self._tokens) and self._examples):
                    rows = rows if len(rows) == b else next_fit_rows(lengths, self.inputs_length,
                                                                     self.targets_length)[:b]
                    used = sum(len(r) for r in rows)
                    batch = packed_batch(self._examples, rows, self.inputs_length, self.targets_length)
                    self._examples = self._examples[used:]
                    return batch
            elif len(self._examples) >= b or (self._exhausted and not len(self._tokens) and self._examples):
                batch = unpacked_batch(self._examples[:b], self.inputs_length, self.targets_length)
                self._examples = self._examples[b:]
                return batch
            # more examples: a few rows' worth of chunks at a time
            n = max(1, b // 4)
            if self._fill_tokens(n * self.raw_length):
                chunks = list(self._take_chunks(n))
            elif len(self._tokens) >= 2:
                chunks = [self._tokens]  # the last, shorter chunk of a finite run
                self._tokens = self._tokens[:0]
            else:
                if not self._examples:
                    return None
                self._tokens = self._tokens[:0]
                continue
            for c in chunks:
                self._examples.append(self.objective(c, self.rng))

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self._dense_batch() if self.dense else self._generic_batch()
            if batch is None:
                return
            yield self._to_output(batch)


def reader_states(states: list) -> list:
    """The reader states (None: a worker that has not reported one yet) in the data states of the ranks."""
    readers = []
    for state in states:
        if "workers" in state:
            readers += [None if w["state"] is None else w["state"]["reader"] for w in state["workers"]]
        else:
            readers.append(state["reader"])
    return readers


def build_pretrain_dataset(paths: Sequence[str] | str, tokenizer, objective: str = "span_corruption",
                           objective_params: dict | None = None, inputs_length: int = 512,
                           targets_length: int = 114, batch_size: int = 8, pack: bool = True, seed: int = 0,
                           rank: int = 0, world_size: int = 1, *, shuffle_buffer: int = 1024,
                           epochs: int | None = None, strict: bool = False, as_torch: bool = True,
                           num_workers: int = 0, prefetch_factor: int = 2,
                           pin_memory: bool = False) -> PretrainDataset | MultiWorkerPretrainDataset:
    """Batches for pretraining rank `rank` of `world_size` (see the module docstring).

    `objective` is a name from engine.data.objectives.OBJECTIVES; sentinel ids and the vocabulary size
    come from the tokenizer unless `objective_params` sets them. `num_workers` > 0 runs the pipeline in
    that many DataLoader worker processes per rank (engine.data.workers: a MultiWorkerPretrainDataset
    with the same iteration and state API; its batch order depends on num_workers).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    params = dict(objective_params or {})
    obj_probe = get_objective(objective, **params)  # validates name and parameters first
    accepted = inspect.signature(obj_probe.fn).parameters
    for key, value in (("first_sentinel_id", tokenizer.sentinel_id(0)), ("mask_id", tokenizer.sentinel_id(0)),
                       ("vocab_size", tokenizer.num_pieces), ("eos_id", tokenizer.eos_id)):
        if key in accepted:
            params.setdefault(key, value)
    obj = get_objective(objective, **params)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    build = _Builder(paths, tokenizer, obj, inputs_length, targets_length, batch_size, pack, seed, rank,
                     world_size, max(num_workers, 1), shuffle_buffer, epochs, strict, as_torch)
    if num_workers == 0:
        return build(0)
    from engine.data.workers import MultiWorkerPretrainDataset
    return MultiWorkerPretrainDataset(build, num_workers, prefetch_factor=prefetch_factor, pin_memory=pin_memory)


@dataclasses.dataclass
class _Builder:
    """The PretrainDataset of one loader worker of one rank: reader shard rank * workers + worker of
    world_size * workers (a plain dataclass, so it pickles into worker processes)."""
    paths: Sequence[str] | str
    tokenizer: object
    objective: Objective
    inputs_length: int
    targets_length: int
    batch_size: int
    pack: bool
    seed: int
    rank: int
    world_size: int
    workers: int
    shuffle_buffer: int
    epochs: int | None
    strict: bool
    as_torch: bool

    def __call__(self, worker: int) -> PretrainDataset:
        reader = C4Reader(self.paths, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                          shard_index=self.rank * self.workers + worker, num_shards=self.world_size * self.workers,
                          epochs=self.epochs, strict=self.strict)
        return PretrainDataset(reader, self.tokenizer, self.objective, self.inputs_length, self.targets_length,
                               self.batch_size, pack=self.pack, seed=self.seed, as_torch=self.as_torch)
