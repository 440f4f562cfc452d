"""The static KV cache (models/kv_cache.py): the same tokens as the torch.cat cache for greedy and beam
search, the same logits step by step, shape-stable steps over fixed buffers, in-place beam reordering,
and the flash kernel's q_offset path (Triton interpreter on CPU)."""
import pytest
import torch

from models.config import T5Config
from models.generation import Seq2SeqStepper
from models.kv_cache import StaticCache, reorder_dynamic
from models.t5 import T5ForConditionalGeneration

CONFIG = dict(vocab_size=80, d_model=32, d_kv=16, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=2,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
              relative_attention_num_buckets=8, relative_attention_max_distance=12)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**{**CONFIG, "kernel_backend": "torch", **overrides})).eval()
    with torch.no_grad():
        model.lm_head.weight[1] = model.lm_head.weight[7] * 1.01  # EOS competes with a common token
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 80, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    return ids * mask, mask


@pytest.fixture(params=["prefix", "full_length"])
def attended(request, monkeypatch):
    """Both ways a static cache is attended: its written prefix (CPU default) or the whole buffer (CUDA's)."""
    if request.param == "full_length":
        monkeypatch.setattr("models.kv_cache.FULL_LENGTH_DEVICES", ("cpu", "cuda"))
    return request.param


@pytest.mark.parametrize("args", [dict(), dict(num_beams=4), dict(num_beams=3, num_return_sequences=3,
                                                                      early_stopping="never", length_penalty=1.2)])
def test_static_cache_same_tokens_as_torch_cat_cache(args, attended):
    model = _model()
    ids, mask = _batch()
    static = model.generate(ids, mask, max_new_tokens=24, cache_implementation="static", **args)
    dynamic = model.generate(ids, mask, max_new_tokens=24, cache_implementation="dynamic", **args)
    assert static.tolist() == dynamic.tolist()
    assert static.shape[1] > 10


def test_static_steps_same_logits_fixed_buffers_and_shapes(monkeypatch):
    model = _model()
    ids, mask = _batch()
    static = Seq2SeqStepper(model, ids, mask, cache_implementation="static", max_length=12)
    static.cache = StaticCache(model.config, 3, 12, "cpu", full_length=True)
    dynamic = Seq2SeqStepper(model, ids, mask, cache_implementation="dynamic")
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    tokens = torch.zeros((3, 1), dtype=torch.long)
    pointers = None
    for step in range(12):
        expect = dynamic.step(tokens)
        seen.clear()
        monkeypatch.setattr("models.t5.F.scaled_dot_product_attention", record)
        got = static.step(tokens)
        monkeypatch.setattr("models.t5.F.scaled_dot_product_attention", sdpa)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        if step == 0:
            first_shapes = list(seen)
            pointers = [t.data_ptr() for t in static.cache.keys + static.cache.values]
        assert seen == first_shapes, "every step attends with the same shapes"
        assert [t.data_ptr() for t in static.cache.keys + static.cache.values] == pointers
        tokens = expect.argmax(-1, keepdim=True)
        if step == 5:  # beam-style reordering in the middle
            index = torch.tensor([2, 0, 0])
            static.reorder(index)
            dynamic.reorder(index)
            tokens = tokens.index_select(0, index)
    assert first_shapes[0][1][2] == 12  # self-attention keys: the whole preallocated length
    with pytest.raises(IndexError, match="out of bounds"):  # whole buffer: index_copy_ itself refuses
        static.step(tokens)


def test_reorder_and_memory():
    config = T5Config(**CONFIG)
    cache = StaticCache(config, rows=4, max_length=6, device="cpu")
    k = torch.randn(4, 2, 3, 16)
    v = torch.randn(4, 2, 3, 16)
    for layer in range(2):
        cache.write(layer, k, v)
    cache.advance(3)
    index = torch.tensor([3, 3, 1, 0])
    cache.reorder(index)
    untouched = cache.keys[0].clone()
    cache.reorder(torch.arange(4))
    assert torch.equal(cache.keys[0], untouched)
    (dk, dv, *_), = reorder_dynamic([(k, v, k, v)], index)
    torch.testing.assert_close(cache.keys[0][:, :, :3], dk)
    torch.testing.assert_close(cache.values[1][:, :, :3], dv)
    assert cache.keys[0][:, :, 3:].abs().sum() == 0
    assert cache.nbytes() == 2 * 2 * 4 * 2 * 6 * 16 * 4  # layers * (k, v) * rows * heads * length * d_kv * fp32
    with pytest.raises(ValueError, match="3 positions written, 4 more exceed max_length=6"):
        cache.write(0, torch.randn(4, 2, 4, 16), torch.randn(4, 2, 4, 16))


def test_flash_kernel_q_offset_path_same_tokens(attended):
    """kernel_backend="triton" (the interpreter on CPU): the decode step runs the flash kernel over the
    preallocated buffer (q_offset over the written prefix, or position tensors over the whole buffer);
    same tokens as the PyTorch reference."""
    pytest.importorskip("triton")
    ref = _model()
    fast = _model(kernel_backend="triton")
    fast.load_state_dict(ref.state_dict())
    ids, mask = _batch()
    calls = []
    from kernels import t5_attention as ka

    original = ka.t5_attention

    def spy(q, k, v, *a, **kw):
        calls.append((q.shape[2], k.shape[2], kw.get("q_offset"), kw.get("q_positions")))
        return original(q, k, v, *a, **kw)

    import models.backends as backends
    kernels = backends.TRITON.__class__(**{**backends.TRITON.__dict__, "attention": spy})
    fast.kernels = lambda device: kernels
    for cache in ("static", "dynamic"):
        calls.clear()
        out = fast.generate(ids, mask, max_new_tokens=5, num_beams=2, cache_implementation=cache)
        assert out.tolist() == ref.generate(ids, mask, max_new_tokens=5, num_beams=2,
                                            cache_implementation=cache).tolist()
        if cache == "static":
            decode = [c for c in calls if c[0] == 1 and c[1] != 10]  # self-attention (cross has 10 keys)
            if attended == "full_length":  # the whole buffer, positions as a device tensor (graph-stable)
                assert {c[1] for c in decode} == {5} and all(c[3] is not None for c in decode)
            else:  # the written prefix, the count as q_offset (the kernel's index-order path)
                offsets = [c[2] for c in decode]  # one call per decoder layer and step
                assert offsets == sorted(offsets) and offsets[:2] == [0, 0] and len(set(offsets)) >= 3, offsets
                assert all(c[3] is None for c in decode)


def test_static_decode_step_is_one_graph_under_torch_compile(monkeypatch):
    """torch.compile(fullgraph=True) of `decode_step` over a whole-buffer static cache: no graph break, and
    after the first step (which allocates the buffers and computes the cross-attention K/V) every step
    reuses ONE graph (no recompilation), as CUDA graphs / mode="reduce-overhead" need. Dynamo's eager
    backend: the capture is what is checked, not inductor's code."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    model = _model()
    ids, mask = _batch()
    encoder_hidden = model.encode(ids, mask)
    dynamo.reset()
    counters.clear()
    # No automatic dynamic shapes: a size or a Python int that changed between steps forces a recompile.
    monkeypatch.setattr(dynamo.config, "automatic_dynamic_shapes", False)
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True)
    compiled = StaticCache(model.config, 3, 10, "cpu", full_length=True)
    eager = StaticCache(model.config, 3, 10, "cpu", full_length=True)
    tokens = torch.zeros((3, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(10):
            got, compiled = step(tokens, encoder_hidden, mask, compiled)
            expect, eager = model.decode_step(tokens, encoder_hidden, mask, eager)
            torch.testing.assert_close(got, expect)
            tokens = expect[:, -1].argmax(-1, keepdim=True)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    dynamo.reset()
