"""T5Config: presets against docs/T5.md, validation, FLOPs, Hugging Face config.json."""
import pytest

from models import PRESETS, T5Config

# docs/T5.md "Sizes": preset -> parameter count.
T5_MD_PARAMS = {
    "t5-small": 60.5e6, "t5-base": 222.9e6, "t5-large": 737.7e6, "t5-3b": 2.85e9, "t5-11b": 11.31e9,
    "t5-v1_1-small": 77.0e6, "t5-v1_1-base": 247.6e6, "t5-v1_1-large": 783e6, "t5-v1_1-xl": 2.85e9,
    "t5-v1_1-xxl": 11.14e9,
}


@pytest.mark.parametrize("name", list(T5_MD_PARAMS))
def test_preset_parameter_counts_within_half_a_percent_of_t5_md(name):
    assert abs(T5Config.from_preset(name).num_parameters() / T5_MD_PARAMS[name] - 1) < 0.005


def test_presets_are_the_ten_of_t5_md_plus_tiny():
    assert set(PRESETS) == set(T5_MD_PARAMS) | {"tiny"}
    tiny = T5Config.from_preset("tiny")
    assert tiny.num_parameters(include_embedding=False) < 5e6 and tiny.is_gated
    assert T5Config.from_preset("tiny", vocab_size=1000).vocab_size == 1000
    v10, v11 = T5Config.from_preset("t5-base"), T5Config.from_preset("t5-v1_1-base")
    assert (v10.feed_forward_proj, v10.tie_word_embeddings) == ("relu", True)
    assert (v11.feed_forward_proj, v11.tie_word_embeddings, v11.dropout_rate) == ("gated-gelu", False, 0.0)


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown T5 preset 't5-huge'.*t5-small.*tiny"):
        T5Config.from_preset("t5-huge")


def test_exact_parameter_count_of_t5_small():
    # 32128*512 embedding + 6 encoder blocks (4*512*512 + 2*512*2048 + 2*512) + 32*8 bias + 512 final norm
    # + 6 decoder blocks (8*512*512 + 2*512*2048 + 3*512) + 32*8 + 512, head tied.
    expected = 32128 * 512 + 6 * (4 * 512 * 512 + 2 * 512 * 2048 + 1024) + 256 + 512 \
        + 6 * (8 * 512 * 512 + 2 * 512 * 2048 + 1536) + 256 + 512
    assert T5Config.from_preset("t5-small").num_parameters() == expected == 60_506_624


def test_flops_per_token_matches_anchors_within_the_documented_cross_kv_difference():
    base = T5Config.from_preset("t5-v1_1-base")
    per_seq = base.flops_per_sequence(512, 114)
    # docs/ANCHORS.md: ~0.39 TFLOP per 512/114 sequence; ours also counts cross-attention k/v over the 512
    # encoder positions (12 layers * 2 * 2*768*768 * (512-114) * 3 = 33.8 GFLOP more).
    cross_kv_extra = 12 * 2 * (2 * 768 * 768) * (512 - 114) * 3
    assert abs((per_seq - cross_kv_extra) / 0.39e12 - 1) < 0.02
    assert base.flops_per_token(512, 114) == per_seq / 626
    large = T5Config.from_preset("t5-v1_1-large")
    large_extra = 24 * 2 * (2 * 1024 * 1024) * (512 - 114) * 3
    assert abs((large.flops_per_sequence() - large_extra) / 1.35e12 - 1) < 0.03
    # more targets or inputs never cost less
    assert base.flops_per_sequence(512, 200) > per_seq and base.flops_per_sequence(1024, 114) > per_seq


@pytest.mark.parametrize("field,value", [
    ("kernel_backend", "cuda"), ("feed_forward_proj", "gated-silu"), ("d_model", 0), ("num_heads", -1),
    ("num_decoder_layers", 0), ("relative_attention_num_buckets", 2), ("relative_attention_max_distance", 8),
    ("dropout_rate", 1.0), ("layer_norm_epsilon", 0.0), ("tie_word_embeddings", "yes"),
    ("gradient_checkpointing", 1), ("pad_token_id", 40000), ("vocab_size", 12.5), ("initializer_factor", 0),
])
def test_invalid_fields_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"T5Config\.{field}="):
        T5Config(**{field: value})


def test_replace_rejects_unknown_fields_and_revalidates():
    cfg = T5Config.from_preset("tiny")
    assert cfg.replace(kernel_backend="torch").kernel_backend == "torch"
    with pytest.raises(ValueError, match="no field.*d_modle"):
        cfg.replace(d_modle=3)
    with pytest.raises(ValueError, match="kernel_backend"):
        cfg.replace(kernel_backend="tpu")


def test_num_decoder_layers_defaults_to_num_layers():
    assert T5Config(num_layers=3).num_decoder_layers == 3
    assert T5Config(num_layers=3, num_decoder_layers=5).num_decoder_layers == 5


def test_hf_dict_round_trip_and_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    for name in ("t5-small", "t5-v1_1-base"):
        cfg = T5Config.from_preset(name)
        assert T5Config.from_hf_dict(cfg.to_hf_dict()) == cfg
        hf = transformers.T5Config(**cfg.to_hf_dict())
        assert (hf.d_model, hf.num_heads, hf.d_ff, hf.is_gated_act) == (cfg.d_model, cfg.num_heads, cfg.d_ff,
                                                                         cfg.is_gated)
        # transformers >= 5 keeps the v1.0/v1.1 head switch in scale_decoder_outputs
        assert getattr(hf, "scale_decoder_outputs", hf.tie_word_embeddings) == cfg.tie_word_embeddings
        assert T5Config.from_hf_dict(hf.to_dict()) == cfg


def test_hf_dict_rejects_what_we_do_not_run():
    base = T5Config.from_preset("t5-small").to_hf_dict()
    for change, message in (({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'"),
                            ({"model_type": "bart"}, "model_type='bart'"),
                            ({"is_encoder_decoder": False}, "is_encoder_decoder"),
                            ({"num_heads": 0}, "num_heads")):
        with pytest.raises(ValueError, match=message):
            T5Config.from_hf_dict({**base, **change})


def test_hf_dict_ignores_metadata_of_released_configs():
    # Keys as in the released t5-small config.json (generation settings and metadata).
    released = {**T5Config.from_preset("t5-small").to_hf_dict(), "n_positions": 512, "output_past": True,
                "task_specific_params": {"summarization": {"prefix": "summarize: "}},
                "transformers_version": "4.0", "torch_dtype": "float32", "eos_token_id": [1]}
    assert T5Config.from_hf_dict(released) == T5Config.from_preset("t5-small")
