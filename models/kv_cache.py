"""The decoder's key/value caches: the static cache (preallocated, written in place) and the list of
per-layer tuples that grows by `torch.cat` (the "dynamic" cache, also what `forward(use_cache=True)` returns).

    cache = StaticCache(model.config, rows=B * beams, max_length=64, device="cpu")
    logits, cache = model.decode_step(tokens, encoder_hidden, mask, cache)   # same object, one position on
    cache.reorder(beam_index)                                                # beam search, in place

Static cache: per decoder layer, self-attention K and V buffers (rows, H, max_length, D) allocated once; a
step writes its new K/V at the cache's position with `index_copy_` (the position is a device tensor, advanced
in place). On CUDA (`full_length`) a step attends over the whole buffer, the unwritten tail hidden by the
causal rule (keys after the query's position are invisible): every step has the same shapes and the same
buffer addresses, and nothing in it reads a Python count (the query position comes from the device tensor,
for the flash kernel too), as CUDA graphs and `torch.compile(mode="reduce-overhead")` need: after the first
step, one captured graph serves every step (tests/test_kv_cache.py). Elsewhere it attends over a view of the
written prefix (no copy, no work on the tail); there the flash kernel gets the count as `q_offset`, which
ends its key loop at the written length. The cross-attention K/V (from the encoder output) are computed by
the first step and kept.

Beam reordering copies, within the same buffers, the written prefix of the rows whose beam changed (rows
that survive in place are not touched); the cross-attention K/V are
left alone (beams move only within their own example, whose rows share the encoder output).

Dynamic cache: `[(self_k, self_v, cross_k, cross_v), ...]`; every step concatenates the new K/V (a copy of
the whole cache per token).
"""
from __future__ import annotations

from typing import Callable

import torch

KV = tuple[torch.Tensor, torch.Tensor]


# Devices where a step attends over the whole buffer (fixed shapes, for CUDA graphs); elsewhere it attends over
# a view of the written prefix (no copy either, and no work on the unwritten tail).
FULL_LENGTH_DEVICES = ("cuda",)


class StaticCache:
    def __init__(self, config, rows: int, max_length: int, device: torch.device | str,
                 full_length: bool | None = None):
        if max_length < 1:
            raise ValueError(f"StaticCache: max_length must be >= 1, got {max_length}")
        self.shape = (rows, config.num_heads, max_length, config.d_kv)
        n = config.num_decoder_layers
        # Allocated by the first write, in the dtype the projections produce (autocast included).
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.cross: list[KV | None] = [None] * n
        self.max_length, self._length = max_length, 0
        self.position = torch.zeros((), dtype=torch.long, device=device)   # next position to write
        self._positions: torch.Tensor | None = None
        self._refresh_cross = [False] * n   # after reset(): recompute cross K/V into the same tensors
        self.full_length = torch.device(device).type in FULL_LENGTH_DEVICES if full_length is None else full_length
        self.layers = [StaticLayer(self, i) for i in range(n)]

    def query_positions(self, q_len: int) -> torch.Tensor:
        """(1, q_len) absolute positions of the tokens being fed now (computed once per step)."""
        if self._positions is None or self._positions.shape[1] != q_len:
            self._positions = (self.position + torch.arange(q_len, device=self.position.device))[None]
        return self._positions

    @property
    def length(self) -> int:
        """Positions written. A whole-buffer cache keeps no Python count (a compiled step would be
        specialised on it): it reads the position tensor (a host sync; not for use inside a step)."""
        return int(self.position) if self.full_length else self._length

    def geometry(self, q_len: int, kernel: bool) -> tuple[int | None, int, torch.Tensor | None]:
        """(cached positions or None if unknown inside a step, keys attended, query positions or None)
        for a step feeding `q_len` tokens. Whole buffer: positions from the device tensor, for the flash
        kernel too (nothing in the step depends on a Python int). Prefix: the flash kernel gets the count
        as q_offset (its key loop then ends at the written length), the reference the position tensor."""
        if self.full_length:
            return None, self.max_length, self.query_positions(q_len)
        return self._length, self._length + q_len, None if kernel else self.query_positions(q_len)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Store the new keys/values at the current position; returns the buffers (`kv_length` long)."""
        q_len = k.shape[2]
        if not self.full_length and self._length + q_len > self.max_length:  # (whole buffer: index_copy_ raises)
            raise ValueError(f"StaticCache: {self._length} positions written, {q_len} more exceed max_length="
                             f"{self.max_length}")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(self.shape)
            self.values[layer] = v.new_zeros(self.shape)
        index = self.query_positions(q_len)[0]
        self.keys[layer].index_copy_(2, index, k.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(2, index, v.to(self.values[layer].dtype))
        if self.full_length:
            return self.keys[layer], self.values[layer]
        end = self._length + q_len
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        if not self.full_length:
            self._length += n
        self.position += n
        self._positions = None

    @torch.no_grad()
    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search), in place: only rows that change, and only the written prefix.
        (Beams that survive in place are common; this costs one host sync per step, as the search has.)"""
        moved = (index != torch.arange(index.shape[0], device=index.device)).nonzero()[:, 0]
        if moved.numel() == 0:
            return
        source, end = index[moved], self.length   # the written prefix (whole buffer: read from the device)
        for buf in (*self.keys, *self.values):
            if buf is not None:
                buf[moved, :, :end] = buf[source, :, :end]   # the gather copies first: no aliasing

    def reset(self) -> None:
        """Ready for another sequence in the same buffers (models/compiled_step.py reuses a cache across
        `generate` calls, as CUDA graphs read fixed addresses): position 0, and the next step writes its
        cross-attention K/V into the existing tensors. The old self-attention K/V stay, unread: a query at
        position p sees keys 0..p only, each written again by this sequence before it is read."""
        self.position.zero_()
        self._positions, self._length = None, 0
        self._refresh_cross = [kv is not None for kv in self.cross]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (the position included): what a compiled step reads and writes."""
        out = [t for t in (*self.keys, *self.values) if t is not None]
        return out + [t for kv in self.cross if kv is not None for t in kv] + [self.position]

    def nbytes(self) -> int:
        tensors = [t for t in (*self.keys, *self.values) if t is not None]
        tensors += [t for kv in self.cross if kv is not None for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


class StaticLayer:
    """One decoder layer's view of a StaticCache (what a block receives as `past`)."""

    def __init__(self, cache: StaticCache, index: int):
        self.cache, self.index = cache, index

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        return self.cache.write(self.index, k, v)

    def cross_kv(self, compute: Callable[[], KV]) -> KV:
        cache, i = self.cache, self.index
        if cache.cross[i] is None:
            cache.cross[i] = compute()
        elif cache._refresh_cross[i]:  # a reset cache: the new encoder output's K/V, same tensors
            for old, new in zip(cache.cross[i], compute()):
                old.copy_(new)
            cache._refresh_cross[i] = False
        return cache.cross[i]


def extend_self(past, k: torch.Tensor, v: torch.Tensor) -> KV:
    """Self-attention keys/values after this step: new ones appended to `past` (either kind of cache)."""
    if past is None:
        return k, v
    if isinstance(past, StaticLayer):
        return past.extend(k, v)
    return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)


def cross_kv(past, compute: Callable[[], KV]) -> KV:
    """Cross-attention keys/values: from the cache when it has them, else computed."""
    if past is None:
        return compute()
    if isinstance(past, StaticLayer):
        return past.cross_kv(compute)
    return past[2], past[3]


def attention_geometry(past, q_len: int, kernel: bool) -> tuple[int | None, int, torch.Tensor | None]:
    """(cached positions, keys attended, query positions or None) of a decoder step (StaticCache.geometry)."""
    if isinstance(past, StaticCache):
        return past.geometry(q_len, kernel)
    past_len = 0 if past is None else past[0][0].shape[2]
    return past_len, past_len + q_len, None


def reorder_dynamic(past: list[tuple[torch.Tensor, ...]], index: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Beam reordering of a torch.cat cache: self-attention rows follow `index`, cross-attention stays."""
    return [(k.index_select(0, index), v.index_select(0, index), *rest) for k, v, *rest in past]


def reorder_rows(past: list[tuple[torch.Tensor, ...]], index: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Rows `index` of every cached tensor, cross-attention included (examples reordered, not beams)."""
    return [tuple(t.index_select(0, index) for t in layer) for layer in past]


def dynamic_nbytes(past) -> int:
    return sum(t.numel() * t.element_size() for layer in past for t in layer)
