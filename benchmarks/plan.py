"""`t5forge plan`: will this preset train on that cluster, and under which ZeRO stage?

    t5forge plan --preset t5-11b --gpus-per-node 8 --nodes 4
    t5forge plan --preset t5-v1_1-xxl --gpus-per-node 8 --micro-batch 4 --checkpointing --json

Per GPU memory = model states + activations + a fixed reserve.

Model states come from DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs`,
`estimate_zero2_model_states_mem_needs`), fed with parameter counts computed from the config alone, so
the 11B model is never built. Stages 0 and 1 have no DeepSpeed estimator; they use the same byte
accounting as its stage-2 estimator (2 B bf16 params + 2 B bf16 grads + 4 B fp32 grads + 4 B fp32
master + 8 B Adam moments = 20 B/param, the last 16 partitioned from stage 1 on).

Activations are the bytes autograd saves for backward in one micro-batch, counted term by term from the
model's structure (`activation_bytes` documents every term), plus the largest transient buffer of the
backward pass. `tests/test_bench_plan.py` checks the count against the bytes actually saved by the
model's torch path on the CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------------
# Parameters, without building the model
# ----------------------------------------------------------------------------------------------------

def _is_gated(cfg) -> bool:
    return str(cfg.feed_forward_proj).startswith("gated")


def param_inventory(cfg) -> dict[str, int]:
    """Parameters per module (the unit ZeRO-3 gathers), named as in models/t5.py.

    Works on any object with the Hugging Face T5 field names (ours or transformers'). Fused modules count
    as one: the gated FFN's `wi_0 | wi_1` (`wi_fused`, the largest layer of several presets), self-attention's
    `q | k | v` (`qkv`) and cross-attention's `k | v` (`kv`).
    """
    d, inner, dff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    dec_layers = cfg.num_decoder_layers if cfg.num_decoder_layers is not None else cfg.num_layers
    bias = cfg.relative_attention_num_buckets * cfg.num_heads
    ffn = {"DenseReluDense.wi_fused": 2 * dff * d} if _is_gated(cfg) else {"DenseReluDense.wi": dff * d}
    ffn["DenseReluDense.wo"] = dff * d
    inv = {"shared": cfg.vocab_size * d}
    for stack, n_layers, cross in (("encoder", cfg.num_layers, False), ("decoder", dec_layers, True)):
        for i in range(n_layers):
            prefix = f"{stack}.block.{i}.layer"
            inv[f"{prefix}.0.SelfAttention.qkv"] = 3 * d * inner
            inv[f"{prefix}.0.SelfAttention.o"] = d * inner
            if i == 0:
                inv[f"{prefix}.0.SelfAttention.relative_attention_bias"] = bias
            inv[f"{prefix}.0.layer_norm"] = d
            ffn_index = 1
            if cross:
                inv[f"{prefix}.1.EncDecAttention.q"] = d * inner
                inv[f"{prefix}.1.EncDecAttention.kv"] = 2 * d * inner
                inv[f"{prefix}.1.EncDecAttention.o"] = d * inner
                inv[f"{prefix}.1.layer_norm"] = d
                ffn_index = 2
            for name, n in ffn.items():
                inv[f"{prefix}.{ffn_index}.{name}"] = n
            inv[f"{prefix}.{ffn_index}.layer_norm"] = d
        inv[f"{stack}.final_layer_norm"] = d
    if not cfg.tie_word_embeddings:
        inv["lm_head"] = cfg.vocab_size * d
    return inv


def count_params(cfg) -> tuple[int, int]:
    """(total parameters, largest single module) -- the two numbers DeepSpeed's estimators take."""
    inv = param_inventory(cfg)
    return sum(inv.values()), max(inv.values())


# ----------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ActivationProfile:
    """What each sub-layer of models/t5.py saves for backward under one kernel backend.

    Checked against the bytes the model really saves (tests/test_bench_plan.py, `torch-cpu`); the
    other profiles follow the same model code with the documented behaviour of the kernel underneath.
    """

    name: str
    # RMSNorm, bytes per d_model element besides its output (which the next matmul saves). torch keeps
    # the input (b), its fp32 copy for pow (4, none in fp32) and the normalised pre-weight value (b);
    # the Triton kernel keeps the input only. Both keep an fp32 rstd per row.
    norm_extra_per_el: float
    # Biased self-attention: bytes per element of each of q, k, v as saved (CPU SDPA's math path keeps
    # fp32 copies), how many (B, L, inner) tensors of the output are kept (the o-projection input, plus
    # the kernel's own output for flash-style backward), fp32 scores per (query, head, key) (math path
    # only), an fp32 log-sum-exp per (query, head) (flash-style), and the materialised bias (1, H, Lq, Lk)
    # kept once per stack (CUDA SDPA's memory-efficient path takes it as an input with a gradient).
    qkv_bytes: float
    out_tensors: int
    scores_bytes: float
    lse: bool
    bias_per_stack: bool
    bucket_indices: bool  # the (1, Lq, Lk) int64 bucket index of the bias-table gather
    # Gated FFN hidden widths kept, in units of d_ff: torch keeps h=[a|b] (2), gelu(a) (1), product (1);
    # the fused gate keeps h (2) and the product (1). The relu FFN keeps its output (1) either way.
    gated_ffn_widths: int


PROFILES = ("triton", "torch-cuda", "torch-cpu")


def _profile(backend: str, b: int) -> ActivationProfile:
    torch_norm = b + b + (4 if b != 4 else 0)
    if backend == "torch-cpu":
        return ActivationProfile(backend, torch_norm, qkv_bytes=4, out_tensors=1, scores_bytes=4, lse=False,
                                 bias_per_stack=False, bucket_indices=True, gated_ffn_widths=4)
    if backend == "torch-cuda":
        return ActivationProfile(backend, torch_norm, qkv_bytes=b, out_tensors=2, scores_bytes=0, lse=True,
                                 bias_per_stack=True, bucket_indices=True, gated_ffn_widths=4)
    if backend == "triton":
        return ActivationProfile(backend, b, qkv_bytes=b, out_tensors=2, scores_bytes=0, lse=True,
                                 bias_per_stack=False, bucket_indices=False, gated_ffn_widths=3)
    raise ValueError(f"benchmarks/plan.py: unknown kernel profile {backend!r}; one of {', '.join(PROFILES)}")


def activation_bytes(cfg, micro_batch: int, inputs_length: int, targets_length: int, *,
                     checkpointing: bool = False, backend: str = "triton", bytes_per_el: int = 2,
                     loss_in_fp32: bool = True) -> dict[str, int]:
    """Bytes of one micro-batch's activations, by term. Dropout is taken as 0 (T5 v1.1 pretraining).

    Per token and layer (b = bytes per element, d = d_model, i = heads * d_kv, f = d_ff, H = heads):
      norm        b*d (output, saved by the next matmul) + norm_extra*d + 4 (fp32 rstd per row)
      self-attn   3*qkv_bytes*i + out_tensors*b*i + scores_bytes*H*Lk (+ 4*H lse when flash-style)
      cross-attn  no bias, so every backend is flash-style: q, output, o input (3*b*i) + 4*H lse per
                  target token, and K, V (2*b*i) per encoder token and layer
      FFN         relu: b*f;  gated: gated_ffn_widths * b * f
    Per stack: the bias-table gather's int64 bucket index (8 B per query-key pair, batch independent) or
    the materialised bias (b*H per pair); the int64 token ids. Once: the encoder output read by every
    cross-attention and the decoder output fed to the head (each a final norm).
    Loss: fp32 log-softmax over the vocabulary (4*V per target token) as models/t5.py casts logits up.
    Checkpointing keeps each block's input, which models/t5.py carries as two tensors (stream, pending
    residual delta: 2*b*d per token; the first block has no delta yet), and recomputes one block at a time, so the largest block comes back
    as a transient during backward. The other transient: the logits' gradient in fp32 plus its bf16
    copy, (4 + b)*V per target token. The larger of the two is the transient term.
    """
    if micro_batch < 1 or inputs_length < 1 or targets_length < 1:
        raise ValueError("benchmarks/plan.py: --micro-batch and the lengths must be positive")
    p, b = _profile(backend, bytes_per_el), bytes_per_el
    d, i, f, heads = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_heads
    dec_layers = cfg.num_decoder_layers if cfg.num_decoder_layers is not None else cfg.num_layers
    B, Li, Lt, V = micro_batch, inputs_length, targets_length, cfg.vocab_size

    def norm(tokens):
        return tokens * ((b + p.norm_extra_per_el) * d + 4)

    def self_attn(tokens, k_len):
        return tokens * (3 * p.qkv_bytes * i + p.out_tensors * b * i + p.scores_bytes * heads * k_len
                         + (4 * heads if p.lse else 0))

    def cross_attn(tokens, enc_tokens):
        return tokens * (3 * b * i + 4 * heads) + enc_tokens * 2 * b * i

    ffn_width = (p.gated_ffn_widths if _is_gated(cfg) else 1) * f

    def ffn(tokens):
        return tokens * b * ffn_width

    enc_tokens, dec_tokens = B * Li, B * Lt
    enc_block = 2 * norm(enc_tokens) + self_attn(enc_tokens, Li) + ffn(enc_tokens)
    dec_block = (3 * norm(dec_tokens) + self_attn(dec_tokens, Lt) + cross_attn(dec_tokens, enc_tokens)
                 + ffn(dec_tokens))
    pairs = Li * Li + Lt * Lt
    stacks = (8 * pairs if p.bucket_indices else 0) + (b * heads * pairs if p.bias_per_stack else 0)
    stacks += 8 * (enc_tokens + dec_tokens) + norm(enc_tokens) + norm(dec_tokens)
    loss = dec_tokens * (4 * V if loss_in_fp32 else b * V)
    if checkpointing:
        # The first block of a stack has no pending delta yet: one tensor there, two everywhere else.
        blocks = b * d * (enc_tokens * (2 * cfg.num_layers - 1) + dec_tokens * (2 * dec_layers - 1))
        recompute = max(enc_block, dec_block)
    else:
        blocks = enc_block * cfg.num_layers + dec_block * dec_layers
        recompute = 0
    saved = blocks + stacks + loss
    transient = max(recompute, dec_tokens * (4 + b) * V)
    return {"blocks": blocks, "stacks": stacks, "loss": loss, "saved": saved, "transient": transient,
            "total": saved + transient}


# ----------------------------------------------------------------------------------------------------
# ZeRO model states
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StateOption:
    name: str
    stage: int
    offload_optimizer: bool
    offload_param: bool
    gpu_bytes: int
    host_bytes_per_node: int
    source: str


def zero_options(total: int, largest: int, gpus_per_node: int, nodes: int,
                 buffer_factor: float = 1.5) -> list[StateOption]:
    """Model-state memory per GPU and host memory per node for every ZeRO stage / offload choice."""
    # Imported here: DeepSpeed takes a second or two to import and `plan --help` should not pay for it.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n_gpus = gpus_per_node * nodes
    derived = "derived (DeepSpeed's stage-2 byte accounting; no estimator for this stage)"
    opts = [StateOption("ZeRO-0 (DDP)", 0, False, False, 20 * total, 0, derived),
            StateOption("ZeRO-1", 1, False, False, 4 * total + 16 * total // n_gpus, 0, derived)]
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload,
                                                         additional_buffer_factor=buffer_factor)
        opts.append(StateOption("ZeRO-2" + (" + offload optimizer" if offload else ""), 2, offload, False,
                                gpu, cpu if offload else 0, "deepspeed estimate_zero2_model_states_mem_needs"))
    for offload, offload_param in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload_param,
            zero_init=True, additional_buffer_factor=buffer_factor)
        name = "ZeRO-3" + (" + offload optimizer" if offload else "") + (" + params" if offload_param else "")
        # Without offload the estimator's host figure is the zero.Init staging buffer, not a steady cost.
        opts.append(StateOption(name, 3, offload, offload_param, gpu, cpu,
                                "deepspeed estimate_zero3_model_states_mem_needs"))
    return opts


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------

def load_config(preset: str):
    from models.config import T5Config

    try:
        return T5Config.from_preset(preset)
    except (KeyError, ValueError) as e:
        raise ValueError(f"benchmarks/plan.py: --preset {preset!r}: {e}") from None


def make_plan(cfg, preset: str, *, gpus_per_node: int, nodes: int, micro_batch: int, inputs_length: int,
              targets_length: int, checkpointing: bool, gpu_memory_gb: float, host_memory_gb: float,
              reserve_gb: float = 3.0, backend: str = "triton", buffer_factor: float = 1.5) -> dict:
    for flag, value in (("--gpus-per-node", gpus_per_node), ("--nodes", nodes), ("--micro-batch", micro_batch),
                        ("--inputs-length", inputs_length), ("--targets-length", targets_length)):
        if value < 1:
            raise ValueError(f"benchmarks/plan.py: {flag} must be >= 1, got {value}")
    for flag, value in (("--gpu-memory-gb", gpu_memory_gb), ("--host-memory-gb", host_memory_gb)):
        if not value > 0:  # also NaN
            raise ValueError(f"benchmarks/plan.py: {flag} must be > 0 GiB, got {value:g}")
    if not 0 <= reserve_gb < gpu_memory_gb:
        raise ValueError(f"benchmarks/plan.py: --reserve-gb must be >= 0 and below --gpu-memory-gb "
                         f"({gpu_memory_gb:g}), got {reserve_gb:g}")
    total, largest = count_params(cfg)
    act = activation_bytes(cfg, micro_batch, inputs_length, targets_length, checkpointing=checkpointing,
                           backend=backend)
    gpu_limit, host_limit = gpu_memory_gb * GIB, host_memory_gb * GIB
    rows = []
    for opt in zero_options(total, largest, gpus_per_node, nodes, buffer_factor):
        gpu_total = opt.gpu_bytes + act["total"] + reserve_gb * GIB
        rows.append({**dataclasses.asdict(opt), "activation_bytes": act["total"], "gpu_total_bytes": int(gpu_total),
                     "fits_gpu": gpu_total <= gpu_limit, "fits_host": opt.host_bytes_per_node <= host_limit,
                     "fits": gpu_total <= gpu_limit and opt.host_bytes_per_node <= host_limit})
    # The fastest that fits: less partitioning and no offload means less communication and no PCIe.
    fitting = [r for r in rows if r["fits"]]
    best = min(fitting, key=lambda r: (r["offload_param"], r["offload_optimizer"], r["stage"]), default=None)
    return {"preset": preset, "total_params": total, "largest_layer_params": largest,
            "gpus_per_node": gpus_per_node, "nodes": nodes, "micro_batch": micro_batch,
            "inputs_length": inputs_length, "targets_length": targets_length, "checkpointing": checkpointing,
            "kernel_backend": backend, "gpu_memory_gb": gpu_memory_gb, "host_memory_gb": host_memory_gb,
            "reserve_gb": reserve_gb, "buffer_factor": buffer_factor, "activations": act, "options": rows,
            "recommended": best["name"] if best else None}


def format_plan(plan: dict) -> str:
    g = lambda n: f"{n / GIB:8.1f}"  # noqa: E731
    act = plan["activations"]
    lines = [
        f"{plan['preset']}: {plan['total_params'] / 1e9:.2f}B parameters, largest layer "
        f"{plan['largest_layer_params'] / 1e6:.1f}M; {plan['nodes']} node(s) x {plan['gpus_per_node']} GPU(s) "
        f"of {plan['gpu_memory_gb']:g} GiB, {plan['host_memory_gb']:g} GiB host RAM per node",
        f"activations per GPU: micro-batch {plan['micro_batch']} x {plan['inputs_length']}/{plan['targets_length']}"
        f" tokens, checkpointing {'on' if plan['checkpointing'] else 'off'}, {plan['kernel_backend']} kernels: "
        f"{act['saved'] / GIB:.1f} GiB saved + {act['transient'] / GIB:.1f} GiB transient; "
        f"reserve {plan['reserve_gb']:g} GiB (CUDA context, workspaces, fragmentation)",
        "",
        f"{'configuration':<36}{'states GiB':>10}{'GPU total':>10}{'host/node':>10}  fits",
        "-" * 72,
    ]
    for r in plan["options"]:
        verdict = "yes" if r["fits"] else ("no (GPU)" if not r["fits_gpu"] else "no (host)")
        lines.append(f"{r['name']:<36}{g(r['gpu_bytes']):>10}{g(r['gpu_total_bytes']):>10}"
                     f"{g(r['host_bytes_per_node']):>10}  {verdict}")
    lines += ["", f"recommended: {plan['recommended'] or 'nothing fits; add GPUs, checkpointing or offload'}",
              "model states: DeepSpeed estimators (ZeRO-2/3, buffer factor "
              f"{plan['buffer_factor']:g}); ZeRO-0/1 derived from the same byte accounting"]
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="t5forge plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, help="a T5Config preset, e.g. t5-11b or t5-v1_1-xxl")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--inputs-length", type=int, default=512)
    ap.add_argument("--targets-length", type=int, default=114)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    ap.add_argument("--host-memory-gb", type=float, default=1024.0, help="host RAM per node in GiB")
    ap.add_argument("--reserve-gb", type=float, default=3.0, help="per-GPU memory kept out of the budget")
    ap.add_argument("--kernels", choices=PROFILES, default="triton",
                    help="kernel backend whose activations are counted")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.preset)
        plan = make_plan(cfg, args.preset, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                         micro_batch=args.micro_batch, inputs_length=args.inputs_length,
                         targets_length=args.targets_length, checkpointing=args.checkpointing,
                         gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb,
                         reserve_gb=args.reserve_gb, backend=args.kernels)
    except ValueError as e:
        from engine.errors import report

        return report("plan", e)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def measure_saved_bytes(loss_fn, model: "torch.nn.Module | None" = None) -> int:
    """Bytes autograd saves for backward while `loss_fn()` runs, each storage counted once.

    Parameters (saved by every matmul) are not activations and are excluded. The backward pass is run
    afterwards so the graph is freed the normal way; gradients it leaves are the caller's to clear.
    """
    import torch

    param_storages = set()
    if model is not None:
        param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in param_storages and t.device.type != "meta":
            storages[ptr] = max(storages.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())
