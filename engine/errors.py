"""The one error policy of the `t5forge` commands: expected failures end as one line, never a traceback.

Every command catches, at its edge, the errors a user's input or machine can cause (`USER_ERRORS`:
bad values and formats, OS errors such as a missing file or a full disk, undecodable bytes) and prints
`t5forge VERB: error: <one line naming the path or config key>` with exit code 2. Programming errors
keep their traceback. Readers raise `ValueError`s that already name the file; `one_line` turns any of
these exceptions into that single line.
"""
from __future__ import annotations

import os

USER_ERRORS = (ValueError, OSError, UnicodeDecodeError, EOFError)
MAX_CHARS = 1000  # long paths fit; a dumped document (8,933 chars, seen in issue 15) does not


def one_line(err: BaseException) -> str:
    """An exception as one line of at most MAX_CHARS characters, with the path of an OSError."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
        if err.filename2 is not None:
            text += f" ({err.filename2})"
    elif isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r})"
    elif isinstance(err, KeyError):
        text = f"missing key {err.args[0]!r}" if err.args else "missing key"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS - 20] + f" ... ({len(text)} chars)"
    return text


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file, or a ValueError / FileNotFoundError naming the path and the problem."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ValueError(f"{p}: {what} is a directory, not a file")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{what} not found: {p}")
    with open(p, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{p}: {what} is not UTF-8 text (byte {err.start}; a binary file?)") from None


def report(verb: str, err: BaseException) -> int:
    """Print `t5forge VERB: error: ...` to stderr; returns the exit code 2."""
    import sys

    print(f"t5forge {verb}: error: {one_line(err)}", file=sys.stderr)
    return 2
