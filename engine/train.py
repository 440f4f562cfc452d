"""`t5forge pretrain`: T5 pretraining from one command, on a laptop CPU or many GPU nodes.

    t5forge pretrain                                   # tiny model, built-in corpus, CPU, ~3 minutes
    t5forge pretrain --config engine/configs/t5-v1_1-base.toml --data.paths 'c4/en/c4-train.*.json.gz' \\
        --data.tokenizer spiece.model --run.dir runs/base
    deepspeed --num_gpus 8 --module engine.train --config engine/configs/t5-v1_1-base.toml ...
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 --module engine.train --config ...
        # hosts: one line per node, "node1 slots=8"; run.dir on a filesystem every node sees
    deepspeed --num_gpus 2 --module engine.train --deepspeed.zero_stage 2     # 2 CPU ranks (gloo)

The deepspeed launcher appends --local_rank=N, which is accepted and ignored (LOCAL_RANK is read from
the environment). Without a launcher and without a GPU, the run uses a local engine (no DeepSpeed
start-up, same Trainer); `--run.engine deepspeed` forces DeepSpeed on one process.

With no `--config` (and no other `--model.preset`), engine/configs/tiny.toml is the base config.
Running the same command on an existing `run.dir` resumes from its latest checkpoint. SIGTERM / SIGINT
save a checkpoint and exit (exit code 0). Config keys: engine/config.py.
"""
from __future__ import annotations

import sys

from engine.bad_input import bad_input_summary
from engine.build import build_trainer
from engine.config import load_run_config
from engine.demo import demo
from engine.launcher import strip_launcher_args, watch_launcher


def with_default_config(argv: list[str]) -> list[str]:
    """Without `--config`, the tiny run's file engine/configs/tiny.toml is the base (unless another
    preset is named), so `t5forge pretrain` with no arguments is exactly that file."""
    from engine.config import parse_overrides, preset_config_path

    configs, overrides = parse_overrides(argv)
    if configs or any(key == "model.preset" and words != ["tiny"] for key, words in overrides):
        return argv
    return ["--config", str(preset_config_path("tiny")), *argv]


def pretrain_main(argv: list[str]) -> int:
    from engine.errors import USER_ERRORS, report
    from engine.trainer import NonFiniteLossError

    argv = strip_launcher_args(list(argv))
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = load_run_config(with_default_config(argv))
        watch_launcher()
        trainer, model_config = build_trainer(cfg)
        resumed = trainer.resume()
        if trainer.is_main:
            params = model_config.num_parameters()
            where = f"resuming at step {trainer.step}" if resumed else "starting"
            print(f"t5forge pretrain: {cfg.model.preset} ({params / 1e6:.1f}M parameters), "
                  f"{trainer.engine.world_size} rank(s), {type(trainer.engine).__name__}, {where}; "
                  f"run dir {cfg.run.dir}", file=sys.stderr)
        result = trainer.train()
    except USER_ERRORS as err:
        return report("pretrain", err)
    except NonFiniteLossError as err:
        print(f"t5forge pretrain: {err}", file=sys.stderr)
        return 1
    if trainer.is_main:
        how = "stopped by signal, checkpoint saved" if result.stopped_by_signal else "done"
        if result.losses:
            change = f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in this run"
        else:
            change = f"already at run.max_steps = {cfg.run.max_steps}; raise it to train further"
        print(f"t5forge pretrain: {how} at step {result.step} ({change}, {result.skipped_steps} skipped steps"
              f"{bad_input_summary(trainer.data)}); checkpoint in {trainer.ckpt_root}", file=sys.stderr)
        if (cfg.run.demo and not result.stopped_by_signal and trainer.tokenizer_file
                and cfg.deepspeed.zero_stage < 3 and cfg.data.objective == "span_corruption"):
            demo(trainer.engine.module, cfg, trainer.tokenizer_file)
    trainer.engine.close()
    if result.stopped_by_signal and trainer.engine.world_size > 1:  # launchers exit non-zero: say it per rank
        print(f"t5forge pretrain: rank {trainer.engine.rank} saved step {result.step} and exits 0", file=sys.stderr)
    return 0


if __name__ == "__main__":  # `python -m engine.train` / `deepspeed --module engine.train`
    sys.exit(pretrain_main(sys.argv[1:]))
