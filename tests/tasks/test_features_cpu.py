"""The compiled time-window kernel against a straightforward per-row reference.

:func:`twinflow.tasks.features.cpu.rolling_time_into` slides its sums and keeps its extremes in a
two-stack queue; the reference here recomputes every row's window from scratch with NumPy (the
rows ``j <= i`` of the asset with ``t[j] > t[i] - w``), so a bookkeeping slip in the sliding code
shows up as a different value or a different NaN.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

fc = pytest.importorskip("twinflow.tasks.features.cpu")

STATS = ["mean", "std", "min", "max", "slope"]


def _fleet(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assets of varied length and sampling: jitter, gaps, duplicate times, a rate change, NaN runs.

    Even seeds put the times on a grid that the window lengths are multiples of, so that window
    edges fall exactly on rows.
    """
    rng = np.random.default_rng(seed)
    sizes = [1, 2, 7, 40, 300, 700]  # 700 rows: the sums are rebased (every 256 rows) mid-asset
    rng.shuffle(sizes)
    times, starts = [], [0]
    for n in sizes:
        steps = rng.uniform(0.1, 0.25, size=n)  # about 10 min +- jitter, in hours
        steps[rng.random(n) < 0.05] = 0.0  # duplicate times
        if n > 20:
            steps[rng.integers(1, n, size=2)] = rng.uniform(2.0, 12.0, size=2)  # gaps of 2-12 h
            steps[: n // 3] /= 20.0  # a dense stretch: the window's row count changes a lot
        if seed % 2 == 0:
            # Times on a binary grid (1/64 h): a row exactly at ``t[i] - w`` happens, and is outside.
            steps = np.round(steps * 64) / 64
        steps[0] = 0.0
        times.append(np.cumsum(steps))
        starts.append(starts[-1] + n)
    t = np.concatenate(times)
    y = 1000.0 + rng.normal(size=(4, len(t))) + 0.01 * np.arange(len(t))  # an offset: precision matters
    y[rng.random(y.shape) < 0.1] = np.nan
    y[1, 100:160] = np.nan  # a run longer than the windows
    y[2] = np.nan  # a channel without readings
    y[3, rng.random(len(t)) < 0.5] = np.nan
    return np.ascontiguousarray(y), t, np.array(starts, dtype=np.int64)


def _reference(y, t, starts, lengths, min_periods):
    """Every row's window recomputed from scratch; (stat, window) -> (channels, n) float64."""
    n_ch, n = y.shape
    out = {(s, k): np.full((n_ch, n), np.nan) for s in STATS for k in range(len(lengths))}
    for a in range(len(starts) - 1):
        a0, a1 = starts[a], starts[a + 1]
        for i in range(a0, a1):
            for k, w in enumerate(lengths):
                rows = np.arange(a0, i + 1)
                rows = rows[t[rows] > t[i] - w]
                for c in range(n_ch):
                    v = y[c, rows]
                    ok = ~np.isnan(v)
                    cnt = int(ok.sum())
                    if cnt < min_periods or cnt == 0:
                        continue
                    v, tv = v[ok], t[rows][ok]
                    out["mean", k][c, i] = v.mean()
                    out["min", k][c, i] = v.min()
                    out["max", k][c, i] = v.max()
                    if cnt >= 2:
                        out["std", k][c, i] = v.std(ddof=1)
                        if np.ptp(tv) > 0:
                            dt = tv - tv.mean()
                            out["slope", k][c, i] = (dt * (v - v.mean())).sum() / (dt * dt).sum()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_periods", [1, 3])
def test_time_window_kernel_matches_a_from_scratch_reference(seed, min_periods):
    y, t, starts = _fleet(seed)
    lengths = np.array([0.0625, 1.0, 6.0])  # 3.75 min (often one row), 1 h, 6 h
    codes = np.array([fc.STAT_CODES[s] for s in STATS], dtype=np.int64)
    n_ch, n = y.shape
    row0 = 2
    out = np.full((row0 + len(lengths) * len(STATS) * n_ch, n), -7.0, dtype=np.float32)
    fc.rolling_time_into(y, t, starts, lengths, codes, min_periods, out, row0)
    assert (out[:row0] == -7.0).all()  # rows before row0 are not touched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = _reference(y, t, starts, lengths, min_periods)
    checked = 0
    for k in range(len(lengths)):
        for s_i, s in enumerate(STATS):
            got = out[row0 + (k * len(STATS) + s_i) * n_ch: row0 + (k * len(STATS) + s_i + 1) * n_ch]
            want = ref[s, k]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{s} window {lengths[k]}")
            np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, atol=2e-4, equal_nan=True,
                                       err_msg=f"{s} window {lengths[k]}")
            checked += int((~np.isnan(want)).sum())
    assert checked > 10_000
    assert np.isnan(out[row0:, starts[-1] - 1].reshape(-1, n_ch)[:, 2]).all()  # the channel without readings


def test_time_window_kernel_gives_each_stat_alone_what_it_gives_with_the_others():
    """A stat not asked for is skipped (row -1) without changing the others' values."""
    y, t, starts = _fleet(5)
    lengths = np.array([1.0, 6.0])
    n_ch, n = y.shape
    full = np.empty((len(lengths) * len(STATS) * n_ch, n), dtype=np.float32)
    fc.rolling_time_into(y, t, starts, lengths, np.arange(5, dtype=np.int64), 1, full, 0)
    for code in range(5):
        one = np.empty((len(lengths) * n_ch, n), dtype=np.float32)
        fc.rolling_time_into(y, t, starts, lengths, np.array([code], dtype=np.int64), 1, one, 0)
        for k in range(len(lengths)):
            want = full[(k * 5 + code) * n_ch: (k * 5 + code + 1) * n_ch]
            np.testing.assert_array_equal(one[k * n_ch: (k + 1) * n_ch], want)
