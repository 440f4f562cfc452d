"""Run config, DeepSpeed JSON, schedules and optimizers (fast, single process)."""
import math
import pathlib

import pytest
import torch

from engine.config import RunConfig, load_run_config, preset_config_path
from engine.distributed.deepspeed_config import deepspeed_config
from engine.optim import Adafactor, AdamWScale
from engine.schedules import lr_at

PRESETS = ["t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b", "t5-v1_1-small", "t5-v1_1-base",
           "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl", "tiny"]


def test_overrides_types_and_lists(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nmax_steps = 7\n[data]\npaths = ["x.json.gz"]\n[optim]\nlr = 0.5\n')
    cfg = load_run_config(["--config", str(toml), "--data.paths", "a.json.gz", "c4/*.json.gz",
                           "--run.seed=3", "--optim.betas", "0.8", "0.9", "--run.demo", "false"])
    assert cfg.run.max_steps == 7 and cfg.optim.lr == 0.5 and cfg.run.seed == 3
    assert cfg.data.paths == ["a.json.gz", "c4/*.json.gz"]
    assert cfg.optim.betas == [0.8, 0.9] and cfg.run.demo is False


@pytest.mark.parametrize("argv, needle", [
    (["--optim.lrr", "1"], "'optim.lrr'"),
    (["--nosection.key", "1"], "'nosection.key'"),
    (["--run.max_steps", "ten"], "'run.max_steps'"),
    (["--run.max_steps", "0"], "'run.max_steps'"),
    (["--optim.name", "sgd"], "'optim.name'"),
    (["--run.demo", "maybe"], "'run.demo'"),
    (["--deepspeed.offload_params", "true"], "'deepspeed.offload_params'"),
    (["--run.max_steps"], "'run.max_steps'"),
    (["--data.num_workers", "-1"], "'data.num_workers'"),
    (["--data.strict", "maybe"], "'data.strict'"),
])
def test_bad_keys_and_values_name_the_key(argv, needle):
    with pytest.raises(ValueError) as err:
        load_run_config(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_toml_error_names_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match=r"bad\.toml: unknown config key 'optim.learning_rate'"):
        load_run_config(["--config", str(toml)])
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_run_config(["--config", str(tmp_path / "missing.toml")])


@pytest.mark.parametrize("preset", PRESETS)
def test_ready_configs_load_and_batch_sizes_agree(preset):
    path = preset_config_path(preset)
    assert path.is_file(), path
    cfg = load_run_config(["--config", str(path)])
    assert cfg.model.preset == preset
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    if preset != "tiny":
        assert cfg.deepspeed.precision == "bf16" and ds["train_batch_size"] == 128  # the paper's batch


def test_deepspeed_config_precision_and_offload():
    cfg = RunConfig()
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.deepspeed.offload_optimizer = 3, "bf16", True
    cfg.deepspeed.offload_params = True
    ds = deepspeed_config(cfg, 4)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params = 0, False, False
    assert "bf16" not in deepspeed_config(cfg, 4)  # ZeRO 0 bf16 = autocast with fp32 weights


def test_schedules():
    cfg = RunConfig().schedule
    cfg.name, cfg.warmup_steps = "inverse_sqrt", 10_000
    for step in (1, 5000, 10_000, 40_000):  # T5: 1/sqrt(max(step, 10^4))
        assert lr_at(step, 0.01, cfg, 100_000) == pytest.approx(1 / math.sqrt(max(step, 10_000)))
    cfg.name, cfg.warmup_steps, cfg.final_lr_fraction = "cosine", 10, 0.1
    assert lr_at(5, 1.0, cfg, 110) == pytest.approx(0.5)
    assert lr_at(60, 1.0, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, 1.0, cfg, 110) == pytest.approx(0.1)
    cfg.name = "linear"
    assert lr_at(60, 1.0, cfg, 110) == pytest.approx(0.55)
    cfg.name = "constant"
    assert lr_at(60, 1.0, cfg, 110) == 1.0 and lr_at(5, 1.0, cfg, 110) == 0.5


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _run(opt_cls, params, steps=5, **kw):
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params


def test_adafactor_matches_transformers():
    from transformers.optimization import Adafactor as HFAdafactor

    ours = _run(Adafactor, _params(), lr=1e-2, weight_decay=0.01)
    ref = _run(HFAdafactor, _params(), lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False,
               decay_rate=-0.8, clip_threshold=1.0, beta1=None, eps=(1e-30, 1e-3), weight_decay=0.01)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_scale_is_adamw_times_param_rms():
    plain = _run(AdamWScale, _params(), lr=1e-2, scale_by_param_rms=False, weight_decay=0.01)
    ref = _run(torch.optim.AdamW, _params(), lr=1e-2, weight_decay=0.01, eps=1e-8)
    for a, b in zip(plain, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    p0 = _params()
    rms = p0[0].detach().pow(2).mean().sqrt().item()
    scaled = _run(AdamWScale, _params(), steps=1, lr=1e-2)
    unscaled = _run(AdamWScale, _params(), steps=1, lr=1e-2, scale_by_param_rms=False)
    torch.testing.assert_close(scaled[0] - p0[0], (unscaled[0] - p0[0]) * rms, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opt_cls", [Adafactor, AdamWScale])
def test_optimizers_skip_non_finite_gradients(opt_cls):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = opt_cls(params, lr=1e-2)
    params[0].grad = torch.full((6, 5), float("nan"))
    params[1].grad = torch.ones(7)
    opt.step()
    assert opt.last_step_skipped and not opt.state
    for a, b in zip(params, before):
        assert torch.equal(a, b)


def test_configs_dir_is_packaged():
    setup = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert "configs/*.toml" in setup


def test_data_loader_keys_reach_the_config():
    cfg = load_run_config(["--data.num_workers", "2", "--data.strict", "true"])
    assert cfg.data.num_workers == 2 and cfg.data.strict is True
