"""Our T5 against Hugging Face's (the reference) on random models of both families, ragged shapes.

Same weights -> same logits (max abs diff <= 1e-4 in fp32), same loss, same gradient for every
parameter, with padding in encoder and decoder inputs; checkpoints move both ways.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import T5Config, T5ForConditionalGeneration, hf_state_dict, load_hf_state_dict  # noqa: E402
from models.hf_checkpoint import from_pretrained, to_hf_names  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

# Ragged on purpose: heads not a power of two, d_kv != d_model / heads, several bucket settings
# (small ones so that sequences reach the logarithmic buckets and the clamp), unequal depths.
CONFIGS = {
    "v1.0-relu-tied": dict(vocab_size=101, d_model=40, d_kv=12, d_ff=56, num_layers=2, num_decoder_layers=3,
                           num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                           feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1-gated-untied": dict(vocab_size=97, d_model=48, d_kv=10, d_ff=72, num_layers=3, num_decoder_layers=2,
                              num_heads=5, relative_attention_num_buckets=6, relative_attention_max_distance=10,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1.1-default-buckets": dict(vocab_size=64, d_model=36, d_kv=6, d_ff=40, num_layers=1, num_decoder_layers=2,
                                 num_heads=7, relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False),
    # eps comparable to mean(x^2): `x * rsqrt(var + eps)` and `x / (sqrt(var) + eps)` differ by far more than
    # the tolerance (at eps 1e-6 they agree to ~1e-6 relative).
    "v1.1-large-eps": dict(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                           num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=0.5),
}


def hf_model(fields: dict, seed: int = 0):
    """A random HF model; layer-norm weights and (untied) head perturbed so no parameter is trivial."""
    torch.manual_seed(seed)
    hf_cfg = transformers.T5Config(**fields, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(hf_cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        if not fields["tie_word_embeddings"]:
            # transformers 5 ties every T5 head at construction; untie it as a v1.1 checkpoint is.
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * fields["d_model"] ** -0.5)
    return model


def batch(vocab: int, seed: int = 1):
    """Right-padded encoder and decoder inputs with unequal lengths per row (lengths reach 37)."""
    g = torch.Generator().manual_seed(seed)
    in_lens, tgt_lens = [37, 21, 30], [11, 6, 9]
    input_ids = torch.randint(2, vocab, (3, 37), generator=g)
    labels = torch.randint(2, vocab, (3, 11), generator=g)
    attention_mask = torch.zeros(3, 37, dtype=torch.long)
    decoder_attention_mask = torch.zeros(3, 11, dtype=torch.long)
    for i, (li, lt) in enumerate(zip(in_lens, tgt_lens)):
        attention_mask[i, :li] = 1
        decoder_attention_mask[i, :lt] = 1
    input_ids = input_ids * attention_mask
    labels = labels.masked_fill(decoder_attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                decoder_attention_mask=decoder_attention_mask)


def ours_from_hf(hf) -> T5ForConditionalGeneration:
    cfg = T5Config.from_hf_dict(hf.config.to_dict(), kernel_backend="torch")
    model = T5ForConditionalGeneration(cfg)
    load_hf_state_dict(model, hf.state_dict())
    return model


def our_grads_hf_names(model: T5ForConditionalGeneration) -> dict:
    return to_hf_names({name: p.grad for name, p in model.named_parameters()})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_every_gradient_match_hf(name):
    fields = CONFIGS[name]
    hf = hf_model(fields)
    ours = ours_from_hf(hf)
    assert ours.config.tie_word_embeddings == fields["tie_word_embeddings"]
    inputs = batch(fields["vocab_size"])
    hf.train()
    ours.train()
    ref = hf(**inputs)
    out = ours(**inputs)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    ref.loss.backward()
    out.loss.backward()
    mine = our_grads_hf_names(ours)
    theirs = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert set(mine) == set(theirs), set(mine) ^ set(theirs)
    for n, g in theirs.items():
        scale = g.abs().max().item() + 1e-6
        assert (mine[n] - g).abs().max().item() <= 1e-4 * scale + 1e-6, n


def test_save_then_hf_load_gives_same_logits(tmp_path):
    for name in ("v1.0-relu-tied", "v1.1-gated-untied"):
        cfg = T5Config(**CONFIGS[name], dropout_rate=0.0, kernel_backend="torch")
        torch.manual_seed(3)
        ours = T5ForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if "layer_norm" in n:
                    p.add_(0.2 * torch.randn_like(p))
        ours.save_pretrained(tmp_path / name)
        hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / name).eval()
        inputs = batch(cfg.vocab_size, seed=4)
        with torch.no_grad():
            diff = (ours(**inputs).logits - hf(**inputs).logits).abs().max().item()
        assert diff <= 1e-4, (name, diff)


def test_hf_save_then_our_load_gives_same_logits(tmp_path):
    for name in ("v1.0-relu-tied", "v1.1-gated-untied"):
        hf = hf_model(CONFIGS[name], seed=5).eval()
        hf.save_pretrained(tmp_path / name)
        ours = from_pretrained(tmp_path / name, kernel_backend="torch").eval()
        inputs = batch(CONFIGS[name]["vocab_size"], seed=6)
        with torch.no_grad():
            diff = (ours(**inputs).logits - hf(**inputs).logits).abs().max().item()
        assert diff <= 1e-4, (name, diff)


def test_hf_tied_v11_checkpoint_loads_with_head_copied(tmp_path):
    """transformers >= 5 saves v1.1 models with the head tied (no lm_head tensor): same logits."""
    fields = CONFIGS["v1.1-gated-untied"]
    torch.manual_seed(7)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        **fields, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, kernel_backend="torch").eval()
    assert not ours.config.tie_word_embeddings
    inputs = batch(fields["vocab_size"], seed=8)
    with torch.no_grad():
        assert (ours(**inputs).logits - hf(**inputs).logits).abs().max().item() <= 1e-4


def test_hf_state_dict_round_trip_names_match_hf():
    hf = hf_model(CONFIGS["v1.1-gated-untied"])
    ours = ours_from_hf(hf)
    names = set(hf_state_dict(ours))
    assert names == set(hf.state_dict()) - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    for n, t in hf_state_dict(ours).items():
        assert torch.equal(t, hf.state_dict()[n]), n
