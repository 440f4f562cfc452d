"""Text-to-text tasks: registry, readers, formatters, post-processors and metrics.

    from engine.tasks import get_task
    task = get_task("sst2")
    examples = list(task.examples("glue_data/", split="validation"))        # a data directory or a file path
    scores = task.evaluate(examples, model_output_texts)                     # {"accuracy": ...}

Importing this package registers the built-in tasks: GLUE (cola, sst2, mrpc, stsb, qqp, mnli, qnli,
rte), WMT (wmt_en_de, wmt_en_fr, wmt_en_ro), summarization (cnn_dailymail, xsum) and squad.
"""
from . import generative, glue  # noqa: F401  (registers the built-in tasks)
from .metrics import (accuracy, bleu, f1_and_accuracy, f1_binary, matthews_corr, pearson_spearman, rouge,
                      squad)
from .readers import read_csv, read_json_or_jsonl, read_jsonl, read_parallel, read_squad, read_tsv
from .registry import (Example, Task, float_postprocessor, get_task, label_postprocessor, list_tasks,
                       register_task, strip_postprocessor)

__all__ = ["Example", "Task", "get_task", "list_tasks", "register_task", "label_postprocessor",
           "float_postprocessor", "strip_postprocessor", "read_tsv", "read_csv", "read_jsonl",
           "read_json_or_jsonl", "read_parallel", "read_squad", "accuracy", "bleu", "f1_and_accuracy",
           "f1_binary", "matthews_corr", "pearson_spearman", "rouge", "squad"]
