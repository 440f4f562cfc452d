"""Decoding throughput on any device: greedy and beam-4, batch 1 and 16, 64 new tokens, t5-v1_1-base with
random weights (bf16 on CUDA, fp32 elsewhere), every cache and step variant we have against transformers.

    python -m benchmarks.decode_bench                           # CUDA when present, else the CPU
    python -m benchmarks.decode_bench --smoke                   # a tiny model: the same code path in seconds
    rows = run(torch.device("cuda"), smoke=False, budget_s=45)  # from the evidence run: a list of dicts

Providers (one row each per case):
  static              our static KV cache, eager steps, the device's default layout (whole buffer on CUDA,
                      written prefix elsewhere) and the model's kernels (Triton on CUDA)
  compiled-<mode>     `compile_step=<mode>` (models/compiled_step.py): "cuda-graph" (the eager step captured,
                      no compile) and "reduce-overhead" (inductor + CUDA graphs) on CUDA, "aot_eager"
                      elsewhere; the reference kernels, as generate runs it
  dynamic             the torch.cat cache, eager
  transformers        transformers' `generate` on the same weights (when importable)
  static-prefix       static cache over the written prefix: on CUDA the flash kernel's q_offset path
  static-sdpa         static cache, default layout, `decode_kernels="sdpa-attention"`: the model's kernels
                      but SDPA attention; against `static` on CUDA: does the flash kernel pay at decode?
  static-torch        static cache, default layout, `decode_kernels="reference"`: every op a torch op
  compiled-<mode>-triton  the compiled step with the model's Triton kernels (CUDA only)

Every side decodes exactly the new tokens (`min_new_tokens` bans EOS), so tokens/s = rows * beams * new
tokens / best time compares like with like. A row also holds the cache's bytes at the end, the peak memory
of a run over what was allocated before it (CUDA), whether its tokens equal the `static` row's (bf16 kernels
may part in the last bits), and for compiled rows the first call's seconds (compilation), the graphs made and
CUDA-graph skips. GPU runs are timed with CUDA events; within a case the providers' timed runs alternate
(best of 2, 3 with --smoke), so load from other processes hits all alike. The core providers (static,
compiled, dynamic, transformers) run first, for greedy/b1, then beam4/b16, greedy/b16, beam4/b1; then the
rest, case by case; each only if the budget is expected to hold it (estimate: the case's `static` time,
plus the mode's measured or guessed compile time): a row that does not fit is "skipped".
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
import time

import torch

from benchmarks import devices
from benchmarks.runner import REPO, git_commit, versions
from models import compiled_step
from models.hf_checkpoint import load_hf_state_dict
from models.config import T5Config
from models.generation import Seq2SeqStepper, search
from models.generation_config import resolve
from models.kv_cache import StaticCache, dynamic_nbytes
from models.t5 import T5ForConditionalGeneration

CASES = (("greedy", 1), ("beam4", 16), ("greedy", 16), ("beam4", 1))
SMOKE = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
             feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# A compile's seconds before one has been measured (later ones use the measured time): what a row must fit.
COMPILE_GUESS_S = {"reduce-overhead": 25.0, "cuda-graph": 1.0, "aot_eager": 3.0, "eager": 2.0}


def providers(device: torch.device) -> tuple[list[str], list[str]]:
    """(core providers, the rest) for `device`, in the order they run."""
    if device.type == "cuda":
        return (["static", "compiled-cuda-graph", "dynamic", "transformers"],
                ["compiled-reduce-overhead", "static-sdpa", "static-torch", "static-prefix",
                 "compiled-cuda-graph-triton"])
    return ["static", "compiled-aot_eager", "dynamic", "transformers"], ["static-full"]


def compile_mode(provider: str) -> str | None:
    """"compiled-cuda-graph-triton" -> "cuda-graph"; None for a provider that does not compile."""
    if not provider.startswith("compiled-"):
        return None
    return provider[len("compiled-"):].removesuffix("-triton")


def build(device: torch.device, smoke: bool):
    """(ours, transformers' model or None, our config): the same random weights on both."""
    config = (T5Config(**SMOKE) if smoke else T5Config.from_preset("t5-v1_1-base")).replace(dropout_rate=0.0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        ours = T5ForConditionalGeneration(config).to(dtype).eval()
    try:
        import transformers
    except ImportError:
        return ours, None, config
    with torch.device(device):
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
            **config.to_hf_dict())).to(dtype).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(config.d_model ** -0.5)  # transformers' std-1 head gives huge logits
    load_hf_state_dict(ours, hf.state_dict())
    return ours, hf, config


def inputs(batch: int, vocab: int, length: int, device: torch.device):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, length * 2 // 3:] = 0  # padding in the batch
    return (ids * mask).to(device), mask.to(device)


def ours_runner(model, provider: str, ids, mask, beams: int, new: int):
    """A function running one decode of `provider` and returning (ids, the stepper it ended with)."""
    cache = "dynamic" if provider == "dynamic" else "static"
    mode = compile_mode(provider)
    full = {"static-prefix": False, "static-full": True}.get(provider)
    kernels = {"static-torch": "reference", "static-sdpa": "sdpa-attention"}.get(
        provider, "model" if provider.endswith("-triton") else "auto")
    cfg = resolve(model, dict(max_new_tokens=new, min_new_tokens=new, num_beams=beams, cache_implementation=cache,
                              early_stopping="never" if beams > 1 else False))

    def run():
        with torch.no_grad():
            stepper = Seq2SeqStepper(model, ids, mask, beams, cache, new, compile_step=mode, full_length=full,
                                     decode_kernels=kernels)
            try:
                out = search(stepper, cfg, ids.shape[0], ids.device)
            finally:
                stepper.close()
        return out.sequences, stepper
    return run


def hf_runner(hf, ids, mask, beams: int, new: int):
    def run():
        with torch.no_grad():
            beam_args = dict(length_penalty=0.6, early_stopping="never") if beams > 1 else {}
            out = hf.generate(input_ids=ids, attention_mask=mask, num_beams=beams, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, **beam_args)
        return out[:, 1:], None
    return run


def once(fn, device: torch.device):
    """(seconds of one call, its result): CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        result = fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3, result
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def first_call(fn, device: torch.device):
    """(seconds of the first call, compilation or capture included, its result)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def cache_bytes(stepper) -> int | None:
    if stepper is None:
        return None
    return stepper.cache.nbytes() if isinstance(stepper.cache, StaticCache) else dynamic_nbytes(stepper.cache)


def case_args(smoke: bool) -> dict:
    return dict(input_len=16 if smoke else 64, new=8 if smoke else 64)


def prepare(provider: str, models, case: tuple[str, int], device: torch.device, smoke: bool):
    """(row, decode function) for `provider` on `case`; the first call made (compilation, warm-up)."""
    from torch._dynamo.utils import counters

    ours, hf, config = models
    search_name, batch = case
    args = case_args(smoke)
    ids, mask = inputs(batch, config.vocab_size, args["input_len"], device)
    beams = 4 if search_name == "beam4" else 1
    row = dict(provider=provider, search=search_name, batch=batch, new_tokens=args["new"], status="ok",
               tokens=batch * beams * args["new"])
    if provider == "transformers":
        if hf is None:
            return dict(row, status="skipped", reason="transformers is not importable"), None
        fn = hf_runner(hf, ids, mask, beams, args["new"])
    else:
        fn = ours_runner(ours, provider, ids, mask, beams, args["new"])
    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    row["first_s"], _ = first_call(fn, device)
    if compile_mode(provider):
        row.update(graphs=counters["stats"]["unique_graphs"] - graphs,
                   cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips)
    return row, fn


def time_case(live: list, device: torch.device, repeats: int) -> None:
    """Best of `repeats` calls of every prepared provider, the providers alternating (load from other
    processes hits all alike); the first round also takes the peak memory (CUDA) and the result."""
    for round_ in range(repeats):
        for row, fn in live:
            if row["status"] != "ok":
                continue
            try:
                if device.type == "cuda" and round_ == 0:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                seconds, result = once(fn, device)
                if device.type == "cuda" and round_ == 0:
                    row["peak_bytes_over_start"] = torch.cuda.max_memory_allocated() - before
            except Exception as e:  # noqa: BLE001 -- a provider that fails is a result
                row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            row["best_s"] = min(row.get("best_s", math.inf), seconds)
            if round_ == 0:
                row["_result"] = result


def finish(row: dict, repeats: int, reference: dict) -> dict:
    if row["status"] != "ok":
        row.pop("_result", None)
        return row
    sequences, stepper = row.pop("_result")
    row.update(tokens_per_s=round(row["tokens"] / row["best_s"], 1), best_s=round(row["best_s"], 5),
               first_s=round(row["first_s"], 3), repeats=repeats, cache_bytes=cache_bytes(stepper))
    key = (row["search"], row["batch"])
    if row["provider"] == "static":
        reference[key] = sequences
    elif key in reference:
        row["same_tokens_as_static"] = bool(torch.equal(sequences.cpu(), reference[key].cpu()))
    return row


def estimate(provider: str, case, spent: dict, compiled_s: dict, repeats: int) -> float:
    """Seconds a row is expected to take: (1 + repeats) runs at the case's `static` speed (or any measured
    one), plus a compile when this mode has not compiled yet at this shape."""
    per_run = spent.get(case, max(spent.values(), default=1.0))
    extra = 0.0
    if compile_mode(provider):
        mode = compile_mode(provider)
        extra = compiled_s.get(mode, COMPILE_GUESS_S.get(mode, 10.0))
    return (1 + repeats) * per_run * (2.0 if provider == "transformers" else 1.0) + extra


def run_case(case, names: list[str], models, device, smoke: bool, repeats: int, deadline: float,
             state: dict) -> list[dict]:
    """The rows of `names` on `case`: each prepared if the budget holds it, then all timed alternately."""
    live, rows, committed = [], [], 0.0   # committed: the timed runs still owed to prepared providers
    for provider in names:
        need = estimate(provider, case, state["spent"], state["compiled_s"], repeats)
        if time.monotonic() + committed + need > deadline:
            rows.append(dict(status="skipped", provider=provider, search=case[0], batch=case[1],
                             reason=f"budget: ~{need:.0f} s needed, {deadline - time.monotonic():.0f} s left"))
            continue
        try:
            row, fn = prepare(provider, models, case, device, smoke)
        except Exception as e:  # noqa: BLE001 -- a provider that fails is a result; the others go on
            row, fn = dict(status="error", provider=provider, search=case[0], batch=case[1],
                           reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"), None
        rows.append(row)
        if fn is not None:
            live.append((row, fn))
            if provider == "static":  # the case's time per run, for the estimates of the others
                state["spent"][case] = row["first_s"]
            slower = 2.0 if provider == "transformers" else 1.0
            committed += repeats * state["spent"].get(case, row["first_s"]) * slower
    time_case(live, device, repeats)
    for row in rows:
        finish(row, repeats, state["reference"])
        if row["status"] == "ok":
            if row["provider"] == "static":
                state["spent"][case] = row["best_s"]
            if compile_mode(row["provider"]):
                mode = compile_mode(row["provider"])
                state["compiled_s"][mode] = max(state["compiled_s"].get(mode, 0.0), row["first_s"] - row["best_s"])
    return rows


def run(device: torch.device | str, smoke: bool, budget_s: float, log=print) -> list[dict]:
    """Every (provider, case) row that fits `budget_s` seconds (module doc); the rest "skipped". On a CPU
    with one thread: a shared machine's load otherwise makes small steps vary 50-fold."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(device, smoke, budget_s, log)
    finally:
        torch.set_num_threads(threads)


def _run(device: torch.device, smoke: bool, budget_s: float, log) -> list[dict]:
    deadline = time.monotonic() + budget_s
    start = time.monotonic()
    models = build(device, smoke)
    rows: list[dict] = [dict(status="ok", provider="setup", seconds=round(time.monotonic() - start, 2),
                             device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                             dtype=str(next(models[0].parameters()).dtype), smoke=smoke, budget_s=budget_s,
                             threads=torch.get_num_threads(), config=models[2].to_hf_dict(), **case_args(smoke))]
    repeats = 3 if smoke else 2
    state = dict(spent={}, compiled_s={}, reference={})
    compiled_step.clear(models[0])
    ids, mask = inputs(1, models[2].vocab_size, 8, device)
    ours_runner(models[0], "static", ids, mask, 1, 4)()  # warm-up: allocator, BLAS, first-call costs
    for names in providers(device):  # each case's core providers first, then the rest
        for case in CASES:
            for row in run_case(case, names, models, device, smoke, repeats, deadline, state):
                rows.append(row)
                log(line(row))
    compiled_step.clear(models[0])
    return rows


def line(row: dict) -> str:
    head = f"{row['provider']:>28} {row.get('search', ''):>6} b{row.get('batch', '')}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} ({row.get('reason', '')})"
    text = (f"{head}: {row['tokens_per_s']:>9.1f} tok/s (best {row['best_s'] * 1e3:.1f} ms, "
            f"first {row['first_s']:.2f} s)")
    if row.get("cache_bytes"):
        text += f", cache {row['cache_bytes'] / 2 ** 20:.2f} MiB"
    if "graphs" in row:
        text += f", graphs {row['graphs']}, cudagraph skips {row['cudagraph_skips']}"
    if "same_tokens_as_static" in row:
        text += f", same tokens {row['same_tokens_as_static']}"
    return text


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 8 new tokens")
    ap.add_argument("--budget", type=float, default=45.0, help="seconds (default 45)")
    ap.add_argument("--out", help="results file (default benchmarks/results/<device>/decode[-smoke]-<time>.json)")
    args = ap.parse_args(argv)
    try:
        part = evidence_part(args.device, args.smoke, args.budget)
    except (RuntimeError, ValueError) as e:
        print(f"decode_bench: {e}", file=sys.stderr)
        return 2
    for case, ratios in part["speed_vs_static"].items():
        print(f"{case} (tokens/s / static's): " + ", ".join(f"{p} {v:.2f}x" for p, v in ratios.items()))
    stamp = datetime.datetime.now(datetime.timezone.utc)
    device = torch.device(args.device)
    slug = devices.slugify(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    out = pathlib.Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / slug / f"decode{'-smoke' if args.smoke else ''}-{stamp:%Y%m%dT%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": "t5forge-decode/1", "command": "python -m benchmarks.decode_bench " + " ".join(argv),
              "date": f"{stamp:%Y-%m-%dT%H:%M:%SZ}", "git_commit": git_commit(), "versions": versions(), **part}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if part["status"] == "ok" else 1


def summary(rows: list[dict]) -> dict:
    """Per case, tokens/s of each provider relative to `static` (> 1: faster than the eager static cache)."""
    ok = [r for r in rows if r["status"] == "ok" and "tokens_per_s" in r]
    out = {}
    for search_name, batch in CASES:
        case = {r["provider"]: r["tokens_per_s"] for r in ok if (r["search"], r["batch"]) == (search_name, batch)}
        if "static" in case:
            out[f"{search_name}/b{batch}"] = {p: round(v / case["static"], 3) for p, v in case.items()}
    return out


def evidence_part(device: torch.device | str, smoke: bool, budget_s: float, log=print) -> dict:
    """What `t5forge bench gpu` records: {"status", "rows", "speed_vs_static"}."""
    start = time.monotonic()
    rows = run(device, smoke, budget_s, log)
    elapsed = round(time.monotonic() - start, 1)
    measured = [r for r in rows if r["status"] == "ok" and r["provider"] != "setup"]
    status = "ok" if measured else "error"
    return dict(status=status, elapsed_s=elapsed, rows=rows, speed_vs_static=summary(rows),
                **({} if measured else dict(reason="no row measured")))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
