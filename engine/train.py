"""`t5forge pretrain`: T5 pretraining from one command, on a laptop CPU or many GPU nodes.

    t5forge pretrain                                   # tiny model, built-in corpus, CPU, ~3 minutes
    t5forge pretrain --config engine/configs/t5-v1_1-base.toml --data.paths 'c4/en/c4-train.*.json.gz' \\
        --data.tokenizer spiece.model --run.dir runs/base
    deepspeed --num_gpus 8 --module engine.train --config engine/configs/t5-v1_1-base.toml ...
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 --module engine.train --config ...
        # hosts: one line per node, "node1 slots=8"; run.dir on a filesystem every node sees
    deepspeed --num_gpus 2 --module engine.train --deepspeed.zero_stage 2     # 2 CPU ranks (gloo)

The deepspeed launcher appends --local_rank=N, which is accepted and ignored (LOCAL_RANK is read from
the environment). Without a launcher and without a GPU, the run uses a local engine (no DeepSpeed
start-up, same Trainer); `--run.engine deepspeed` forces DeepSpeed on one process.

With no `--config` (and no other `--model.preset`), engine/configs/tiny.toml is the base config.
Running the same command on an existing `run.dir` resumes from its latest checkpoint. SIGTERM / SIGINT
save a checkpoint and exit (exit code 0). Config keys: engine/config.py.
"""
from __future__ import annotations

import collections
import copy
import glob
import math
import os
import pathlib
import random
import re
import signal
import sys
import time

import numpy as np
import torch

from engine.config import RunConfig, load_run_config
from engine.bad_input import PretrainTrainer, bad_input_summary


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def watch_launcher(interval_s: float = 1.0) -> None:
    """Under deepspeed's launcher, stop as on SIGTERM when the launcher or the `deepspeed` front-end dies.

    On one node, `deepspeed` (runner.py, 0.19.8) forwards no signal to deepspeed.launcher.launch, so a
    SIGTERM to the front-end alone kills it and leaves the ranks training on; a killed launch.py orphans
    them too. A daemon thread notices its parent or grandparent changing and signals this process, which
    then saves and exits as it does on SIGTERM.
    """
    if "LOCAL_RANK" not in os.environ:
        return
    import threading

    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in launcher.cmdline():
            return
        front = launcher.ppid()
    except psutil.Error:
        return

    def watch():
        while True:
            time.sleep(interval_s)
            try:
                orphaned = os.getppid() != launcher.pid or launcher.ppid() != front
            except psutil.Error:
                orphaned = True
            if orphaned:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="t5forge-launcher-watch", daemon=True).start()


def pick_device(cfg: RunConfig) -> torch.device:
    want = cfg.run.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("config key 'run.device': cuda requested but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_threads(cfg: RunConfig) -> None:
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
        return
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_procs)))


def set_determinism(cfg: RunConfig, device: torch.device) -> bool:
    """`run.deterministic`: PyTorch's deterministic algorithms (auto: on the CPU only); True when on.

    On the CPU the one run-to-run difference at more than one thread was the relative-position bias
    gradient: the backward of `table[buckets]` accumulates with atomic adds from several threads, in an
    order that changes run to run; the deterministic path sorts the indices first (and is faster there).
    On a GPU it also selects cuBLAS's fixed-workspace mode and the attention kernel's deterministic
    bias-gradient reduction (models/attention_spec.py reads the switch)."""
    mode = cfg.run.deterministic
    on = mode == "on" or (mode == "auto" and device.type == "cpu")
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
    # warn_only: an op without a deterministic kernel warns instead of stopping the run.
    torch.use_deterministic_algorithms(on, warn_only=True)
    return on


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_data(cfg: RunConfig) -> tuple[list[str], str]:
    """The data files and tokenizer model: the user's, or the built-in corpus made on first use."""
    if not cfg.data.paths:
        from engine.data import builtin

        import fcntl

        # Made once and cached (engine/data/builtin.py). Ranks of one machine start together under a
        # launcher: a file lock lets the first build it while the others wait and then reuse it.
        cache = pathlib.Path(builtin.cache_dir())
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            paths, tokenizer_file = builtin.ensure_builtin()
        tokenizer = cfg.data.tokenizer or tokenizer_file
        return [str(p) for p in paths], str(tokenizer)
    files: list[str] = []
    for pattern in cfg.data.paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"config key 'data.paths': no file matches {pattern!r}")
        files.extend(matches)
    if not cfg.data.tokenizer:
        raise ValueError("config key 'data.tokenizer': a SentencePiece model is required with data.paths "
                         "(the real T5 vocabulary is spiece.model)")
    if not os.path.isfile(cfg.data.tokenizer):
        raise FileNotFoundError(f"config key 'data.tokenizer': file not found: {cfg.data.tokenizer}")
    return files, cfg.data.tokenizer


def target_length(cfg: RunConfig) -> int:
    if cfg.data.target_length > 0:
        return cfg.data.target_length
    from engine.data.objectives import compute_span_corruption_lengths

    _, targets = compute_span_corruption_lengths(cfg.data.input_length, cfg.data.noise_density,
                                                 cfg.data.mean_noise_span_length)
    return targets


def build_data(cfg: RunConfig, files: list[str], tokenizer, rank: int, world_size: int):
    from engine.data.pipeline import build_pretrain_dataset

    objective_params = {}
    if cfg.data.objective in ("span_corruption", "iid_denoising", "bert", "mask_every_token", "drop_corrupted",
                              "denoise"):
        objective_params["noise_density"] = cfg.data.noise_density
        if cfg.data.objective in ("span_corruption", "denoise"):
            objective_params["mean_noise_span_length"] = cfg.data.mean_noise_span_length
    return build_pretrain_dataset(
        files, tokenizer, cfg.data.objective, objective_params, inputs_length=cfg.data.input_length,
        targets_length=target_length(cfg), batch_size=cfg.batch.micro_batch_size, pack=cfg.data.pack,
        seed=cfg.run.seed, rank=rank, world_size=world_size, shuffle_buffer=cfg.data.shuffle_buffer,
        num_workers=cfg.data.num_workers, strict=cfg.data.strict)


def build_model_config(cfg: RunConfig, tokenizer_vocab: int):
    from models.config import T5Config

    vocab = cfg.model.vocab_size or -(-tokenizer_vocab // 128) * 128
    if vocab < tokenizer_vocab:
        raise ValueError(f"config key 'model.vocab_size': {vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    overrides = dict(vocab_size=vocab, kernel_backend=cfg.model.kernel_backend,
                     gradient_checkpointing=cfg.model.gradient_checkpointing)
    if cfg.model.dropout_rate >= 0:
        overrides["dropout_rate"] = cfg.model.dropout_rate
    try:
        return T5Config.from_preset(cfg.model.preset, **overrides)
    except (KeyError, ValueError) as err:
        raise ValueError(f"config key 'model.preset': {err}") from None


def build_trainer(cfg: RunConfig, data=None, tokenizer_file: str | None = None, tokenizer_vocab: int | None = None):
    """Model, optimizer, engine and trainer from a run config (data may be injected, as tests do)."""
    from engine.engines import build_engine, choose_engine
    from engine.optim import build_optimizer
    from engine.zero3 import build_model
    from models.t5 import T5ForConditionalGeneration

    from models.config import PRESETS

    if cfg.model.preset not in PRESETS:  # checked before any data is built
        raise ValueError(f"config key 'model.preset': unknown preset {cfg.model.preset!r}; one of {', '.join(PRESETS)}")
    device = pick_device(cfg)
    set_threads(cfg)
    set_determinism(cfg, device)
    kind = choose_engine(cfg, device)
    if data is None:
        from engine.tokenizer import Tokenizer

        files, tokenizer_file = resolve_data(cfg)
        tokenizer = Tokenizer(tokenizer_file)
        tokenizer_vocab = tokenizer.vocab_size
    model_config = build_model_config(cfg, tokenizer_vocab)
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    # ZeRO-3: built partitioned (engine/zero3.py), the same weights as this plain build.
    model = build_model(lambda: T5ForConditionalGeneration(model_config), cfg, kind, device)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    engine = build_engine(kind, model, optimizer, cfg, device)
    # Dropout masks and data shuffles differ per rank; a resume restores these states exactly.
    seed_everything(cfg.run.seed + 1000 * (engine.rank + 1))
    if data is None:
        data = build_data(cfg, files, tokenizer, engine.rank, engine.world_size)
    flops = model_config.flops_per_token(cfg.data.input_length, target_length(cfg))
    extra = {"model_config": model_config.to_hf_dict()}
    if tokenizer_file:  # what export / finetune / generate compare a tokenizer with
        from engine.tokenizer import tokenizer_fingerprint

        extra["tokenizer"] = tokenizer_fingerprint(tokenizer_file)
    trainer = PretrainTrainer(cfg, engine, data, flops_per_token=flops, tokenizer_file=tokenizer_file, device=device,
                      extra_state=extra)
    return trainer, model_config


def greedy_fill(model, tokenizer, input_ids: list[int], max_new_tokens: int = 32) -> list[int]:
    """Greedy decoding by re-running the decoder on the prefix (small demo inputs: no cache needed).

    Stops at EOS or at a sentinel the input does not contain: every span has been filled by then.
    """
    sentinels = {i for i in input_ids if i >= tokenizer.vocab_size - tokenizer.num_sentinels}
    device = next(model.parameters()).device
    enc = torch.tensor([input_ids], device=device)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            dec = torch.tensor([[0] + out], device=device)
            logits = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec).logits
            nxt = int(logits[0, -1, : tokenizer.vocab_size].argmax())
            if nxt == tokenizer.eos_id or (nxt >= tokenizer.vocab_size - tokenizer.num_sentinels
                                           and nxt not in sentinels):
                break
            out.append(nxt)
    return out


# Plain prose sentences only: no code, paths or markup, which a greedy fill cannot show off.
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"[A-Z][A-Za-z ,']*\.")


def pick_demo_sentences(texts, count: int = 6, spans: int = 2, seed: int = 0,
                        min_words: int = 6, max_words: int = 12) -> list[tuple[str, list[str]]]:
    """Sentences of the training text with `spans` words masked: [(masked text, [masked words])].

    The choice never looks at the model, so the demo cannot flatter it: short prose sentences made of
    the corpus's most frequent words (the mean log frequency of their words ranks them; on the built-in
    corpus these are typical docstring lines such as "Return true if the object is a module."), at most
    one per opening three words so they differ, each with non-adjacent words (not the first) masked
    by a seeded generator.
    """
    sentences: dict[str, None] = {}
    freq: collections.Counter = collections.Counter()
    for text in texts:
        for sentence in _SENTENCE_SPLIT.split(" ".join(text.split())):
            words = sentence.split()
            freq.update(w.strip(".,").lower() for w in words)
            if min_words <= len(words) <= max_words and _PROSE.fullmatch(sentence):
                sentences.setdefault(sentence)
    total = sum(freq.values()) or 1

    def typicality(sentence: str) -> float:
        words = [w.strip(".,").lower() for w in sentence.split()]
        return sum(math.log(freq[w] / total) for w in words) / len(words)

    picked: list[tuple[str, list[str]]] = []
    openings: set[tuple[str, ...]] = set()
    for sentence in sorted(sentences, key=lambda x: (-typicality(x), x)):
        words = sentence.split()
        opening = tuple(w.lower() for w in words[:3])
        candidates = [i for i in range(1, len(words)) if len(words[i].strip(".,")) >= 2]
        if opening in openings or len(candidates) < 2 * spans - 1:
            continue
        rng = random.Random(seed * 1_000_003 + len(picked))
        chosen: list[int] = []
        for i in rng.sample(candidates, len(candidates)):
            if all(abs(i - j) > 1 for j in chosen):
                chosen.append(i)
            if len(chosen) == spans:
                break
        if len(chosen) < spans:
            continue
        chosen.sort()
        answers = []
        for k, i in enumerate(chosen):
            word = words[i]
            core = word.rstrip(".,")
            answers.append(core)
            words[i] = f"<extra_id_{k}>" + word[len(core):]  # keep the trailing punctuation visible
        picked.append((" ".join(words), answers))
        openings.add(opening)
        if len(picked) == count:
            break
    return picked


def split_spans(tokenizer, ids: list[int], n: int) -> list[str]:
    """The text the model wrote after each of the first n sentinels ("" where it wrote none)."""
    first = tokenizer.vocab_size - tokenizer.num_sentinels
    spans: dict[int, list[int]] = {}
    current = None
    for i in ids:
        if i >= first:
            current = tokenizer.vocab_size - 1 - i  # sentinel index
            spans.setdefault(current, [])
        elif current is not None:
            spans[current].append(i)
    return [tokenizer.decode(spans.get(k, []), skip_special=True).strip() for k in range(n)]


def top_guesses(model, tokenizer, input_ids: list[int], answers: list[str], k: int = 3) -> list[list[str]]:
    """The model's k likeliest pieces for the first piece of each masked word, given the true text
    before it (teacher forcing): shows the words it weighs even where greedy decoding picks "the"."""
    target, starts = [], []
    for n, word in enumerate(answers):
        target.append(tokenizer.sentinel_id(n))
        starts.append(len(target))
        target.extend(tokenizer.encode(word))
    device = next(model.parameters()).device
    enc = torch.tensor([input_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=enc, attention_mask=torch.ones_like(enc),
                       decoder_input_ids=torch.tensor([[0] + target[:-1]], device=device)).logits[0]
    pieces = logits[:, 2: tokenizer.num_pieces]  # words only: no pad, EOS or sentinels
    return [[tokenizer.id_to_piece(int(i) + 2).replace("\u2581", "") or "\u2581" for i in pieces[j].topk(k).indices]
            for j in starts]


def span_accuracy(model, batches) -> tuple[float, float, int]:
    """Teacher-forced top-1 accuracy on the masked-out words' tokens (sentinels and EOS excluded), and
    the accuracy of always guessing the most common of those tokens: what a model that only learned
    word frequencies scores. Returns (model accuracy, frequency-guess accuracy, tokens)."""
    correct = total = 0
    counts: collections.Counter = collections.Counter()
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch, num_pieces in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            keep = (labels > 1) & (labels < num_pieces)  # 0 pad, 1 EOS; ids >= num_pieces are sentinels
            predicted = model(**batch).logits.argmax(-1)
            correct += int((predicted[keep] == labels[keep]).sum())
            total += int(keep.sum())
            counts.update(labels[keep].tolist())
    if not total:
        return 0.0, 0.0, 0
    return correct / total, counts.most_common(1)[0][1] / total, total


def demo(model, cfg: RunConfig, tokenizer_file: str, file=None, eval_batches: int = 8) -> dict:
    """Show what the model learned: fills of masked words in sentences of its training text, and how
    often it predicts a masked token exactly compared with guessing the most frequent one."""
    import logging

    from engine.data.c4 import C4Reader
    from engine.tokenizer import Tokenizer

    file = file or sys.stdout
    tokenizer = Tokenizer(tokenizer_file)
    files, _ = resolve_data(cfg)
    # The first ~2 MB of the training text: the whole built-in corpus, a sample of a large one. Read by
    # the training's own reader, which skips what training skipped; it was reported once already.
    data_log = logging.getLogger("t5forge.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    try:
        return _demo(model, cfg, tokenizer, files, C4Reader(files, shuffle_buffer=0, shuffle_files=False,
                                                            max_reported=0), file, eval_batches)
    finally:
        data_log.setLevel(level)


def _demo(model, cfg: RunConfig, tokenizer, files, reader, file, eval_batches: int) -> dict:
    texts, size = [], 0
    for doc in reader:
        for line in doc.split("\n"):
            if line.strip():
                texts.append(line)
                size += len(line)
        if size > 2_000_000:
            break
    was_training = model.training
    model.eval()
    print("\nWhat the model fills in (greedy decoding; sentences from its training text, masked words "
          "as <extra_id_N>):", file=file)
    exact = masked = 0
    for text, answers in pick_demo_sentences(["\n".join(texts)], seed=cfg.run.seed):
        ids = tokenizer.encode(text, add_eos=True)
        predicted = split_spans(tokenizer, greedy_fill(model, tokenizer, ids), len(answers))
        hits = sum(p.lower() == a.lower() for p, a in zip(predicted, answers))
        exact, masked = exact + hits, masked + len(answers)
        guesses = " | ".join("/".join(g) for g in top_guesses(model, tokenizer, ids, answers))
        print(f"  {text}\n      model: {' | '.join(p or '-' for p in predicted):<24} "
              f"truth: {' | '.join(answers):<24} top-3 first pieces: {guesses}", file=file)
    # Fresh masks over the training text (another seed): teacher-forced, so every masked token counts.
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.run.seed = cfg.run.seed + 1
    data = iter(build_data(eval_cfg, files, tokenizer, 0, 1))
    accuracy, baseline, tokens = span_accuracy(
        model, ((batch, tokenizer.num_pieces) for batch, _ in zip(data, range(eval_batches))))
    print(f"Masked-token accuracy on {tokens} tokens of new masks over the training text: {accuracy:.1%} "
          f"(always guessing the most frequent token: {baseline:.1%}); exact words in the demo: "
          f"{exact}/{masked}", file=file)
    model.train(was_training)
    return {"accuracy": accuracy, "baseline": baseline, "tokens": tokens, "exact": exact, "masked": masked}


def with_default_config(argv: list[str]) -> list[str]:
    """Without `--config`, the tiny run's file engine/configs/tiny.toml is the base (unless another
    preset is named), so `t5forge pretrain` with no arguments is exactly that file."""
    from engine.config import parse_overrides, preset_config_path

    configs, overrides = parse_overrides(argv)
    if configs or any(key == "model.preset" and words != ["tiny"] for key, words in overrides):
        return argv
    return ["--config", str(preset_config_path("tiny")), *argv]


def pretrain_main(argv: list[str]) -> int:
    from engine.errors import USER_ERRORS, report
    from engine.trainer import NonFiniteLossError

    argv = _strip_launcher_args(list(argv))
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = load_run_config(with_default_config(argv))
        watch_launcher()
        trainer, model_config = build_trainer(cfg)
        resumed = trainer.resume()
        if trainer.is_main:
            params = model_config.num_parameters()
            where = f"resuming at step {trainer.step}" if resumed else "starting"
            print(f"t5forge pretrain: {cfg.model.preset} ({params / 1e6:.1f}M parameters), "
                  f"{trainer.engine.world_size} rank(s), {type(trainer.engine).__name__}, {where}; "
                  f"run dir {cfg.run.dir}", file=sys.stderr)
        result = trainer.train()
    except USER_ERRORS as err:
        return report("pretrain", err)
    except NonFiniteLossError as err:
        print(f"t5forge pretrain: {err}", file=sys.stderr)
        return 1
    if trainer.is_main:
        how = "stopped by signal, checkpoint saved" if result.stopped_by_signal else "done"
        if result.losses:
            change = f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in this run"
        else:
            change = f"already at run.max_steps = {cfg.run.max_steps}; raise it to train further"
        print(f"t5forge pretrain: {how} at step {result.step} ({change}, {result.skipped_steps} skipped steps"
              f"{bad_input_summary(trainer.data)}); checkpoint in {trainer.ckpt_root}", file=sys.stderr)
        if (cfg.run.demo and not result.stopped_by_signal and trainer.tokenizer_file
                and cfg.deepspeed.zero_stage < 3 and cfg.data.objective == "span_corruption"):
            demo(trainer.engine.module, cfg, trainer.tokenizer_file)
    trainer.engine.close()
    if result.stopped_by_signal and trainer.engine.world_size > 1:  # launchers exit non-zero: say it per rank
        print(f"t5forge pretrain: rank {trainer.engine.rank} saved step {result.step} and exits 0", file=sys.stderr)
    return 0


if __name__ == "__main__":  # `python -m engine.train` / `deepspeed --module engine.train`
    sys.exit(pretrain_main(sys.argv[1:]))
