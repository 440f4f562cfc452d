"""Mixing rates (T5 paper, section 3.5.2), the sampled stream, resume, and batch collation."""
import collections
import itertools
import random

import pytest

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


def _merge_span_corruption(inputs, targets, sentinels):
    """The original chunk from a span-corrupted pair: each sentinel in the inputs replaced by the tokens
    that follow the same sentinel in the targets."""
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    return [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]


def test_span_corruption_source_in_a_mixture():
    from engine.data.objectives import compute_span_corruption_lengths
    from engine.mixtures import objective_source, span_corruption_source
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(shared_file("tokenizers/seqio_test_t5ids_26pieces.model"))
    words = "the sea and sand heat then wind over snow ice rain sol".split()  # spelled with the 26 pieces
    rng = random.Random(0)
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(20)]
    stream = [t for d in documents for t in tokenizer.encode(d, add_eos=True)]
    raw, target_length = compute_span_corruption_lengths(48)
    chunks = [stream[k * raw:(k + 1) * raw] for k in range(len(stream) // raw)]  # one pass; the tail is dropped

    def sources():  # documents tokenized 5 at a time: chunks cross the tokenizer's batches
        return [_counting_source("task", 40),
                objective_source("c4_span", lambda: iter(documents), tokenizer, size=40, inputs_length=48,
                                 tokenize_batch=5)]

    mixture = Mixture(sources(), "equal", seed=1)
    drawn = list(itertools.islice(mixture, 120))
    corrupted = [example for name, example in drawn if name == "c4_span"]
    assert 40 < len(corrupted) < 80 and len(corrupted) > len(chunks)  # mixed in, and repeated after a pass
    sentinels = {tokenizer.sentinel_id(i) for i in range(tokenizer.num_sentinels)}
    for k, example in enumerate(corrupted):
        inputs, targets = example["inputs"], example["targets"]
        assert len(inputs) == 48 and len(targets) == target_length  # fills the input length exactly
        assert inputs[-1] == targets[-1] == tokenizer.eos_id
        in_sentinels = [t for t in inputs if t in sentinels]
        # Unique sentinels counting down from <extra_id_0>, in the same order on both sides.
        assert in_sentinels == [tokenizer.sentinel_id(i) for i in range(len(in_sentinels))]
        assert [t for t in targets if t in sentinels] == in_sentinels and targets[0] == in_sentinels[0]
        noise = len(targets) - len(in_sentinels) - 1
        assert noise == round(raw * 0.15)
        # Merged back, the pair is the k-th raw chunk of the document stream (documents + EOS, in order).
        assert _merge_span_corruption(inputs, targets, sentinels) == chunks[k % len(chunks)]
    plain = span_corruption_source("c4_span", lambda: iter(documents), tokenizer, size=40, input_length=48)
    assert list(itertools.islice(plain.factory(), 3)) == corrupted[:3]
    # Resume: a fresh mixture loaded with the state continues with the same examples (each pass of the
    # documents is the same examples; the mixture counts where in the pass it is, whatever `size` says).
    mixture = Mixture(sources(), "equal", seed=1)
    live = iter(mixture)
    list(itertools.islice(live, 53))
    state = mixture.state_dict()
    assert state["position"]["c4_span"] < state["consumed"]["c4_span"]  # resuming inside a later pass
    resumed = Mixture(sources(), "equal", seed=1)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 30)) == list(itertools.islice(live, 30))
