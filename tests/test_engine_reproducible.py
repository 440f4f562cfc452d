"""Reproducible by default (issue 15): at the default thread count two identical `t5forge pretrain` runs
give the same losses and weights bit for bit, and a SIGKILL + rerun reproduces the uninterrupted run."""
import hashlib
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.config import load_run_config
from engine.build import set_determinism
from procs import repo_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def _relative_bias_grads(calls: int = 12) -> set[str]:
    """Distinct gradients of the relative-position bias lookup (`table[buckets]`, as the model's torch
    path does) over repeated identical backwards on 2 threads."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(32, 4, generator=gen, requires_grad=True)
    buckets = torch.randint(0, 32, (32, 64, 64), generator=gen)
    grad_out = torch.randn(32, 64, 64, 4, generator=gen)
    seen = set()
    for _ in range(calls):
        table.grad = None
        table[buckets].backward(grad_out)
        seen.add(hashlib.sha1(table.grad.numpy().tobytes()).hexdigest())
    return seen


def test_default_determinism_makes_the_bias_gradient_repeatable():
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(2)
        cfg = load_run_config([])
        assert cfg.run.deterministic == "auto"
        assert set_determinism(cfg, torch.device("cpu")) is True
        assert len(_relative_bias_grads()) == 1
        cfg.run.deterministic = "off"
        assert set_determinism(cfg, torch.device("cpu")) is False
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)


def _argv(run_dir, *extra):
    # The tiny default run (engine/configs/tiny.toml) at the default thread count (run.threads 0).
    return [sys.executable, "-m", "engine.train", "--model.preset", "tiny", "--run.max_steps", "16",
            "--run.seed", "11", "--run.dir", str(run_dir), "--run.log_every", "1", "--checkpoint.every", "4",
            "--run.demo", "false", "--run.progress", "false", "--run.tensorboard", "false", *extra]


def _losses(run_dir) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], float(r["loss"]).hex()) for r in rows]


def _weights(run_dir) -> bytes:
    return (pathlib.Path(run_dir) / "checkpoints/step_00000016/model.safetensors").read_bytes()


def _wait_for_step(run_dir, step, proc, timeout=300):
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                  if line.strip()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def _env() -> dict:
    return {k: v for k, v in repo_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _kill_at_step_10_and_rerun(run_dir, env, *extra):
    """SIGKILL the run once it logged step 10 (checkpoints at 4 and 8), then run the same command again."""
    proc = subprocess.Popen(_argv(run_dir, *extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_step(run_dir, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    subprocess.run(_argv(run_dir, *extra), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)


@pytest.mark.slow
def test_two_default_runs_and_a_killed_run_are_bit_identical(tmp_path):
    env = _env()
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        subprocess.run(_argv(run), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    assert torch.get_num_threads() >= 1
    expected = _losses(runs[0])
    assert [s for s, _ in expected] == list(range(1, 17))
    assert _losses(runs[1]) == expected
    assert _weights(runs[1]) == _weights(runs[0])

    killed = tmp_path / "killed"
    _kill_at_step_10_and_rerun(killed, env)
    assert _losses(killed) == expected  # bit for bit, every step, across the kill
    assert _weights(killed) == _weights(runs[0])


@pytest.mark.slow
def test_killed_run_with_two_loader_workers_is_bit_identical(tmp_path):
    """The same with data.num_workers 2 (one process, two DataLoader worker processes): the resumed run
    replays each worker from its last consumed state (engine/data/workers.py) and matches the
    uninterrupted run with the same num_workers bit for bit, losses and weights."""
    env, workers = _env(), ("--data.num_workers", "2")
    subprocess.run(_argv(tmp_path / "ref", *workers), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    expected = _losses(tmp_path / "ref")
    assert [s for s, _ in expected] == list(range(1, 17))
    # The worker path really ran: its data state is the per-worker one (engine/data/workers.py).
    state = json.loads((tmp_path / "ref/checkpoints/step_00000016/rank_00000.data.json").read_text())
    assert state["num_workers"] == 2 and len(state["workers"]) == 2
    killed = tmp_path / "killed"
    _kill_at_step_10_and_rerun(killed, env, *workers)
    assert _losses(killed) == expected
    assert _weights(killed) == _weights(tmp_path / "ref")

