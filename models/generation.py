"""`generate` with Hugging Face's arguments and meanings: greedy search, sampling, beam search (optionally
sampled), over the decoder's KV cache (static by default, models/kv_cache.py).

    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)               # greedy
    ids = model.generate(input_ids, attention_mask=mask, num_beams=4, num_return_sequences=2)
    ids = model.generate(input_ids, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids, return_dict_in_generate=True, output_scores=True)   # GenerateOutput
    ids = model.generate(input_ids, max_new_tokens=64, compile_step=True)   # CUDA graphs (models/compiled_step.py)

As in transformers, the result starts with the decoder start token and is padded after EOS; the options,
their defaults (a checkpoint's generation_config.json first) and their validation are in
models/generation_config.py, the logits processors in models/sampling.py. The one deliberate difference:
beam search ranks finished hypotheses by T5X's brevity penalty `log_prob / ((5 + length) / 6) **
length_penalty` (length counts EOS; `length_penalty` 0.6, the T5 paper's alpha), unless
`length_normalization="hf"` asks for transformers' `log_prob / length ** length_penalty`. docs/GENERATION.md.

Beam search follows transformers' rules step for step: the 2K best (or, sampling, 2K drawn) extensions of
the K live beams; an extension ending in EOS (or reaching the maximum length) joins the finished pool when
it ranks within the top K; the K best others stay live; `early_stopping` True stops an example when K
hypotheses are finished, False when the best live beam at its current length cannot beat the worst finished
one, "never" when it cannot at the maximum length either (the exact search, T5X's rule).

The searches run on a `Stepper`: something that feeds one token per row, returns next-token logits and keeps
its own cache, and can reorder its rows. `Seq2SeqStepper` adapts the encoder-decoder; the decoder-only models
(models/decoder_only.py) bring their own and call `run_search`.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from .compiled_step import compiled_step, resolve_mode, step_kernels
from .generation_config import GenerationConfig, check_names, resolve
from .kv_cache import StaticCache, reorder_dynamic
from .sampling import logits_processor

NEG_INF = -1.0e9  # transformers' "impossible" score: finite, so that score arithmetic never makes NaN


class Stepper(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...           # (N, 1) -> logits (N, V)
    def reorder(self, index: torch.Tensor) -> None: ...                 # keep rows `index` (N,)


class Seq2SeqStepper:
    """Encoder-decoder decoding state: the encoder output once, the decoder's KV cache per step.

    `cache_implementation` "static" preallocates the cache for `max_length` positions (written in place),
    "dynamic" grows it by torch.cat. `compile_step` (a mode of models/compiled_step.py, or None) runs the
    steps after the first through torch.compile over a whole-buffer static cache kept with the model;
    `close()` hands those buffers back. `full_length` (uncompiled static cache): attend over the whole buffer
    (True) or the written prefix (False); None: the device's default (models/kv_cache.py). `decode_kernels`:
    which kernels the steps run, "auto", "model", "reference" or "sdpa-attention" (models/compiled_step.py)."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, expand: int = 1,
                 cache_implementation: str = "dynamic", max_length: int | None = None,
                 compile_step: str | None = None, full_length: bool | None = None,
                 decode_kernels: str = "auto"):
        self.model = model
        encoder_hidden = model.encode(input_ids, attention_mask)
        if expand > 1:  # each example's row repeated once per beam / sample, the copies adjacent
            encoder_hidden = encoder_hidden.repeat_interleave(expand, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(expand, dim=0)
        self.encoder_hidden, self.attention_mask = encoder_hidden, attention_mask
        self.cache, self.compiled = None, None
        self.kernels = step_kernels(model, decode_kernels, encoder_hidden.device, compiled=False)
        if cache_implementation == "static" or compile_step is not None:
            if max_length is None:
                raise ValueError("Seq2SeqStepper: a static cache needs max_length")
            if cache_implementation != "static":
                raise ValueError(f"Seq2SeqStepper: compile_step={compile_step!r} needs the static cache, got "
                                 f"cache_implementation={cache_implementation!r}")
        if compile_step is not None:
            self.compiled = compiled_step(model, compile_step, encoder_hidden.shape[0], max_length,
                                          encoder_hidden, attention_mask, decode_kernels)
            self.cache = self.compiled.cache
        elif cache_implementation == "static":
            self.cache = StaticCache(model.config, encoder_hidden.shape[0], max_length, encoder_hidden.device,
                                     full_length)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled(tokens)
        logits, self.cache = self.model.decode_step(tokens, self.encoder_hidden, self.attention_mask, self.cache,
                                                    kernels=self.kernels)
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        if isinstance(self.cache, StaticCache):
            self.cache.reorder(index)   # in place, within the same buffers (a compiled step's static ones)
        else:
            self.cache = reorder_dynamic(self.cache, index)

    def close(self) -> None:
        if self.compiled is not None:
            self.compiled.end()


@dataclasses.dataclass
class GenerationOutput:
    """What a search returns (`run_search`): generated ids without the start token."""
    sequences: torch.Tensor          # (N, T) generated ids; pad after EOS
    scores: torch.Tensor             # (N,) sum of log-probs (greedy, sampling) / length-penalised score (beam)
    log_probs: torch.Tensor          # (N,) sum of the generated tokens' log-probs (EOS included)
    lengths: torch.Tensor            # (N,) generated tokens including EOS
    step_scores: tuple[torch.Tensor, ...] | None = None   # per step, the processed scores (output_scores)


@dataclasses.dataclass
class GenerateOutput:
    """`generate(..., return_dict_in_generate=True)`, fields named as transformers' output."""
    sequences: torch.Tensor                         # (B * num_return_sequences, 1 + T), start token first
    sequences_scores: torch.Tensor | None = None    # beams, with output_scores: the length-penalised score
    scores: tuple[torch.Tensor, ...] | None = None  # with output_scores: per step the processed scores
    log_probs: torch.Tensor | None = None           # ours: (N,) summed log-probs of the generated tokens
    lengths: torch.Tensor | None = None             # ours: (N,) generated tokens, EOS included


def brevity_penalty(length: torch.Tensor | float, alpha: float):
    """T5X's length normalisation ((5 + length) / 6) ** alpha (Wu et al. 2016)."""
    return ((5.0 + length) / 6.0) ** alpha


def length_normalizer(cfg: GenerationConfig):
    """length -> the divisor of a finished hypothesis' summed log-prob."""
    lp = float(cfg.length_penalty)
    if cfg.length_normalization == "hf":
        return lambda length: float(length) ** lp
    return lambda length: brevity_penalty(float(length), lp)


@torch.no_grad()
def sample_search(stepper: Stepper, cfg: GenerationConfig, rows: int, device: torch.device,
                  generator: torch.Generator | None = None) -> GenerationOutput:
    """Greedy search, or multinomial sampling (`cfg.do_sample`), one sequence per row."""
    process = logits_processor(cfg, num_beams=1)
    history = torch.full((rows, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    log_probs = torch.zeros(rows, dtype=torch.float32, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    step_scores = [] if cfg.output_scores else None
    for t in range(cfg.new_tokens()):
        logits = stepper.step(history[:, -1:]).float()
        scores = process(history, logits, t)
        if step_scores is not None:
            step_scores.append(scores)
        if cfg.do_sample:
            token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]
        else:
            token = scores.argmax(-1)
        token_log_prob = torch.log_softmax(logits, -1).gather(1, token[:, None])[:, 0]
        log_probs += token_log_prob.masked_fill(~unfinished, 0.0)
        lengths += unfinished.long()
        token = token.masked_fill(~unfinished, cfg.pad_token_id)  # rows that ended keep emitting padding
        history = torch.cat([history, token[:, None]], 1)
        unfinished &= token != cfg.eos_token_id
        if not bool(unfinished.any()):
            break
    return GenerationOutput(history[:, 1:], log_probs.clone(), log_probs, lengths,
                            None if step_scores is None else tuple(step_scores))


def _pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index[b, j]] for (B, W, ...) t and (B, J) index."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], index]


@torch.no_grad()
def beam_search(stepper: Stepper, cfg: GenerationConfig, batch_size: int, device: torch.device,
                generator: torch.Generator | None = None) -> GenerationOutput:
    """`stepper` holds batch_size * num_beams rows, the beams of one example adjacent. Returns the
    `num_return_sequences` best finished hypotheses per example, best first."""
    B, K, T = batch_size, cfg.num_beams, cfg.new_tokens()
    W = 2 * K  # candidates kept per step: enough that K live ones remain when K of them end
    process, normalize = logits_processor(cfg, num_beams=K), length_normalizer(cfg)
    rows = torch.arange(B, device=device)[:, None]
    run_seq = torch.full((B, K, 1 + T), cfg.pad_token_id, dtype=torch.long, device=device)
    run_seq[:, :, 0] = cfg.decoder_start_token_id
    run_score = torch.zeros((B, K), device=device)
    run_score[:, 1:] = NEG_INF  # one real beam at the start; copies would only fill the beam with duplicates
    fin_seq, fin_score = run_seq.clone(), torch.full((B, K), NEG_INF, device=device)
    fin_logp, fin_len = fin_score.clone(), torch.zeros((B, K), dtype=torch.long, device=device)
    fin_done = torch.zeros((B, K), dtype=torch.bool, device=device)
    improvable = torch.ones((B, 1), dtype=torch.bool, device=device)
    ranked = (torch.arange(W, device=device) < K)[None]
    step_scores = [] if cfg.output_scores else None
    for t in range(T):
        history = run_seq[:, :, : t + 1].reshape(B * K, t + 1)
        logp = process(history, torch.log_softmax(stepper.step(history[:, -1:]).float(), -1), t)  # (B*K, V)
        if step_scores is not None:
            step_scores.append(logp)
        vocab = logp.shape[-1]
        total = (logp.view(B, K, vocab) + run_score[..., None]).view(B, K * vocab)
        if cfg.do_sample:
            index = torch.multinomial(torch.softmax(total, -1), W, generator=generator)
            top, order = total.gather(1, index).sort(-1, descending=True)
            index = index.gather(1, order)
        else:
            top, index = total.topk(W, dim=1)                                   # (B, W), best first
        beam, token = index // vocab, index % vocab
        cand = _pick(run_seq, beam)                                             # (B, W, 1 + T)
        cand[:, :, t + 1] = token
        ends = (token == cfg.eos_token_id) | (t + 1 == T)
        # Live beams: the K best candidates that did not end.
        live = top + ends.float() * NEG_INF
        pick = live.topk(K, dim=1)[1]
        run_seq, run_score, source = _pick(cand, pick), _pick(live, pick), _pick(beam, pick)
        # Finished pool: candidates that ended within the top K, length-penalised, merged with the pool.
        just = ends & ranked
        score = top / normalize(t + 1)
        full = fin_done.all(1, keepdim=True) & (cfg.early_stopping is True)
        score = score + full.float() * NEG_INF + (~improvable).float() * NEG_INF + (~just).float() * NEG_INF
        merged = torch.cat([fin_score, score], 1)
        keep = merged.topk(K, dim=1)[1]
        fin_score = _pick(merged, keep)
        fin_seq = _pick(torch.cat([fin_seq, cand], 1), keep)
        fin_logp = _pick(torch.cat([fin_logp, top], 1), keep)
        fin_len = _pick(torch.cat([fin_len, torch.full_like(beam, t + 1)], 1), keep)
        fin_done = _pick(torch.cat([fin_done, just], 1), keep)
        stepper.reorder((rows * K + source).view(-1))
        # Can a live beam still beat the worst finished hypothesis? (transformers' heuristic per mode)
        best_length = T if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else t + 1
        best = run_score[:, :1] / normalize(best_length)
        worst = torch.where(fin_done, fin_score.min(1, keepdim=True)[0], NEG_INF)
        improvable = improvable & (best > worst).any(1, keepdim=True)
        all_full = bool(fin_done.all()) and cfg.early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ends.all()):
            break
    n = cfg.num_return_sequences
    steps = int(fin_len[:, :n].max())
    flat = lambda x: x[:, :n].reshape(B * n, *x.shape[2:])  # noqa: E731
    return GenerationOutput(flat(fin_seq)[:, 1: 1 + steps], flat(fin_score), flat(fin_logp), flat(fin_len),
                            None if step_scores is None else tuple(step_scores))


def search(stepper: Stepper, cfg: GenerationConfig, batch_size: int, device: torch.device,
           generator: torch.Generator | None = None) -> GenerationOutput:
    """Beam search when `cfg.num_beams > 1`, else greedy / sampling over the stepper's rows."""
    if cfg.num_beams > 1:
        return beam_search(stepper, cfg, batch_size, device, generator)
    rows = batch_size * (cfg.num_return_sequences if cfg.do_sample else 1)
    return sample_search(stepper, cfg, rows, device, generator)


def run_search(stepper: Stepper, batch_size: int, max_length: int, num_beams: int, alpha: float,
               start_id: int, eos_id: int, pad_id: int, device: torch.device) -> GenerationOutput:
    """The searches for a model-specific stepper (models/decoder_only.py): `max_length` generated tokens,
    greedy with one beam, else the exact beam search (early_stopping="never") with T5X's penalty `alpha`."""
    cfg = GenerationConfig(max_new_tokens=max_length, num_beams=num_beams, length_penalty=float(alpha),
                           early_stopping="never", decoder_start_token_id=start_id, eos_token_id=eos_id,
                           pad_token_id=pad_id)
    cfg.validate("run_search")
    return search(stepper, cfg, batch_size, device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             generation_config: GenerationConfig | dict | None = None, generator: torch.Generator | None = None,
             **kwargs) -> torch.Tensor | GenerateOutput:
    """Hugging Face's `generate` for our encoder-decoder (module doc; options in models/generation_config.py).

    Returns the (B * num_return_sequences, 1 + T) ids, start token first, pad after EOS; with
    `return_dict_in_generate=True` a `GenerateOutput`. `generator` seeds sampling (default: torch's global
    generator, which is what transformers draws from). An argument we do not implement is a TypeError."""
    check_names(kwargs, "generate()")
    cfg = resolve(model, kwargs, generation_config)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"generate(): input_ids must be a (batch, length) tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    expand = cfg.num_beams if cfg.num_beams > 1 else (cfg.num_return_sequences if cfg.do_sample else 1)
    mode = resolve_mode(cfg.compile_step, input_ids.device)
    was_training = model.training
    model.eval()
    stepper = None
    try:
        stepper = Seq2SeqStepper(model, input_ids, attention_mask, expand, cfg.cache_implementation,
                                 cfg.new_tokens(), compile_step=mode, decode_kernels=cfg.decode_kernels)
        out = search(stepper, cfg, input_ids.shape[0], input_ids.device, generator)
    finally:
        if stepper is not None:
            stepper.close()
        model.train(was_training)
    start = torch.full((out.sequences.shape[0], 1), cfg.decoder_start_token_id, dtype=torch.long,
                       device=out.sequences.device)
    sequences = torch.cat([start, out.sequences], 1)
    if not cfg.return_dict_in_generate:
        return sequences
    beams = cfg.num_beams > 1 and cfg.output_scores
    return GenerateOutput(sequences, out.scores if beams else None, out.step_scores, out.log_probs, out.lengths)
