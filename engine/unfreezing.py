"""Gradual unfreezing, a fine-tuning schedule (T5 paper, section 3.5.1): which blocks train at which step.

It lives in the engine, beside the trainer that applies it each step; the model knows nothing about it.
"""
from __future__ import annotations

import torch
from torch import nn


class GradualUnfreezer:
    """Gradual unfreezing (T5 paper, section 3.5.1; Howard & Ruder 2018): at first only the top block of
    each stack trains, then one more block from the top every `every` steps, encoder and decoder in
    parallel. Parameters outside the blocks (the shared embedding / head, the final layer norms) always
    train, as in the paper, where the embedding is shared with the output layer.

    `mask_gradients=False` switches `requires_grad`: frozen parameters get no gradient and optimizers
    skip them. Engines that fix the trainable set when they are built (DeepSpeed ZeRO partitions the
    parameters it was given) use `mask_gradients=True`: everything stays trainable and a gradient hook
    zeroes the frozen blocks' gradients. The optimizer must then also be told which parameters are
    frozen (`is_frozen`), or it still steps them: weight decay, and a step count that runs while frozen.
    """

    def __init__(self, model: nn.Module, every: int, mask_gradients: bool = False):
        if every < 1:
            raise ValueError(f"gradual unfreezing: 'unfreeze_every' must be >= 1 step, got {every}")
        self.every = every
        self.mask_gradients = mask_gradients
        self.stacks: list[list[list[nn.Parameter]]] = []
        in_blocks: set[int] = set()
        for stack_name in ("encoder", "decoder"):
            stack = getattr(model, stack_name, None)
            blocks = getattr(stack, "block", None)
            if blocks is None:
                continue
            params = [list(block.parameters()) for block in blocks]
            self.stacks.append(params)
            in_blocks.update(id(p) for ps in params for p in ps)
        if not self.stacks:
            raise ValueError(f"{type(model).__name__}: no encoder/decoder blocks to unfreeze")
        self.always = [p for p in model.parameters() if id(p) not in in_blocks]
        self._frozen: set[int] = set()
        if mask_gradients:
            for blocks in self.stacks:
                for params in blocks:
                    for p in params:
                        p.register_hook(self._mask_hook(p))
        self.unfrozen = -1

    def _mask_hook(self, param: nn.Parameter):
        key = id(param)
        return lambda grad: torch.zeros_like(grad) if key in self._frozen else grad

    def blocks_unfrozen(self, step: int) -> int:
        """Blocks trainable per stack at optimizer step `step` (0-based): 1, then +1 every `every` steps."""
        return 1 + step // self.every

    def is_frozen(self, param: nn.Parameter) -> bool:
        """Whether `param` is in a block frozen at the step last applied."""
        return id(param) in self._frozen

    def apply(self, step: int) -> bool:
        """Set the trainable blocks for `step`; True when that changed anything."""
        n = self.blocks_unfrozen(step)
        if n == self.unfrozen:
            return False
        self.unfrozen = n
        self._frozen.clear()
        for p in self.always:
            p.requires_grad_(True)
        for blocks in self.stacks:
            for i, params in enumerate(blocks):
                trainable = i >= len(blocks) - n
                for p in params:
                    p.requires_grad_(trainable or self.mask_gradients)
                    if not trainable:
                        self._frozen.add(id(p))
        return True
