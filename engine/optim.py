"""Optimizers for T5: Adafactor with the paper's settings and AdamW with the step scaled by the parameter RMS.

Both take the learning rate from their param groups (the trainer writes the schedule's value there
before each step), keep their state in fp32 whatever the parameter dtype, and skip the whole update
when any gradient is NaN or infinite (`last_step_skipped`, `skipped_steps`), so a bad batch never
reaches the weights even where DeepSpeed does not check for overflow (ZeRO 0 in fp32).

Per-parameter statistics under ZeRO. With DeepSpeed ZeRO >= 1 the optimizer is handed flat fp32
partitions, not the model's tensors: a partition holds slices of many parameters and a parameter may be
split across ranks. Adafactor's factored second moment (row and column means of g^2), its
parameter-scale RMS and its update-clipping RMS, and AdamW's parameter-RMS scaling are statistics of the
WHOLE parameter, so the engine tells the optimizer what each partition holds (`set_partition_layout`,
filled from DeepSpeed's own bookkeeping in engine/distributed/partitions.py). Each rank then computes its slices'
partial sums (sum of p^2, sum of u^2, row and column sums of g^2 — a flat slice of a row-major matrix
is some whole rows plus partial rows at its ends), one all-reduce per statistic pass sums them over the
ranks (a flat buffer for all parameters of the partition, so a step costs two collectives for Adafactor
and one for AdamW, not one per parameter), and every rank updates its own elements. The factored row and
column moments are small and replicated on the ranks that hold a slice of the parameter. The same code
runs unsharded tensors as a one-slice layout with no collective, so ZeRO 0 and ZeRO 3 compute the same
update to rounding.

Frozen parameters (`set_frozen`, by name). Under DeepSpeed every parameter stays trainable (ZeRO fixes
its partitions at start-up) and gradual unfreezing zeroes the frozen blocks' gradients; the optimizer is
told their names, so frozen parameters and slices are skipped as PyTorch skips `requires_grad=False`
ones: no update, no weight decay, no change of state. The step count is per parameter (`step:NAME` in a
partition's state; `step` for a whole tensor), so a block unfrozen at run step k takes its own step 1 of
bias correction / beta2_t, as on the local engine. Statistics buffers keep their layout whatever is
frozen, so every rank still takes part in the same collectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.config import OptimSection


@dataclass(frozen=True)
class ParamSlice:
    """This rank's elements of one parameter inside a flat partition."""

    param: int  # index into PartitionLayout.names / shapes
    flat_start: int  # first element in the flat partition
    param_start: int  # first element in the row-major flattened parameter
    numel: int


@dataclass
class PartitionLayout:
    """What one flat partition holds.

    `names` / `shapes` list EVERY parameter the partition is a piece of, in the same order on every rank
    (whether or not this rank holds some of it), so the ranks' statistics buffers line up element for
    element; `slices` are this rank's pieces; `group` is the process group the parameters are
    partitioned over (None: nothing to reduce, the tensor is whole).
    """

    names: list
    shapes: list
    slices: list
    group: object = None
    partial: bool = False  # some slices left out (frozen): elementwise state cannot be stepped as one tensor
    _offsets: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def whole(tensor: torch.Tensor) -> "PartitionLayout":
        return PartitionLayout([None], [tensor.shape], [ParamSlice(0, 0, 0, tensor.numel())])

    def without(self, frozen: frozenset) -> "PartitionLayout":
        """This layout less the slices of frozen parameters; names, shapes (so the statistics buffers)
        and the group unchanged."""
        slices = [s for s in self.slices if self.names[s.param] not in frozen]
        if len(slices) == len(self.slices):
            return self
        return PartitionLayout(self.names, self.shapes, slices, self.group, partial=True, _offsets=self._offsets)

    def factored(self, index: int, enabled: bool) -> bool:
        return enabled and len(self.shapes[index]) >= 2

    def stat_offsets(self, factored: bool) -> tuple[int, list]:
        """Pass-1 buffer: [sum g^2 (finiteness), sum p^2 per param, then rows + cols of factored params]."""
        if factored not in self._offsets:
            size, where = 1 + len(self.shapes), []
            for i, shape in enumerate(self.shapes):
                if self.factored(i, factored):
                    batch, rows, cols = _matrix_dims(shape)
                    where.append((size, size + batch * rows))
                    size += batch * (rows + cols)
                else:
                    where.append(None)
            self._offsets[factored] = (size, where)
        return self._offsets[factored]


def _matrix_dims(shape) -> tuple[int, int, int]:
    """(B, R, C) for a tensor (..., R, C): leading dims folded, factored over the last two (as T5)."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _rows(x: torch.Tensor, start: int, cols: int) -> tuple[int, int, torch.Tensor]:
    """A flat slice starting at element `start` of a row-major matrix, as (first_row, lead, rows x cols).

    The slice covers whole rows plus partial rows at its ends; elements of those partial rows owned by
    other ranks read as zeros, so row and column sums over the result are this rank's partial sums.
    """
    first = start // cols
    lead = start - first * cols
    nrows = -(-(lead + x.numel()) // cols)
    if lead == 0 and x.numel() == nrows * cols:
        return first, 0, x.view(nrows, cols)
    buf = x.new_zeros(nrows * cols)
    buf[lead:lead + x.numel()] = x
    return first, lead, buf.view(nrows, cols)


def _reduce(buffers: list, groups: list) -> None:
    """Sum each buffer over its process group in place: one all-reduce per distinct group."""
    by_group: dict = {}
    for buf, group in zip(buffers, groups):
        if group is not None:
            by_group.setdefault(id(group), (group, []))[1].append(buf)
    if not by_group:
        return
    import torch.distributed as dist

    for group, bufs in by_group.values():
        flat = torch.cat(bufs)
        wire = flat.to(_collective_device(group, flat.device))
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group)
        flat = wire.to(flat.device)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()])
            offset += b.numel()


def _collective_device(group, device: torch.device) -> torch.device:
    """Where a buffer can be all-reduced: an NCCL-only group cannot take CPU tensors, and with a
    CPU-offloaded optimizer (ZeRO-Offload) the partitions, so the statistics, live on the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if device.type == "cpu" and "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _PartitionAware(torch.optim.Optimizer):
    """Shared plumbing: which layout each tensor has, which parameters are frozen, per-parameter step
    counts, and the skip-on-non-finite bookkeeping."""

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self.last_step_skipped = False
        self.skipped_steps = 0  # counts step() calls that skipped (ZeRO 3 calls step once per sub-group)
        self._layouts: dict = {}
        self._whole_names: dict = {}  # id(tensor) -> (tensor, name) for tensors stepped whole
        self.frozen: frozenset = frozenset()
        self._active: dict = {}  # id(flat) -> (flat, its layout less the frozen slices)

    def set_partition_layout(self, flat: torch.Tensor, layout: PartitionLayout) -> None:
        """Declare what the flat partition `flat` (a tensor in this optimizer's param groups) holds."""
        if layout.slices:
            last = max(s.flat_start + s.numel for s in layout.slices)
            if last > flat.numel():
                raise ValueError(f"partition layout reaches element {last} of a {flat.numel()}-element partition")
        self._layouts[id(flat)] = (flat, layout)
        self._active[id(flat)] = (flat, layout.without(self.frozen))

    def name_whole_tensors(self, named) -> None:
        """(name, tensor) pairs for tensors this optimizer steps whole (local engine, ZeRO 0), so that
        `set_frozen` can find them; their state keys stay unnamed (`step`, `exp_avg`, ...)."""
        for name, t in named:
            self._whole_names[id(t)] = (t, name)

    def set_frozen(self, names) -> None:
        """Skip these parameters (by name) from the next step on until told otherwise: no update, no
        weight decay, no state change. Every rank must be given the same names (the statistics
        collectives still run over every parameter of a partition)."""
        frozen = frozenset(names)
        known = {n for _, layout in self._layouts.values() for n in layout.names}
        known.update(name for _, name in self._whole_names.values())
        unknown = sorted(frozen - known)
        if unknown:
            raise ValueError(f"set_frozen: {len(unknown)} name(s) not held by this optimizer, e.g. {unknown[0]!r} "
                             "(whole tensors need name_whole_tensors, partitions set_partition_layout)")
        self.frozen = frozen
        self._active = {key: (flat, layout.without(frozen)) for key, (flat, layout) in self._layouts.items()}

    def _is_frozen_whole(self, t: torch.Tensor) -> bool:
        known = self._whole_names.get(id(t))
        return known is not None and known[0] is t and known[1] in self.frozen

    def _units(self) -> list:
        """(group, tensor, layout) for every tensor to step, its layout less the frozen slices; sharded
        ones even without a local gradient or with every slice frozen, because the other ranks wait for
        this rank's (zero) contribution to the collectives."""
        units = []
        for group in self.param_groups:
            for t in group["params"]:
                known = self._active.get(id(t))
                if known is not None and known[0] is t:
                    units.append((group, t, known[1]))
                elif t.grad is not None and not self._is_frozen_whole(t):
                    units.append((group, t, PartitionLayout.whole(t)))
        return units

    @staticmethod
    def _key(layout: PartitionLayout, index: int, key: str) -> str:
        name = layout.names[index]
        return key if name is None else f"{key}:{name}"

    def _advance(self, state: dict, layout: PartitionLayout, index: int) -> int:
        """Count one more step of parameter `index`; returns its step number (1 at its first step).
        A partition's state from before per-parameter counts holds one `step` for all: start from it."""
        key = self._key(layout, index, "step")
        state[key] = state.get(key, state.get("step", 0) if key != "step" else 0) + 1
        return state[key]

    def _reduced_stats(self) -> tuple[list, list] | None:
        """This step's units and their all-reduced statistics, or None when the step is skipped."""
        units = self._units()
        stats = [self._stats(*u) for u in units]
        _reduce(stats, [u[2].group for u in units])
        return None if self._skip([s[0] for s in stats]) else (units, stats)

    def _skip(self, heads: list) -> bool:
        """Skip the whole step when any reduced statistic is non-finite: one host sync for the whole step,
        on the all-reduced sums, so every rank takes the same decision."""
        skipped = bool(heads) and not bool(torch.isfinite(torch.stack(heads)).all())
        self.last_step_skipped = skipped
        self.skipped_steps += int(skipped)
        return skipped

    @torch.no_grad()
    def step(self, closure=None):
        """Reduce the statistics, skip the whole step on a non-finite gradient, else `_step_units`."""
        loss = closure() if closure is not None else None
        reduced = self._reduced_stats()
        if reduced is not None:
            self._step_units(*reduced)
        return loss

    def _step_units(self, units: list, stats: list) -> None:
        """Update every (group, tensor, layout) unit, given its all-reduced statistics."""
        raise NotImplementedError


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    # A fp32 norm reads bf16 / fp32 in place: no partition-sized temporary for x.float().square().
    return torch.linalg.vector_norm(x, dtype=torch.float32).square()


def _slice_of(t: torch.Tensor, s: ParamSlice) -> torch.Tensor:
    return t.view(-1)[s.flat_start:s.flat_start + s.numel]


class Adafactor(_PartitionAware):
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

    def _stats(self, group, t, layout) -> torch.Tensor:
        """Pass 1, this rank's partial sums: g^2 total, p^2 per parameter, row/col sums of g^2 + eps1."""
        size, where = layout.stat_offsets(group["factored"])
        buf = torch.zeros(size, dtype=torch.float32, device=t.device)
        if t.grad is None:
            return buf
        for s in layout.slices:
            g = _slice_of(t.grad, s).float()
            sq = g.square().add_(group["eps1"])
            buf[0] += sq.sum()
            if group["scale_parameter"]:
                buf[1 + s.param] += _sumsq(_slice_of(t, s))
            if where[s.param] is not None:
                batch, rows, cols = _matrix_dims(layout.shapes[s.param])
                first, _, m = _rows(sq, s.param_start, cols)
                row_at, col_at = where[s.param]
                buf[row_at + first:row_at + first + m.shape[0]] += m.sum(dim=1)
                col_sums = buf[col_at:col_at + batch * cols].view(batch, cols)
                if batch == 1:
                    col_sums[0] += m.sum(dim=0)
                else:  # a (..., R, C) tensor: row r of the folded matrix belongs to batch r // R
                    index = torch.arange(first, first + m.shape[0], device=m.device) // rows
                    col_sums.index_add_(0, index, m)
        return buf

    def _moments(self, group, t, layout, stats) -> dict:
        """Advance the second moments of this rank's parameters; returns the rsqrt factors per parameter."""
        state = self.state[t]
        _, where = layout.stat_offsets(group["factored"])
        factors = {}
        for s in layout.slices:
            i, shape = s.param, layout.shapes[s.param]
            # A parameter has at most one slice per partition: one step of its own clock per step.
            beta2 = 1.0 - self._advance(state, layout, i) ** (-group["decay_rate"])
            if where[i] is None:
                key = self._key(layout, i, "exp_avg_sq")
                if key not in state:
                    state[key] = torch.zeros(s.numel, dtype=torch.float32, device=t.device)
                sq = _slice_of(t.grad, s).float().square().add_(group["eps1"])
                state[key].mul_(beta2).add_(sq, alpha=1.0 - beta2)
                continue
            batch, rows, cols = _matrix_dims(shape)
            rkey, ckey = self._key(layout, i, "exp_avg_sq_row"), self._key(layout, i, "exp_avg_sq_col")
            if rkey not in state:
                state[rkey] = torch.zeros(shape[:-1], dtype=torch.float32, device=t.device)
                state[ckey] = torch.zeros(tuple(shape[:-2]) + tuple(shape[-1:]), dtype=torch.float32, device=t.device)
            row_at, col_at = where[i]
            row_mean = stats[row_at:row_at + batch * rows] / cols  # mean of g^2 over the last dim
            col_mean = stats[col_at:col_at + batch * cols] / rows  # ... and over the second-to-last
            row, col = state[rkey].view(-1), state[ckey].view(-1)
            row.mul_(beta2).add_(row_mean, alpha=1.0 - beta2)
            col.mul_(beta2).add_(col_mean, alpha=1.0 - beta2)
            # V ~ row col^T / mean(row): the rank-1 estimate of the second moment from the paper.
            r = row.view(batch, rows)
            factors[i] = ((r / r.mean(dim=-1, keepdim=True)).rsqrt().view(-1), col.rsqrt().view(batch, cols))
        return factors

    def _update(self, group, t, layout, s, factors) -> torch.Tensor:
        """The unclipped update of one slice: g / sqrt(V)."""
        g = _slice_of(t.grad, s).float()
        if s.param not in factors:
            return g * self.state[t][self._key(layout, s.param, "exp_avg_sq")].rsqrt()
        row_f, col_f = factors[s.param]
        batch, rows, cols = _matrix_dims(layout.shapes[s.param])
        first, lead, m = _rows(g, s.param_start, cols)
        col_rows = col_f[0] if batch == 1 else col_f[torch.arange(first, first + m.shape[0], device=m.device) // rows]
        u = m * row_f[first:first + m.shape[0]].unsqueeze(1) * col_rows
        return u.view(-1)[lead:lead + s.numel]

    def _apply(self, group, t, layout, s, u, stats, clip_sq) -> None:
        # The scalars stay 0-d tensors on the device: no host sync per parameter.
        numel = math.prod(layout.shapes[s.param])
        lr = torch.full((), group["lr"], dtype=torch.float32, device=u.device)
        if group["scale_parameter"]:
            lr = lr * (stats[1 + s.param] / numel).sqrt().clamp_min(group["eps2"])
        clip = ((clip_sq / numel).sqrt() / group["clip_threshold"]).clamp_min(1.0)
        p = _slice_of(t, s)
        p32 = p.float() if p.dtype != torch.float32 else p
        if group["weight_decay"] > 0:
            p32.sub_(p32 * (lr * group["weight_decay"]))
        p32.sub_(u.mul_(lr / clip))
        if p32 is not p:
            p.copy_(p32)

    def _step_units(self, units: list, stats: list) -> None:
        sharded = []
        for (group, t, layout), st in zip(units, stats):
            if t.grad is None:  # a rank with no gradient still joins the collective below
                sharded.append((group, t, layout, {}, torch.zeros(len(layout.shapes), device=t.device), st))
                continue
            factors = self._moments(group, t, layout, st)
            if layout.group is None:  # whole tensor: clip and apply at once, no second pass
                for s in layout.slices:
                    u = self._update(group, t, layout, s, factors)
                    self._apply(group, t, layout, s, u, st, u.square().sum())
                continue
            usq = torch.zeros(len(layout.shapes), dtype=torch.float32, device=t.device)
            for s in layout.slices:
                usq[s.param] += self._update(group, t, layout, s, factors).square().sum()
            sharded.append((group, t, layout, factors, usq, st))
        # Pass 2: the update-clipping RMS of every parameter, summed over the ranks; the update is
        # recomputed rather than kept, so a step holds one slice's update at a time, not the partition's.
        _reduce([x[4] for x in sharded], [x[2].group for x in sharded])
        for group, t, layout, factors, usq, st in sharded:
            if t.grad is None:
                continue
            for s in layout.slices:
                self._apply(group, t, layout, s, self._update(group, t, layout, s, factors), st, usq[s.param])


class AdamWScale(_PartitionAware):
    """AdamW whose step is multiplied by max(1e-3, RMS(param)), as Adafactor's parameter scale.

    nanoT5 found this plus a cosine schedule trains T5 as well as Adafactor, where plain AdamW diverges.
    With `scale_by_param_rms=False` it is plain AdamW (decoupled weight decay, bias correction).
    """

    def __init__(self, params, lr: float = 2e-2, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 scale_by_param_rms: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        scale_by_param_rms=scale_by_param_rms)
        super().__init__(params, defaults)

    @staticmethod
    def _stats(group, t, layout) -> torch.Tensor:
        """[sum g^2 (finiteness), sum p^2 per parameter] of this rank's slices."""
        buf = torch.zeros(1 + len(layout.shapes), dtype=torch.float32, device=t.device)
        if t.grad is None:
            return buf
        if layout.partial:  # frozen slices out of the finiteness check too, as requires_grad=False would be
            for s in layout.slices:
                buf[0] += _sumsq(_slice_of(t.grad, s))
        else:
            buf[0] = _sumsq(t.grad)
        if group["scale_by_param_rms"]:
            for s in layout.slices:
                buf[1 + s.param] += _sumsq(_slice_of(t, s))
        return buf

    def _step_units(self, units: list, stats: list) -> None:
        for (group, t, layout), st in zip(units, stats):
            if t.grad is None:
                continue
            beta1, beta2 = group["betas"]
            state = self.state[t]
            if "exp_avg" not in state:  # elementwise moments: one buffer per (flat) tensor, padding included
                state["exp_avg"] = torch.zeros_like(t, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(t, dtype=torch.float32)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if not layout.partial:  # the whole flat at once (padding's gradient is 0, its moments stay 0)
                grad = t.grad.float()
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = v.sqrt().add_(group["eps"])
            else:  # frozen slices keep their moments: only the others'
                for s in layout.slices:
                    g = _slice_of(t.grad, s).float()
                    _slice_of(m, s).mul_(beta1).add_(g, alpha=1.0 - beta1)
                    _slice_of(v, s).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = None
            for s in layout.slices:
                step_t = self._advance(state, layout, s.param)  # each parameter's own bias correction
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** step_t) / (1.0 - beta1 ** step_t)
                d = _slice_of(v, s).sqrt().add_(group["eps"]) if denom is None else _slice_of(denom, s)
                p = _slice_of(t, s)
                p32 = p.float() if p.dtype != torch.float32 else p
                if group["weight_decay"] > 0:
                    p32.add_(p32, alpha=-group["lr"] * group["weight_decay"])
                if group["scale_by_param_rms"]:  # a 0-d device tensor: no host sync per parameter
                    numel = math.prod(layout.shapes[s.param])
                    scale = (st[1 + s.param] / numel).sqrt().clamp_min(1e-3) * step_size
                    p32.sub_(_slice_of(m, s) / d * scale)
                else:
                    p32.addcdiv_(_slice_of(m, s), d, value=-step_size)
                if p32 is not p:
                    p.copy_(p32)


def build_optimizer(params, cfg: OptimSection, fused: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer; `fused` (default): engine/fused_optim.py's bucketed step, the same
    update as the classes here (the reference) with a few hundred aten operations per step instead of
    ~150 per tensor."""
    if fused:
        from engine.fused_optim import FusedAdafactor as adafactor, FusedAdamWScale as adamw
    else:
        adafactor, adamw = Adafactor, AdamWScale
    if cfg.name == "adafactor":
        return adafactor(params, lr=cfg.lr, decay_rate=cfg.decay_rate, clip_threshold=cfg.clip_threshold,
                         weight_decay=cfg.weight_decay, factored=cfg.factored)
    if cfg.name == "adamw":
        return adamw(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     scale_by_param_rms=cfg.scale_by_param_rms)
    raise ValueError(f"config key 'optim.name': unknown optimizer {cfg.name!r}")
