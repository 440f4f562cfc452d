"""The kernels trace as single graph nodes: torch._dynamo.explain finds one graph and no break.

- The model with kernel_backend="torch" (the references) on the CPU.
- kernels/rms_norm.py's Triton RMSNorm / add-RMSNorm and kernels/ffn.py's FFN and gate, registered as torch.library custom ops with fake
  implementations and registered autograd (run here under TRITON_INTERPRET=1, see conftest), in a small
  pre-norm block; compiled with the eager backend, output and gradients equal the uncompiled ones.
"""
import pytest
import torch

from kernels.ffn import ffn, gelu_tanh_gate
from kernels.rms_norm import add_rms_norm, rms_norm
from models import T5Config, T5ForConditionalGeneration


def _explain(fn, *args):
    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args)
    return out.graph_count, out.graph_break_count, [str(b.reason)[:200] for b in out.break_reasons]


def test_model_with_torch_backend_is_one_graph():
    cfg = T5Config.from_preset("tiny").replace(vocab_size=96, kernel_backend="torch")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).train()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(2, 96, (2, 12), generator=g), torch.randint(2, 96, (2, 7), generator=g)
    assert _explain(lambda i, l: model(input_ids=i, labels=l).loss, ids, labels) == (1, 0, [])


def _block(x, r, w1, w2):
    y, s = add_rms_norm(x, r, w1)
    return rms_norm(torch.tanh(y) + s, w2)


def test_triton_rms_norm_ops_trace_without_breaks():
    assert _explain(_block, *_block_inputs(requires_grad=False)) == (1, 0, [])


def _block_inputs(requires_grad, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 5, 48), (2, 5, 48), (48,), (48,)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_triton_rms_norm_block_equals_eager(dtype):
    eager_in, compiled_in = _block_inputs(True, dtype), _block_inputs(True, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)
    outs = [_block(*eager_in), compiled(*compiled_in)]
    weight = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    for out in outs:
        (out.float() * weight.float()).sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


FFN_VARIANTS = [dict(gated=True, activation="gelu_tanh", recompute=False),
                dict(gated=True, activation="gelu_tanh", recompute=True),
                dict(gated=False, activation="relu", recompute=False),
                dict(gated=False, activation="relu", recompute=True)]


def _ffn_inputs(gated, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    shapes = [(2, 5, 32), (2 * 24 if gated else 24, 32), (32, 24), (2, 5, 48)]
    return [(0.3 * torch.randn(s, generator=g)).to(dtype).requires_grad_() for s in shapes]


def _ffn_block(kw):
    def block(x, wi, wo, h):
        return ffn(x, wi, wo, **kw) + gelu_tanh_gate(h).sum()
    return block


@pytest.mark.parametrize("kw", FFN_VARIANTS, ids=lambda kw: f"{kw['activation']}-recompute{kw['recompute']}")
def test_triton_ffn_ops_trace_without_breaks_and_compile_to_eager(kw):
    block = _ffn_block(kw)
    assert _explain(block, *[t.detach() for t in _ffn_inputs(kw["gated"])]) == (1, 0, [])
    eager_in, compiled_in = _ffn_inputs(kw["gated"]), _ffn_inputs(kw["gated"])
    torch._dynamo.reset()
    outs = [block(*eager_in), torch.compile(block, backend="aot_eager", fullgraph=True)(*compiled_in)]
    weight = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(5))
    for out in outs:
        (out * weight).sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_triton_ffn_with_dropout_traces_without_breaks():
    def block(x, wi, wo):
        return ffn(x, wi, wo, gated=True, dropout_p=0.1, training=True)
    assert _explain(block, *[t.detach() for t in _ffn_inputs(True)[:3]]) == (1, 0, [])
