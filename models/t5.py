"""T5 (v1.0 and v1.1) encoder-decoder: our own implementation, parameter names as in Hugging Face.

Architecture (docs/T5.md): pre-norm blocks `x + SubLayer(RMSNorm(x))`, no biases, no
1/sqrt(d) attention scaling, a learned relative position bias owned by the first block of each stack and
reused by every block (UMT5: one per block), ReLU FFN (v1.0, tied head scaled by d_model**-0.5) or gated-GELU (v1.1).

Kernels: `self.kernels(device)` (models/backends.py) picks the Triton kernels or their PyTorch
references once per call from `config.kernel_backend` and the device, and the choice is passed down to
every stack, block and sub-layer. The references materialise the attention bias + mask ONCE per stack
(models/attention_spec.py); the flash kernel gets the bias table and masking arguments in every layer.
Residual adds are fused with the next RMSNorm (`add_rms_norm`); in fp16 they saturate (`saturate_fp16`).

    model = T5ForConditionalGeneration(T5Config.from_preset("t5-v1_1-small"))
    out = model(input_ids=..., attention_mask=..., labels=...)   # out.loss, out.logits
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention_spec import AttentionSpec, build_attention_spec
from .backends import Kernels, choose_kernels
from .config import T5Config
from .kv_cache import StaticCache, attention_geometry, cross_kv, extend_self, reorder_rows

LayerCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (self_k, self_v, cross_k, cross_v)


# ------------------------------------------------------------------------------ small functions
_FP16_MAX = torch.finfo(torch.float16).max


def saturate_fp16(t: torch.Tensor) -> torch.Tensor:
    """Clamp an fp16 tensor to the finite fp16 range (inf -> +-65504); other dtypes pass through untouched.

    T5's fp16 overflow trap (docs/T5.md): the FFN output `wo` can exceed 65,504, and an inf in the residual
    stream turns every later norm into NaN. Saturating instead keeps the forward finite; the clamped
    elements get no gradient.
    """
    return t.clamp(-_FP16_MAX, _FP16_MAX) if t.dtype == torch.float16 else t


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder inputs from labels: shifted one to the right, `start_id` first, -100 -> pad.

    With packing (`segment_ids`), every segment restarts with `start_id` (docs/T5.md: decoder inputs restart
    with 0 at each segment start), so no target token leaks into the next example.
    """
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    if segment_ids is not None:
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        shifted = shifted.masked_fill(starts, start_id)
    return shifted.masked_fill(shifted == -100, pad_id)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-segment positions 0, 1, ... restarting wherever the segment id changes. (B, L) long."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start_idx


# ------------------------------------------------------------------------------------- modules
class T5LayerNorm(nn.Module):
    """RMSNorm with T5's numerics; `forward(x, delta, kernels)` also adds a pending residual delta first."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(config.d_model))

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None,
                kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, stream) with stream = x + delta (x when delta is None)."""
        eps = self.config.layer_norm_epsilon
        if delta is None:
            return kernels.rms_norm(x, self.weight, eps), x
        if torch.float16 in (x.dtype, delta.dtype):
            # fp16: saturate the sub-layer output and the sum before normalising (unfused add).
            stream = saturate_fp16(x + saturate_fp16(delta))
            return kernels.rms_norm(stream, self.weight, eps), stream
        return kernels.add_rms_norm(delta, x, self.weight, eps)


class T5Attention(nn.Module):
    """Multi-head attention without biases or scaling; the relative bias table lives in block 0 only.

    The projections run as wide GEMMs: self-attention's q, k and v as one `qkv` (3 * inner, d_model),
    cross-attention's k and v (both from the encoder output) as one `kv`; models/hf_checkpoint.py splits and
    merges them under Hugging Face's names `q`, `k`, `v`.
    """

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, cross: bool = False):
        super().__init__()
        self.config = config
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.cross = cross
        inner = config.inner_dim
        if cross:
            self.q = nn.Linear(config.d_model, inner, bias=False)
            self.kv = nn.Linear(config.d_model, 2 * inner, bias=False)
        else:
            self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the q, k and v weights (inner, d_model) inside the fused ones."""
        if self.cross:
            return (self.q.weight, *self.kv.weight.chunk(2, dim=0))
        return tuple(self.qkv.weight.chunk(3, dim=0))

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, L, parts * H * D) -> `parts` views (B, H, L, D) (strided: the kernels and SDPA take them)."""
        x = x.view(x.shape[0], x.shape[1], parts, self.num_heads, self.d_kv)
        return tuple(x[:, :, i].transpose(1, 2) for i in range(parts))

    def forward(self, x: torch.Tensor, spec: AttentionSpec, kv_input: torch.Tensor | None = None,
                past: Any = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Self-attention, or cross-attention over `kv_input`. `past`: the layer's cache (models/kv_cache.py:
        a (self_k, self_v[, cross_k, cross_v]) tuple or a StaticCache layer); self-attention appends the new
        keys to it, cross-attention reuses its keys (the encoder output is fixed)."""
        if self.cross:
            (q,) = self._heads(self.q(x), 1)
            k, v = cross_kv(past, lambda: self._heads(self.kv(kv_input), 2))
        else:
            q, k, v = self._heads(self.qkv(x), 3)
            k, v = extend_self(past, k, v)
        dropout = self.config.dropout_rate if self.training else 0.0
        if spec.kernel is not None:
            # Attention dropout runs inside the kernel (mask regenerated in backward from a per-call seed).
            out = spec.kernel(q, k, v, spec.table, dropout_p=dropout, training=self.training, **spec.kernel_kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=spec.bias, dropout_p=dropout, scale=1.0)
            if spec.row_valid is not None:
                out = out * spec.row_valid
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)                  # (B, Lq, H*D)
        return self.o(out), (k, v)


class T5DenseReluDense(nn.Module):
    """FFN. Gated: one fused `wi_fused` = cat([wi_0, wi_1]) (2*d_ff, d_model) so both run as one matmul."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        if config.is_gated:
            self.wi_fused = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        cfg = self.config
        wi = self.wi_fused.weight if cfg.is_gated else self.wi.weight
        # fp16 safety (docs/T5.md): when `wo` is kept in fp32 (`to_dtype(torch.float16)`), the hidden state is
        # cast to fp32 before `wo` and the output stays fp32, so the residual stream cannot overflow.
        return kernels.ffn(x, wi, self.wo.weight, gated=cfg.is_gated,
                           activation="gelu_tanh" if cfg.is_gated else "relu", dropout_p=cfg.dropout_rate,
                           training=self.training)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config)
        self.dropout = nn.Dropout(config.dropout_rate)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, cross=True)
        self.layer_norm = T5LayerNorm(config)
        self.dropout = nn.Dropout(config.dropout_rate)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config)
        self.dropout = nn.Dropout(config.dropout_rate)


class T5Block(nn.Module):
    """layer.0 self-attention, [layer.1 cross-attention,] then the FFN, each pre-norm with residual.

    The residual stream travels as (stream, delta): the block's input stream is `stream + delta`, the
    add being fused into the first norm; the block returns its last sub-layer output as the new delta.
    """

    def __init__(self, config: T5Config, cross_attention: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.cross_attention = cross_attention
        layers: list[nn.Module] = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if cross_attention:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)

    def forward(self, stream: torch.Tensor, delta: torch.Tensor | None, kernels: Kernels, self_spec: AttentionSpec,
                cross_spec: AttentionSpec | None = None, encoder_hidden: torch.Tensor | None = None,
                past: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor, LayerCache | None]:
        attn = self.layer[0]
        normed, stream = attn.layer_norm(stream, delta, kernels)
        out, self_kv = attn.SelfAttention(normed, self_spec, past=past)
        delta = attn.dropout(out)
        cache = self_kv  # a decoder-only stack (models/decoder_only.py) caches self-attention only
        if self.cross_attention:
            cross = self.layer[1]
            normed, stream = cross.layer_norm(stream, delta, kernels)
            out, enc_kv = cross.EncDecAttention(normed, cross_spec, kv_input=encoder_hidden, past=past)
            delta = cross.dropout(out)
            cache = (*self_kv, *enc_kv)
        ff = self.layer[-1]
        normed, stream = ff.layer_norm(stream, delta, kernels)
        return stream, ff.dropout(ff.DenseReluDense(normed, kernels)), cache


class T5Stack(nn.Module):
    """Encoder or decoder: blocks, final RMSNorm, dropout. Embeddings are the model's shared table."""

    def __init__(self, config: T5Config, cross_attention: bool):
        super().__init__()
        self.config = config
        self.cross_attention = cross_attention   # the encoder-decoder's decoder stack
        n = config.num_decoder_layers if cross_attention else config.num_layers
        self.block = nn.ModuleList(T5Block(config, cross_attention, has_relative_attention_bias=i == 0  # UMT5: in all
                                           or config.per_layer_position_bias) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = config.gradient_checkpointing

    @property
    def bias_table(self) -> torch.Tensor:
        """(num_buckets, H) relative bias table, owned by block 0 and shared by every block."""
        return self.block[0].layer[0].SelfAttention.relative_attention_bias.weight

    def layer_specs(self, spec_for: Callable[[torch.Tensor], AttentionSpec]) -> list[AttentionSpec]:
        """Every block's self-attention spec from `spec_for(bias table)`: one shared (T5), or each block's own."""
        if not self.config.per_layer_position_bias:
            return [spec_for(self.bias_table)] * len(self.block)
        return [spec_for(b.layer[0].SelfAttention.relative_attention_bias.weight) for b in self.block]

    def forward(self, embeds: torch.Tensor, kernels: Kernels, self_spec: AttentionSpec | list[AttentionSpec],
                cross_spec: AttentionSpec | None = None, encoder_hidden: torch.Tensor | None = None,
                past: list[LayerCache] | None = None, use_cache: bool = False
                ) -> tuple[torch.Tensor, list[LayerCache] | None]:
        stream, delta = self.dropout(embeds), None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        caches: list[LayerCache] | None = [] if use_cache else None
        for i, block in enumerate(self.block):
            spec = self_spec[i] if isinstance(self_spec, list) else self_spec
            args = (stream, delta, kernels, spec, cross_spec, encoder_hidden, None if past is None else past[i])
            if recompute:
                # Non-reentrant checkpointing restores the RNG state, so dropout masks match on recompute.
                stream, delta, cache = checkpoint(block, *args, use_reentrant=False)
            else:
                stream, delta, cache = block(*args)
            if caches is not None:
                caches.append(cache)
        normed, _ = self.final_layer_norm(stream, delta, kernels)
        return self.dropout(normed), caches


@dataclass
class Seq2SeqLMOutput:
    logits: torch.Tensor                                   # (B, L_tgt, vocab)
    loss: torch.Tensor | None = None                       # mean cross-entropy over labels != -100
    past_key_values: list[LayerCache] | None = None        # per decoder layer (self_k, self_v, cross_k, cross_v)
    encoder_last_hidden_state: torch.Tensor | None = None  # (B, L_in, d_model)


def _encoder_hidden(encoder_outputs: Any) -> torch.Tensor:
    """Accepts a tensor, our output object, or Hugging Face's (`.last_hidden_state` / tuple)."""
    if isinstance(encoder_outputs, torch.Tensor):
        return encoder_outputs
    for attr in ("last_hidden_state", "encoder_last_hidden_state"):
        if getattr(encoder_outputs, attr, None) is not None:
            return getattr(encoder_outputs, attr)
    return encoder_outputs[0]


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, cross_attention=False)
        self.decoder = T5Stack(config, cross_attention=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    # ----------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_weights(self) -> None:
        """The T5 init (Mesh-TF's, as Hugging Face's `_init_weights` reproduces it): per module type a
        normal with std `factor * fan_in**-0.5`, where q also absorbs the missing 1/sqrt(d_kv) scaling."""
        for module in self.init_order():
            self.init_module(module)

    def init_order(self) -> list[nn.Module]:
        """The modules `init_module` writes, in the order of their random draws. Each step writes only
        that module's parameters (children included): a sharded model gathers one module per step."""
        kinds = (T5LayerNorm, T5Attention, T5DenseReluDense)
        order = [m for m in self.modules() if isinstance(m, kinds)] + [self.shared]
        return order if self.config.tie_word_embeddings else order + [self.lm_head]

    @torch.no_grad()
    def init_module(self, m: nn.Module) -> None:
        cfg, f = self.config, self.config.initializer_factor
        d = cfg.d_model
        if isinstance(m, T5LayerNorm):
            m.weight.fill_(f)
        elif isinstance(m, T5Attention):
            q, k, v = m.projection_weights()  # views into the fused weights, drawn in Hugging Face's order
            q.normal_(0.0, f * (d * cfg.d_kv) ** -0.5)
            k.normal_(0.0, f * d ** -0.5)
            v.normal_(0.0, f * d ** -0.5)
            m.o.weight.normal_(0.0, f * cfg.inner_dim ** -0.5)
            if hasattr(m, "relative_attention_bias"):
                m.relative_attention_bias.weight.normal_(0.0, f * d ** -0.5)
        elif isinstance(m, T5DenseReluDense):
            (m.wi_fused if cfg.is_gated else m.wi).weight.normal_(0.0, f * d ** -0.5)
            m.wo.weight.normal_(0.0, f * cfg.d_ff ** -0.5)
        elif m is self.shared:
            m.weight.normal_(0.0, f)
        elif m is getattr(self, "lm_head", None):
            # Mesh-TF's untied logits layer is a fan-in-scaled dense (std d_model**-0.5). Hugging Face uses
            # std 1.0 here, which starts training at a loss of ~200 (docs/MACHINE_NOTES.md); we keep Mesh-TF's.
            m.weight.normal_(0.0, f * d ** -0.5)
        else:
            raise ValueError(f"init_module: {type(m).__name__} is not in init_order()")

    def gradient_checkpointing_enable(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = False

    def to_dtype(self, dtype: torch.dtype) -> "T5ForConditionalGeneration":
        """Cast parameters; for fp16 the FFN output projections `wo` stay fp32 (T5 overflows fp16 there)."""
        self.to(dtype)
        if dtype == torch.float16:
            for m in self.modules():
                if isinstance(m, T5DenseReluDense):
                    m.wo.float()
        return self

    @classmethod
    def from_pretrained(cls, directory, **kwargs: Any) -> "T5ForConditionalGeneration":
        """See `models.hf_checkpoint.from_pretrained` (Hugging Face layout)."""
        from .hf_checkpoint import from_pretrained

        return from_pretrained(directory, **kwargs)

    def save_pretrained(self, directory, **kwargs: Any) -> None:
        """See `models.hf_checkpoint.save_pretrained`: a directory `transformers` loads."""
        from .hf_checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    def kernels(self, device: torch.device) -> Kernels:
        """The kernels this model runs for activations on `device` (models/backends.py); an error when
        `config.kernel_backend = "triton"` cannot run there."""
        return choose_kernels(self.config, device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------ stacks
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, L_in, d_model). Packed rows pass segment ids (0 = padding) and positions."""
        embeds = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        if segment_ids is not None and positions is None:
            positions = segment_positions(segment_ids)
        length = input_ids.shape[1]
        kernels = self.kernels(embeds.device)
        spec = self.encoder.layer_specs(lambda table: build_attention_spec(
            self.config, kernels, embeds, table=table, q_len=length, kv_len=length, bidirectional=True,
            key_padding_mask=attention_mask, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
            q_positions=positions, kv_positions=positions))
        hidden, _ = self.encoder(embeds, kernels, spec)
        return hidden

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
               encoder_segment_ids: torch.Tensor | None = None, decoder_segment_ids: torch.Tensor | None = None,
               decoder_positions: torch.Tensor | None = None, past_key_values: Any = None,
               use_cache: bool = False, inputs_embeds: torch.Tensor | None = None,
               kernels: Kernels | None = None) -> tuple[torch.Tensor, Any]:
        """Decoder output (B, L_new, d_model) for `decoder_input_ids` following `past_key_values`: a list of
        per-layer tuples (grown by torch.cat) or a `StaticCache` (written in place and returned). `kernels`:
        instead of `self.kernels(device)` (models/compiled_step.py runs the references under torch.compile)."""
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("packed inputs need both encoder_segment_ids and decoder_segment_ids")
        embeds = self.shared(decoder_input_ids) if inputs_embeds is None else inputs_embeds
        if decoder_segment_ids is not None and decoder_positions is None:
            decoder_positions = segment_positions(decoder_segment_ids)
        cfg, q_len = self.config, decoder_input_ids.shape[1]
        kernels = self.kernels(embeds.device) if kernels is None else kernels
        static = isinstance(past_key_values, StaticCache)
        # (a whole-buffer static cache: no Python count inside a step; positions are a device tensor)
        past_len, kv_len, q_positions = attention_geometry(past_key_values, q_len, kernels.attention is not None)
        if decoder_attention_mask is not None and decoder_attention_mask.shape[1] != (past_len or 0) + q_len:
            raise ValueError(f"decoder_attention_mask has length {decoder_attention_mask.shape[1]}; with "
                             f"{past_len} cached positions it must cover {(past_len or 0) + q_len}")
        q_positions = decoder_positions if decoder_positions is not None else q_positions
        self_spec = self.decoder.layer_specs(lambda table: build_attention_spec(
            cfg, kernels, embeds, table=table, q_len=q_len, kv_len=kv_len, bidirectional=False, causal=True,
            key_padding_mask=decoder_attention_mask, q_segment_ids=decoder_segment_ids,
            kv_segment_ids=decoder_segment_ids, q_positions=q_positions, kv_positions=decoder_positions,
            q_offset=past_len or 0))
        cross_spec = build_attention_spec(cfg, kernels, embeds, table=None, q_len=q_len,
                                          kv_len=encoder_hidden.shape[1], key_padding_mask=attention_mask,
                                          q_segment_ids=decoder_segment_ids, kv_segment_ids=encoder_segment_ids)
        if not static:
            return self.decoder(embeds, kernels, self_spec, cross_spec, encoder_hidden, past_key_values, use_cache)
        hidden, _ = self.decoder(embeds, kernels, self_spec, cross_spec, encoder_hidden, past_key_values.layers)
        past_key_values.advance(q_len)
        return hidden, past_key_values

    def lm_logits(self, decoder_hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            # v1.0 ties the head to the input embedding and rescales, since that table has std 1.
            return F.linear(decoder_hidden * self.config.d_model ** -0.5, self.shared.weight)
        return self.lm_head(decoder_hidden)

    def decode_step(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                    kernels: Kernels | None = None) -> tuple[Any, Any]:
        """Incremental decoding: logits (B, L_new, vocab) of the new tokens and the cache (models/kv_cache.py).

        The first call computes each layer's cross-attention K/V from `encoder_hidden`; later calls reuse
        them and add the new self-attention K/V (in place into a `StaticCache`, by torch.cat otherwise).
        """
        hidden, cache = self.decode(decoder_input_ids, encoder_hidden, attention_mask,
                                    past_key_values=past_key_values, use_cache=True, kernels=kernels)
        return self.lm_logits(hidden), cache

    reorder_cache = staticmethod(reorder_rows)  # every cached tensor's rows (models/kv_cache.py)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Hugging Face's `generate` arguments and meanings (greedy, beam search with T5X's length penalty,
        sampling; `generator=` seeds it): see `models.generation.generate` and docs/GENERATION.md."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ----------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, encoder_segment_ids: torch.Tensor | None = None,
                encoder_positions: torch.Tensor | None = None, decoder_segment_ids: torch.Tensor | None = None,
                decoder_positions: torch.Tensor | None = None, encoder_outputs: Any = None,
                past_key_values: list[LayerCache] | None = None, use_cache: bool = False) -> Seq2SeqLMOutput:
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id,
                                            decoder_segment_ids)
        dec_embeds = None
        if encoder_outputs is not None:
            encoder_hidden = _encoder_hidden(encoder_outputs)
        elif input_ids is not None:
            # One lookup for both stacks: the embedding backward then zero-fills and adds ONE
            # (vocab, d_model) gradient instead of two (~10% of a small model's CPU step).
            ids = torch.cat([input_ids.flatten(), decoder_input_ids.flatten()])
            enc_embeds, dec_embeds = self.shared(ids).split([input_ids.numel(), decoder_input_ids.numel()])
            encoder_hidden = self.encode(input_ids, attention_mask, encoder_segment_ids, encoder_positions,
                                         inputs_embeds=enc_embeds.view(*input_ids.shape, -1))
            dec_embeds = dec_embeds.view(*decoder_input_ids.shape, -1)
        else:
            raise ValueError("forward needs input_ids or encoder_outputs")
        hidden, cache = self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask,
                                    encoder_segment_ids, decoder_segment_ids, decoder_positions, past_key_values,
                                    use_cache, inputs_embeds=dec_embeds)
        logits = self.lm_logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(logits=logits, loss=loss, past_key_values=cache,
                               encoder_last_hidden_state=encoder_hidden)
