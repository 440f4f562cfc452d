"""Run under the deepspeed launcher by tests/test_engine_distributed.py (not a test module itself).

    deepspeed --num_gpus 2 tests/engine_ds_worker.py OUT_JSON RUN_ROOT RUN [RUN ...]

Trains the tiny model on the synthetic stream for each RUN in turn (one launch, one process group:
DeepSpeed's start-up is paid once) and writes rank 0's per-step losses to OUT_JSON, keyed by RUN. A RUN
is a ZeRO stage ("2": COMMON's plain AdamW) or STAGE:OPTIMIZER with an OPTIMIZER of `OPTIMIZERS`, or
"shards": test_engine_zero_optim.check_partitions (the optimizers on hand-made partitions, no training).
"""
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from engine_synthetic import SyntheticData  # noqa: E402

from engine.config import load_run_config  # noqa: E402
from engine.train import build_trainer  # noqa: E402

# Shared with the test's single-rank reference: plain AdamW is elementwise, so ZeRO's flat partitions
# give the same update as whole tensors and the runs must agree to rounding.
COMMON = ["--run.max_steps", "4", "--run.progress", "false", "--model.vocab_size", "128", "--optim.name", "adamw",
          "--optim.lr", "3e-3", "--optim.scale_by_param_rms", "false", "--schedule.name", "constant",
          "--schedule.warmup_steps", "0", "--checkpoint.every", "100", "--run.threads", "1", "--run.demo", "false",
          "--run.tensorboard", "false"]
VOCAB, MICRO = 100, 4
# Overrides on COMMON for the optimizers whose statistics are per parameter (tests/test_engine_zero_optim.py).
OPTIMIZERS = {
    "adafactor": ["--optim.name", "adafactor", "--optim.lr", "1e-2"],
    "adamw_scaled": ["--optim.scale_by_param_rms", "true", "--optim.lr", "2e-2"],
    "fp16": ["--deepspeed.precision", "fp16"],  # COMMON's AdamW, fp16 with loss scaling (tests/test_engine_fp16.py)
}


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]
    out_json, run_root, runs = argv[0], argv[1], argv[2:]
    results = {}
    for run in runs:
        if run == "shards":
            import deepspeed

            from test_engine_zero_optim import check_partitions

            deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # the group the trainers reuse
            results[run] = check_partitions()
            continue
        stage, _, optim = run.partition(":")
        directory = f"{run_root}/zero{stage}" + (f"_{optim}" if optim else "")
        cfg = load_run_config(COMMON + OPTIMIZERS.get(optim, []) +
                              ["--run.dir", directory, "--run.engine", "deepspeed", "--deepspeed.zero_stage", stage,
                               "--batch.micro_batch_size", str(MICRO)])
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by the launcher
        trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, MICRO, rank=rank, world_size=world),
                                   tokenizer_vocab=VOCAB)
        result = trainer.train()
        results[run] = result.losses
    if int(os.environ["RANK"]) == 0:
        pathlib.Path(out_json).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
