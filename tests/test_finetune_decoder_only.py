"""Decoder-only LM and prefix LM (T5 paper, section 3.2.1): masks by construction, incremental decoding
equals the full pass, and both learn a small task with the text-to-text pairs as one sequence."""
import pytest
import torch

from models.config import T5Config
from models.decoder_only import DecoderOnlyLM, generate_lm, lm_batch


def _model(prefix_lm, seed=0):
    torch.manual_seed(seed)
    return DecoderOnlyLM(T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                  kernel_backend="torch"), prefix_lm=prefix_lm)


def test_causal_and_prefix_visibility():
    ids = torch.randint(2, 32, (1, 8))
    for prefix_lm in (False, True):
        model = _model(prefix_lm).eval()
        prefix = torch.tensor([4])
        base = model(ids, prefix_lengths=prefix).logits
        changed = ids.clone()
        changed[0, 2] = (ids[0, 2] + 1) % 30 + 2  # change a token inside the prefix
        logits = model(changed, prefix_lengths=prefix).logits
        differs = (logits - base).abs().amax(-1)[0] > 1e-6
        # LM: only positions >= 2 see token 2; prefix LM: every prefix position sees it too
        expected = [i >= 2 for i in range(8)] if not prefix_lm else [True] * 8
        assert differs.tolist() == expected
    with pytest.raises(ValueError, match="needs prefix_lengths"):
        _model(True)(ids)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_incremental_decoding_matches_full_pass(prefix_lm):
    model = _model(prefix_lm).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]  # different lengths: left padding inside the stepper
    out = generate_lm(model, prompts, max_length=6)
    for row, prompt in enumerate(prompts):
        seq = prompt + out.sequences[row].tolist()
        ids = torch.tensor([seq])
        logits = model(ids, prefix_lengths=torch.tensor([len(prompt)])).logits[0]
        greedy = logits[len(prompt) - 1: len(seq) - 1].argmax(-1).tolist()
        n = int(out.lengths[row])
        assert greedy[:n] == out.sequences[row, :n].tolist()
    beams = generate_lm(model, prompts, max_length=6, num_beams=3)
    assert beams.sequences.shape[0] == 2


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_learns_to_reverse(prefix_lm):
    """inputs + targets in one sequence; the loss only on targets; after training, greedy continues
    the prompt with the reversed inputs."""
    model = _model(prefix_lm, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def pairs(n):
        out = []
        for _ in range(n):
            x = torch.randint(3, 12, (3,), generator=g).tolist()
            out.append((x + [2], x[::-1] + [1]))  # 2 separates, 1 = EOS
        return out

    for _ in range(200):
        loss = model(**lm_batch(pairs(32))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    test = pairs(16)
    out = generate_lm(model, [i for i, _ in test], max_length=4)
    correct = sum(out.sequences[r, :4].tolist() == t for r, (_, t) in enumerate(test))
    assert correct >= 14, correct
