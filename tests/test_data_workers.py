"""Pretraining data from DataLoader workers: shards of ranks x workers, fixed order, exact resume."""
import json
import random
from collections import Counter

import pytest
import torch

from engine.data.c4 import C4Reader
from engine.data.packing import unpack_batch
from engine.data.pipeline import build_pretrain_dataset

from conftest import WORDS, merge_spans  # noqa: E402  (the `tok` fixture is conftest's too)


def _corpus(tmp_path, n_files, n_docs=240):
    rng = random.Random(1)
    docs = [f"doc {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 80))) + "."
            for i in range(n_docs)]
    paths = []
    for k in range(n_files):
        p = tmp_path / f"c4-{k}.json"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k::n_files]), encoding="utf-8")
        paths.append(str(p))
    return paths, docs


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_worker_gives_the_single_process_batches(tok, tmp_path):
    paths, _ = _corpus(tmp_path, 3)
    make = lambda nw: build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=48,  # noqa: E731
                                             targets_length=12, batch_size=3, seed=5, shuffle_buffer=20,
                                             epochs=1, num_workers=nw)
    single, workers = list(make(0)), list(make(1))
    assert len(single) == len(workers) > 20
    assert all(_equal(a, b) for a, b in zip(single, workers))


@pytest.mark.parametrize("n_files", [3, 9])  # fewer files than shards (split by lines) / more (by files)
def test_ranks_x_workers_read_every_document_once(tok, tmp_path, n_files):
    paths, docs = _corpus(tmp_path, n_files)
    world, workers, batch = 2, 2, 2
    shard_docs = []
    for rank in range(world):
        ds = build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=32, targets_length=8,
                                    batch_size=batch, shuffle_buffer=0, epochs=1, rank=rank, world_size=world,
                                    num_workers=workers)
        streams = {w: [] for w in range(workers)}
        for b in ds:
            for inp, tgt in unpack_batch({k: v.numpy() for k, v in b.items()}):
                streams[ds.last_worker] += merge_spans(inp.tolist(), tgt.tolist(), tok)
        for w in range(workers):
            # each worker's batches are exactly its reader shard's documents, tokenized, in order
            mine = list(C4Reader(paths, shuffle_buffer=0, shard_index=rank * workers + w, num_shards=world * workers))
            expect = [t for ids in tok.encode_batch(mine, add_eos=True) for t in ids]
            got = streams[w]
            assert got and got == expect[:len(got)] and len(expect) - len(got) < batch * ds.raw_length
            shard_docs += mine
    assert Counter(shard_docs) == Counter(docs)  # every document once, over ranks x workers


@pytest.mark.parametrize("stop", [7, -4])  # early; near the end, after the smaller shard ran out
def test_resume_with_two_workers_gives_the_same_next_batches(tok, tmp_path, stop):
    paths, _ = _corpus(tmp_path, 3)  # worker 0 reads two files, worker 1 one: they end at different times

    def make():
        ds = build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=48, targets_length=12,
                                    batch_size=3, seed=5, shuffle_buffer=20, epochs=2, num_workers=2)
        ds.state_every = 3  # full worker states on some batches, replayed batches on others
        return ds

    full = list(make())
    assert len(full) > 40
    ds = make()
    it = iter(ds)
    taken = [next(it) for _ in range(len(full) + stop if stop < 0 else stop)]
    assert all(_equal(a, b) for a, b in zip(taken, full))  # the order is fixed, run to run
    state = json.loads(json.dumps(ds.state_dict()))  # taken while the workers have prefetched further
    del it
    if stop < 0:
        assert [w["done"] for w in state["workers"]] == [False, True]
    assert any(w["skip"] for w in state["workers"]) or stop < 0
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - len(taken)
    assert all(_equal(a, b) for a, b in zip(rest, full[len(taken):]))


def test_state_of_another_worker_count_is_refused(tok, tmp_path):
    paths, _ = _corpus(tmp_path, 3)
    make = lambda nw: build_pretrain_dataset(paths, tok, "prefix_lm", inputs_length=32,  # noqa: E731
                                             targets_length=32, batch_size=2, num_workers=nw)
    single, two = make(0), make(2)
    with pytest.raises(ValueError, match="num_workers=0"):
        two.load_state_dict(single.state_dict())
    with pytest.raises(ValueError, match="num_workers=2"):
        single.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="num_workers=2"):
        make(3).load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        make(-1)


def test_bad_input_in_a_worker_is_one_clear_error(tok, tmp_path):
    paths, _ = _corpus(tmp_path, 2)
    with open(paths[1], "a", encoding="utf-8") as f:
        f.write("{not json\n")
    ds = build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=48, targets_length=12, batch_size=3,
                                epochs=1, strict=True, num_workers=2)
    with pytest.raises(ValueError, match=r"c4-1\.json:121: invalid json") as err:
        list(ds)
    assert "\n" not in str(err.value)


def test_worker_builder_pickles_for_spawned_workers(tok, tmp_path):
    # fork start methods copy the dataset; spawn / forkserver pickle it (the tokenizer included)
    import pickle

    paths, _ = _corpus(tmp_path, 2)
    ds = build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=48, targets_length=12, batch_size=3,
                                epochs=1, num_workers=2)
    build = pickle.loads(pickle.dumps(ds.build))
    a, b = next(iter(ds.build(1))), next(iter(build(1)))
    assert _equal(a, b)
