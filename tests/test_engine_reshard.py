"""`t5forge reshard`: a pretraining run continued on another number of ranks (README: Changing the number of ranks).

One 2-rank launch (CPU, gloo) trains 4 steps at ZeRO 2 and 3 with Adafactor and AdamW-scaled, and continues
1-rank local runs (resharded here) at ZeRO 1, 2 and 3 to step 8; here the 2-rank checkpoints are resharded and
continued on one local rank. At the hand-over the weights and the optimizer state, by parameter name, equal the
resharded files bit for bit, and those equal the consolidated 2-rank state (the weights also DeepSpeed's own
zero_to_fp32); the optimizer state is the 1-rank run's at the same step to rounding. SyntheticData splits each
global batch over the ranks, so with the same global batch (micro-batch x ranks) the continued losses are the
uninterrupted 1-rank run's to rounding.
"""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from engine_ds_worker import COMMON, MICRO, OPTIMIZERS, RESHARD_STEPS, VOCAB  # noqa: E402
from engine_synthetic import SyntheticData  # noqa: E402
from procs import free_port, repo_env  # noqa: E402

pytestmark = pytest.mark.slow
HALF = RESHARD_STEPS // 2


def _local(run_dir, optim, steps, *extra):
    """A local (1-rank) trainer with the 2-rank runs' global batch."""
    from engine.build import build_trainer
    from engine.config import load_run_config

    cfg = load_run_config(COMMON + OPTIMIZERS[optim] + ["--run.dir", str(run_dir), "--run.engine", "local",
                                                        "--batch.micro_batch_size", str(2 * MICRO),
                                                        "--run.max_steps", str(steps), "--run.log_every", "1", *extra])
    trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, 2 * MICRO), tokenizer_vocab=VOCAB)
    return trainer


def _by_name(optimizer) -> dict:
    from engine.optim_state import local_named_state

    return local_named_state(optimizer, complete=True)


def _saved_by_name(step_dir) -> dict:
    from engine.optim_state import consolidate, layout_file

    saved = torch.load(step_dir / "optimizer.pt", weights_only=True)
    return consolidate([("ref", saved, json.loads(layout_file(step_dir, 0).read_text()))])


def _assert_equal_state(got: dict, want: dict) -> None:
    assert want and sorted(got) == sorted(want)
    for name, keys in want.items():
        assert sorted(got[name]) == sorted(keys), name
        for key, value in keys.items():
            if key == "step":
                assert got[name][key] == value, (name, key)
            else:
                assert torch.equal(got[name][key].reshape(value.shape), value), (name, key)


def _assert_close_state(got: dict, want: dict, rel: float) -> None:
    """Per tensor: max |difference| <= rel * max |value| (misplaced slices differ by the values themselves)."""
    assert sorted(got) == sorted(want)
    for name, keys in want.items():
        for key, value in keys.items():
            if key == "step":
                assert got[name][key] == value, (name, key)
            else:
                diff = (got[name][key].reshape(value.shape) - value).abs().max()
                assert diff <= rel * value.abs().max(), (name, key, float(diff))


def test_two_ranks_to_one_and_one_to_two(tmp_path, capsys):
    from engine.optim_state import read_named_state
    from engine.reshard import reshard_main
    from safetensors.torch import load_file

    optims = ("adafactor", "adamw_scaled")
    ref_losses, ref_state = {}, {}
    for optim in optims:  # the uninterrupted 1-rank runs, and their state at the hand-over step
        ref = tmp_path / f"ref_{optim}"
        ref_losses[optim] = _local(ref, optim, RESHARD_STEPS, "--checkpoint.every", str(HALF)).train().losses
        ref_state[optim] = _saved_by_name(ref / "checkpoints" / f"step_{HALF:08d}")
    # 1-rank runs to continue on 2 ranks: 4 steps, resharded
    targets = {"one_adafactor": ("2", "adafactor"), "one_adamw_scaled": ("1", "adamw_scaled"),
               "one3_adafactor": ("3", "adafactor")}
    for name, (_, optim) in targets.items():
        _local(tmp_path / name, optim, HALF).train()
        assert reshard_main([str(tmp_path / name)]) == 0

    out = tmp_path / "out.json"
    runs = ["2:adafactor", "2:adamw_scaled", "3:adafactor"] + [f"resume:{stage}:{optim}:{name}"
                                                                for name, (stage, optim) in targets.items()]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tests/engine_ds_worker.py"),
           str(out), str(tmp_path), *runs]
    proc = subprocess.run(cmd, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())

    # 1 -> 2 ranks: every rank's slices of the weights and optimizer state are the files', bit for bit.
    for name, (stage, optim) in targets.items():
        got = results[f"resume:{stage}:{optim}:{name}"]
        assert got["weights_equal"] and got["optimizer_equal"] and got["weights_checked"] > 0, (name, got)
        assert got["start"] == HALF
        rel = 1e-5
        assert got["losses"] == pytest.approx(ref_losses[optim][HALF:], rel=rel), (name, got["losses"])

    # 2 -> 1 rank
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for stage, optim in (("2", "adafactor"), ("2", "adamw_scaled"), ("3", "adafactor")):
        run = tmp_path / f"zero{stage}_{optim}"
        step_dir = run / "checkpoints" / f"step_{HALF:08d}"
        # Without resharding, one line naming what differs and the command.
        with pytest.raises(ValueError, match=r"written by 2 rank\(s\), this run has 1; .*t5forge reshard"):
            _local(run, optim, RESHARD_STEPS).resume()
        capsys.readouterr()
        assert reshard_main([str(run)]) == 0
        assert "resumable on any number of ranks" in capsys.readouterr().out
        manifest = json.loads((step_dir / "manifest.json").read_text())["files"]
        assert {"model.safetensors", "optimizer.safetensors", "portable.json"} <= set(manifest)
        assert reshard_main([str(run)]) == 0 and "already resharded" in capsys.readouterr().out

        trainer = _local(run, optim, RESHARD_STEPS)
        assert trainer.resume() and trainer.step == HALF
        weights = load_file(str(step_dir / "model.safetensors"))
        zero = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=step_dir.name)
        for pname, p in trainer.engine.module.named_parameters():
            assert torch.equal(p.data, weights[pname]) and torch.equal(p.data, zero[pname]), pname
        live = _by_name(trainer.engine.optimizer)
        _assert_equal_state(live, read_named_state(step_dir / "optimizer.safetensors"))
        _assert_close_state(live, ref_state[optim], rel=1e-4)
        losses = trainer.train().losses
        assert results[f"{stage}:{optim}"] == pytest.approx(ref_losses[optim][:HALF], rel=1e-5)
        assert losses == pytest.approx(ref_losses[optim][HALF:], rel=1e-5), (stage, optim)


def test_reshard_refusals_are_one_line(tmp_path, capsys):
    """A checkpoint from before the layout records, a missing run, a bad --step: one line each, exit 2."""
    from engine.checkpoint import write_manifest
    from engine.reshard import reshard_main

    _local(tmp_path / "run", "adafactor", 1).train()
    step_dir = tmp_path / "run/checkpoints/step_00000001"
    (step_dir / "rank_00000.optim_layout.json").unlink()  # as a checkpoint of an earlier t5forge
    write_manifest(step_dir)
    for argv, message in ((["run"], "rank_00000.optim_layout.json: missing (a checkpoint saved before"),
                          (["nowhere"], "run directory not found"),
                          (["run", "--step", "x"], "--step takes an integer")):
        assert reshard_main([str(tmp_path / argv[0]), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("t5forge reshard: error: ") and message in err and err.count("\n") == 1, err
    assert not (step_dir / "portable.json").exists() and not list(step_dir.glob(".reshard-*"))
