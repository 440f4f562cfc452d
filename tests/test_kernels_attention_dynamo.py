"""The attention kernels are compile- and graph-safe custom ops (kernels/_t5_attention_ops.py, issue 13).

- torch.library.opcheck: schema, fake (meta) implementations against the real kernels (shapes, dtypes,
  strides), autograd registration, AOT dispatch; for the forward and the backward op, every mask kind.
- torch._dynamo.explain on the T5 model (preset tiny): one graph, no break, with kernel_backend="torch" and
  with the flash kernel (run by the interpreter on the CPU; dynamo never traces into it), also with
  attention dropout (seed drawn on the device) and with an empty bucket-table cache (issue 13's failure).
- The compiled model (torch.compile, backend aot_eager, fullgraph) gives the eager loss and gradients.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import t5_attention as attn
from kernels._t5_attention_ops import attention_bwd, attention_fwd
from kernels.ffn import ffn_ref
from kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
from models import T5Config, T5ForConditionalGeneration

VOCAB = 96


def _op_inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    B, H, L, D = 2, 2, 40, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_() for _ in range(3))
    table = torch.randn(32, H, generator=g).requires_grad_()
    pad = torch.ones(B, L, dtype=torch.int32)
    pad[1, 29:] = 0
    seg = torch.cat([torch.ones(B, 25, dtype=torch.int32), 2 * torch.ones(B, 15, dtype=torch.int32)], 1) * pad
    pos = torch.cat([torch.arange(25), torch.arange(15)]).to(torch.int32).expand(B, L).contiguous()
    bidi = kind != "causal"
    buckets = attn._bucket_table(bidi, 32, 128, "cpu")
    rel = attn._relative_bias(table, buckets)
    masks = dict(pad=(None, None, None, pad, None), causal=(None, None, None, None, None),
                 packed=(pos, pos, seg, seg, None), cross=(None, None, None, pad, None))[kind]
    if kind == "cross":
        table = rel = buckets = None
    seed = torch.tensor([123], dtype=torch.int32) if kind == "pad" else None
    scalars = (32, 128, 1.0, 0, kind == "causal", False, 0.1 if kind == "pad" else 0.0)
    return (q, k, v, table, rel, buckets, *masks, seed, *scalars)


@pytest.mark.parametrize("kind", ["pad", "causal", "packed", "cross"])
def test_custom_ops_pass_opcheck(kind):
    args = _op_inputs(kind)
    torch.library.opcheck(attention_fwd, args)
    q, k, v, table, rel, buckets, *rest = args
    o, lse = attention_fwd(*args)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    bwd_args = (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, rel, buckets, *rest, table is not None)
    torch.library.opcheck(attention_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


def _explain(fn, *args):
    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args)
    return out.graph_count, out.graph_break_count, [str(b.reason)[:300] for b in out.break_reasons]


def _model(backend: str, dropout: float = 0.0):
    cfg = T5Config.from_preset("tiny").replace(vocab_size=VOCAB, kernel_backend=backend, dropout_rate=dropout)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(2, VOCAB, (2, 12), generator=g), torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                 # a padded row: the encoder's key padding mask reaches the kernel
    return ids, mask, labels


@pytest.fixture
def flash_attention_only(monkeypatch):
    """kernel_backend="triton" with the flash attention kernel and the references of RMSNorm and the FFN
    (their custom ops live in kernels/rms_norm.py and kernels/ffn.py, tested there)."""
    import models.backends as backends

    monkeypatch.setattr(backends, "TRITON", dataclasses.replace(
        backends.TRITON, rms_norm=rms_norm_ref, add_rms_norm=add_rms_norm_ref, ffn=ffn_ref))


def _loss_fn(model):
    return lambda i, m, l: model(input_ids=i, attention_mask=m, labels=l).loss


def test_model_with_torch_backend_is_one_graph():
    assert _explain(_loss_fn(_model("torch")), *_batch()) == (1, 0, [])


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_model_with_flash_attention_is_one_graph(flash_attention_only, dropout):
    attn._BUCKET_CACHE.clear()      # issue 13: an empty cache made torch.compile fail hard
    model = _model("triton", dropout)
    calls = []
    original = model.kernels

    def kernels(device):
        chosen = original(device)
        calls.append(chosen.attention)
        return chosen
    model.kernels = kernels
    assert _explain(_loss_fn(model), *_batch()) == (1, 0, [])
    assert calls and all(a is attn.t5_attention for a in calls)


def test_full_triton_model_is_one_graph():
    """Every kernel of the triton backend at once: needs RMSNorm and the FFN as custom ops too."""
    import kernels.ffn  # noqa: F401  (registers its ops, when it has them)
    import kernels.rms_norm  # noqa: F401
    if not (hasattr(torch.ops.t5forge, "rms_norm") and hasattr(torch.ops.t5forge, "ffn")):
        pytest.skip("kernels/rms_norm.py and kernels/ffn.py are not custom ops on this branch")
    assert _explain(_loss_fn(_model("triton")), *_batch()) == (1, 0, [])


def _loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_model_gives_the_eager_loss_and_gradients(flash_attention_only, backend):
    model, batch = _model(backend), _batch()
    eager = _loss_and_grads(model, _loss_fn(model), batch)
    torch._dynamo.reset()
    compiled = _loss_and_grads(model, torch.compile(_loss_fn(model), backend="aot_eager", fullgraph=True), batch)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    assert compiled[1].keys() == eager[1].keys()
    assert "shared.weight" in eager[1] and any("relative_attention_bias" in n for n in eager[1])
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
