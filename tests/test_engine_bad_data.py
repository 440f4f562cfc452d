"""A partly-bad data run (issue 15): a truncated gzip, invalid JSON, a line without `text` and invalid
UTF-8 beside good files train, finish the demo, exit 0, and report each bad input once with a total."""
import gzip
import json

from conftest import shared_file
from engine.train import pretrain_main


def _bad_files(tmp_path):
    good_lines = [json.dumps({"text": f"The river runs past mill number {i}. It is old."}) for i in range(200)]
    truncated = tmp_path / "truncated.json.gz"
    data = gzip.compress(("\n".join(good_lines) + "\n").encode())
    truncated.write_bytes(data[: len(data) // 2])
    mixed = tmp_path / "mixed.json"
    mixed.write_bytes(b"\n".join([
        json.dumps({"text": "A good line stays in the data. It has words."}).encode(),
        b"{not json",                                   # line 2: invalid JSON
        json.dumps({"url": "no text here"}).encode(),   # line 3: no `text`
        b'{"text": "bad \xff\xfe bytes"}',               # line 4: invalid UTF-8
        json.dumps({"text": "Another good line is read. Then more."}).encode(),
    ]) + b"\n")
    return truncated, mixed


def test_partly_bad_data_trains_finishes_the_demo_and_reports_once(tmp_path, capsys, caplog):
    truncated, mixed = _bad_files(tmp_path)
    good = shared_file("c4/c4-validation-sample-2k.json.gz")
    tok = shared_file("tokenizers/seqio_test_t5ids_26pieces.model")
    rc = pretrain_main(["--run.dir", str(tmp_path / "run"), "--run.max_steps", "3", "--data.paths", str(good),
                        str(truncated), str(mixed), "--data.tokenizer", str(tok), "--data.input_length", "32",
                        "--batch.micro_batch_size", "4", "--run.threads", "1", "--run.progress", "false",
                        "--run.tensorboard", "false", "--data.shuffle_buffer", "0"])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0, err
    assert "Traceback" not in err and "EOFError" not in err
    assert "Masked-token accuracy" in captured.out  # the demo ran to its end
    reports = [r.getMessage() for r in caplog.records if "skipped bad input" in r.getMessage()]
    for needle in (f"{mixed}:2: invalid json", f"{mixed}:3: missing text", f"{mixed}:4: invalid utf8",
                   f"{truncated}:"):
        assert sum(needle in line for line in reports) == 1, (needle, reports)
    assert len(reports) == 4, reports
    assert "4 bad input lines skipped (corrupt_gzip 1, invalid_json 1, invalid_utf8 1, missing_text 1)" in err
    # The total is in metrics.jsonl too: every step record carries the running count, the last one all 4.
    from engine.metrics import read_metrics

    records = read_metrics(tmp_path / "run")
    counts = [r["bad_input_lines"] for r in records]
    assert counts == sorted(counts) and counts[-1] == 4 and records[-1]["step"] == 3, records
