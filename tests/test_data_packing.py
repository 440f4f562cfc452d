"""Packing: segment ids, per-segment positions, decoder inputs restarting at 0, padding, round trip."""
import numpy as np
import pytest

from engine.data.packing import (IGNORE_INDEX, PACKED_KEYS, UNPACKED_KEYS, dense_packed_batch, next_fit_rows,
                                 packed_batch, unpack_batch, unpacked_batch)


def _examples(n, seed=0, max_in=40, max_tgt=15):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 1000, rng.integers(1, max_in)), rng.integers(3, 1000, rng.integers(1, max_tgt)))
            for _ in range(n)]


def test_packed_rows_round_trip_and_structure():
    exs = _examples(200)
    L_in, L_tgt = 64, 24
    rows = next_fit_rows([(len(a), len(b)) for a, b in exs], L_in, L_tgt)
    assert [i for r in rows for i in r] == list(range(200))  # every example once, in order
    assert len(rows) < 200  # several examples share rows
    batch = packed_batch(exs, rows, L_in, L_tgt)
    assert tuple(batch) == PACKED_KEYS
    assert batch["input_ids"].shape == (len(rows), L_in) and batch["labels"].shape == (len(rows), L_tgt)
    back = unpack_batch(batch)
    assert len(back) == 200
    for (a, b), (c, d) in zip(exs, back):
        assert a.tolist() == c.tolist() and b.tolist() == d.tolist()
    for r in range(len(rows)):
        for side, ids_key, pos_key in [("encoder", "input_ids", "encoder_positions"),
                                       ("decoder", "labels", "decoder_positions")]:
            seg = batch[f"{side}_segment_ids"][r]
            real = seg > 0
            # segments are contiguous runs 1, 2, 3, ... (no id shared by two examples), padding only at the end
            runs = seg[real]
            assert (np.diff(runs) >= 0).all() and set(runs.tolist()) == set(range(1, len(rows[r]) + 1))
            assert not real[np.argmin(real):].any() if not real.all() else True
            pos = batch[pos_key][r]
            for s in range(1, len(rows[r]) + 1):
                assert pos[seg == s].tolist() == list(range((seg == s).sum()))
            assert (pos[~real] == 0).all() and (batch[ids_key][r][~real] == (0 if side == "encoder" else
                                                                              IGNORE_INDEX)).all()
        seg, lab, dec = batch["decoder_segment_ids"][r], batch["labels"][r], batch["decoder_input_ids"][r]
        for s in range(1, len(rows[r]) + 1):
            m = seg == s
            assert dec[m][0] == 0 and dec[m][1:].tolist() == lab[m][:-1].tolist()  # restart with 0
        assert (dec[seg == 0] == 0).all()


def test_next_fit_max_rows_keeps_open_row_back():
    lengths = [(30, 5)] * 7  # two fit per 64-row
    assert next_fit_rows(lengths, 64, 24, max_rows=2) == [[0, 1], [2, 3]]
    assert next_fit_rows(lengths, 64, 24, max_rows=10) == [[0, 1], [2, 3], [4, 5]]  # [6] may still grow
    assert next_fit_rows(lengths, 64, 24) == [[0, 1], [2, 3], [4, 5], [6]]
    assert next_fit_rows([(10, 20), (10, 10)], 64, 24) == [[0], [1]]  # decoder side full first


def test_dense_fast_path_equals_general():
    rng = np.random.default_rng(1)
    inputs, targets = rng.integers(3, 1000, (5, 60)), rng.integers(3, 1000, (5, 20))
    fast = dense_packed_batch(inputs, targets, 64, 24)
    slow = packed_batch(list(zip(inputs, targets)), [[i] for i in range(5)], 64, 24)
    for k in PACKED_KEYS:
        np.testing.assert_array_equal(fast[k], slow[k], err_msg=k)
    with pytest.raises(ValueError, match="longer than the row"):
        dense_packed_batch(inputs, targets, 50, 24)


def test_unpacked_mode():
    exs = _examples(6, seed=2)
    batch = unpacked_batch(exs, 48, 16)
    assert tuple(batch) == UNPACKED_KEYS
    for r, (a, b) in enumerate(exs):
        n, m = len(a), len(b)
        assert batch["input_ids"][r, :n].tolist() == a.tolist() and (batch["input_ids"][r, n:] == 0).all()
        assert batch["attention_mask"][r].sum() == n and batch["decoder_attention_mask"][r].sum() == m
        assert batch["labels"][r, :m].tolist() == b.tolist() and (batch["labels"][r, m:] == IGNORE_INDEX).all()
        assert batch["decoder_input_ids"][r, 0] == 0 and batch["decoder_input_ids"][r, 1:m].tolist() == b[:-1].tolist()


def test_long_example_is_trimmed_to_the_row():
    exs = [(np.arange(3, 103), np.arange(3, 43))]
    batch = packed_batch(exs, next_fit_rows([(100, 40)], 64, 24), 64, 24)
    assert batch["input_ids"][0].tolist() == list(range(3, 67)) and batch["labels"][0].tolist() == list(range(3, 27))
