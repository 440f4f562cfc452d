"""`t5forge bench gpu` (benchmarks/evidence.py): the smoke run of the whole evidence path, as CI runs it,
and the parts that must hold on a GPU: refusing the interpreter there, keeping what a cut-short run measured,
and correctness checks that catch a wrong kernel."""
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import devices, evidence, evidence_checks
from procs import REPO, repo_env

PARTS = ("environment", "correctness", "kernels", "host_ops", "model_steps", "decode", "pretrain", "t5_11b")


@pytest.mark.slow
def test_smoke_run_writes_every_part_and_the_summary(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine", "bench", "gpu", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=repo_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("evidence-smoke-*.json")
    data = json.loads(path.read_text())
    assert tuple(data["parts"]) == PARTS
    for name in PARTS:
        assert data["parts"][name]["status"] == "ok", (name, data["parts"][name])
    checks = data["parts"]["correctness"]["records"]
    assert {r["check"] for r in checks} >= {"rms_norm", "ffn_gated_gelu", "t5_attention_decoder_causal",
                                            "model_tiny_triton_vs_torch"} and all(r["pass"] for r in checks)
    steps = {r["provider"]: r for r in data["parts"]["model_steps"]["records"]}
    assert steps["t5forge"]["status"] == steps["hf-sdpa"]["status"] == "ok"
    ada = data["parts"]["host_ops"]["optimizer"]["adafactor"]
    assert 0 < ada["fused"] < ada["reference"]
    assert data["parts"]["pretrain"]["steps"] == 4 and data["parts"]["pretrain"]["tokens_per_s_median"] > 0
    assert path.with_suffix(".md").read_text().startswith("# t5forge evidence run")
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    tail = proc.stdout.strip().splitlines()
    summary = tail[tail.index("summary against the targets (docs/ANCHORS.md):") + 1:]
    assert summary == [f"  {line}" for line in data["summary"]]
    assert any("correctness: 11/11 checks passed" in line for line in summary)


def test_interpreter_on_a_gpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = devices.DeviceInfo(kind="cuda", name="NVIDIA H200", slug="nvidia-h200", memory_bytes=141 << 30,
                              host_memory_bytes=1 << 30, cpu_count=1, threads=1, peak=None)
    with pytest.raises(ValueError, match="must run compiled"):
        evidence.check_machine(info, smoke=False)
    with pytest.raises(ValueError, match="needs a GPU"):
        evidence.check_machine(devices.detect_device("cpu"), smoke=False)


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "environment", lambda info, smoke: {"status": "ok", "ceilings": {"matmul_tflops": 1.0}})
    monkeypatch.setattr(evidence_checks, "run", lambda device, smoke: {"status": "ok", "records": []})

    def killed(slot):
        raise KeyboardInterrupt   # the GPU lease ends here

    monkeypatch.setattr(evidence.evidence_runs, "kernels", killed)
    with pytest.raises(KeyboardInterrupt):
        evidence.run(["--smoke", "--out", str(tmp_path)], log=lambda *_: None)
    [path] = tmp_path.glob("evidence-smoke-*.json")
    assert list(json.loads(path.read_text())["parts"]) == ["environment", "correctness"]


def test_budget_below_a_minute_is_refused(capsys):
    with pytest.raises(SystemExit):
        evidence.parse_args(["--budget", "10"])
    assert "--budget must be at least 60" in capsys.readouterr().err


def test_correctness_check_catches_a_slightly_wrong_kernel():
    x, w = torch.randn(13, 40), torch.randn(40)

    def ref(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    for dtype, off in ((torch.float16, 1.01), (torch.bfloat16, 1.05)):   # a few units of each dtype's rounding
        assert evidence_checks.compare("rms", ref, ref, [x, w], dtype)["pass"]
        assert not evidence_checks.compare("rms", lambda x, w: ref(x, w) * off, ref, [x, w], dtype)["pass"]


def test_out_onto_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "results.json"
    target.write_text("{}")
    assert evidence.main(["--smoke", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {target}: is a file" in err and target.read_text() == "{}"
