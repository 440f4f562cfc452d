"""The `t5forge` command: one verb per user-facing job.

    t5forge pretrain [--config FILE] [--section.key VALUE ...]
    t5forge finetune --config FILE [--section.key VALUE ...]
    t5forge export RUN_DIR OUT_DIR
    t5forge reshard RUN_DIR [--step N]
    t5forge generate --model DIR [TEXT ...]
    t5forge tokenizer train ...
    t5forge data clean-c4 WET_FILES... --out shard.json.gz
    t5forge bench ... | t5forge plan ... | t5forge compare A.json B.json

Each verb lives in its own module and is imported only when called, so `t5forge plan` does not pay
for DeepSpeed and `t5forge pretrain` does not pay for matplotlib.
"""
from __future__ import annotations

import importlib
import sys

# verb -> (module, function taking the remaining argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("engine.train", "pretrain_main", "pretrain T5 (no arguments: tiny model, built-in corpus, CPU)"),
    "finetune": ("engine.finetune", "finetune_main", "fine-tune on text-to-text tasks (full, adapters, unfreezing)"),
    "export": ("engine.export", "export_main", "write a run's checkpoint as a Hugging Face directory"),
    "reshard": ("engine.reshard", "reshard_main", "make a pretraining checkpoint resumable on another number of ranks"),
    "generate": ("engine.generate", "generate_main", "greedy, beam-search or sampled decoding from a model directory"),
    "tokenizer": ("engine.tokenizer", "tokenizer_main", "tokenizer tools: `tokenizer train`"),
    "data": ("engine.data.cli", "data_main", "data tools: `data clean-c4`"),
    "bench": ("benchmarks.runner", "bench_main", "run the kernel and model benchmark suites"),
    "plan": ("benchmarks.plan", "plan_main", "ZeRO memory plan for a preset on a cluster"),
    "compare": ("benchmarks.report", "compare_main", "show two benchmark result files side by side"),
}


def _usage() -> str:
    lines = ["usage: t5forge COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"t5forge: unknown command {verb!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[verb]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
