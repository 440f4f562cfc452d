"""Damaged checkpoints and mismatched tokenizers (issue 15): verified on load, one line naming the file or
what differs, in pretrain resume (with a fallback to the last good checkpoint), export, generate,
finetune init and --adapters."""
import json
import pathlib
import shutil

import pytest
import torch

from conftest import shared_file
from engine.export import export_main
from engine.generate import generate_main
from engine.train import pretrain_main

SMALL = ["--data.input_length", "32", "--batch.micro_batch_size", "4", "--run.threads", "1",
         "--run.progress", "false", "--run.demo", "false", "--run.tensorboard", "false", "--run.log_every", "1",
         "--checkpoint.every", "2"]


def _tok():
    return shared_file("tokenizers/seqio_test_t5ids_26pieces.model")


def _pretrain(run_dir, steps, *extra, tokenizer=None):
    data = shared_file("c4/c4-validation-sample-2k.json.gz")
    return pretrain_main(["--run.dir", str(run_dir), "--run.max_steps", str(steps), "--data.paths", str(data),
                          "--data.tokenizer", str(tokenizer or _tok()), *SMALL, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert _pretrain(run, 4) == 0
    return run


def _copy(trained, tmp_path) -> pathlib.Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def _permuted_tokenizer(path, out) -> pathlib.Path:
    """The same SentencePiece model with two ordinary pieces swapped: same size, other ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(pathlib.Path(path).read_bytes())
    normal = [i for i, p in enumerate(proto.pieces) if p.type == pb.ModelProto.SentencePiece.NORMAL]
    a, b = normal[3], normal[7]
    pa, pb_ = proto.pieces[a].piece, proto.pieces[b].piece
    proto.pieces[a].piece, proto.pieces[b].piece = pb_, pa
    out.write_bytes(proto.SerializeToString())
    return out


# ------------------------------------------------------------------------------ the file checks

def test_verify_safetensors_catches_truncation_garbage_and_trailing_bytes(tmp_path):
    from safetensors.torch import save_file

    from models.hf_checkpoint import verify_safetensors

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, str(good))
    assert set(verify_safetensors(good)) >= {"a", "b"}
    data = good.read_bytes()
    cases = {"truncated": data[:-5], "short": data[:5], "garbage": b"\xff" * 64,
             "header-cut": data[:20], "trailing": data + b"xx"}
    for name, payload in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(payload)
        with pytest.raises(ValueError, match="damaged safetensors file") as info:
            verify_safetensors(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------ pretrain resume

def test_resume_falls_back_to_the_last_good_checkpoint(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    damaged = run / "checkpoints/step_00000004/model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert _pretrain(run, 6) == 0
    err = _err(capsys)
    assert f"checkpoint damaged: {damaged}" in err
    assert "resuming from step_00000002" in err and "resuming at step 2" in err
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000006"
    # the damaged one is never deleted by the fallback itself; a save of step 4 replaced it
    from models.hf_checkpoint import verify_safetensors

    assert verify_safetensors(run / "checkpoints/step_00000004/model.safetensors")


@pytest.mark.parametrize("victim, payload, needle", [
    ("step_00000004/model.safetensors", b"\x00" * 16, "model.safetensors"),
    ("step_00000004/trainer_state.json", b"\xd0\xcf\x11\xe0" * 8, "trainer_state.json: not UTF-8"),
    ("step_00000004/trainer_state.json", b"[1, 2]", "trainer_state.json: trainer state must be a JSON object"),
    ("step_00000004/optimizer.pt", b"PK\x03\x04 cut", "optimizer.pt"),
    ("step_00000004/rank_00000.data.json", b"{", "rank_00000.data.json"),
    ("latest", b"\xd0\xcf\x11\xe0\xa1", "latest: damaged"),
])
def test_damaged_checkpoint_is_one_line_naming_the_file(trained, tmp_path, capsys, victim, payload, needle):
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / victim).write_bytes(payload)
    assert _pretrain(run, 6, "--checkpoint.on_damaged", "error") == 2
    line = _error_line(_err(capsys))
    assert needle in line and "checkpoint.on_damaged" in line, line
    assert _pretrain(run, 6) == 0  # the default falls back and says so
    good = "step_00000004" if victim == "latest" else "step_00000002"  # a bad pointer: the newest step dir
    assert f"resuming from {good}, the newest checkpoint that verifies" in _err(capsys)


def test_resume_with_another_preset_or_objective_is_one_line(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    assert _pretrain(run, 6, "--model.preset", "t5-small") == 2
    line = _error_line(_err(capsys))
    assert "holds another model" in line and "d_model 128 -> 512" in line and "size mismatch" not in line
    assert _pretrain(run, 6, "--model.vocab_size", "256") == 2
    assert "vocab_size 128 -> 256" in _error_line(_err(capsys))
    assert _pretrain(run, 6, "--data.objective", "prefix_lm") == 2
    assert "data.objective 'span_corruption'" in _error_line(_err(capsys))


def test_resume_with_a_same_size_other_tokenizer_is_refused(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    other = _permuted_tokenizer(_tok(), tmp_path / "other.model")
    before = (run / "checkpoints/step_00000004/tokenizer" / _tok().name).read_bytes()
    assert _pretrain(run, 6, tokenizer=other) == 2
    line = _error_line(_err(capsys))
    assert str(other) in line and "step_00000004/tokenizer" in line and "other pieces / ids" in line
    assert (run / "checkpoints/step_00000004/tokenizer" / _tok().name).read_bytes() == before
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000004"  # nothing trained


# ------------------------------------------------------------------------------ export and generate

def test_export_of_a_damaged_checkpoint_names_it_and_the_older_ones(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    damaged = run / "checkpoints/step_00000004/model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    assert export_main([str(run), str(tmp_path / "hf")]) == 2
    line = _error_line(_err(capsys))
    assert str(damaged) in line and "step_00000002 (export one with --step N)" in line
    assert export_main([str(run), str(tmp_path / "hf"), "--step", "2"]) == 0
    capsys.readouterr()
    afile = tmp_path / "a_file"
    afile.write_text("keep me")
    assert export_main([str(run), str(afile), "--step", "2"]) == 2
    assert "exists and is a file" in _error_line(_err(capsys)) and afile.read_text() == "keep me"
    assert export_main([str(run), str(run / "checkpoints/step_00000002"), "--step", "2"]) == 2
    assert "inside the run's checkpoints" in _error_line(_err(capsys))


def test_export_refuses_a_tokenizer_copy_that_is_not_the_runs(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    copy = run / "checkpoints/step_00000004/tokenizer" / _tok().name
    _permuted_tokenizer(copy, copy)
    manifest = run / "checkpoints/step_00000004/manifest.json"
    doc = json.loads(manifest.read_text())
    doc["files"][f"tokenizer/{_tok().name}"] = copy.stat().st_size  # same size or not: hash decides
    manifest.write_text(json.dumps(doc))
    assert export_main([str(run), str(tmp_path / "hf")]) == 2
    assert "differs from the one checkpoint" in _error_line(_err(capsys))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert export_main([str(trained), str(out)]) == 0
    return out


def test_generate_damaged_weights_and_adapters_name_the_file(exported, tmp_path, capsys):
    model = tmp_path / "hf"
    shutil.copytree(exported, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    assert generate_main(["--model", str(model), "a b c"]) == 2
    assert str(weights) in _error_line(_err(capsys))
    adapters = tmp_path / "adapters.safetensors"
    adapters.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert generate_main(["--model", str(exported), "--adapters", str(adapters), "a b c"]) == 2
    assert str(adapters) in _error_line(_err(capsys))


def test_generate_tokenizer_checks(exported, tmp_path, capsys):
    other = _permuted_tokenizer(exported / "spiece.model", tmp_path / "other.model")
    assert generate_main(["--model", str(exported), "--tokenizer", str(other), "a b c"]) == 2
    assert "differs from the one model" in _error_line(_err(capsys))
    # no spiece.model to compare with: a tokenizer much smaller than the model is not its tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    (bare / "spiece.model").unlink()
    cfg = json.loads((bare / "config.json").read_text())
    assert cfg["vocab_size"] == 128
    cfg["vocab_size"] = 1024
    (bare / "config.json").write_text(json.dumps(cfg))
    assert generate_main(["--model", str(bare), "--tokenizer", str(_tok()), "a b c"]) == 2
    assert "far fewer ids" in _error_line(_err(capsys))
    # a missing model is blamed on --model, not on the tokenizer
    assert generate_main(["--model", str(tmp_path / "nope"), "a"]) == 2
    line = _error_line(_err(capsys))
    assert "checkpoint directory not found" in line and "--tokenizer" not in line
    for device in ("cuda", "gpu0") if not torch.cuda.is_available() else ("gpu0",):
        assert generate_main(["--model", str(exported), "--device", device, "a b c"]) == 2
        assert f"--device {device}" in _error_line(_err(capsys)).replace("'", "")


def test_finetune_init_from_a_damaged_checkpoint_names_the_file(trained, tmp_path, capsys):
    from engine.finetune import finetune_main

    run = _copy(trained, tmp_path)
    damaged = run / "checkpoints/step_00000004/model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    train = tmp_path / "t.tsv"
    train.write_text("sentence\tlabel\na b c\t1\n")
    cfg = tmp_path / "ft.toml"
    cfg.write_text(f"""
[run]
dir = "{tmp_path / 'ft'}"
max_steps = 2
progress = false
tensorboard = false
engine = "local"
[finetune]
init = "{run}"
[[tasks]]
name = "sst2"
train = "{train}"
""")
    from engine.finetune import finetune_main  # noqa: F811

    assert finetune_main(["--config", str(cfg)]) == 2
    line = _error_line(_err(capsys))
    assert "finetune.init" in line and str(damaged) in line
    other = _permuted_tokenizer(_tok(), tmp_path / "other.model")
    damaged.write_bytes((trained / "checkpoints/step_00000004/model.safetensors").read_bytes())
    assert finetune_main(["--config", str(cfg), "--finetune.tokenizer", str(other)]) == 2
    line = _error_line(_err(capsys))
    assert "finetune.tokenizer" in line and "differs" in line
