"""Loader throughput: C4 JSON lines -> packed 512/114 span-corruption batches with the real T5 vocabulary.

    pytest benchmarks/test_data_loader_bench.py --benchmark-enable --benchmark-autosave -s

Reports rows per second per CPU core (SentencePiece pinned to one thread, the whole pipeline in one
process) and the loader's time over tokenization alone on the same documents in the same run.
Targets (issue 5): >= 3,000 rows/s per core, <= 1.5x tokenization alone. Each of 5 rounds is one
pass over the 2,000-document C4 validation sample (all 5: a few seconds), as CI runs it. With
`--benchmark-autosave` the figures (extra_info: rows_per_s_per_core, loader_over_tokenize) are saved
under benchmarks/results/pytest-benchmark/ (pytest.ini sets the storage).

Where the loader's time goes besides SentencePiece (2-core shared machine, one pass, ~0.25 s of
tokenization): gzip inflate ~0.018 s and JSON ~0.010 s (the reader, ~0.037 s in all), span
corruption ~0.02 s, list -> numpy ids ~0.013 s, packing and tensors ~0.004 s.
"""
import gzip
import json
import os
import time

import pytest

from engine.data.pipeline import build_pretrain_dataset
from engine.tokenizer import Tokenizer
from tests.conftest import shared_file


@pytest.fixture(scope="module")
def c4_path():
    return str(shared_file("c4/c4-validation-sample-2k.json.gz"))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(shared_file("t5/spiece.model"), num_threads=1)


def _tokenize_only(tok, path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    t0 = time.perf_counter()
    for i in range(0, len(docs), 128):
        tok.encode_batch(docs[i:i + 128], add_eos=True)
    return time.perf_counter() - t0


def _loader(tok, path):
    ds = build_pretrain_dataset([path], tok, "span_corruption", inputs_length=512, targets_length=114,
                                batch_size=32, pack=True, epochs=1, shuffle_buffer=256)
    rows = 0
    t0 = time.perf_counter()
    for batch in ds:
        rows += batch["input_ids"].shape[0]
    return rows, time.perf_counter() - t0


def test_loader_rows_per_second_per_core(benchmark, tok, c4_path):
    import torch  # noqa: F401  (imported up front so its import time is not counted)
    _loader(tok, c4_path)  # warm-up: page cache, allocator
    results = {"loader_s": float("inf"), "tokenize_s": float("inf")}

    def run():
        # both measured in every round; the fastest of each is kept: on shared cores, other jobs only
        # ever add time, so the minimum is the figure least disturbed by them
        tok_s = _tokenize_only(tok, c4_path)
        rows, load_s = _loader(tok, c4_path)
        results.update(rows=rows, loader_s=min(results["loader_s"], load_s),
                       tokenize_s=min(results["tokenize_s"], tok_s))
        return rows

    rows = benchmark.pedantic(run, rounds=5, iterations=1)
    rate = results["rows"] / results["loader_s"]
    ratio = results["loader_s"] / results["tokenize_s"]
    load = os.getloadavg()[0]  # other jobs on the cores: read the figures with it
    benchmark.extra_info.update(rows=rows, rows_per_s_per_core=round(rate), loader_over_tokenize=round(ratio, 3),
                                tokenize_s=round(results["tokenize_s"], 3), loader_s=round(results["loader_s"], 3),
                                load_avg_1min=round(load, 2), cpu_count=os.cpu_count())
    print(f"\nloader: {rows} rows of 512/114 in {results['loader_s']:.3f}s = {rate:.0f} rows/s/core; "
          f"tokenization alone {results['tokenize_s']:.3f}s; ratio {ratio:.2f}x (load average {load:.1f} "
          f"on {os.cpu_count()} cores)")
    assert rows > 1500
    # the pipeline must not be much slower than the tokenizer it wraps (loose bound: shared CI cores)
    assert ratio < 3.0
