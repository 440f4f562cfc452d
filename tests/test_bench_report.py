"""Runner, report and compare: a CPU smoke run produces the JSON, the Markdown report and the plots."""
import json
import sys
import types

import pytest

from benchmarks import devices, model_suite, report, runner


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
    """One smoke run of the model suite on the CPU, ours and the Hugging Face baseline."""
    out = tmp_path_factory.mktemp("bench")
    paths = runner.run_bench(["model", "--smoke", "--device", "cpu", "--out", str(out),
                              "--providers", "t5forge,hf-sdpa,hf-sdpa-compile"], log=lambda *_: None)
    return out, paths


def test_cpu_run_writes_results_report_and_plots(cpu_run):
    out, paths = cpu_run
    data = report.load_results(paths["json"])
    assert data["device"]["kind"] == "cpu" and data["versions"]["torch"]
    recs = {r["provider"]: r for r in data["model"]["records"]}
    for prov in ("t5forge", "hf-sdpa"):
        r = recs[prov]
        assert r["status"] == "ok" and r["method"] == "measured", r
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 40 / r["step_s"])
        assert 0 < r["mfu"] < 2 and r["params"] > 0
    assert recs["t5forge"]["params"] == recs["hf-sdpa"]["params"]  # same model, two implementations
    assert recs["hf-sdpa-compile"]["status"] == "skipped"
    r = recs["t5forge"]
    assert r["predicted_activation_mb"] == pytest.approx(r["saved_activation_mb"], rel=0.05)
    md = paths["markdown"].read_text()
    assert "CPU run" in md and "| tiny | t5forge | measured |" in md and "skipped" in md
    pngs = [p for k, p in paths.items() if k not in ("json", "markdown")]
    assert len(pngs) == 2
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_results(cpu_run, tmp_path, capsys):
    _, paths = cpu_run
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
                              "t5forge", "--memory-limit-gb", "0.001", "--steps", "1"], log=lambda *_: None)
    rec = report.load_results(paths["json"])["model"]["records"][0]
    assert rec["method"] == "extrapolated" and rec["layers_measured"] == [1, 2]
    assert [p["depth"] for p in rec["measured_points"]] == [1, 2]
    assert "| tiny | t5forge | extrapolated |" in paths["markdown"].read_text()


def test_bench_cli_rejects_bad_input(capsys):
    assert runner.bench_main(["model", "--smoke", "--presets", "t5-huge"]) == 2
    assert "t5-huge" in capsys.readouterr().err
    assert runner.bench_main(["model", "--smoke", "--providers", "megatron"]) == 2
