"""Every Triton kernel reads and writes only inside its tensors (kernels/rms_norm.py, ffn.py,
t5_attention.py).

A mask off by one (`cols <= n_cols`) is invisible to a value comparison under TRITON_INTERPRET=1: the
interpreter runs one program after another, so the stray store into the next row is overwritten by that
row's own store, and only the last row's store lands past the end of the buffer -- on a GPU the same store
is a race. So here:
- every buffer a kernel module allocates (its outputs, the saved tensors, the gradients, scratch buffers) is
  a window in the middle of a larger buffer whose guard elements before and after hold a NaN bit pattern;
  after forward and backward the guards must be bit-for-bit untouched;
- the inputs are views inside NaN-filled buffers (NaN rows above and below, NaN columns on both sides, so the
  row stride is not the width; weights as windows inside NaN storage): a read past an edge poisons a result;
- the results must match the same kernels on plain contiguous inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels.ffn as gated_ffn_mod
import kernels.rms_norm as rms_norm_mod
import kernels._t5_attention_launch as attention_launch_mod
import kernels.t5_attention as attention_mod

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

# NaN bit patterns with a payload no arithmetic produces (a computed NaN is 0x7fc00000 or carries an input's).
_GUARD_BITS = {1: (torch.uint8, 0xA5), 2: (torch.int16, 0x7FE5), 4: (torch.int32, 0x7FE5A5A5),
               8: (torch.int64, 0x7FFCA5A5A5A5A5A5)}


class GuardedTorch:
    """Stands in for `torch` inside a kernel module: empty / empty_like / zeros / zeros_like return a window
    (same shape, dtype and strides as torch would give) inside a larger buffer with guard elements before
    and after it; `check()` asserts that no guard element changed."""

    def __init__(self):
        self.buffers = []  # (buffer, guard length, window length, shape)

    def __getattr__(self, name):
        return getattr(torch, name)

    def _window(self, shape, dtype, device, strides=None):
        numel = math.prod(shape)
        guard = max(64, numel)
        buf = torch.empty(numel + 2 * guard, dtype=dtype, device=device)
        int_dtype, bits = _GUARD_BITS[buf.element_size()]
        buf.view(int_dtype).fill_(bits)
        self.buffers.append((buf, guard, numel, tuple(shape)))
        flat = buf[guard:guard + numel]
        return flat.view(shape) if strides is None else flat.as_strided(shape, strides)

    @staticmethod
    def _shape(size):
        return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size

    def empty(self, *size, dtype=None, device=None):
        return self._window(self._shape(size), dtype or torch.get_default_dtype(), device)

    def zeros(self, *size, dtype=None, device=None):
        return self.empty(*size, dtype=dtype, device=device).zero_()

    def empty_like(self, t, *, dtype=None, device=None):
        strides = torch.empty_like(t, dtype=dtype, device="meta").stride()  # the layout torch would choose
        return self._window(t.shape, dtype or t.dtype, device or t.device, strides)

    def zeros_like(self, t, *, dtype=None, device=None):
        return self.empty_like(t, dtype=dtype, device=device).zero_()

    def check(self):
        assert self.buffers, "no buffer was allocated through the guarded torch"
        for buf, guard, numel, shape in self.buffers:
            int_dtype, bits = _GUARD_BITS[buf.element_size()]
            raw = buf.view(int_dtype).cpu()
            for where, part, start in (("before", raw[:guard], 0), ("after", raw[guard + numel:], guard + numel)):
                changed = (part != bits).nonzero()
                assert not changed.numel(), (
                    f"a kernel wrote {changed.numel()} element(s) {where} its {buf.dtype} buffer of shape {shape} "
                    f"(first at window offset {int(changed[0]) + start - guard})")


@pytest.fixture
def guarded(monkeypatch):
    fake = GuardedTorch()
    for module in (rms_norm_mod, gated_ffn_mod, attention_mod, attention_launch_mod):  # every allocating module
        monkeypatch.setattr(module, "torch", fake)
    return fake


def _nan_rows(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """A 2-D tensor as a view inside a NaN-filled buffer: one NaN row above and below, `pad` NaN columns on
    each side (row stride = width + 2 * pad, storage offset > 0)."""
    rows, cols = t.shape
    buf = torch.full((rows + 2, cols + 2 * pad), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[1:rows + 1, pad:pad + cols]
    view.copy_(t)
    return view


def _nan_window(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor inside NaN storage (`.contiguous()` keeps it; reads past either end see NaN)."""
    guard = max(64, t.numel())
    buf = torch.full((t.numel() + 2 * guard,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[guard:guard + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _run(fn, inputs, grads_out, wrap):
    """Outputs and input gradients of fn; `wrap` (a NaN view maker per input, or None) places the inputs."""
    leaves = [(w(t) if w is not None else t.clone()).requires_grad_() for t, w in zip(inputs, wrap)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), list(grads_out))
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _compare(fn, inputs, grads_out, wrap, guarded, dtype):
    """Plain contiguous run first (its buffers are guarded too), then the NaN-surrounded views."""
    plain = _run(fn, inputs, grads_out, [None] * len(inputs))
    views = _run(fn, inputs, [_nan_rows(g) if g.dim() == 2 else g for g in grads_out], wrap)
    guarded.check()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for i, (a, b) in enumerate(zip(views, plain)):
        assert torch.isfinite(a).all(), f"result {i} reads a NaN guard"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"result {i}: {m}")


def _rand(*shape, dtype, device, gen, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(37, 200), (3, 1)])
def test_rms_norm_stays_inside(rows, width, dtype, guarded, device):
    gen = torch.Generator().manual_seed(rows + width)
    x = _rand(rows, width, dtype=dtype, device=device, gen=gen, scale=2.0)
    w = 1.0 + 0.5 * _rand(width, dtype=dtype, device=device, gen=gen)
    dy = _rand(rows, width, dtype=dtype, device=device, gen=gen)
    _compare(rms_norm_mod.rms_norm, [x, w], [dy], [_nan_rows, _nan_window], guarded, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_stays_inside(dtype, guarded, device):
    gen = torch.Generator().manual_seed(5)
    x, r = (_rand(37, 200, dtype=dtype, device=device, gen=gen) for _ in range(2))
    w = 1.0 + 0.5 * _rand(200, dtype=dtype, device=device, gen=gen)
    dy, ds = (_rand(37, 200, dtype=dtype, device=device, gen=gen) for _ in range(2))
    _compare(rms_norm_mod.add_rms_norm, [x, r, w], [dy, ds], [_nan_rows, _nan_rows, _nan_window], guarded, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,d_ff", [(37, 50), (3, 1100)])  # 1100: two column programs, the second ragged
def test_gelu_tanh_gate_stays_inside(rows, d_ff, dtype, guarded, device):
    gen = torch.Generator().manual_seed(rows + d_ff)
    h = _rand(rows, 2 * d_ff, dtype=dtype, device=device, gen=gen, scale=2.0)
    dg = _rand(rows, d_ff, dtype=dtype, device=device, gen=gen)
    _compare(gated_ffn_mod.gelu_tanh_gate, [h], [dg], [_nan_rows], guarded, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recompute", [False, True], ids=["save_h", "recompute"])
@pytest.mark.parametrize("gated,activation", [(True, "gelu_tanh"), (False, "relu"), (False, "gelu_tanh")])
def test_ffn_stays_inside(gated, activation, recompute, dtype, guarded, device):
    tokens, d_model, d_ff = 37, 40, 50  # none a multiple of the 32-wide interpreter tiles
    gen = torch.Generator().manual_seed(int(gated) + 2 * int(recompute))
    x = _rand(tokens, d_model, dtype=dtype, device=device, gen=gen)
    wi = _rand((2 if gated else 1) * d_ff, d_model, dtype=dtype, device=device, gen=gen, scale=d_model ** -0.5)
    wo = _rand(d_model, d_ff, dtype=dtype, device=device, gen=gen, scale=d_ff ** -0.5)
    dy = _rand(tokens, d_model, dtype=dtype, device=device, gen=gen)

    def fn(x, wi, wo):
        return gated_ffn_mod.ffn(x, wi, wo, gated=gated, activation=activation, recompute=recompute)

    _compare(fn, [x, wi, wo], [dy], [_nan_rows, _nan_window, _nan_window], guarded, dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_bias_grad", "deterministic"])
def test_t5_attention_stays_inside(deterministic, guarded, device):
    B, H, L, D = 1, 2, 17, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (_rand(B, H, L, D, dtype=torch.float32, device=device, gen=gen, scale=0.5) for _ in range(4))
    table = _rand(32, H, dtype=torch.float32, device=device, gen=gen)

    def in_nan(t):  # (B, H, L, D) as a view of NaN-padded (B, L + 2, H, D + 16) storage
        buf = torch.full((B, L + 2, H, D + 16), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[:, 1:L + 1, :, 8:8 + D].transpose(1, 2)
        view.copy_(t)
        return view

    def fn(q, k, v, table):
        return attention_mod.t5_attention(q, k, v, table, deterministic=deterministic)

    _compare(fn, [q, k, v, table], [do], [in_nan, in_nan, in_nan, _nan_window], guarded, torch.float32)
