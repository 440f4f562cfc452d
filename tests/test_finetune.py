"""`t5forge finetune` end to end on CPU: a tiny model learns a synthetic text-to-text task to ~100%
accuracy, evaluation by generation picks the best model, adapter fine-tuning moves only adapters and
layer norms, and config mistakes are one-line errors."""
import json
import random

import torch
from safetensors.torch import load_file

from conftest import shared_file
from engine.finetune import finetune_main
from engine.tasks import Task, accuracy, label_postprocessor, list_tasks, read_tsv, register_task
from models.config import T5Config
from models.t5 import T5ForConditionalGeneration

# Words spelled with the pieces of the 26-piece test vocabulary, so examples stay short.
HOT, COLD = ("sea", "sand", "heat", "sol"), ("snow", "ice", "wind", "rain")
LABELS = ("cold", "hot")

if "test_weather" not in list_tasks():
    register_task(Task(name="test_weather", reader=lambda p: read_tsv(p, required=("words", "label")),
                       formatter=lambda r: (f"weather: {r['words']}", LABELS[int(r["label"])]),
                       postprocessor=label_postprocessor(LABELS), reference=lambda r: int(r["label"]),
                       metrics=(accuracy,)))


def _write_task(path, n, seed):
    rng = random.Random(seed)
    lines = ["words\tlabel"]
    for _ in range(n):
        picks = [rng.random() < 0.5 for _ in range(3)]  # majority of three decides the label
        words = [rng.choice(HOT if hot else COLD) for hot in picks]
        lines.append(f"{' '.join(words)}\t{int(sum(picks) >= 2)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _init_dir(tmp_path):
    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      kernel_backend="torch")
    directory = tmp_path / "init"
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def _config(tmp_path, method, steps, extra="", eval_every=40):
    tokenizer = shared_file("tokenizers/seqio_test_t5ids_26pieces.model")
    train = _write_task(tmp_path / "train.tsv", 600, seed=1)
    dev = _write_task(tmp_path / "dev.tsv", 64, seed=2)
    path = tmp_path / f"{method}.toml"
    path.write_text(f"""
[run]
dir = "{tmp_path / method}"
max_steps = {steps}
log_every = 10
progress = false
tensorboard = false
engine = "local"
threads = 1
[batch]
micro_batch_size = 16
[optim]
name = "adamw"
lr = 0.01
[checkpoint]
every = 1000
[finetune]
init = "{_init_dir(tmp_path)}"
tokenizer = "{tokenizer}"
method = "{method}"
max_input_length = 40
max_target_length = 8
eval_every = {eval_every}
eval_metric = "test_weather/accuracy"
{extra}
[[tasks]]
name = "test_weather"
train = "{train}"
eval = "{dev}"
""")
    return path


def test_tiny_model_learns_synthetic_task(tmp_path, capsys):
    assert finetune_main(["--config", str(_config(tmp_path, "full", 120, eval_every=60))]) == 0
    best = json.loads((tmp_path / "full/best/best.json").read_text())
    assert best["scores"]["test_weather/accuracy"] >= 95.0, best
    # the best model is a Hugging Face directory `t5forge generate` can load, with its tokenizer
    assert (tmp_path / "full/best/config.json").is_file() and (tmp_path / "full/best/spiece.model").is_file()
    evals = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()
             if "eval/test_weather/accuracy" in line]
    assert [r["step"] for r in evals] == [60, 120]
    assert "best test_weather/accuracy" in capsys.readouterr().err


def test_adapter_finetuning_moves_only_adapters_and_norms(tmp_path):
    path = _config(tmp_path, "adapters", 6, extra="d_adapter = 8", eval_every=1000)
    assert finetune_main(["--config", str(path)]) == 0
    from models.hf_checkpoint import read_weights

    init = read_weights(tmp_path / "init")
    final = load_file(str(sorted((tmp_path / "adapters/checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    adapters = [k for k in final if ".adapter." in k]
    assert len(adapters) == 2 * (2 + 2)  # wi and wo after each FFN of 2 encoder + 2 decoder blocks
    moved = {k for k in final if k in init and not torch.equal(final[k], init[k])}
    norms = {k for k in init if k.endswith("layer_norm.weight")}
    assert moved and moved <= norms, sorted(moved - norms)
    assert all(final[k].abs().sum() > 0 for k in adapters if k.endswith("wo.weight"))  # adapters trained
    # the best-model file holds just the adapters (and norms), loadable on their own
    assert (tmp_path / "adapters/best/adapters.safetensors").is_file()


def test_config_errors_are_one_line(tmp_path, capsys):
    path = _config(tmp_path, "full", 2)
    assert finetune_main(["--config", str(path), "--finetune.method", "lora"]) == 2
    assert "config key 'finetune.method': 'lora' is not one of" in capsys.readouterr().err
    assert finetune_main(["--config", str(path), "--finetune.nope", "1"]) == 2
    assert "unknown config key 'finetune.nope'" in capsys.readouterr().err
    path.write_text(path.read_text().replace('name = "test_weather"', 'name = "glue"'))
    assert finetune_main(["--config", str(path)]) == 2
    assert "config key 'tasks[0].name': unknown task 'glue'" in capsys.readouterr().err


def test_eval_metric_and_eval_set_checked_before_training(tmp_path, capsys):
    """A misspelt eval_metric or an empty eval set stops the run before its first step (nothing trained,
    nothing written), not at the first evaluation after training."""
    path = _config(tmp_path, "full", 4, eval_every=1000)
    run = tmp_path / "full"
    assert finetune_main(["--config", str(path), "--finetune.eval_metric", "test_weather/acc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config key 'finetune.eval_metric': 'test_weather/acc' is not reported; " \
        "available: test_weather/accuracy" in err, err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert finetune_main(["--config", str(path), "--finetune.eval_metric", "sst2/accuracy"]) == 2
    assert "'sst2/accuracy' is not reported; available: test_weather/accuracy" in capsys.readouterr().err
    (tmp_path / "empty_dev.tsv").write_text("words\tlabel\n")
    empty = tmp_path / "empty.toml"
    empty.write_text(path.read_text().replace(str(tmp_path / "dev.tsv"), str(tmp_path / "empty_dev.tsv")))
    assert finetune_main(["--config", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"config key 'tasks[0].eval': no test_weather examples in {tmp_path / 'empty_dev.tsv'}" in err, err
    path.write_text(path.read_text().replace("[[tasks]]", "[[tasks]]\neval_skip = 64"))  # dev.tsv has 64
    assert finetune_main(["--config", str(path)]) == 2
    assert "after skipping 64 (tasks[0].eval_skip)" in capsys.readouterr().err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()



def test_wrong_format_train_and_eval_files_are_one_line(tmp_path, capsys):
    """A JSON-lines train file or a CSV eval file where the task reads TSVs: one line naming the file,
    the line, the TSV header expected and what the file holds (not "missing column" over a dumped line)."""
    path = _config(tmp_path, "full", 2)
    run = tmp_path / "full"
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"words": "sea " * 40, "label": i % 2}) + "\n" for i in range(8)))
    wrong = tmp_path / "wrong_train.toml"
    wrong.write_text(path.read_text().replace(str(tmp_path / "train.tsv"), str(jsonl)))
    assert finetune_main(["--config", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400, err
    assert (f"{jsonl}:1: not a tab-separated (TSV) file: expected a header line with the columns words, label; "
            "found a JSON line '{\"words\": \"sea sea") in err, err
    csv_dev = tmp_path / "dev.csv"
    csv_dev.write_text("words,label\nsea sand,1\n")
    wrong.write_text(path.read_text().replace(str(tmp_path / "dev.tsv"), str(csv_dev)))
    assert finetune_main(["--config", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{csv_dev}:1: not a tab-separated (TSV) file" in err, err
    assert "found comma-separated text 'words,label'" in err, err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()

def test_mixture_with_span_corruption_and_progress_label(tmp_path, capsys):
    """A [[tasks]] entry with an objective adds unsupervised span corruption on C4 JSON lines to the
    mixture (multi-task pretraining); the progress bar is labelled "finetune"."""
    c4 = shared_file("c4/c4-validation-sample-2k.json.gz")
    path = _config(tmp_path, "full", 3, eval_every=1000)
    path.write_text(path.read_text().replace("max_target_length = 8", "max_target_length = 12") + f"""
[[tasks]]
name = "c4_span_corruption"
objective = "span_corruption"
train = "{c4}"
size = 600
""")
    assert finetune_main(["--config", str(path), "--run.progress", "true"]) == 0
    err = capsys.readouterr().err
    assert "mixture test_weather 0.50, c4_span_corruption 0.50" in err and "finetune: 100%" in err
    assert "pretrain" not in err
    # Span corruption at 40 input tokens needs 10 target tokens: a shorter limit is a one-line error.
    assert finetune_main(["--config", str(path), "--finetune.max_target_length", "8",
                          "--run.dir", str(tmp_path / "short")]) == 2
    assert "config key 'tasks[1]': targets_length 8 is too short for span corruption" in capsys.readouterr().err
    path.write_text(path.read_text().replace('objective = "span_corruption"', 'objective = "spans"'))
    assert finetune_main(["--config", str(path)]) == 2
    assert "config key 'tasks[1].objective': 'spans' is not one of span_corruption" in capsys.readouterr().err
