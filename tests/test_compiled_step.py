"""`generate(..., compile_step=...)` (models/compiled_step.py) on CPU: the decode step under torch.compile
(fullgraph, dynamic=False; the "aot_eager" backend CPU runs, the functionalised graph that inductor would
get) gives the same tokens as the uncompiled step, greedy and beam-4 with padding in the batch; ONE graph
serves every step of a generate and every later generate of the same shapes (no recompilation); the
buffers the graph reads keep their addresses through beam reordering and across calls (what a CUDA graph
needs); a reused cache recomputes the cross-attention K/V of the new inputs."""
import dataclasses

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from models import compiled_step
from models.config import T5Config
from models.t5 import T5ForConditionalGeneration

CONFIG = dict(vocab_size=80, d_model=32, d_kv=16, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=2,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
              relative_attention_num_buckets=8, relative_attention_max_distance=12, kernel_backend="torch")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    compiled_step.clear()
    yield
    compiled_step.clear()
    dynamo.reset()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = T5ForConditionalGeneration(T5Config(**CONFIG)).eval()
    with torch.no_grad():
        m.lm_head.weight[1] = m.lm_head.weight[7] * 1.01  # EOS competes with a common token
    return m


def _batch(seed=1, rows=3, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 80, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    return ids * mask, mask


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


CASES = [dict(), dict(num_beams=4), dict(num_beams=4, num_return_sequences=2, early_stopping="never",
                                         length_penalty=1.2)]


@pytest.mark.parametrize("args", CASES, ids=["greedy", "beam4", "beam4-never-2"])
def test_compiled_step_same_tokens_one_graph_reused(model, args):
    ids, mask = _batch()
    expect = model.generate(ids, mask, max_new_tokens=20, **args)
    got = model.generate(ids, mask, max_new_tokens=20, compile_step=True, **args)
    assert got.tolist() == expect.tolist()
    assert got.shape[1] > 10
    (entry,) = compiled_step.entries(model)
    assert entry.mode == "aot_eager" and _graphs() == 1
    calls = entry.compiled_calls
    assert calls >= 9  # every step after the first ran the compiled graph
    # Other inputs, same shapes: the same graph and buffers; the cross-attention K/V are the new inputs'.
    pointers = [t.data_ptr() for t in entry.cache.tensors()]
    ids2, mask2 = _batch(seed=5)
    got2 = model.generate(ids2, mask2, max_new_tokens=20, compile_step=True, **args)
    assert got2.tolist() == model.generate(ids2, mask2, max_new_tokens=20, **args).tolist()
    assert got2.tolist() != got.tolist()
    assert compiled_step.entries(model) == [entry] and _graphs() == 1
    assert entry.compiled_calls > calls
    assert [t.data_ptr() for t in entry.cache.tensors()] == pointers


def test_beam_reordering_stays_in_the_graph_buffers(model, monkeypatch):
    """Every compiled step of a beam search sees the same buffer addresses (reordering copies within
    them), and the buffers are marked static for CUDA graphs."""
    ids, mask = _batch()
    seen = []
    original = compiled_step.CompiledStep.__call__

    def spy(self, tokens):
        out = original(self, tokens)
        seen.append(tuple(t.data_ptr() for t in self.cache.tensors()))
        return out

    monkeypatch.setattr(compiled_step.CompiledStep, "__call__", spy)
    reorders = []
    original_reorder = compiled_step.StaticCache.reorder
    monkeypatch.setattr(compiled_step.StaticCache, "reorder",
                        lambda self, index: (reorders.append(index.tolist()), original_reorder(self, index)))
    out = model.generate(ids, mask, max_new_tokens=16, num_beams=4, compile_step="eager")
    assert out.tolist() == model.generate(ids, mask, max_new_tokens=16, num_beams=4).tolist()
    assert len(set(seen)) == 1 and len(seen) >= 10
    assert any(r != list(range(12)) for r in reorders)  # beams did move
    (entry,) = compiled_step.entries(model)
    marked = [getattr(t, "_dynamo_static_input_type", None) for t in (*entry.cache.tensors(), entry.tokens,
                                                                      entry.encoder_hidden, entry.attention_mask)]
    assert marked == ["unguarded"] * len(marked)


def test_new_shapes_new_graph_and_keys_bounded(model, monkeypatch):
    monkeypatch.setattr(compiled_step, "MAX_KEYS", 2)
    for length in (10, 7, 10, 5):
        ids, mask = _batch(length=length)
        assert model.generate(ids, mask, max_new_tokens=6, compile_step="eager").tolist() == \
            model.generate(ids, mask, max_new_tokens=6).tolist()
    # lengths 10, 7, (10 reused), 5: three graphs; 10 (least recently used) was dropped for 5
    assert _graphs() == 3
    assert [e.encoder_hidden.shape[1] for e in compiled_step.entries(model)] == [10, 5]


def test_compile_step_errors(model):
    ids, mask = _batch()
    with pytest.raises(ValueError, match="compile_step=True: .*needs cache_implementation='static'"):
        model.generate(ids, mask, max_new_tokens=4, compile_step=True, cache_implementation="dynamic")
    with pytest.raises(ValueError, match="compile_step='fast': expected true, false or one of"):
        model.generate(ids, mask, max_new_tokens=4, compile_step="fast")
    for mode in ("reduce-overhead", "cuda-graph"):
        with pytest.raises(ValueError, match=f"compile_step='{mode}' needs a CUDA device"):
            model.generate(ids, mask, max_new_tokens=4, compile_step=mode)
    ids_, mask_ = _batch()
    entry = compiled_step.compiled_step(model, "eager", 3, 4, model.encode(ids_, mask_), mask_)
    with pytest.raises(RuntimeError, match="in use by another generate"):
        model.generate(ids, mask, max_new_tokens=4, compile_step="eager")
    entry.end()
    model.generate(ids, mask, max_new_tokens=4, compile_step="eager")  # released: fine again


def test_triton_model_compiles_with_reference_kernels(model):
    """A model whose config picks the Triton kernels (the interpreter here; CUDA's default) compiles its
    step with the PyTorch references (models/compiled_step.py: dynamo does not trace the interpreter's
    kernels): the same tokens as the reference model, the first (eager) step included."""
    pytest.importorskip("triton")
    fast = T5ForConditionalGeneration(T5Config(**{**CONFIG, "kernel_backend": "triton"})).eval()
    fast.load_state_dict(model.state_dict())
    ids, mask = _batch()
    got = fast.generate(ids, mask, max_new_tokens=8, num_beams=2, compile_step="eager")
    assert got.tolist() == model.generate(ids, mask, max_new_tokens=8, num_beams=2).tolist()
    assert _graphs() == 1


class FakeGraph:
    """A CUDA graph's protocol on CPU: capture records `fn` without running it, replay runs it into the
    same output tensor."""

    def __init__(self, fn, tokens, out):
        self.fn, self.tokens, self.out, self.replays = fn, tokens, out, 0

    def replay(self):
        self.out.copy_(self.fn(self.tokens))
        self.replays += 1


@pytest.mark.parametrize("beams", [1, 4])
def test_cuda_graph_mode_protocol(model, monkeypatch, beams):
    """compile_step="cuda-graph" (CUDA only) with the CUDA calls faked: warm-up = this step's real work,
    capture runs nothing, each later step is one replay, outputs copied out; same tokens as eager, also on
    a second call that reuses the captured graph."""
    from models.generation import Seq2SeqStepper, search
    from models.generation_config import resolve

    graphs = []

    def capture(fn, tokens):
        graphs.append(FakeGraph(fn, tokens, torch.full((tokens.shape[0], CONFIG["vocab_size"]), float("nan"))))
        return graphs[-1], graphs[-1].out

    monkeypatch.setattr(compiled_step, "_warm_up", lambda fn, tokens: fn(tokens))
    monkeypatch.setattr(compiled_step, "_capture", capture)
    for seed in (1, 5):
        ids, mask = _batch(seed=seed)
        cfg = resolve(model, dict(max_new_tokens=12, num_beams=beams))
        stepper = Seq2SeqStepper(model, ids, mask, beams, "static", 12, compile_step="cuda-graph")
        with torch.no_grad():
            got = search(stepper, cfg, 3, ids.device).sequences
        stepper.close()
        expect = model.generate(ids, mask, max_new_tokens=12, num_beams=beams)[:, 1:]
        assert got.tolist() == expect.tolist()
    assert len(graphs) == 1 and graphs[0].replays >= 12  # captured once, replayed by both calls


def test_kept_steps_do_not_keep_the_model_alive():
    import gc

    m = T5ForConditionalGeneration(T5Config(**{**CONFIG, "num_layers": 1})).eval()
    m.generate(torch.randint(2, 80, (2, 5)), max_new_tokens=4, compile_step="eager")
    assert len(compiled_step.entries(m)) == 1
    del m
    gc.collect()
    assert len(compiled_step._ENTRIES) == 0


@pytest.mark.parametrize("choice", ["reference", "sdpa-attention", "model"])
def test_decode_kernels_choice(model, monkeypatch, choice):
    """decode_kernels picks the decode step's kernels on a Triton-configured model (the interpreter): the
    flash kernel serves the decoder's attention only with "model"; "reference" runs no Triton kernel in
    the step; the tokens equal the reference model's either way. The encoder keeps the model's kernels."""
    pytest.importorskip("triton")
    fast = T5ForConditionalGeneration(T5Config(**{**CONFIG, "kernel_backend": "triton"})).eval()
    fast.load_state_dict(model.state_dict())
    import models.backends as backends

    calls = {"attention": 0, "rms_norm": 0}  # calls with one query / one position: the decoder's steps

    def counting(name, fn, length):
        def wrapped(*a, **kw):
            calls[name] += length(a) == 1
            return fn(*a, **kw)
        return wrapped

    spy = dataclasses.replace(
        backends.TRITON, attention=counting("attention", backends.TRITON.attention, lambda a: a[0].shape[2]),
        rms_norm=counting("rms_norm", backends.TRITON.rms_norm, lambda a: a[0].shape[1]))
    monkeypatch.setattr(fast, "kernels", lambda device: spy)
    ids, mask = _batch()
    got = fast.generate(ids, mask, max_new_tokens=4, decode_kernels=choice)
    assert got.tolist() == model.generate(ids, mask, max_new_tokens=4).tolist()
    # 4 steps x 2 layers x (self + cross) attention calls; one plain RMSNorm per step (the first norm)
    assert calls == {"attention": 16 if choice == "model" else 0, "rms_norm": 0 if choice == "reference" else 4}


def test_decode_kernels_bad_value(model):
    ids, mask = _batch()
    with pytest.raises(ValueError, match="decode_kernels='fast': expected one of"):
        model.generate(ids, mask, max_new_tokens=4, decode_kernels="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode, kernels", [("cuda-graph", "auto"), ("cuda-graph", "model"),
                                           ("reduce-overhead", "auto")])
def test_cuda_modes_same_tokens_no_skips(mode, kernels):
    """On a GPU: the CUDA-graph modes, fp32, the tiny model with the default kernels (the references) or,
    captured directly, the model's (Triton); same tokens as eager greedy and beam-4 with the same kernels,
    twice (a reused graph), no CUDA-graph skip. (Inductor over the Triton kernels: a benchmark row only.)"""
    torch.manual_seed(0)
    m = T5ForConditionalGeneration(T5Config(**{**CONFIG, "kernel_backend": "auto"})).cuda().eval()
    for seed in (1, 5):
        ids, mask = (t.cuda() for t in _batch(seed=seed))
        for beams in (1, 4):
            args = dict(max_new_tokens=12, num_beams=beams)
            got = m.generate(ids, mask, compile_step=mode, decode_kernels=kernels, **args)
            eager = m.generate(ids, mask, decode_kernels="reference" if kernels == "auto" else kernels, **args)
            assert got.tolist() == eager.tolist(), (mode, kernels, beams, seed)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert all(e.compiled_calls > 0 for e in compiled_step.entries(m))
