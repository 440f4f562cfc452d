"""`t5forge plan`: parameter counts, DeepSpeed's estimators, the activation formula against measurement."""
import json

import pytest
import torch

from benchmarks import plan
from models.config import PRESETS, T5Config

GIB = 2 ** 30
BIG = ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b",
       "t5-v1_1-small", "t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_inventory_matches_config_count(preset):
    cfg = T5Config.from_preset(preset)
    total, largest = plan.count_params(cfg)
    assert total == cfg.num_parameters()
    assert largest == max(cfg.vocab_size * cfg.d_model, (2 if cfg.is_gated else 1) * cfg.d_ff * cfg.d_model)


@pytest.mark.parametrize("preset", ["t5-11b", "t5-v1_1-xxl", "t5-v1_1-small"])
def test_inventory_matches_model_built_on_meta(preset):
    """The numbers fed to DeepSpeed equal what its model_to_params would read off the real module tree."""
    from models.t5 import T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config.from_preset(preset))
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert plan.count_params(model.config) == (total, largest)
    names = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert names == set(plan.param_inventory(model.config))


def test_zero_states_agree_with_deepspeed_and_public_figures():
    cfg = T5Config.from_preset("t5-11b")
    total, largest = plan.count_params(cfg)
    opts = {o.name: o for o in plan.zero_options(total, largest, gpus_per_node=8, nodes=1)}
    # docs/ANCHORS.md: ZeRO-3 ~24 GiB/GPU on 8 GPUs; with optimizer offload ~3 GiB/GPU + ~253 GiB host.
    assert opts["ZeRO-3"].gpu_bytes / GIB == pytest.approx(24, abs=1)
    assert opts["ZeRO-3 + offload optimizer"].gpu_bytes / GIB == pytest.approx(3, abs=0.5)
    assert opts["ZeRO-3 + offload optimizer"].host_bytes_per_node / GIB == pytest.approx(253, abs=2)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    assert opts["ZeRO-2"].gpu_bytes == estimate_zero2_model_states_mem_needs(total, 8, 1, cpu_offload=False)[1]
    # More partitioning never costs GPU memory.
    order = ["ZeRO-0 (DDP)", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    assert all(opts[a].gpu_bytes > opts[b].gpu_bytes for a, b in zip(order, order[1:]))
    four = {o.name: o for o in plan.zero_options(total, largest, gpus_per_node=8, nodes=4)}
    assert four["ZeRO-3"].gpu_bytes < opts["ZeRO-3"].gpu_bytes / 3


def test_plan_says_what_fits():
    cfg = T5Config.from_preset("t5-11b")
    kw = dict(gpus_per_node=8, micro_batch=8, inputs_length=512, targets_length=114, checkpointing=False,
              gpu_memory_gb=80, host_memory_gb=1024)
    one = plan.make_plan(cfg, "t5-11b", nodes=1, **kw)
    fits = {r["name"]: r["fits"] for r in one["options"]}
    assert not fits["ZeRO-0 (DDP)"] and not fits["ZeRO-2"] and fits["ZeRO-3"]
    assert one["recommended"] == "ZeRO-3"
    # A tiny host rules out every offload; a tiny GPU rules out everything.
    assert not any(r["fits"] for r in plan.make_plan(cfg, "t5-11b", nodes=1, **{**kw, "host_memory_gb": 8})["options"]
                   if r["offload_optimizer"])
    assert plan.make_plan(cfg, "t5-11b", nodes=1, **{**kw, "gpu_memory_gb": 4})["recommended"] is None
    ckpt = plan.make_plan(cfg, "t5-11b", nodes=1, **{**kw, "checkpointing": True})
    assert ckpt["activations"]["total"] < one["activations"]["total"] / 4


def _measured_and_predicted(preset, batch, li, lt, checkpointing):
    from benchmarks.model_providers import make_batch
    from models.t5 import T5ForConditionalGeneration

    # A small vocabulary keeps the test fast; the loss term scales with it and stays in the count.
    cfg = T5Config.from_preset(preset, dropout_rate=0.0, kernel_backend="torch", num_layers=2, vocab_size=2048,
                               num_decoder_layers=2, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).to(torch.bfloat16).train()
    b = make_batch(cfg, batch, li, lt, "cpu")
    measured = plan.measure_saved_bytes(lambda: model(**b).loss, model)
    predicted = plan.activation_bytes(cfg, batch, li, lt, checkpointing=checkpointing, backend="torch-cpu")
    return measured, predicted["saved"]


@pytest.mark.parametrize("preset,batch,li,lt", [("t5-small", 2, 64, 16), ("t5-v1_1-small", 3, 48, 24)])
def test_activation_formula_matches_saved_tensors(preset, batch, li, lt):
    measured, predicted = _measured_and_predicted(preset, batch, li, lt, checkpointing=False)
    assert predicted == pytest.approx(measured, rel=0.02)


def test_activation_formula_with_checkpointing():
    measured, predicted = _measured_and_predicted("t5-v1_1-small", 2, 64, 16, checkpointing=True)
    assert predicted == pytest.approx(measured, rel=0.02)


def test_plan_cli(capsys):
    assert plan.plan_main(["--preset", "t5-11b", "--gpus-per-node", "8", "--nodes", "4"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 + offload optimizer + params" in out and "recommended: ZeRO-" in out
    assert plan.plan_main(["--preset", "t5-v1_1-xxl", "--micro-batch", "4", "--checkpointing", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpointing"] and len(data["options"]) == 7
    assert plan.plan_main(["--preset", "t5-12b"]) == 2
    err = capsys.readouterr().err
    assert "t5-12b" in err and len(err.strip().splitlines()) == 1
    assert plan.plan_main(["--preset", "t5-small", "--nodes", "0"]) == 2


@pytest.mark.parametrize("flags,expected", [
    (["--gpu-memory-gb", "-5"], "--gpu-memory-gb must be > 0 GiB, got -5"),
    (["--gpu-memory-gb", "nan"], "--gpu-memory-gb must be > 0 GiB, got nan"),
    (["--host-memory-gb", "0"], "--host-memory-gb must be > 0 GiB, got 0"),
    (["--reserve-gb", "-100"], "--reserve-gb must be >= 0 and below --gpu-memory-gb (80), got -100"),
    (["--reserve-gb", "80"], "--reserve-gb must be >= 0 and below --gpu-memory-gb (80), got 80"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
    (["--inputs-length", "-1"], "--inputs-length must be >= 1, got -1"),
])
def test_plan_refuses_out_of_range_numbers(flags, expected, capsys):
    """Issue 15: a negative GiB budget was planned (and marked as fitting); now one line, exit 2."""
    assert plan.plan_main(["--preset", "t5-small", *flags]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and len(captured.err.strip().splitlines()) == 1 and not captured.out
