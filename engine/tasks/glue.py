"""The GLUE tasks in T5's text-to-text form (T5 paper, appendix D): the task name and field names
become the input prefix ("mrpc sentence1: ... sentence2: ..."), the label becomes a word.

File layouts: the public GLUE release (`glue_data/SST-2/dev.tsv`, `MNLI/dev_matched.tsv`, ...), the
CoLA public release (`cola_public/raw/in_domain_dev.tsv`, no header), and the shared samples.
"""
from __future__ import annotations

from .metrics import accuracy, f1_and_accuracy, matthews_corr, pearson_spearman
from .readers import read_tsv
from .registry import Task, float_postprocessor, label_postprocessor, register_task

COLA_COLUMNS = ("source", "label", "original_mark", "sentence")  # CoLA's raw TSVs have no header


def _glue_files(release_dir: str, shared_dir: str, dev: str = "dev.tsv") -> dict[str, tuple[str, ...]]:
    return {"train": (f"{release_dir}/train.tsv", f"{shared_dir}/train.tsv", f"glue/{shared_dir}/train.tsv", "train.tsv"),
            "validation": (f"{release_dir}/{dev}", f"{shared_dir}/{dev}", f"glue/{shared_dir}/{dev}",
                           f"hf_fixtures/{release_dir}/{dev}", dev)}


def _label_index(record: dict, column: str, labels: tuple[str, ...]) -> int:
    """GLUE stores labels as digits (SST-2, CoLA, MRPC, QQP) or words (MNLI, QNLI, RTE)."""
    value = record[column].strip()
    if value in labels:
        return labels.index(value)
    if value.isdigit() and int(value) < len(labels):
        return int(value)
    raise ValueError(f"label {value!r} in column {column!r} is not one of {labels} or their index")


def glue_task(name: str, fields: tuple[tuple[str, str], ...], label_column: str, labels: tuple[str, ...],
              metrics, files, reader=None) -> Task:
    """A GLUE classification task: `fields` pairs the prefix word with the TSV column it reads."""
    columns = tuple(column for _, column in fields) + (label_column,)

    def format_record(record: dict) -> tuple[str, str]:
        text = " ".join(f"{word}: {record[column].strip()}" for word, column in fields)
        return f"{name} {text}", labels[_label_index(record, label_column, labels)]

    return Task(name=name, reader=reader or (lambda path: read_tsv(path, required=columns)),
                formatter=format_record, postprocessor=label_postprocessor(labels),
                reference=lambda record: _label_index(record, label_column, labels),
                metrics=metrics, files=files, description=f"GLUE {name}")


def _read_cola(path):
    # The GLUE copy of CoLA's test split has a header ("index\tsentence"); the raw release has none.
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline()
    if first.startswith("index\t") or first.startswith("source\t"):
        return read_tsv(path, required=("sentence", "label"))
    return read_tsv(path, fieldnames=COLA_COLUMNS, required=("sentence", "label"))


def _format_stsb(record: dict) -> tuple[str, str]:
    # T5 rounds the 0-5 similarity to the nearest 0.2 and writes it with one decimal, so STS-B becomes
    # a 26-way choice of strings; the metric still compares with the unrounded gold score.
    score = float(record["score"])
    return (f"stsb sentence1: {record['sentence1'].strip()} sentence2: {record['sentence2'].strip()}",
            f"{round(score * 5) / 5:.1f}")


register_task(glue_task(
    "cola", (("sentence", "sentence"),), "label", ("unacceptable", "acceptable"), (matthews_corr,),
    {"train": ("CoLA/train.tsv", "cola/train.tsv", "raw/in_domain_train.tsv", "glue/cola/raw/in_domain_train.tsv"),
     "validation": ("CoLA/dev.tsv", "cola/dev.tsv", "raw/in_domain_dev.tsv+raw/out_of_domain_dev.tsv",
                    "glue/cola/raw/in_domain_dev.tsv+glue/cola/raw/out_of_domain_dev.tsv")},
    reader=_read_cola))
register_task(glue_task("sst2", (("sentence", "sentence"),), "label", ("negative", "positive"), (accuracy,),
                        _glue_files("SST-2", "sst2")))
register_task(glue_task("mrpc", (("sentence1", "#1 String"), ("sentence2", "#2 String")), "Quality",
                        ("not_equivalent", "equivalent"), (f1_and_accuracy,), _glue_files("MRPC", "mrpc")))
register_task(Task(
    name="stsb", reader=lambda path: read_tsv(path, required=("sentence1", "sentence2", "score")),
    formatter=_format_stsb, postprocessor=float_postprocessor, reference=lambda r: float(r["score"]),
    metrics=(pearson_spearman,), files=_glue_files("STS-B", "stsb"), description="GLUE STS-B"))
register_task(glue_task("qqp", (("question1", "question1"), ("question2", "question2")), "is_duplicate",
                        ("not_duplicate", "duplicate"), (f1_and_accuracy,), _glue_files("QQP", "qqp")))
_MNLI_FILES = {"train": ("MNLI/train.tsv", "mnli/train.tsv", "train.tsv"),
               "validation_matched": ("MNLI/dev_matched.tsv", "mnli/dev_matched.tsv", "dev_matched.tsv"),
               "validation_mismatched": ("MNLI/dev_mismatched.tsv", "mnli/dev_mismatched.tsv", "dev_mismatched.tsv")}
_MNLI_FILES["validation"] = _MNLI_FILES["validation_matched"]
register_task(glue_task("mnli", (("hypothesis", "sentence2"), ("premise", "sentence1")), "gold_label",
                        ("entailment", "neutral", "contradiction"), (accuracy,), _MNLI_FILES))
register_task(glue_task("qnli", (("question", "question"), ("sentence", "sentence")), "label",
                        ("entailment", "not_entailment"), (accuracy,), _glue_files("QNLI", "qnli")))
register_task(glue_task("rte", (("sentence1", "sentence1"), ("sentence2", "sentence2")), "label",
                        ("entailment", "not_entailment"), (accuracy,), _glue_files("RTE", "rte")))
