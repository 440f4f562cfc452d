"""C4 cleaning: each rule on synthetic pages, the real (Aragonese) WET file, the CLI."""
import gzip
import json

import pytest

from engine.data.clean_c4 import (C4Cleaner, C4Rules, iter_wet_records, langdetect_detector, load_bad_words,
                                  split_sentences)
from engine.data.cli import data_main
from tests.conftest import shared_file

GOOD = ["The river runs quietly past the old stone mill every spring.",
        "Farmers in the valley still grind their own grain there today.",
        "Visitors often stop to watch the heavy wheel turning slowly.",
        "A small museum next door explains how the mill was built."]


def _page(*extra, base=GOOD):
    return "\n".join(list(base) + list(extra))


def _cleaner(**kw):
    return C4Cleaner(C4Rules(dedup_sentences=kw.pop("dedup", 3)), **kw)


def test_line_rules():
    c = _cleaner()
    page, why = c.clean(_page("Menu", "Click here to see more photos of the mill",  # no terminal punctuation
                              "Too short line.",  # fewer than 5 words
                              "Please enable JavaScript in your browser to view this.",
                              "By using this site you agree to our privacy policy and terms.",
                              "This website uses cookies to improve your experience today.",
                              "The mill was rebuilt in 1901 after a long flood.[1][citation needed]"))
    assert why == "kept"
    assert page.split("\n") == GOOD + ["The mill was rebuilt in 1901 after a long flood."]
    assert c.lines == {"no_terminal_punctuation": 2, "too_few_words": 1, "javascript": 1, "policy": 2}
    page, _ = _cleaner().clean(_page("A quoted line that ends with a closing quote mark \"yes\""))
    assert page.endswith('mark "yes"')
    assert _cleaner().clean(_page("x" * 1001 + " a b c d."))[0].count("x" * 1001) == 0


@pytest.mark.parametrize("extra,reason", [
    ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("function init() { return the value of the thing. }", "curly_brace"),
])
def test_page_rules(extra, reason):
    assert _cleaner().clean(_page(extra)) == (None, reason)


def test_too_few_sentences():
    assert _cleaner().clean(_page(base=GOOD[:2])) == (None, "too_few_sentences")
    assert _cleaner().clean("One sentence here is fine. Two sentences are here now. And a third one ends it.")[1] == "kept"
    assert split_sentences("A b c. D e f! G h? I") == ["A b c.", "D e f!", "G h?", "I"]


def test_bad_words_from_user_file(tmp_path):
    f = tmp_path / "en.txt"
    f.write_text("badword\ntwo words\n", encoding="utf-8")
    words, src = load_bad_words(str(f))
    assert words == ["badword", "two words"] and src == str(f)
    c = _cleaner(bad_words=words)
    assert c.clean(_page("Then somebody said a BadWord out loud by the mill.")) == (None, "bad_words")
    assert c.clean(_page("They were two words apart when the wheel stopped.")) == (None, "bad_words")
    assert c.clean(_page("The badwordy thing is not a whole word match at all."))[1] == "kept"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_bad_words(str(tmp_path / "nope.txt"))


def test_bad_words_from_package():
    pytest.importorskip("better_profanity")
    words, src = load_bad_words(None)
    assert len(words) > 500 and "better_profanity" in src
    assert _cleaner(bad_words=words).clean(_page("He yelled fuck at the broken wheel in anger."))[1] == "bad_words"


def test_three_sentence_span_dedup():
    c = _cleaner()
    assert c.clean(_page())[1] == "kept"
    other = ["Our bakery opens at six in the morning every day.", "Fresh bread comes out of the oven by seven.",
             "The rye loaf is the most popular one we sell."]
    page, why = c.clean(_page(*other))  # GOOD is a repeat: only the new sentences remain
    assert why == "kept" and page.split("\n") == other
    assert c.clean(_page())[1] == "duplicate_spans"
    assert _cleaner(dedup=0).clean(_page())[1] == "kept"


def test_english_filter_on_synthetic_pages():
    detect, src = langdetect_detector()
    if detect is None:
        pytest.skip(src)
    c = _cleaner(language_detector=detect)
    assert c.clean(_page())[1] == "kept"
    german = ["Der Fluss fließt jeden Frühling ruhig an der alten Mühle vorbei.",
              "Die Bauern im Tal mahlen dort noch heute ihr eigenes Getreide.",
              "Besucher bleiben oft stehen, um das schwere Rad zu beobachten."]
    assert c.clean("\n".join(german)) == (None, "not_english")


def _wet(tmp_path, pages, gz=False):
    out = b""
    for i, text in enumerate(pages):
        body = text.encode()
        out += (f"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: https://ex.com/{i}\r\n"
                f"WARC-Date: 2019-04-25T12:57:54Z\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body + b"\r\n\r\n"
    p = tmp_path / ("pages.warc.wet" + (".gz" if gz else ""))
    p.write_bytes(gzip.compress(out) if gz else out)
    return p


def test_real_wet_file_is_parsed_and_aragonese_is_dropped():
    for name in ["commoncrawl/whirlwind.warc.wet", "commoncrawl/whirlwind.warc.wet.gz"]:
        recs = list(iter_wet_records(str(shared_file(name))))
        assert len(recs) == 1 and recs[0].url == "https://an.wikipedia.org/wiki/Escopete"
        assert recs[0].date == "2024-05-18T01:58:10Z" and recs[0].text.startswith("Escopete - Biquipedia")
    page, why = _cleaner().clean(recs[0].text)  # without the language filter the lines survive
    assert why == "kept" and "Menú principal" not in page and "Escopete ye un municipio" in page
    detect, src = langdetect_detector()
    if detect is None:
        pytest.skip(src)
    assert _cleaner(language_detector=detect).clean(recs[0].text) == (None, "not_english")


def test_cli_clean_c4(tmp_path, capsys):
    wet = _wet(tmp_path, [_page(), "Menu\nHome", _page("Lorem ipsum dolor sit amet is here now.")], gz=True)
    out = tmp_path / "shard.json.gz"
    assert data_main(["clean-c4", str(wet), "--out", str(out), "--no-language-filter"]) == 0
    with gzip.open(out, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [{"text": "\n".join(GOOD), "timestamp": "2019-04-25T12:57:54Z", "url": "https://ex.com/0"}]
    report = capsys.readouterr()
    assert "wrote 1 of 3 pages" in report.out and "lorem_ipsum: 1" in report.out
    assert "English filter off" in report.err

    assert data_main(["clean-c4", str(tmp_path / "missing.wet"), "--out", str(out)]) == 2
    assert "missing.wet" in capsys.readouterr().err
    bad = tmp_path / "bad.wet"
    bad.write_bytes(b"hello\n")
    assert data_main(["clean-c4", str(bad), "--out", str(out), "--no-language-filter"]) == 2
    assert "bad.wet: record 1: expected a 'WARC/1.0' header" in capsys.readouterr().err


# --- nothing lost, one line per bad input (issue 15) ---------------------------------------------------

def _run(capsys, *argv):
    code = data_main(["clean-c4", *map(str, argv), "--no-language-filter"])
    err = capsys.readouterr().err
    return code, err


def test_cli_refuses_output_equal_to_an_input(tmp_path, capsys):
    for gz in (False, True):
        wet = _wet(tmp_path, [_page()], gz=gz)
        before = wet.read_bytes()
        code, err = _run(capsys, wet, "--out", wet)
        assert code == 2 and "would destroy the input" in err and str(wet) in err
        assert len([x for x in err.splitlines() if "error" in x]) == 1 and "Traceback" not in err
        assert wet.read_bytes() == before
        # through another spelling of the same file (a symlink, a relative path)
        link = tmp_path / "link.wet"
        link.unlink(missing_ok=True)
        link.symlink_to(wet)
        code, err = _run(capsys, wet, "--out", link)
        assert code == 2 and wet.read_bytes() == before
        assert not list(tmp_path.glob("*.tmp"))


def test_cli_out_directory_and_missing_parent(tmp_path, capsys):
    wet = _wet(tmp_path, [_page()])
    code, err = _run(capsys, wet, "--out", tmp_path)
    assert code == 2 and "is a directory" in err and str(tmp_path) in err
    code, err = _run(capsys, wet, "--out", tmp_path / "no" / "such" / "x.json")
    assert code == 2 and "does not exist" in err


def test_cli_truncated_non_gzip_and_empty_inputs(tmp_path, capsys):
    good = _wet(tmp_path, [_page()], gz=True)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.wet.gz"
    truncated.write_bytes(data[: len(data) // 2])
    not_gzip = tmp_path / "plain.wet.gz"
    not_gzip.write_bytes(b"WARC/1.0\r\n not gzip at all\r\n")
    empty = tmp_path / "empty.wet"
    empty.write_bytes(b"")
    out = tmp_path / "out.json.gz"
    out.write_bytes(b"earlier output")
    for bad, words in [(truncated, "truncated gzip"), (not_gzip, "not a valid gzip"), (empty, "empty WET"),
                       (tmp_path, "is a directory")]:
        code, err = _run(capsys, good, bad, "--out", out)
        assert code == 2, bad
        assert words in err and str(bad) in err and "Traceback" not in err
        assert len([x for x in err.splitlines() if "error" in x]) == 1
        assert out.read_bytes() == b"earlier output"          # the earlier output is untouched
        assert not list(tmp_path.glob("*.tmp")), bad            # and no temporary file is left


def test_cli_bad_words_and_threshold_errors(tmp_path, capsys):
    wet = _wet(tmp_path, [_page()])
    binary = tmp_path / "words.bin"
    binary.write_bytes(b"\xd0\xff\x00\x81" * 10)
    code = data_main(["clean-c4", str(wet), "--out", str(tmp_path / "o.json"), "--bad-words", str(binary)])
    err = capsys.readouterr().err
    assert code == 2 and str(binary) in err and "UTF-8" in err
    code, err = _run(capsys, wet, "--out", tmp_path / "o.json", "--language-threshold", "5")
    assert code == 2 and "--language-threshold" in err
