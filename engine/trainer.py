"""The training loop: steps, metrics, non-finite skipping, checkpoints with exact resume, clean stops.

    trainer = Trainer(cfg, engine, data, flops_per_token=..., tokenizer_file=...)
    trainer.resume()          # from RUN_DIR/checkpoints/latest when there is one
    result = trainer.train()  # until run.max_steps, a stop signal, or too many non-finite steps

`data` is an iterable of micro-batches (dicts of LongTensors, see the contract) with `state_dict()` /
`load_state_dict()`; its state after the last consumed batch is saved per rank, with the RNG states,
so a resumed run sees exactly the batches and dropout masks the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from engine import checkpoint as ckpt
from engine.config import RunConfig
from engine.engines import Engine
from engine.metrics import MetricsLogger, device_peak_tflops, mfu
from engine.schedules import lr_at
from engine.tokenizer_files import write_tokenizer


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # the mean loss of every step run in this process
    stopped_by_signal: bool = False
    skipped_steps: int = 0


def z_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean(logsumexp(logits)^2) over the positions with a label: keeps the softmax normaliser near 1
    (PaLM, T5X), so bf16 logits do not drift."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    mask = (labels != -100).float()
    return (lse.square() * mask).sum() / mask.sum().clamp_min(1.0)


@contextlib.contextmanager
def _stop_signals_blocked():
    """SIGTERM and SIGINT held back in this thread (delivered when the block ends), where POSIX allows."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _accumulate(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """total + value as a float64 0-d tensor on value's device (no host copy)."""
    value = value.detach().double()
    return value.clone() if total is None else total.add_(value)


def count_tokens(batch: dict) -> int:
    """Tokens a step processes, input + target positions including padding (what the FLOPs count)."""
    return int(batch["input_ids"].numel() + batch["labels"].numel())


class Trainer:
    progress_label = "pretrain"  # the tqdm bar's description; subclasses name their own run
    cfg: RunConfig
    engine: Engine  # engine/engines.py: LocalEngine, or engine/distributed/zero_engine.py: ZeroEngine
    step: int  # optimizer steps done (skipped ones included: they consumed data)
    skipped_total: int
    skipped_in_a_row: int
    tokens_seen: int

    def __init__(self, cfg: RunConfig, engine, data, *, flops_per_token: float = 0.0,
                 tokenizer_file: str | None = None, device: torch.device | None = None,
                 extra_state: dict | None = None):
        self.cfg = cfg
        self.engine = engine
        self.data = data
        self.device = device or torch.device("cpu")
        self.flops_per_token = flops_per_token
        self.tokenizer_file = tokenizer_file
        self.extra_state = dict(extra_state or {})  # saved with the trainer state (e.g. the model config)
        self.run_dir = pathlib.Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.is_main = engine.rank == 0
        if self.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale(self.ckpt_root)
        engine.barrier()
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.run.tensorboard)
        self.peak_tflops = device_peak_tflops(self.device, cfg.run.peak_tflops)
        self.step = 0
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self.tokens_seen = 0
        self._data_iter = None
        self._stop_signal: int | None = None  # a SIGTERM / SIGINT this process received
        self._stop_agreed = False  # some rank was signalled: every rank saves at the end of this same step
        self._last_saved_step = -1

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_total": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row,
                "tokens_seen": self.tokens_seen, "world_size": self.engine.world_size, "config": self.cfg.to_dict(),
                "engine": type(self.engine).__name__, "zero_stage": self.cfg.deepspeed.zero_stage, **self.extra_state}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.skipped_total = state["skipped_total"]
        self.skipped_in_a_row = state["skipped_in_a_row"]
        self.tokens_seen = state["tokens_seen"]

    def save(self) -> pathlib.Path | None:
        """Every rank calls this; rank 0 makes the directory visible as `latest` once it is complete."""
        tag = ckpt.tmp_tag(self.step)
        tmp = self.ckpt_root / tag
        self.engine.barrier()
        self.engine.save(self.ckpt_root, tag)
        tmp.mkdir(parents=True, exist_ok=True)
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else {}
        ckpt.save_rank_state(tmp, self.engine.rank, ckpt.rng_state(), data_state)
        if self.is_main:
            ckpt.save_trainer_state(tmp, self.state_dict())
            if self.tokenizer_file:
                (tmp / "tokenizer").mkdir(exist_ok=True)
                write_tokenizer(self.tokenizer_file, tmp / "tokenizer", pathlib.Path(self.tokenizer_file).name)
        self.engine.barrier()
        final = None
        if self.is_main:
            final = ckpt.finalize(self.ckpt_root, self.step, self.cfg.checkpoint.keep_last)
        self.engine.barrier()
        self._last_saved_step = self.step
        return final

    def resume(self) -> bool:
        """Load RUN_DIR/checkpoints/latest if it exists (and checkpoint.resume); True when resumed."""
        if not self.cfg.checkpoint.resume:
            return False
        path, notes = ckpt.resumable_checkpoint(self.ckpt_root, self.cfg.checkpoint.on_damaged == "fallback")
        if self.is_main:
            for note in notes:
                print(f"t5forge {self.progress_label}: {note}", file=sys.stderr)
        if path is None:
            return False
        state = ckpt.load_trainer_state(path)
        self.check_compatible(path, state)
        changed = self.layout_change(state)
        if changed and not ckpt.is_portable(path):
            raise ValueError(f"checkpoint {path} was written {changed}: reshard it once with `t5forge reshard "
                             f"{self.run_dir}`, then rerun (README: Changing the number of ranks)")
        self.load_state_dict(state)
        if changed:
            self.engine.load_portable(path)
        else:
            self.engine.load(self.ckpt_root, path.name)
        if state["world_size"] == self.engine.world_size:
            rng, data_state = ckpt.load_rank_state(path, self.engine.rank)
            if hasattr(self.data, "load_state_dict"):
                self.data.load_state_dict(data_state)
            ckpt.set_rng_state(rng)
        else:
            self._reshard_rank_state(path, state["world_size"])
        self._data_iter = None
        self.logger.truncate_after(self.step)
        self._last_saved_step = self.step
        return True

    def layout_change(self, state: dict) -> str:
        """'' when this run holds the model and optimizer as the checkpoint's run did (world size, engine,
        ZeRO stage), else what differs, e.g. 'by 2 ranks, this run has 1'."""
        ours = (self.engine.world_size, type(self.engine).__name__, self.cfg.deepspeed.zero_stage)
        saved = (state["world_size"], state.get("engine", ours[1]), state.get("zero_stage", ours[2]))
        what = ("by {} rank(s), this run has {}", "by the {} engine, this run uses {}", "at ZeRO {}, this run at {}")
        return "; ".join(w.format(a, b) for w, a, b in zip(what, saved, ours) if a != b)

    def _reshard_rank_state(self, path: pathlib.Path, old_world: int) -> None:
        """Another number of ranks: the data stream re-split over this run's ranks from the old ranks' data
        states (the data's `load_resharded_state`; without one it starts again from its beginning), and
        fresh random generators seeded by run seed, step and rank (dropout cannot continue a stream that
        was split over other ranks)."""
        from engine.build import seed_everything

        old_states = [ckpt.load_rank_state(path, r)[1] for r in range(old_world)]
        reshard = getattr(self.data, "load_resharded_state", None)
        if reshard is not None:
            reshard(old_states, self.step)
        elif self.is_main:
            print(f"t5forge {self.progress_label}: the data cannot be re-split over {self.engine.world_size} "
                  "rank(s); it starts again from its beginning", file=sys.stderr)
        seed_everything(self.cfg.run.seed + 1000 * (self.engine.rank + 1) + 7_919 * self.step)

    # What may not change across a resume: the model's shape (preset, vocabulary) and the objective.
    RUNTIME_MODEL_KEYS = ("kernel_backend", "gradient_checkpointing", "dropout_rate", "torch_dtype")

    def check_compatible(self, path: pathlib.Path, state: dict) -> None:
        """One line naming what differs between checkpoint `path` and this run: the model config (preset,
        vocabulary), the objective, the tokenizer (its bytes, against the checkpoint's own copy)."""
        from engine.tokenizer_files import check_same_tokenizer, find_tokenizer

        where = f"checkpoint {path}"
        saved, ours = state.get("model_config"), self.extra_state.get("model_config")
        if isinstance(saved, dict) and isinstance(ours, dict):
            diff = [f"{k} {saved.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(saved) | set(ours))
                    if k not in self.RUNTIME_MODEL_KEYS and saved.get(k) != ours.get(k)]
            if diff:
                more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
                raise ValueError(f"{where} holds another model than this run builds: {'; '.join(diff[:4])}{more}; "
                                 "resume with its model.preset / model.vocab_size / tokenizer, or use a new run.dir")
        saved_objective = (state.get("config") or {}).get("data", {}).get("objective")
        if saved_objective is not None and saved_objective != self.cfg.data.objective:
            raise ValueError(f"{where} was trained with data.objective {saved_objective!r}, this run has "
                             f"{self.cfg.data.objective!r}; use a new run.dir to change it")
        own = find_tokenizer(path) if self.tokenizer_file else None
        if own:
            check_same_tokenizer(self.tokenizer_file, own, where)

    # ------------------------------------------------------------------------------------- steps
    def _next_batch(self) -> dict:
        fresh = self._data_iter is None
        if fresh:
            self._data_iter = iter(self.data)
        try:
            if fresh:
                # DataLoader workers start on the first batch. They inherit this signal mask: a SIGTERM /
                # SIGINT sent to every process of the job (Slurm; deepspeed's launch.py signals the whole
                # process tree) stays pending in them instead of killing them before this process saves.
                # Starting them draws a seed from the global torch RNG; a resumed run starts them at
                # another step, so that draw is undone to keep the dropout masks of an unbroken run.
                with _stop_signals_blocked(), torch.random.fork_rng(devices=[]):
                    batch = next(self._data_iter)
            else:
                batch = next(self._data_iter)
        except StopIteration:
            raise RuntimeError(f"the data ran out at step {self.step + 1}; add data or lower run.max_steps") from None
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _close_data(self) -> None:
        """Stop the DataLoader workers now (they hold SIGTERM back, so they must end through the loader's
        own shutdown); a later train() continues from the data's state, as a resume does."""
        data_iter, self._data_iter = self._data_iter, None
        if hasattr(data_iter, "close"):
            data_iter.close()

    def train_step(self) -> dict:
        """One optimizer step over batch.grad_accum micro-batches; returns the step's global metrics."""
        accum = self.cfg.batch.grad_accum
        lr = lr_at(self.step + 1, self.cfg.optim.lr, self.cfg.schedule, self.cfg.run.max_steps)
        # The losses add up where they are computed (float64, as before on the host): no device sync per
        # micro-batch; they cross to the host once per step, with the all-reduce below.
        loss_sum = z_sum = None
        tokens = 0
        info = None
        for micro in range(accum):
            batch = self._next_batch()
            out = self.engine.forward(batch)
            loss = out.loss
            if self.cfg.optim.z_loss > 0:
                z = z_loss(out.logits, batch["labels"])
                z_sum = _accumulate(z_sum, z)
                loss = loss + self.cfg.optim.z_loss * z
            # A non-finite loss still runs backward: its gradients are non-finite on every rank after
            # the reduction, so DeepSpeed's overflow check / our optimizers skip the update everywhere
            # and every rank takes part in the same collectives.
            self.engine.backward(loss)
            loss_sum = _accumulate(loss_sum, out.loss)
            tokens += count_tokens(batch)
            info = self.engine.micro_step(micro == accum - 1, lr)
        # One all-reduce per step: losses, tokens and the stop request travel together. Only the reduced
        # flag decides the stop, so every rank stops after the same step even when a signal lands between
        # this reduction and the end of the step on one rank only (it is then carried by the next step's).
        stop = 1.0 if self._stop_signal is not None else 0.0
        where = self._reduce_device()
        losses = torch.stack([loss_sum, loss_sum.new_zeros(()) if z_sum is None else z_sum.to(loss_sum.device)])
        packed = torch.cat([losses.to(where), torch.tensor([float(tokens), stop], dtype=torch.float64, device=where)])
        packed = self.engine.all_reduce_sum(packed).cpu()
        world = self.engine.world_size
        self.step += 1
        loss = packed[0].item() / (accum * world)
        finite = math.isfinite(loss)
        if not info.applied or not finite:
            self.skipped_total += 1
            # fp16 overflows while the loss scale settles are routine; only count them when the loss is bad.
            if not finite or self.cfg.deepspeed.precision != "fp16":
                self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0
        step_tokens = int(packed[2].item())
        self.tokens_seen += step_tokens
        self._stop_agreed = packed[3].item() > 0
        return {"step": self.step, "loss": loss, "z_loss": packed[1].item() / (accum * world), "lr": lr,
                "grad_norm": info.grad_norm, "tokens": step_tokens, "applied": info.applied and finite}

    def _reduce_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        return self.device if self.device.type == "cuda" and self.engine.world_size > 1 else torch.device("cpu")

    # ------------------------------------------------------------------------------------- loop
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: give up on the clean stop
        self._stop_signal = signum

    def _install_signal_handlers(self):
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return previous

    def _progress(self):
        if not (self.is_main and self.cfg.run.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.run.max_steps, initial=self.step, desc=self.progress_label, unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    def train(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(step=self.step)
        previous = self._install_signal_handlers()
        bar = self._progress()
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while self.step < cfg.run.max_steps:
                metrics = self.train_step()
                result.losses.append(metrics["loss"])
                window_tokens += metrics["tokens"]
                if self.skipped_in_a_row >= cfg.run.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"step {self.step}: {self.skipped_in_a_row} non-finite steps in a row (loss "
                        f"{metrics['loss']}); stopping, the last good checkpoint is left intact")
                if self.step % cfg.run.log_every == 0 or self.step == cfg.run.max_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record = self._record(metrics, window_tokens / elapsed)
                    self.logger.log(record)
                    if bar is not None:
                        bar.set_postfix(self._postfix(record), refresh=False)
                    window_tokens, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if self._stop_agreed:
                    self.save()
                    result.stopped_by_signal = True
                    break
                # No periodic save inside a run of non-finite steps: if it ends the run, `latest` must
                # stay on the checkpoint taken before the trouble started.
                due = self.step % cfg.checkpoint.every == 0 and self.skipped_in_a_row == 0
                if due or self.step == cfg.run.max_steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
            self._close_data()
            # After a signal stop the handlers stay: a launcher repeats the stop (deepspeed's launch.py
            # sends SIGTERM to each rank in turn) and that must not kill a rank on its way to exit code 0.
            if not result.stopped_by_signal:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        result.step = self.step
        result.skipped_steps = self.skipped_total
        return result

    def _record(self, metrics: dict, tokens_per_s: float) -> dict:
        record = {"step": metrics["step"], "loss": metrics["loss"], "lr": metrics["lr"],
                  "tokens_per_s": tokens_per_s, "grad_norm": metrics["grad_norm"],
                  "skipped_steps": self.skipped_total, "tokens_seen": self.tokens_seen}
        if self.cfg.optim.z_loss > 0:
            record["z_loss"] = metrics["z_loss"]
        counts = getattr(self.data, "bad_input_counts", None)
        if callable(counts):  # the bad input lines the readers skipped so far (restored with the data state)
            record["bad_input_lines"] = sum(counts().values())
        if getattr(self.engine, "loss_scale", None) is not None:  # fp16 only
            record["loss_scale"] = self.engine.loss_scale
        value = mfu(self.flops_per_token, tokens_per_s, self.peak_tflops, self.engine.world_size)
        if value is not None:
            record["mfu"] = value
        return record

    @staticmethod
    def _postfix(record: dict) -> dict:
        postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}",
                   "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "mfu" in record:
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        return postfix
