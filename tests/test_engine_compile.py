"""`run.compile`: the model step under torch.compile gives the eager run's losses and weights, on the local
engine and on DeepSpeed (its own compile hook). aot_eager keeps the CPU compile to seconds; the graphs
dynamo captures are the same ones inductor would compile."""
import pytest
import torch

from engine.build import build_trainer
from engine.config import load_run_config
from engine.engines import compile_enabled
from engine_synthetic import SyntheticData

SMALL = ["--data.input_length", "32", "--batch.micro_batch_size", "4", "--run.threads", "1",
         "--run.progress", "false", "--run.demo", "false", "--run.tensorboard", "false", "--run.log_every", "1",
         "--model.vocab_size", "128", "--model.dropout_rate", "0", "--run.max_steps", "3",
         "--checkpoint.every", "100", "--run.compile_backend", "aot_eager"]


def _train(tmp_path, name, *extra):
    torch._dynamo.reset()
    cfg = load_run_config(["--run.dir", str(tmp_path / name), *SMALL, *extra])
    trainer, _ = build_trainer(cfg, data=SyntheticData(100, 4), tokenizer_vocab=100)
    result = trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    trainer.engine.close()
    return result.losses, weights


def test_auto_is_on_for_cuda_only():
    cfg = load_run_config([])
    assert compile_enabled(cfg, torch.device("cuda")) and not compile_enabled(cfg, torch.device("cpu"))
    assert not compile_enabled(load_run_config(["--run.compile", "off"]), torch.device("cuda"))


@pytest.mark.parametrize("engine", ["local", "deepspeed"])
def test_compiled_step_equals_eager(tmp_path, engine):
    from torch._dynamo.utils import counters

    eager_losses, eager_weights = _train(tmp_path, "eager", "--run.engine", engine, "--run.compile", "off")
    counters.clear()
    losses, weights = _train(tmp_path, "compiled", "--run.engine", engine, "--run.compile", "on")
    assert counters["stats"]["unique_graphs"] >= 1   # it did run compiled
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name, w in eager_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5, msg=name)
