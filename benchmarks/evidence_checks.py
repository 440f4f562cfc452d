"""Part 2 of `t5forge bench gpu`: compiled correctness before any timing, so that a GPU-only bug shows first.

Every kernel against its `*_ref` on small ragged shapes in each low-precision dtype, outputs and all
gradients. The yardstick is the reference's own rounding: each kernel's error against the reference in
float64 may be at most 2x the error of the reference computed in the same low precision, plus one unit of
that dtype's rounding at the tensor's scale (the tolerance of the unit tests, tests/kernel_checks.py, with
float64 as truth). Then the model: t5-v1_1-small (tiny with --smoke) with padding in the batch, the Triton
backend against the torch backend, loss and every gradient.

On the GPU the kernels run compiled, never in the interpreter (the command refuses TRITON_INTERPRET there);
with --smoke on a CPU they run in the interpreter when TRITON_INTERPRET=1 was set before start, and are
reported as skipped otherwise.
"""
from __future__ import annotations

import torch

ATTENTION_VARIANTS = ("encoder_padding", "decoder_causal", "cross_padding", "packed", "decode_offset")


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(fn, inputs: list[torch.Tensor], grads_out: list[torch.Tensor] | None, kwargs: dict):
    """fn's outputs and the gradients of every floating input, with fixed upstream gradients."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = _as_list(fn(*leaves, **kwargs))
    grads_out = grads_out or [torch.randn_like(o, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad], grads_out


def compare(name: str, fast, ref, inputs: list[torch.Tensor], dtype: torch.dtype, kwargs: dict | None = None) -> dict:
    """One record: the worst tensor's kernel error, its allowance, and whether it passed."""
    kwargs = kwargs or {}
    truth, grads_out = _run(ref, [t.double() if t.is_floating_point() else t for t in inputs], None, kwargs)
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    lowp, _ = _run(ref, low, grads_out, kwargs)
    got, _ = _run(fast, low, grads_out, kwargs)
    worst = {"ratio": -1.0}
    for i, (t, l, g) in enumerate(zip(truth, lowp, got)):
        if g is None or t is None:
            return {"check": name, "dtype": _name(dtype), "pass": False, "error": f"tensor {i}: no gradient"}
        err = (g.double() - t).abs().max().item()
        allowed = 2 * (l.double() - t).abs().max().item() + torch.finfo(dtype).eps * max(1.0, t.abs().max().item())
        ratio = err / allowed if allowed > 0 else float("inf")
        if not ratio <= worst["ratio"]:   # NaN counts as the worst
            worst = {"ratio": ratio, "tensor": i, "max_err": err, "allowed": allowed}
    return {"check": name, "dtype": _name(dtype), "pass": bool(worst["ratio"] <= 1.0), **worst}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _attention_cases(device, small: bool) -> list[tuple[str, list, dict]]:
    """(variant, [q, k, v, table], kwargs) at ragged lengths, one per mask kind the model uses."""
    B, H, D = 2, 3, (16 if small else 64)
    L, Lk = (19, 13) if small else (77, 45)
    g = torch.Generator(device="cpu").manual_seed(0)

    def qkv(lq, lk):
        return [torch.randn(B, H, n, D, generator=g).mul(0.5).to(device) for n in (lq, lk, lk)]

    table = torch.randn(32, H, generator=g).to(device)
    pad = torch.ones(B, Lk, dtype=torch.bool, device=device)
    pad[1, Lk - 5:] = False
    self_pad = torch.ones(B, L, dtype=torch.bool, device=device)
    self_pad[0, L - 7:] = False
    seg = torch.tensor([[0] * (L // 2) + [1] * (L - L // 2), [0] * L], device=device)
    return [
        ("encoder_padding", qkv(L, L) + [table], {"key_padding_mask": self_pad}),
        ("decoder_causal", qkv(L, L) + [table], {"bidirectional": False, "causal": True}),
        ("cross_padding", qkv(L, Lk) + [None], {"key_padding_mask": pad}),
        ("packed", qkv(L, L) + [table], {"q_segment_ids": seg, "kv_segment_ids": seg}),
        ("decode_offset", qkv(1, L) + [table], {"bidirectional": False, "q_offset": L - 1}),
    ]


def kernel_checks(device: torch.device, dtypes: tuple[torch.dtype, ...], small: bool) -> list[dict]:
    from kernels import ffn as gf
    from kernels import rms_norm as rn
    from kernels import t5_attention as ta

    g = torch.Generator(device="cpu").manual_seed(1)
    rows, width, d_ff = (11, 40, 24) if small else (37, 200, 176)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g).mul(scale).to(device)

    x, r, w = rand(rows, width), rand(rows, width), rand(width).add(1.0)
    wi, wi1, wo = rand(2 * d_ff, width, scale=width ** -0.5), rand(d_ff, width, scale=width ** -0.5), \
        rand(width, d_ff, scale=d_ff ** -0.5)
    cases = [
        ("rms_norm", rn.rms_norm, rn.rms_norm_ref, [x, w], {}),
        ("add_rms_norm", rn.add_rms_norm, rn.add_rms_norm_ref, [x, r, w], {}),
        ("gelu_tanh_gate", gf.gelu_tanh_gate, gf.gelu_tanh_gate_ref, [rand(rows, 2 * d_ff)], {}),
        ("ffn_gated_gelu", gf.ffn, gf.ffn_ref, [x, wi, wo], {"gated": True, "activation": "gelu_tanh"}),
        ("ffn_relu", gf.ffn, gf.ffn_ref, [x, wi1, wo], {"gated": False, "activation": "relu"}),
    ]
    for variant, tensors, kwargs in _attention_cases(device, small):
        cases.append((f"t5_attention_{variant}", _with_table(ta.t5_attention, tensors[3]),
                      _with_table(ta.t5_attention_ref, tensors[3]), tensors[:3] + _table_input(tensors[3]), kwargs))
    records = []
    for dtype in dtypes:
        for name, fast, ref, inputs, kwargs in cases:
            try:
                records.append(compare(name, fast, ref, inputs, dtype, kwargs))
            except Exception as e:  # noqa: BLE001 -- a failing kernel is a result; the others still run
                records.append({"check": name, "dtype": _name(dtype), "pass": False,
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    return records


def _table_input(table):
    return [] if table is None else [table]


def _with_table(fn, table):
    """q, k, v[, table] positional: the bias table is an input whose gradient is checked too."""
    if table is None:
        return lambda q, k, v, **kw: fn(q, k, v, None, **kw)
    return lambda q, k, v, t, **kw: fn(q, k, v, t if q.dtype == torch.float64 else t.float(), **kw)


def model_check(device: torch.device, preset: str, dtype: torch.dtype) -> dict:
    """The whole model, Triton backend vs torch backend, same weights and padded batch: loss and gradients
    (worst relative difference of any gradient, by norm)."""
    from benchmarks.model_providers import make_batch
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config.from_preset(preset).replace(dropout_rate=0.0)
    batch = make_batch(cfg, 3, 45, 13, device)
    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    mask[1, 30:] = False
    batch["attention_mask"] = mask
    results = {}
    state = None
    for backend in ("torch", "triton"):
        model = T5ForConditionalGeneration(cfg.replace(kernel_backend=backend)).to(device)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        model = model.to(dtype)
        loss = model(**batch).loss
        loss.backward()
        results[backend] = (loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()})
    (l0, g0), (l1, g1) = results["torch"], results["triton"]
    grad_rel = max(((g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-30)).item() for n in g0)
    loss_rel = ((l1 - l0).abs() / l0.abs()).item()
    tol = {torch.float32: (1e-4, 1e-3)}.get(dtype, (2e-2, 5e-2))   # loss, gradient (relative)
    return {"check": f"model_{preset}_triton_vs_torch", "dtype": _name(dtype), "loss_torch": l0.item(),
            "loss_triton": l1.item(), "loss_rel_diff": loss_rel, "worst_grad_rel_diff": grad_rel,
            "tolerance": {"loss": tol[0], "grad": tol[1]},
            "pass": bool(loss_rel <= tol[0] and grad_rel <= tol[1])}


def run(device: torch.device, smoke: bool) -> dict:
    """Part 2's records, or why it could not run here."""
    from kernels._triton_utils import why_triton_cannot_run

    why = why_triton_cannot_run(device)
    if why:
        return {"status": "skipped", "reason": f"the Triton kernels cannot run here: {why}"}
    dtypes = (torch.bfloat16,) if smoke else (torch.bfloat16, torch.float16)
    records = kernel_checks(device, dtypes, small=smoke)
    preset = "tiny" if smoke else "t5-v1_1-small"
    for dtype in ((torch.float32,) if smoke else (torch.float32, torch.bfloat16)):
        try:
            records.append(model_check(device, preset, dtype))
        except Exception as e:  # noqa: BLE001
            records.append({"check": f"model_{preset}_triton_vs_torch", "dtype": _name(dtype), "pass": False,
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    failed = [f"{r['check']} ({r['dtype']})" for r in records if not r["pass"]]
    return {"status": "failed" if failed else "ok", "records": records, "failed": failed}
