"""`t5forge pretrain` on one CPU process: the loss falls, signals and kills resume exactly, bad input fails
in one line, non-finite steps are skipped and stop the run."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.metrics import read_metrics
from engine.train import pretrain_main

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import shared_file  # noqa: E402
from engine_synthetic import SyntheticData  # noqa: E402
from procs import repo_env  # noqa: E402

SMALL = ["--data.input_length", "32", "--batch.micro_batch_size", "4", "--run.threads", "1",
         "--run.progress", "false", "--run.demo", "false", "--run.tensorboard", "false", "--run.log_every", "1"]


def test_default_command_loss_falls(tmp_path, capsys):
    """The no-argument run (engine/configs/tiny.toml) with fewer steps and shorter rows: built-in corpus and
    tokenizer, the loss falls clearly, and the demo fills masked words of sentences the corpus contains."""
    import re

    from engine.data.builtin import ensure_builtin
    from engine.tokenizer import iter_text_files

    rc = pretrain_main(["--run.dir", str(tmp_path / "run"), "--run.max_steps", "60", "--run.progress", "false",
                        "--run.log_every", "1", "--checkpoint.every", "30", "--data.input_length", "32",
                        "--batch.micro_batch_size", "16"])
    assert rc == 0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 61))
    assert {"loss", "lr", "tokens_per_s"} <= set(records[0])
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 2.0, losses
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000060"
    out = capsys.readouterr().out
    shown = re.findall(r"^  (.+)\n      model: .*truth: (.+?) +top-3 first pieces: \S+ \| \S+$", out, flags=re.M)
    assert len(shown) == 6, out
    corpus = " ".join(" ".join(iter_text_files(ensure_builtin()[0])).split())
    for masked, truth in shown:
        words = truth.split(" | ")
        assert len(words) == 2 and masked.count("<extra_id_") == 2
        sentence = re.sub(r"<extra_id_(\d+)>", lambda m: words[int(m.group(1))], masked)
        assert sentence in corpus, sentence  # the demo shows real sentences of the training text
    accuracy = re.search(r"Masked-token accuracy on (\d+) tokens .*: ([\d.]+)% .*: ([\d.]+)%\)", out)
    assert accuracy and int(accuracy.group(1)) > 500, out


def _cli(run_dir, steps, *extra):
    data = shared_file("c4/c4-validation-sample-2k.json.gz")
    tok = shared_file("tokenizers/seqio_test_t5ids_26pieces.model")
    return [sys.executable, "-m", "engine.train", "--run.dir", str(run_dir), "--run.max_steps", str(steps),
            "--data.paths", str(data), "--data.tokenizer", str(tok), "--checkpoint.every", "2",
            "--model.dropout_rate", "0.1", *SMALL, *extra]


def _wait_for_step(run_dir, step, proc, timeout=120):
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.slow
def test_sigterm_saves_and_sigkill_resume_is_bit_exact(tmp_path):
    env = repo_env()
    steps = 9
    ref = tmp_path / "ref"
    subprocess.run(_cli(ref, steps), check=True, cwd=REPO, env=env, capture_output=True)
    expected = [(r["step"], r["loss"]) for r in read_metrics(ref)]
    assert len(expected) == steps

    run = tmp_path / "run"
    # SIGTERM: a clean exit with a checkpoint at the step it stopped on.
    proc = subprocess.Popen(_cli(run, steps), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    stopped_at = read_metrics(run)[-1]["step"]
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{stopped_at:08d}"
    # Same command again resumes; SIGKILL it mid-run (possibly mid-save), then finish.
    proc = subprocess.Popen(_cli(run, steps), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(run, stopped_at + 2, proc)
    proc.kill()
    proc.communicate()
    subprocess.run(_cli(run, steps), check=True, cwd=REPO, env=env, capture_output=True)
    got = [(r["step"], r["loss"]) for r in read_metrics(run)]
    assert got == expected  # bit for bit, every step
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert len(list((run / "checkpoints").glob("step_*"))) <= 3  # keep_last


def test_local_checkpoint_exports(tmp_path):
    from engine.export import export_main
    from models.hf_checkpoint import from_pretrained

    rc = pretrain_main(["--run.dir", str(tmp_path / "run"), "--run.max_steps", "2", *SMALL])
    assert rc == 0
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    model = from_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run/checkpoints/step_00000002/model.safetensors"))
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in saved.items())
    assert (tmp_path / "hf/spiece.model").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--optim.lrr", "1"], "'optim.lrr'"),
    (["--data.paths", "/nonexistent/c4-*.json.gz"], "'data.paths': no file matches"),
    (["--model.preset", "t5-huge"], "'model.preset'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    rc = pretrain_main(["--run.dir", str(tmp_path / "run"), "--data.tokenizer", __file__, *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err and "Traceback" not in err


def _synthetic_trainer(tmp_path, *extra):
    from engine.config import load_run_config
    from engine.build import build_trainer

    cfg = load_run_config(["--run.dir", str(tmp_path / "run"), "--model.vocab_size", "128",
                           "--checkpoint.every", "2", *SMALL, *extra])
    trainer, _ = build_trainer(cfg, data=SyntheticData(100, 4), tokenizer_vocab=100)
    return trainer


def _poison(trainer, bad_steps):
    """Make the loss NaN on the given (1-based) steps by scaling it inside the engine's forward."""
    forward = trainer.engine.forward

    def poisoned(batch):
        out = forward(batch)
        if trainer.step + 1 in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    trainer.engine.forward = poisoned


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    from engine.trainer import NonFiniteLossError

    trainer = _synthetic_trainer(tmp_path, "--run.max_steps", "6")
    _poison(trainer, {3})
    result = trainer.train()
    assert result.skipped_steps == 1 and math_isnan(result.losses[2]) and result.step == 6
    records = read_metrics(tmp_path / "run")
    assert records[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())

    trainer = _synthetic_trainer(tmp_path / "b", "--run.max_steps", "20", "--run.max_nonfinite_in_a_row", "3")
    _poison(trainer, {5, 6, 7, 8})
    with pytest.raises(NonFiniteLossError, match="step 7: 3 non-finite steps in a row"):
        trainer.train()
    # The last good checkpoint (step 4) is still what `latest` names.
    assert (tmp_path / "b/run/checkpoints/latest").read_text().strip() == "step_00000004"


def math_isnan(x):
    return x != x
