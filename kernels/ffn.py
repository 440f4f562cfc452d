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

from ._ffn_kernels import (_ffn_up_kernel, _gate_bwd_kernel, _gate_fwd_kernel, _launch_tuned,  # noqa: F401
                           _prune_up_configs, m_bucket)   # (the tests reach the kernels through this module)
from ._triton_utils import check_device, is_interpreter, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("gelu_tanh", "relu")


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
