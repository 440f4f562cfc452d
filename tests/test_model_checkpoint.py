"""Checkpoint directories: every supported layout loads the same model; bad input fails with one clear error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import T5Config, T5ForConditionalGeneration, from_pretrained, hf_state_dict, save_pretrained
from models.hf_checkpoint import read_weights


def tiny(proj: str = "gated-gelu") -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=37, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=1, num_heads=3,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   feed_forward_proj=proj, tie_word_embeddings=proj == "relu", kernel_backend="torch")
    return T5ForConditionalGeneration(cfg)


def same_params(a: T5ForConditionalGeneration, b: T5ForConditionalGeneration) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_save_load_round_trip_is_exact(tmp_path, proj):
    m = tiny(proj)
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("lm_head.weight" in names) == (proj != "relu")
    assert not any("wi_fused" in n for n in names)
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config == m.config.replace(kernel_backend="auto") and same_params(m, loaded)
    assert T5ForConditionalGeneration.from_pretrained(tmp_path, kernel_backend="torch").config.kernel_backend == "torch"


def test_sharded_safetensors_and_stale_files_are_replaced(tmp_path):
    m = tiny()
    save_pretrained(m, tmp_path, max_shard_size=2000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert same_params(m, from_pretrained(tmp_path))
    save_pretrained(m, tmp_path)  # unsharded again: the shards must not linger
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not any(tmp_path.glob("model-*-of-*.safetensors"))


def test_pytorch_model_bin_and_dtype(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    torch.save(hf_state_dict(m), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    assert same_params(m, from_pretrained(tmp_path))
    half = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_hf_aliases_and_tied_head_are_accepted(tmp_path):
    m = tiny("relu")
    m.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["shared.weight"].clone()
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].clone()
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert same_params(m, from_pretrained(tmp_path))


def test_pickled_code_is_never_executed(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"shared.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ bad input
def test_missing_directory_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        from_pretrained(tmp_path)


def test_bad_config_json_names_the_file_and_the_field(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(ValueError, match="config.json: .*feed_forward_proj='gated-silu'"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"d_model": 16,\n oops}')
    with pytest.raises(ValueError, match=r"config.json:2: invalid JSON"):
        from_pretrained(tmp_path)


def _rewrite(tmp_path, edit):
    tensors = load_file(str(tmp_path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_incomplete_weights_name_the_missing_keys(tmp_path):
    tiny().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: [t.pop(k) for k in [k for k in t if ".block.1." in k or "wi_1" in k]])
    with pytest.raises(ValueError, match=r"missing \d+ weight\(s\): decoder.block.0.layer.2.DenseReluDense.wi_0\|wi_1"
                                         r".*\(and \d+ more\)"):
        from_pretrained(tmp_path)


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    tiny().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(18, 15)}))
    with pytest.raises(ValueError, match=r"encoder.block.0.layer.0.SelfAttention.q.weight has shape \(18, 15\), "
                                         r"the config expects \(18, 16\)"):
        from_pretrained(tmp_path)


def test_unexpected_keys_are_named(tmp_path):
    tiny().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"encoder.block.7.layer.0.SelfAttention.q.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="1 unexpected weight.*encoder.block.7"):
        from_pretrained(tmp_path)


def test_index_pointing_to_a_missing_shard(tmp_path):
    save_pretrained(tiny(), tmp_path, max_shard_size=2000)
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*model-00002-of"):
        read_weights(tmp_path)
