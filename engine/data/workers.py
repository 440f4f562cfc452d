"""Pretraining batches from torch DataLoader worker processes, in a fixed order, with exact resume.

    data = build_pretrain_dataset(paths, tokenizer, ..., rank=rank, world_size=world_size, num_workers=4)
    for batch in data: ...                  # same dicts as the single-process PretrainDataset
    state = data.state_dict()               # JSON-able; a new dataset + load_state_dict(state) gives
                                            # exactly the batches an uninterrupted run gives next

Each of the `num_workers` logical workers of rank r is a whole PretrainDataset on its own shard of
the documents (reader shard r * num_workers + w of world_size * num_workers), so it tokenizes, cuts
and packs on its own, with its own random generator. The consumer takes batches in a fixed round
robin over the logical workers (0, 1, ..., W-1, 0, ...; a worker whose data ran out is passed over),
whatever order the processes deliver them in: the batch sequence depends only on the data, the seed
and num_workers (it differs from num_workers=0, whose single shard reads the documents in another
order; num_workers=1 gives the same batches as num_workers=0).

State. The DataLoader prefetches, so a worker is ahead of what was consumed, and a worker cannot be
asked for an old state. Sending the full state with every batch would pickle the shuffle buffer
(megabytes of text) per batch, so a worker attaches its full state to every `state_every`-th batch
only; the consumer keeps, per worker, the last attached state it consumed and how many batches it
consumed since (`skip`). Resuming, each worker loads its state and regenerates and drops `skip`
(< state_every) batches, which is exact because a worker's batches depend only on its state. The
round-robin position is the logical worker that gives the next batch; the DataLoader's worker i runs
logical worker (position + i) mod W, so its in-order delivery starts at that worker.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger("t5forge.data")

STATE_EVERY = 16  # ~1/16 of a state's pickling per batch; at most 15 batches replayed per worker on resume
_INPUT_ERRORS = (ValueError, FileNotFoundError)


@dataclasses.dataclass
class _WorkerStart:
    state: dict | None  # the logical worker's last full state the consumer took, None = from the start
    skip: int           # batches consumed after that state: regenerated and dropped on resume
    done: bool          # its data ran out (finite epochs)


def _keep(item):
    """collate_fn: items are (worker, batch, state) already; the default would turn numpy scalars in
    the state into tensors."""
    return item


class _WorkerStream(IterableDataset):
    """What runs inside each DataLoader worker process: one logical worker's batches."""

    def __init__(self, build, num_workers: int, starts: list[_WorkerStart], offset: int, state_every: int):
        self.build, self.num_workers, self.starts = build, num_workers, starts
        self.offset, self.state_every = offset, state_every

    def __iter__(self):
        info = get_worker_info()
        if info is None or info.num_workers != self.num_workers:
            raise RuntimeError("_WorkerStream runs only inside a DataLoader with num_workers workers")
        w = (info.id + self.offset) % self.num_workers
        start = self.starts[w]
        if start.done:
            return
        try:
            ds = self.build(w)
            # one SentencePiece thread per worker: the workers are the parallelism
            ds.tokenizer.num_threads = 1
            if start.state is not None:
                ds.load_state_dict(start.state)
            count = start.skip
            it = iter(ds)
            for _ in range(start.skip):
                next(it)  # the batches consumed after the saved state (StopIteration cannot happen:
                #           they were produced before)
            for batch in it:
                count += 1
                state = ds.state_dict() if count % self.state_every == 0 else None
                yield w, batch, state
            yield w, None, ds.state_dict()  # end of this worker's data: its final state
        except _INPUT_ERRORS as exc:
            # bad input is one clear line in the consumer, not a DataLoader worker traceback
            yield w, "error", f"{type(exc).__name__}: {exc}"


class MultiWorkerPretrainDataset:
    """PretrainDataset's batches and state API, produced by DataLoader workers; see the module docstring."""

    def __init__(self, build, num_workers: int, *, prefetch_factor: int = 2, pin_memory: bool = False,
                 state_every: int = STATE_EVERY):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 for the worker path, got {num_workers}")
        if state_every < 1:
            raise ValueError(f"state_every must be >= 1, got {state_every}")
        self.build, self.num_workers = build, num_workers
        self.prefetch_factor, self.pin_memory, self.state_every = prefetch_factor, pin_memory, state_every
        probe = build(0)  # bad paths / objective parameters fail here, in the caller's process
        self.raw_length, self.dense, self.batch_size = probe.raw_length, probe.dense, probe.batch_size
        self._starts = [_WorkerStart(None, 0, False) for _ in range(num_workers)]
        self._next = 0
        self.last_worker: int | None = None  # logical worker of the batch yielded last

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "next_worker": self._next,
                "workers": [dataclasses.asdict(s) for s in self._starts]}

    def bad_input_counts(self) -> dict[str, int]:
        """Bad input lines skipped by kind, summed over the workers as of the states consumed so far (the
        counts a resume restores; they trail the workers by up to `state_every` batches each)."""
        totals: collections.Counter = collections.Counter()
        for start in self._starts:
            if start.state is not None:
                totals.update({k: int(n) for k, n in start.state["reader"]["stats"]["bad"].items() if n})
        return dict(totals)

    def load_state_dict(self, state: dict) -> None:
        if "workers" not in state:
            raise ValueError("data state was saved by the single-process loader (num_workers=0); "
                             f"build the dataset with num_workers=0 to resume it, not {self.num_workers}")
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"data state was saved with num_workers={state['num_workers']}; the batch order depends "
                             f"on it, so resume with the same num_workers (not {self.num_workers})")
        self._starts = [_WorkerStart(**s) for s in state["workers"]]
        self._next = int(state["next_worker"])

    def load_resharded_state(self, states: list, step: int) -> None:
        """A stream other ranks read (engine.data.pipeline.PretrainDataset.load_resharded_state), re-split:
        each logical worker starts from its own shard of the new split, round robin from worker 0."""
        for w in range(self.num_workers):
            ds = self.build(w)
            ds.load_resharded_state(states, step)
            self._starts[w] = _WorkerStart(ds.state_dict(), 0, False)
        self._next = 0

    # ---- iteration ----------------------------------------------------------------------------------
    def _advance(self) -> None:
        self._next = (self._next + 1) % self.num_workers

    def __iter__(self) -> Iterator[dict]:
        if all(s.done for s in self._starts):
            return
        stream = _WorkerStream(self.build, self.num_workers, list(self._starts), self._next, self.state_every)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_keep,
                            prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory)
        # The DataLoader delivers in its own worker order; batches of other workers wait here until
        # their turn (in practice at most one per worker, as the DataLoader also goes round robin).
        waiting: dict[int, collections.deque] = {w: collections.deque() for w in range(self.num_workers)}
        received = iter(loader)
        try:
            while not all(s.done for s in self._starts):
                w = self._next
                start = self._starts[w]
                if start.done:
                    self._advance()
                    continue
                while not waiting[w]:
                    try:
                        lw, batch, state = next(received)
                    except StopIteration:
                        raise RuntimeError(f"data loader worker {w} stopped without its end marker") from None
                    if isinstance(batch, str):
                        raise ValueError(state)
                    waiting[lw].append((batch, state))
                batch, state = waiting[w].popleft()
                if batch is None:  # the worker's data ran out
                    self._starts[w] = _WorkerStart(state, 0, True)
                    self._advance()
                    continue
                # record before yielding: state_dict() right after this batch must include it
                self._starts[w] = _WorkerStart(state, 0, False) if state is not None else \
                    _WorkerStart(start.state, start.skip + 1, False)
                self._advance()
                self.last_worker = w
                yield batch
        finally:
            del received  # shuts the worker processes down when the consumer stops early
