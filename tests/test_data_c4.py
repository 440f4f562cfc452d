"""C4 reader: sharding covers every document once, exact resume, every bad-input case, clear errors."""
import gzip
import json

import pytest

from engine.data.c4 import C4Reader, expand_paths
from tests.conftest import shared_file


def _write_jsonl(path, docs, gz=True, members=1):
    lines = [json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n"
             for i, d in enumerate(docs)]
    if not gz:
        path.write_text("".join(lines), encoding="utf-8")
        return path
    per = -(-len(lines) // members)
    with open(path, "wb") as f:  # several gzip members, as concatenated shards are
        for m in range(members):
            f.write(gzip.compress("".join(lines[m * per:(m + 1) * per]).encode()))
    return path


@pytest.fixture
def corpus(tmp_path):
    files, docs = [], []
    for k, n in enumerate([37, 3, 51, 12, 40]):
        d = [f"doc {k}-{i} " + "word " * (i % 7) for i in range(n)]
        docs += d
        files.append(str(_write_jsonl(tmp_path / f"c4-{k}.json{'.gz' if k % 2 == 0 else ''}", d, gz=k % 2 == 0,
                                      members=3)))
    return files, docs


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8])
def test_shards_cover_every_document_once(corpus, num_shards):
    files, docs = corpus
    seen = []
    for s in range(num_shards):
        r = C4Reader(files, seed=3, shuffle_buffer=16, shard_index=s, num_shards=num_shards)
        got = list(r)
        seen += got
        assert r.stats.skipped == 0
    assert sorted(seen) == sorted(docs) and len(seen) == len(docs)


def test_rank_and_worker_split_by_lines(corpus):
    files, docs = corpus
    world, workers = 4, 3  # 12 shards > 5 files: the line split
    seen = []
    for rank in range(world):
        for w in range(workers):
            r = C4Reader(files, shard_index=rank * workers + w, num_shards=world * workers, shuffle_buffer=0)
            assert not r.by_files
            seen += list(r)
    assert sorted(seen) == sorted(docs)


def test_shuffle_is_deterministic_and_shuffles(corpus):
    files, docs = corpus
    a = list(C4Reader(files, seed=1, shuffle_buffer=32))
    assert a == list(C4Reader(files, seed=1, shuffle_buffer=32))
    assert a != list(C4Reader(files, seed=2, shuffle_buffer=32))
    assert sorted(a) == sorted(docs) and a != docs


@pytest.mark.parametrize("stop", [0, 1, 5, 39, 70, 142, 143, 200])
def test_resume_continues_at_the_next_document(corpus, stop):
    files, _ = corpus
    full = list(C4Reader(files, seed=4, shuffle_buffer=10, epochs=2))
    r = C4Reader(files, seed=4, shuffle_buffer=10, epochs=2)
    it = iter(r)
    head = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(r.state_dict()))  # must survive a JSON checkpoint
    r2 = C4Reader(files, seed=4, shuffle_buffer=10, epochs=2)
    r2.load_state_dict(state)
    assert head + list(r2) == full
    assert len(full) == 2 * 143


def test_resume_refuses_other_files(corpus):
    files, _ = corpus
    state = C4Reader(files).state_dict()
    with pytest.raises(ValueError, match="cannot resume"):
        C4Reader(files[:2]).load_state_dict(state)


def test_bad_input_skipped_counted_reported(tmp_path, caplog):
    good = [json.dumps({"text": f"good {i}"}) for i in range(6)]
    raw = b"\n".join([good[0].encode(), b'{"text": "broken',  # invalid JSON
                      good[1].encode(), b'{"url": "no text"}', b'{"text": 5}', b'[1, 2]',  # missing text
                      good[2].encode(), b'{"text": "caf\xe9"}',  # invalid UTF-8 (latin-1 byte)
                      b"", good[3].encode()]) + b"\n"
    plain = tmp_path / "mixed.json"
    plain.write_bytes(raw)
    # a gzip file: good member, corrupt member, good member, then a truncated member
    m1 = gzip.compress((good[4] + "\n").encode())
    bad = bytearray(gzip.compress(b'{"text": "lost"}\n' * 50))
    bad[12:30] = b"\xff" * 18
    m3 = gzip.compress((good[5] + "\n").encode())
    trunc = gzip.compress(b'{"text": "cut"}\n' * 20)[:-12]
    gz = tmp_path / "broken.json.gz"
    gz.write_bytes(m1 + bytes(bad) + m3 + trunc)

    r = C4Reader([str(plain), str(gz)], shuffle_files=False, shuffle_buffer=0, max_reported=3)
    with caplog.at_level("WARNING", logger="t5forge.data"):
        got = list(r)
    # the lines a truncated member still inflates are kept; only the cut-off line is lost
    assert got[:6] == [f"good {i}" for i in range(6)] and set(got[6:]) == {"cut"} and len(got) < 6 + 20
    b = r.stats.bad
    assert b["invalid_json"] == 1 and b["missing_text"] == 3 and b["invalid_utf8"] == 1
    assert b["corrupt_gzip"] == 2  # the corrupt member and the truncated one
    assert r.stats.reported[0] == f"{plain}:2: invalid json: Unterminated string starting at"
    assert f"{plain}:4: missing text" in r.stats.reported[1] and len(r.stats.reported) == 3
    assert sum("skipped bad input" in m for m in caplog.messages) == 3

    with pytest.raises(ValueError, match=r"mixed.json:2: invalid json"):
        list(C4Reader([str(plain)], strict=True, shuffle_buffer=0))
    with pytest.raises(ValueError, match=r"broken.json.gz:\d+: corrupt gzip"):
        list(C4Reader([str(gz)], strict=True, shuffle_buffer=0, shuffle_files=False))


def test_no_readable_document_is_one_clear_error(tmp_path):
    p = tmp_path / "all_bad.json"
    p.write_text('not json\n{"x": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no readable document in 1 data file.*2 bad lines skipped"):
        list(C4Reader([str(p)]))
    e = tmp_path / "empty.json.gz"
    e.write_bytes(gzip.compress(b""))
    with pytest.raises(ValueError, match="no readable document.*empty"):
        list(C4Reader([str(e)]))


def test_a_shard_without_lines_is_an_error(tmp_path):
    p = _write_jsonl(tmp_path / "one.json", ["only doc"], gz=False)
    assert list(C4Reader([str(p)], shard_index=0, num_shards=2)) == ["only doc"]
    with pytest.raises(ValueError, match="shard 1/2; the files are empty or this shard got no lines"):
        list(C4Reader([str(p)], shard_index=1, num_shards=2))


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json.gz"):
        C4Reader([str(tmp_path / "nope.json.gz")])
    with pytest.raises(FileNotFoundError, match=r"c4-\*.json.gz"):
        expand_paths([str(tmp_path / "c4-*.json.gz")])


def test_real_c4_validation_sample():
    path = str(shared_file("c4/c4-validation-sample-2k.json.gz"))
    r = C4Reader([path], shuffle_buffer=0)
    docs = list(r)
    assert len(docs) == 2000 and r.stats.skipped == 0
    assert docs[0].startswith("We offer valet parking")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert docs == [json.loads(line)["text"] for line in f]
    halves = [list(C4Reader([path], shard_index=s, num_shards=2, shuffle_buffer=64)) for s in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(docs)
