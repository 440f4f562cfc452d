"""Logits processing for `generate`: Hugging Face's processors, one function each, in Hugging Face's order.

    process = logits_processor(cfg, num_beams=1)
    scores = process(history, scores, step)     # history: (N, 1 + step) decoder ids, start token included

Order (as transformers builds its list): repetition penalty, no-repeat n-grams, the minimum length (EOS
banned), then, only when sampling, temperature, top-k and top-p. Greedy and sampling apply them to the
raw logits, beam search to the log-softmax (as transformers does). Each function has transformers' meaning:

- repetition_penalty p (CTRL): every token already in the decoder sequence (the start token included) has
  its score divided by p when positive, multiplied by p when negative.
- no_repeat_ngram_size n: a token that would repeat an n-gram of the decoder sequence gets -inf.
- min_new_tokens / min_length: EOS gets -inf before that many generated tokens.
- top_k: scores below the k-th largest get -inf; top_p: the smallest set of tokens whose probability
  reaches p is kept (ties at the edge kept); with beams both keep at least 2 tokens (EOS + one more).
"""
from __future__ import annotations

from typing import Callable

import torch

Processor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def repetition_penalty(history: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, history, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def no_repeat_ngram(history: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for every token that follows an earlier occurrence of the last n - 1 tokens."""
    length = history.shape[1]
    if length < n:
        return scores
    windows = history.unfold(1, n, 1)                                   # (N, L - n + 1, n)
    tail = history[:, length - n + 1:]                                  # (N, n - 1)
    match = (windows[..., :-1] == tail[:, None]).all(-1)               # (N, L - n + 1)
    vocab = scores.shape[1]
    follow = torch.where(match, windows[..., -1], vocab)               # unmatched -> a spare column
    banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, follow, True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


def ban_token(scores: torch.Tensor, token: int) -> torch.Tensor:
    out = scores.clone()
    out[:, token] = float("-inf")
    return out


def top_k_filter(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)                                        # the low tail holding <= 1 - p
    drop[..., -min_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def logits_processor(cfg, num_beams: int) -> Processor:
    """One function applying every processor `cfg` (a GenerationConfig) asks for, in transformers' order."""
    steps: list[Processor] = []
    if cfg.repetition_penalty != 1.0:
        steps.append(lambda h, s, t: repetition_penalty(h, s, cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size > 0:
        steps.append(lambda h, s, t: no_repeat_ngram(h, s, cfg.no_repeat_ngram_size))
    min_tokens = cfg.min_tokens()
    if min_tokens > 0:
        steps.append(lambda h, s, t: ban_token(s, cfg.eos_token_id) if t < min_tokens else s)
    if cfg.do_sample:
        min_keep = 2 if num_beams > 1 else 1  # beams keep EOS and one more token to explore
        if cfg.temperature != 1.0:
            steps.append(lambda h, s, t: s / cfg.temperature)
        if cfg.top_k:
            steps.append(lambda h, s, t: top_k_filter(s, cfg.top_k, min_keep))
        if cfg.top_p < 1.0:
            steps.append(lambda h, s, t: top_p_filter(s, cfg.top_p, min_keep))

    def process(history: torch.Tensor, scores: torch.Tensor, step: int) -> torch.Tensor:
        for fn in steps:
            scores = fn(history, scores, step)
        return scores

    return process
