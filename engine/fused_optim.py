"""Adafactor and AdamW-scaled with a step whose host cost does not grow with per-tensor arithmetic.

engine/optim.py's implementations (the reference, kept for tests and for ZeRO partitions) spend some 150
aten operations per tensor and step: on a GPU each is microseconds of host time, a few hundred
milliseconds a step at T5-base sizes (benchmarks/op_counts.py). Here the whole tensors (local engine,
DeepSpeed ZeRO 0) are stacked by (param group, shape, device) into fp32 buckets of shape (B, *shape),
built once: every step gathers the gradients (one concatenation per bucket) and copies the weights in
(one multi-tensor copy), does the math once per bucket (rows / columns of g^2, per-parameter RMS and
clipping along the bucket's first dim, per-parameter scalars as (B, 1) tensors where the parameters'
clocks differ), and copies the weights back with one more. The optimizer state of every parameter is a view of its bucket's buffer
under the reference's keys and shapes (`exp_avg_sq_row`, `exp_avg_sq_col`, `exp_avg_sq`, `exp_avg`,
an int `step`), so `state_dict()` and checkpoints read and load the same either way; state that is not
the bucket's view (after `load_state_dict`, a `state.clear()`) is copied back in at the next step.

The same update as the reference to fp32 rounding (only some reductions run in another order); the
same skip on a non-finite gradient, frozen parameters and per-parameter clocks. Flat ZeRO partitions
(`set_partition_layout`) go through the reference's per-slice path, in the same step and skip decision.
Costs 4 bytes per parameter for the fp32 weight buffers, and a temporary fp32 copy of the gradients
during the step (when the activations are gone).
"""
from __future__ import annotations

import math

import torch

from engine.optim import Adafactor, AdamWScale, _matrix_dims, _reduce

_F32 = torch.float32


class _Bucket:
    """Whole tensors of one param group with one shape, stacked: gradients, weights and state (B, *shape)."""

    def __init__(self, params: list, shape: tuple, device: torch.device):
        self.params = params
        self.shape = shape
        self.numel = math.prod(shape)
        self.device = device
        self.grads: torch.Tensor | None = None  # this step's gradients, (B, *shape) fp32; dropped after it
        self.values = torch.zeros((len(params),) + shape, dtype=_F32, device=device)
        self.value_views = list(self.values.unbind(0))
        self.buffers: dict = {}  # state key -> (B, *per-parameter shape) buffer
        self.views: dict = {}  # state key -> the buffer's per-parameter views
        self.clean = [True] * len(params)  # slot never used: its state is still zeros

    def buffer(self, key: str, shape: tuple) -> torch.Tensor:
        if key not in self.buffers:
            self.buffers[key] = torch.zeros((len(self.params),) + tuple(shape), dtype=_F32, device=self.device)
            self.views[key] = list(self.buffers[key].unbind(0))
        return self.buffers[key]

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(len(self.params), -1)


def _flat_grad(t: torch.Tensor) -> torch.Tensor:
    g = t.grad
    if g.device != t.device or g.shape != t.shape:
        raise ValueError(f"engine/fused_optim.py: a gradient of shape {tuple(g.shape)} on {g.device} for a "
                         f"parameter of shape {tuple(t.shape)} on {t.device}")
    return g.view(-1) if g.is_contiguous() else g.reshape(-1)


def _per_param(values: list, device: torch.device, ndim: int = 1):
    """One Python float when every parameter of a bucket has the same value, else a (B, 1...) fp32 tensor."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor(values, dtype=_F32, device=device).view((-1,) + (1,) * ndim)


def _ema_(buf: torch.Tensor, new: torch.Tensor, keep, fresh) -> None:
    """buf = keep * buf + fresh * new (keep, fresh: floats, or per-parameter (B, 1) tensors)."""
    if isinstance(keep, float):
        buf.mul_(keep).add_(new, alpha=fresh)
    else:
        buf.mul_(keep).add_(new * fresh)


class _Fused:
    """Bucket planning, state views and the step skeleton shared by the fused optimizers (a mixin ahead
    of the reference class, whose partition path and bookkeeping it reuses)."""

    _state_keys: tuple = ()

    def _plan(self) -> tuple[list, list]:
        """(partition units as the reference steps them, buckets), the buckets rebuilt when the groups'
        tensors or the declared partitions change."""
        signature = (len(self._layouts),) + tuple(id(t) for g in self.param_groups for t in g["params"])
        if getattr(self, "_signature", None) != signature:
            self._signature, self._buckets = signature, self._build_buckets()
        units = []
        for group in self.param_groups:
            for t in group["params"]:
                known = self._active.get(id(t))
                if known is not None and known[0] is t:
                    units.append((group, t, known[1]))
        return units, self._buckets

    def _build_buckets(self) -> list:
        by_key: dict = {}
        for gi, group in enumerate(self.param_groups):
            for t in group["params"]:
                known = self._layouts.get(id(t))
                if known is None or known[0] is not t:
                    by_key.setdefault((gi, tuple(t.shape), t.device), []).append(t)
        return [(self.param_groups[gi], _Bucket(params, shape, device))
                for (gi, shape, device), params in by_key.items()]

    def _active_mask(self, bucket: _Bucket) -> list:
        return [t.grad is not None and not self._is_frozen_whole(t) for t in bucket.params]

    def _load_in(self, buckets: list) -> list:
        """Gather the active tensors' gradients (one concatenation per bucket, a temporary: the step runs
        when the activations are gone) and weights (one multi-tensor copy into the buckets); inactive
        slots' gradients read as zeros. Returns (group, bucket, mask) for buckets with work."""
        work, dst, src = [], [], []
        for group, bucket in buckets:
            mask = self._active_mask(bucket)
            if not any(mask):
                continue
            work.append((group, bucket, mask))
            flat = [_flat_grad(t) if on else torch.zeros(bucket.numel, dtype=_F32, device=bucket.device)
                    for t, on in zip(bucket.params, mask)]
            grads = torch.cat(flat) if len(flat) > 1 else flat[0].clone()
            bucket.grads = (grads if grads.dtype == _F32 else grads.float()).view(bucket.values.shape)
            for b, (t, on) in enumerate(zip(bucket.params, mask)):
                if on:
                    dst.append(bucket.value_views[b])
                    src.append(t)
        if dst:
            torch._foreach_copy_(dst, src)
        return work

    def _write_back(self, work: list) -> None:
        dst, src = [], []
        for _, bucket, mask in work:
            for b, on in enumerate(mask):
                if on:
                    dst.append(bucket.params[b])
                    src.append(bucket.value_views[b])
        if dst:
            torch._foreach_copy_(dst, src)

    def _sync_state(self, bucket: _Bucket, mask: list, shapes: dict) -> list:
        """Make each active parameter's state its bucket slot's view (copying state that is not); returns
        each parameter's next step number (inactive: None)."""
        for key, shape in shapes.items():
            bucket.buffer(key, shape)
        steps = []
        for b, (t, on) in enumerate(zip(bucket.params, mask)):
            if not on:
                steps.append(None)
                continue
            state = self.state[t]
            if "step" not in state:
                if not bucket.clean[b]:
                    for key in shapes:
                        bucket.views[key][b].zero_()
            else:
                for key in shapes:
                    view, have = bucket.views[key][b], state.get(key)
                    if have is not view:
                        view.zero_() if have is None else view.copy_(have.reshape(view.shape))
            bucket.clean[b] = False
            steps.append(state.get("step", 0) + 1)
        return steps

    def _commit_state(self, bucket: _Bucket, steps: list) -> None:
        for b, (t, step) in enumerate(zip(bucket.params, steps)):
            if step is not None:
                state = self.state[t]
                for key, views in bucket.views.items():
                    state[key] = views[b]
                state["step"] = step

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        units, buckets = self._plan()
        stats = [self._stats(*u) for u in units]
        _reduce(stats, [u[2].group for u in units])
        work = self._load_in(buckets)
        prepared = [self._prepare(group, bucket) for group, bucket, _ in work]
        heads = [s[0] for s in stats] + [p["total"] for p in prepared]
        if self._skip(heads):   # the reference's decision, over whole tensors and partitions alike
            for _, bucket, _ in work:
                bucket.grads = None
            return loss
        if units:
            self._step_units(units, stats)
        for (group, bucket, mask), prep in zip(work, prepared):
            steps = self._sync_state(bucket, mask, self._shapes(group, bucket))
            self._apply_bucket(group, bucket, steps, prep)
            self._commit_state(bucket, steps)
        self._write_back(work)
        for _, bucket, _ in work:
            bucket.grads = None
        return loss


def _rms(sumsq: torch.Tensor, numel: int) -> torch.Tensor:
    return (sumsq / numel).sqrt_()


def _row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """sum of x^2 along dim 1 of a (B, n) fp32 tensor, without a (B, n) temporary."""
    return torch.linalg.vector_norm(x, dim=1).square_()


class FusedAdafactor(_Fused, Adafactor):
    """engine.optim.Adafactor with the bucketed step (see the module docstring)."""

    def _factored(self, group, bucket: _Bucket) -> bool:
        return group["factored"] and len(bucket.shape) >= 2

    def _shapes(self, group, bucket: _Bucket) -> dict:
        shape = bucket.shape
        if self._factored(group, bucket):
            return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
        return {"exp_avg_sq": (bucket.numel,)}

    def _prepare(self, group, bucket: _Bucket) -> dict:
        """Pass 1: g^2 + eps1 (total for the finiteness check, rows / columns means), sum p^2 per parameter."""
        sq = bucket.flat(bucket.grads).square().add_(group["eps1"])
        prep = {"total": sq.sum()}
        if group["scale_parameter"]:
            prep["psq"] = _row_sumsq(bucket.flat(bucket.values))
        if self._factored(group, bucket):
            batch, rows, cols = _matrix_dims(bucket.shape)
            m = sq.view(-1, rows, cols)
            prep["row_mean"], prep["col_mean"] = m.sum(dim=2).div_(cols), m.sum(dim=1).div_(rows)
        else:
            prep["sq"] = sq
        return prep

    def _apply_bucket(self, group, bucket: _Bucket, steps: list, prep: dict) -> None:
        n, device = len(bucket.params), bucket.device
        beta2 = [1.0 if s is None else 1.0 - s ** (-group["decay_rate"]) for s in steps]
        keep, fresh = _per_param(beta2, device), _per_param([1.0 - b for b in beta2], device)
        g = bucket.flat(bucket.grads)
        if self._factored(group, bucket):
            batch, rows, cols = _matrix_dims(bucket.shape)
            row, col = bucket.buffers["exp_avg_sq_row"], bucket.buffers["exp_avg_sq_col"]
            _ema_(bucket.flat(row), prep["row_mean"].view(n, -1), keep, fresh)
            _ema_(bucket.flat(col), prep["col_mean"].view(n, -1), keep, fresh)
            # V ~ row col^T / mean(row): the paper's rank-1 estimate of the second moment.
            r = row.view(-1, rows)
            row_f = (r / r.mean(dim=-1, keepdim=True)).rsqrt()
            g.view(-1, rows, cols).mul_(row_f.unsqueeze(2)).mul_(col.view(-1, cols).rsqrt().unsqueeze(1))
        else:
            v = bucket.buffers["exp_avg_sq"]
            _ema_(v, prep["sq"], keep, fresh)
            g.mul_(v.rsqrt())
        u, numel = g, bucket.numel
        if group["scale_parameter"]:
            lr = _rms(prep["psq"], numel).clamp_min_(group["eps2"]).mul_(group["lr"])
        else:
            lr = torch.full((n,), group["lr"], dtype=_F32, device=device)
        clip = _rms(u.square().sum(dim=1), numel).div_(group["clip_threshold"]).clamp_min_(1.0)
        p32 = bucket.flat(bucket.values)
        if group["weight_decay"] > 0:
            p32.sub_(p32 * (lr * group["weight_decay"]).unsqueeze(1))
        p32.sub_(u.mul_((lr / clip).unsqueeze(1)))


class FusedAdamWScale(_Fused, AdamWScale):
    """engine.optim.AdamWScale with the bucketed step (see the module docstring)."""

    def _shapes(self, group, bucket: _Bucket) -> dict:
        return {"exp_avg": bucket.shape, "exp_avg_sq": bucket.shape}

    def _prepare(self, group, bucket: _Bucket) -> dict:
        prep = {"total": _row_sumsq(bucket.flat(bucket.grads)).sum()}
        if group["scale_by_param_rms"]:
            prep["psq"] = _row_sumsq(bucket.flat(bucket.values))
        return prep

    def _apply_bucket(self, group, bucket: _Bucket, steps: list, prep: dict) -> None:
        device = bucket.device
        beta1, beta2 = group["betas"]
        on = [s is not None for s in steps]  # inactive slots keep their moments: keep 1, fresh 0
        keep1, fresh1 = _per_param([beta1 if a else 1.0 for a in on], device), _per_param(
            [1.0 - beta1 if a else 0.0 for a in on], device)
        keep2, fresh2 = _per_param([beta2 if a else 1.0 for a in on], device), _per_param(
            [1.0 - beta2 if a else 0.0 for a in on], device)
        g = bucket.flat(bucket.grads)
        m, v = bucket.flat(bucket.buffers["exp_avg"]), bucket.flat(bucket.buffers["exp_avg_sq"])
        _ema_(m, g, keep1, fresh1)
        if isinstance(keep2, float):
            v.mul_(keep2).addcmul_(g, g, value=fresh2)
        else:
            v.mul_(keep2).add_(g * g * fresh2)
        denom = v.sqrt().add_(group["eps"])
        step_size = _per_param([0.0 if s is None else group["lr"] * math.sqrt(1.0 - beta2 ** s) / (1.0 - beta1 ** s)
                                for s in steps], device)
        p32 = bucket.flat(bucket.values)
        if group["weight_decay"] > 0:
            p32.add_(p32, alpha=-group["lr"] * group["weight_decay"])
        if group["scale_by_param_rms"]:
            scale = _rms(prep["psq"], bucket.numel).clamp_min_(1e-3)
            scale = (scale * step_size).view(-1, 1) if isinstance(step_size, float) else scale.view(-1, 1) * step_size
            p32.sub_(m / denom * scale)
        elif isinstance(step_size, float):
            p32.addcdiv_(m, denom, value=-step_size)
        else:
            p32.sub_(m / denom * step_size)
