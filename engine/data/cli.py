"""`t5forge data ...`: data tools.

    t5forge data clean-c4 CC-MAIN-*.warc.wet.gz --out c4-shard.json.gz [--bad-words en.txt]
"""
from __future__ import annotations

import argparse
import sys

from engine.errors import USER_ERRORS, report
from engine.data.clean_c4 import (C4Cleaner, C4Rules, check_input_file, check_output_path, clean_wet_files,
                                  langdetect_detector, load_bad_words)


def _clean_c4(args) -> int:
    if not 0.0 <= args.language_threshold <= 1.0:
        raise ValueError(f"--language-threshold: a probability in [0, 1], got {args.language_threshold}")
    for path in args.wet_files:  # every path checked before any work (and before any note is printed)
        check_input_file(path, "WET file")
    check_output_path(args.out, args.wet_files)
    words, words_from = load_bad_words(args.bad_words)
    detector, lang_from = (None, "English filter off (--no-language-filter)") if args.no_language_filter \
        else langdetect_detector()
    for msg in (words_from, lang_from):
        if "SKIPPED" in msg or "off" in msg:
            print(f"t5forge data clean-c4: {msg}", file=sys.stderr)
    rules = C4Rules(language_threshold=args.language_threshold, dedup_sentences=0 if args.no_dedup else 3)
    cleaner = C4Cleaner(rules, bad_words=words, language_detector=detector)
    n = clean_wet_files(args.wet_files, args.out, cleaner)
    total = sum(cleaner.pages.values())
    print(f"wrote {n} of {total} pages to {args.out} (bad words: {words_from if words else 'none'}; "
          f"language: {lang_from})")
    for reason, count in sorted(cleaner.pages.items()):
        print(f"  pages {reason}: {count}")
    for reason, count in sorted(cleaner.lines.items()):
        print(f"  lines dropped, {reason}: {count}")
    return 0


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="t5forge data", description="data tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clean-c4", help="apply C4's cleaning rules to Common Crawl WET files")
    c.add_argument("wet_files", nargs="+", help="WARC WET files, gzip or plain")
    c.add_argument("--out", required=True, help="output JSON lines (.json.gz for gzip)")
    c.add_argument("--bad-words", help="bad-words list, one per line (default: the better_profanity package's)")
    c.add_argument("--language-threshold", type=float, default=0.99, help="min P(English) per page")
    c.add_argument("--no-language-filter", action="store_true", help="keep pages in any language")
    c.add_argument("--no-dedup", action="store_true", help="skip the three-sentence-span de-duplication")
    args = parser.parse_args(argv)
    try:
        return _clean_c4(args)
    except USER_ERRORS as exc:
        return report(f"data {args.cmd}", exc)
