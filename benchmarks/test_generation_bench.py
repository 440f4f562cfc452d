"""Decoding throughput on CPU (pytest-benchmark): greedy and beam-4, batch 1 and 16, 64 new tokens, our
static KV cache against our torch.cat cache and against transformers' `generate` on the same weights, one
thread each, plus the memory each cache holds at the end.

    pytest benchmarks/test_generation_bench.py -s --benchmark-columns=min,mean    # prints tokens/s
    T5FORGE_BENCH_RECORD=1 pytest benchmarks/test_generation_bench.py -s           # also writes results/

Every side decodes exactly `NEW_TOKENS` tokens per row (`min_new_tokens` bans EOS on both), so all do the same model
work and tokens/s (rows * beams * NEW_TOKENS / best time) compares the caches and decoding loops.
"""
import datetime
import json
import os
import pathlib
import platform
import time

import pytest
import torch

from models.hf_checkpoint import load_hf_state_dict
from models.config import T5Config
from models.generation import Seq2SeqStepper, search
from models.generation_config import resolve
from models.kv_cache import StaticCache, dynamic_nbytes
from models.t5 import T5ForConditionalGeneration

transformers = pytest.importorskip("transformers")

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
INPUT_LEN, NEW_TOKENS = 32, 64
SIZE = dict(vocab_size=2048, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False)
IMPLS = ("static", "dynamic", "transformers")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        **SIZE, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(SIZE["d_model"] ** -0.5)  # HF's std-1 head gives huge logits
    ours = T5ForConditionalGeneration(T5Config(**SIZE, dropout_rate=0.0, kernel_backend="torch")).eval()
    load_hf_state_dict(ours, hf.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core each: steadier on a shared machine, same for every side
    yield hf, ours
    torch.set_num_threads(threads)


def _inputs(batch):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, SIZE["vocab_size"], (batch, INPUT_LEN), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, 20:] = 0
    return ids, mask


def _ours(model, ids, mask, beams, cache):
    """Our search, returning the stepper too so that the cache it ended with can be measured."""
    cfg = resolve(model, dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams,
                              cache_implementation=cache, early_stopping="never" if beams > 1 else False))
    with torch.no_grad():
        stepper = Seq2SeqStepper(model, ids, mask, beams, cache, NEW_TOKENS)
        out = search(stepper, cfg, ids.shape[0], ids.device)
    assert out.lengths.tolist() == [NEW_TOKENS] * ids.shape[0]
    return out, stepper


def _runner(models, impl, beams, batch):
    hf, ours = models
    ids, mask = _inputs(batch)
    if impl != "transformers":
        return lambda: _ours(ours, ids, mask, beams, impl)

    def run():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, num_beams=beams, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, length_penalty=0.6,
                              early_stopping="never" if beams > 1 else False)
        assert out.shape[1] == NEW_TOKENS + 1
        return out
    return run


def _cache_bytes(stepper) -> int:
    cache = stepper.cache
    return cache.nbytes() if isinstance(cache, StaticCache) else dynamic_nbytes(cache)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_generation_tokens_per_second(benchmark, models, impl, beams, batch):
    run = _runner(models, impl, beams, batch)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    tokens = batch * beams * NEW_TOKENS  # tokens through the decoder per call
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.min
    if impl != "transformers":
        benchmark.extra_info["cache_bytes"] = _cache_bytes(run()[1])


def _interleaved_best(fns, repeats):
    """Best time of each function, runs alternating so load from other processes hits all alike."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def test_generation_compared_interleaved(models):
    """The comparison the results file records: per case the three sides timed alternately (best of 5)."""
    runs = {}
    for beams in (1, 4):
        for batch in (1, 16):
            fns = [_runner(models, impl, beams, batch) for impl in IMPLS]
            best = _interleaved_best(fns, repeats=5)
            tokens = batch * beams * NEW_TOKENS
            case = f"{'greedy' if beams == 1 else 'beam4'}/batch{batch}"
            runs[case] = {impl: {"tokens_per_s": round(tokens / t, 1), "best_s": round(t, 4)}
                          for impl, t in zip(IMPLS, best)}
            for impl, fn in zip(IMPLS[:2], fns[:2]):
                runs[case][impl]["cache_bytes"] = _cache_bytes(fn()[1])
            print(f"\n{case}: " + ", ".join(f"{i} {runs[case][i]['tokens_per_s']:.0f} tok/s" for i in IMPLS)
                  + f"; cache {runs[case]['static']['cache_bytes'] / 2**20:.2f} MiB")
    if os.environ.get("T5FORGE_BENCH_RECORD") == "1":  # a plain run leaves the committed results alone
        record = {"what": "greedy / beam-4 generation on CPU: tokens/s (rows * beams * new tokens / best time), "
                          "static KV cache vs torch.cat cache vs transformers, timed interleaved",
                  "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                  "threads": 1, "config": SIZE, "input_len": INPUT_LEN, "new_tokens": NEW_TOKENS,
                  "transformers": transformers.__version__, "torch": torch.__version__, "runs": runs}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"generation_cpu_{record['date']}.json").write_text(json.dumps(record, indent=2) + "\n")
