"""Mixing rates (T5 paper, section 3.5.2), the sampled stream, resume, and batch collation."""
import itertools
import collections

import pytest
import torch

from conftest import shared_file
from engine.mixtures import Mixture, MixtureSource, collate, mixing_rates, text_task_source


def test_examples_proportional_with_limit():
    rates = mixing_rates({"a": 100, "b": 300, "c": 10_000}, "proportional", limit=1000)
    assert rates == pytest.approx({"a": 100 / 1400, "b": 300 / 1400, "c": 1000 / 1400})
    assert mixing_rates({"a": 1, "b": 3})["b"] == pytest.approx(0.75)


def test_temperature_and_equal():
    rates = mixing_rates({"a": 100, "b": 400}, "temperature", limit=None, temperature=2.0)
    assert rates == pytest.approx({"a": 10 / 30, "b": 20 / 30})  # sqrt: 10 and 20
    assert mixing_rates({"a": 1, "b": 1000, "c": 5}, "equal") == pytest.approx(dict.fromkeys("abc", 1 / 3))
    with pytest.raises(ValueError, match="mixture method 'uniform'"):
        mixing_rates({"a": 1}, "uniform")
    with pytest.raises(ValueError, match="source 'a': size must be positive"):
        mixing_rates({"a": 0})


def _counting_source(name, size):
    return MixtureSource(name, lambda: ({"inputs": [i], "targets": [name]} for i in range(size)), size)


def test_stream_follows_rates_repeats_and_resumes():
    mixture = Mixture([_counting_source("small", 5), _counting_source("big", 50)], "proportional", seed=3)
    drawn = [name for name, _ in itertools.islice(mixture, 2200)]
    counts = collections.Counter(drawn)
    assert abs(counts["small"] / 2200 - 5 / 55) < 0.02
    # resume: a fresh mixture loaded with the state continues exactly like the original
    mixture = Mixture([_counting_source("small", 5), _counting_source("big", 50)], seed=3)
    stream = iter(mixture)
    head = list(itertools.islice(stream, 37))
    state = mixture.state_dict()
    tail = list(itertools.islice(stream, 40))
    resumed = Mixture([_counting_source("small", 5), _counting_source("big", 50)], seed=3)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 40)) == tail
    # the small source repeated (more than 5 draws) in order
    small = [ex["inputs"][0] for name, ex in head + tail if name == "small"]
    assert small == [i % 5 for i in range(len(small))]


def test_text_source_and_collate():
    from engine.tokenizer import Tokenizer
    from engine.tasks import get_task

    tokenizer = Tokenizer(shared_file("t5/spiece.model"))
    source = text_task_source(get_task("sst2"), shared_file("glue/sst2/dev.tsv"), "validation", tokenizer,
                              max_input_length=8, max_target_length=4)
    assert source.size == 872
    examples = list(itertools.islice(source.factory(), 3))
    assert all(len(e["inputs"]) <= 8 and e["inputs"][-1] == 1 for e in examples)  # truncated, EOS kept
    assert tokenizer.decode(examples[0]["targets"], skip_special=True) == "positive"
    batch = collate(examples + [{"inputs": [5, 1], "targets": [7, 8, 1]}])
    assert batch["input_ids"].shape == (4, 8) and batch["labels"].shape == (4, 3)
    assert batch["labels"][3].tolist() == [7, 8, 1] and batch["decoder_input_ids"][3].tolist() == [0, 7, 8]
    assert batch["attention_mask"][3].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    first_len = len(examples[0]["targets"])
    assert (batch["labels"][0, first_len:] == -100).all() and batch["decoder_attention_mask"][0].sum() == first_len
