"""`deepspeed --num_gpus 2 --module engine.finetune` on 2 CPU ranks (gloo): the same run as one rank.

One tiny model, one synthetic task registered from a `finetune.task_modules` file (every rank imports
it), 6 steps with an evaluation at steps 3 and 6. The single-rank reference takes the same global batch
as 2 accumulation steps of the same micro-batch: a loss is a token mean per micro-batch, so this (and
not one micro-batch twice as large) is what averaging two ranks' gradients computes. Plain AdamW is
elementwise, so ZeRO's flat partitions update like whole tensors and the losses agree to rounding; the
evaluation, split across the ranks, gives the scores one rank gives, and the best model is kept. At
ZeRO 3 the evaluation runs on a gathered copy of the model and the best model saved from it is whole.
"""
import json
import pathlib
import random
import subprocess

import pytest
import torch

from conftest import shared_file
from procs import free_port, repo_env

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# `outputs` is a checksum of every output text in example order: equal scores then mean the same texts.
TASK_MODULE = '''
import zlib

from engine.tasks import Task, accuracy, read_tsv, register_task

LABELS = ("cold", "hot")
register_task(Task(name="weather_ds", reader=lambda p: read_tsv(p, required=("words", "label")),
                   formatter=lambda r: (f"weather: {r['words']}", LABELS[int(r["label"])]),
                   metrics=(accuracy, lambda refs, outs: {"outputs": float(zlib.crc32("|".join(outs).encode()))})),
              replace=True)
'''
HOT, COLD = ("sea", "sand", "heat", "sol"), ("snow", "ice", "wind", "rain")
STEPS, MICRO = 6, 8




def _write_task(path, n, seed):
    rng = random.Random(seed)
    lines = ["words\tlabel"]
    for _ in range(n):
        picks = [rng.random() < 0.5 for _ in range(3)]
        lines.append(f"{' '.join(rng.choice(HOT if hot else COLD) for hot in picks)}\t{int(sum(picks) >= 2)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config file, and the single-rank reference run (made once for both stages)."""
    from engine.finetune import finetune_main
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("ft_ds")
    (root / "weather_tasks.py").write_text(TASK_MODULE)
    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      kernel_backend="torch")
    T5ForConditionalGeneration(config).save_pretrained(root / "init")
    path = root / "finetune.toml"
    path.write_text(f"""
[run]
max_steps = {STEPS}
log_every = 1
progress = false
tensorboard = false
threads = 1
device = "cpu"
[batch]
micro_batch_size = {MICRO}
[optim]
name = "adamw"
lr = 1e-2
scale_by_param_rms = false
[checkpoint]
every = 1000
[finetune]
init = "{root / 'init'}"
tokenizer = "{shared_file('tokenizers/seqio_test_t5ids_26pieces.model')}"
task_modules = ["{root / 'weather_tasks.py'}"]
max_input_length = 40
max_target_length = 8
eval_every = 3
eval_batch_size = 16
eval_metric = "weather_ds/accuracy"
[[tasks]]
name = "weather_ds"
train = "{_write_task(root / 'train.tsv', 200, seed=1)}"
eval = "{_write_task(root / 'dev.tsv', 37, seed=2)}"
""")
    single = root / "single"
    args = ["--config", str(path), "--run.dir", str(single), "--run.engine", "local", "--batch.grad_accum", "2"]
    assert finetune_main(args) == 0
    return path, root, _records(single)


def _records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval/weather_ds/accuracy" in r]
    return losses, evals, json.loads((run_dir / "best/best.json").read_text())


def _launch(config, run_dir, stage, extra=()):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "engine.finetune",
           "--config", str(config), "--run.dir", str(run_dir), "--deepspeed.zero_stage", str(stage), *extra]
    env = repo_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_finetune_matches_single_rank(setup, stage):
    config, root, (ref_losses, ref_evals, ref_best) = setup
    run = root / f"zero{stage}"
    proc = _launch(config, run, stage)
    losses, evals, best = _records(run)
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (losses, ref_losses)
    # Evaluation at steps 3 and 6 on the two ranks' shares, gathered: the single rank's scores.
    assert [r["step"] for r in evals] == [3, STEPS]
    assert evals == ref_evals
    assert ref_evals[0]["eval/weather_ds/accuracy"] < ref_evals[1]["eval/weather_ds/accuracy"] > 70
    assert best == ref_best and best["step"] == STEPS
    assert "done at step 6" in proc.stderr and "best weather_ds/accuracy" in proc.stderr
    # The best model is whole (ZeRO 3: saved from the gathered copy) and equals the single rank's.
    from models.hf_checkpoint import read_weights

    ours, ref = read_weights(run / "best"), read_weights(root / "single/best")
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method,stage,optim", [
    ("adapters", 3, "adamw"),
    ("gradual_unfreezing", 2, "adamw"),
    ("gradual_unfreezing", 2, "adafactor"),
    ("gradual_unfreezing", 3, "adamw"),
])
def test_two_rank_adapters_and_unfreezing_match_single_rank(setup, method, stage, optim):
    """Adapters (base frozen, only adapters trained and saved) and gradual unfreezing (a block per stack
    every 2 steps) under the launcher train as one rank does: same losses, scores and saved weights.

    Unfreezing under ZeRO keeps every parameter trainable (zero gradients for the frozen blocks); the
    optimizer is told the frozen names, so a block unfrozen at step 3 or 5 starts its own step count
    there (AdamW's bias correction, Adafactor's beta2_t) as on the local engine. Without it the losses
    part from step 4 on (AdamW: 2.23 vs 2.64)."""
    from engine.finetune import finetune_main
    from models.hf_checkpoint import read_weights

    config, root, _ = setup
    # AdamW eps 1e-6: at step 1 Adam's update is lr g / (|g| + eps / sqrt(1 - beta2)), and with eps = 1e-8
    # an element whose first gradient cancels to 2e-7 (the ranks' sum differing from one rank's by 1.4%
    # in rounding) moves 3e-5 apart; the clock this test is about moves the losses by 0.4.
    extra = ["--finetune.method", method, "--finetune.unfreeze_every", "2", "--finetune.d_adapter", "16",
             "--optim.name", optim, "--optim.eps", "1e-6"]
    single = root / f"single_{method}_{optim}"  # one reference per method and optimizer, for every stage
    assert (single / "best").is_dir() or finetune_main(["--config", str(config), "--run.dir", str(single), "--run.engine", "local",
                          "--batch.grad_accum", "2", *extra]) == 0
    ref_losses, ref_evals, ref_best = _records(single)
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    run = root / f"zero{stage}_{method}_{optim}"
    if method == "gradual_unfreezing":
        # Stopped after step 3 (its checkpoint) and resumed: the per-parameter step counts come back with
        # the optimizer state, the frozen set is recomputed from the step (all unfrozen by then).
        _launch(config, run, stage, [*extra, "--run.max_steps", "3"])
    proc = _launch(config, run, stage, extra)
    assert ("resuming at step 3" in proc.stderr) == (method == "gradual_unfreezing"), proc.stderr[-2000:]
    losses, evals, best = _records(run)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (losses, ref_losses)
    assert evals == ref_evals and best == ref_best
    if method == "adapters":  # the adapter file: adapters and layer norms only
        from safetensors.torch import load_file

        ours, ref = load_file(run / "best/adapters.safetensors"), load_file(single / "best/adapters.safetensors")
        assert any(".adapter." in k for k in ours) and not any(k.endswith(".q.weight") for k in ours), sorted(ours)
    else:
        ours, ref = read_weights(run / "best"), read_weights(single / "best")
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
