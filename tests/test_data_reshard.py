"""A data stream re-split over another number of shards (a run continued on another world size,
engine/trainer.py `_reshard_rank_state`): the new readers start where every old reader had got to.

With no shuffle buffer a reader hands on every document it reads, so the documents the old readers gave plus
those the new ones give must be the whole corpus, and the new ones exactly the documents after the common
start (`common_start`: a whole file when files are split over shards, the exact line when lines are).
"""
import json

import pytest

from engine.data.c4 import C4Reader, common_start
from engine.data.pipeline import build_pretrain_dataset

from conftest import WORDS  # noqa: E402  (the `tok` fixture is conftest's too)


def _corpus(tmp_path, sizes):
    files, docs = [], []
    for k, n in enumerate(sizes):
        d = [f"doc {k}-{i}" for i in range(n)]
        path = tmp_path / f"c4-{k}.json"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in d), encoding="utf-8")
        files.append(str(path))
        docs.append(d)
    return files, docs


def _take(reader, n):
    it, out = iter(reader), []
    for _ in range(n):
        out.append(next(it))
    return out


def _after(order, files, docs_by_file, start):
    """Documents of one epoch from `start` = (epoch, first file, line, ...) on, in file order."""
    _, first, line, _, _ = start
    rest = []
    for j, path in enumerate(order[first:]):
        rest += docs_by_file[files.index(path)][line if j == 0 else 0:]
    return rest


@pytest.mark.parametrize("sizes, old, new", [
    ([40], 2, 1), ([40], 1, 3), ([40], 3, 2),                       # lines split over shards, both sides
    ([29, 34, 31, 26, 40], 2, 3), ([29, 34, 31, 26, 40], 3, 1),          # files split, then lines or files
    ([29, 34, 31, 26, 40], 8, 2),                                      # lines split, then files
])
def test_new_shards_start_where_every_old_one_had_got_to(tmp_path, sizes, old, new):
    files, docs = _corpus(tmp_path, sizes)
    kw = dict(seed=4, shuffle_buffer=0, epochs=1)
    readers = [C4Reader(files, shard_index=s, num_shards=old, **kw) for s in range(old)]
    given = [d for s, r in enumerate(readers) for d in _take(r, 3 + 2 * s)]  # unequal progress
    states = [r.state_dict() for r in readers]
    start = common_start(states, len(files))
    fresh = [C4Reader(files, shard_index=s, num_shards=new, **kw) for s in range(new)]
    for r in fresh:
        r.load_state_dict(r.resharded_state(states, step=7))
    after = [d for r in fresh for d in r]
    assert len(after) == len(set(after))  # the new split reads each document once
    expected = _after(C4Reader(files, **kw).epoch_files(0), files, docs, start)
    assert sorted(after) == sorted(expected)
    assert set(given) | set(after) == {d for file_docs in docs for d in file_docs}  # nothing skipped
    if len(files) < old:  # lines: only what the ranks ahead had read past the furthest-behind one is read again
        assert len(set(given) & set(after)) <= old * (3 + 2 * old)


def test_a_reader_that_had_not_started_restarts_the_stream(tmp_path):
    files, docs = _corpus(tmp_path, [30])
    fresh = C4Reader(files, seed=4, shuffle_buffer=0, epochs=1)
    fresh.load_state_dict(fresh.resharded_state([None], step=3))
    assert list(fresh) == docs[0]


def test_datasets_and_workers_continue_on_another_world_size(tok, tmp_path):
    """PretrainDataset and the DataLoader-worker dataset take the old ranks' states (either kind) and give
    batches from the new split."""
    import random

    rng = random.Random(0)
    paths = []
    for k in range(3):
        p = tmp_path / f"w-{k}.json"
        p.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n"
                             for _ in range(60)), encoding="utf-8")
        paths.append(str(p))

    def make(rank, world, workers=0):
        return build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=32, targets_length=8,
                                      batch_size=2, seed=5, shuffle_buffer=8, rank=rank, world_size=world,
                                      num_workers=workers)
    old = [make(r, 2) for r in range(2)]
    for ds in old:
        it = iter(ds)
        for _ in range(3):
            next(it)
    states = [ds.state_dict() for ds in old]
    single = make(0, 1)
    single.load_resharded_state(states, step=3)
    from engine.data.pipeline import reader_states

    assert single.reader.state_dict()["first_file"] == common_start(reader_states(states), 3)[1]
    batch = next(iter(single))
    assert batch["input_ids"].shape == (2, 32)
    workers = make(1, 3, workers=2)
    workers.load_resharded_state(states, step=3)
    assert all(s.state["reader"]["shard"] == [2 + w, 6] for w, s in enumerate(workers._starts))
    assert next(iter(workers))["input_ids"].shape == (2, 32)
