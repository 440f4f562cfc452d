"""`t5forge finetune`: fine-tune a pretrained T5 on text-to-text tasks, with the pretraining trainer.

    t5forge finetune --config engine/tasks/sst2_demo.toml
    t5forge finetune --config FILE --finetune.method adapters --finetune.d_adapter 64
    deepspeed --num_gpus 8 --module engine.finetune --config FILE --deepspeed.zero_stage 2
    deepspeed --num_gpus 2 --module engine.finetune --config FILE --run.device cpu   # 2 CPU ranks (gloo)

Under the deepspeed launcher it runs like `engine.train` (see its docstring): --local_rank is ignored,
every rank reads the config, the global batch is micro_batch_size x grad_accum x ranks.

The config is a pretraining run config (engine/config.py: [run], [batch], [optim], [schedule],
[checkpoint], [deepspeed], [model] dropout/kernels) plus a [finetune] section and one [[tasks]] table
per task:

    [finetune]
    init = "t5-small-hf/"        # a Hugging Face directory, or one of our checkpoints (run/checkpoints/step_N)
    method = "full"              # full | adapters | gradual_unfreezing
    eval_metric = "sst2/accuracy"
    [[tasks]]
    name = "sst2"
    train = "glue_data/SST-2/train.tsv"   # a file or a data directory (searched with the task's layouts)
    eval = "glue_data/SST-2/dev.tsv"

Every `finetune.eval_every` steps each task's eval examples are decoded (greedy or beam search) and
scored; the scores go to metrics.jsonl and the best model by `finetune.eval_metric` is written to
RUN_DIR/best (a Hugging Face directory, or the adapter file with adapters) with its scores. With several
ranks each decodes a share of the eval set and the outputs are gathered before scoring; under ZeRO-3
the model is gathered into a whole copy on every rank for the evaluation (one model's memory).
Tasks of your own: `task_modules = ["my_tasks.py"]` in [finetune] imports a file that registers them.
"""
from __future__ import annotations

import itertools
import json
import pathlib
import sys

import torch

from engine import config as run_config
from engine.config import FinetuneSection, TaskEntry  # its sections, beside every other section
from engine.finetune_init import load_init_model, own_tokenizer
from engine.tasks.evaluation import evaluate_tasks, gathered_copy, is_zero3_partitioned
from engine.trainer import Trainer
from engine.unfreezing import GradualUnfreezer

__all__ = ["finetune_main", "FinetuneTrainer", "MixtureBatches", "evaluate_tasks", "parse_finetune_config"]

def parse_finetune_config(argv: list[str]):
    """(RunConfig, FinetuneSection, [TaskEntry]) from `--config FILE`s and `--section.key VALUE`s.
    [finetune] and [[tasks]] are read here; every other section is the pretraining run config's."""
    from engine.tasks import get_task

    configs, overrides = run_config.parse_overrides(argv)
    cfg, ft, tasks = run_config.RunConfig(), FinetuneSection(), []
    cfg.run.dir, cfg.run.demo = "runs/finetune", False
    # T5 fine-tunes at a constant 1e-3 (Adafactor), no warm-up: the pretrained model needs none.
    cfg.schedule.name, cfg.schedule.warmup_steps, cfg.optim.lr = "constant", 0, 1e-3
    for path in configs:
        doc = run_config.read_toml(path)
        where = f"{pathlib.Path(path)}: "
        base = pathlib.Path(path).parent  # input paths of a config file are relative to it (engine/config.py)
        run_config.resolve_input_paths(doc, base, run_config.INPUT_PATH_KEYS + ("finetune.init", "finetune.tokenizer"))
        run_config.set_fields(ft, doc.pop("finetune", {}), where, "finetune.")
        entries = doc.pop("tasks", [])
        if entries:
            tasks = []
        for number, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            if isinstance(entry, dict):
                for key in ("train", "eval"):
                    if key in entry:
                        entry[key] = run_config.resolve_against(base, entry[key])
            task = TaskEntry()
            run_config.set_fields(task, entry, where, f"tasks[{number}].")
            tasks.append(task)
        run_config.apply_sections(cfg, doc, where)  # every other section is the run config's
    for key, words in overrides:
        if key.startswith("finetune."):
            run_config.set_fields(ft, {key.split(".", 1)[1]: words if len(words) > 1 else words[0]}, "", "finetune.")
        else:
            run_config.set_key(cfg, key, words)
    run_config.validate(cfg)
    if not ft.init:
        raise ValueError("config key 'finetune.init': a pretrained model directory is required")
    if ft.method not in run_config.FINETUNE_METHODS:
        raise ValueError(f"config key 'finetune.method': {ft.method!r} is not one of {', '.join(run_config.FINETUNE_METHODS)}")
    for key in ("d_adapter", "unfreeze_every", "max_input_length", "max_target_length", "eval_every",
                "eval_batch_size", "num_beams"):
        if getattr(ft, key) < 1:
            raise ValueError(f"config key 'finetune.{key}': must be >= 1, got {getattr(ft, key)}")
    ft.eval_max_length = ft.eval_max_length or ft.max_target_length
    if not tasks:
        raise ValueError("config: no [[tasks]] table (each needs name = ... and train = ...)")
    for module in ft.task_modules:
        import_task_module(module)
    for number, task in enumerate(tasks):
        if task.objective:
            from engine.data.objectives import OBJECTIVES

            if task.objective not in OBJECTIVES:
                raise ValueError(f"config key 'tasks[{number}].objective': {task.objective!r} is not one of "
                                 f"{', '.join(OBJECTIVES)}")
            if not task.train or task.eval or task.size < 1 or not task.name:
                raise ValueError(f"config key 'tasks[{number}]': an objective source needs name, train (JSON "
                                 "lines files) and size >= 1, and has no eval")
            continue
        try:
            get_task(task.name)
        except ValueError as err:
            raise ValueError(f"config key 'tasks[{number}].name': {err}") from None
    return cfg, ft, tasks


def _train_source(number: int, task: TaskEntry, ft: FinetuneSection, tokenizer, seed: int):
    """The mixture source of one [[tasks]] entry: a registered task's examples, or an objective on documents."""
    from engine.mixtures import objective_source, text_task_source
    from engine.tasks import get_task

    if not task.objective:
        return text_task_source(get_task(task.name), task.train, task.train_split, tokenizer, ft.max_input_length,
                                ft.max_target_length, limit=task.limit or None)
    from engine.data.c4 import C4Reader

    try:  # every pass reads the files in the same seeded order: the resume contract of objective_source
        C4Reader(task.train)  # missing files are reported now, not at the first draw
        return objective_source(task.name, lambda: C4Reader(task.train, seed=seed, epochs=1), tokenizer, task.size,
                                objective=task.objective, inputs_length=ft.max_input_length,
                                targets_length=ft.max_target_length, seed=seed)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"config key 'tasks[{number}]': {err}") from None


def import_task_module(name: str) -> None:
    """Import a module (dotted name) or a .py file whose import registers tasks (engine/tasks/registry.py).
    Every rank imports it, so tasks of one's own work under the deepspeed launcher too."""
    import importlib
    import importlib.util

    if name.endswith(".py"):
        path = pathlib.Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"config key 'finetune.task_modules': file not found: {path}")
        module_name = f"t5forge_tasks_{path.stem}"
        if module_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ValueError(f"config key 'finetune.task_modules': cannot import {name!r} ({err})") from None


class MixtureBatches:
    """Micro-batches drawn from a task mixture; resumable (the mixture's state is the data state).

    Every rank runs the same seeded mixture and keeps its own slice of each run of `micro_batch_size *
    world_size` examples, so which examples a step trains on does not depend on how the global batch
    is split: W ranks see what one rank sees with W accumulation steps of the same micro-batch."""

    def __init__(self, mixture, micro_batch_size: int, pad_id: int = 0, rank: int = 0, world_size: int = 1):
        self.mixture = mixture
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        from engine.mixtures import collate

        stream = iter(self.mixture)
        start = self.rank * self.micro_batch_size
        while True:
            examples = [example for _, example in itertools.islice(stream, self.micro_batch_size * self.world_size)]
            yield collate(examples[start:start + self.micro_batch_size], pad_id=self.pad_id)

    def state_dict(self) -> dict:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.mixture.load_state_dict(state)


class FinetuneTrainer(Trainer):
    """The pretraining Trainer plus what fine-tuning adds around each step: the unfreezing schedule
    before it, evaluation and best-model keeping after it. The step itself is the Trainer's.

    Evaluation is split across the ranks (see `evaluate_tasks`); under ZeRO-3 it runs on a gathered
    copy of the model (`gathered_copy`, made with `build_model`), which rank 0 also saves as the best."""

    progress_label = "finetune"

    def __init__(self, cfg, engine, data, *, ft: FinetuneSection, tokenizer, eval_sets, unfreezer=None,
                 optimizer=None, best_writer=None, build_model=None, **kwargs):
        super().__init__(cfg, engine, data, **kwargs)
        self.ft = ft
        self.build_model = build_model  # a fresh model of the trained architecture (ZeRO-3 evaluation)
        self.tokenizer = tokenizer
        self.eval_sets = eval_sets
        self.unfreezer = unfreezer
        self.best_writer = best_writer
        self.best_score: float | None = None
        self.best_step = 0
        self.eval_history: list[dict] = []
        # Told which parameters the unfreezer froze (engine/optim.py set_frozen): under DeepSpeed they keep
        # requires_grad and a zero gradient, and would otherwise still be stepped.
        self.optimizer = optimizer if hasattr(optimizer, "set_frozen") else None
        self._tell_frozen()

    def _tell_frozen(self) -> None:
        if self.unfreezer is None or self.optimizer is None:
            return
        self.optimizer.set_frozen(name for name, p in self.engine.module.named_parameters()
                                  if self.unfreezer.is_frozen(p))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step", 0)

    def train_step(self) -> dict:
        # The frozen set follows from the step alone, so a resumed run recomputes it here.
        if self.unfreezer is not None and self.unfreezer.apply(self.step):
            self._tell_frozen()
        metrics = super().train_step()
        last = self.step == self.cfg.run.max_steps
        if self.eval_sets and (self.step % self.ft.eval_every == 0 or last):
            self.evaluate()
        return metrics

    def _eval_model(self) -> torch.nn.Module:
        module = self.engine.module
        if not is_zero3_partitioned(module):
            return module
        if self.build_model is None:
            raise ValueError("config key 'deepspeed.zero_stage': evaluating a ZeRO-3 model needs "
                             "FinetuneTrainer(build_model=...) to gather it into")
        return gathered_copy(module, self.build_model)

    def evaluate(self) -> dict[str, float]:
        """Decode and score the eval sets on every rank's share; keep the best model (rank 0 writes)."""
        model = self._eval_model()
        scores = evaluate_tasks(model, self.tokenizer, self.eval_sets, batch_size=self.ft.eval_batch_size,
                                max_input_length=self.ft.max_input_length, max_length=self.ft.eval_max_length,
                                num_beams=self.ft.num_beams, rank=self.engine.rank,
                                world_size=self.engine.world_size)
        metric = self.ft.eval_metric or next(iter(scores))
        if metric not in scores:
            raise ValueError(f"config key 'finetune.eval_metric': {metric!r} is not reported; "
                             f"available: {', '.join(scores)}")
        record = {"step": self.step, **{f"eval/{k}": v for k, v in scores.items()}}
        self.eval_history.append(record)
        self.logger.log(record)
        if self.best_score is None or scores[metric] > self.best_score:
            self.best_score, self.best_step = scores[metric], self.step
            if self.is_main and self.best_writer is not None:
                self.best_writer(model, {"step": self.step, "metric": metric, "scores": scores})
        # The others wait here rather than in the next step's collectives, so a failed write is
        # reported while every rank is still at this step.
        self.engine.barrier()
        return scores


def _best_writer(run_dir: pathlib.Path, method: str, tokenizer_file: str):
    """Writes RUN_DIR/best: a Hugging Face directory (full / unfreezing) or the adapters alone, with the
    tokenizer (engine/tokenizer_files.py: write_tokenizer)."""
    import shutil

    from engine.tokenizer_files import write_tokenizer
    from models.adapters import save_adapters
    from models.hf_checkpoint import save_pretrained

    def write(model, info: dict) -> None:
        tmp, best = run_dir / "best.tmp", run_dir / "best"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if method == "adapters":
            save_adapters(model, tmp / "adapters.safetensors")
        else:
            save_pretrained(model, tmp)
        write_tokenizer(tokenizer_file, tmp)
        (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(best, ignore_errors=True)
        tmp.rename(best)  # never a half-written best/

    return write


def read_eval_sets(tasks: list[TaskEntry], ft: FinetuneSection) -> list:
    """(task, examples) of every [[tasks]] entry with an eval file, read before training starts; an empty
    eval set, or a `finetune.eval_metric` that no task reports, is a one-line error now rather than at the
    first evaluation (after the training it was meant to judge)."""
    from engine.tasks import get_task

    eval_sets, reported = [], []
    for number, entry in enumerate(tasks):
        if not entry.eval:
            continue
        task = get_task(entry.name)
        stop = entry.eval_skip + ft.eval_limit if ft.eval_limit else None
        examples = list(itertools.islice(task.examples(entry.eval, entry.eval_split), entry.eval_skip, stop))
        if not examples:
            skipped = f" after skipping {entry.eval_skip} (tasks[{number}].eval_skip)" if entry.eval_skip else ""
            raise ValueError(f"config key 'tasks[{number}].eval': no {entry.name} examples in "
                             f"{', '.join(entry.eval)}{skipped}")
        # The metric names a task reports: its metrics on a few examples scored against their own targets.
        sample = examples[:8]
        reported += [f"{task.name}/{name}" for name in task.evaluate(sample, [e.targets for e in sample])]
        eval_sets.append((task, examples))
    if ft.eval_metric and ft.eval_metric not in reported:
        available = f"available: {', '.join(reported)}" if reported else "no [[tasks]] entry has an eval file"
        raise ValueError(f"config key 'finetune.eval_metric': {ft.eval_metric!r} is not reported; {available}")
    return eval_sets


def build_finetune(argv: list[str]):
    """Everything a fine-tuning run needs, from argv; returns (trainer, summary line)."""
    from engine.engines import build_engine, choose_engine
    from engine.mixtures import Mixture
    from engine.optim import build_optimizer
    from engine.tokenizer_files import open_tokenizer
    from engine.build import pick_device, seed_everything, set_determinism, set_threads
    from models.adapters import add_adapters, freeze_for_adapters

    cfg, ft, tasks = parse_finetune_config(argv)
    eval_sets = read_eval_sets(tasks, ft)  # before any model is loaded: a bad eval set stops the run now
    device = pick_device(cfg)
    set_threads(cfg)
    set_determinism(cfg, device)
    kind = choose_engine(cfg, device)
    seed_everything(cfg.run.seed)
    model, tokenizer_file = load_init_model(ft, cfg, kind, device)
    tokenizer = open_tokenizer(tokenizer_file)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config key 'finetune.tokenizer': {tokenizer.vocab_size} ids do not fit the model's "
                         f"vocabulary of {model.config.vocab_size}")
    if ft.tokenizer and not ft.init.startswith("preset:") and not own_tokenizer(pathlib.Path(ft.init)):
        from engine.tokenizer_files import check_fits_model  # no copy to compare with: at least the size

        try:
            check_fits_model(tokenizer.vocab_size, model.config.vocab_size, tokenizer_file, f"finetune.init {ft.init}")
        except ValueError as err:
            raise ValueError(f"config key 'finetune.tokenizer': {err}") from None
    unfreezer = None
    if ft.method == "adapters":
        add_adapters(model, ft.d_adapter)
        trainable, total = freeze_for_adapters(model)
    elif ft.method == "gradual_unfreezing":
        unfreezer = GradualUnfreezer(model, ft.unfreeze_every, mask_gradients=kind == "deepspeed")
        unfreezer.apply(0)
    params = [p for p in model.parameters() if p.requires_grad] if ft.method == "adapters" else model.parameters()
    optimizer = build_optimizer(params, cfg.optim)
    engine = build_engine(kind, model, optimizer, cfg, device)
    seed_everything(cfg.run.seed + 1000 * (engine.rank + 1))
    sources = [_train_source(i, t, ft, tokenizer, cfg.run.seed) for i, t in enumerate(tasks) if t.train]
    if not sources:
        raise ValueError("[[tasks]]: no task has a 'train' file")
    # One mixture stream for all ranks (same seed), each rank keeping its slice: see MixtureBatches.
    mixture = Mixture(sources, ft.mixture, ft.mixture_limit or None, ft.temperature, seed=cfg.run.seed)
    data = MixtureBatches(mixture, cfg.batch.micro_batch_size, rank=engine.rank, world_size=engine.world_size)
    flops = model.config.flops_per_token(ft.max_input_length, ft.max_target_length)
    model_type, model_config = type(model), model.config

    def build_model():  # the trained architecture, for ZeRO-3 evaluation (FinetuneTrainer)
        fresh = model_type(model_config)
        if ft.method == "adapters":
            add_adapters(fresh, ft.d_adapter)
        return fresh

    trainer = FinetuneTrainer(cfg, engine, data, ft=ft, tokenizer=tokenizer, eval_sets=eval_sets, unfreezer=unfreezer,
                              optimizer=optimizer,
                              best_writer=_best_writer(pathlib.Path(cfg.run.dir), ft.method, tokenizer_file),
                              build_model=build_model, flops_per_token=flops, tokenizer_file=tokenizer_file,
                              device=device)
    rates = ", ".join(f"{name} {rate:.2f}" for name, rate in mixture.rates.items())
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: whole size
    counted = sum(n for n, trainable in sizes if trainable)
    summary = (f"t5forge finetune: {ft.method} from {ft.init} ({sum(n for n, _ in sizes) / 1e6:.1f}M parameters, "
               f"{counted / 1e6:.2f}M trainable at start), mixture {rates}, {type(engine).__name__}")
    return trainer, summary


def finetune_main(argv: list[str]) -> int:
    from engine.launcher import strip_launcher_args
    from engine.errors import USER_ERRORS, report
    from engine.trainer import NonFiniteLossError

    argv = strip_launcher_args(list(argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from engine.launcher import watch_launcher

    try:
        watch_launcher()  # stop and save when the deepspeed launcher dies (it forwards no signal on one node)
        trainer, summary = build_finetune(argv)
        resumed = trainer.resume()
        if trainer.is_main:
            print(summary + (f", resuming at step {trainer.step}" if resumed else ""), file=sys.stderr)
        result = trainer.train()
    except USER_ERRORS as err:
        return report("finetune", err)
    except NonFiniteLossError as err:
        print(f"t5forge finetune: {err}", file=sys.stderr)
        return 1
    if trainer.is_main:
        first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"),) * 2
        best = (f"; best {trainer.ft.eval_metric or 'score'} {trainer.best_score:.2f} at step {trainer.best_step} "
                f"in {trainer.run_dir / 'best'}") if trainer.best_score is not None else ""
        how = "stopped by signal, checkpoint saved" if result.stopped_by_signal else "done"
        print(f"t5forge finetune: {how} at step {result.step} of {trainer.cfg.run.max_steps} "
              f"(loss {first:.3f} -> {last:.3f}){best}", file=sys.stderr)
    trainer.engine.close()
    return 0


if __name__ == "__main__":  # `deepspeed --module engine.finetune --config FILE`
    sys.exit(finetune_main(sys.argv[1:]))
