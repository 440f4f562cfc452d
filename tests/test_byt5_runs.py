"""ByT5 through the commands, with no tokenizer file anywhere: `t5forge finetune` from a Hugging Face ByT5
directory (the tokenizer found from its tokenizer_config.json), its best model loading in transformers
with the same logits and the same tokenizer; `t5forge pretrain` with `data.tokenizer = "byt5"`, exported
back; resume, finetune and generate refusing a SentencePiece tokenizer for a ByT5 checkpoint."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import test_finetune  # noqa: E402
from engine.export import export_main  # noqa: E402
from engine.finetune import finetune_main  # noqa: E402
from engine.generate import generate_main  # noqa: E402
from engine.train import pretrain_main  # noqa: E402
from engine.tokenizer_files import BYT5, find_tokenizer  # noqa: E402
from models.hf_checkpoint import from_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--data.input_length", "48", "--batch.micro_batch_size", "4", "--run.threads", "1",
         "--run.progress", "false", "--run.tensorboard", "false", "--run.log_every", "1"]


def _hf_byt5_dir(path):
    """A random ByT5 as transformers writes one (as google/byt5-*: no spiece.model, a ByT5 tokenizer_config)."""
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    hf.save_pretrained(path / "init")
    transformers.ByT5Tokenizer().save_pretrained(path / "init")
    return path / "init"


def _byt5_config(tmp_path, extra_finetune=""):
    """test_finetune's weather task, from a ByT5 directory, without finetune.tokenizer."""
    text = test_finetune._config(tmp_path, "full", 6, eval_every=6).read_text()
    lines = [line for line in text.splitlines() if not line.startswith("tokenizer = ")]
    lines = [line.replace("max_input_length = 40", "max_input_length = 32") for line in lines]
    if extra_finetune:
        lines.insert(lines.index("[finetune]") + 1, extra_finetune)
    path = tmp_path / "byt5.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_from_hf_byt5_and_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(test_finetune, "_init_dir", _hf_byt5_dir)
    assert finetune_main(["--config", str(_byt5_config(tmp_path))]) == 0
    best = tmp_path / "full" / "best"
    assert find_tokenizer(best) == BYT5 and not (best / "spiece.model").exists()
    assert isinstance(transformers.AutoTokenizer.from_pretrained(best), transformers.ByT5Tokenizer)
    ours = from_pretrained(best, kernel_backend="torch").eval()
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(best).eval()
    init = from_pretrained(tmp_path / "init", kernel_backend="torch")
    assert not torch.equal(init.shared.weight, ours.shared.weight)  # it trained
    tok = transformers.ByT5Tokenizer()
    batch = tok(["weather: sea sand ice", "weather: snow"], return_tensors="pt", padding=True)
    labels = tok(["hot", "cold"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        diff = (ours(**batch, labels=labels).logits - theirs(**batch, labels=labels).logits).abs().max().item()
    assert diff <= 1e-4
    capsys.readouterr()
    # generate finds the tokenizer in the directory; a SentencePiece one is refused in one line
    assert generate_main(["--model", str(best), "--max-new-tokens", "4", "weather: sea"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    spm = str(test_finetune.shared_file("tokenizers/seqio_test_t5ids_26pieces.model"))
    assert generate_main(["--model", str(best), "--tokenizer", spm, "x"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "byt5 (byte-level, 384 ids)" in err and "Traceback" not in err


def test_finetune_refuses_a_sentencepiece_tokenizer_for_byt5(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(test_finetune, "_init_dir", _hf_byt5_dir)
    spm = test_finetune.shared_file("tokenizers/seqio_test_t5ids_26pieces.model")
    assert finetune_main(["--config", str(_byt5_config(tmp_path, f'tokenizer = "{spm}"'))]) == 2
    err = capsys.readouterr().err
    assert "finetune.tokenizer" in err and "byt5 (byte-level" in err and "Traceback" not in err


def test_pretrain_byt5_exports_and_resume_checks_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain_main(["--run.dir", str(run), "--run.max_steps", "2", "--data.tokenizer", BYT5,
                          "--run.demo", "true", *SMALL]) == 0
    assert "masked" in capsys.readouterr().out.lower()   # the demo ran on bytes
    state = json.loads((run / "checkpoints/step_00000002/trainer_state.json").read_text())
    assert state["model_config"]["vocab_size"] == 384
    assert find_tokenizer(run / "checkpoints/step_00000002") == BYT5
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    assert isinstance(transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), transformers.ByT5Tokenizer)
    assert transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").config.vocab_size == 384
    # resuming with another tokenizer is one line naming both
    spm = str(test_finetune.shared_file("tokenizers/seqio_test_t5ids_26pieces.model"))
    capsys.readouterr()
    assert pretrain_main(["--run.dir", str(run), "--run.max_steps", "3", "--data.tokenizer", spm,
                          "--model.vocab_size", "384", "--run.demo", "false", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "byt5 (byte-level, 384 ids)" in err and "Traceback" not in err


def test_byt5_in_a_config_file_is_a_name_not_a_path(tmp_path):
    from engine.config import load_run_config

    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.toml"
    path.write_text('[data]\ntokenizer = "byt5"\n')
    assert load_run_config(["--config", str(path)]).data.tokenizer == BYT5
