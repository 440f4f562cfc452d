"""Decoding with the key/value cache: greedy search and beam search with T5X's length penalty.

    out = generate(model, input_ids, attention_mask, max_length=64)                  # greedy
    out = generate(model, input_ids, attention_mask, num_beams=4)                    # alpha 0.6 (T5 paper)
    out.sequences   # (B, T) generated ids, no start token, EOS then padding; out.scores (B,)

Both searches run on a `Stepper`: something that feeds one token per row and returns next-token logits,
keeping its own cache, and can reorder its rows. `Seq2SeqStepper` adapts the encoder-decoder
(`encode` once, `decode_step` per token); the decoder-only models provide their own, so one search
serves every architecture.

Beam search keeps, per example, K live hypotheses and K finished ones. Each step scores the 2K best
extensions of the live beams; an extension ending in EOS joins the finished pool with score
`log_prob / ((5 + length) / 6) ** alpha` (T5X's brevity penalty; length counts EOS) when it ranks within
the top K (as fairseq and Hugging Face do, so one beam without penalty is exactly greedy search), the K
best others stay live. The search of an example ends when its worst finished score beats the best score
any live beam could still reach (its log-prob, which only falls, under the largest penalty); at the
maximum length the live beams are closed as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

NEG_INF = -1.0e9  # finite, so that -inf - -inf never makes NaN in score arithmetic


class Stepper(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...           # (N, 1) -> logits (N, V)
    def reorder(self, index: torch.Tensor) -> None: ...                 # keep rows `index` (N,)


class Seq2SeqStepper:
    """Encoder-decoder decoding state: the encoder output once, the decoder's cache per step."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, expand: int = 1):
        self.model = model
        encoder_hidden = model.encode(input_ids, attention_mask)
        if expand > 1:  # each example's row repeated once per beam, beams of one example adjacent
            encoder_hidden = encoder_hidden.repeat_interleave(expand, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(expand, dim=0)
        self.encoder_hidden, self.attention_mask = encoder_hidden, attention_mask
        self.cache = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.cache = self.model.decode_step(tokens, self.encoder_hidden, self.attention_mask, self.cache)
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        # Beams move only within their own example, and all beams of an example share the encoder
        # output, so the cross-attention K/V (entries 2, 3) are already right: only the self-attention
        # cache follows the surviving beams.
        self.cache = [(k.index_select(0, index), v.index_select(0, index), *rest) for k, v, *rest in self.cache]


@dataclasses.dataclass
class GenerationOutput:
    sequences: torch.Tensor          # (B, T) generated ids, no start token; pad after EOS
    scores: torch.Tensor             # (B,) sum of log-probs (greedy) / length-penalised score (beam)
    log_probs: torch.Tensor          # (B,) sum of the generated tokens' log-probs (EOS included)
    lengths: torch.Tensor            # (B,) generated tokens including EOS


def brevity_penalty(length: torch.Tensor | float, alpha: float):
    """T5X's length normalisation ((5 + length) / 6) ** alpha (Wu et al. 2016)."""
    return ((5.0 + length) / 6.0) ** alpha


def _check(max_length: int, num_beams: int, alpha: float) -> None:
    if max_length < 1:
        raise ValueError(f"generation max_length must be at least 1, got {max_length}")
    if num_beams < 1:
        raise ValueError(f"generation num_beams must be at least 1, got {num_beams}")
    if alpha < 0:
        raise ValueError(f"generation length penalty alpha must be >= 0, got {alpha}")


@torch.no_grad()
def greedy_search(stepper: Stepper, batch_size: int, max_length: int, start_id: int, eos_id: int,
                  pad_id: int, device: torch.device) -> GenerationOutput:
    tokens = torch.full((batch_size, 1), start_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    log_probs = torch.zeros(batch_size, dtype=torch.float32, device=device)
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
    out = []
    for _ in range(max_length):
        logits = stepper.step(tokens).float()
        token = logits.argmax(-1)
        token_log_prob = torch.log_softmax(logits, -1).gather(1, token[:, None])[:, 0]
        token = token.masked_fill(finished, pad_id)  # rows that ended keep emitting padding
        log_probs += token_log_prob.masked_fill(finished, 0.0)
        lengths += (~finished).long()
        finished |= token == eos_id
        out.append(token)
        tokens = token[:, None]
        if bool(finished.all()):
            break
    return GenerationOutput(torch.stack(out, 1), log_probs.clone(), log_probs, lengths)


@torch.no_grad()
def beam_search(stepper: Stepper, batch_size: int, num_beams: int, max_length: int, alpha: float,
                start_id: int, eos_id: int, pad_id: int, device: torch.device) -> GenerationOutput:
    """`stepper` holds batch_size * num_beams rows, the beams of one example adjacent."""
    B, K = batch_size, num_beams
    rows = torch.arange(B, device=device)[:, None]
    alive_seq = torch.full((B, K, max_length), pad_id, dtype=torch.long, device=device)
    alive_logp = torch.full((B, K), NEG_INF, device=device)
    alive_logp[:, 0] = 0.0  # one real beam at the start; copies would only fill the beam with duplicates
    fin_seq = torch.full((B, K, max_length), pad_id, dtype=torch.long, device=device)
    fin_score = torch.full((B, K), NEG_INF, device=device)
    fin_logp = torch.full((B, K), NEG_INF, device=device)
    fin_len = torch.zeros((B, K), dtype=torch.long, device=device)
    tokens = torch.full((B * K, 1), start_id, dtype=torch.long, device=device)
    best_possible_penalty = brevity_penalty(float(max_length), alpha)
    for t in range(max_length):
        logits = stepper.step(tokens).float()                                       # (B*K, V)
        vocab = logits.shape[-1]
        candidates = (alive_logp[..., None] + torch.log_softmax(logits, -1).view(B, K, vocab)).view(B, K * vocab)
        top_logp, top_index = candidates.topk(2 * K, dim=1)                         # (B, 2K), best first
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_seq = alive_seq[rows, top_beam]                                         # (B, 2K, T)
        top_seq[:, :, t] = top_token
        is_eos = top_token == eos_id
        last = t == max_length - 1
        # Finished candidates: EOS ranked within the top K; at the last step every candidate closes.
        ranked = torch.arange(2 * K, device=device)[None] < K
        closes = (is_eos & ranked) | (torch.ones_like(is_eos) if last else torch.zeros_like(is_eos))
        new_score = torch.where(closes & (top_logp > NEG_INF / 2), top_logp / brevity_penalty(t + 1.0, alpha),
                                torch.full_like(top_logp, NEG_INF))
        all_score = torch.cat([fin_score, new_score], 1)
        fin_score, keep = all_score.topk(K, dim=1)
        fin_seq = torch.cat([fin_seq, top_seq], 1)[rows, keep]
        fin_logp = torch.cat([fin_logp, top_logp], 1)[rows, keep]
        fin_len = torch.cat([fin_len, torch.full_like(top_beam, t + 1)], 1)[rows, keep]
        if last:
            break
        # Live beams: the K best candidates that did not end.
        live_logp, live_pick = top_logp.masked_fill(is_eos, NEG_INF).topk(K, dim=1)
        alive_logp = live_logp
        alive_seq = top_seq[rows, live_pick]
        source_beam = top_beam[rows, live_pick]                                     # (B, K)
        stepper.reorder((rows * K + source_beam).view(-1))
        tokens = top_token[rows, live_pick].view(-1, 1)
        # Done when no live beam can still beat the worst finished one (all K finished slots filled).
        if bool((fin_score[:, -1] > alive_logp[:, 0] / best_possible_penalty).all()):
            break
    steps = int(fin_len.max())
    return GenerationOutput(fin_seq[:, 0, :steps], fin_score[:, 0], fin_logp[:, 0], fin_len[:, 0])


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_length: int = 64, num_beams: int = 1, alpha: float | None = None,
             eos_id: int | None = None, pad_id: int | None = None, start_id: int | None = None) -> GenerationOutput:
    """Greedy (num_beams=1) or beam search for an encoder-decoder model with `encode`/`decode_step`.

    `max_length` counts generated tokens (EOS included). `alpha` defaults to 0.6 with beams (T5 paper)."""
    cfg = model.config
    alpha = (0.6 if num_beams > 1 else 0.0) if alpha is None else float(alpha)
    _check(max_length, num_beams, alpha)
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    start_id = cfg.decoder_start_token_id if start_id is None else start_id
    was_training = model.training
    model.eval()
    try:
        stepper = Seq2SeqStepper(model, input_ids, attention_mask, expand=num_beams)
        return run_search(stepper, input_ids.shape[0], max_length, num_beams, alpha, start_id, eos_id, pad_id,
                          input_ids.device)
    finally:
        model.train(was_training)


def run_search(stepper: Stepper, batch_size: int, max_length: int, num_beams: int, alpha: float,
               start_id: int, eos_id: int, pad_id: int, device: torch.device) -> GenerationOutput:
    _check(max_length, num_beams, alpha)
    if num_beams == 1 and alpha == 0.0:
        return greedy_search(stepper, batch_size, max_length, start_id, eos_id, pad_id, device)
    return beam_search(stepper, batch_size, num_beams, max_length, alpha, start_id, eos_id, pad_id, device)
