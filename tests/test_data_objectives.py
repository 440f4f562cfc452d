"""Pretraining objectives: T5's length pairs, exact span corruption, the paper's other objectives."""
import numpy as np
import pytest

from engine.data.objectives import (OBJECTIVES, compute_span_corruption_lengths, get_objective,
                                    random_spans_noise_mask, span_corruption, span_corruption_batch)

FIRST_SENTINEL = 32099


def _merge(inputs, targets, first_sentinel=FIRST_SENTINEL, n_sentinels=100):
    """Put each sentinel's target span back where the sentinel stands in the inputs."""
    is_sent = lambda t: first_sentinel - n_sentinels < t <= first_sentinel  # noqa: E731
    spans, cur = {}, None
    for t in targets[:-1]:
        if is_sent(t):
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans[int(t)] if is_sent(t) else [int(t)])
    return out


@pytest.mark.parametrize("inputs_length,density,mean,expect", [
    (128, 0.15, 3.0, (141, 29)), (512, 0.15, 3.0, (568, 114)), (1024, 0.15, 3.0, (1137, 229)),
    (512, 0.5, 3.0, (766, 512))])
def test_length_pairs_of_t5_md(inputs_length, density, mean, expect):
    assert compute_span_corruption_lengths(inputs_length, density, mean) == expect
    raw, tgt = expect
    tokens = np.arange(10, 10 + raw)
    inputs, targets = span_corruption(tokens, np.random.default_rng(0), density, mean)
    assert len(inputs) == inputs_length and len(targets) == tgt


def test_span_corruption_structure_and_exact_inverse():
    rng = np.random.default_rng(1)
    for n in [2, 3, 7, 50, 141, 568, 1000]:
        tokens = rng.integers(3, 32000, n)
        inputs, targets = span_corruption(tokens, rng)
        assert inputs[-1] == 1 and targets[-1] == 1
        assert _merge(inputs, targets) == tokens.tolist()
        sent_in = [t for t in inputs if t >= 32000]
        sent_tgt = [t for t in targets if t >= 32000]
        # unique sentinels counting down from <extra_id_0>, the same ones on both sides, input never starts noisy
        assert sent_in == list(range(FIRST_SENTINEL, FIRST_SENTINEL - len(sent_in), -1)) == sent_tgt
        assert inputs[0] < 32000 and targets[0] == FIRST_SENTINEL


def test_noise_density_and_mean_span_length_on_average():
    rng = np.random.default_rng(2)
    for density, mean in [(0.15, 3.0), (0.25, 5.0), (0.5, 10.0), (0.1, 2.0)]:
        fracs, span_lens, starts = [], [], []
        for _ in range(300):
            mask = random_spans_noise_mask(568, rng, density, mean)
            fracs.append(mask.mean())
            edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
            span_lens += (edges[1::2] - edges[::2]).tolist()
            starts.append(edges[0])
        assert abs(np.mean(fracs) - density) < 0.005, (density, np.mean(fracs))
        assert abs(np.mean(span_lens) - mean) < 0.05 * mean + 0.2, (mean, np.mean(span_lens))
        assert np.std(span_lens) > 0.3 and len(set(starts)) > 5  # a random segmentation, not fixed spans


@pytest.mark.parametrize("n,density,mean", [(568, 0.15, 3.0), (141, 0.15, 3.0), (100, 0.5, 1.0),
                                            (37, 0.3, 8.0), (5, 0.15, 3.0), (2, 0.15, 3.0), (3, 0.15, 3.0),
                                            (1137, 0.15, 3.0), (50, 0.9, 1.0), (60, 0.05, 20.0)])
def test_batched_path_equals_single_examples(n, density, mean):
    tokens = np.random.default_rng(3).integers(3, 32000, (17, n))
    rng = np.random.default_rng(9)
    single = [span_corruption(row, rng, density, mean) for row in tokens]
    after_single = rng.random()
    rng = np.random.default_rng(9)
    inputs, targets = span_corruption_batch(tokens, rng, density, mean)
    assert rng.random() == after_single  # the batch consumed exactly the same random numbers
    for i, (inp, tgt) in enumerate(single):
        np.testing.assert_array_equal(inputs[i], inp)
        np.testing.assert_array_equal(targets[i], tgt)



class _CoarseRng:
    """Random keys on a grid of 8 values: many ties, which the batched path's partition must break
    by position exactly as the single path's stable argsort does."""

    def __init__(self, seed):
        self.g = np.random.default_rng(seed)

    def random(self, shape):
        return np.floor(self.g.random(shape) * 8) / 8


@pytest.mark.parametrize("n", [568, 141, 20])
def test_batched_path_equals_single_examples_with_tied_keys(n):
    tokens = np.random.default_rng(8).integers(3, 32000, (9, n))
    rng = _CoarseRng(4)
    single = [span_corruption(row, rng) for row in tokens]
    inputs, targets = span_corruption_batch(tokens, _CoarseRng(4))
    for i, (inp, tgt) in enumerate(single):
        np.testing.assert_array_equal(inputs[i], inp)
        np.testing.assert_array_equal(targets[i], tgt)
        assert _merge(inp, tgt) == tokens[i].tolist()

def _check_fits(obj, inputs_length, targets_length, trials=30):
    raw = obj.raw_length(inputs_length, targets_length)
    rng = np.random.default_rng(4)
    for _ in range(trials):
        inp, tgt = obj(rng.integers(3, 32000, raw), rng)
        assert len(inp) <= inputs_length and len(tgt) <= targets_length, obj.name
    return raw


def test_every_objective_structure():
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, 32000, 200)
    n_noise = 30  # round(200 * 0.15)

    inp, tgt = get_objective("iid_denoising")(tokens, rng)
    assert _merge(inp, tgt) == tokens.tolist() and len(tgt) > 1

    inp, tgt = get_objective("bert", vocab_size=32000)(tokens, rng)
    assert len(inp) == 201 and tgt[:-1].tolist() == tokens.tolist() and inp[-1] == tgt[-1] == 1
    changed = inp[:-1] != tokens
    assert changed.sum() <= n_noise and (inp[:-1][changed] == FIRST_SENTINEL).sum() >= 20

    inp, tgt = get_objective("mask_every_token", noise_density=0.25, mask_id=32099)(tokens, rng)
    assert (inp[:-1] == 32099).sum() == 50 and tgt[:-1].tolist() == tokens.tolist()
    kept = inp[:-1] != 32099
    assert inp[:-1][kept].tolist() == tokens[kept].tolist()

    inp, tgt = get_objective("drop_corrupted")(tokens, rng)
    assert len(inp) == 200 - n_noise + 1 and len(tgt) == n_noise + 1
    assert sorted(inp[:-1].tolist() + tgt[:-1].tolist()) == sorted(tokens.tolist())

    inp, tgt = get_objective("prefix_lm")(tokens, rng)
    assert inp[:-1].tolist() + tgt[:-1].tolist() == tokens.tolist() and len(inp) > 1 and len(tgt) > 1

    inp, tgt = get_objective("deshuffling")(tokens, rng)
    assert sorted(inp[:-1].tolist()) == sorted(tokens.tolist()) and tgt[:-1].tolist() == tokens.tolist()
    assert inp[:-1].tolist() != tokens.tolist()

    # replace spans vs mask every token, any rate and mean span length
    inp, tgt = get_objective("denoise", noise_density=0.5, mean_noise_span_length=10.0, inputs_mode="mask",
                             targets_mode="original", mask_id=7)(tokens, rng)
    assert (inp[:-1] == 7).sum() == 100 and tgt[:-1].tolist() == tokens.tolist()
    inp, tgt = get_objective("span_corruption", noise_density=0.25, mean_noise_span_length=2.0)(tokens, rng)
    assert _merge(inp, tgt) == tokens.tolist() and sum(t >= 32000 for t in inp) == 25


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_raw_length_fits_rows(name):
    obj = get_objective(name)
    raw = _check_fits(obj, 128, 128 if name != "span_corruption" else 29)
    assert raw >= 60


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown name 'spam'"):
        get_objective("spam")
    with pytest.raises(ValueError, match="unknown parameter 'noise_densty'"):
        get_objective("span_corruption", noise_densty=0.2)
    with pytest.raises(ValueError, match="noise_density"):
        get_objective("bert", noise_density=1.5)
    with pytest.raises(ValueError, match="inputs_mode"):
        get_objective("denoise", inputs_mode="nope")(np.arange(10), np.random.default_rng(0))
    with pytest.raises(ValueError, match="too short"):
        get_objective("span_corruption").raw_length(512, 100)


def test_general_denoise_with_random_spans_is_span_corruption():
    tokens = np.random.default_rng(6).integers(3, 32000, 568)
    a = get_objective("denoise")(tokens, np.random.default_rng(7))
    b = span_corruption(tokens, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
