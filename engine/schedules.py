"""Learning-rate schedules as pure functions of the update number.

The trainer writes `lr_at(step)` into the optimizer's param groups before every update, so the
schedule has no state to checkpoint and a resumed run cannot drift from the uninterrupted one.
`step` is the 1-based number of the update about to be applied.
"""
from __future__ import annotations

import math

from engine.config import ScheduleSection


def inverse_sqrt(step: int, lr: float, warmup_steps: int, warmup_shape: str = "constant") -> float:
    """T5: lr * sqrt(w / max(step, w)); with lr = 0.01 and w = 10^4 this is 1/sqrt(max(step, 10^4)).

    The paper holds the plateau for the first w steps (`constant`); `linear` ramps up to it instead.
    """
    w = max(warmup_steps, 1)
    if warmup_shape == "linear" and step < w:
        return lr * step / w
    return lr * math.sqrt(w / max(step, w))


def _warmup(step: int, lr: float, warmup_steps: int) -> float | None:
    if warmup_steps > 0 and step < warmup_steps:
        return lr * step / warmup_steps
    return None


def cosine(step: int, lr: float, warmup_steps: int, max_steps: int, final_fraction: float = 0.0) -> float:
    ramp = _warmup(step, lr, warmup_steps)
    if ramp is not None:
        return ramp
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    low = lr * final_fraction
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, lr: float, warmup_steps: int, max_steps: int, final_fraction: float = 0.0) -> float:
    ramp = _warmup(step, lr, warmup_steps)
    if ramp is not None:
        return ramp
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (1.0 - (1.0 - final_fraction) * progress)


def constant(step: int, lr: float, warmup_steps: int) -> float:
    ramp = _warmup(step, lr, warmup_steps)
    return lr if ramp is None else ramp


def lr_at(step: int, base_lr: float, cfg: ScheduleSection, max_steps: int) -> float:
    if cfg.name == "inverse_sqrt":
        return inverse_sqrt(step, base_lr, cfg.warmup_steps, cfg.warmup_shape)
    if cfg.name == "cosine":
        return cosine(step, base_lr, cfg.warmup_steps, max_steps, cfg.final_lr_fraction)
    if cfg.name == "linear":
        return linear(step, base_lr, cfg.warmup_steps, max_steps, cfg.final_lr_fraction)
    if cfg.name == "constant":
        return constant(step, base_lr, cfg.warmup_steps)
    raise ValueError(f"config key 'schedule.name': unknown schedule {cfg.name!r}")
