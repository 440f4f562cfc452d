"""Tiles of the attention kernels chosen per GPU: a small autotuning space, timed once per key, cached.

`choose(key, default, launch, device)` returns the tile a kernel launches with. The key is the kernel, the
dtype, the head dim, the mask kind (the kernel's constexpr flags) and the query / key lengths bucketed to
powers of two (128 ... 4096), so a new batch length inside a bucket never re-tunes (issue 13: the FFN's
autotuner re-benchmarked for every token count). Tuning happens only where it is safe and meaningful:

- never under the interpreter, on a CPU, in deterministic mode (a timing-dependent tile would change the
  bits from run to run), for short query blocks (decoding: the default's short tile), or when
  T5FORGE_ATTENTION_AUTOTUNE=0;
- never during CUDA-graph capture (`torch.cuda.is_current_stream_capturing()`): a cached choice is used
  there, else the default, and nothing is cached (the capture must not launch kernels to time them).

The space (`space`) holds the default and 2-3 neighbours per kernel; every tile in it compiles without
register spills at d = 64 on sm_90 (benchmarks/kernels/compiled_report.py --space, and
tests/test_kernels_attention_report.py), so first use costs a few compilations and ~10 timed launches
per kernel and key: seconds. Timing: one warm-up launch (compiles), then the mean of `_REPS` launches
between two CUDA events; a tile that fails to compile (out of shared memory) is skipped.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ._triton_utils import is_interpreter

_REPS = 5
_MIN_TUNED_LEN = 128     # shorter query blocks (decoding, tiny batches) keep the default tile
_MAX_BUCKET = 4096


@dataclass(frozen=True)
class Tile:
    m: int        # BLOCK_M
    n: int        # BLOCK_N
    warps: int
    stages: int


@dataclass(frozen=True)
class Key:
    kernel: str          # "fwd", "dkdv", "dq"
    dtype: torch.dtype
    head_dim: int
    q_len: int
    kv_len: int
    flags: tuple         # the kernel's sorted constexpr flags: the mask kind


def length_bucket(n: int) -> int:
    """The power of two >= n, within [_MIN_TUNED_LEN, _MAX_BUCKET]: lengths that share a tuned tile."""
    b = _MIN_TUNED_LEN
    while b < n and b < _MAX_BUCKET:
        b *= 2
    return b


# The autotuning space at d <= 64 for 16-bit inputs, default first (kernels/_t5_attention_launch.py:_blocks).
# Each tile compiles without spills in every masked variant on sm_90 (compiled_report --space); rejected
# there: forward 128 x 128 (8 warps: 16 B; 16 warps: 176 B), 64 x 128 on 4 warps (160-296 B with explicit
# positions), dk/dv 32 x 128 (120 B), 32 x 64 on 4 warps (128-216 B) and 16 x 64 on 4 warps (8 B, causal with
# padding).
SPACE_D64 = {
    "fwd": (Tile(128, 64, 8, 2), Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(64, 128, 8, 2)),
    "dkdv": (Tile(16, 128, 8, 2), Tile(16, 128, 8, 3), Tile(16, 64, 8, 2)),
    "dq": (Tile(128, 64, 8, 2), Tile(128, 64, 8, 3), Tile(64, 64, 4, 3)),
}


def fits_kind(kernel: str, tile: Tile, flags: dict) -> bool:
    """Whether a tile of SPACE_D64 is in the space of a mask kind: 128-key forward steps only with index
    positions (explicit positions gather the bias in every tile: 56 B spilled at 64 x 128 on 8 warps)."""
    gather = flags.get("HAS_QPOS") or flags.get("HAS_KPOS")
    return not (kernel == "fwd" and tile.n > 64 and gather)


def space(key: Key, default: Tile) -> list[Tile]:
    """The tiles timed for `key`: the default first, then those of the space whose loop (over keys in the
    forward and dq, over queries in dk/dv) spans at least `stages` (>= 2) steps in the length's bucket: a
    3-stage pipeline over 2 tiles, or 128-key steps over 128 keys, cannot win and costs a compilation."""
    flags = dict(key.flags)
    if key.head_dim > 64 or key.dtype == torch.float32 or flags.get("DROPOUT"):
        return [default]      # d 128, fp32 and dropout: one tile, the spill-checked default
    loop_len = length_bucket(key.q_len if key.kernel == "dkdv" else key.kv_len)
    step = (lambda t: t.m) if key.kernel == "dkdv" else (lambda t: t.n)
    return [default] + [t for t in SPACE_D64[key.kernel] if t != default and fits_kind(key.kernel, t, flags)
                        and step(t) * max(t.stages, 2) <= loop_len]


_CHOICES: dict[tuple, Tile] = {}


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _cache_key(key: Key, device: torch.device) -> tuple:
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return (_device_name(index), key.kernel, key.dtype, key.head_dim, length_bucket(key.q_len),
            length_bucket(key.kv_len), key.flags)


def _can_tune(device: torch.device) -> bool:
    return (device.type == "cuda" and not is_interpreter()
            and os.environ.get("T5FORGE_ATTENTION_AUTOTUNE", "1") != "0")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _time(launch: Callable[[Tile], None], tile: Tile) -> float:
    """Mean milliseconds of one launch with `tile` (inf when it cannot compile or launch)."""
    try:
        launch(tile)                     # compiles; also warms the caches
    except Exception as exc:             # triton's OutOfResources and compile errors: not a candidate
        if "out of resource" not in str(exc).lower() and "OutOfResources" not in type(exc).__name__:
            raise
        return float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_REPS):
        launch(tile)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / _REPS


def choose(key: Key, default: Tile, launch: Callable[[Tile], None], device: torch.device, *,
           deterministic: bool = False) -> Tile:
    """The tile `launch` should run with for `key` (see the module doc). Tuning launches it several times;
    the caller launches once more with the result (every launch rewrites the kernel's outputs)."""
    if deterministic or key.q_len < _MIN_TUNED_LEN or not _can_tune(device):
        return default
    ck = _cache_key(key, device)
    tile = _CHOICES.get(ck)
    if tile is not None:
        return tile
    if _capturing():
        return default
    tiles = space(key, default)
    if len(tiles) > 1:
        times = [_time(launch, t) for t in tiles]
        tile = tiles[min(range(len(tiles)), key=times.__getitem__)]
    else:
        tile = default
    _CHOICES[ck] = tile
    return tile


def choices() -> dict[tuple, Tile]:
    """The tiles chosen so far (for logs and benchmarks), by (GPU, kernel, dtype, d, Lq, Lk bucket, flags)."""
    return dict(_CHOICES)
