"""Decoding against transformers' `generate` on the same random weights, with Hugging Face's arguments:
greedy, beam search (every early_stopping mode, several length penalties, num_return_sequences), the logits
processors and seeded sampling all token-identical, with padding in the batch and unequal encoder/decoder
depths; T5X's length penalty (our beam default) checked against the teacher-forced log-probs."""
import pytest
import torch

from models.hf_checkpoint import load_hf_state_dict
from models.config import T5Config
from models.generation import brevity_penalty, generate
from models.t5 import T5ForConditionalGeneration

transformers = pytest.importorskip("transformers")

# (transformers 5.x cannot generate with more decoder than encoder layers: its cache is sized by
# num_layers, so the ragged family has the deeper encoder.)
FAMILIES = {
    "v1.0": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(vocab_size=96, d_model=24, d_kv=10, d_ff=40, num_layers=3, num_decoder_layers=2, num_heads=3,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16),
}
CACHES = ["static", "dynamic"]


def _pair(family: str, seed: int = 0):
    """A random Hugging Face T5 and ours holding the same weights."""
    torch.manual_seed(seed)
    kwargs = dict(FAMILIES[family], dropout_rate=0.0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        **kwargs, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    with torch.no_grad():
        if not kwargs["tie_word_embeddings"]:
            # HF's untied head starts with std 1 (huge logits, docs/MACHINE_NOTES.md): shrink it.
            hf.lm_head.weight.mul_(kwargs["d_model"] ** -0.5)
        # A random model rarely says EOS. Give EOS the head row of the token it emits most often
        # (slightly larger), so sequences end, at different lengths.
        ids, mask = _batch(seed=seed + 100)
        emitted = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, 1:]
        frequent = torch.bincount(emitted.flatten(), minlength=kwargs["vocab_size"])
        frequent[:2] = 0
        hf.lm_head.weight[1] = hf.lm_head.weight[int(frequent.argmax())] * 1.02
    ours = T5ForConditionalGeneration(T5Config(**kwargs, kernel_backend="torch")).eval()
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours


def _batch(seed=1, batch=4, length=9, vocab=96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate([length, 5, 7, 3][:batch]):  # right padding of different lengths
        ids[row, n:], mask[row, n:] = 0, 0
    return ids, mask


def _after_eos_zeroed(seqs: torch.Tensor) -> list:
    """Everything after the first EOS set to 0. transformers fills finished beams with EOS, not pad, when
    pad_token_id is 0 (`pad_token_id or eos_token_id` in its beam search); we pad with pad_token_id."""
    ended = (seqs[:, 1:] == 1).long().cumsum(1).cumsum(1) > 1
    out = seqs.clone()
    out[:, 1:][ended] = 0
    return out.tolist()


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("family", ["v1.0", "v1.1"])
def test_greedy_token_identical_to_transformers(family, cache):
    hf, ours = _pair(family)
    ids, mask = _batch()
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=16, cache_implementation=cache)
    assert out.tolist() == theirs.tolist()  # start token first, pad after EOS, as transformers returns
    lengths = (out[:, 1:] != 0).sum(1).tolist()
    assert len(set(lengths)) > 1, "no sequence ended early: the test would not check EOS handling"
    # max_length counts the start token, as in transformers
    assert ours.generate(ids, mask, max_length=6).tolist() == hf.generate(input_ids=ids, attention_mask=mask,
                                                                           max_length=6).tolist()


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("family", ["v1.0", "v1.1"])
def test_beam_search_token_identical_to_transformers(family, early_stopping):
    """transformers' length normalisation (length_normalization="hf"): every mode and penalty, two
    returned sequences per input, the sequence scores too."""
    hf, ours = _pair(family, seed=5)
    ids, mask = _batch(seed=6)
    for penalty in (0.0, 1.0, 2.0):
        args = dict(max_new_tokens=12, num_beams=4, length_penalty=penalty, early_stopping=early_stopping,
                    num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
        theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **args)
        for cache in CACHES:
            out = ours.generate(ids, mask, length_normalization="hf", cache_implementation=cache, **args)
            assert _after_eos_zeroed(out.sequences) == _after_eos_zeroed(theirs.sequences), (penalty, cache)
            torch.testing.assert_close(out.sequences_scores, theirs.sequences_scores, rtol=1e-4, atol=1e-4)


def test_beam_search_t5x_penalty_equals_transformers_without_penalty():
    """With length_penalty=0 T5X's and transformers' normalisations agree: our default formula, same tokens."""
    hf, ours = _pair("v1.1", seed=7)
    ids, mask = _batch(seed=8)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=4, length_penalty=0.0)
    out = ours.generate(ids, mask, max_new_tokens=10, num_beams=4, length_penalty=0.0)
    assert _after_eos_zeroed(out) == _after_eos_zeroed(theirs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_logits_processors_token_identical_to_transformers(num_beams):
    hf, ours = _pair("v1.0", seed=9)
    ids, mask = _batch(seed=10)
    for args in (dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1), dict(repetition_penalty=1.8),
                 dict(min_new_tokens=6), dict(min_length=5), dict(repetition_penalty=0.7, no_repeat_ngram_size=3)):
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=num_beams,
                             length_penalty=1.0, do_sample=False, **args)
        out = ours.generate(ids, mask, max_new_tokens=12, num_beams=num_beams, length_penalty=1.0,
                            length_normalization="hf", **args)
        assert _after_eos_zeroed(out) == _after_eos_zeroed(theirs), args
    plain = ours.generate(ids, mask, max_new_tokens=12, num_beams=num_beams)
    ngram = ours.generate(ids, mask, max_new_tokens=12, num_beams=num_beams, no_repeat_ngram_size=1)
    assert plain.tolist() != ngram.tolist(), "the random model never repeats a token: weak test"


def test_seeded_sampling_draws_identical_to_transformers():
    """transformers draws `torch.multinomial(softmax(processed scores), 1)` per step (beam sampling: 2K
    without replacement per step) from torch's global generator; we draw the same way from `generator`.
    Seeded alike, the draws are the same, so the sequences are identical."""
    hf, ours = _pair("v1.1", seed=11)
    ids, mask = _batch(seed=12)
    cases = (dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(top_k=0, top_p=0.95, temperature=1.3),
             dict(num_return_sequences=3, top_k=10), dict(num_beams=2, top_k=8), dict(num_beams=2, top_p=0.05),
             dict(repetition_penalty=1.5))
    for args in cases:
        for seed in (0, 1):
            torch.manual_seed(seed)
            theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                 length_penalty=1.0, **args)
            out = ours.generate(ids, mask, max_new_tokens=10, do_sample=True, length_penalty=1.0,
                                length_normalization="hf", generator=torch.Generator().manual_seed(seed), **args)
            assert _after_eos_zeroed(out) == _after_eos_zeroed(theirs), (args, seed)
    g = torch.Generator().manual_seed(0)
    a = ours.generate(ids, mask, max_new_tokens=10, do_sample=True, generator=g)
    b = ours.generate(ids, mask, max_new_tokens=10, do_sample=True, generator=g)
    assert a.tolist() != b.tolist(), "the generator's state advances: a second call draws differently"
    greedy = ours.generate(ids, mask, max_new_tokens=10)
    assert ours.generate(ids, mask, max_new_tokens=10, do_sample=True, top_k=1, generator=g).tolist() == greedy.tolist()


@pytest.mark.parametrize("num_beams", [1, 4])
def test_output_scores_equal_transformers(num_beams):
    hf, ours = _pair("v1.0", seed=13)
    ids, mask = _batch(seed=14)
    args = dict(max_new_tokens=6, num_beams=num_beams, return_dict_in_generate=True, output_scores=True,
                no_repeat_ngram_size=2)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, length_penalty=1.0, **args)
    out = ours.generate(ids, mask, length_penalty=1.0, length_normalization="hf", **args)
    assert len(out.scores) == len(theirs.scores)
    for a, b in zip(out.scores, theirs.scores):
        torch.testing.assert_close(a.masked_fill(a.isinf(), -1e30), b.masked_fill(b.isinf(), -1e30),
                                   rtol=1e-4, atol=1e-4)


def _sequence_log_prob(model, ids, mask, sequences):
    """Log-prob of each generated sequence up to and including its EOS, by one teacher-forced pass."""
    labels = sequences.clone()
    ended = (sequences == 1).long().cumsum(1)
    valid = (ended == 0) | ((ended == 1) & (sequences == 1))
    labels[~valid] = -100
    logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits.float()
    token_lp = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    return (token_lp * valid).sum(1), valid.sum(1)


@pytest.mark.parametrize("family", ["v1.0", "v1.1"])
def test_t5x_beam_scores_are_penalised_log_probs_and_beat_greedy(family):
    _, ours = _pair(family, seed=3)
    ids, mask = _batch(seed=4)
    greedy = generate(ours, ids, mask, max_new_tokens=12, return_dict_in_generate=True)
    one = generate(ours, ids, mask, max_new_tokens=12, num_beams=1, length_penalty=0.0)
    assert one.tolist() == greedy.sequences.tolist()
    beams = generate(ours, ids, mask, max_new_tokens=12, num_beams=4, early_stopping="never",
                     return_dict_in_generate=True, output_scores=True)          # length_penalty 0.6 by default
    greedy_score = greedy.log_probs / brevity_penalty(greedy.lengths.float(), 0.6)
    assert (beams.sequences_scores >= greedy_score - 1e-5).all()
    assert (beams.sequences_scores > greedy_score + 1e-3).any(), "beam search never found anything better"
    lp, length = _sequence_log_prob(ours, ids, mask, beams.sequences[:, 1:])
    torch.testing.assert_close(lp, beams.log_probs, rtol=1e-4, atol=1e-4)
    assert length.tolist() == beams.lengths.tolist()
    torch.testing.assert_close(beams.sequences_scores, lp / brevity_penalty(length.float(), 0.6), rtol=1e-4,
                               atol=1e-4)


def test_unsupported_and_bad_arguments_are_named():
    _, ours = _pair("v1.0")
    ids, mask = _batch()
    for name, value in (("alpha", 0.6), ("bad_words_ids", [[3]]), ("max_new_token", 4)):
        with pytest.raises(TypeError, match=name):
            ours.generate(ids, mask, **{name: value})
    for args, name in ((dict(num_beams=0), "num_beams"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(top_p=1.5), "top_p"), (dict(temperature=0.0), "temperature"),
                       (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
                       (dict(num_return_sequences=2), "num_return_sequences"), (dict(early_stopping="x"), "early_stopping"),
                       (dict(cache_implementation="paged"), "cache_implementation")):
        with pytest.raises(ValueError, match=name):
            ours.generate(ids, mask, **args)


def test_generation_config_json_round_trip_and_defaults(tmp_path):
    import json

    hf, ours = _pair("v1.0")
    ids, mask = _batch()
    ours.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert written == {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "m").eos_token_id == 1
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(
        {"num_beams": 3, "max_length": 8, "no_repeat_ngram_size": 2, "transformers_version": "5.0", "typical_p": 1.0,
         "_from_model_config": True}))
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "m", kernel_backend="torch")
    assert loaded.generate(ids, mask).tolist() == ours.generate(ids, mask, num_beams=3, max_length=8,
                                                                no_repeat_ngram_size=2).tolist()
    assert loaded.generate(ids, mask, num_beams=1).tolist() == ours.generate(
        ids, mask, max_length=8, no_repeat_ngram_size=2).tolist()           # arguments beat the file
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "generation_config.json").read_text())
    assert again["num_beams"] == 3 and again["max_length"] == 8
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"typical_p": 0.5}))
    with pytest.raises(ValueError, match="generation_config.json: key 'typical_p'"):
        T5ForConditionalGeneration.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"num_beams": 0}))
    with pytest.raises(ValueError, match="generation_config.json: num_beams=0"):
        T5ForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_generate_cli_arguments_file_and_stdin(tmp_path, capsys, monkeypatch):
    import io

    from conftest import shared_file
    from engine.generate import generate_main

    tokenizer = shared_file("tokenizers/seqio_test_t5ids_26pieces.model")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_heads=4, kernel_backend="torch"))
    model.save_pretrained(tmp_path / "m")
    base = ["--model", str(tmp_path / "m"), "--tokenizer", str(tokenizer), "--max-new-tokens", "5"]
    texts = ["the sea", "snow at the coast is rare", "wind"]
    assert generate_main(base + texts) == 0
    from_args = capsys.readouterr().out.splitlines()
    assert len(from_args) == 3
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert generate_main(base + ["--file", str(tmp_path / "in.txt"), "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == from_args  # order kept across length-sorted batches
    assert generate_main(base + ["--compile-step", "aot_eager", "--decode-kernels", "reference"] + texts) == 0
    assert capsys.readouterr().out.splitlines() == from_args  # the compiled decode step, the same outputs
    assert generate_main(base + ["--compile-step", "warp-speed"] + texts) == 2
    assert "compile_step" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts)))
    assert generate_main(base + ["--num-beams", "2", "--num-return-sequences", "2", "--early-stopping", "never"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    sample = base + ["--do-sample", "--top-k", "20", "--seed", "3", "--cache-implementation", "dynamic"] + texts
    assert generate_main(sample) == 0
    first = capsys.readouterr().out
    assert generate_main(sample) == 0 and capsys.readouterr().out == first      # seeded: the same draws
    assert generate_main(base + ["--file", str(tmp_path / "missing.txt")]) == 2
    assert "--file not found: " + str(tmp_path / "missing.txt") in capsys.readouterr().err
    assert generate_main(base + ["--top-p", "2"] + texts) == 2
    assert "top_p" in capsys.readouterr().err
