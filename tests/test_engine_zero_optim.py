"""Adafactor and AdamW-scaled keep per-parameter statistics when DeepSpeed ZeRO hands them flat partitions.

- In process: the whole-tensor optimizers (what the sharded runs are held to) match transformers'
  Adafactor on 1-, 2- and 3-D tensors and torch's AdamW times the parameter RMS.
- One launch of the deepspeed launcher, 2 gloo ranks on the CPU (DeepSpeed's start-up paid once):
  1. the optimizers alone on hand-made partitions (`check_partitions`): ZeRO-1/2-style (one flat of all
     parameters cut in two, the cut falling mid-row of a 3-D tensor) and ZeRO-3-style (every parameter
     cut in two, two sub-groups) take the same steps as whole tensors, also with parameters frozen
     (set_frozen) for the first steps against whole tensors without gradient then, and a step whose only
     NaN is in the other rank's slice is skipped on both ranks;
  2. end to end, ZeRO 1, 2 and 3 training with Adafactor (T5's settings) and with AdamW-scaled gives the
     same per-step losses as the single-rank run with the same global batch. Without the partition
     layouts (engine/distributed/partitions.py) the losses differ by ~4e-2 from step 2 on.
"""
import json
import pathlib
import subprocess
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]

from procs import free_port, repo_env  # noqa: E402
SHAPES = [(6, 5), (7,), (2, 3, 4), (3, 1), (1, 9), (5, 7), (10, 3)]




def _env() -> dict:
    return repo_env(OMP_NUM_THREADS="1")


# ----------------------------------------------------------------------------- partitions made by hand
def _grads(step: int) -> list:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * (1.0 + i) for i, s in enumerate(SHAPES)]


def _zero12_partitions(params, rank, world):
    """One flat of all parameters, padded to a multiple of `world`, this rank's contiguous cut."""
    from engine.optim import ParamSlice

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    part = -(-flat.numel() // world)
    lo, hi = rank * part, (rank + 1) * part
    mine = torch.zeros(part)
    mine[: max(0, min(hi, flat.numel()) - lo)] = flat[lo:hi]
    slices, offset = [], 0
    for j, p in enumerate(params):
        a, b = max(lo, offset), min(hi, offset + p.numel())
        if a < b:
            slices.append(ParamSlice(j, a - lo, a - offset, b - a))
        offset += p.numel()
    return [(mine, slices, [lo])]


def _zero3_partitions(params, rank, world):
    """Every parameter cut in `world` padded pieces; two sub-groups of parameters, one flat each."""
    from engine.optim import ParamSlice

    out = []
    for members in (range(0, 3), range(3, len(params))):
        pieces, slices, offset, starts = [], [], 0, []
        for j in members:
            flat = params[j].detach().reshape(-1)
            part = -(-flat.numel() // world)
            piece = torch.zeros(part)
            n = max(0, min(part, flat.numel() - rank * part))
            piece[:n] = flat[rank * part: rank * part + n]
            if n:
                slices.append(ParamSlice(j - members[0], offset, rank * part, n))
            pieces.append(piece)
            starts.append((j, rank * part, offset, n))
            offset += part
        out.append((torch.cat(pieces), slices, starts))
    return out


OPTIMS = (("adafactor", "Adafactor", dict(lr=1e-2, weight_decay=0.01)),
          ("adamw_scaled", "AdamWScale", dict(lr=1e-2, weight_decay=0.01)))
STEPS = 4
# Gradual unfreezing as the optimizer sees it: these parameters are frozen for the first UNFREEZE steps.
# (7,) and (2, 3, 4) share rank 0's and rank 1's pieces of the ZeRO-1/2 flat, the 3-D one cut mid-row.
FROZEN, UNFREEZE = (1, 2, 5), 2


def _whole_run(cls, kw, init, frozen=()):
    """The reference: whole tensors, a frozen one has no gradient (requires_grad=False)."""
    whole = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(whole, **kw)
    for step in range(STEPS):
        for j, (p, g) in enumerate(zip(whole, _grads(step))):
            p.grad = None if step < UNFREEZE and j in frozen else g
        opt.step()
    return whole


def _partition_run(cls, kw, init, style, rank, world, group, frozen=()):
    """Hand-made partitions of `style`; frozen parameters keep a (nonzero) gradient but are named to
    set_frozen for the first UNFREEZE steps, then released."""
    from engine.optim import PartitionLayout

    cut = _zero12_partitions if style == "zero12" else _zero3_partitions
    parts = cut(init, rank, world)
    flats = [torch.nn.Parameter(t.clone()) for t, _, _ in parts]
    opt = cls(flats, **kw)
    groups = [list(range(len(SHAPES)))] if style == "zero12" else [list(range(0, 3)), list(range(3, 7))]
    for flat, (_, slices, _), members in zip(flats, parts, groups):
        opt.set_partition_layout(flat, PartitionLayout([f"p{j}" for j in members], [SHAPES[j] for j in members],
                                                       slices, group))
    for step in range(STEPS):
        opt.set_frozen([f"p{j}" for j in frozen] if step < UNFREEZE else [])
        for flat, (g, _, _) in zip(flats, cut(_grads(step), rank, world)):
            flat.grad = g
        opt.step()
    return opt, flats, parts, cut


def check_partitions() -> dict:
    """Run on every rank of an initialized 2-rank process group (tests/engine_ds_worker.py "shards").

    Returns, the same on every rank, per optimizer and partition style, with and without parameters
    frozen for the first steps: the largest difference of any rank's partitions from the whole-tensor
    run, how far the steps moved them, and whether a step with a NaN only in rank 1's slice was skipped
    everywhere with nothing changed.
    """
    import torch.distributed as dist

    from engine import optim

    rank, world = dist.get_rank(), dist.get_world_size()
    g0 = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g0) for s in SHAPES]
    results = {}
    for name, cls_name, kw in OPTIMS:
        cls = getattr(optim, cls_name)
        for frozen in ((), FROZEN):
            whole = _whole_run(cls, kw, init, frozen)
            for style in ("zero12", "zero3"):
                opt, flats, parts, cut = _partition_run(cls, kw, init, style, rank, world, dist.group.WORLD, frozen)
                # Element for element, this rank's partitions against the whole-tensor run.
                expect = cut([p.detach() for p in whole], rank, world)
                diff = max(float((f.detach() - e).abs().max()) for f, (e, _, _) in zip(flats, expect))
                moved = min(float((f.detach() - t).abs().max()) for f, (t, _, _) in zip(flats, parts))
                # A NaN only in rank 1's slice: both ranks must skip, and nothing moves.
                before = [f.detach().clone() for f in flats]
                for flat in flats:
                    flat.grad = torch.zeros_like(flat)
                if rank == 1:
                    flats[-1].grad[0] = float("nan")
                opt.step()
                ok = opt.last_step_skipped and all(torch.equal(f.detach(), b) for f, b in zip(flats, before))
                worst = torch.tensor([diff, -moved, float(not ok)])
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                results[f"{name}/{style}" + ("/frozen" if frozen else "")] = dict(
                    diff=float(worst[0]), moved=-float(worst[1]), skipped_everywhere=worst[2].item() == 0.0)
    return results


def test_frozen_partitions_step_as_whole_tensors_without_gradient():
    """In process (a 1-rank gloo group, so the sharded code path and its collectives run): parameters
    named to set_frozen for the first steps, with nonzero gradients all along, end where whole tensors
    with no gradient while frozen end, weight decay included; each parameter counts its own steps (a
    block unfrozen at step 3 takes step 1 of bias correction / beta2_t there), and the state of a frozen
    parameter does not change. Without set_frozen the runs differ by > 1e-3."""
    import torch.distributed as dist

    from engine import optim

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
        for _, cls_name, kw in OPTIMS:
            cls = getattr(optim, cls_name)
            whole = _whole_run(cls, kw, init, FROZEN)
            for style in ("zero12", "zero3"):
                opt, flats, _, cut = _partition_run(cls, kw, init, style, 0, 1, dist.group.WORLD, FROZEN)
                for f, (e, _, _) in zip(flats, cut([p.detach() for p in whole], 0, 1)):
                    torch.testing.assert_close(f.detach(), e, rtol=1e-6, atol=1e-7, msg=f"{cls_name}/{style}")
                steps = {k: v for st in opt.state.values() for k, v in st.items() if k.startswith("step")}
                assert steps == {f"step:p{j}": STEPS - (UNFREEZE if j in FROZEN else 0) for j in range(len(SHAPES))}
                # Not telling the optimizer: the frozen parameters' gradients are stepped (and the clock runs).
                _, unfrozen, _, _ = _partition_run(cls, kw, init, style, 0, 1, dist.group.WORLD)
                assert max(float((a - b).detach().abs().max()) for a, b in zip(unfrozen, flats)) > 1e-3
            # Frozen parameters' state (and weights) stay as they are while frozen, also once they had state.
            opt, flats, _, _ = _partition_run(cls, kw, init, "zero12", 0, 1, dist.group.WORLD)
            state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[flats[0]].items()}
            before = flats[0].detach().clone()
            opt.set_frozen([f"p{j}" for j in range(len(SHAPES))])
            flats[0].grad = torch.randn(flats[0].shape)
            opt.step()
            assert torch.equal(flats[0].detach(), before)
            after = opt.state[flats[0]]
            assert after.keys() == state.keys()
            for k, v in state.items():
                assert torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v, k
    finally:
        if started:
            dist.destroy_process_group()


def test_set_frozen_on_whole_tensors_and_unknown_names():
    """Whole tensors (local engine, ZeRO 0) are frozen by the names the engine gives them; a name the
    optimizer does not hold is refused rather than silently ignored."""
    import pytest

    from engine.optim import AdamWScale

    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    whole = _whole_run(AdamWScale, OPTIMS[1][2], init, FROZEN)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = AdamWScale(params, **OPTIMS[1][2])
    opt.name_whole_tensors((f"p{j}", p) for j, p in enumerate(params))
    for step in range(STEPS):
        opt.set_frozen([f"p{j}" for j in FROZEN] if step < UNFREEZE else [])
        for p, g in zip(params, _grads(step)):
            p.grad = g  # zero under DeepSpeed's mask; nonzero here, still ignored
        opt.step()
    for a, b in zip(params, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [opt.state[p]["step"] for p in params] == [STEPS - (UNFREEZE if j in FROZEN else 0)
                                                      for j in range(len(SHAPES))]
    with pytest.raises(ValueError, match="not held by this optimizer, e.g. 'decoder.block.0.x'"):
        opt.set_frozen(["p0", "decoder.block.0.x"])


def test_whole_tensors_match_independent_references():
    """The whole-tensor runs the sharded ones are held to, against transformers' Adafactor (3-D included)
    and torch's AdamW times the parameter RMS, on the same shapes."""
    from transformers.optimization import Adafactor as HFAdafactor

    from engine.optim import AdamWScale, Adafactor

    def run(cls, steps=4, **kw):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(SHAPES)]
        opt = cls(params, **kw)
        for step in range(steps):
            for p, g in zip(params, _grads(step)):
                p.grad = g
            opt.step()
        return params

    ours = run(Adafactor, lr=1e-2, weight_decay=0.01)
    ref = run(HFAdafactor, lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False, decay_rate=-0.8,
              clip_threshold=1.0, beta1=None, eps=(1e-30, 1e-3), weight_decay=0.01)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # One step of AdamW-scaled moves each tensor by RMS(param) times plain AdamW's move.
    start = run(AdamWScale, steps=0)
    scaled = run(AdamWScale, steps=1, lr=1e-2)
    plain = run(torch.optim.AdamW, steps=1, lr=1e-2, weight_decay=0.0)
    for p0, a, b in zip(start, scaled, plain):
        rms = p0.detach().pow(2).mean().sqrt().clamp_min(1e-3)
        torch.testing.assert_close(a - p0, (b - p0) * rms, rtol=1e-4, atol=1e-8)


def test_layout_outside_its_partition_is_refused():
    import pytest

    from engine.optim import Adafactor, ParamSlice, PartitionLayout

    flat = torch.nn.Parameter(torch.zeros(10))
    opt = Adafactor([flat])
    with pytest.raises(ValueError, match="reaches element 12 of a 10-element partition"):
        opt.set_partition_layout(flat, PartitionLayout(["w"], [(4, 3)], [ParamSlice(0, 2, 0, 10)]))


# ----------------------------------------------------------------------------- end to end under DeepSpeed
def test_zero_partitions_keep_per_parameter_statistics(tmp_path):
    import pytest

    sys.path.insert(0, str(REPO / "tests"))
    from engine_ds_worker import COMMON, MICRO, OPTIMIZERS, VOCAB
    from engine_synthetic import SyntheticData

    from engine.config import load_run_config
    from engine.build import build_trainer

    runs = ["shards"] + [f"{stage}:{optim}" for optim in ("adafactor", "adamw_scaled") for stage in (1, 2, 3)]
    out = tmp_path / "losses.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tests/engine_ds_worker.py"),
           str(out), str(tmp_path), *runs]
    # The single-rank references run here while the launcher starts up (its ranks mostly wait on imports).
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reference = {}
        for optim in ("adafactor", "adamw_scaled"):
            cfg = load_run_config(COMMON + OPTIMIZERS[optim] + [
                "--run.dir", str(tmp_path / f"single_{optim}"), "--run.engine", "local",
                "--batch.micro_batch_size", str(2 * MICRO)])
            trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, 2 * MICRO), tokenizer_vocab=VOCAB)
            reference[optim] = trainer.train().losses
            assert len(reference[optim]) == 4 and reference[optim][-1] < reference[optim][0]
        output = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    losses = json.loads(out.read_text())
    shards = losses.pop("shards")
    assert len(shards) == 8, shards
    for key, res in shards.items():
        assert res["moved"] > 1e-3, (key, res)  # the steps did something on every rank ...
        assert res["diff"] < 1e-6, (key, res)  # ... and the same as on whole tensors
        assert res["skipped_everywhere"], (key, res)
    for run in runs[1:]:
        expected = reference[run.split(":")[1]]
        # Step 1 is before any update (reduction order only); later steps carry every optimizer statistic.
        assert losses[run] == pytest.approx(expected, rel=0, abs=1e-6), (run, losses[run], expected)
