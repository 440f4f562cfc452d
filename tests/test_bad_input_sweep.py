"""One error policy (issue 15): every command, fed a missing path, an empty file, a directory or a binary
file where it expects a file, exits non-zero with one line naming the path, never a traceback."""
import json
import pathlib
import subprocess
import sys

import pytest

from engine.config import load_run_config
from procs import repo_env

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.bin").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" * 64 + b"\xff\x00" * 32)
    (d / "adir").mkdir()
    return {"missing": d / "no_such_file", "empty": d / "empty.txt", "directory": d / "adir",
            "binary": d / "binary.bin"}


def _commands(p, tmp):
    """(label, argv) for every command with `p` where it wants a file."""
    hf = tmp / "hf"
    return [
        ("pretrain --config", ["pretrain", "--config", str(p), "--run.dir", str(tmp / "r")]),
        ("pretrain --data.tokenizer", ["pretrain", "--data.paths", __file__, "--data.tokenizer", str(p),
                                       "--run.dir", str(tmp / "r")]),
        ("finetune --config", ["finetune", "--config", str(p)]),
        ("export RUN_DIR", ["export", str(p), str(tmp / "out")]),
        ("generate --model", ["generate", "--model", str(p), "x"]),
        ("generate --tokenizer", ["generate", "--model", str(hf), "--tokenizer", str(p), "x"]),
        ("generate --file", ["generate", "--model", str(hf), "--file", str(p)]),
        ("generate --adapters", ["generate", "--model", str(hf), "--adapters", str(p), "x"]),
        ("data clean-c4", ["data", "clean-c4", str(p), "--out", str(tmp / "o.json"), "--no-language-filter"]),
        ("tokenizer train --input", ["tokenizer", "train", "--input", str(p), "--vocab-size", "100",
                                     "--out", str(tmp / "tok")]),
        ("data clean-c4 --bad-words", ["data", "clean-c4", __file__, "--out", str(tmp / "o.json"),
                                       "--bad-words", str(p)]),
    ]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    import torch

    from models.hf_checkpoint import save_pretrained
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration
    from conftest import shared_file

    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_pretrained(T5ForConditionalGeneration(T5Config.from_preset("tiny", vocab_size=128)), d / "hf")
    (d / "hf/spiece.model").write_bytes(shared_file("tokenizers/seqio_test_t5ids_26pieces.model").read_bytes())
    return d


def _run_cli(argv):
    code = ("import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                          env=repo_env(), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "empty", "directory", "binary"])
def test_every_command_answers_bad_files_in_one_line(bad, hf_model, kind):
    p = bad[kind]
    failures = []
    for label, argv in _commands(p, hf_model):
        if kind == "empty" and label == "generate --file":
            continue  # an empty input file is "no input text", checked below with its own message
        proc = _run_cli(argv)
        err = proc.stderr
        ok = (proc.returncode != 0 and "Traceback" not in err and str(p) in err
              and len([line for line in err.splitlines() if "error" in line.lower()]) == 1)
        if not ok:
            failures.append(f"{label} [{kind}]: rc={proc.returncode} stderr={err[-600:]!r}")
    assert not failures, "\n".join(failures)


def test_config_input_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "run.toml"
    cfg.write_text('[run]\ndir = "runs/x"\n[data]\npaths = ["c4/*.json.gz"]\ntokenizer = "tok/spiece.model"\n')
    monkeypatch.chdir(tmp_path)
    got = load_run_config(["--config", str(cfg), "--data.tokenizer", "here.model"])
    assert got.data.paths == [str(tmp_path / "sub" / "c4/*.json.gz")]
    assert got.data.tokenizer == "here.model"          # a command-line override stays relative to the cwd
    assert got.run.dir == "runs/x"                     # an output stays relative to the cwd
    got = load_run_config(["--config", str(cfg)])
    assert got.data.tokenizer == str(tmp_path / "sub" / "tok/spiece.model")


def test_finetune_demo_config_resolves_from_any_directory(tmp_path, monkeypatch):
    from engine.finetune import parse_finetune_config

    demo = REPO / "engine/tasks/sst2_demo.toml"
    monkeypatch.chdir(tmp_path)
    _, ft, tasks = parse_finetune_config(["--config", str(demo)])
    assert pathlib.Path(ft.tokenizer).resolve() == (REPO.parent / "shared/data/t5/spiece.model").resolve()
    assert pathlib.Path(tasks[0].train[0]).resolve() == (REPO.parent / "shared/data/glue/sst2/dev.tsv").resolve()


def test_empty_and_list_configs(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="config file is empty"):
        load_run_config(["--config", str(empty)])
    from models.hf_checkpoint import read_config

    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must be a JSON object, got a JSON list"):
        read_config(tmp_path)
