"""Encoder-only T5 (Hugging Face's `T5EncoderModel` / `MT5EncoderModel` / `UMT5EncoderModel`): the shared
embedding and the encoder stack, for retrieval and embedding users.

    model = T5EncoderModel.from_pretrained("path/to/flan-t5-base")     # a whole model's decoder is skipped
    hidden = model.encode(input_ids, attention_mask)                    # (B, L, d_model)
    vectors = model.embed(input_ids, attention_mask)                    # (B, d_model) masked mean, L2-normed
    model.save_pretrained("out/")                                       # transformers' T5EncoderModel loads it

The modules and numerics are the encoder-decoder's own (models/t5.py); checkpoints go through the same
adapter (models/hf_checkpoint.py), which drops a full checkpoint's decoder and head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import T5Config
from .t5 import T5Attention, T5DenseReluDense, T5ForConditionalGeneration, T5LayerNorm, T5Stack

_ARCHITECTURES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (B, L, d_model)


class T5EncoderModel(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, cross_attention=False)
        self.init_weights()

    @property
    def hf_architecture(self) -> str:
        """The class name transformers writes in config.json for this model."""
        return _ARCHITECTURES[self.config.model_type]

    # The encoder-decoder's init, kernel choice and encoder pass, applied to the modules shared with it.
    init_weights = T5ForConditionalGeneration.init_weights
    init_module = T5ForConditionalGeneration.init_module
    kernels = T5ForConditionalGeneration.kernels
    encode = T5ForConditionalGeneration.encode
    num_parameters = T5ForConditionalGeneration.num_parameters

    def init_order(self) -> list[nn.Module]:
        kinds = (T5LayerNorm, T5Attention, T5DenseReluDense)
        return [m for m in self.modules() if isinstance(m, kinds)] + [self.shared]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        return EncoderOutput(self.encode(input_ids, attention_mask))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              normalize: bool = True) -> torch.Tensor:
        """One vector per row: the mean of the encoder output over real tokens (Sentence-T5's pooling)."""
        hidden = self.encode(input_ids, attention_mask).float()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = mask.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    @classmethod
    def from_pretrained(cls, directory, **kwargs: Any) -> "T5EncoderModel":
        """An encoder-only or a whole encoder-decoder checkpoint (Hugging Face layout)."""
        from .hf_checkpoint import from_pretrained

        return from_pretrained(directory, model_class=cls, **kwargs)

    def save_pretrained(self, directory, **kwargs: Any) -> None:
        from .hf_checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)
