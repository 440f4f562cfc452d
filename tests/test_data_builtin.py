"""Built-in corpus: made from stdlib docstrings, C4 layout, cached, deterministic, with its tokenizer."""
import gzip
import json
import os

from engine.data.builtin import builtin_tokenizer, cache_dir, ensure_builtin
from engine.data.c4 import C4Reader


def test_builtin_corpus_and_tokenizer(tmp_path, monkeypatch):
    small = dict(max_bytes=200_000, vocab_size=400)
    paths, model = ensure_builtin(str(tmp_path / "a"), **small)
    with gzip.open(paths[0], "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) > 20 and all(r["url"].startswith("python://") and r["text"] for r in rows)
    assert sum(len(r["text"]) for r in rows) >= 200_000
    assert len(list(C4Reader(paths))) == len(rows)  # readable by the C4 reader as is

    tok = builtin_tokenizer(str(tmp_path / "a"), **small)
    assert tok.vocab_size == tok.num_pieces + 100 and tok.num_pieces <= 400
    text = "Return a new list containing all items from the iterable."
    assert tok.decode(tok.encode(text)) == text

    # cached: a second call does not rebuild; a rebuild elsewhere gives the same bytes
    mtime = os.path.getmtime(model)
    assert ensure_builtin(str(tmp_path / "a"), **small) == (paths, model) and os.path.getmtime(model) == mtime
    paths_b, model_b = ensure_builtin(str(tmp_path / "b"), **small)
    assert open(paths[0], "rb").read() == open(paths_b[0], "rb").read()
    tok_b = builtin_tokenizer(str(tmp_path / "b"), **small)  # the model file embeds its path: compare pieces
    pieces = lambda t: [(t.sp.id_to_piece(i), t.sp.get_score(i)) for i in range(t.num_pieces)]  # noqa: E731
    assert pieces(tok) == pieces(tok_b)

    # other parameters invalidate the cache
    ensure_builtin(str(tmp_path / "a"), max_bytes=100_000, vocab_size=300)
    assert json.load(open(tmp_path / "a" / "meta.json"))["vocab_size"] == 300


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("T5FORGE_CACHE", str(tmp_path))
    assert cache_dir() == os.path.join(str(tmp_path), "builtin")
    monkeypatch.delenv("T5FORGE_CACHE")
    assert cache_dir().endswith(os.path.join(".cache", "t5forge", "builtin"))
