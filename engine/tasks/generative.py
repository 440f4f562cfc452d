"""Tasks whose targets are free text: WMT translation, CNN/DailyMail and XSum summarization, SQuAD.

Prefixes as in the T5 paper: "translate English to German: ...", "summarize: ...",
"question: ... context: ...".
"""
from __future__ import annotations

import pathlib

from .metrics import bleu, rouge, squad
from .readers import read_csv, read_json_or_jsonl, read_parallel, read_squad
from .registry import Task, register_task

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian"}


def translation_task(source: str, target: str, files: dict[str, tuple[str, ...]]) -> Task:
    prefix = f"translate {LANGUAGES[source]} to {LANGUAGES[target]}: "
    def reader(path):
        # Parallel corpora contain pairs with an empty side (one in the shared En-De sample); they
        # teach nothing and would make an empty target, so they are dropped.
        return (r for r in read_parallel(path, source, target) if r[source].strip() and r[target].strip())

    return Task(name=f"wmt_{source}_{target}", reader=reader,
                formatter=lambda r: (prefix + r[source].strip(), r[target].strip()),
                metrics=(bleu,), files=files, description=f"WMT {source}-{target} translation")


def _split_files(shared_dir: str, test_set: str, valid_set: str, source: str) -> dict[str, tuple[str, ...]]:
    # Public releases ship aligned `<set>.<lang>` files; HF exports ship JSON lines per split; the shared
    # En-De sample uses OpenNMT's src-/tgt- names.
    return {"train": (f"train.{source}", "train.json", "src-train.txt", f"{shared_dir}/src-train.txt",
                      f"{shared_dir}/train.json"),
            "validation": (f"{valid_set}.{source}", "val.json", "validation.json", "src-val.txt",
                           f"{shared_dir}/src-val.txt", f"{shared_dir}/val.json"),
            "test": (f"{test_set}.{source}", "test.json", f"{shared_dir}/test.json")}


register_task(translation_task("en", "de", _split_files("wmt_en_de", "newstest2014", "newstest2013", "en")))
register_task(translation_task("en", "fr", _split_files("wmt_en_fr", "newstest2014", "newstest2013", "en")))
register_task(translation_task("en", "ro", _split_files("hf_fixtures/wmt_en_ro", "newstest2016", "newsdev2016", "en")))


def summarization_task(name: str, document: str, summary: str, files: dict[str, tuple[str, ...]]) -> Task:
    def reader(path: pathlib.Path):
        if path.suffix == ".csv":
            return read_csv(path, required=(document, summary))
        return read_json_or_jsonl(path, required=(document, summary))

    return Task(name=name, reader=reader, formatter=lambda r: ("summarize: " + r[document].strip(), r[summary].strip()),
                metrics=(rouge,), files=files, description=f"{name} summarization")


register_task(summarization_task("cnn_dailymail", "article", "highlights", {
    "train": ("train.csv", "train.json", "summarization/cnn_dailymail_3.0.0_train_sample100.csv"),
    "validation": ("validation.csv", "validation.json"), "test": ("test.csv", "test.json")}))
register_task(summarization_task("xsum", "document", "summary", {
    "train": ("train.json", "hf_fixtures/xsum/sample.json"), "validation": ("validation.json",),
    "test": ("test.json",)}))


def _format_squad(record: dict) -> tuple[str, str]:
    answers = record["answers"]
    # SQuAD v2's unanswerable questions have no answer: the target is empty (the model emits only EOS).
    return f"question: {record['question'].strip()} context: {record['context'].strip()}", (answers[0] if answers else "")


register_task(Task(name="squad", reader=read_squad, formatter=_format_squad, reference=lambda r: list(r["answers"]),
                   metrics=(squad,), files={"train": ("train-v1.1.json", "train.json", "hf_fixtures/SQUAD/sample.json"),
                                            "validation": ("dev-v1.1.json", "validation.json", "dev.json")},
                   description="SQuAD question answering"))
