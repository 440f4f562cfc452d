"""The one-token decoder step under torch.compile (`generate(..., compile_step=True)`): one graph per
(rows, max_length, encoder length), replayed as a CUDA graph on a GPU.

    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=64, compile_step=True)

`compile_step` (models/generation_config.py) picks how the step is compiled; the torch.compile modes trace
with `fullgraph=True, dynamic=False` (no graph break, no dynamic shapes: a change of shape is a new graph):

| value               | what runs the steps after the first                                          | device |
|---------------------|------------------------------------------------------------------------------|--------|
| `True`              | `"reduce-overhead"` on CUDA, `"aot_eager"` elsewhere                         | any    |
| `"reduce-overhead"` | torch.compile `mode="reduce-overhead"`: inductor's code + CUDA graphs         | CUDA   |
| `"cuda-graph"`      | no torch.compile: the eager step captured once as a `torch.cuda.CUDAGraph`    | CUDA   |
| `"aot_eager"`       | torch.compile `backend="aot_eager"`: the functionalised graph, run eagerly    | any    |
| `"eager"`           | torch.compile `backend="eager"`: dynamo's capture only                        | any    |

How (`CompiledStep`): the cache is a whole-buffer `StaticCache` (every step the same shapes; the position a
device tensor, models/kv_cache.py). The first step of a sequence runs eagerly: the first time it allocates
the K/V buffers (in the dtype the projections produce) and computes the cross-attention K/V, later times
(after `reset`) it recomputes those into the same tensors. Every further step calls the compiled function.
The buffers, the position, the tokens fed, the encoder output and its mask are marked static addresses
(`torch._dynamo.mark_static_address`): a CUDA graph reads and writes them in place, with no copy per replay.
Beam reordering (`StaticCache.reorder`) runs eagerly between steps and copies rows within those same
buffers, so the graph's addresses stay valid. The logits are copied out of the graph's output (a CUDA graph
overwrites its outputs on the next replay). "cuda-graph" captures the same eager step directly
(`CompiledStep.graph_step`); dynamo's own "cudagraphs" backend is not offered: it treats only parameters as
static and skips CUDA graphs for a graph that writes its inputs (the cache) in place.

Kernels (`decode_kernels`, `step_kernels`): "model" runs the model's own choice (config.kernel_backend:
the Triton kernels on CUDA), "reference" the PyTorch references (SDPA over the materialised bias + mask,
RMSNorm and the FFN as torch ops), "sdpa-attention" the model's kernels except attention, which is the
reference (the question whether the flash kernel, built for long sequences, pays at one query per step).
"auto" (default): "reference" for a compiled step (inductor fuses the torch ops itself; dynamo cannot
trace the Triton kernels under the interpreter, so that variant is untested on CPU), "model" for an eager
step. benchmarks/decode_bench.py measures every choice on a GPU (rows static, static-sdpa, static-torch,
compiled-*, compiled-*-triton); the defaults change when those numbers say so. A sequence's eager first
step runs the same kernels as the graph.

A `CompiledStep` (buffers + compiled function) is kept per model and key (rows, max_length, encoder length,
dtype, mask or not, device, mode, kernels) and reused by later `generate` calls: a new sequence copies its encoder
output into the static one and resets the cache, and the graph (and a CUDA graph's recording) is reused.
Each key compiles its own copy of the step function (its own code object), so dynamo's recompile limit
(per code object) counts per key, and a key never recompiles; at most `MAX_KEYS` keys are kept per model
(least recently used dropped). One `generate` at a time uses a key's buffers (a second one is an error).
"""
from __future__ import annotations

import collections
import dataclasses
import types
import weakref

import torch

from .backends import REFERENCE, Kernels
from .generation_config import COMPILE_MODES as MODES
from .generation_config import DECODE_KERNELS
from .kv_cache import StaticCache

CUDA_ONLY = ("reduce-overhead", "cuda-graph")
MAX_KEYS = 8
_ENTRIES: "weakref.WeakKeyDictionary[torch.nn.Module, collections.OrderedDict]" = weakref.WeakKeyDictionary()


def resolve_mode(compile_step: bool | str, device: torch.device) -> str | None:
    """The compile mode for `compile_step` on `device` (None: not compiled); an error for a CUDA-only one."""
    if compile_step is False:
        return None
    mode = ("reduce-overhead" if device.type == "cuda" else "aot_eager") if compile_step is True else compile_step
    if mode not in MODES:
        raise ValueError(f"generate(): compile_step={compile_step!r}: expected true, false or one of {MODES}")
    if mode in CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"generate(): compile_step={compile_step!r} needs a CUDA device (CUDA graphs); "
                         f"the inputs are on {device} (compile_step=True picks 'aot_eager' there)")
    return mode


def step_kernels(model, choice: str, device: torch.device, compiled: bool) -> Kernels | None:
    """The kernels a decode step runs for `decode_kernels=choice` (module doc); None: the model's own."""
    if choice not in DECODE_KERNELS:
        raise ValueError(f"generate(): decode_kernels={choice!r}: expected one of {DECODE_KERNELS}")
    if choice == "auto":
        choice = "reference" if compiled else "model"
    if choice == "reference":
        return REFERENCE
    if choice == "sdpa-attention":
        return dataclasses.replace(model.kernels(device), attention=None)
    return None


def compile_kwargs(mode: str) -> dict:
    base = dict(fullgraph=True, dynamic=False)
    if mode == "reduce-overhead":
        return dict(base, mode="reduce-overhead")
    return dict(base, backend=mode)


def _decode_step(model, tokens: torch.Tensor, encoder_hidden: torch.Tensor, attention_mask, cache, kernels):
    """What is compiled: one decoder step over a whole-buffer static cache, next-token logits (N, V)."""
    logits, _ = model.decode_step(tokens, encoder_hidden, attention_mask, cache, kernels=kernels)
    return logits[:, -1]


def _own_copy(fn):
    """`fn` with its own code object: dynamo keeps graphs (and counts recompiles) per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledStep:
    """Static buffers and the compiled step for one key (module doc)."""

    def __init__(self, model, mode: str, rows: int, max_length: int, encoder_hidden: torch.Tensor,
                 attention_mask: torch.Tensor | None, kernels: str = "auto"):
        self._model, self.mode = weakref.ref(model), mode   # (a strong one would keep the model's entry alive)
        self.kernels = step_kernels(model, kernels, encoder_hidden.device, compiled=True)
        self.encoder_hidden = torch.empty_like(encoder_hidden)
        self.attention_mask = None if attention_mask is None else torch.empty_like(attention_mask)
        self.cache = StaticCache(model.config, rows, max_length, encoder_hidden.device, full_length=True)
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=encoder_hidden.device)
        self.fn = None if mode == "cuda-graph" else torch.compile(_own_copy(_decode_step), **compile_kwargs(mode))
        self.graph, self.graph_logits = None, None   # "cuda-graph": the captured step and its output
        self.marked = False     # static addresses marked (after the first step allocated the buffers)
        self.busy = False
        self.first = True       # the next step is a sequence's first (eager)
        self.compiled_calls = 0

    @property
    def model(self):
        return self._model()

    def begin(self, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if self.busy:
            raise RuntimeError("generate(compile_step=...): this model's compiled decode step for these shapes "
                               "is in use by another generate (one at a time)")
        self.busy, self.first = True, True
        self.encoder_hidden.copy_(encoder_hidden)
        if attention_mask is not None:
            self.attention_mask.copy_(attention_mask)
        self.cache.reset()

    def end(self) -> None:
        self.busy = False

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)  # (a search's tokens are a strided column: one layout for the graph)
        tokens = self.tokens
        if self.first:
            logits = self.eager(tokens)
            self.first = False
            if not self.marked:
                for t in (*self.cache.tensors(), self.tokens, self.encoder_hidden, self.attention_mask):
                    if t is not None:
                        torch._dynamo.mark_static_address(t)
                self.marked = True
            return logits
        self.compiled_calls += 1
        if self.mode == "cuda-graph":
            return self.graph_step(tokens)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(self.model, tokens, self.encoder_hidden, self.attention_mask, self.cache,
                       self.kernels).clone()

    def eager(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model.decode_step(tokens, self.encoder_hidden, self.attention_mask, self.cache,
                                           kernels=self.kernels)
        return logits[:, -1]

    def graph_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """"cuda-graph": the first call runs this step eagerly on a side stream (the warm-up a capture needs)
        and then captures the step, which records kernels without running them: every later call replays
        the next step. All inputs are the static buffers, so a replay reads this step's tokens and position."""
        if self.graph is None:
            logits = _warm_up(self.eager, tokens)
            self.graph, self.graph_logits = _capture(self.eager, tokens)
            return logits
        self.graph.replay()
        return self.graph_logits.clone()


def _warm_up(fn, tokens: torch.Tensor) -> torch.Tensor:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(tokens)
    torch.cuda.current_stream().wait_stream(stream)
    return out


def _capture(fn, tokens: torch.Tensor):
    """(graph, its output) for `fn(tokens)`: recorded into a CUDA graph, not run."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(tokens)
    return graph, out


def compiled_step(model, mode: str, rows: int, max_length: int, encoder_hidden: torch.Tensor,
                  attention_mask: torch.Tensor | None, kernels: str = "auto") -> CompiledStep:
    """The model's `CompiledStep` for these shapes (made on first use, then reused), ready for a sequence."""
    key = (rows, max_length, tuple(encoder_hidden.shape[1:]), encoder_hidden.dtype, str(encoder_hidden.device),
           None if attention_mask is None else attention_mask.dtype, mode, kernels, model.training)
    entries = _ENTRIES.setdefault(model, collections.OrderedDict())
    entry = entries.pop(key, None) or CompiledStep(model, mode, rows, max_length, encoder_hidden, attention_mask,
                                                   kernels)
    entries[key] = entry  # most recently used last
    while len(entries) > MAX_KEYS:
        entries.popitem(last=False)
    entry.begin(encoder_hidden, attention_mask)
    return entry


def entries(model) -> list[CompiledStep]:
    """The model's kept compiled steps (tests, benchmarks)."""
    return list(_ENTRIES.get(model, {}).values())


def clear(model=None) -> None:
    """Drop the kept compiled steps (of one model, or all)."""
    if model is None:
        _ENTRIES.clear()
    else:
        _ENTRIES.pop(model, None)
