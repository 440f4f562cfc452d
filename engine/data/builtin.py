"""The built-in default corpus: docstrings of the Python standard library installed on this machine.

    from engine.data.builtin import builtin_corpus, builtin_tokenizer
    paths = builtin_corpus()        # [".../builtin/corpus.json.gz"], C4-style JSON lines
    tok = builtin_tokenizer()       # unigram model trained on it, 2,000 pieces + 100 sentinels

With no data given, `t5forge pretrain` uses this so the tiny model trains on CPU out of the box.
Nothing is downloaded and nothing lands in the repo: the files are written once under
$T5FORGE_CACHE/builtin (default ~/.cache/t5forge/builtin) and reused while the Python version and the
parameters are the same (recorded in meta.json). Sources are parsed with `ast`, never imported (so
no module runs code), in sorted path order: the corpus is the same on every run of one Python.
One document per module: its docstring and those of its classes and functions, in source order.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
import sys
import sysconfig
import warnings

from engine.tokenizer import Tokenizer, iter_text_files, train_tokenizer

CORPUS_FILE = "corpus.json.gz"
MODEL_PREFIX = "spm"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
              "turtledemo", "ensurepip", "venv", "idlelib", "pydoc_data"}


def cache_dir(path: str | None = None) -> str:
    root = path or os.environ.get("T5FORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "t5forge")
    return os.path.join(root, "builtin") if path is None else path


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _module_document(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None  # a few stdlib files are templates or other encodings
    parts = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40 and not (node is not tree and isinstance(node, ast.Module)):
                parts.append(doc.strip())
    parts = list(dict.fromkeys(parts))  # drop repeated docstrings (overloads, aliases), keep order
    return "\n\n".join(parts) if parts else None


def _meta(max_bytes: int, vocab_size: int) -> dict:
    return {"python": sys.version.split()[0], "max_bytes": max_bytes, "vocab_size": vocab_size, "version": 1}


def _fresh(directory: str, meta: dict) -> bool:
    try:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            return json.load(f) == meta
    except (OSError, ValueError):
        return False


def build_corpus(directory: str, max_bytes: int) -> tuple[str, int]:
    """Write the corpus file; returns (path, number of documents)."""
    os.makedirs(directory, exist_ok=True)
    root = sysconfig.get_paths()["stdlib"]
    out = os.path.join(directory, CORPUS_FILE)
    tmp = out + f".tmp{os.getpid()}"
    total = docs = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings of old escape sequences in some sources
        with gzip.GzipFile(tmp, "wb", mtime=0) as gz:  # mtime 0: byte-identical on every build
            for path in _stdlib_files():
                text = _module_document(path)
                if not text:
                    continue
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                line = json.dumps({"text": text, "timestamp": "", "url": f"python://{module}"}) + "\n"
                gz.write(line.encode("utf-8"))
                total += len(text)
                docs += 1
                if total >= max_bytes:
                    break
    if docs == 0:
        raise ValueError(f"no docstrings found under {root}: the built-in corpus cannot be made")
    os.replace(tmp, out)
    return out, docs


def ensure_builtin(directory: str | None = None, max_bytes: int = 4_000_000,
                   vocab_size: int = 2000) -> tuple[list[str], str]:
    """(corpus paths, tokenizer model path), built on first use and cached."""
    d = cache_dir(directory)
    meta = _meta(max_bytes, vocab_size)
    corpus = os.path.join(d, CORPUS_FILE)
    model = os.path.join(d, MODEL_PREFIX + ".model")
    if not (_fresh(d, meta) and os.path.isfile(corpus) and os.path.isfile(model)):
        corpus, _ = build_corpus(d, max_bytes)
        prefix = os.path.join(d, f"{MODEL_PREFIX}.tmp{os.getpid()}")
        # one thread: SentencePiece's multi-threaded EM can differ run to run in the last digits
        train_tokenizer(iter_text_files([corpus]), vocab_size, prefix, num_threads=1,
                        input_sentence_size=300_000)
        for ext in (".model", ".vocab"):
            os.replace(prefix + ext, os.path.join(d, MODEL_PREFIX + ext))
        with open(os.path.join(d, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
    return [corpus], model


def builtin_corpus(directory: str | None = None, **kw) -> list[str]:
    return ensure_builtin(directory, **kw)[0]


def builtin_tokenizer(directory: str | None = None, **kw) -> Tokenizer:
    return Tokenizer(ensure_builtin(directory, **kw)[1])
