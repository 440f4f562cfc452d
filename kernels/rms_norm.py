"""RMSNorm as T5 defines it ("T5LayerNorm"), and the fused residual-add variant.

T5 semantics (docs/T5.md): no mean subtraction, no bias, variance computed in fp32,
`x * rsqrt(mean(x^2) + eps)`, cast to the weight's dtype when that is half precision, then `* weight`.

Triton path (forward + backward, any leading shape, widths up to 65536, fp32 / fp16 / bf16):
- forward: a program normalises BLOCK_M whole rows held in registers; it saves only the fp32 inverse RMS
  per row for backward (no fp32 copy of x or x_hat).
- backward: a persistent grid of a FIXED number of programs per device; each walks its rows, writes dx and
  keeps its weight-gradient partial sum in registers, then stores ONE fp32 row. The partial rows are summed
  by a single `sum(0)` afterwards: no per-element atomics, no rows x width fp32 buffer, and the result does
  not depend on scheduling (deterministic).
- `add_rms_norm`: `s = x + residual` and `rms_norm(s)` in one pass, so the residual stream is read once;
  backward saves `s` (which is the next layer's residual anyway) instead of x and residual.
"""
from __future__ import annotations

import torch

from ._triton_utils import cast_to, check_device, is_interpreter, num_programs_persistent, tl, triton

_MAX_WIDTH = 65536  # one row must fit one program's registers (T5 widths are <= 4096)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, n_rows, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, HALF_WEIGHT: tl.constexpr, RNE_BF16: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # rows * stride can pass 2**31 for long sequences x wide rows
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the stream's dtype BEFORE normalising, exactly as `rms_norm(x + residual)` does.
        x = cast_to(x.to(tl.float32) + r.to(tl.float32), S.dtype.element_ty, RNE_BF16)
        tl.store(S + rows64 * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xf * rstd[:, None]
    if HALF_WEIGHT:  # T5 casts the normalised x to the half weight dtype before the multiply
        y = cast_to(y, W.dtype.element_ty, RNE_BF16).to(tl.float32)
    tl.store(Y + rows64 * stride_y + cols[None, :], cast_to(y * w[None, :], Y.dtype.element_ty, RNE_BF16), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DS, DX, DW_PARTIAL, stride_dy, stride_x, stride_ds, stride_dx,
                         n_rows, n_cols, HAS_DY: tl.constexpr, HAS_DS: tl.constexpr, HALF_WEIGHT: tl.constexpr,
                         RNE_BF16: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w;  dw = sum_rows dy * x_hat.
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(pid * BLOCK_M, n_rows, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_DY:
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            x_hat = x * rstd[:, None]
            if HALF_WEIGHT:  # the weight multiplied the rounded x_hat in forward
                dw_acc += dy * cast_to(x_hat, W.dtype.element_ty, RNE_BF16).to(tl.float32)
            else:
                dw_acc += dy * x_hat
            g = dy * w[None, :]
            c = tl.sum(g * x_hat, axis=1) / n_cols
            dx = (g - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DS:  # gradient reaching the residual stream s directly (add_rms_norm)
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], cast_to(dx, DX.dtype.element_ty, RNE_BF16), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------- launchers
def _block_shape(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows per program, ~4k elements per program on a GPU."""
    block_n = max(16, triton.next_power_of_2(n_cols))
    # The interpreter runs programs one by one in numpy: fewer, bigger programs are much faster there.
    target = 16384 if is_interpreter() else 4096
    block_m = max(1, min(64, target // block_n))
    num_warps = max(4, min(16, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()


def _check(name: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    check_device(f"rms_norm.py {name}", x, weight, *(() if residual is None else (residual,)))
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"kernels/rms_norm.py {name}: weight shape {tuple(weight.shape)} does not match the "
                         f"last dim of x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"kernels/rms_norm.py {name}: residual shape {tuple(residual.shape)} != x shape "
                         f"{tuple(x.shape)}")
    for t in (x, weight) + (() if residual is None else (residual,)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"kernels/rms_norm.py {name}: dtype {t.dtype} not supported (fp32/fp16/bf16)")
    if x.shape[-1] > _MAX_WIDTH:
        raise ValueError(f"kernels/rms_norm.py {name}: width {x.shape[-1]} > {_MAX_WIDTH} is not supported")


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float):
    """Returns (y, s or None, rstd) with y, s shaped like x and rstd (rows,) fp32."""
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=weight.dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _as_rows(residual, n_cols)
        s = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        r2, s = x2, None
    if n_rows > 0 and n_cols > 0:
        block_m, block_n, num_warps = _block_shape(n_cols)
        s_arg = s if s is not None else y  # unused when HAS_RESIDUAL is False
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2, weight, y, s_arg, rstd, x2.stride(0), r2.stride(0), y.stride(0), s_arg.stride(0),
            n_rows, n_cols, eps, HAS_RESIDUAL=residual is not None,
            HALF_WEIGHT=weight.dtype in (torch.float16, torch.bfloat16), RNE_BF16=is_interpreter(),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    shape = x.shape
    return y.view(shape), (None if s is None else s.view(shape)), rstd


def _rms_norm_bwd(dy: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  ds: torch.Tensor | None, dx_dtype: torch.dtype):
    """Returns (dx shaped like x, dw in weight dtype or None when dy is None)."""
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    n_rows = x2.shape[0]
    dy2 = _as_rows(dy, n_cols) if dy is not None else x2
    ds2 = _as_rows(ds, n_cols) if ds is not None else x2
    dx = torch.empty((n_rows, n_cols), dtype=dx_dtype, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return dx.view(x.shape), (torch.zeros_like(weight) if dy is not None else None)
    block_m, block_n, num_warps = _block_shape(n_cols)
    grid = _num_bwd_programs(x.device, triton.cdiv(n_rows, block_m))
    partial = torch.empty((grid, n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(grid,)](
        dy2, x2, weight, rstd, ds2, dx, partial, dy2.stride(0), x2.stride(0), ds2.stride(0), dx.stride(0),
        n_rows, n_cols, HAS_DY=dy is not None, HAS_DS=ds is not None,
        HALF_WEIGHT=weight.dtype in (torch.float16, torch.bfloat16), RNE_BF16=is_interpreter(),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    # One fixed-order reduction over `grid` fp32 rows (grid depends only on the device and the shape).
    dw = partial.sum(0).to(weight.dtype) if dy is not None else None
    return dx.view(x.shape), dw


def _num_bwd_programs(device: torch.device, row_blocks: int) -> int:
    return num_programs_persistent(device, row_blocks, per_sm=4)


# ------------------------------------------------------------------------------------ custom ops + autograd
# Registered PyTorch custom ops (torch.library) with fake implementations and registered autograd, so that
# torch.compile / torch._dynamo trace a model through them as single graph nodes (no graph break) and
# CUDA graphs capture them: the launchers allocate their outputs and cache nothing.
def _rows(x: torch.Tensor) -> int:
    n = 1
    for d in x.shape[:-1]:
        n = n * d
    return n


@torch.library.custom_op("t5forge::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): rstd (rows,) fp32 is what backward needs besides x and weight."""
    y, _, rstd = _rms_norm_fwd(x, weight, None, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=weight.dtype), x.new_empty((_rows(x),), dtype=torch.float32)


@torch.library.custom_op("t5forge::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd) with s = x + residual."""
    y, s, rstd = _rms_norm_fwd(x, weight, residual, eps)
    return y, s, rstd


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=weight.dtype), s, x.new_empty((_rows(x),), dtype=torch.float32)


@torch.library.custom_op("t5forge::rms_norm_backward", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     ds: torch.Tensor | None, dx_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); ds (the residual stream's own gradient) is added to dx when given."""
    return _rms_norm_bwd(dy, x, weight, rstd, ds, dx_dtype)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, ds, dx_dtype):
    return x.new_empty(x.shape, dtype=dx_dtype), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(dy, x, weight, rstd, None, x.dtype)
    return dx, (dw if ctx.needs_input_grad[1] else None), None


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, _ = inputs
    _, s, rstd = output
    # s is what the next layer adds to anyway: saving it costs nothing extra over x and residual.
    ctx.save_for_backward(s, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # an unused output should not cost a zero-filled gradient
    ctx.dtypes = (x.dtype, residual.dtype)


def _add_rms_norm_backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if dy is None and ds is None:
        return None, None, None, None
    if dy is None:
        d_s, dw = ds, None
    else:
        d_s, dw = _rms_norm_bwd_op(dy, s, weight, rstd, ds, s.dtype)
    # s = x + residual: both inputs receive d_s (AddBackward hands out one tensor twice as well).
    dx_dtype, dr_dtype = ctx.dtypes
    return (d_s.to(dx_dtype), d_s.to(dr_dtype), dw if ctx.needs_input_grad[2] else None, None)


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# -------------------------------------------------------------------------------------------- public
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton RMSNorm with T5 numerics; output dtype = weight dtype. Same semantics as `rms_norm_ref`."""
    _check("rms_norm", x, weight)
    return _rms_norm_op(x, weight, float(eps))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual; return rms_norm(s), s` in one pass over the residual stream."""
    _check("add_rms_norm", x, weight, residual)
    y, s, _ = _add_rms_norm_op(x, residual, weight, float(eps))
    return y, s


# ------------------------------------------------------------------------------------------ references
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch RMSNorm with T5's numerics (the model's "torch" backend)."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return weight * y


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual; return rms_norm(s), s` -- the pre-norm residual stream step."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s
