"""The trainer reads no loss to the host per micro-batch: the host reads of a step do not grow with
batch.grad_accum (losses accumulate on the device and cross once per step, with the all-reduce)."""
import sys
import pathlib

from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from engine_synthetic import SyntheticData  # noqa: E402

HOST_READS = {"item", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__"}


class _CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _host_reads_per_step(tmp_path, accum: int, z_loss: str) -> tuple[int, float]:
    from engine.config import load_run_config
    from engine.train import build_trainer

    cfg = load_run_config(["--run.dir", str(tmp_path / f"run{accum}"), "--model.vocab_size", "128",
                           "--model.preset", "tiny", "--batch.micro_batch_size", "2", "--batch.grad_accum",
                           str(accum), "--optim.z_loss", z_loss, "--run.threads", "1", "--run.progress", "false",
                           "--run.demo", "false", "--run.tensorboard", "false", "--run.max_steps", "3"])
    trainer, _ = build_trainer(cfg, data=SyntheticData(100, 2), tokenizer_vocab=100)
    trainer.train_step()  # the optimizer's state and the data iterator exist from here on
    with _CountHostReads() as mode:
        metrics = trainer.train_step()
    return mode.reads, metrics["loss"]


def test_host_reads_do_not_grow_with_grad_accum(tmp_path):
    for z in ("0", "1e-4"):
        one, loss_one = _host_reads_per_step(tmp_path / z, 1, z)
        four, loss_four = _host_reads_per_step(tmp_path / z, 4, z)
        assert one == four, (z, one, four)
        assert loss_one > 0 and loss_four > 0
