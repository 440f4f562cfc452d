"""Loader throughput: C4 JSON lines -> packed 512/114 span-corruption batches with the real T5 vocabulary.

    pytest benchmarks/test_data_loader_bench.py --benchmark-enable --benchmark-autosave -s

Reports rows per second per CPU core (SentencePiece pinned to one thread, the whole pipeline in one
process, timed in process CPU seconds) and the loader's time over tokenization alone on the same
documents in the same run; the wall-clock figures are saved beside them.
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


def _clocks():
    # CPU time of this process next to wall time: the pipeline is one thread (SentencePiece pinned to
    # one), so its CPU seconds are its cost on one core, and other jobs on shared cores change them far
    # less than the wall clock (which they stretch by whole time slices)
    return time.process_time(), time.perf_counter()


def _since(t0):
    cpu, wall = _clocks()
    return cpu - t0[0], wall - t0[1]


def _tokenize_only(tok, path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    t0 = _clocks()
    for i in range(0, len(docs), 128):
        tok.encode_batch(docs[i:i + 128], add_eos=True)
    return _since(t0)


def _loader(tok, path):
    ds = build_pretrain_dataset([path], tok, "span_corruption", inputs_length=512, targets_length=114,
                                batch_size=32, pack=True, epochs=1, shuffle_buffer=256)
    rows = 0
    t0 = _clocks()
    for batch in ds:
        rows += batch["input_ids"].shape[0]
    return rows, _since(t0)


def test_loader_rows_per_second_per_core(benchmark, tok, c4_path):
    import torch  # noqa: F401  (imported up front so its import time is not counted)
    _loader(tok, c4_path)  # warm-up: page cache, allocator
    best = {k: float("inf") for k in ("loader_cpu", "loader_wall", "tokenize_cpu", "tokenize_wall")}

    def run():
        # both measured in every round; the fastest of each is kept: other jobs only ever add time
        tok_cpu, tok_wall = _tokenize_only(tok, c4_path)
        rows, (load_cpu, load_wall) = _loader(tok, c4_path)
        for k, v in (("loader_cpu", load_cpu), ("loader_wall", load_wall), ("tokenize_cpu", tok_cpu),
                     ("tokenize_wall", tok_wall)):
            best[k] = min(best[k], v)
        return rows

    rows = benchmark.pedantic(run, rounds=5, iterations=1)
    rate = rows / best["loader_cpu"]
    ratio = best["loader_cpu"] / best["tokenize_cpu"]
    load = os.getloadavg()[0]  # other jobs on the cores: read the wall figures with it
    benchmark.extra_info.update(
        rows=rows, rows_per_s_per_core=round(rate), loader_over_tokenize=round(ratio, 3),
        rows_per_s_wall=round(rows / best["loader_wall"]),
        loader_over_tokenize_wall=round(best["loader_wall"] / best["tokenize_wall"], 3),
        **{f"{k}_s": round(v, 3) for k, v in best.items()}, load_avg_1min=round(load, 2), cpu_count=os.cpu_count())
    print(f"\nloader: {rows} rows of 512/114 in {best['loader_cpu']:.3f} CPU s = {rate:.0f} rows/s/core; "
          f"tokenization alone {best['tokenize_cpu']:.3f} CPU s; ratio {ratio:.2f}x "
          f"(wall: {best['loader_wall']:.3f}s / {best['tokenize_wall']:.3f}s = "
          f"{best['loader_wall'] / best['tokenize_wall']:.2f}x; load average {load:.1f} on {os.cpu_count()} cores)")
    assert rows > 1500
    # the pipeline must not be much slower than the tokenizer it wraps (loose bound: shared CI cores)
    assert ratio < 3.0
