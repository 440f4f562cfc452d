"""The tiny T5 with the flash attention kernel (kernel_backend="triton") against the PyTorch reference
backend: packed rows (segment ids, per-segment positions, a padding tail) and padded rows give the same loss
and the same gradient for every parameter, including both relative-bias tables; incremental decoding with a
KV cache gives the same logits.

TRITON_INTERPRET=1 here (conftest); compiled on CUDA with T5FORGE_COMPILED=1.
"""
from __future__ import annotations

import copy

import pytest
import torch

from models.config import T5Config
from models.t5 import T5ForConditionalGeneration
from tests.kernel_checks import record_kernel_calls

# d_kv 32 is one of the kernel's head dims; 2 heads, 2 + 2 layers keep the interpreter quick.
SMALL = dict(vocab_size=64, d_model=48, d_kv=32, num_heads=2, d_ff=64, num_layers=2, num_decoder_layers=2,
             dropout_rate=0.0)


def _models(device):
    torch.manual_seed(0)
    ref = T5ForConditionalGeneration(T5Config.from_preset("tiny", kernel_backend="torch", **SMALL)).to(device)
    fast = T5ForConditionalGeneration(T5Config.from_preset("tiny", kernel_backend="triton", **SMALL)).to(device)
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    with torch.no_grad():   # non-trivial bias tables (init may be small): the bias must really matter
        for model in (ref, fast):
            model.encoder.bias_table.normal_(0.0, 1.0, generator=torch.Generator(device).manual_seed(1))
            model.decoder.bias_table.normal_(0.0, 1.0, generator=torch.Generator(device).manual_seed(2))
    return ref, fast


def _segments(lengths: list[list[int]], width: int) -> torch.Tensor:
    """Segment ids 1, 2, ... for the given example lengths per row, 0 for the padding tail."""
    seg = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, lens in enumerate(lengths):
        start = 0
        for sid, n in enumerate(lens, 1):
            seg[row, start:start + n] = sid
            start += n
    return seg


def _packed_batch(device):
    gen = torch.Generator().manual_seed(0)
    enc_seg = _segments([[9, 14, 10], [20, 5]], 37)          # row 1 ends in 12 padding tokens
    dec_seg = _segments([[4, 6, 3], [7, 2]], 15)
    input_ids = torch.randint(2, SMALL["vocab_size"], enc_seg.shape, generator=gen) * (enc_seg != 0)
    labels = torch.randint(2, SMALL["vocab_size"], dec_seg.shape, generator=gen).masked_fill(dec_seg == 0, -100)
    batch = dict(input_ids=input_ids, labels=labels, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
    return {k: v.to(device) for k, v in batch.items()}


def _padded_batch(device):
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, SMALL["vocab_size"], (2, 21), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 13:] = 0
    input_ids[1, 13:] = 0
    labels = torch.randint(2, SMALL["vocab_size"], (2, 9), generator=gen)
    labels[1, 6:] = -100
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("make_batch", [_packed_batch, _padded_batch], ids=["packed", "padded"])
def test_flash_attention_model_matches_torch_backend(make_batch, device, monkeypatch):
    calls = record_kernel_calls(monkeypatch, "attention")
    ref, fast = _models(device)
    batch = make_batch(device)
    losses = {}
    for name, model in (("torch", ref), ("triton", fast)):
        out = model(**batch)
        out.loss.backward()
        losses[name] = out.loss.detach()
    # encoder self x2, decoder self x2 (with bias), decoder cross x2 (without)
    with_table = [args[3] is not None for args in calls["attention"]]   # self-attention: a bias table
    assert with_table.count(True) == 4 and with_table.count(False) == 2, with_table
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-5)
    fast_params = dict(fast.named_parameters())
    for name, p_ref in ref.named_parameters():
        g_ref, g_fast = p_ref.grad, fast_params[name].grad
        assert g_ref is not None and g_fast is not None, name
        scale = g_ref.abs().max().item() + 1e-8
        err = (g_fast - g_ref).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max grad error {err:.3e} (grad scale {scale:.3e})"
    assert fast.encoder.bias_table.grad.abs().sum() > 0 and fast.decoder.bias_table.grad.abs().sum() > 0


def test_flash_attention_incremental_decoding_matches_torch_backend(device):
    ref, fast = _models(device)
    batch = _padded_batch(device)
    tokens = torch.randint(2, SMALL["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        logits = {}
        for name, model in (("torch", ref), ("triton", fast)):
            hidden = model.encode(batch["input_ids"], batch["attention_mask"])
            cache, steps = None, []
            for t in range(tokens.shape[1]):       # one token at a time against the growing cache
                step_logits, cache = model.decode_step(tokens[:, t:t + 1], hidden, batch["attention_mask"], cache)
                steps.append(step_logits)
            logits[name] = torch.cat(steps, 1)
        full = fast(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=tokens).logits
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["triton"], full, rtol=1e-4, atol=1e-4)
