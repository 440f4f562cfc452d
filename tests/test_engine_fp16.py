"""fp16 training with a dynamic loss scale, on both engines (DeepSpeed: a world of one, gloo; local:
autocast + GradScaler): the loss falls, an injected gradient overflow skips the step (weights untouched,
counted, the scale lowered), the scale is logged as `loss_scale`, and a resumed run continues exactly."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from engine.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from engine_synthetic import SyntheticData  # noqa: E402
from procs import free_port, repo_env  # noqa: E402

ARGS = ["--model.vocab_size", "128", "--data.input_length", "32", "--batch.micro_batch_size", "4",
        "--optim.name", "adamw", "--optim.lr", "3e-3", "--optim.scale_by_param_rms", "false",
        "--schedule.name", "constant", "--schedule.warmup_steps", "0", "--checkpoint.every", "100",
        "--run.max_steps", "8", "--run.threads", "1", "--run.progress", "false", "--run.demo", "false",
        "--run.tensorboard", "false", "--run.log_every", "1", "--deepspeed.precision", "fp16"]
OVERFLOW_STEPS = (3, 4)


def _deepspeed_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# DeepSpeed's CPU accelerator has fp16 only where oneDNN does (AVX-512 FP16 / AMX CPUs): elsewhere it refuses
# fp16 (tested below as our one-line error), so the DeepSpeed fp16 runs need such a CPU or a GPU.
needs_ds_fp16 = pytest.mark.skipif(not _deepspeed_fp16(), reason="DeepSpeed reports no fp16 on this CPU")
# The scale after each of steps 1..6: halved on each overflow, on every engine and ZeRO stage.
SCALES = [2.0**16] * 2 + [2.0**15] + [2.0**14] * 3


class _OneBatch(SyntheticData):
    """Batch 0 of the synthetic stream, again and again: memorised in a few steps, so the loss falls fast."""

    def __iter__(self):
        for batch in super().__iter__():
            self.index = 0
            yield batch


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward sends inf into the whole graph (an fp16 gradient overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def _trainer(run_dir, engine, zero):
    from engine.config import load_run_config
    from engine.build import build_trainer

    cfg = load_run_config(["--run.dir", str(run_dir), "--run.engine", engine, "--deepspeed.zero_stage", zero, *ARGS])
    trainer, _ = build_trainer(cfg, data=_OneBatch(100, 4), tokenizer_vocab=100)
    backward = trainer.engine.backward

    def overflowing(loss):
        backward(_InfGrad.apply(loss) if trainer.step + 1 in OVERFLOW_STEPS else loss)

    trainer.engine.backward = overflowing
    return trainer


@pytest.mark.parametrize("engine, zero", [*[pytest.param("deepspeed", z, marks=needs_ds_fp16) for z in "0123"],
                                          ("local", "0")])
def test_fp16_dynamic_loss_scale_skips_overflow_and_resumes(tmp_path, engine, zero):
    trainer = _trainer(tmp_path / "run", engine, zero)
    module = trainer.engine.module
    assert {p.dtype for p in module.parameters()} == ({torch.float16} if engine == "deepspeed" else {torch.float32})
    losses, scales = [], []

    def weights():  # at ZeRO 3 this rank's shards (the parameters themselves are empty between steps)
        return [getattr(p, "ds_tensor", p).detach().clone() for p in module.parameters()]

    for step in range(1, 7):
        before = weights()
        metrics = trainer.train_step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, weights()))
        assert metrics["applied"] == (step not in OVERFLOW_STEPS) and unchanged == (step in OVERFLOW_STEPS), step
        losses.append(metrics["loss"])
        scales.append(trainer.engine.loss_scale)
    assert scales == SCALES
    assert trainer.skipped_total == 2 and trainer.skipped_in_a_row == 0  # overflows do not count toward a stop
    trainer.save()
    losses += [trainer.train_step()["loss"] for _ in range(2)]
    assert max(losses[-2:]) < losses[0] / 2, losses
    trainer.logger.close()

    resumed = _trainer(tmp_path / "run", engine, zero)
    assert resumed.resume() and resumed.step == 6 and resumed.engine.loss_scale == scales[-1]
    result = resumed.train()
    assert result.losses == pytest.approx(losses[-2:], rel=1e-6, abs=1e-7)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [7, 8]
    assert [r["loss_scale"] for r in records] == [scales[-1]] * 2 and records[-1]["skipped_steps"] == 2


def _common_losses(run_dir, engine, precision, zero="0"):
    """4 steps of tests/engine_ds_worker.py's COMMON run on one rank holding the 2-rank global batch."""
    from engine.config import load_run_config
    from engine.build import build_trainer
    from engine_ds_worker import COMMON, MICRO, VOCAB

    cfg = load_run_config(COMMON + ["--run.dir", str(run_dir), "--run.engine", engine, "--deepspeed.precision",
                                    precision, "--deepspeed.zero_stage", zero, "--batch.micro_batch_size", str(2 * MICRO)])
    trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, 2 * MICRO), tokenizer_vocab=VOCAB)
    return trainer.train().losses


@needs_ds_fp16
@pytest.mark.parametrize("zero", ["0", "1", "2", "3"])
def test_deepspeed_fp16_trains_like_fp32(tmp_path, zero):
    """fp16 weights with the loss scale give fp32's loss curve to fp16 rounding. Guards the two DeepSpeed
    0.19 ZeRO-0 workarounds in engine/distributed/zero_engine.py (without either, step 3 is off by > 0.02)."""
    reference = _common_losses(tmp_path / "fp32", "local", "fp32")
    losses = _common_losses(tmp_path / "fp16", "deepspeed", "fp16", zero)
    assert losses == pytest.approx(reference, abs=2e-3), (losses, reference)




@needs_ds_fp16
@pytest.mark.slow
def test_fp16_zero_1_2_3_on_two_ranks_match_fp32(tmp_path):
    """ZeRO 1, 2 and 3 in fp16 on two gloo ranks train like fp32 on one rank holding the same global batch."""
    out = tmp_path / "losses.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tests/engine_ds_worker.py"),
           str(out), str(tmp_path), "1:fp16", "2:fp16", "3:fp16"]
    env = repo_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    reference = _common_losses(tmp_path / "fp32", "local", "fp32")
    for stage in ("1", "2", "3"):
        losses = results[f"{stage}:fp16"]
        assert losses == pytest.approx(reference, abs=2e-3), (stage, losses, reference)
        records = read_metrics(tmp_path / f"zero{stage}_fp16")
        assert records[-1]["step"] == 4 and records[-1]["loss_scale"] == 2.0**16  # no overflow at the initial scale


def test_unsupported_precision_is_one_line(tmp_path, monkeypatch):
    """Where DeepSpeed's accelerator lacks fp16, the engine names the config key before DeepSpeed fails."""
    from deepspeed.accelerator import get_accelerator

    from engine.config import load_run_config
    from engine.distributed.zero_engine import check_precision_supported

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: None)
    cfg = load_run_config(["--run.dir", str(tmp_path), "--run.engine", "deepspeed", *ARGS])
    with pytest.raises(ValueError, match=r"^config key 'deepspeed.precision': fp16 is not supported by DeepSpeed's "
                                         r"\w+ accelerator on this machine; use bf16 or fp32"):
        check_precision_supported(cfg)
    check_precision_supported(load_run_config(["--run.dir", str(tmp_path), *ARGS[:-2]]))  # fp32: fine
