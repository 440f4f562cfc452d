"""Exact resume and clean stops of `t5forge pretrain` under `deepspeed --num_gpus 2` (CPU, gloo, ZeRO 2).

A reference run, then the same command on a second run directory: SIGKILLed as a process group (a
node failure, possibly during a save), stopped with SIGTERM sent to the `deepspeed` front-end only (`kill
PID`), with SIGTERM to the per-node launcher only (it forwards it to the ranks one by one), with SIGINT
to every process (Ctrl-C), and finally run to the end. One DataLoader worker per rank: launch.py and
Slurm signal it too. Every stop saves the step it stopped on, and
every step's loss in metrics.jsonl equals the reference bit for bit.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

from engine.metrics import read_metrics
from procs import free_port
from test_engine_distributed import REPO, _env
from test_engine_train import SMALL, _synthetic_trainer, _wait_for_step

sys.path.insert(0, str(REPO / "tests"))
from conftest import shared_file  # noqa: E402

STEPS = 60  # room for the stops: the front-end one polls, and steps take ~20 ms


def _cmd(run_dir, stage):
    data = shared_file("c4/c4-validation-sample-2k.json.gz")
    tok = shared_file("tokenizers/seqio_test_t5ids_26pieces.model")
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "engine.train",
            "--run.dir", str(run_dir), "--run.max_steps", str(STEPS), "--data.paths", str(data),
            "--data.tokenizer", str(tok), "--checkpoint.every", "2", "--model.dropout_rate", "0.1",
            "--data.shuffle_buffer", "100", "--data.num_workers", "1", "--deepspeed.zero_stage", stage, *SMALL]


def _last_step(run_dir) -> int:
    return read_metrics(run_dir)[-1]["step"] if (run_dir / "metrics.jsonl").is_file() else 0


def _project_frames(out: str) -> list:
    """Traceback frame lines (`  File "PATH", line N, in f`) whose PATH is the project's own code."""
    own = ("engine", "models", "kernels", "benchmarks", "tests")
    frames = []
    for line in out.splitlines():
        if not line.lstrip().startswith('File "'):
            continue
        path = pathlib.Path(line.split('"')[1])
        if path.resolve().is_relative_to(REPO) if path.is_absolute() else str(path).split("/")[0] in own:
            frames.append(line)
    return frames


def _launch(run_dir, stage, log):
    # A session of its own: its process group is the job (runner, launch.py, the ranks).
    return subprocess.Popen(_cmd(run_dir, stage), cwd=REPO, env=_env(), start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for_save(run_dir, step, proc, timeout=120):
    """Until the save of `step` has begun (its .tmp directory exists) or, if it was quicker than a poll, ended."""
    tmp, final = run_dir / "checkpoints" / f".tmp-step_{step:08d}", run_dir / "checkpoints" / f"step_{step:08d}"
    deadline = time.time() + timeout
    while not (tmp.is_dir() or final.is_dir()):
        assert proc.poll() is None and time.time() < deadline, f"no save of step {step}"
        time.sleep(0.005)


def _interrupt(run_dir, stage, log, how, during_save=None):
    """Launch, wait for a step the previous launches did not log (or for the save of step `during_save`),
    signal; (seconds to the last exit, log)."""
    proc = _launch(run_dir, stage, log)
    if during_save:
        _wait_for_save(run_dir, during_save, proc)
    else:
        _wait_for_step(run_dir, _last_step(run_dir) + 1, proc)
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    start = time.perf_counter()
    if how == "launcher":  # the per-node launcher only (deepspeed.launcher.launch): it forwards to the ranks
        [p for p in job if "deepspeed.launcher.launch" in p.cmdline()][0].send_signal(signal.SIGTERM)
    elif how == "front-end":  # `deepspeed` only: it forwards nothing, the ranks see it die (watch_launcher)
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, how)
    proc.wait(timeout=120)
    psutil.wait_procs(job[1:], timeout=120)
    return time.perf_counter() - start, log.read_text()


@pytest.mark.slow
def test_kill_and_signals_under_launcher_resume_bit_exact(tmp_path):
    stage = "2"
    ref = tmp_path / "ref"  # the uninterrupted run, alongside the others (most of a launch is start-up)
    ref_proc = _launch(ref, stage, tmp_path / "ref.log")
    start = time.perf_counter()

    run = tmp_path / "run"
    # A node failure during the save of step 4: `latest` stays on step 2, the next start clears the rest.
    _, out = _interrupt(run, stage, tmp_path / "kill.log", signal.SIGKILL, during_save=4)
    assert "saved step" not in out
    latest = (run / "checkpoints/latest").read_text().strip()
    assert (run / "checkpoints" / latest / "trainer_state.json").is_file()
    assert latest == "step_00000002" or not (run / "checkpoints/.tmp-step_00000004").exists()

    timings = {}
    # (SIGTERM to every process of the job, as Slurm sends it, takes the paths of these: each rank is
    # signalled directly, then again by launch.py, as with SIGINT below.)
    for how in ("front-end", "launcher", signal.SIGINT):
        name = how if isinstance(how, str) else how.name
        resumed_from = (run / "checkpoints/latest").read_text().strip()
        timings[name], out = _interrupt(run, stage, tmp_path / f"{name}.log", how)
        stopped_at = _last_step(run)
        assert f"resuming at step {int(resumed_from[5:])}" in out, out[-3000:]
        assert stopped_at < STEPS, f"{name}: the run ended before the signal"
        # Every rank saved the step it stopped on and returned 0; `latest` names that complete checkpoint.
        for rank in (0, 1):
            assert f"rank {rank} saved step {stopped_at} and exits 0" in out, out[-3000:]
        # No traceback from the project's code (on SIGINT the `deepspeed` front-end and launch.py may print
        # their own KeyboardInterrupt, or not: that is DeepSpeed's output, not counted here).
        assert not _project_frames(out), out[-3000:]
        assert (run / "checkpoints/latest").read_text().strip() == f"step_{stopped_at:08d}"
        state = json.loads((run / f"checkpoints/step_{stopped_at:08d}/trainer_state.json").read_text())
        assert state["step"] == stopped_at
        assert timings[name] < 30  # launch.py SIGKILLs a rank 30 s after its SIGTERM

    subprocess.run(_cmd(run, stage), check=True, cwd=REPO, env=_env(), capture_output=True, timeout=300)
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    expected = [(r["step"], r["loss"]) for r in read_metrics(ref)]
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))
    got = [(r["step"], r["loss"]) for r in read_metrics(run)]
    assert got == expected  # bit for bit, every step
    assert not list((run / "checkpoints").glob(".tmp-*"))
    print("signal to last exit (s):", {k: round(v, 2) for k, v in timings.items()},
          f"whole chain {time.perf_counter() - start:.1f} s")


def test_a_signal_after_the_step_reduction_stops_at_the_next_step(tmp_path):
    """Ranks stop on the reduced flag only: a signal that lands on one rank after a step's all-reduce
    (the other ranks saw no stop there) is carried by the next step's, and every rank saves that step."""
    trainer = _synthetic_trainer(tmp_path, "--run.max_steps", "10", "--checkpoint.every", "100")
    reduce = trainer.engine.all_reduce_sum

    def reduce_then_signal(tensor):
        out = reduce(tensor)
        if trainer.step == 2:  # inside step 3, after its reduction
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.engine.all_reduce_sum = reduce_then_signal
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.stopped_by_signal and result.step == 4
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000004"
    assert not (tmp_path / "run/checkpoints/step_00000003").exists()
