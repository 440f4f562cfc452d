"""Optimizers for T5: Adafactor with the paper's settings and AdamW with the step scaled by the parameter RMS.

Both take the learning rate from their param groups (the trainer writes the schedule's value there
before each step), keep their state in fp32 whatever the parameter dtype, and skip the whole update
when any gradient is NaN or infinite (`last_step_skipped`), so a bad batch never reaches the weights
even where DeepSpeed does not check for overflow (ZeRO 0 in fp32).

Under DeepSpeed ZeRO >= 1 an optimizer sees flat fp32 partitions, not the model's tensors: Adafactor then
keeps an unfactored second moment per partition and both scale by the partition's RMS instead of each
parameter's. With ZeRO 0 (the ready configs up to 3B parameters) every statistic is per parameter.
"""
from __future__ import annotations

import math

import torch

from engine.config import OptimSection


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(max(t.numel(), 1))


def _all_finite(grads: list[torch.Tensor]) -> bool:
    if not grads:
        return True
    # One reduction per tensor and a single host sync for the whole step.
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) as T5 trains with it.

    Factored second moments for tensors with >= 2 dims (row and column means of g^2 over the last two
    dims), beta2_t = 1 - t^-decay_rate, no momentum, update clipping by its RMS, and the step multiplied
    by max(eps2, RMS(param)) ("parameter scale"). eps1 (1e-30) is added to g^2 so rsqrt stays finite.
    """

    def __init__(self, params, lr: float = 1e-2, decay_rate: float = 0.8, clip_threshold: float = 1.0,
                 eps1: float = 1e-30, eps2: float = 1e-3, weight_decay: float = 0.0, factored: bool = True,
                 scale_parameter: bool = True):
        defaults = dict(lr=lr, decay_rate=decay_rate, clip_threshold=clip_threshold, eps1=eps1, eps2=eps2,
                        weight_decay=weight_decay, factored=factored, scale_parameter=scale_parameter)
        super().__init__(params, defaults)
        self.last_step_skipped = False

    @staticmethod
    def _approx_inv_sqrt(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        # V ~ row col^T / mean(row): the rank-1 estimate of the second moment from the paper.
        r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c = col.unsqueeze(-2).rsqrt()
        return r * c

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_step_skipped = not _all_finite(grads)
        if self.last_step_skipped:
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                factored = group["factored"] and grad.dim() >= 2
                if not state:
                    state["step"] = 0
                    if factored:
                        state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], dtype=torch.float32, device=grad.device)
                        state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:],
                                                              dtype=torch.float32, device=grad.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
                state["step"] += 1
                p32 = p.float() if p.dtype != torch.float32 else p
                lr = group["lr"]
                if group["scale_parameter"]:
                    lr = lr * max(group["eps2"], float(_rms(p32)))
                beta2 = 1.0 - state["step"] ** (-group["decay_rate"])
                sq = grad.square().add_(group["eps1"])
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1.0 - beta2)
                    col.mul_(beta2).add_(sq.mean(dim=-2), alpha=1.0 - beta2)
                    update = self._approx_inv_sqrt(row, col).mul_(grad)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2).add_(sq, alpha=1.0 - beta2)
                    update = v.rsqrt().mul_(grad)
                update.div_(max(1.0, float(_rms(update)) / group["clip_threshold"]))
                if group["weight_decay"] > 0:
                    p32.add_(p32, alpha=-group["weight_decay"] * lr)
                p32.add_(update, alpha=-lr)
                if p32 is not p:
                    p.copy_(p32)
        return loss


class AdamWScale(torch.optim.Optimizer):
    """AdamW whose step is multiplied by max(1e-3, RMS(param)), as Adafactor's parameter scale.

    nanoT5 found this plus a cosine schedule trains T5 as well as Adafactor, where plain AdamW diverges.
    With `scale_by_param_rms=False` it is plain AdamW (decoupled weight decay, bias correction).
    """

    def __init__(self, params, lr: float = 2e-2, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 scale_by_param_rms: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        scale_by_param_rms=scale_by_param_rms)
        super().__init__(params, defaults)
        self.last_step_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_step_skipped = not _all_finite(grads)
        if self.last_step_skipped:
            return loss
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p32 = p.float() if p.dtype != torch.float32 else p
                if group["scale_by_param_rms"]:
                    step_size *= max(1e-3, float(_rms(p32)))
                if group["weight_decay"] > 0:
                    p32.add_(p32, alpha=-group["lr"] * group["weight_decay"])
                p32.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if p32 is not p:
                    p.copy_(p32)
        return loss


def build_optimizer(params, cfg: OptimSection) -> torch.optim.Optimizer:
    if cfg.name == "adafactor":
        return Adafactor(params, lr=cfg.lr, decay_rate=cfg.decay_rate, clip_threshold=cfg.clip_threshold,
                         weight_decay=cfg.weight_decay, factored=cfg.factored)
    if cfg.name == "adamw":
        return AdamWScale(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          scale_by_param_rms=cfg.scale_by_param_rms)
    raise ValueError(f"config key 'optim.name': unknown optimizer {cfg.name!r}")
