"""The T5 family's checkpoints against transformers' own classes, random models built offline: Flan-T5 (the
v1.1 layout under model_type t5), mT5 (model_type mt5, 250,112-token vocabulary), UMT5 (a relative bias
table in every block), logits within 1e-4 in fp32 in both load directions, and generation on top."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.hf_checkpoint import from_pretrained  # noqa: E402
from models.config import T5Config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(d_model=24, d_kv=8, d_ff=40, num_layers=3, num_decoder_layers=2, num_heads=3,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
             dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
FAMILY = {  # name: (transformers classes, config fields)
    "flan-t5": ("T5Config", "T5ForConditionalGeneration", dict(SMALL, vocab_size=120, tie_word_embeddings=False)),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(SMALL, vocab_size=250112, d_model=16, d_ff=24,
                                                               tie_word_embeddings=False)),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", dict(SMALL, vocab_size=120, tie_word_embeddings=False)),
}


def _hf(name: str, seed: int = 0):
    config_cls, model_cls, fields = FAMILY[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n or "relative_attention_bias" in n:
                p.add_(0.2 * torch.randn_like(p))  # no trivial parameter; every layer's bias table distinct
    return model


def _batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:], mask[2, 9:] = 0, 0
    labels = torch.randint(2, vocab, (3, 9), generator=g)
    labels[2, 5:] = -100
    return dict(input_ids=ids * mask, attention_mask=mask, labels=labels)


def _max_diff(ours, hf, inputs) -> float:
    with torch.no_grad():
        return (ours(**inputs).logits - hf(**inputs).logits).abs().max().item()


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_checkpoints_load_both_ways_with_equal_logits(name, tmp_path):
    hf = _hf(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf", kernel_backend="torch").eval()
    assert ours.config.model_type == hf.config.model_type
    assert ours.config.per_layer_position_bias == (name == "umt5")
    assert ours.num_parameters() == ours.config.num_parameters()
    inputs = _batch(ours.config.vocab_size)
    assert _max_diff(ours, hf, inputs) <= 1e-4
    # ...and back: transformers' own class reads what we write.
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == hf.config.model_type
    again = getattr(transformers, FAMILY[name][1]).from_pretrained(tmp_path / "ours").eval()
    assert _max_diff(ours, again, inputs) <= 1e-4
    # generation on top: greedy token-identical
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert ours.generate(ids, mask, max_new_tokens=6).tolist() == theirs.tolist()


def test_umt5_uses_every_layers_bias_table(tmp_path):
    """Changing block 1's table changes the logits (a model reading block 0's table everywhere would not)."""
    hf = _hf("umt5", seed=2)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, kernel_backend="torch").eval()
    inputs = _batch(ours.config.vocab_size, seed=3)
    with torch.no_grad():
        before = ours(**inputs).logits
        ours.encoder.block[1].layer[0].SelfAttention.relative_attention_bias.weight.add_(torch.randn(8, 3))  # not a constant shift
        assert (ours(**inputs).logits - before).abs().max() > 1e-3


def test_model_types_refused_and_named():
    with pytest.raises(ValueError, match="model_type='bart'"):
        T5Config.from_hf_dict({"model_type": "bart"})
    with pytest.raises(ValueError, match="T5Config.model_type"):
        T5Config(model_type="byt5")


ENCODERS = {"flan-t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


@pytest.mark.parametrize("name", list(FAMILY))
def test_encoder_only_matches_transformers_both_ways(name, tmp_path):
    from models.encoder import T5EncoderModel

    hf_full = _hf(name, seed=4)
    hf_full.save_pretrained(tmp_path / "full")
    hf_enc = getattr(transformers, ENCODERS[name]).from_pretrained(tmp_path / "full").eval()
    hf_enc.save_pretrained(tmp_path / "enc")
    inputs = _batch(hf_full.config.vocab_size, seed=5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        ref = hf_enc(input_ids=ids, attention_mask=mask).last_hidden_state
        for source in ("full", "enc"):  # a whole model's checkpoint or an encoder-only one
            ours = T5EncoderModel.from_pretrained(tmp_path / source, kernel_backend="torch").eval()
            assert (ours(ids, mask).last_hidden_state - ref).abs().max().item() <= 1e-4, source
            assert (ours.encode(ids, mask) - ref).abs().max().item() <= 1e-4
        ours.save_pretrained(tmp_path / "ours")
        written = json.loads((tmp_path / "ours" / "config.json").read_text())
        assert written["architectures"] == [ENCODERS[name]]
        assert not (tmp_path / "ours" / "generation_config.json").exists()
        back = getattr(transformers, ENCODERS[name]).from_pretrained(tmp_path / "ours").eval()
        assert (back(input_ids=ids, attention_mask=mask).last_hidden_state - ref).abs().max().item() <= 1e-4
        vectors = ours.embed(ids, mask)
        manual = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(vectors, torch.nn.functional.normalize(manual, dim=-1), rtol=1e-4, atol=1e-5)
    assert ours.num_parameters() == sum(p.numel() for p in hf_enc.parameters())
    with pytest.raises(ValueError, match="encoder-only .*models.encoder.T5EncoderModel"):  # not a seq2seq model
        from_pretrained(tmp_path / "enc")


@pytest.mark.parametrize("model_type", ["mt5", "umt5"])
def test_finetune_and_export_back(model_type, tmp_path, monkeypatch):
    """`t5forge finetune` starts from a family member's Hugging Face directory, evaluates by generation,
    and its best model is a directory of the same model_type that transformers' class loads, same logits."""
    import test_finetune
    from engine.finetune import finetune_main
    from models.t5 import T5ForConditionalGeneration

    def init_dir(path):
        torch.manual_seed(0)
        config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                          kernel_backend="torch", model_type=model_type)
        T5ForConditionalGeneration(config).save_pretrained(path / "init")
        return path / "init"

    monkeypatch.setattr(test_finetune, "_init_dir", init_dir)
    assert finetune_main(["--config", str(test_finetune._config(tmp_path, "full", 6, eval_every=6))]) == 0
    best = tmp_path / "full" / "best"
    assert json.loads((best / "config.json").read_text())["model_type"] == model_type
    ours = from_pretrained(best, kernel_backend="torch").eval()
    theirs = getattr(transformers, FAMILY["mt5" if model_type == "mt5" else "umt5"][1]).from_pretrained(best).eval()
    init = from_pretrained(tmp_path / "init", kernel_backend="torch")
    assert not torch.equal(init.shared.weight, ours.shared.weight)  # it trained
    assert _max_diff(ours, theirs, _batch(128, seed=9)) <= 1e-4
