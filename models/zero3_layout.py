"""What ZeRO-3 must know of a T5-family model, named here by the model package with the classes themselves
(a renamed class fails on import instead of silently dropping out of a list of strings).

- Leaf modules: modules whose forward reads their weights directly (the fused and Triton kernels take
  weight tensors, not `Linear` calls), so ZeRO-3 gathers each one whole on entry.
- External parameters: parameters used outside their owner's forward: the relative bias tables (the model
  builds each stack's bias once, from block 0's table, or from every block's with UMT5) and a tied
  embedding used as the head.

engine/distributed/zero_engine.py applies both; nothing here imports DeepSpeed.
"""
from __future__ import annotations

from torch import nn

from models.t5 import T5Attention, T5DenseReluDense

LEAF_MODULES: tuple[type[nn.Module], ...] = (T5DenseReluDense, T5Attention)


def leaf_modules(model: nn.Module) -> list[type[nn.Module]]:
    """The leaf module classes that occur in `model`."""
    return [t for t in LEAF_MODULES if any(type(m) is t for m in model.modules())]


def external_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for name in ("encoder", "decoder"):
        stack = getattr(model, name, None)
        if stack is None:
            continue
        blocks = stack.block if stack.config.per_layer_position_bias else stack.block[:1]
        params += [b.layer[0].SelfAttention.relative_attention_bias.weight for b in blocks]
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "shared"):
        params.append(model.shared.weight)
    return params
