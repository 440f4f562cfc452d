"""Optimizer state by parameter name, whatever the ZeRO partitioning: what `t5forge reshard` consolidates and
a run on another number of ranks loads (README: Changing the number of ranks).

Our optimizers (engine/optim.py) keep state per tensor they step: a whole parameter (local engine, ZeRO 0;
keys `step`, `exp_avg`, `exp_avg_sq`, `exp_avg_sq_row`, `exp_avg_sq_col`) or a flat ZeRO partition holding
slices of many parameters (per-parameter keys `KEY:NAME`; AdamW's moments as flat buffers the size of the
partition). Three shapes of state, one rule each:

- `step`: an int per parameter, the same on every rank holding a piece of it;
- factored moments (`exp_avg_sq_row`, `exp_avg_sq_col`): whole per parameter, replicated on those ranks;
- elementwise moments (`exp_avg`, `exp_avg_sq`): one value per parameter element, split like the weights.

`layout_record` writes, per rank, which slices of which parameters each stepped tensor holds (from the
layouts the engine declared, engine/distributed/partitions.py); `consolidate` puts the ranks' states
together by name (replicated values must agree; elementwise ones must cover every element); `load_named_state`
cuts that by-name state for the layouts of the run that loads it. Exact: values are copied, never recomputed.
"""
from __future__ import annotations

import math

import torch

from engine.optim import ParamSlice, PartitionLayout

STEP = "step"
FACTORS = ("exp_avg_sq_row", "exp_avg_sq_col")
ELEMENTWISE = ("exp_avg", "exp_avg_sq")
PORTABLE_WEIGHTS = "model.safetensors"  # fp32, our parameter names (the local engine's own file)
PORTABLE_OPTIMIZER = "optimizer.safetensors"  # NAME|KEY -> state (`save_named_state`)
SEP = "|"  # NAME|KEY in optimizer.safetensors (parameter names hold dots, never this)


def _flat_keys(optimizer) -> tuple:
    """Elementwise keys this optimizer keeps as one flat buffer per partition, not per parameter name:
    AdamW's moments (engine/optim.py AdamWScale); Adafactor names its unfactored moment per parameter."""
    from engine.optim import AdamWScale

    return ELEMENTWISE if isinstance(optimizer, AdamWScale) else ()


def layout_record(optimizer, order: list | None = None) -> dict:
    """JSON: for each tensor of the optimizer (its index in `state_dict()`), the parameters it holds slices of.
    `order`: the tensors in that index order when the param groups do not hold them now (DeepSpeed ZeRO-3
    puts its partitions there only for a step or a save)."""
    tensors = []
    if order is None:
        order = [t for group in optimizer.param_groups for t in group["params"]]
    for index, t in enumerate(order):
        known = optimizer._layouts.get(id(t))
        whole = optimizer._whole_names.get(id(t))
        if known is not None and known[0] is t:
            layout = known[1]
            tensors.append({"index": index, "whole": False, "names": list(layout.names),
                            "shapes": [list(s) for s in layout.shapes],
                            "slices": [[s.param, s.flat_start, s.param_start, s.numel] for s in layout.slices]})
        elif whole is not None and whole[0] is t:
            tensors.append({"index": index, "whole": True, "names": [whole[1]], "shapes": [list(t.shape)],
                            "slices": [[0, 0, 0, t.numel()]]})
        else:  # not named by the engine: recorded, so that reshard refuses it (a save never fails on it)
            tensors.append({"index": index, "whole": True, "names": [], "shapes": [], "slices": []})
    return {"optimizer": type(optimizer).__name__, "flat_keys": list(_flat_keys(optimizer)), "tensors": tensors}


def _split_key(key: str) -> tuple[str, str | None]:
    base, _, name = key.partition(":")
    return base, (name or None)


class _Merge:
    """Per-parameter state being put together from the ranks' pieces."""

    def __init__(self):
        self.values: dict = {}  # name -> key -> tensor (elementwise: flat, filled piecewise) / int
        self.covered: dict = {}  # (name, key) -> elements filled
        self.shapes: dict = {}  # name -> shape

    def replicated(self, name: str, key: str, value, where: str) -> None:
        value = value.detach().clone() if isinstance(value, torch.Tensor) else int(value)
        have = self.values.setdefault(name, {}).get(key)
        if have is None:
            self.values[name][key] = value
            return
        same = torch.equal(have, value) if isinstance(value, torch.Tensor) else have == value
        if not same:
            raise ValueError(f"{where}: {key} of {name} differs between the ranks that hold it")

    def piece(self, name: str, key: str, values: torch.Tensor, param_start: int, where: str) -> None:
        numel = math.prod(self.shapes[name])
        buf = self.values.setdefault(name, {}).get(key)
        if buf is None:
            buf = self.values[name][key] = torch.zeros(numel, dtype=values.dtype)
        if param_start + values.numel() > numel:
            raise ValueError(f"{where}: {key} of {name} reaches element {param_start + values.numel()} of {numel}")
        buf[param_start:param_start + values.numel()] = values.reshape(-1)
        self.covered[(name, key)] = self.covered.get((name, key), 0) + values.numel()

    def result(self, complete: bool) -> dict:
        for (name, key), count in self.covered.items():
            numel = math.prod(self.shapes[name])
            if complete and count != numel:
                raise ValueError(f"the ranks' {key} of {name} cover {count} of its {numel} elements (a rank's "
                                 "optimizer file missing?)")
            self.values[name][key] = self.values[name][key].view(self.shapes[name])
        return self.values


def consolidate(ranks: list, complete: bool = True) -> dict:
    """{name: {key: tensor or int}} from [(where, torch optimizer state_dict, layout_record), ...], one per rank;
    `complete`: every element of an elementwise state must come from some rank (False: one rank's view,
    zeros elsewhere)."""
    merge = _Merge()
    for where, sd, record in ranks:
        flat_keys = tuple(record.get("flat_keys", ()))
        states = sd.get("state", {})
        for tensor in record["tensors"]:
            names, shapes = tensor["names"], tensor["shapes"]
            if not names:
                if states.get(tensor["index"]):
                    raise ValueError(f"{where}: optimizer tensor {tensor['index']} has state but no parameter name; "
                                     "it cannot be resharded")
                continue
            for name, shape in zip(names, shapes):
                merge.shapes.setdefault(name, tuple(shape))
            state = states.get(tensor["index"], {})
            slices = [ParamSlice(*s) for s in tensor["slices"]]
            held = {names[s.param] for s in slices}
            for key, value in state.items():
                base, name = _split_key(key)
                if tensor["whole"]:
                    name = names[0]
                if base == STEP and name is None:  # a partition's one count from before per-parameter steps
                    for n in held:
                        if f"{STEP}:{n}" not in state:
                            merge.replicated(n, STEP, value, where)
                elif base == STEP or base in FACTORS:
                    merge.replicated(name, base, value, where)
                elif base in ELEMENTWISE and (tensor["whole"] or name is not None):
                    # a whole tensor's moment, or Adafactor's per-name moment of this rank's one slice
                    s = slices[0] if tensor["whole"] else next(s for s in slices if names[s.param] == name)
                    merge.piece(name, base, value.float().reshape(-1), s.param_start, where)
                elif base in flat_keys:
                    for s in slices:
                        flat = value.reshape(-1)[s.flat_start:s.flat_start + s.numel]
                        merge.piece(names[s.param], base, flat.float(), s.param_start, where)
                else:
                    raise ValueError(f"{where}: optimizer state key {key!r} is not one engine/optim_state.py "
                                     "knows how to reshard")
    return merge.result(complete)


def local_named_state(optimizer, complete: bool = False) -> dict:
    """This rank's optimizer state by name, read from the live optimizer (`consolidate` of one rank; with
    `complete` False, elementwise state outside this rank's slices reads as zeros)."""
    order = [t for t, _ in optimizer._layouts.values()] + [t for t, _ in optimizer._whole_names.values()]
    state = {i: optimizer.state[t] for i, t in enumerate(order) if t in optimizer.state}
    return consolidate([("live", {"state": state}, layout_record(optimizer, order))], complete)


def save_named_state(named: dict, path) -> None:
    from safetensors.torch import save_file

    flat = {}
    for name, keys in named.items():
        for key, value in keys.items():
            flat[f"{name}{SEP}{key}"] = (torch.tensor(value, dtype=torch.int64) if key == STEP
                                         else value.contiguous())
    save_file(flat, str(path))


def read_named_state(path) -> dict:
    from safetensors.torch import load_file

    named: dict = {}
    for full, value in load_file(str(path)).items():
        name, _, key = full.rpartition(SEP)
        if not name or key not in (STEP, *FACTORS, *ELEMENTWISE):
            raise ValueError(f"{path}: tensor {full!r} is not NAME{SEP}KEY of a known optimizer state")
        named.setdefault(name, {})[key] = int(value) if key == STEP else value
    return named


def load_named_state(optimizer, named: dict, where: str) -> None:
    """Set `optimizer`'s state from by-name state, cut for the layouts the engine declared on this rank."""
    flat_keys = _flat_keys(optimizer)
    optimizer.state.clear()
    # Every tensor the engine declared, whether or not the param groups hold it now (ZeRO-3: only in a step).
    for flat, layout in optimizer._layouts.values():
        _load_partition(optimizer, flat, layout, named, flat_keys)
    for t, name in optimizer._whole_names.values():
        _load_whole(optimizer, t, name, named)
    known = {n for _, layout in optimizer._layouts.values() for n in layout.names}  # held here or elsewhere
    known.update(name for _, name in optimizer._whole_names.values())
    unknown = sorted(set(named) - known)
    if unknown:
        raise ValueError(f"{where}: optimizer state for {len(unknown)} parameter(s) this model does not train, "
                         f"e.g. {unknown[0]!r}")


def _checked(value: torch.Tensor, shape, name: str, key: str) -> torch.Tensor:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"optimizer state {key} of {name}: shape {tuple(value.shape)}, the model needs {tuple(shape)}")
    return value


def _load_whole(optimizer, t: torch.Tensor, name: str, named: dict) -> None:
    keys = named.get(name)
    if not keys:
        return
    state = optimizer.state[t]
    for key, value in keys.items():
        if key == STEP:
            state[key] = value
            continue
        if key in ELEMENTWISE:
            value = _checked(value, t.shape, name, key)
            # Adafactor's unfactored moment is flat (numel,); AdamW's has the parameter's shape
            value = value.reshape(-1) if _is_adafactor(optimizer) else value
        state[key] = value.to(device=t.device, dtype=torch.float32).clone()


def _is_adafactor(optimizer) -> bool:
    from engine.optim import Adafactor

    return isinstance(optimizer, Adafactor)


def _load_partition(optimizer, flat: torch.Tensor, layout: PartitionLayout, named: dict, flat_keys: tuple) -> None:
    state = optimizer.state[flat]
    for s in layout.slices:
        name = layout.names[s.param]
        keys = named.get(name)
        if not keys:
            continue
        for key, value in keys.items():
            if key == STEP:
                state[f"{STEP}:{name}"] = value
            elif key in FACTORS:
                state[f"{key}:{name}"] = value.to(device=flat.device, dtype=torch.float32).clone()
            elif key in flat_keys:
                buf = state.get(key)
                if buf is None:
                    buf = state[key] = torch.zeros_like(flat, dtype=torch.float32)
                piece = _checked(value, layout.shapes[s.param], name, key).reshape(-1)
                buf.view(-1)[s.flat_start:s.flat_start + s.numel] = piece[s.param_start:s.param_start + s.numel]
            else:
                piece = _checked(value, layout.shapes[s.param], name, key).reshape(-1)
                state[f"{key}:{name}"] = piece[s.param_start:s.param_start + s.numel].to(
                    device=flat.device, dtype=torch.float32).clone()


def layout_file(directory, rank: int):
    return directory / f"rank_{rank:05d}.optim_layout.json"


def write_layout_record(directory, rank: int, optimizer, order: list | None = None) -> None:
    """This rank's `layout_record` beside the engine's own files (flushed by the rank that wrote it, as the
    rank state in engine/checkpoint.py)."""
    import json

    from engine.checkpoint import _fsync_path

    path = layout_file(directory, rank)
    path.write_text(json.dumps(layout_record(optimizer, order)), encoding="utf-8")
    _fsync_path(path)
