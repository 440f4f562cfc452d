"""The task registry: every task is text in, text out (T5 paper, section 2.4).

A `Task` bundles how to read its files, how to turn a record into (input text with the task prefix,
target text), how to turn the model's output text back into a value, and the metrics that score those
values. Adding a task is a few lines:

    from engine.tasks import Task, register_task, read_tsv, accuracy, label_postprocessor
    register_task(Task(
        name="boolq", reader=lambda p: read_tsv(p, required=("question", "passage", "label")),
        formatter=lambda r: (f"boolq question: {r['question']} passage: {r['passage']}",
                             "true" if r["label"] == "1" else "false"),
        postprocessor=label_postprocessor(("false", "true")),
        reference=lambda r: int(r["label"]), metrics=(accuracy,), files={"train": ("train.tsv",)}))
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

Record = dict
Metric = Callable[[Sequence[Any], Sequence[Any]], "dict[str, float]"]


@dataclasses.dataclass(frozen=True)
class Example:
    """One text-to-text example: `inputs` (with the task prefix), `targets`, the value metrics compare
    predictions against (`reference`), and where it came from (`where`: "file:line")."""
    inputs: str
    targets: str
    reference: Any
    where: str = ""


def strip_postprocessor(text: str) -> str:
    return text.strip()


def label_postprocessor(labels: Sequence[str]) -> Callable[[str], int]:
    """Output text -> class id by the label words; anything else is -1 (always wrong), as in T5."""
    index = {label: i for i, label in enumerate(labels)}
    return lambda text: index.get(text.strip(), -1)


def float_postprocessor(text: str) -> float:
    """Output text -> float; unparseable text -> -1.0 (outside STS-B's 0..5 range, so never right)."""
    try:
        return float(text.strip())
    except ValueError:
        return -1.0


@dataclasses.dataclass(frozen=True)
class Task:
    """A text-to-text task. `files` maps a split name to candidate paths relative to a data directory,
    tried in order (the layouts of the public releases and of the shared samples)."""
    name: str
    reader: Callable[[pathlib.Path], Iterable[Record]]
    formatter: Callable[[Record], "tuple[str, str]"]
    metrics: "tuple[Metric, ...]"
    postprocessor: Callable[[str], Any] = strip_postprocessor
    reference: Callable[[Record], Any] | None = None  # default: postprocessor(targets)
    files: Mapping[str, "tuple[str, ...]"] = dataclasses.field(default_factory=dict)
    main_metric: str = ""  # the score "best checkpoint" selection uses; default: the first one reported
    description: str = ""

    def resolve(self, path, split: str = "train") -> list[pathlib.Path]:
        """A file, a list of files, or a data directory searched with this task's known layouts."""
        if isinstance(path, (list, tuple)):
            return [p for item in path for p in self.resolve(item, split)]
        path = pathlib.Path(path)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise FileNotFoundError(f"task {self.name!r}: {path} does not exist")
        if split not in self.files:
            raise ValueError(f"task {self.name!r}: unknown split {split!r}; known: {', '.join(self.files) or 'none'}")
        for candidate in self.files[split]:
            files = [path / part for part in candidate.split("+")]  # "a+b": a split made of several files
            if all(f.is_file() for f in files):
                return files
        raise FileNotFoundError(f"task {self.name!r}: no {split} file under {path} (looked for: "
                                f"{', '.join(self.files[split])})")

    def records(self, path, split: str = "train") -> Iterator[Record]:
        for file in self.resolve(path, split):
            yield from self.reader(file)

    def examples(self, path, split: str = "train", limit: int | None = None) -> Iterator[Example]:
        for record in itertools.islice(self.records(path, split), limit):
            yield self.make_example(record)

    def make_example(self, record: Record) -> Example:
        where = record.get("_where", "")
        try:
            inputs, targets = self.formatter(record)
            reference = self.reference(record) if self.reference else self.postprocessor(targets)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{where}: bad {self.name} record ({type(err).__name__}: {err})") from None
        return Example(inputs, targets, reference, where)

    def evaluate(self, examples: Sequence[Example], outputs: Sequence[str]) -> dict[str, float]:
        """Scores of the model's output texts against the examples' references."""
        predictions = [self.postprocessor(text) for text in outputs]
        references = [example.reference for example in examples]
        scores: dict[str, float] = {}
        for metric in self.metrics:
            scores.update(metric(references, predictions))
        return scores


_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    if task.name in _TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered (pass replace=True to redefine it)")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)
