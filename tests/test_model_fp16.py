"""T5's fp16 overflow trap (docs/T5.md): an FFN output beyond 65,504 must not put inf into the residual stream.

The model saturates fp16 residual adds to the finite range (`models.t5.saturate_fp16`). A tiny T5 whose
first encoder `wo` is scaled up overflows fp16: unprotected it gives non-finite logits; protected it is
finite and matches an fp32 model that applies the same clamp, with the PyTorch references and with the
Triton kernels (TRITON_INTERPRET=1 on CPU), all parameters fp16 (as DeepSpeed casts them) or fp32 under
fp16 autocast (the local engine).
"""
import copy

import pytest
import torch

import models.t5
from models import T5Config, T5ForConditionalGeneration

FIELDS = dict(vocab_size=61, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=2,
              relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0)
LIMIT = torch.finfo(torch.float16).max


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch():
    gen = torch.Generator().manual_seed(1)
    return dict(input_ids=torch.randint(2, 61, (2, 9), generator=gen), labels=torch.randint(2, 61, (2, 5), generator=gen))


def _overflowing_model(backend: str) -> T5ForConditionalGeneration:
    """fp32 v1.0 (ReLU) model whose first encoder FFN drives one channel to ~4e5 (past fp16's 65,504).

    That `wo` row is a positive constant, so with h >= 0 the matmul's partial sums only grow: fp16 and
    fp32 agree on which elements overflow (CPU fp16 matmuls may round partial sums to fp16).
    """
    torch.manual_seed(0)
    m = T5ForConditionalGeneration(T5Config.from_preset("t5-small", kernel_backend=backend, **FIELDS)).eval()
    ffn = m.encoder.block[0].layer[-1].DenseReluDense
    peak = {}
    hook = ffn.register_forward_hook(lambda mod, args, out: peak.update(v=out[..., 0].max().item()))
    with torch.no_grad():
        ffn.wo.weight[0].fill_(1.0)
        m(**_batch())
        hook.remove()
        ffn.wo.weight[0].mul_(4e5 / peak["v"])
    return m


def _clamp_every_dtype(t):
    return t.clamp(-LIMIT, LIMIT)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_overflowing_ffn_stays_finite_and_matches_clamped_fp32(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    m32 = _overflowing_model(backend)
    m16 = copy.deepcopy(m32).half()  # every parameter fp16, `wo` included (what DeepSpeed fp16 does)
    batch = _batch()
    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(models.t5, "saturate_fp16", lambda t: t)
            unprotected = m16(**batch)
        assert not torch.isfinite(unprotected.logits).all()  # the trap is real at this scale
        with monkeypatch.context() as patch:
            patch.setattr(models.t5, "saturate_fp16", _clamp_every_dtype)
            ref = m32(**batch)
    out = m16(**batch)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits.float(), ref.logits, rtol=0, atol=1e-2)
    assert abs(out.loss.item() - ref.loss.item()) < 2e-3
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m16.parameters() if p.grad is not None)


def test_autocast_fp16_overflowing_ffn_stays_finite(monkeypatch):
    """fp32 weights under fp16 autocast: `wo`'s output is fp16 and saturates; the stream stays fp32."""
    m = _overflowing_model("torch")
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.float16):
        with torch.no_grad(), monkeypatch.context() as patch:
            patch.setattr(models.t5, "saturate_fp16", lambda t: t)
            assert not torch.isfinite(m(**batch).logits).all()
        out = m(**batch)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_saturation_is_fp16_only():
    x = torch.tensor([1e6, -float("inf"), 3.0])
    assert models.t5.saturate_fp16(x) is x  # fp32 / bf16: untouched, no extra op
    assert models.t5.saturate_fp16(x.bfloat16()).isinf().any()
    assert models.t5.saturate_fp16(x.half()).tolist() == [LIMIT, -LIMIT, 3.0]
