"""Pretraining pipeline: batches of the contract's keys, every token used once, exact resume, ranks."""
import json
import random

import numpy as np
import pytest
import torch

from engine.data.packing import PACKED_KEYS, UNPACKED_KEYS, unpack_batch
from engine.data.pipeline import build_pretrain_dataset

from conftest import WORDS, merge_spans  # noqa: E402  (the `tok` fixture is conftest's too)


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 120))) + "." for _ in range(300)]
    paths = []
    for k in range(3):
        p = tmp_path / f"c4-{k}.json"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k::3]), encoding="utf-8")
        paths.append(str(p))
    return paths, docs


def test_span_corruption_batches_use_every_token_once(tok, corpus):
    paths, docs = corpus
    ds = build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=64, targets_length=16, batch_size=4,
                                shuffle_buffer=0, epochs=1)
    assert ds.raw_length == 70 and ds.dense
    stream = []
    for batch in ds:
        assert tuple(batch) == PACKED_KEYS and all(v.dtype == torch.int64 for v in batch.values())
        assert batch["input_ids"].shape == (4, 64) and batch["labels"].shape == (4, 16)
        for inp, tgt in unpack_batch({k: v.numpy() for k, v in batch.items()}):
            stream += merge_spans(inp.tolist(), tgt.tolist(), tok)
    files_order = ds.reader.epoch_files(0)
    ordered = [d for p in files_order for d in (json.loads(line)["text"] for line in open(p))]
    expect = [t for ids in tok.encode_batch(ordered, add_eos=True) for t in ids]
    assert len(stream) % 70 == 0 and len(expect) - len(stream) < 4 * 70  # only the tail of the last batch is cut
    assert stream == expect[:len(stream)]


@pytest.mark.parametrize("objective,pack", [("span_corruption", True), ("span_corruption", False),
                                            ("prefix_lm", True), ("iid_denoising", True), ("bert", False)])
def test_resume_gives_the_same_next_batches(tok, corpus, objective, pack):
    paths, _ = corpus
    make = lambda: build_pretrain_dataset(paths, tok, objective, inputs_length=48, targets_length=48  # noqa: E731
                                          if objective != "span_corruption" else 12, batch_size=3, pack=pack,
                                          seed=5, shuffle_buffer=20, epochs=2)
    full = list(make())
    assert len(full) > 10
    ds = make()
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 7
    for a, b in zip(rest, full[7:]):
        assert tuple(a) == (PACKED_KEYS if pack else UNPACKED_KEYS)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_ranks_read_disjoint_documents(tok, corpus):
    paths, _ = corpus
    seen = []
    for rank in range(2):
        ds = build_pretrain_dataset(paths, tok, "prefix_lm", inputs_length=256, targets_length=256, batch_size=2,
                                    rank=rank, world_size=2, epochs=1, as_torch=False)
        rows = [np.concatenate([i[:-1], t[:-1]]).tolist() for b in ds for i, t in unpack_batch(b)]
        seen.append(rows)
        assert ds.reader.stats.documents in (150, 151, 99, 100, 101, 201, 200)
    assert not set(map(tuple, seen[0])) & set(map(tuple, seen[1]))


def test_bad_objective_config_is_rejected(tok, corpus):
    paths, _ = corpus
    with pytest.raises(ValueError, match="unknown parameter 'rate'"):
        build_pretrain_dataset(paths, tok, "span_corruption", {"rate": 0.2})
    with pytest.raises(ValueError, match="too short"):
        build_pretrain_dataset(paths, tok, "span_corruption", inputs_length=512, targets_length=64)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_pretrain_dataset([paths[0], "missing.json"], tok)
