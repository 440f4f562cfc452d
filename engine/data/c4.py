"""Streaming reader of C4-style JSON lines (allenai/c4 layout), gzip or plain, sharded and resumable.

    reader = C4Reader(["c4/en/c4-train.*.json.gz"], seed=0, shuffle_buffer=1024,
                      shard_index=rank * workers + worker, num_shards=world_size * workers)
    for text in reader: ...
    state = reader.state_dict()        # JSON-able; a new reader + load_state_dict(state) resumes
                                       # exactly at the next document

Each line is `{"text": ..., "timestamp": ..., "url": ...}`; only `text` is required. Memory holds
one read chunk and the shuffle buffer, never the corpus.

Sharding: with at least as many files as shards, shard s reads files s, s+N, s+2N, ... of the epoch's
(seeded) file order; with fewer files, every shard reads every file and keeps the lines whose running
line number is s mod N. Either way every line belongs to exactly one shard. Counting is by line, bad
lines included, so a skipped line never shifts the split.

Bad input is skipped and counted (`reader.stats`), the first `max_reported` cases logged with file and
line: a corrupt gzip member (reading resumes at the next member), invalid UTF-8, invalid JSON, a
record without a string `text`. `strict=True` raises ValueError at the first one instead. A pass over
the data that yields no document at all raises one ValueError that says why.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import zlib
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger("t5forge.data")

_GZIP_MAGIC = b"\x1f\x8b\x08"
_CHUNK = 1 << 20
BAD_KINDS = ("corrupt_gzip", "invalid_utf8", "invalid_json", "missing_text")


def expand_paths(paths: Sequence[str] | str) -> list[str]:
    """Files named by paths and glob patterns, in a stable (sorted per pattern) order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for p in map(os.fspath, paths):
        if glob.has_magic(p):
            matched = sorted(f for f in glob.glob(p) if os.path.isfile(f))
            if not matched:
                raise FileNotFoundError(f"no file matches the data path pattern {p!r}")
            files.extend(matched)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"data file not found: {p}")
    if not files:
        raise ValueError("no data files given")
    return files


@dataclasses.dataclass
class ReadStats:
    documents: int = 0
    lines: int = 0  # lines of this shard, bad ones included
    bad: dict = dataclasses.field(default_factory=lambda: {k: 0 for k in BAD_KINDS})
    reported: list = dataclasses.field(default_factory=list)  # "file:line: kind" of the first few

    @property
    def skipped(self) -> int:
        return sum(self.bad.values())


def _gzip_blocks(f, on_corrupt) -> Iterator[bytes | None]:
    """Decompressed bytes of a (multi-member) gzip stream. A member that fails to inflate is reported
    through on_corrupt() and reading goes on at the next gzip header, so one bad member loses only its
    own lines. A `None` block marks the break (the caller drops the partial line around it)."""
    d, started = zlib.decompressobj(31), False
    buf = b""
    while True:
        if not buf:
            buf = f.read(_CHUNK)
            if not buf:
                if started and not d.eof:
                    on_corrupt("truncated gzip member")
                    yield None
                return
        try:
            out = d.decompress(buf)
            started = True
        except zlib.error as exc:
            on_corrupt(f"corrupt gzip member ({exc})")
            yield None
            buf = _seek_next_member(f, buf[1:])
            d, started = zlib.decompressobj(31), False
            continue
        if out:
            yield out
        if d.eof:
            buf = d.unused_data
            d, started = zlib.decompressobj(31), False
        else:
            buf = b""


def _seek_next_member(f, buf: bytes) -> bytes:
    """Bytes from the next gzip header on (searching on through the file), or b"" at the end."""
    while True:
        i = buf.find(_GZIP_MAGIC)
        if i >= 0:
            return buf[i:]
        more = f.read(_CHUNK)
        if not more:
            return b""
        buf = buf[-2:] + more


def common_start(states: list, num_files: int) -> tuple[int, int, int, int, int]:
    """(epoch, first file of the epoch's order, line, offset, global_line): a place in the corpus that every
    reader of one split (their `state_dict()`s, None for a reader that has not started) has read past.

    With at least as many files as shards, shard s of N reads files s, s+N, ... of the epoch order and its
    file_pos k means files s, s+N, ..., s+(k-1)N are done: every file before min(s + kN) is done, so
    reading restarts at that file's first line. With fewer files every shard reads every file in the same
    order and the one furthest behind gives the line it had read (and its running line count)."""
    if any(st is None for st in states):
        return 0, 0, 0, 0, 0
    epoch = min(st["epoch"] for st in states)
    behind = [st for st in states if st["epoch"] == epoch]
    shards = behind[0]["shard"][1]
    if num_files >= shards:
        first = min(st["shard"][0] + shards * st["file_pos"] + st.get("first_file", 0) for st in behind)
        return epoch, min(first, num_files), 0, 0, 0
    st = min(behind, key=lambda st: (st["file_pos"], st["line"]))
    return epoch, st["file_pos"] + st.get("first_file", 0), st["line"], st["offset"], st["global_line"]


class C4Reader:
    """Documents' `text` from C4 JSON lines; see the module docstring."""

    def __init__(self, paths: Sequence[str] | str, *, seed: int = 0, shuffle_buffer: int = 1024,
                 shard_index: int = 0, num_shards: int = 1, epochs: int | None = 1, shuffle_files: bool = True,
                 strict: bool = False, max_reported: int = 5):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} not in [0, num_shards={num_shards})")
        self.files = expand_paths(paths)
        self.seed, self.shuffle_buffer = seed, max(int(shuffle_buffer), 0)
        self.shard_index, self.num_shards = shard_index, num_shards
        self.epochs, self.shuffle_files, self.strict, self.max_reported = epochs, shuffle_files, strict, max_reported
        self.by_files = len(self.files) >= num_shards
        self.stats = ReadStats()
        # first_file: files of this epoch's order left out (a stream re-split over other shards, `resharded_state`)
        self._state = dict(epoch=0, file_pos=0, line=0, offset=0, global_line=0, epoch_docs=0, first_file=0)
        self._buffer: list[str] = []
        self._corrupt_details: list[str] = []
        self._rng = np.random.default_rng([seed, shard_index, 0x5EED])

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(self._state, buffer=list(self._buffer), rng=self._rng.bit_generator.state,
                    stats=dataclasses.asdict(self.stats), files=list(self.files),
                    shard=[self.shard_index, self.num_shards])

    def load_state_dict(self, state: dict) -> None:
        if state["files"] != self.files or state["shard"] != [self.shard_index, self.num_shards]:
            raise ValueError("reader state is for other files or another shard split; it cannot resume here")
        self._state = {k: state.get(k, 0) if k == "first_file" else state[k] for k in self._state}
        self._buffer = list(state["buffer"])
        self._rng.bit_generator.state = state["rng"]
        self.stats = ReadStats(**state["stats"])

    def resharded_state(self, states: list, step: int) -> dict:
        """A state for this reader (its own shard of its own split) from the states of the readers of
        another split over the same files: reading starts where every old shard had got to (`common_start`),
        with an empty shuffle buffer and a random generator drawn afresh from (seed, shard, step).

        Not exact, by design: what the old readers had read but not yet handed on (each one's shuffle
        buffer, and the tokens and examples its dataset held) is dropped, and lines an old shard had read
        past the common start are read again under the new split. With at least as many files as shards
        the common start may fall inside a file: with files split over the new shards, shard 0 (whose first
        file that is) starts it at that line."""
        known = [st for st in states if st is not None]
        if known and list(known[0]["files"]) != self.files:
            raise ValueError("reader states are for other data files; they cannot be re-split over these")
        epoch, first, line, offset, global_line = common_start(states, len(self.files))
        if self.by_files:
            global_line = 0
            if self.shard_index != 0:
                line = offset = 0
        rng = np.random.default_rng([self.seed, self.shard_index, 0x5EED, step]).bit_generator.state
        return dict(epoch=epoch, file_pos=0, line=line, offset=offset, global_line=global_line,
                    epoch_docs=1 if (epoch, first, line) != (0, 0, 0) else 0, first_file=first, buffer=[], rng=rng,
                    stats=dataclasses.asdict(ReadStats()), files=list(self.files),
                    shard=[self.shard_index, self.num_shards])

    # ---- reading ----------------------------------------------------------------------------------
    def epoch_files(self, epoch: int) -> list[str]:
        """This shard's files of one epoch, in reading order (less the first `first_file` of the current one)."""
        order = list(self.files)
        if self.shuffle_files:
            perm = np.random.default_rng([self.seed, epoch, 0xF11E]).permutation(len(order))
            order = [order[i] for i in perm]
        if epoch == self._state["epoch"]:
            order = order[self._state["first_file"]:]
        return order[self.shard_index::self.num_shards] if self.by_files else order

    def _bad(self, path: str, line: int, kind: str, detail: str = "") -> None:
        where = f"{path}:{line}: {kind.replace('_', ' ')}{': ' + detail if detail else ''}"
        if self.strict:
            raise ValueError(where)
        self.stats.bad[kind] += 1
        if len(self.stats.reported) < self.max_reported:
            self.stats.reported.append(where)
            log.warning("skipped bad input %s", where)

    def _lines(self, path: str, start_line: int, start_offset: int) -> Iterator[tuple[int, int, bytes | None]]:
        """(line number, offset after the line, line bytes or None for a line lost to corruption)."""
        lineno = 0
        with open(path, "rb") as f:
            if path.endswith(".gz"):
                blocks = _gzip_blocks(f, self._corrupt_details.append)
                offset = 0
            else:
                f.seek(start_offset)
                lineno, offset = start_line, start_offset
                blocks = iter(lambda: f.read(_CHUNK), b"")
            tail = b""
            for block in blocks:
                if block is None:  # corrupt member: the partial line around it is lost, as one bad line
                    lineno += 1
                    if lineno > start_line:
                        yield lineno, offset, None
                    tail = b""
                    continue
                data = tail + block
                parts = data.split(b"\n")
                tail = parts.pop()
                for part in parts:
                    lineno += 1
                    offset += len(part) + 1
                    if lineno > start_line:
                        yield lineno, offset, part
            if tail:
                lineno += 1
                offset += len(tail)
                if lineno > start_line:
                    yield lineno, offset, tail

    def _parse(self, path: str, lineno: int, raw: bytes) -> str | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad(path, lineno, "invalid_utf8", f"byte {exc.start}")
            return None
        try:
            rec = json.loads(line)
        except ValueError as exc:
            self._bad(path, lineno, "invalid_json", str(exc).split(":")[0])
            return None
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            self._bad(path, lineno, "missing_text")
            return None
        return text

    def _documents(self) -> Iterator[str]:
        """This shard's documents in file order, updating the resume state before each yield."""
        st = self._state
        while self.epochs is None or st["epoch"] < self.epochs:
            files = self.epoch_files(st["epoch"])
            while st["file_pos"] < len(files):
                path = files[st["file_pos"]]
                for lineno, offset, raw in self._lines(path, st["line"], st["offset"]):
                    st["line"], st["offset"] = lineno, offset
                    if not self.by_files:
                        mine = st["global_line"] % self.num_shards == self.shard_index
                        st["global_line"] += 1
                        if not mine:
                            continue
                    self.stats.lines += 1
                    if raw is None:
                        self._bad(path, lineno, "corrupt_gzip", self._corrupt_details[-1])
                        continue
                    if not raw.strip():
                        continue
                    text = self._parse(path, lineno, raw)
                    if text is not None:
                        st["epoch_docs"] += 1
                        self.stats.documents += 1
                        yield text
                st["file_pos"] += 1
                st["line"] = st["offset"] = 0
            if st["epoch_docs"] == 0:
                why = (f"{self.stats.skipped} bad lines skipped; first: {self.stats.reported[:1]}"
                       if self.stats.skipped else "the files are empty or this shard got no lines")
                raise ValueError(f"no readable document in {len(self.files)} data file(s) "
                                 f"(shard {self.shard_index}/{self.num_shards}; {why}): {self.files[0]} ...")
            st["epoch"] += 1
            st.update(file_pos=0, line=0, offset=0, global_line=0, epoch_docs=0, first_file=0)

    def __iter__(self) -> Iterator[str]:
        """Documents through the shuffle buffer: each new document takes the place of a random one in
        the buffer, which is yielded; after the last epoch the buffer drains in random order."""
        buf, size = self._buffer, self.shuffle_buffer
        for doc in self._documents():
            if len(buf) < size:
                buf.append(doc)
                continue
            if size == 0:
                yield doc
                continue
            i = int(self._rng.integers(size))
            out, buf[i] = buf[i], doc
            yield out
        while buf:
            i = int(self._rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
