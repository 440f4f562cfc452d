"""Runner, report and compare: a CPU smoke run produces the JSON, the Markdown report and the plots."""
import json
import math
import os
import sys
import types

import pytest

from benchmarks import devices, model_providers, model_suite, report, runner


def test_device_peak_table():
    assert devices.lookup_peak("NVIDIA H100 80GB HBM3").bf16_tflops == 989.4
    assert devices.lookup_peak("NVIDIA H100 PCIe").bf16_tflops == 756.5
    assert devices.lookup_peak("NVIDIA H200").hbm_tbps == 4.8
    assert devices.lookup_peak("NVIDIA A100-SXM4-80GB").bf16_tflops == 312.0
    assert devices.lookup_peak("NVIDIA A100-PCIE-40GB").memory_gb == 40
    assert devices.lookup_peak("Some Future Accelerator") is None
    cpu = devices.detect_device("cpu")
    assert cpu.slug == "cpu" and cpu.peak is None
    peak, source = devices.peak_tflops(cpu, __import__("torch").bfloat16, 1.5)
    assert peak == 1.5 and "measured" in source


def test_extrapolation_is_linear_per_layer():
    pts = [(1, {"step_s": 3.0, "peak_mem_mb": 10.0}), (2, {"step_s": 5.0, "peak_mem_mb": None})]
    assert model_suite._extrapolate(pts, 24, "step_s") == pytest.approx(3.0 + 23 * 2.0)
    assert model_suite._extrapolate(pts, 24, "peak_mem_mb") is None


def test_kernel_runner_reports_missing_and_broken_modules(monkeypatch, tmp_path):
    ok = types.ModuleType("benchmarks.kernels.bench_rms_norm")
    ok.run = lambda smoke, out_dir: [{"kernel": "rms_norm", "provider": "triton", "shape": [4, 8], "pass": "fwd",
                                      "ms": 1.0}, {"kernel": "rms_norm", "provider": "eager", "shape": [4, 8],
                                                   "pass": "fwd", "ms": 3.0}]
    broken = types.ModuleType("benchmarks.kernels.bench_gated_ffn")

    def boom(smoke, out_dir):
        raise RuntimeError("kernel exploded")

    broken.run = boom
    monkeypatch.setitem(sys.modules, "benchmarks.kernels.bench_rms_norm", ok)
    monkeypatch.setitem(sys.modules, "benchmarks.kernels.bench_gated_ffn", broken)
    monkeypatch.setattr(runner, "KERNEL_MODULES", ("bench_rms_norm", "bench_gated_ffn", "bench_nothing_here"))
    got = runner.run_kernels(True, tmp_path, log=lambda *_: None)
    assert got["modules"]["bench_rms_norm"].startswith("ok: 2")
    assert "kernel exploded" in got["modules"]["bench_gated_ffn"]
    assert got["modules"]["bench_nothing_here"].startswith("missing")
    assert len(got["records"]) == 2  # nothing invented for the missing or broken modules
    speed = report.kernel_speedups({"kernels": got})
    assert speed == [{"kernel": "rms_norm", "pass": "fwd", "shape": "4x8", "baseline": "eager", "ours_ms": 1.0,
                      "baseline_ms": 3.0, "speedup": 3.0}]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One smoke run of the model suite on the CPU: the engine, ours in plain torch, the HF baselines."""
    out = tmp_path_factory.mktemp("bench")
    env_before = dict(os.environ)
    paths = runner.run_bench(["model", "--smoke", "--device", "cpu", "--out", str(out),
                              "--providers", "t5forge,t5forge-torch,hf-sdpa,hf-sdpa-compile"], log=lambda *_: None)
    return out, paths, env_before


def test_cpu_run_writes_results_report_and_plots(cpu_run):
    out, paths, _ = cpu_run
    data = report.load_results(paths["json"])
    assert data["device"]["kind"] == "cpu" and data["versions"]["torch"]
    recs = {r["provider"]: r for r in data["model"]["records"]}
    for prov in ("t5forge", "t5forge-torch", "hf-sdpa"):
        r = recs[prov]
        assert r["status"] == "ok" and r["method"] == "measured", r
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 40 / r["step_s"])
        assert 0 < r["mfu"] < 2 and r["params"] > 0 and math.isfinite(r["loss"])
    # The same model in three implementations / set-ups.
    assert recs["t5forge"]["params"] == recs["t5forge-torch"]["params"] == recs["hf-sdpa"]["params"]
    assert recs["hf-sdpa-compile"]["status"] == "skipped"
    # What transformers chose is read back from the model, not assumed.
    assert recs["hf-sdpa"]["attn_implementation"] == recs["hf-sdpa"]["kernel_backend"] == "sdpa"
    for prov in ("t5forge", "t5forge-torch", "hf-sdpa"):  # the phases add up to the step
        ph = recs[prov]["phase_s"]
        assert sum(ph.values()) == pytest.approx(recs[prov]["step_s"], rel=0.5) and min(ph.values()) > 0
    r = recs["t5forge-torch"]
    assert r["engine"] == "torch" and r["zero_stage"] is None
    assert r["predicted_activation_mb"] == pytest.approx(r["saved_activation_mb"], rel=0.05)
    md = paths["markdown"].read_text()
    assert "CPU run" in md and "| tiny | t5forge-torch | torch, adamw | measured |" in md and "skipped" in md
    pngs = [p for k, p in paths.items() if k not in ("json", "markdown")]
    assert len(pngs) == 2
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_provider_runs_the_presets_ready_config_through_deepspeed(cpu_run):
    """tiny.toml: ZeRO 0, Adafactor; the suite overrides micro-batch, accumulation and precision only."""
    _, paths, env_before = cpu_run
    data = report.load_results(paths["json"])
    r = next(r for r in data["model"]["records"] if r["provider"] == "t5forge")
    assert r["engine"] == "deepspeed" and r["zero_stage"] == 0 and r["offload"] == "none"
    assert r["optimizer"] == "adafactor" and r["precision"] == "bf16 autocast, fp32 weights"
    assert r["steps_skipped"] == 0 and r["run_config"].startswith("engine/configs/tiny.toml")
    ds = r["deepspeed_config"]
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 2 and ds["zero_optimization"]["stage"] == 0
    assert "ZeRO-0 (DDP): device" in r["plan"]
    md = paths["markdown"].read_text()
    assert "| tiny | t5forge | DeepSpeed ZeRO-0, adafactor, bf16 autocast, fp32 weights | measured |" in md
    row = next(line for line in md.splitlines() if line.startswith("| tiny | t5forge |"))
    assert row.split(" | ")[5] == " / ".join(f"{r['phase_s'][k] * 1e3:.0f}" for k in ("forward", "backward", "optimizer"))
    assert "- tiny: engine/configs/tiny.toml; micro_batch_size 2" in md
    # The one-rank world leaves no launcher variables behind (engine.distributed.process_group.launched_distributed reads them).
    assert {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")} == \
        {k: env_before.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}


def test_zero3_cpu_offload_run(tmp_path):
    paths = runner.run_bench(["model", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--providers", "t5forge",
                              "--offload", "always", "--steps", "1", "--warmup", "0"], log=lambda *_: None)
    r = report.load_results(paths["json"])["model"]["records"][0]
    assert r["status"] == "ok" and r["method"] == "measured", r
    assert r["zero_stage"] == 3 and r["offload"] == "optimizer+params" and math.isfinite(r["loss"])
    assert r["precision"] == "bf16 weights, fp32 master"
    zero = r["deepspeed_config"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert "| tiny | t5forge | DeepSpeed ZeRO-3 + offload optimizer+params, adafactor" in paths["markdown"].read_text()
    assert "measured, CPU offload" in paths["markdown"].read_text()


def _gpu(memory_gb: float) -> devices.DeviceInfo:
    return devices.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", "h100", int(memory_gb * 2**30), 0, 16, 16,
                              devices.lookup_peak("NVIDIA H100 80GB HBM3"))


@pytest.mark.parametrize("preset,gpu_gb,host_gb,offload,method", [
    ("t5-small", 80, 128, "auto", "measured"),
    # 11B under ZeRO-3 (one rank): ~200 GiB of states; offloaded, DeepSpeed's estimate is ~300 GiB of host.
    ("t5-11b", 80, 128, "auto", "extrapolated"),
    ("t5-11b", 80, 1024, "auto", "offload"),
    ("t5-11b", 80, 1024, "never", "extrapolated"),
    ("t5-small", 80, 128, "always", "offload"),
    ("t5-v1_1-xl", 24, 512, "auto", "offload"),
])
def test_engine_plan_chooses_own_config_offload_or_extrapolation(preset, gpu_gb, host_gb, offload, method):
    scfg = model_suite.ModelSuiteConfig(batch_size=8, host_memory_limit_gb=host_gb, offload=offload)
    run_cfg = model_providers.engine_run_config(preset, scfg, on_cpu=False)
    mcfg = model_providers.engine_model_config(preset, run_cfg)
    got = model_suite.plan_engine_run(mcfg, run_cfg, scfg, _gpu(gpu_gb))
    assert got["method"] == method, got["plan"]
    if method == "extrapolated":
        assert "does not fit" in got["plan"]


def test_cpu_device_never_offloads_automatically():
    scfg = model_suite.ModelSuiteConfig(batch_size=8, memory_limit_gb=0.001, host_memory_limit_gb=4096)
    run_cfg = model_providers.engine_run_config("t5-small", scfg, on_cpu=True)
    cpu = devices.detect_device("cpu")
    got = model_suite.plan_engine_run(model_providers.engine_model_config("t5-small", run_cfg), run_cfg, scfg, cpu)
    assert got["method"] == "extrapolated" and "no offload on a CPU device" in got["plan"]


def test_baseline_follows_the_ready_configs_checkpointing():
    cfg = model_providers.load_config("tiny", depth=1, on_cpu=True, checkpointing=True)
    hf = model_providers.build_model("hf-sdpa", cfg, __import__("torch").device("cpu"), __import__("torch").float32)
    assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing


def test_compare_two_results(cpu_run, tmp_path, capsys):
    _, paths, _ = cpu_run
    a = report.load_results(paths["json"])
    b = json.loads(json.dumps(a))
    for r in b["model"]["records"]:
        if r.get("seqs_per_s"):
            r["seqs_per_s"] *= 2
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(b))
    assert report.compare_main([str(paths["json"]), str(b_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("tiny / t5forge") and "seqs_per_s" in x)
    assert line.split()[-1] == "2.000"
    assert report.compare_main([str(paths["json"]), str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert report.compare_main([str(paths["json"]), str(tmp_path / "bad.json")]) == 2
    assert "bad.json:1" in capsys.readouterr().err


def test_extrapolated_presets_are_labelled(tmp_path):
    paths = runner.run_bench(["model", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--providers",
                              "t5forge,t5forge-torch", "--memory-limit-gb", "0.001", "--steps", "1", "--warmup", "0"],
                             log=lambda *_: None)
    recs = {r["provider"]: r for r in report.load_results(paths["json"])["model"]["records"]}
    for rec in recs.values():
        assert rec["status"] == "ok" and rec["method"] == "extrapolated" and rec["layers_measured"] == [1, 2], rec
        assert [p["depth"] for p in rec["measured_points"]] == [1, 2] and rec["loss"] is None
    # The engine's depth-reduced runs still train under the preset's ZeRO config.
    assert recs["t5forge"]["zero_stage"] == 0 and recs["t5forge"]["deepspeed_config"]["zero_optimization"]["stage"] == 0
    md = paths["markdown"].read_text()
    assert "| tiny | t5forge | DeepSpeed ZeRO-0" in md and "| tiny | t5forge-torch | torch, adamw | extrapolated |" in md


def test_bench_cli_rejects_bad_input(capsys):
    assert runner.bench_main(["model", "--smoke", "--presets", "t5-huge"]) == 2
    assert "t5-huge" in capsys.readouterr().err
    assert runner.bench_main(["model", "--smoke", "--providers", "megatron"]) == 2
    capsys.readouterr()
    for flags, expected in [(["--warmup", "-1"], "--warmup must be >= 0, got -1"),
                            (["--steps", "0"], "--steps must be >= 1, got 0"),
                            (["--memory-limit-gb", "-2"], "--memory-limit-gb must be > 0 GiB, got -2")]:
        assert runner.bench_main(["model", "--smoke", *flags]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_bench_out_onto_a_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    """`--out FILE` (issue 15: FileExistsError traceback after the ceilings were measured): one line, exit 2,
    the file untouched, nothing measured."""
    target = tmp_path / "results.json"
    target.write_text("keep me")
    monkeypatch.setattr(runner.devices, "measure_ceilings", lambda *a: pytest.fail("measured before checking --out"))
    for out in (target, target / "sub"):
        assert runner.bench_main(["model", "--smoke", "--device", "cpu", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}:" in err and "error" in err and len(err.strip().splitlines()) == 1, err
    assert target.read_text() == "keep me"
    with pytest.raises(SystemExit):
        runner.parse_args(["model", "--offload", "sometimes"])
