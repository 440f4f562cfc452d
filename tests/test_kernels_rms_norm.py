"""Triton RMSNorm (kernels/rms_norm.py) against a float64 reference.

Runs under TRITON_INTERPRET=1 on the CPU (conftest); with T5FORGE_COMPILED=1 on a GPU the same tests run
the compiled kernels on CUDA. Tolerance: fp32 tight; fp16/bf16 at most ~2x the error of PyTorch's own
computation in that dtype (the reference run on the low-precision inputs).
"""
import pytest
import torch

from kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from tests.kernel_checks import assert_like_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _inputs(shape, dtype, w_dtype, device, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).mul(2.0).to(device=device, dtype=dtype)
    w = (1.0 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(device=device, dtype=w_dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 64, 200, 1000])
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 11)], ids=str)
def test_rms_norm_fwd_bwd_vs_fp64(lead, width, dtype, device):
    gen = torch.Generator().manual_seed(width * 31 + len(lead))
    x, w = _inputs(lead + (width,), dtype, dtype, device, gen)
    dy = torch.randn(lead + (width,), generator=gen, dtype=torch.float64).to(device)
    outs = {}
    for name, fn, cast in [("ours", rms_norm, dtype), ("torch", rms_norm_ref, dtype),
                           ("fp64", rms_norm_ref, torch.float64)]:
        xl, wl = _leaves(x.to(cast), w.to(cast))
        y = fn(xl, wl)
        y.backward(dy.to(y.dtype))
        outs[name] = (y, xl.grad, wl.grad)
    assert outs["ours"][0].dtype == outs["torch"][0].dtype == dtype
    assert outs["ours"][0].shape == x.shape
    for i, what in enumerate(["y", "dx", "dw"]):
        assert_like_torch(what, outs["ours"][i], outs["torch"][i], outs["fp64"][i], dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)], ids=str)
def test_rms_norm_mixed_dtypes_follow_t5(x_dtype, w_dtype, device):
    """Output dtype is the weight's; the half-weight cast happens before the multiply, as in T5LayerNorm."""
    gen = torch.Generator().manual_seed(3)
    x, w = _inputs((9, 96), x_dtype, w_dtype, device, gen)
    y, y_ref = rms_norm(x, w), rms_norm_ref(x, w)
    assert y.dtype == y_ref.dtype == (w_dtype if w_dtype != torch.float32 else torch.float32)
    y64 = rms_norm_ref(x.double(), w.double())
    assert_like_torch("y", y, y_ref, y64, w_dtype if w_dtype != torch.float32 else x_dtype)


def test_rms_norm_non_contiguous_rows(device):
    gen = torch.Generator().manual_seed(5)
    base, w = _inputs((10, 2, 72), torch.float32, torch.float32, device, gen)
    x = base[:, 1, :60]  # row stride 144, last dim contiguous, width 60 (not the storage width)
    torch.testing.assert_close(rms_norm(x, w[:60]), rms_norm_ref(x, w[:60]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,width", [(1, 1), (7, 200), (33, 1000)])
def test_add_rms_norm_vs_fp64(rows, width, dtype, device):
    """Both outputs used downstream: dx = dresidual = ds_direct + d(norm)/ds."""
    gen = torch.Generator().manual_seed(rows + width)
    x, w = _inputs((rows, width), dtype, dtype, device, gen)
    r = torch.randn(rows, width, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    dy = torch.randn(rows, width, generator=gen, dtype=torch.float64).to(device)
    ds = torch.randn(rows, width, generator=gen, dtype=torch.float64).to(device)
    outs = {}
    for name, fn, cast in [("ours", add_rms_norm, dtype), ("torch", add_rms_norm_ref, dtype),
                           ("fp64", add_rms_norm_ref, torch.float64)]:
        xl, rl, wl = _leaves(x.to(cast), r.to(cast), w.to(cast))
        y, s = fn(xl, rl, wl)
        torch.autograd.backward([y, s], [dy.to(y.dtype), ds.to(s.dtype)])
        outs[name] = (y, s, xl.grad, rl.grad, wl.grad)
    assert outs["ours"][1].dtype == dtype
    for i, what in enumerate(["y", "s", "dx", "dresidual", "dw"]):
        assert_like_torch(what, outs["ours"][i], outs["torch"][i], outs["fp64"][i], dtype)


@pytest.mark.parametrize("use", ["y", "s"])
def test_add_rms_norm_one_output_unused(use, device):
    gen = torch.Generator().manual_seed(11)
    x, w = _inputs((5, 48), torch.float32, torch.float32, device, gen)
    r = torch.randn(5, 48, generator=gen).to(device)
    grads = []
    for fn in (add_rms_norm, add_rms_norm_ref):
        xl, rl, wl = _leaves(x, r, w)
        y, s = fn(xl, rl, wl)
        ((y if use == "y" else s) * torch.arange(48.0, device=device)).sum().backward()
        grads.append((xl.grad, rl.grad, wl.grad))
    for ours, ref in zip(*grads):
        if ref is None:
            assert ours is None or not ours.abs().any()
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_large_eps_is_inside_the_rsqrt(fused, device):
    """eps = 0.5 ~ mean(x^2): `x * rsqrt(mean(x^2) + eps)` (T5) and `x / (sqrt(mean(x^2)) + eps)` differ by
    ~20% here, so both the kernel and the reference are held to the formula written out in float64."""
    gen = torch.Generator().manual_seed(21)
    x, w = _inputs((9, 40), torch.float32, torch.float32, device, gen)
    r = torch.randn(9, 40, generator=gen).to(device)
    dy = torch.randn(9, 40, generator=gen).to(device)

    def literal(x, w):
        return w * x * (x.pow(2).mean(-1, keepdim=True) + 0.5) ** -0.5

    s64 = (x.double() + r.double()) if fused else x.double()
    xl, wl = _leaves(s64, w.double())
    literal(xl, wl).backward(dy.double())
    for fn in (add_rms_norm, add_rms_norm_ref) if fused else (rms_norm, rms_norm_ref):
        leaves = _leaves(x, r, w) if fused else _leaves(x, w)
        y = fn(*leaves, eps=0.5)
        y = y[0] if fused else y
        y.backward(dy)
        torch.testing.assert_close(y.double(), literal(s64, w.double()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaves[0].grad.double(), xl.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaves[-1].grad.double(), wl.grad, rtol=1e-4, atol=1e-4)


def test_weight_grad_deterministic_and_multi_program(device):
    """Many rows per persistent program (the partial-sum loop runs several times): dW is bit-identical."""
    gen = torch.Generator().manual_seed(7)
    x, w = _inputs((1200, 64), torch.float16, torch.float16, device, gen)
    dy = torch.randn(1200, 64, generator=gen).to(device=device, dtype=torch.float16)
    grads = []
    for _ in range(2):
        xl, wl = _leaves(x, w)
        rms_norm(xl, wl).backward(dy)
        grads.append(wl.grad)
    assert torch.equal(grads[0], grads[1])
    x64, w64 = _leaves(x.double(), w.double())
    rms_norm_ref(x64, w64).backward(dy.double())
    xt, wt = _leaves(x, w)
    rms_norm_ref(xt, wt).backward(dy)
    assert_like_torch("dw", grads[0], wt.grad, w64.grad, torch.float16)


def test_saves_only_input_and_fp32_inverse_rms(device):
    x, w = _inputs((33, 200), torch.bfloat16, torch.bfloat16, device, torch.Generator().manual_seed(1))
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w)
    extra = [t for t in saved if t.data_ptr() not in (x.data_ptr(), w.data_ptr())]
    assert len(extra) == 1 and extra[0].shape == (33,) and extra[0].dtype == torch.float32


def test_bad_inputs_raise_one_line(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="kernels/rms_norm.py rms_norm: weight shape"):
        rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
        rms_norm(x.double(), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="residual shape"):
        add_rms_norm(x, x[:2], torch.ones(8, device=device))


def test_empty_rows(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


def test_benchmark_smoke(tmp_path):
    """The benchmark script's CPU smoke mode runs and writes its JSON (so it cannot rot unnoticed)."""
    from benchmarks.kernels import bench_rms_norm

    records = bench_rms_norm.run(smoke=True, out_dir=tmp_path)
    assert {r["provider"] for r in records} >= {"ours", "eager"}
    for r in records:
        assert set(r) >= {"kernel", "provider", "shape", "pass", "ms", "gbps", "peak_mem_mb"}
        assert r["ms"] > 0
    assert list(tmp_path.glob("*.json"))
