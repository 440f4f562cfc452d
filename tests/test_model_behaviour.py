"""Model behaviour without a reference implementation: KV-cache decoding, packing, activation
checkpointing, meta-device construction, fp16 safety, kernel-backend dispatch."""
import pytest
import torch

from models import PRESETS, T5Config, T5ForConditionalGeneration
from models.t5 import segment_positions, shift_right
from tests.kernel_checks import record_kernel_calls


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(proj: str = "gated-gelu", **kw) -> T5Config:
    fields = dict(vocab_size=61, d_model=40, d_kv=12, d_ff=56, num_layers=2, num_decoder_layers=3, num_heads=3,
                  relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                  feed_forward_proj=proj, tie_word_embeddings=proj == "relu", kernel_backend="torch")
    fields.update(kw)
    return T5Config(**fields)


def model(cfg: T5Config, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    m = T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layer_norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m


# ------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_incremental_decoding_with_cache_equals_full_forward(proj):
    m = model(small_config(proj)).eval()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 61, (2, 15), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    decoder_input_ids = torch.randint(2, 61, (2, 21), generator=g)  # past max_distance: log buckets in cache
    with torch.no_grad():
        full = m(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        enc = m.encode(input_ids, attention_mask)
        logits, past = m.decode_step(decoder_input_ids[:, :3], enc, attention_mask)   # a prompt of 3, then 1 by 1
        steps = [logits]
        for t in range(3, 21):
            logits, past = m.decode_step(decoder_input_ids[:, t:t + 1], enc, attention_mask, past)
            steps.append(logits)
    assert len(past) == 3 and past[0][0].shape == (2, 3, 21, 12) and past[0][2].shape == (2, 3, 15, 12)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_forward_with_past_key_values_and_reorder_cache():
    m = model(small_config()).eval()
    input_ids = torch.randint(2, 61, (2, 9))
    dec = torch.randint(2, 61, (2, 6))
    with torch.no_grad():
        full = m(input_ids=input_ids, decoder_input_ids=dec).logits
        first = m(input_ids=input_ids, decoder_input_ids=dec[:, :4], use_cache=True)
        rest = m(encoder_outputs=first, decoder_input_ids=dec[:, 4:], past_key_values=first.past_key_values)
        assert (rest.logits - full[:, 4:]).abs().max().item() <= 1e-5
        swapped = m.reorder_cache(first.past_key_values, torch.tensor([1, 0]))
        again = m(encoder_outputs=first.encoder_last_hidden_state.flip(0), decoder_input_ids=dec[:, 4:].flip(0),
                  past_key_values=swapped)
        assert (again.logits - full[:, 4:].flip(0)).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_packed_rows_equal_examples_run_separately(proj):
    m = model(small_config(proj), seed=2).eval()
    g = torch.Generator().manual_seed(3)
    # Row 0 packs examples A and B (+ padding); row 1 holds C alone. Lengths pass max_distance=12.
    lengths = {"A": (14, 5), "B": (7, 4), "C": (16, 6)}
    ex = {k: (torch.randint(2, 61, (li,), generator=g), torch.randint(2, 61, (lt,), generator=g))
          for k, (li, lt) in lengths.items()}
    L_in, L_tgt = 23, 10

    def pack(names):
        inp, lab = torch.zeros(L_in, dtype=torch.long), torch.full((L_tgt,), -100)
        eseg, dseg = torch.zeros(L_in, dtype=torch.long), torch.zeros(L_tgt, dtype=torch.long)
        i = j = 0
        for s, k in enumerate(names, start=1):
            x, y = ex[k]
            inp[i:i + len(x)], eseg[i:i + len(x)] = x, s
            lab[j:j + len(y)], dseg[j:j + len(y)] = y, s
            i, j = i + len(x), j + len(y)
        return inp, lab, eseg, dseg

    rows = [pack(["A", "B"]), pack(["C"])]
    input_ids, labels, eseg, dseg = (torch.stack(t) for t in zip(*rows))
    with torch.no_grad():
        packed = m(input_ids=input_ids, labels=labels, encoder_segment_ids=eseg, decoder_segment_ids=dseg)
        separate, total, count = {}, 0.0, 0
        for k, (x, y) in ex.items():
            out = m(input_ids=x[None], labels=y[None])
            separate[k] = out.logits[0]
            total, count = total + out.loss.item() * len(y), count + len(y)
    assert (packed.logits[0, :5] - separate["A"]).abs().max().item() <= 1e-5
    assert (packed.logits[0, 5:9] - separate["B"]).abs().max().item() <= 1e-5
    assert (packed.logits[1, :6] - separate["C"]).abs().max().item() <= 1e-5
    assert abs(packed.loss.item() - total / count) <= 1e-5
    assert torch.isfinite(packed.logits).all()   # padding queries see no key: zeros, never NaN


def test_segment_positions_and_shift_right_restart_per_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    labels = torch.tensor([[5, 6, 7, 8, 9, -100, -100]])
    assert shift_right(labels, 0, 0, seg).tolist() == [[0, 5, 6, 0, 8, 0, 0]]
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 7, 8, 9, 0]]


# ---------------------------------------------------------------------------- checkpointing
def test_activation_checkpointing_gives_same_loss_and_grads_with_dropout():
    cfg = small_config(dropout_rate=0.2)
    plain, ckpt = model(cfg), model(cfg)
    ckpt.gradient_checkpointing_enable()
    assert ckpt.encoder.gradient_checkpointing and ckpt.decoder.gradient_checkpointing
    batch = dict(input_ids=torch.randint(2, 61, (2, 11)), labels=torch.randint(2, 61, (2, 7)))
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(9)
        m.loss = m(**batch).loss
        m.loss.backward()
    assert torch.equal(plain.loss, ckpt.loss)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    assert T5ForConditionalGeneration(cfg.replace(gradient_checkpointing=True)).decoder.gradient_checkpointing


def test_triton_attention_dropout_replays_under_activation_checkpointing():
    """With kernel_backend='triton' the attention dropout runs inside the flash kernel; its seed comes
    from torch's RNG, so a checkpointed block recomputes the same masks and the gradients are equal."""
    cfg = small_config(d_kv=16, dropout_rate=0.2, kernel_backend="triton")
    plain, ckpt = model(cfg), model(cfg)
    ckpt.gradient_checkpointing_enable()
    batch = dict(input_ids=torch.randint(2, 61, (2, 9)), labels=torch.randint(2, 61, (2, 6)))
    losses = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(5)
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n
    plain.eval()
    with torch.no_grad():
        assert not torch.equal(plain(**batch).loss, losses[0])  # the dropout was really applied in training


def test_dropout_is_active_in_train_mode_only():
    m = model(small_config(dropout_rate=0.3))
    batch = dict(input_ids=torch.randint(2, 61, (2, 8)), decoder_input_ids=torch.randint(2, 61, (2, 5)))
    m.train()
    assert not torch.equal(m(**batch).logits, m(**batch).logits)
    m.eval()
    assert torch.equal(m(**batch).logits, m(**batch).logits)


# --------------------------------------------------------------------------- meta, init, dtype
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_with_the_analytic_parameter_count(name):
    cfg = T5Config.from_preset(name)
    with torch.device("meta"):
        m = T5ForConditionalGeneration(cfg)
    assert m.num_parameters() == cfg.num_parameters()
    assert all(p.is_meta for p in m.parameters())


def test_init_follows_t5_fan_in_scaling():
    cfg = T5Config(vocab_size=512, d_model=256, d_kv=32, d_ff=384, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=1.0)
    m = T5ForConditionalGeneration(cfg)
    att = m.encoder.block[0].layer[0].SelfAttention
    ffn = m.encoder.block[0].layer[1].DenseReluDense
    q, k, v = att.projection_weights()
    for w, std in ((q, (256 * 32) ** -0.5), (k, 256 ** -0.5), (v, 256 ** -0.5), (att.o.weight, 128 ** -0.5),
                   (ffn.wi_fused.weight, 256 ** -0.5), (ffn.wo.weight, 384 ** -0.5), (m.shared.weight, 1.0),
                   (m.lm_head.weight, 256 ** -0.5)):
        assert abs(w.std().item() / std - 1) < 0.1
    assert torch.equal(m.decoder.final_layer_norm.weight, torch.ones(256))
    assert not hasattr(m.decoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


def test_fp16_keeps_wo_in_fp32_and_stays_close_to_fp32():
    m = model(small_config()).eval()
    batch = dict(input_ids=torch.randint(2, 61, (2, 9)), decoder_input_ids=torch.randint(2, 61, (2, 5)))
    with torch.no_grad():
        ref = m(**batch).logits
        m.to_dtype(torch.float16)
        assert m.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
        assert m.shared.weight.dtype == torch.float16
        out = m(**batch).logits
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max().item() < 0.05


# ------------------------------------------------------------------------------- kernel backend
def test_triton_backend_that_cannot_run_is_an_error_naming_why(monkeypatch):
    import models.backends

    batch = dict(input_ids=torch.randint(2, 61, (1, 4)), decoder_input_ids=torch.randint(2, 61, (1, 3)))
    with pytest.raises(ValueError, match="kernel_backend='triton': the attention kernel takes head dims"):
        model(small_config(kernel_backend="triton", d_kv=12))(**batch)
    monkeypatch.setattr(models.backends, "why_triton_cannot_run", lambda device: "triton is not installed")
    with pytest.raises(ValueError, match="kernel_backend='triton': triton is not installed"):
        model(small_config(kernel_backend="triton", d_kv=16))(**batch)


def test_auto_backend_uses_pytorch_on_cpu_and_triton_on_cuda(monkeypatch):
    import models.backends
    from models.backends import REFERENCE, TRITON, choose_kernels

    calls = record_kernel_calls(monkeypatch, "rms_norm", "add_rms_norm", "ffn", "attention")
    m = model(small_config(kernel_backend="auto", d_kv=16))
    m(input_ids=torch.randint(2, 61, (1, 4)), labels=torch.randint(2, 61, (1, 3))).loss.backward()
    assert not any(calls.values()), "a Triton kernel ran for CPU tensors under kernel_backend='auto'"
    monkeypatch.setattr(models.backends, "TRITON", TRITON)
    cfg = small_config(kernel_backend="auto", d_kv=16)
    assert choose_kernels(cfg, torch.device("cpu")) is REFERENCE
    monkeypatch.setattr(models.backends, "why_triton_cannot_run", lambda device: None)
    assert choose_kernels(cfg, torch.device("cuda", 0)) is TRITON
    odd = choose_kernels(cfg.replace(d_kv=12), torch.device("cuda", 0))   # a head width the flash kernel lacks
    assert odd.backend == "triton" and odd.attention is None and "d_kv is 12" in odd.note


def test_triton_backend_matches_torch_backend_under_the_interpreter():
    """The dispatch point end to end: Triton kernels (TRITON_INTERPRET=1 on CPU) vs the references."""
    pytest.importorskip("triton")
    cfg = small_config(d_kv=16, num_layers=1, num_decoder_layers=2)
    ref, fast = model(cfg), model(cfg.replace(kernel_backend="triton"))
    input_ids = torch.randint(2, 61, (2, 13))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = torch.randint(2, 61, (2, 6))
    labels[1, 4:] = -100
    outs = []
    for m in (ref, fast):
        out = m(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        outs.append(out)
    assert (outs[0].logits - outs[1].logits).abs().max().item() <= 1e-4
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-4 * (p.grad.abs().max().item() + 1e-3), n
