"""kernels/_t5_attention_tune.py: tiles tuned per GPU and shape bucket, cached, never during capture.

No GPU here: the timer, the "can tune" check and the capture check are replaced, so what is tested is the
policy (which tiles are timed, what is cached under which key, when the default is used), and that the
launchers run the kernels correctly with any tile of the space (interpreter, against the reference).
"""
from __future__ import annotations

import pytest
import torch

from kernels import _t5_attention_tune as tune
from kernels import t5_attention as attn

DEFAULT = tune.Tile(128, 64, 8, 2)
FLAGS = (("CAUSAL", False), ("DROPOUT", False), ("HAS_SEG", 1))
CUDA = torch.device("cuda", 0)


@pytest.fixture
def tuner(monkeypatch):
    """A tuner that may tune (as on a GPU), with a fake timer: the tile with the largest BLOCK_N and then
    the most stages is fastest. Returns the list of timed tiles."""
    timed = []

    def fake_time(run, tile):
        timed.append(tile)
        run(tile)
        return 1.0 / (tile.n * 10 + tile.stages)

    monkeypatch.setattr(tune, "_CHOICES", {})
    monkeypatch.setattr(tune, "_can_tune", lambda device: True)
    monkeypatch.setattr(tune, "_capturing", lambda: False)
    monkeypatch.setattr(tune, "_device_name", lambda index: "fake-H100")
    monkeypatch.setattr(tune, "_time", fake_time)
    return timed


def _key(kernel="fwd", q_len=512, kv_len=512, head_dim=64, dtype=torch.bfloat16, flags=FLAGS):
    return tune.Key(kernel, dtype, head_dim, q_len, kv_len, flags)


def test_length_buckets():
    assert [tune.length_bucket(n) for n in (1, 128, 129, 512, 513, 4096, 10000)] == \
        [128, 128, 256, 512, 1024, 4096, 4096]


def test_picks_the_fastest_tile_once_per_bucket(tuner):
    launched = []
    tile = tune.choose(_key(), DEFAULT, launched.append, CUDA)
    assert tile == tune.Tile(64, 128, 8, 2)
    assert tuner == list(tune.space(_key(), DEFAULT)) and tuner[0] == DEFAULT and len(tuner) == 4
    assert launched == tuner                             # every timed tile really launched
    tuner.clear()
    assert tune.choose(_key(q_len=300, kv_len=480), DEFAULT, launched.append, CUDA) == tile   # same buckets
    assert tuner == []
    tune.choose(_key(q_len=1000), DEFAULT, launched.append, CUDA)                             # a new bucket
    assert len(tuner) == 4
    tuner.clear()
    tune.choose(_key(flags=(("CAUSAL", True), ("DROPOUT", False), ("HAS_SEG", 0))), DEFAULT, launched.append, CUDA)
    assert len(tuner) == 4                                                                    # a new mask kind
    assert len(tune.choices()) == 3


def test_space_is_pruned_by_loop_length_and_kind(tuner):
    assert tune.space(_key(kv_len=100), DEFAULT) == [DEFAULT]         # 128 keys: 2 steps of 64, 1 of 128
    assert len(tune.space(_key(kv_len=200), DEFAULT)) == 4             # 256 keys: 3 stages of 64, 2 of 128
    packed = tune.space(_key(flags=(("HAS_KPOS", True), ("HAS_QPOS", True), ("HAS_SEG", 2))), DEFAULT)
    assert len(packed) == 3 and all(t.n == 64 for t in packed)        # 128-key steps spill there
    dkdv = tune.Tile(16, 128, 8, 2)
    assert len(tune.space(_key("dkdv", q_len=128, kv_len=4096), dkdv)) == 3             # its loop: queries
    assert tune.space(_key(head_dim=128), DEFAULT) == [DEFAULT]
    assert tune.space(_key(dtype=torch.float32), DEFAULT) == [DEFAULT]
    assert tune.space(_key(flags=(("DROPOUT", True),)), DEFAULT) == [DEFAULT]
    for kernel, tiles in tune.SPACE_D64.items():
        assert 1 < len(tiles) <= 4, kernel


def test_default_tile_without_tuning(tuner, monkeypatch):
    fail = pytest.fail
    assert tune.choose(_key(), DEFAULT, fail, CUDA, deterministic=True) == DEFAULT
    assert tune.choose(_key(q_len=1, kv_len=700), DEFAULT, fail, CUDA) == DEFAULT       # decoding
    monkeypatch.setattr(tune, "_capturing", lambda: True)
    assert tune.choose(_key(), DEFAULT, fail, CUDA) == DEFAULT                          # CUDA-graph capture
    assert tuner == [] and tune.choices() == {}                                         # nothing cached
    monkeypatch.setattr(tune, "_capturing", lambda: False)
    tile = tune.choose(_key(), DEFAULT, lambda t: None, CUDA)
    monkeypatch.setattr(tune, "_capturing", lambda: True)
    assert tune.choose(_key(), DEFAULT, fail, CUDA) == tile != DEFAULT                  # cached choice: used


def test_no_tuning_under_the_interpreter_or_on_the_cpu(monkeypatch):
    monkeypatch.setattr(tune, "_time", lambda run, tile: pytest.fail("timed"))
    assert not tune._can_tune(torch.device("cpu"))
    assert not tune._can_tune(CUDA)                       # the tests run under the interpreter
    assert tune.choose(_key(), DEFAULT, pytest.fail, torch.device("cpu")) == DEFAULT
    monkeypatch.setattr(tune, "is_interpreter", lambda: False)
    assert tune._can_tune(CUDA)
    monkeypatch.setenv("T5FORGE_ATTENTION_AUTOTUNE", "0")
    assert not tune._can_tune(CUDA)


def test_uncacheable_bucket_table_during_capture(monkeypatch):
    monkeypatch.setattr(attn, "_BUCKET_CACHE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    buckets = attn._bucket_table(True, 32, 128, "cpu")
    assert attn._BUCKET_CACHE == {} and buckets.shape == (257,)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert attn._bucket_table(True, 32, 128, "cpu") is attn._bucket_table(True, 32, 128, "cpu")


def test_tuned_tiles_give_the_reference(tuner, monkeypatch):
    """Under the interpreter, with tuning forced on and a small space: forward and backward (deterministic
    off, so the bias gradient's atomics buffer is re-zeroed per timed launch) equal the reference."""
    monkeypatch.setattr(tune, "_MIN_TUNED_LEN", 16)
    monkeypatch.setattr(tune, "space", lambda key, default: [default, tune.Tile(16, 32, 1, 1),
                                                             tune.Tile(32, 16, 1, 1)])
    # (16, 32) is "fastest" for every kernel: a non-default tile, non-square, in forward, dk/dv and dq.
    monkeypatch.setattr(tune, "_time", lambda run, tile: (tuner.append(tile), run(tile), tile.m - tile.n / 4)[2])
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 45, 16, generator=g, dtype=torch.float64).float().requires_grad_() for _ in "qkv")
    table = torch.randn(32, 2, generator=g).requires_grad_()
    pad = torch.ones(2, 45, dtype=torch.bool)
    pad[1, 37:] = False
    kw = dict(key_padding_mask=pad, max_distance=24)
    outs = []
    for fn in (attn.t5_attention, attn.t5_attention_ref):
        o = fn(q, k, v, table, **kw)
        grads = torch.autograd.grad((o * o).sum(), (q, k, v, table))
        outs.append((o, *grads))
    assert len(tuner) == 9 and set(tune.choices().values()) == {tune.Tile(16, 32, 1, 1)}
    for name, got, ref in zip(["out", "dq", "dk", "dv", "dtable"], *outs):
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4, msg=name)
