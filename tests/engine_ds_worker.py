"""Run under the deepspeed launcher by tests/test_engine_distributed.py (not a test module itself).

    deepspeed --num_gpus 2 tests/engine_ds_worker.py OUT_JSON RUN_ROOT STAGE [STAGE ...]

Trains the tiny model on the synthetic stream at each ZeRO stage in turn (one launch, one process
group: DeepSpeed's start-up is paid once) and writes rank 0's per-step losses to OUT_JSON.
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


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]
    out_json, run_root, stages = argv[0], argv[1], [int(s) for s in argv[2:]]
    results = {}
    for stage in stages:
        cfg = load_run_config(COMMON + ["--run.dir", f"{run_root}/zero{stage}", "--run.engine", "deepspeed",
                                        "--deepspeed.zero_stage", str(stage), "--batch.micro_batch_size", str(MICRO)])
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by the launcher
        trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, MICRO, rank=rank, world_size=world),
                                   tokenizer_vocab=VOCAB)
        result = trainer.train()
        results[str(stage)] = result.losses
    if trainer.engine.rank == 0:
        pathlib.Path(out_json).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
