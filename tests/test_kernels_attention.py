"""kernels/t5_attention.py: the Triton flash kernel against the float64 reference.

Runs under TRITON_INTERPRET=1 (tests/conftest.py) on the CPU, or compiled on a GPU with
T5FORGE_COMPILED=1 (the `device` fixture then gives cuda). Every case checks the output, dq, dk, dv and the
bias-table gradient on fresh random inputs; the tolerance is "at most ~2x the error of PyTorch's own
computation in the same dtype" plus a small dtype floor (flash-attention's test habit, STYLE.md).
The parametrization covers every mask kind, both bucket directions, head dims 64 and 128, fp32/fp16 (and
bf16) and the ragged lengths 1, 17, 130 without a full cross product (the interpreter is slow).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from kernels import _t5_attention_launch as launch
from kernels import t5_attention as attn
from kernels.t5_attention import relative_position_bucket, t5_attention, t5_attention_ref

# Error floor relative to the reference's largest magnitude (absorbs summation-order noise where torch's
# own error happens to be ~0, e.g. length-1 rows).
_FLOOR = {torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@dataclass
class Case:
    id: str
    dtype: torch.dtype
    head_dim: int
    batch: int
    heads: int
    q_len: int
    kv_len: int
    kwargs: dict = field(default_factory=dict)
    bias: bool = True
    masks: str = ""            # "pad", "pad_empty", "prefix", "packed", "packed_pad", "packed_scrambled"
    table_dtype: torch.dtype | None = None
    bhld_layout: bool = False  # q/k/v as (B, L, H, D) storage viewed (B, H, L, D), as the model passes them


CASES = [
    # max_distance below the length: whole tiles lie beyond +-max_distance (the kernels' constant-bias loops)
    Case("enc-bidi-fp32-d64-det-md24", torch.float32, 64, 2, 2, 130, 130, dict(deterministic=True, max_distance=24),
         bhld_layout=True),
    Case("enc-bidi-pad-fp16-d128", torch.float16, 128, 2, 2, 17, 17, masks="pad_empty"),
    Case("dec-causal-uni-fp16-d64-md20", torch.float16, 64, 1, 2, 130, 130,
         dict(causal=True, bidirectional=False, max_distance=20), table_dtype=torch.float32),
    Case("enc-bidi-default-buckets-fp32-d64", torch.float32, 64, 1, 2, 130, 130, masks="pad"),
    Case("prefix-lm-fp32-d128-nb16", torch.float32, 128, 2, 1, 130, 130,
         dict(bidirectional=True, num_buckets=16, max_distance=40), masks="prefix"),
    Case("packed-enc-fp32-d64", torch.float32, 64, 2, 2, 130, 130, masks="packed_pad"),
    Case("packed-dec-causal-fp16-d64", torch.float16, 64, 2, 1, 130, 130, dict(causal=True, bidirectional=False),
         masks="packed"),
    # d = 128 with packing: dk/dv's diagonal / per-bucket loops at that head dim too
    Case("packed-dec-causal-fp16-d128", torch.float16, 128, 1, 1, 70, 70,
         dict(causal=True, bidirectional=False, max_distance=20), masks="packed"),
    # explicit positions in no particular order: dk/dv reduces the bias gradient bucket by bucket
    Case("packed-scrambled-positions-fp32-d64", torch.float32, 64, 2, 2, 70, 70, dict(max_distance=20),
         masks="packed_scrambled"),
    Case("cross-nobias-pad-fp32-d64", torch.float32, 64, 2, 2, 17, 130, dict(scale=0.125), bias=False,
         masks="pad_empty"),
    Case("len1-fp32-d64", torch.float32, 64, 2, 2, 1, 1),
    Case("decode-row-fp16-d64", torch.float16, 64, 2, 2, 1, 130,
         dict(causal=True, bidirectional=False, q_offset=129), masks="pad"),
    Case("uni-nocausal-fp32-d64-nb8", torch.float32, 64, 1, 2, 17, 17,
         dict(bidirectional=False, num_buckets=8, max_distance=10)),
    Case("bf16-bidi-pad-d64", torch.bfloat16, 64, 2, 2, 17, 17, masks="pad"),
]


def _packed(batch: int, length: int, gen: torch.Generator, pad: bool):
    """Segment ids 1..n per row (0 = padding tail when `pad`) and positions restarting in each segment."""
    seg = torch.zeros(batch, length, dtype=torch.long)
    pos = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        start, sid = 0, 1
        end = length - (int(torch.randint(1, length // 4, (1,), generator=gen)) if pad else 0)
        while start < end:
            n = min(int(torch.randint(1, 60, (1,), generator=gen)), end - start)
            seg[b, start:start + n] = sid
            pos[b, start:start + n] = torch.arange(n)
            start, sid = start + n, sid + 1
    return seg, pos


def _mask_kwargs(case: Case, gen: torch.Generator, device) -> dict:
    B, Lk = case.batch, case.kv_len
    out = {}
    if case.masks.startswith("pad"):
        kpm = torch.rand(B, Lk, generator=gen) > 0.3
        kpm[:, 0] = True
        if case.masks == "pad_empty":
            kpm[-1] = False                      # a batch row with no real key: every query row -> zeros
        out["key_padding_mask"] = kpm
    elif case.masks == "prefix":
        out["prefix_lengths"] = torch.tensor([0, 50][:B])
    elif case.masks.startswith("packed"):
        seg, pos = _packed(B, Lk, gen, pad=case.masks == "packed_pad")
        if case.masks == "packed_scrambled":   # positions that are not index - segment start (any order)
            pos = torch.randint(0, 40, pos.shape, generator=gen)
        out.update(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
        if case.masks == "packed_pad":
            out["key_padding_mask"] = seg != 0
    return {k: v.to(device) for k, v in out.items()}


def _make(case: Case, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D = case.batch, case.heads, case.q_len, case.kv_len, case.head_dim
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64) * 0.5
    k = torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64) * 0.5
    v = torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64)
    nb = case.kwargs.get("num_buckets", 32)
    table = torch.randn(nb, H, generator=gen, dtype=torch.float64) if case.bias else None
    do = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    return q, k, v, table, do, _mask_kwargs(case, gen, device)


def _leaves(q, k, v, table, dtype, table_dtype, device, bhld: bool = False):
    def leaf(t, dt):
        if bhld:   # (B, L, H, D) storage, viewed (B, H, L, D)
            return t.transpose(1, 2).contiguous().to(device, dt).transpose(1, 2).detach().requires_grad_()
        return t.detach().to(device, dt, copy=True).requires_grad_()
    out = [leaf(q, dtype), leaf(k, dtype), leaf(v, dtype)]
    out.append(None if table is None else table.detach().to(device, table_dtype, copy=True).requires_grad_())
    return out


def _run(fn, leaves, do, kwargs):
    o = fn(*leaves, **kwargs)
    o.backward(do.to(o.device, o.dtype))
    grads = [t.grad for t in leaves if t is not None]
    return [o] + grads


def _check(case_id, names, got, ref64, low, dtype):
    for name, g, r, lo in zip(names, got, ref64, low):
        assert torch.isfinite(g).all(), f"{case_id}: {name} has non-finite values"
        g, r, lo = g.double().cpu(), r.double().cpu(), lo.double().cpu()
        err = (g - r).abs().max().item()
        base = (lo - r).abs().max().item()
        bound = 2 * base + _FLOOR[dtype] * max(r.abs().max().item(), 1.0)
        assert err <= bound, f"{case_id}: {name} max error {err:.3e} > bound {bound:.3e} (torch {dtype}: {base:.3e})"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_float64_reference(case: Case, device):
    q, k, v, table, do, masks = _make(case, device)
    kwargs = {**case.kwargs, **masks}
    table_dtype = case.table_dtype or case.dtype
    got = _run(t5_attention, _leaves(q, k, v, table, case.dtype, table_dtype, device, case.bhld_layout), do, kwargs)
    ref64 = _run(t5_attention_ref, _leaves(q, k, v, table, torch.float64, torch.float64, device), do, kwargs)
    low = _run(t5_attention_ref, _leaves(q, k, v, table, case.dtype, table_dtype, device), do, kwargs)
    assert got[0].shape == ref64[0].shape and got[0].dtype == case.dtype
    if table is not None:
        assert got[4].dtype == table_dtype and got[4].shape == table.shape
    names = ["out", "dq", "dk", "dv", "dtable"]
    _check(case.id, names, got, ref64, low, case.dtype)
    if case.masks == "pad_empty":   # the batch row without keys: exact zeros, zero gradients
        assert got[0][-1].abs().max().item() == 0.0
        assert got[1][-1].abs().max().item() == 0.0


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=["keys-taller", "queries-taller"])
def test_non_square_tiles_match_reference(tiles, device, monkeypatch):
    """The GPU's dk/dv tile is 32 queries x 64 keys (non-square): the diagonal bias-gradient reduction and
    the loop bounds are checked with non-square tiles in every kernel too (the interpreter default is square)."""
    if device.type == "cuda":
        pytest.skip("compiled run: the real tiles are used")
    m, n = tiles
    monkeypatch.setattr(launch, "_blocks", lambda *_a: launch._Blocks(m, n, m, n, m, n, 1, 1, 1, 1))
    for case in (Case("pad-bidi", torch.float32, 64, 2, 2, 70, 70, dict(max_distance=24), masks="pad"),
                 Case("causal-offset", torch.float32, 64, 1, 2, 37, 70,
                      dict(causal=True, bidirectional=False, max_distance=20, q_offset=33))):
        q, k, v, table, do, masks = _make(case, device, seed=11)
        kwargs = {**case.kwargs, **masks}
        got = _run(t5_attention, _leaves(q, k, v, table, torch.float32, torch.float32, device), do, kwargs)
        ref64 = _run(t5_attention_ref, _leaves(q, k, v, table, torch.float64, torch.float64, device), do, kwargs)
        low = _run(t5_attention_ref, _leaves(q, k, v, table, torch.float32, torch.float32, device), do, kwargs)
        _check(f"{case.id}-{m}x{n}", ["out", "dq", "dk", "dv", "dtable"], got, ref64, low, torch.float32)


def test_deterministic_mode_is_bit_exact(device):
    case = Case("det", torch.float32, 64, 1, 2, 130, 130, dict(bidirectional=False), masks="packed_pad")
    q, k, v, table, do, masks = _make(case, device, seed=3)
    runs = [_run(t5_attention, _leaves(q, k, v, table, torch.float32, torch.float32, device), do,
                 {**case.kwargs, **masks, "deterministic": True}) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    fast = _run(t5_attention, _leaves(q, k, v, table, torch.float32, torch.float32, device), do,
                {**case.kwargs, **masks, "deterministic": False})
    torch.testing.assert_close(fast[4], runs[0][4], rtol=1e-5, atol=1e-5)


def test_decode_with_offset_matches_full_rows(device):
    """Incremental decoding: the last query rows against the whole cache equal those rows of the full pass."""
    # max_distance 20 < length: the early cache blocks lie entirely beyond it (constant-bias key loop).
    case = Case("dec", torch.float32, 64, 2, 2, 70, 70, dict(causal=True, bidirectional=False, max_distance=20))
    q, k, v, table, _, masks = _make(case, device, seed=5)
    q, k, v, table = (t.to(device, torch.float32) for t in (q, k, v, table))
    full = t5_attention(q, k, v, table, **case.kwargs)
    for start in (69, 60):   # a single step, and a block of 10 new rows
        part = t5_attention(q[:, :, start:], k, v, table, **case.kwargs, q_offset=start)
        torch.testing.assert_close(part, full[:, :, start:], rtol=1e-5, atol=1e-6)
        # The same step with a cache padded past the current length (unused slots masked).
        kpm = torch.ones(2, 78, dtype=torch.bool, device=device)
        kpm[:, 70:] = False
        kp = torch.cat([k, torch.randn_like(k[:, :, :8])], 2)
        vp = torch.cat([v, torch.randn_like(v[:, :, :8])], 2)
        padded = t5_attention(q[:, :, start:], kp, vp, table, **case.kwargs, q_offset=start, key_padding_mask=kpm)
        torch.testing.assert_close(padded, full[:, :, start:], rtol=1e-5, atol=1e-6)


def test_all_masked_rows_are_zero_without_nan(device):
    """Padding queries of packed rows (segment 0) see no key: zero output and zero gradients."""
    B, H, L, D = 1, 2, 17, 64
    q, k, v = (torch.randn(B, H, L, D, device=device, requires_grad=True) for _ in range(3))
    table = torch.randn(32, H, device=device, requires_grad=True)
    seg = torch.tensor([[1] * 9 + [2] * 4 + [0] * 4], device=device)
    o = t5_attention(q, k, v, table, q_segment_ids=seg, kv_segment_ids=seg)
    o.sum().backward()
    assert o[:, :, 13:].abs().max().item() == 0.0
    assert q.grad[:, :, 13:].abs().max().item() == 0.0
    assert k.grad[:, :, 13:].abs().max().item() == 0.0       # padding keys are never visible
    for t in (o, q.grad, k.grad, v.grad, table.grad):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance",
                         [(True, 32, 128), (False, 32, 128), (True, 8, 9), (False, 6, 200)])
def test_bucket_tables_match_reference_bucket_function(bidirectional, num_buckets, max_distance):
    """The kernel clamps relative positions to +-max_distance; the bucket must already saturate there."""
    bucket_lut = attn._bucket_table(bidirectional, num_buckets, max_distance, "cpu")
    rel = torch.arange(-4 * max_distance - 7, 4 * max_distance + 8)
    idx = rel.clamp(-max_distance, max_distance) + max_distance
    expected = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert bucket_lut.dtype == torch.int32 and torch.equal(bucket_lut.long()[idx], expected)


def test_relative_position_bucket_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    hf = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = torch.arange(-300, 301)
    for bidirectional in (True, False):
        expected = hf(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        assert torch.equal(relative_position_bucket(rel, bidirectional, 32, 128), expected)


@pytest.mark.parametrize("bad,match", [
    (dict(q_shape=(1, 2, 5, 48)), "head dim 48"),
    (dict(table_shape=(16, 2)), "bias_table has shape"),
    (dict(kw=dict(q_segment_ids=torch.ones(1, 5, dtype=torch.long))), "given together"),
    (dict(kw=dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool))), "key_padding_mask has shape"),
    (dict(kw=dict(num_buckets=2, max_distance=128), table_shape=(2, 2)), "not a valid T5 bucketing"),
    (dict(kw=dict(q_offset=-1)), "q_offset"),
    (dict(kw=dict(dropout_p=1.0, training=True)), "dropout_p"),
])
def test_bad_inputs_raise_one_line_errors(bad, match, device):
    q = torch.randn(*bad.get("q_shape", (1, 2, 5, 64)), device=device)
    k = torch.randn(1, 2, 5, q.shape[-1], device=device)
    table = torch.randn(*bad.get("table_shape", (32, 2)), device=device)
    kw = {key: val.to(device) if torch.is_tensor(val) else val for key, val in bad.get("kw", {}).items()}
    with pytest.raises(ValueError, match=match):
        t5_attention(q, k, k, table, **kw)


def test_attention_dropout_matches_reference_with_the_same_mask(device):
    """In-kernel dropout: forward and every gradient equal softmax(...) * Z @ v with the kernel's own mask Z
    (regenerated from the call's seed), Z keeps ~(1 - p) of the scores, and eval mode drops nothing."""
    case = Case("dropout", torch.float32, 64, 2, 2, 70, 70, dict(max_distance=24), masks="pad")
    q, k, v, table, do, masks = _make(case, device, seed=7)
    kwargs = {**case.kwargs, **masks}
    p = 0.3
    torch.manual_seed(123)
    got = _run(t5_attention, _leaves(q, k, v, table, torch.float32, torch.float32, device), do,
               {**kwargs, "dropout_p": p, "training": True})
    torch.manual_seed(123)
    seed = attn._draw_dropout_seed(2 * 2, device)
    scales = attn._dropout_scales(2, 2, 70, 70, seed, p, device).double()
    kept = (scales > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.02, kept
    assert torch.allclose(scales[scales > 0], torch.tensor(1 / (1 - p), dtype=torch.float64, device=device))

    def dropped_ref(q, k, v, table, **kw):
        bias = attn.compute_position_bias(table, 70, 70, bidirectional=True, max_distance=24)
        mask = attn.compute_attention_mask(70, 70, device=q.device, key_padding_mask=kw["key_padding_mask"])
        scores = (q @ k.transpose(-1, -2) + bias).masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, -1) * scales) @ v

    ref = _run(dropped_ref, _leaves(q, k, v, table, torch.float64, torch.float64, device), do, kwargs)
    for name, g, r in zip(["out", "dq", "dk", "dv", "dtable"], got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    evaluated = t5_attention(*_leaves(q, k, v, table, torch.float32, torch.float32, device), **kwargs,
                             dropout_p=p, training=False)
    plain = t5_attention(*_leaves(q, k, v, table, torch.float32, torch.float32, device), **kwargs)
    assert torch.equal(evaluated, plain)
