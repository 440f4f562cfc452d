"""Readers for the file layouts that task data comes in: TSV (GLUE), CSV (CNN/DailyMail), JSON lines
(Hugging Face exports: XSum, WMT16), JSON documents (SQuAD, flattened or official nested), and pairs of
aligned text files (WMT releases, OpenNMT layout).

Every reader yields plain dict records with an extra `_where` key ("file:line") so that a formatter can
name the exact input line when a record is bad. Readers stream: a file is never read whole into memory
except JSON documents, which have no streaming form.
"""
from __future__ import annotations

import csv
import json
import pathlib
import sys
from typing import Iterator, Sequence

# GLUE's TSVs contain stray quote characters inside sentences (MRPC: `" The foodservice ...`); with
# QUOTE_NONE the csv module never tries to pair them up, and big fields (long articles) must fit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _open_text(path: pathlib.Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task data file not found")
    # utf-8-sig: the GLUE MRPC header starts with a byte-order mark.
    return open(path, encoding="utf-8-sig", newline="")


def read_tsv(path, fieldnames: Sequence[str] | None = None, required: Sequence[str] = ()) -> Iterator[dict]:
    """Rows of a tab-separated file as dicts.

    With `fieldnames` the file has no header (CoLA's raw release); otherwise the first line is the header.
    Extra columns beyond the header are ignored; a row missing a `required` column is an error naming
    the file and line.
    """
    path = pathlib.Path(path)
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(fieldnames) if fieldnames is not None else next(reader, None)
        if header is None:
            return
        if fieldnames is None:
            _check_header(path, reader.line_num, "\t".join(header), header, required, "\t")
        width = max((header.index(name) for name in required), default=-1) + 1
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line (CoLA's out-of-domain file ends without one, others with one)
            if len(row) < width:
                raise ValueError(f"{path}:{line}: expected at least {width} tab-separated columns "
                                 f"({', '.join(header[:width])}); found {_looks_like(chr(9).join(row))}")
            record = dict(zip(header, row))
            record["_where"] = f"{path}:{line}"
            yield record


def read_csv(path, required: Sequence[str] = ()) -> Iterator[dict]:
    """Rows of a comma-separated file with a header (quoted fields may span lines, as in CNN/DailyMail)."""
    path = pathlib.Path(path)
    with _open_text(path) as f:
        first = f.readline()
        f.seek(0)
        reader = csv.DictReader(f)
        if required:
            _check_header(path, 1, first, reader.fieldnames or [], required, ",")
        for row in reader:
            row["_where"] = f"{path}:{reader.line_num}"
            yield row


_FORMAT_NAMES = {"\t": "tab-separated (TSV)", ",": "comma-separated (CSV)"}


def _check_header(path, line: int, raw: str, header: Sequence[str], required: Sequence[str], sep: str) -> None:
    """A header without a `required` column: one line naming the file, the line, what was expected and
    what was found (a JSON line or a CSV given where a TSV is expected says so, not "missing column")."""
    missing = [name for name in required if name not in header]
    if not missing:
        return
    expected = f"a header line with the columns {', '.join(required)}"
    if sep not in raw or raw.lstrip().startswith(("{", "[")):
        raise ValueError(f"{path}:{line}: not a {_FORMAT_NAMES[sep]} file: expected {expected}; "
                         f"found {_looks_like(raw)}")
    raise ValueError(f"{path}:{line}: the header has no column {', '.join(map(repr, missing))}: "
                     f"expected {expected}; found {_looks_like(raw)}")


def _looks_like(raw: str) -> str:
    """What a line of unexpected form is (a JSON line, comma- or tab-separated fields), with its start."""
    text = raw.strip()
    if text.startswith(("{", "[")):
        kind = "a JSON line"
    elif "\t" in text:
        kind = f"{text.count(chr(9)) + 1} tab-separated fields"
    elif "," in text:
        kind = "comma-separated text"
    else:
        kind = "one field"
    return f"{kind} {text[:60] + '...' if len(text) > 60 else text!r}"


def read_jsonl(path, required: Sequence[str] = ()) -> Iterator[dict]:
    """One JSON object per line (the Hugging Face `datasets` export layout)."""
    path = pathlib.Path(path)
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            for name in required:
                if name not in record:
                    raise ValueError(f"{path}:{number}: missing field {name!r}")
            record["_where"] = f"{path}:{number}"
            yield record


def read_json_or_jsonl(path, required: Sequence[str] = ()) -> Iterator[dict]:
    """JSON lines, or a JSON document whose `data` list holds the records (HF's pretty-printed fixtures)."""
    path = pathlib.Path(path)
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith("{") and "\n" in head and not _first_line_is_object(head):
        document = _load_json(path)
        records = document.get("data") if isinstance(document, dict) else document
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected JSON lines or a document with a 'data' list")
        for number, record in enumerate(records):
            for name in required:
                if name not in record:
                    raise ValueError(f"{path}: data[{number}] missing field {name!r}")
            yield {**record, "_where": f"{path}:data[{number}]"}
        return
    yield from read_jsonl(path, required)


def _first_line_is_object(head: str, without: str | None = None) -> bool:
    """Whether the text starts with a complete JSON object on its first line (JSON lines), optionally
    one without the key `without` (a whole one-line document such as SQuAD's own release has "data")."""
    try:
        first = json.loads(head.split("\n", 1)[0])
    except json.JSONDecodeError:
        return False
    return isinstance(first, dict) and (without is None or without not in first)


def _load_json(path: pathlib.Path):
    with _open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None


def read_squad(path) -> Iterator[dict]:
    """SQuAD records {id, question, context, answers: [texts]} from any of its three layouts:
    the official nested release (data -> paragraphs -> qas), the Hugging Face flattened document
    ({"data": [{id, question, context, answers: {text, answer_start}}]}), or flattened JSON lines."""
    path = pathlib.Path(path)
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith("{") and _first_line_is_object(head, without="data"):
        flat: Iterator[dict] = read_jsonl(path)
    else:
        document = _load_json(path)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise ValueError(f"{path}: not a SQuAD file (no 'data' list)")
        if data and "paragraphs" in data[0]:
            yield from _squad_nested(path, data)
            return
        flat = ({**r, "_where": f"{path}:data[{i}]"} for i, r in enumerate(data))
    for record in flat:
        answers = record.get("answers", {})
        texts = answers.get("text", []) if isinstance(answers, dict) else [a["text"] for a in answers]
        for name in ("question", "context"):
            if name not in record:
                raise ValueError(f"{record['_where']}: missing field {name!r}")
        yield {"id": record.get("id", ""), "question": record["question"], "context": record["context"],
               "answers": list(texts), "_where": record["_where"]}


def _squad_nested(path, data) -> Iterator[dict]:
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article["paragraphs"]):
            for q, qa in enumerate(paragraph["qas"]):
                yield {"id": qa.get("id", ""), "question": qa["question"], "context": paragraph["context"],
                       "answers": [ans["text"] for ans in qa.get("answers", [])],
                       "_where": f"{path}:data[{a}].paragraphs[{p}].qas[{q}]"}


# Suffix pairs for aligned text files: OpenNMT names the sides src-*/tgt-*, WMT releases by language.
def read_parallel(path, source_lang: str, target_lang: str) -> Iterator[dict]:
    """Translation pairs {source_lang: ..., target_lang: ...} from JSON lines ({"translation": {...}}) or
    from two aligned text files: `X.<src>` + `X.<tgt>` (WMT releases) or `src-X` + `tgt-X` (OpenNMT)."""
    path = pathlib.Path(path)
    if path.suffix in (".json", ".jsonl"):
        for record in read_jsonl(path, required=("translation",)):
            pair = record["translation"]
            for lang in (source_lang, target_lang):
                if lang not in pair:
                    raise ValueError(f"{record['_where']}: translation has no {lang!r} side")
            yield {source_lang: pair[source_lang], target_lang: pair[target_lang], "_where": record["_where"]}
        return
    target_path = partner_file(path, source_lang, target_lang)
    with _open_text(path) as src, _open_text(target_path) as tgt:
        number = 0
        while True:
            s, t = src.readline(), tgt.readline()
            if not s and not t:
                return
            number += 1
            if not s or not t:
                raise ValueError(f"{path}:{number}: not aligned with {target_path} (one file ends here)")
            yield {source_lang: s.rstrip("\n"), target_lang: t.rstrip("\n"), "_where": f"{path}:{number}"}


def partner_file(path: pathlib.Path, source_lang: str, target_lang: str) -> pathlib.Path:
    if path.suffix == f".{source_lang}":
        return path.with_suffix(f".{target_lang}")
    if path.name.startswith("src-"):
        return path.with_name("tgt-" + path.name[len("src-"):])
    raise ValueError(f"{path}: cannot find the {target_lang} side: name it X.{source_lang} next to "
                     f"X.{target_lang}, src-X next to tgt-X, or use JSON lines with a 'translation' field")
