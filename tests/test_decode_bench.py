"""benchmarks/decode_bench.py on CPU with the smoke model: every core provider measures every case, the
compiled step makes one graph per shape, all providers decode the same tokens (transformers included), the
caches hold what they should, and the budget skips what it cannot hold."""
import pytest
import torch

from benchmarks import decode_bench

CASES = (("greedy", 1), ("beam4", 2))


@pytest.fixture(autouse=True)
def two_cases(monkeypatch):
    monkeypatch.setattr(decode_bench, "CASES", CASES)
    import torch._dynamo as dynamo

    dynamo.reset()
    yield
    dynamo.reset()


def test_smoke_rows():
    part = decode_bench.evidence_part(torch.device("cpu"), smoke=True, budget_s=600, log=lambda line: None)
    rows = part["rows"]
    assert part["status"] == "ok" and rows[0]["provider"] == "setup"
    measured = {(r["provider"], r["search"], r["batch"]): r for r in rows[1:]}
    core, rest = decode_bench.providers(torch.device("cpu"))
    transformers = pytest.importorskip("transformers")  # noqa: F841
    for provider in core + rest:
        for search, batch in CASES:
            row = measured[(provider, search, batch)]
            assert row["status"] == "ok", row
            beams = 4 if search == "beam4" else 1
            assert row["tokens_per_s"] == pytest.approx(batch * beams * 8 / row["best_s"], rel=0.01)
            if provider != "static":
                assert row["same_tokens_as_static"] is True, row
            if provider.startswith("compiled-"):
                assert row["graphs"] == 1 and row["first_s"] > row["best_s"]
            if provider != "transformers":  # both caches end holding every position: the same bytes
                layers, heads, d_kv = 2, 4, 16
                kv = 2 * layers * batch * beams * heads * 8 * d_kv * 4
                cross = 2 * layers * batch * beams * heads * 16 * d_kv * 4
                assert row["cache_bytes"] == kv + cross, row
    assert set(part["speed_vs_static"]) == {"greedy/b1", "beam4/b2"}
    assert part["speed_vs_static"]["greedy/b1"]["static"] == 1.0


def test_budget_skips_rows():
    part = decode_bench.evidence_part("cpu", smoke=True, budget_s=0.001, log=lambda line: None)
    assert part["status"] == "error" and part["reason"] == "no row measured"
    skipped = part["rows"][1:]
    assert skipped and all(r["status"] == "skipped" and r["reason"].startswith("budget") for r in skipped)


def test_provider_names():
    assert decode_bench.compile_mode("compiled-cuda-graph-triton") == "cuda-graph"
    assert decode_bench.compile_mode("compiled-reduce-overhead") == "reduce-overhead"
    assert decode_bench.compile_mode("static-prefix") is None
    core, rest = decode_bench.providers(torch.device("cuda"))
    assert core == ["static", "compiled-cuda-graph", "dynamic", "transformers"]
    assert all(decode_bench.compile_mode(p) in (None, "cuda-graph", "reduce-overhead") for p in core + rest)


def test_main_writes_the_record(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert decode_bench.main(["--smoke", "--device", "cpu", "--budget", "600", "--out", str(out)]) == 0
    import json

    record = json.loads(out.read_text())
    assert record["schema"] == "t5forge-decode/1" and record["status"] == "ok"
    assert record["rows"][0]["threads"] == 1 and len(record["rows"]) == 1 + 5 * len(CASES)
    assert "greedy/b1 (tokens/s / static's): static 1.00x" in capsys.readouterr().out
