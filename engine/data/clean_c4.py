"""C4's cleaning rules (T5 paper section 2.2; docs/T5.md) applied to Common Crawl WET files.

    t5forge data clean-c4 CC-MAIN-*.warc.wet.gz --out c4-shard.json.gz [--bad-words en.txt]

Line rules: citation markers ([1], [edit], [citation needed]) are removed; a line is kept only if it
ends in terminal punctuation (. ! ? or a closing quote, as C4), has at least 5 words and no word over
1,000 characters, and does not mention "javascript" or cookie / privacy-policy / terms-of-use
boilerplate. Page rules: a page is dropped if it contains "lorem ipsum" or a curly brace, has fewer
than 3 sentences left, contains a word of the bad-words list, or is not English with p >= 0.99.
Three-sentence spans seen before in this run are removed (the first copy stays), then the
3-sentence rule is checked again.

The bad-words list and the language identifier are not ours: `--bad-words FILE` (one entry per line;
C4 used the "List of Dirty, Naughty, Obscene, and Otherwise Bad Words", file `en`), else the list
shipped by the `better_profanity` package; language ID is the `langdetect` package (the one C4
used). When either is missing the rule is skipped with a clear message, never silently.
Sentences are split at . ! ? followed by whitespace (C4 used NLTK's punkt model, which needs a
download; the counts differ only on abbreviations).
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import re
import zlib
from typing import Callable, Iterator, Sequence

END_MARKS = (".", "?", "!", '"', "\u201d")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")
CITATION_RE = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])[\"')\]\u201d]*\s+")


@dataclasses.dataclass
class WetRecord:
    url: str
    date: str
    text: str


def iter_wet_records(path: str) -> Iterator[WetRecord]:
    """Conversion records of a WARC WET file (gzip or plain); warcinfo and others are skipped."""
    check_input_file(path, "WET file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        yield from _read_wet(path, opener)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        what = "truncated gzip file" if isinstance(err, EOFError) else f"not a valid gzip file ({err})"
        raise ValueError(f"{path}: {what}") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read: {err.strerror or err}") from None


def check_input_file(path: str, what: str) -> None:
    """A readable regular file, or a one-line error naming it (a directory is not "not found")."""
    if os.path.isdir(path):
        raise ValueError(f"{what} is a directory, not a file: {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def _read_wet(path: str, opener) -> Iterator[WetRecord]:
    with opener(path, "rb") as f:
        record_no = 0
        while True:
            line = f.readline()
            if not line:
                if record_no == 0:
                    raise ValueError(f"{path}: empty WET file (no WARC records)")
                return
            if not line.strip():
                continue
            record_no += 1
            if not line.startswith(b"WARC/"):
                raise ValueError(f"{path}: record {record_no}: expected a 'WARC/1.0' header line, got {line[:40]!r}")
            headers = {}
            while True:
                h = f.readline()
                if not h or not h.strip():
                    break
                key, _, value = h.decode("utf-8", "replace").partition(":")
                headers[key.strip().lower()] = value.strip()
            try:
                length = int(headers["content-length"])
            except (KeyError, ValueError):
                raise ValueError(f"{path}: record {record_no}: missing or bad Content-Length") from None
            body = f.read(length)
            if len(body) < length:
                raise ValueError(f"{path}: record {record_no}: truncated ({len(body)} of {length} bytes)")
            if headers.get("warc-type") == "conversion":
                yield WetRecord(headers.get("warc-target-uri", ""), headers.get("warc-date", ""),
                                body.decode("utf-8", "replace"))


def split_sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_SPLIT_RE.split(text.strip()) if s]


# --------------------------------------------------------------------------------------------------
# the third-party resources

def load_bad_words(path: str | None = None) -> tuple[list[str] | None, str]:
    """(words, where they came from); words is None when no list is available."""
    if path:
        check_input_file(path, "--bad-words file")
        try:
            with open(path, encoding="utf-8") as f:
                words = [w.strip().lower() for w in f if w.strip() and not w.startswith("#")]
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: --bad-words file is not UTF-8 text (byte {err.start})") from None
        if not words:
            raise ValueError(f"{path}: --bad-words file holds no words")
        return words, path
    try:
        import better_profanity
    except ImportError:
        return None, ("bad-words rule SKIPPED: pass --bad-words FILE (e.g. LDNOOBW's `en`) or "
                      "`pip install better-profanity`")
    wl = os.path.join(os.path.dirname(better_profanity.__file__), "profanity_wordlist.txt")
    with open(wl, encoding="utf-8") as f:
        return [w.strip().lower() for w in f if w.strip()], "better_profanity word list"


def bad_words_regex(words: Sequence[str]) -> re.Pattern:
    # whole words / phrases only, as C4 (so "classic" never matches "ass")
    alts = sorted({re.escape(w) for w in words}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)")


def langdetect_detector() -> tuple[Callable[[str], dict[str, float]] | None, str]:
    """A text -> {lang: probability} function from `langdetect`, seeded (it samples) for determinism."""
    try:
        import langdetect
        from langdetect import DetectorFactory
    except ImportError:
        return None, "English filter SKIPPED: `pip install langdetect` (the identifier C4 used)"
    DetectorFactory.seed = 0

    def detect(text: str) -> dict[str, float]:
        try:
            return {r.lang: r.prob for r in langdetect.detect_langs(text)}
        except langdetect.LangDetectException:  # no letters at all
            return {}
    return detect, "langdetect"


# --------------------------------------------------------------------------------------------------
# the rules

@dataclasses.dataclass
class C4Rules:
    min_words_per_line: int = 5
    min_sentences: int = 3
    max_word_length: int = 1000
    language: str = "en"
    language_threshold: float = 0.99
    dedup_sentences: int = 3   # span length for de-duplication; 0 turns it off


class C4Cleaner:
    """Stateful over a run: the de-duplication remembers every 3-sentence span it has kept."""

    def __init__(self, rules: C4Rules | None = None, bad_words: Sequence[str] | None = None,
                 language_detector: Callable[[str], dict[str, float]] | None = None):
        self.rules = rules or C4Rules()
        self.bad_re = bad_words_regex(bad_words) if bad_words else None
        self.detect = language_detector
        self.seen_spans: set[bytes] = set()
        self.pages = collections.Counter()   # kept / dropped:<reason>
        self.lines = collections.Counter()   # dropped lines by reason

    def clean_lines(self, text: str) -> tuple[list[str] | None, str]:
        """The per-line rules and the page rules that look at lines; (kept lines, "") or (None, reason)."""
        r = self.rules
        kept = []
        for line in text.splitlines():
            line = CITATION_RE.sub("", line).strip()
            if not line:
                continue
            low = line.lower()
            if "lorem ipsum" in low:
                return None, "lorem_ipsum"
            if "{" in line:
                return None, "curly_brace"
            if not line.endswith(END_MARKS):
                self.lines["no_terminal_punctuation"] += 1
                continue
            words = line.split()
            if len(words) < r.min_words_per_line:
                self.lines["too_few_words"] += 1
                continue
            if max(map(len, words)) > r.max_word_length:
                self.lines["word_too_long"] += 1
                continue
            if "javascript" in low:
                self.lines["javascript"] += 1
                continue
            if any(p in low for p in POLICY_SUBSTRINGS):
                self.lines["policy"] += 1
                continue
            kept.append(line)
        return kept, ""

    def _dedup(self, lines: list[str]) -> list[str]:
        """Drop the sentences of any `n`-sentence span already seen in this run; remember new spans."""
        n = self.rules.dedup_sentences
        sents = [(i, s) for i, line in enumerate(lines) for s in split_sentences(line)]
        drop = set()
        for k in range(len(sents) - n + 1):
            key = hashlib.blake2b(" ".join(s for _, s in sents[k:k + n]).encode(), digest_size=12).digest()
            if key in self.seen_spans:
                drop.update(range(k, k + n))
            else:
                self.seen_spans.add(key)
        if not drop:
            return lines
        out: dict[int, list[str]] = collections.defaultdict(list)
        for k, (i, s) in enumerate(sents):
            if k not in drop:
                out[i].append(s)
        return [" ".join(out[i]) for i in sorted(out)]

    def clean(self, text: str) -> tuple[str | None, str]:
        """(cleaned page, "kept") or (None, reason)."""
        lines, reason = self.clean_lines(text)
        if lines is None:
            return self._count(None, reason)
        if sum(len(split_sentences(line)) for line in lines) < self.rules.min_sentences:
            return self._count(None, "too_few_sentences")
        page = "\n".join(lines)
        if self.bad_re is not None and self.bad_re.search(page.lower()):
            return self._count(None, "bad_words")
        if self.detect is not None:
            probs = self.detect(page)
            if probs.get(self.rules.language, 0.0) < self.rules.language_threshold:
                return self._count(None, "not_english" if self.rules.language == "en" else "wrong_language")
        if self.rules.dedup_sentences:
            lines = self._dedup(lines)
            if sum(len(split_sentences(line)) for line in lines) < self.rules.min_sentences:
                return self._count(None, "duplicate_spans")
            page = "\n".join(lines)
        return self._count(page, "kept")

    def _count(self, page, reason):
        self.pages[reason if page is None else "kept"] += 1
        return page, reason


def check_output_path(out: str, inputs: Sequence[str], flag: str = "--out") -> None:
    """Refuse an output that would overwrite (or sit inside) an input, or that is a directory."""
    if os.path.isdir(out):
        raise ValueError(f"{flag} {out}: is a directory; give a file name such as {os.path.join(out, 'c4.json.gz')}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {out}: directory {parent} does not exist")
    real_out = os.path.realpath(out)
    for p in inputs:
        real_in = os.path.realpath(p)
        same = real_out == real_in or (os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p))
        inside = real_out.startswith(real_in.rstrip(os.sep) + os.sep)
        if same or inside or os.path.realpath(out + ".tmp") == real_in:
            raise ValueError(f"{flag} {out}: is {'an input' if same or not inside else 'inside input'} {p}; "
                             "writing it would destroy the input; choose another output path")


def clean_wet_files(paths: Sequence[str], out: str, cleaner: C4Cleaner) -> int:
    """Write allenai/c4-style JSON lines of the pages that pass; returns the number written.

    Written to `OUT.tmp` and renamed at the end: a failed run removes the temporary file and leaves
    any earlier OUT as it was."""
    for p in paths:
        check_input_file(p, "WET file")
    check_output_path(out, paths)
    written = 0
    tmp = out + ".tmp"
    opener = gzip.open if out.endswith(".gz") else open
    try:
        with opener(tmp, "wt", encoding="utf-8") as f:
            for path in paths:
                for rec in iter_wet_records(path):
                    page, _ = cleaner.clean(rec.text)
                    if page is not None:
                        f.write(json.dumps({"text": page, "timestamp": rec.date, "url": rec.url},
                                           ensure_ascii=False) + "\n")
                        written += 1
        os.replace(tmp, out)  # a crash never leaves a half-written shard under the final name
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return written
