"""T5's feed-forward block: v1.0 `wo(relu(wi x))` and v1.1 gated-GELU `wo(gelu_tanh(wi_0 x) * wi_1 x)`.

The gated form keeps `wi_0` and `wi_1` as ONE concatenated weight `wi = cat([wi_0, wi_1], 0)` of shape
(2 * d_ff, d_model) so both projections run as a single matmul; checkpoints keep the Hugging Face names
and models/hf_checkpoint.py splits and merges them.

Triton path:
- `_ffn_up_kernel`: the up-projection `x @ wi.T` as a Triton matmul whose epilogue applies the activation
  (and the gate). For the gated form each program owns d_ff columns n and accumulates BOTH halves
  (wi_0 row n and wi_1 row n) from one x tile -- one GEMM over the concatenated weight -- so the gate sees
  `a` and `b` in registers and only `g = act(a) * b` (tokens x d_ff) is written. With BACKWARD=True the same
  kernel recomputes `a, b` and writes `dh = [dg * b * act'(a) | dg * act(a)]` and `g` instead.
- Two memory policies for backward, `recompute`:
  * False (default): the forward also stores the pre-activation h (tokens x 2 d_ff); backward rebuilds g
    and dh from h with one elementwise pass (GELU recomputed, never stored). Saved: x, h. (Plain ReLU
    saves g = relu(h) instead, which determines relu'(h) too.)
  * True: nothing but x is saved; backward re-runs the up GEMM with the gradient epilogue (one extra
    2*d_ff-wide GEMM, ~22% more FFN FLOPs) -- the [tokens, 2*d_ff] intermediate never reaches memory.
  Eager PyTorch saves x, h, gelu(a) and g: tokens x (d_model + 4 d_ff) elements vs d_model + 2 d_ff here.
- The down projection, dx, dwi and dwo are cuBLAS GEMMs (torch.matmul) inside the same custom op (torch.library,
  with fake implementations and registered autograd, so torch.compile traces the block as one node).
- `gelu_tanh_gate(h)`: the gate alone as a fused elementwise kernel (forward and backward, GELU recomputed
  in backward), for callers that keep their own GEMMs.
All math in fp32 (accumulators, activations); results rounded once to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import cast_to, check_device, is_interpreter, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("gelu_tanh", "relu")


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


# ----------------------------------------------------------------------------------------------- launchers
def _gate_blocks(n_cols: int) -> tuple[int, int, int]:
    block_n = min(1024, max(16, triton.next_power_of_2(n_cols)))
    block_m = max(1, (16384 if is_interpreter() else 4096) // block_n)
    return block_m, block_n, 4 if block_m * block_n <= 2048 else 8


def _gate_fwd(h: torch.Tensor, gated: bool, act_gelu: bool) -> torch.Tensor:
    n_rows, width = h.shape
    n_cols = width // 2 if gated else width
    g = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
    if g.numel():
        bm, bn, warps = _gate_blocks(n_cols)
        _gate_fwd_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
            h, g, h.stride(0), g.stride(0), n_rows, n_cols, GATED=gated, ACT_GELU=act_gelu, RNE_BF16=is_interpreter(),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return g


def _gate_bwd(h: torch.Tensor, dg: torch.Tensor, gated: bool, act_gelu: bool, store_g: bool):
    """(dh, g or None) from the saved pre-activation h and the gradient of g."""
    n_rows, width = h.shape
    n_cols = width // 2 if gated else width
    dh = torch.empty_like(h)
    g = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device) if store_g else None
    if dh.numel():
        bm, bn, warps = _gate_blocks(n_cols)
        g_arg = g if g is not None else dh
        _gate_bwd_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
            h, dg, dh, g_arg, h.stride(0), dg.stride(0), dh.stride(0), g_arg.stride(0), n_rows, n_cols,
            GATED=gated, ACT_GELU=act_gelu, STORE_G=store_g, RNE_BF16=is_interpreter(), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=warps)
    return dh, g


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting (full fp32 unless the user allowed TF32).
    if dtype == torch.float32 and not is_interpreter() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _ffn_up(x: torch.Tensor, wi: torch.Tensor, gated: bool, act_gelu: bool, *, store_h: bool = False,
            dg: torch.Tensor | None = None, store_g: bool = True):
    """The up GEMM with its epilogue. Forward (dg None): returns (g, h or None).
    Backward (dg given): recomputes a, b and returns (dh, g or None)."""
    m, k = x.shape
    n = wi.shape[0] // 2 if gated else wi.shape[0]
    backward = dg is not None
    store_g = store_g or not backward
    g = torch.empty((m, n), dtype=x.dtype, device=x.device) if store_g else None
    h = torch.empty((m, wi.shape[0]), dtype=x.dtype, device=x.device) if (store_h or backward) else None
    if m == 0 or n == 0:
        if h is not None:
            h.zero_()
        return (h, g) if backward else (g, h)
    g_arg = g if g is not None else h
    h_arg = h if h is not None else g
    dg_arg = dg if dg is not None else g_arg

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    # In backward the H buffer receives dh (same shape as h), so one tensor serves both roles.
    _launch_tuned(_ffn_up_kernel, grid, dict(
        X=x, W=wi, G=g_arg, H=h_arg, DG=dg_arg, DH=h_arg, M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=x.stride(0), stride_wn=wi.stride(0), stride_gm=g_arg.stride(0), stride_hm=h_arg.stride(0),
        stride_dgm=dg_arg.stride(0), stride_dhm=h_arg.stride(0), GATED=gated, ACT_GELU=act_gelu,
        BACKWARD=backward, STORE_G=store_g, STORE_H=store_h and not backward,
        UPCAST=x.dtype == torch.bfloat16 and is_interpreter(), DOT_PRECISION=_dot_precision(x.dtype),
        RNE_BF16=is_interpreter()))
    return (h, g) if backward else (g, h)


def _up_forward(x, wi, gated, act_gelu, recompute):
    """(g, what backward needs besides x: h, or None to recompute)."""
    if not gated and not act_gelu and not recompute:
        # Plain ReLU: g = relu(h) carries everything backward needs (relu(g) = g, g > 0 iff h > 0), so
        # save g itself instead of writing h.
        g, _ = _ffn_up(x, wi, gated, act_gelu, store_h=False)
        return g, g
    return _ffn_up(x, wi, gated, act_gelu, store_h=not recompute)


def _up_backward(x, wi, h, dg, gated, act_gelu, need_g):
    """dh (and g for dwo) from the saved h, or by re-running the up GEMM when h was not kept."""
    if h is not None:
        return _gate_bwd(h, dg, gated, act_gelu, store_g=need_g)
    return _ffn_up(x, wi, gated, act_gelu, dg=dg, store_g=need_g)


# ------------------------------------------------------------------------------------ custom ops + autograd
# torch.library custom ops with fake implementations and registered autograd: torch.compile traces them as
# single graph nodes. A tensor backward does not need travels as an empty (0,) placeholder (a custom op
# returns tensors only); plain ReLU without recompute saves g as h (see _up_forward).
def _relu_saves_g(gated: bool, act_gelu: bool, recompute: bool) -> bool:
    return not gated and not act_gelu and not recompute


def _fake_h(x2, wi, recompute):
    # h is (tokens, wi rows) whenever it is kept: [a | b], the pre-activation, or (ReLU) g of that width.
    return x2.new_empty(0) if recompute else x2.new_empty((x2.shape[0], wi.shape[0]))


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("t5forge::gelu_tanh_gate", mutates_args=())
def _gate_op(h2: torch.Tensor) -> torch.Tensor:
    return _gate_fwd(h2, True, True)


@_gate_op.register_fake
def _(h2):
    return h2.new_empty((h2.shape[0], h2.shape[1] // 2))


@torch.library.custom_op("t5forge::gelu_tanh_gate_backward", mutates_args=())
def _gate_bwd_op(h2: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
    return _gate_bwd(h2, dg.contiguous(), True, True, store_g=False)[0]


@_gate_bwd_op.register_fake
def _(h2, dg):
    return torch.empty_like(h2)


@torch.library.custom_op("t5forge::ffn_up", mutates_args=())
def _ffn_up_op(x2: torch.Tensor, wi: torch.Tensor, gated: bool, act_gelu: bool,
               recompute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (g = act(x wi_0^T) * (x wi_1^T), h or a placeholder); used when dropout sits between g and wo."""
    g, h = _up_forward(x2, wi, gated, act_gelu, recompute)
    return g, _or_empty(None if h is g else h, x2)


@_ffn_up_op.register_fake
def _(x2, wi, gated, act_gelu, recompute):
    g = x2.new_empty((x2.shape[0], wi.shape[0] // 2 if gated else wi.shape[0]))
    return g, (x2.new_empty(0) if _relu_saves_g(gated, act_gelu, recompute) else _fake_h(x2, wi, recompute))


@torch.library.custom_op("t5forge::ffn", mutates_args=())
def _ffn_op(x2: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, gated: bool, act_gelu: bool,
            recompute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole block x -> (y, h or a placeholder); g is not kept (rebuilt in backward)."""
    g, h = _up_forward(x2, wi, gated, act_gelu, recompute)
    return torch.matmul(g.to(wo.dtype), wo.t()), _or_empty(h, x2)


@_ffn_op.register_fake
def _(x2, wi, wo, gated, act_gelu, recompute):
    return x2.new_empty((x2.shape[0], wo.shape[0]), dtype=wo.dtype), _fake_h(x2, wi, recompute)


@torch.library.custom_op("t5forge::ffn_backward", mutates_args=())
def _ffn_bwd_op(dy: torch.Tensor, x2: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor | None, h: torch.Tensor | None,
                gated: bool, act_gelu: bool, need_dx: bool, need_dwi: bool,
                need_dwo: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dwi, dwo), placeholders where not needed. wo None: dy is the gradient of g (ffn_up)."""
    dg = torch.matmul(dy, wo).to(x2.dtype) if wo is not None else dy.contiguous()
    dh, g = _up_backward(x2, wi, h, dg, gated, act_gelu, need_g=need_dwo)
    dwo = torch.matmul(dy.t(), g.to(dy.dtype)) if need_dwo else None
    dx = torch.matmul(dh, wi) if need_dx else None
    dwi = torch.matmul(dh.t(), x2) if need_dwi else None
    return _or_empty(dx, x2), _or_empty(dwi, x2), _or_empty(dwo, dy)


@_ffn_bwd_op.register_fake
def _(dy, x2, wi, wo, h, gated, act_gelu, need_dx, need_dwi, need_dwo):
    dwo = dy.new_empty((dy.shape[1], wi.shape[0] // 2 if gated else wi.shape[0])) if need_dwo else dy.new_empty(0)
    return (x2.new_empty(x2.shape) if need_dx else x2.new_empty(0),
            x2.new_empty(wi.shape) if need_dwi else x2.new_empty(0), dwo)


def _setup_gate(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward_gate(ctx, dg):
    return _gate_bwd_op(ctx.saved_tensors[0], dg)


def _setup_up(ctx, inputs, output):
    x2, wi, gated, act_gelu, recompute = inputs
    g, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x2, wi, g if _relu_saves_g(gated, act_gelu, recompute) else h)
    ctx.flags = (gated, act_gelu, recompute)


def _backward_up(ctx, dg, _dh):
    x2, wi, h = ctx.saved_tensors
    gated, act_gelu, recompute = ctx.flags
    need = ctx.needs_input_grad
    dx, dwi, _ = _ffn_bwd_op(dg, x2, wi, None, None if recompute else h, gated, act_gelu, need[0], need[1], False)
    return (dx if need[0] else None), (dwi if need[1] else None), None, None, None


def _setup_ffn(ctx, inputs, output):
    x2, wi, wo, gated, act_gelu, recompute = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x2, wi, wo, output[1])
    ctx.flags = (gated, act_gelu, recompute)


def _backward_ffn(ctx, dy, _dh):
    x2, wi, wo, h = ctx.saved_tensors
    gated, act_gelu, recompute = ctx.flags
    need = ctx.needs_input_grad
    dx, dwi, dwo = _ffn_bwd_op(dy, x2, wi, wo, None if recompute else h, gated, act_gelu, *need[:3])
    return (dx if need[0] else None), (dwi if need[1] else None), (dwo if need[2] else None), None, None, None


_gate_op.register_autograd(_backward_gate, setup_context=_setup_gate)
_ffn_up_op.register_autograd(_backward_up, setup_context=_setup_up)
_ffn_op.register_autograd(_backward_ffn, setup_context=_setup_ffn)


# -------------------------------------------------------------------------------------------- public
def _check_activation(activation: str) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"kernels/ffn.py: unknown FFN activation {activation!r}; expected one of "
                         f"{_ACTIVATIONS}")
    return activation == "gelu_tanh"


def gelu_tanh_gate(h: torch.Tensor) -> torch.Tensor:
    """Fused `gelu_tanh(a) * b` for `h = [a | b]` (last dim 2 * d_ff); backward recomputes the GELU."""
    check_device("ffn.py gelu_tanh_gate", h)
    if h.shape[-1] % 2 or h.dtype not in _DTYPES:
        raise ValueError(f"kernels/ffn.py gelu_tanh_gate: need an even last dim and fp32/fp16/bf16, got "
                         f"shape {tuple(h.shape)} dtype {h.dtype}")
    h2 = h.reshape(-1, h.shape[-1])
    if h2.numel() and h2.stride(-1) != 1:
        h2 = h2.contiguous()
    return _gate_op(h2).view(*h.shape[:-1], h.shape[-1] // 2)


def ffn(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, *, gated: bool, activation: str = "gelu_tanh",
        dropout_p: float = 0.0, training: bool = False, recompute: bool = False) -> torch.Tensor:
    """Triton FFN block, same semantics as `ffn_ref`. `recompute=True` keeps only x for backward and
    re-runs the up GEMM there (least memory); the default keeps the pre-activation h (no extra GEMM)."""
    act_gelu = _check_activation(activation)
    check_device("ffn.py ffn", x, wi, wo)
    if torch.is_autocast_enabled(x.device.type):  # mirror F.linear under autocast
        dtype = torch.get_autocast_dtype(x.device.type)
        x, wi, wo = x.to(dtype), wi.to(dtype), wo.to(dtype)
    d_model = x.shape[-1]
    d_ff = wi.shape[0] // 2 if gated else wi.shape[0]
    if wi.dim() != 2 or wi.shape[1] != d_model or (gated and wi.shape[0] % 2) or wo.dim() != 2 \
            or wo.shape[1] != d_ff:
        raise ValueError(f"kernels/ffn.py ffn: shapes x {tuple(x.shape)}, wi {tuple(wi.shape)}, wo "
                         f"{tuple(wo.shape)} do not fit gated={gated} (wi: (2*d_ff if gated else d_ff, "
                         f"d_model), wo: (d_model, d_ff))")
    if x.dtype != wi.dtype or x.dtype not in _DTYPES or wo.dtype not in _DTYPES:
        raise ValueError(f"kernels/ffn.py ffn: x dtype {x.dtype} must equal wi dtype {wi.dtype} "
                         "(fp32/fp16/bf16), as for F.linear")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"kernels/ffn.py ffn: dropout_p must be in [0, 1), got {dropout_p}")
    x2 = x.reshape(-1, d_model)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    wi, wo = wi.contiguous(), wo.contiguous()
    if dropout_p > 0.0 and training:
        # Same RNG call on the same (tokens, d_ff) shape as ffn_ref, so a shared seed gives the same mask.
        g = _ffn_up_op(x2, wi, gated, act_gelu, recompute)[0]
        y = F.linear(F.dropout(g, p=dropout_p, training=True).to(wo.dtype), wo)
    else:
        y = _ffn_op(x2, wi, wo, gated, act_gelu, recompute)[0]
    return y.view(*x.shape[:-1], wo.shape[0])


# ------------------------------------------------------------------------------------------ references
def _act_ref(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"unknown FFN activation {activation!r}; expected 'gelu_tanh' or 'relu'")


def gelu_tanh_gate_ref(h: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(a) * b` for `h = [a | b]` split in halves along the last dim."""
    a, b = h.chunk(2, dim=-1)
    return F.gelu(a, approximate="tanh") * b


def ffn_ref(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, *, gated: bool,
            activation: str = "gelu_tanh", dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Plain-PyTorch FFN (the model's "torch" backend). Dropout sits before `wo`, as in Hugging Face."""
    h = F.linear(x, wi)
    if gated:
        a, b = h.chunk(2, dim=-1)
        h = _act_ref(a, activation) * b
    else:
        h = _act_ref(h, activation)
    if dropout_p > 0.0 and training:
        h = F.dropout(h, p=dropout_p, training=True)
    return F.linear(h.to(wo.dtype), wo)
