"""`T5Config`: the architecture of one T5 model, its presets, parameter count and training FLOPs.

Field names are Hugging Face's (so `config.json` files map one to one); `kernel_backend` and
`gradient_checkpointing` are ours. Sizes of the presets: docs/T5.md.

    cfg = T5Config.from_preset("t5-v1_1-base")
    cfg.num_parameters()            # 247,577,856
    cfg.flops_per_token(512, 114)   # training FLOPs per (input + target) token, for MFU
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FEED_FORWARD_PROJS = ("relu", "gated-gelu")
# The T5 family's Hugging Face model types and their classes. mT5 is the v1.1 layout (untied, unscaled head);
# UMT5 is too, with a relative position bias table in every block instead of block 0's shared by all.
MODEL_TYPES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
               "umt5": "UMT5ForConditionalGeneration"}
KERNEL_BACKENDS = ("auto", "torch", "triton")


@dataclass
class T5Config:
    vocab_size: int = 32128                  # 32,000 SentencePiece pieces + 100 sentinels, rounded up to 128
    d_model: int = 512                       # width of the residual stream
    d_kv: int = 64                           # width of one attention head (need not be d_model / num_heads)
    d_ff: int = 2048                         # FFN hidden width (per branch for gated-gelu)
    num_layers: int = 6                      # encoder blocks
    num_decoder_layers: int | None = None    # decoder blocks; None = same as the encoder
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1                # residual, attention-prob and FFN-hidden dropout (0 in v1.1 pretraining)
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"          # "relu" (T5 v1.0) or "gated-gelu" (v1.1, GeGLU with tanh GELU)
    tie_word_embeddings: bool = True         # v1.0: head = shared embedding, decoder output scaled by d_model**-0.5
    initializer_factor: float = 1.0          # scales every init std (HF's knob; 1.0 for real training)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0          # decoder inputs = labels shifted right, starting with pad
    kernel_backend: str = "auto"             # "auto": Triton for CUDA tensors when importable, else PyTorch
    gradient_checkpointing: bool = False     # recompute each block in backward (activation memory ~ 1 block)
    model_type: str = "t5"                   # "t5" (Flan-T5 and ByT5 too), "mt5", "umt5" (see MODEL_TYPES)

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        self._validate()

    # ----------------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"T5Config.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        if (not isinstance(self.num_decoder_layers, int) or isinstance(self.num_decoder_layers, bool)
                or self.num_decoder_layers < 1):
            fail("num_decoder_layers", "must be a positive integer (or None for num_layers)")
        nb = self.relative_attention_num_buckets
        # Bidirectional bucketing halves the buckets twice (sign, then exact/log), so 4 is the minimum.
        if not isinstance(nb, int) or nb < 4:
            fail("relative_attention_num_buckets", "must be an integer >= 4")
        # The log buckets divide by log(max_distance / max_exact); max_exact is at most num_buckets // 2.
        if not isinstance(self.relative_attention_max_distance, int) or self.relative_attention_max_distance <= nb // 2:
            fail("relative_attention_max_distance", f"must be an integer > relative_attention_num_buckets // 2 = {nb // 2}")
        if not isinstance(self.dropout_rate, (int, float)) or not 0.0 <= self.dropout_rate < 1.0:
            fail("dropout_rate", "must be a number in [0, 1)")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            fail("layer_norm_epsilon", "must be > 0")
        if not isinstance(self.initializer_factor, (int, float)) or not self.initializer_factor > 0:
            fail("initializer_factor", "must be > 0")
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            fail("feed_forward_proj", f"unsupported; expected one of {', '.join(FEED_FORWARD_PROJS)}")
        if self.model_type not in MODEL_TYPES:
            fail("model_type", f"expected one of {', '.join(MODEL_TYPES)}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            fail("kernel_backend", f"expected one of {', '.join(KERNEL_BACKENDS)}")
        for name in ("tie_word_embeddings", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                fail(name, f"must be a token id in [0, vocab_size={self.vocab_size})")

    def replace(self, **changes: Any) -> "T5Config":
        """A copy with some fields changed (validated again); unknown names raise a clear error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"T5Config has no field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "T5Config":
        if name not in PRESETS:
            raise ValueError(f"unknown T5 preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name]).replace(**overrides) if overrides else cls(**PRESETS[name])

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @property
    def per_layer_position_bias(self) -> bool:
        """UMT5: every block has its own relative position bias table."""
        return self.model_type == "umt5"

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads (q/k/v output, o input)."""
        return self.num_heads * self.d_kv

    # --------------------------------------------------------------------------- size and cost
    def _attention_params(self) -> int:
        return 4 * self.d_model * self.inner_dim                              # q, k, v, o; no biases

    def _ffn_params(self) -> int:
        return (3 if self.is_gated else 2) * self.d_model * self.d_ff        # wi(_0, _1), wo

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Exact count of the model's parameters (a tied head is counted once), without building it."""
        d, table = self.d_model, self.relative_attention_num_buckets * self.num_heads
        tables = (self.num_layers, self.num_decoder_layers) if self.per_layer_position_bias else (1, 1)
        encoder = self.num_layers * (self._attention_params() + self._ffn_params() + 2 * d) + tables[0] * table + d
        decoder = (self.num_decoder_layers * (2 * self._attention_params() + self._ffn_params() + 3 * d)
                   + tables[1] * table + d)
        total = encoder + decoder
        if include_embedding:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    def flops_per_sequence(self, inputs_length: int = 512, targets_length: int = 114) -> int:
        """Training FLOPs (forward + backward = 3x forward) of one example, matmuls and attention only.

        Forward, with Li = inputs_length, Lt = targets_length, F = FFN matmul params, A = attention
        projection params per attention (4 * d_model * inner_dim):
          encoder:  2 * Li * (A + F) per layer            + attention 4 * Li^2 * inner_dim per layer
          decoder:  2 * Lt * (A + A/2 + F) per layer      (self-attention; cross q and o run on targets)
                  + 2 * Li * A/2 per layer                (cross k and v run once over the encoder output)
                  + attention 4 * (Lt^2 + Lt * Li) * inner_dim per layer
          head:     2 * Lt * d_model * vocab_size
        Norms, softmax and the embedding lookup are negligible and left out. Backward costs 2x forward.
        The full causal Lt^2 is counted, as implementations compute it (PaLM's MFU convention).
        Counting cross k/v over the encoder length is exact; the common "6 * N * tokens" shortcut counts
        them over the targets and gives ~0.39 TFLOP for v1.1-base at 512/114 (docs/ANCHORS.md) where this
        gives ~0.43 TFLOP.
        """
        li, lt, inner = inputs_length, targets_length, self.inner_dim
        a, f = self._attention_params(), self._ffn_params()
        encoder = self.num_layers * (2 * li * (a + f) + 4 * li * li * inner)
        decoder = self.num_decoder_layers * (2 * lt * (a + a // 2 + f) + 2 * li * (a // 2)
                                             + 4 * (lt * lt + lt * li) * inner)
        head = 2 * lt * self.d_model * self.vocab_size
        return 3 * (encoder + decoder + head)

    def flops_per_token(self, inputs_length: int = 512, targets_length: int = 114) -> float:
        """Training FLOPs per token, where a sequence has inputs_length + targets_length tokens.

        MFU = tokens_per_second * flops_per_token(...) / peak_flops, counting input AND target tokens.
        """
        return self.flops_per_sequence(inputs_length, targets_length) / (inputs_length + targets_length)

    # --------------------------------------------------------------------- Hugging Face config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that `transformers.T5ForConditionalGeneration.from_pretrained` reads."""
        out = {name: getattr(self, name) for name in _HF_FIELDS}
        out.update(architectures=[MODEL_TYPES[self.model_type]], model_type=self.model_type, is_encoder_decoder=True,
                   dense_act_fn="gelu_new" if self.is_gated else "relu", is_gated_act=self.is_gated)
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "T5Config":
        """Our config from a Hugging Face T5-family `config.json` dict; architectures we do not run are refused."""
        model_type = hf.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json model_type={model_type!r}: supported are {', '.join(MODEL_TYPES)}")
        # An encoder-only checkpoint (T5EncoderModel) has is_encoder_decoder=false; models/encoder.py loads it.
        encoder_only = any(str(a).endswith("EncoderModel") for a in hf.get("architectures") or [])
        for key, bad in (("is_encoder_decoder", False), ("is_decoder", True), ("tie_encoder_decoder", True)):
            if key in hf and hf[key] is bad and not (encoder_only and key == "is_encoder_decoder"):
                raise ValueError(f"config.json {key}={bad}: only the encoder-decoder T5 is supported")
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in FEED_FORWARD_PROJS:
            raise ValueError(f"config.json feed_forward_proj={proj!r} is not supported; "
                             f"expected one of {', '.join(FEED_FORWARD_PROJS)}")
        kwargs = {name: hf[name] for name in _HF_FIELDS if name in hf and hf[name] is not None}
        # transformers >= 5 always writes tie_word_embeddings=true and keeps the v1.0/v1.1 switch in
        # scale_decoder_outputs (the head scaling); that switch is what decides the family.
        if "scale_decoder_outputs" in hf:
            kwargs["tie_word_embeddings"] = bool(hf["scale_decoder_outputs"])
        if model_type == "mt5":  # never scaled; transformers >= 5 writes tie_word_embeddings=true regardless
            kwargs["tie_word_embeddings"] = False
        kwargs["model_type"] = model_type
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs.update(overrides)
        return cls(**kwargs)


# Fields shared with Hugging Face's T5Config (same names and meaning).
_HF_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
              "layer_norm_epsilon", "feed_forward_proj", "tie_word_embeddings", "initializer_factor",
              "pad_token_id", "eos_token_id", "decoder_start_token_id")


def _v10(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int) -> dict[str, Any]:
    return dict(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.1)


def _v11(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int) -> dict[str, Any]:
    # v1.1 was pretrained without dropout (docs/T5.md); fine-tuning sets dropout_rate=0.1 explicitly.
    return dict(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)


# docs/T5.md "Sizes" (vocab 32128, 32 buckets, max distance 128 are the dataclass defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": _v10(512, 2048, 64, 8, 6),
    "t5-base": _v10(768, 3072, 64, 12, 12),
    "t5-large": _v10(1024, 4096, 64, 16, 24),
    "t5-3b": _v10(1024, 16384, 128, 32, 24),
    "t5-11b": _v10(1024, 65536, 128, 128, 24),
    "t5-v1_1-small": _v11(512, 1024, 64, 6, 8),
    "t5-v1_1-base": _v11(768, 2048, 64, 12, 12),
    "t5-v1_1-large": _v11(1024, 2816, 64, 16, 24),
    "t5-v1_1-xl": _v11(2048, 5120, 64, 32, 24),
    "t5-v1_1-xxl": _v11(4096, 10240, 64, 64, 24),
    # Debug model: the v1.1 architecture at a size that pretrains on a laptop CPU in minutes. The engine
    # overrides vocab_size to its tokenizer's. 128 wide: on 2 cores it takes ~9 steps/s at 32 x 64 tokens,
    # and on the built-in corpus more, cheaper steps beat width within a 3-minute budget (the 256-wide
    # model had not begun to use its encoder's context after 500 steps).
    "tiny": _v11(128, 512, 32, 4, 2),
}
