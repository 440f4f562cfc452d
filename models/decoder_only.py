"""The T5 paper's single-stack architectures (section 3.2.1, figure 4): a decoder-only language model
(causal attention everywhere) and a prefix LM (fully visible attention over a per-row prefix, causal
after it), built from the encoder-decoder's own modules so the architecture comparison runs on one
code base and one engine.

    model = DecoderOnlyLM(T5Config.from_preset("tiny"), prefix_lm=True)
    batch = lm_batch([(inputs_ids, target_ids), ...])         # text-to-text pair -> one sequence
    out = model(**batch)                                     # out.loss only over the targets
    out = generate_lm(model, prompts, max_length=32)         # greedy / beam search, KV cache

The stack is `models.t5.T5Stack`'s blocks without cross-attention (self-attention + FFN, pre-norm,
relative position bias from block 0), the shared embedding and the head (tied and scaled for v1.0,
untied for v1.1). Position buckets are unidirectional for the LM and bidirectional for the prefix LM,
whose prefix sees later positions. The block loop is written here because `T5Block` returns a KV cache
only for decoder blocks; the sub-modules and their numerics are the model's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import T5Config
from .generation import GenerationOutput, run_search
from .attention_spec import AttentionSpec, build_attention_spec
from .backends import Kernels, choose_kernels
from .t5 import T5ForConditionalGeneration, T5Stack

SelfCache = tuple[torch.Tensor, torch.Tensor]  # per layer (k, v), each (B, H, L, D)


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: list[SelfCache] | None = None


class DecoderOnlyLM(nn.Module):
    def __init__(self, config: T5Config, prefix_lm: bool = False):
        super().__init__()
        self.config = config
        self.prefix_lm = prefix_lm
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.decoder = T5Stack(config, cross_attention=False)  # config.num_layers blocks: self-attention + FFN
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    # The encoder-decoder's init, applied to the modules this model shares with it.
    init_weights = T5ForConditionalGeneration.init_weights
    init_order = T5ForConditionalGeneration.init_order
    init_module = T5ForConditionalGeneration.init_module

    def _spec(self, kernels: Kernels, x, q_len, kv_len, key_padding_mask, prefix_lengths, positions,
              kv_positions) -> AttentionSpec:
        # Causal everywhere; the prefix LM also sees its whole prefix, hence bidirectional buckets.
        return build_attention_spec(self.config, kernels, x, table=self.decoder.bias_table, q_len=q_len,
                                    kv_len=kv_len, bidirectional=self.prefix_lm, causal=True,
                                    key_padding_mask=key_padding_mask,
                                    prefix_lengths=prefix_lengths if self.prefix_lm else None,
                                    q_positions=positions, kv_positions=kv_positions)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prefix_lengths: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, past_key_values: list[SelfCache] | None = None,
                past_positions: torch.Tensor | None = None, use_cache: bool = False) -> LMOutput:
        """`labels[b, t]` is the token expected after position t (-100: no loss). `attention_mask` covers
        the cached and the new positions; `positions` (B, L_new) default to past_len + arange, and
        `past_positions` (B, past_len) are those of the cached keys (default arange)."""
        if self.prefix_lm and prefix_lengths is None and past_key_values is None:
            raise ValueError("DecoderOnlyLM(prefix_lm=True) needs prefix_lengths (B,)")
        x = self.shared(input_ids)
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        q_len = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(past_len, past_len + q_len, device=x.device)[None].expand(x.shape[0], -1)
        if past_key_values is not None and past_positions is None:
            past_positions = torch.arange(past_len, device=x.device)[None].expand(x.shape[0], -1)
        kv_positions = positions if past_key_values is None else torch.cat([past_positions, positions], 1)
        kernels = choose_kernels(self.config, x.device)
        spec = self._spec(kernels, x, q_len, past_len + q_len, attention_mask, prefix_lengths, positions, kv_positions)
        hidden, caches = self.decoder(x, kernels, spec, past=past_key_values, use_cache=use_cache)
        if self.config.tie_word_embeddings:
            logits = F.linear(hidden * self.config.d_model ** -0.5, self.shared.weight)
        else:
            logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return LMOutput(logits, loss, caches)


def lm_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int = 0, loss_on_inputs: bool = False) -> dict:
    """Text-to-text pairs as single sequences `inputs + targets` (right padded): prefix_lengths = len(inputs);
    labels predict the next token, only over the targets unless `loss_on_inputs` (the plain LM objective)."""
    width = max(len(i) + len(t) for i, t in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (inputs, targets) in enumerate(pairs):
        seq = list(inputs) + list(targets)
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        first = 0 if loss_on_inputs else max(len(inputs) - 1, 0)  # the last input position predicts target 0
        labels[row, first: len(seq) - 1] = torch.tensor(seq[first + 1:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prefix_lengths": torch.tensor([len(i) for i, _ in pairs])}


class DecoderOnlyStepper:
    """Prompts left-padded to one width so every row's next token sits at the same column; positions
    count from each row's first real token, so padding changes nothing."""

    def __init__(self, model: DecoderOnlyLM, prompts: list[list[int]], expand: int = 1, pad_id: int = 0):
        device = model.shared.weight.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.repeat_interleave(expand, 0), mask.repeat_interleave(expand, 0)
        self.model, self.mask = model, mask
        self.lengths = mask.sum(1)
        self.positions = (mask.cumsum(1) - 1).clamp(min=0)
        # The attention kernels take the prefix as a count of key COLUMNS; left-padded, every row's
        # prompt spans the same `width` columns (padding columns are masked as keys anyway).
        self.prefix = torch.full_like(self.lengths, width)
        self.prompt, self.cache = ids, None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        # The prompt is the fully visible prefix of a prefix LM; the plain LM ignores prefix_lengths.
        if self.cache is None:  # the whole prompt at once; `tokens` (the start id) is not used
            out = self.model(self.prompt, self.mask, prefix_lengths=self.prefix, positions=self.positions,
                             use_cache=True)
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(tokens)], 1)
            new = self.positions[:, -1:] + 1
            out = self.model(tokens, self.mask, prefix_lengths=self.prefix, positions=new,
                             past_key_values=self.cache, past_positions=self.positions, use_cache=True)
            self.positions = torch.cat([self.positions, new], 1)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)


@torch.no_grad()
def generate_lm(model: DecoderOnlyLM, prompts: list[list[int]], *, max_length: int = 32, num_beams: int = 1,
                alpha: float | None = None) -> GenerationOutput:
    """Continue each prompt (greedy or beam search over the KV cache) until EOS or `max_length` tokens."""
    cfg = model.config
    alpha = (0.6 if num_beams > 1 else 0.0) if alpha is None else float(alpha)
    was_training = model.training
    model.eval()
    try:
        stepper = DecoderOnlyStepper(model, prompts, expand=num_beams, pad_id=cfg.pad_token_id)
        return run_search(stepper, len(prompts), max_length, num_beams, alpha, cfg.pad_token_id,
                          cfg.eos_token_id, cfg.pad_token_id, model.shared.weight.device)
    finally:
        model.train(was_training)
