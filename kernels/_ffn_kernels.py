"""The Triton kernels of kernels/ffn.py (its docstring says what each computes): the elementwise gate forward
and backward, and the up-projection GEMM with its activation / gate epilogue, autotuned per bucket of
token counts. Host code, custom ops and references are in kernels/ffn.py."""
from __future__ import annotations

import torch

from ._triton_utils import cast_to, is_interpreter, tl, triton


@triton.jit
def _act(h, ACT_GELU: tl.constexpr):
    if ACT_GELU:
        # gelu_tanh(h) = 0.5 h (1 + tanh(u)) = h * sigmoid(2u),  u = sqrt(2/pi) (h + 0.044715 h^3)
        out = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    else:
        out = tl.maximum(h, 0.0)
    return out


@triton.jit
def _act_grad(h, ACT_GELU: tl.constexpr):
    if ACT_GELU:
        s = tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
        out = s + h * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * h * h)
    else:
        out = tl.where(h > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _gate_fwd_kernel(H, G, stride_h, stride_g, n_rows, n_cols, GATED: tl.constexpr, ACT_GELU: tl.constexpr,
                     RNE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # h row = [a | b] (2 * n_cols) when GATED, [a] otherwise; g = act(a) * b  or  act(a).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    h_ptrs = H + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    g = _act(tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32), ACT_GELU)
    if GATED:
        g = g * tl.load(h_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    g_ptrs = G + rows.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(g_ptrs, cast_to(g, G.dtype.element_ty, RNE_BF16), mask=mask)


@triton.jit
def _gate_bwd_kernel(H, DG, DH, G, stride_h, stride_dg, stride_dh, stride_g, n_rows, n_cols,
                     GATED: tl.constexpr, ACT_GELU: tl.constexpr, STORE_G: tl.constexpr,
                     RNE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Recomputes act(a) from the saved pre-activation instead of storing it in forward.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h_ptrs = H + rows64 * stride_h + cols[None, :]
    dh_ptrs = DH + rows64 * stride_dh + cols[None, :]
    a = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    dg = tl.load(DG + rows64 * stride_dg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act_a = _act(a, ACT_GELU)
    if GATED:
        b = tl.load(h_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptrs, cast_to(dg * b * _act_grad(a, ACT_GELU), DH.dtype.element_ty, RNE_BF16), mask=mask)
        tl.store(dh_ptrs + n_cols, cast_to(dg * act_a, DH.dtype.element_ty, RNE_BF16), mask=mask)
        g = act_a * b
    else:
        tl.store(dh_ptrs, cast_to(dg * _act_grad(a, ACT_GELU), DH.dtype.element_ty, RNE_BF16), mask=mask)
        g = act_a
    if STORE_G:
        tl.store(G + rows64 * stride_g + cols[None, :], cast_to(g, G.dtype.element_ty, RNE_BF16), mask=mask)


def _up_configs():
    if is_interpreter():  # one small config: the interpreter pays per program and per autotune trial
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    # BLOCK_N counts d_ff columns; the gated kernel holds two BLOCK_M x BLOCK_N accumulators.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (128, 64, 32, 4, 4)]]


def _prune_up_configs(configs, named_args, **_kwargs):
    """fp32 operands use FMA dots (no tensor cores without TF32): a BLOCK_K=64 tile larger than 64x64 spilled
    4-13 KB per thread and overflowed shared memory when compiled for sm_90 (tests/test_kernels_compile.py),
    so fp32 keeps only the tiles that do not."""
    if named_args["X"].dtype != torch.float32:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= 32 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or configs[:1]


def m_bucket(m: int) -> int:
    """Token counts tuned together (the autotune key): powers of two up to 2048, then multiples of 2048, so
    a new batch shape reuses a tuned tile instead of benchmarking again."""
    return 1 << max(0, (m - 1).bit_length()) if m <= 2048 else -(-m // 2048) * 2048


def _launch_tuned(kernel, grid, args: dict) -> None:
    """`kernel[grid](**args)`, except during CUDA-graph capture for a key never tuned: the autotuner's trial
    runs would be recorded into the graph, so the first (pruned) config runs instead. Warm up before capture
    to get the tuned tile. The key is the autotuner's own (key arguments, then every tensor's dtype)."""
    if args["X"].is_cuda and torch.cuda.is_current_stream_capturing():
        key = tuple(args[k] for k in kernel.keys) + tuple(str(v.dtype) for v in args.values() if hasattr(v, "dtype"))
        if key not in kernel.cache:
            cfg = _prune_up_configs(kernel.configs, args)[0]
            kernel.fn[grid](**args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
    kernel[grid](**args)


@triton.autotune(configs=_up_configs(), key=["M_BUCKET", "N", "K", "GATED", "BACKWARD", "STORE_H", "STORE_G"],
                 prune_configs_by={"early_config_prune": _prune_up_configs})
@triton.jit
def _ffn_up_kernel(X, W, G, H, DG, DH, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_gm, stride_hm, stride_dgm,
                   stride_dhm, GATED: tl.constexpr, ACT_GELU: tl.constexpr, BACKWARD: tl.constexpr,
                   STORE_G: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   RNE_BF16: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Program -> output tile, in bands of GROUP_M row tiles so that consecutive programs share weight tiles
    # in L2 (the weight is the large operand re-read by every row band).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    band_rows = tl.minimum(tiles_m - band * GROUP_M, GROUP_M)
    in_band = pid % (GROUP_M * tiles_n)
    pid_m = band * GROUP_M + in_band % band_rows
    pid_n = in_band // band_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = X + rm64[:, None] * stride_xm + rk[None, :]
    wa_ptrs = W + rn64[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N) tile of wi_0^T
    wb_ptrs = wa_ptrs + N * stride_wn  # the matching rows of wi_1 sit N rows below
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wa = tl.load(wa_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # bf16 tl.dot is wrong in the interpreter (docs/MACHINE_NOTES.md)
            x = x.to(tl.float32)
            wa = wa.to(tl.float32)
        acc_a = tl.dot(x, wa, acc_a, input_precision=DOT_PRECISION)
        if GATED:
            wb = tl.load(wb_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                wb = wb.to(tl.float32)
            acc_b = tl.dot(x, wb, acc_b, input_precision=DOT_PRECISION)
            wb_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        wa_ptrs += BLOCK_K

    mask = m_ok[:, None] & n_ok[None, :]
    # Epilogue addresses: an int64 tile base (scalar) plus int32 in-tile offsets. Per-element int64 offsets
    # cost two registers per element of each output tile: forward spilled 8-16 B/thread at 128-row tiles
    # (ptxas for sm_90, tests/test_kernels_compile.py), now 0. BLOCK_M * stride stays far below 2**31. The
    # gated backward epilogue (acc_a, acc_b, dg live at once) still spills ~300-500 B/thread except at 64x64.
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    tm = tl.arange(0, BLOCK_M)[:, None]
    act_a = _act(acc_a, ACT_GELU)
    if GATED:
        g = act_a * acc_b
    else:
        g = act_a
    if STORE_G:
        tl.store(G + row0 * stride_gm + (tm * stride_gm + rn[None, :]), cast_to(g, G.dtype.element_ty, RNE_BF16),
                 mask=mask)
    if BACKWARD:
        dg = tl.load(DG + row0 * stride_dgm + (tm * stride_dgm + rn[None, :]), mask=mask, other=0.0).to(tl.float32)
        dh_ptrs = DH + row0 * stride_dhm + (tm * stride_dhm + rn[None, :])
        if GATED:
            tl.store(dh_ptrs + N, cast_to(dg * act_a, DH.dtype.element_ty, RNE_BF16), mask=mask)
            da = dg * acc_b * _act_grad(acc_a, ACT_GELU)
            tl.store(dh_ptrs, cast_to(da, DH.dtype.element_ty, RNE_BF16), mask=mask)
        else:
            da = dg * _act_grad(acc_a, ACT_GELU)
            tl.store(dh_ptrs, cast_to(da, DH.dtype.element_ty, RNE_BF16), mask=mask)
    elif STORE_H:
        h_ptrs = H + row0 * stride_hm + (tm * stride_hm + rn[None, :])
        tl.store(h_ptrs, cast_to(acc_a, H.dtype.element_ty, RNE_BF16), mask=mask)
        if GATED:
            tl.store(h_ptrs + N, cast_to(acc_b, H.dtype.element_ty, RNE_BF16), mask=mask)
