"""Scoring tasks by generation, on one rank or split across data-parallel ranks, and the ZeRO-3 copy
generation runs on.

    scores = evaluate_tasks(model, tokenizer, [(task, examples), ...], batch_size=32, max_input_length=512,
                            max_length=128, rank=rank, world_size=world)    # {"sst2/accuracy": 93.1, ...}
    model = gathered_copy(zero3_module, build)   # every rank, collective; a plain whole model

Every rank must call `evaluate_tasks` (and `gathered_copy`) together: the outputs are gathered with
torch.distributed, so all ranks return the same scores.
"""
from __future__ import annotations

import torch

__all__ = ["evaluate_tasks", "gathered_copy", "is_zero3_partitioned"]


def _all_gather_objects(obj, world_size: int) -> list:
    """`obj` of every rank, in rank order (a list of one locally)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def evaluate_tasks(model, tokenizer, eval_sets, *, batch_size: int, max_input_length: int, max_length: int,
                   num_beams: int = 1, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """{"task/metric": score} for each (task, examples) in `eval_sets`, decoding with our generation.

    With several ranks each decodes every world_size-th example (strided, so every rank gets a similar
    mix of lengths), the output texts are gathered, and every rank scores the whole set: all ranks
    return the same scores, so they agree on the best step without another collective."""
    from engine.generate import generate_texts

    scores: dict[str, float] = {}
    for task, examples in eval_sets:
        mine = generate_texts(model, tokenizer, [e.inputs for e in examples[rank::world_size]],
                              batch_size=batch_size, max_input_length=max_input_length,
                              max_new_tokens=max_length, num_beams=num_beams)
        outputs = [""] * len(examples)
        for owner, texts in enumerate(_all_gather_objects(mine, world_size)):
            outputs[owner::world_size] = texts
        for metric, value in task.evaluate(examples, outputs).items():
            scores[f"{task.name}/{metric}"] = value
    return scores


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 holds only a shard of each parameter on this rank."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_copy(model: torch.nn.Module, build) -> torch.nn.Module:
    """A plain, whole copy of a ZeRO-3 partitioned model on every rank (collective: all ranks call it).

    Generation calls `encode` / `decode_step`, not the module's forward, so ZeRO-3's forward hooks
    would not gather the top-level parameters (embedding, head); a hook-free copy decodes as fast as
    an unsharded model. Parameters are gathered one at a time: the peak is the copy plus one whole
    parameter, the same memory an unsharded model needs, for the length of the evaluation only.
    `build()` makes the same architecture (adapters included); it is built on the meta device, so no
    memory or init time is spent on weights that are overwritten.
    """
    import deepspeed

    with torch.device("meta"):
        copy = build()
    gathered: dict[int, torch.Tensor] = {}
    state = {}
    for name in copy.state_dict():
        param = model.get_parameter(name)
        if id(param) not in gathered:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                gathered[id(param)] = param.data.detach().clone()
        state[name] = gathered[id(param)]
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()
