"""The end of `t5forge pretrain`: the model fills in a few corrupted sentences of its own training text,
and the share of masked tokens it predicts exactly, so a user sees what the run learned."""
from __future__ import annotations

import collections
import copy
import math
import random
import re
import sys

import torch

from engine.build import build_data, resolve_data
from engine.config import RunConfig


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
    from engine.tokenizer_files import open_tokenizer

    file = file or sys.stdout
    tokenizer = open_tokenizer(tokenizer_file)
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
