"""Compiled CPU window kernels: every window statistic and EWM of a channel in one pass per asset.

:func:`twinflow.tasks.features.compute_features` uses these on CPU when numba is installed; the
array-module kernels in :mod:`twinflow.tasks.features.kernels` (NumPy or CuPy) stay the GPU path and the
reference the tests hold these to. Both give the same values up to float64 rounding: the same
definitions (pandas ``groupby.rolling`` semantics, NaNs skipped, sample std, least-squares slope
against the row's time, pandas ``ewm(adjust=True)``) and the same NaN rules.

Why a second implementation: the vectorised kernels make ~40 whole-array passes per partition,
each allocating a temporary (and, in a Dask worker, page-faulting it in: workers return freed
memory to the OS), so a partition costs ~4 us per row; here each value is read once per window,
sums slide (add the entering row, drop the leaving one) and min/max use the van Herk /
Gil-Werman block scheme (three comparisons per row, whatever the window).

Sliding sums drift on long assets, so every ``_REBASE`` rows the window's sums are recomputed from
the raw values around new reference values (the current value and time): the summed terms stay
small, as the block-local prefix sums of the array kernels keep them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["STAT_CODES", "rolling_into", "rolling_time_into", "ewm_into", "normalise_", "regime_moments", "assign_regimes",
           "nan_counts_rows", "warm_up", "window_sums"]

STAT_CODES = {"mean": 0, "std": 1, "min": 2, "max": 3, "slope": 4}
_REBASE = 256


@njit(cache=True, nogil=True)
def window_sums(y, t, c, lo, hi, ys, ts):
    """Count and sums over rows lo..hi-1 of channel c (NaNs skipped), values minus ys, times minus ts.

    The one definition of a window's sums: the sliding passes rebase on it and the last-reading
    features (:mod:`twinflow.tasks.features.latest`) take their window statistics from it.

    Returns:
        ``(count, sum d, sum d*d, sum u, sum u*u, sum d*u)`` with ``d = value - ys``, ``u = time - ts``.
    """
    cnt = 0.0
    sy = 0.0
    syy = 0.0
    st = 0.0
    stt = 0.0
    sty = 0.0
    for j in range(lo, hi):
        v = y[c, j]
        if v == v:
            d = v - ys
            u = t[j] - ts
            cnt += 1.0
            sy += d
            syy += d * d
            st += u
            stt += u * u
            sty += d * u
    return cnt, sy, syy, st, stt, sty


@njit(cache=True, nogil=True)
def _window_pass(y, t, c, a0, a1, w, mp, out, r_mean, r_std, r_min, r_max, r_slope, smin, smax):
    """One window over one asset's channel; a row index of -1 means that statistic is not wanted."""
    nan = np.nan
    cnt = 0.0
    sy = 0.0
    syy = 0.0
    st = 0.0
    stt = 0.0
    sty = 0.0
    ys = 0.0
    ts = 0.0
    inf = np.inf
    if r_min >= 0 or r_max >= 0:
        # Suffix extremes within each block of w rows (NaN skipped: +-inf never wins).
        for b0 in range(a0, a1, w):
            lo = inf
            hi = -inf
            for i in range(min(b0 + w, a1) - 1, b0 - 1, -1):
                v = y[c, i]
                if v == v:
                    lo = min(lo, v)
                    hi = max(hi, v)
                smin[i - a0] = lo
                smax[i - a0] = hi
    blk = w
    pmin = inf
    pmax = -inf
    for i in range(a0, a1):
        v = y[c, i]
        valid = v == v
        if (i - a0) % _REBASE == 0:
            if valid:
                ys = v
            ts = t[i]
            cnt, sy, syy, st, stt, sty = window_sums(y, t, c, max(a0, i - w), i, ys, ts)
        if valid:
            d = v - ys
            u = t[i] - ts
            cnt += 1.0
            sy += d
            syy += d * d
            st += u
            stt += u * u
            sty += d * u
        j = i - w
        if j >= a0:
            vj = y[c, j]
            if vj == vj:
                dj = vj - ys
                uj = t[j] - ts
                cnt -= 1.0
                sy -= dj
                syy -= dj * dj
                st -= uj
                stt -= uj * uj
                sty -= dj * uj
        few = cnt < mp
        # Window extremes (van Herk / Gil-Werman): blocks of w rows from the asset's start; a
        # window is the tail of the previous block (suffix extreme) plus the head of this one
        # (running prefix extreme). Branch-free, unlike a monotonic deque on noisy data.
        if blk == w:
            blk = 0
            pmin = inf
            pmax = -inf
        blk += 1
        if valid:
            pmin = min(pmin, v)
            pmax = max(pmax, v)
        tail = i - w + 1 - a0
        if r_min >= 0:
            m = pmin if tail <= 0 else min(pmin, smin[tail])
            out[r_min, i] = nan if few else m
        if r_max >= 0:
            m = pmax if tail <= 0 else max(pmax, smax[tail])
            out[r_max, i] = nan if few else m
        if r_mean >= 0:
            out[r_mean, i] = nan if few else sy / cnt + ys
        if r_std >= 0:
            if few or cnt < 2.0:
                out[r_std, i] = nan
            else:
                var = (syy - sy * sy / cnt) / (cnt - 1.0)
                out[r_std, i] = math.sqrt(var) if var > 0.0 else 0.0
        if r_slope >= 0:
            den = cnt * stt - st * st
            if few or cnt < 2.0 or den <= 1e-12 * max(cnt * stt, 1.0):
                out[r_slope, i] = nan
            else:
                out[r_slope, i] = (cnt * sty - st * sy) / den


@njit(cache=True, nogil=True)
def rolling_into(y, t, starts, windows, stats, min_periods, out, row0):
    """Rolling statistics of every channel and window, written into rows of ``out``.

    Args:
        y: (channels, n) float64, C-contiguous, NaN for missing; rows sorted by asset then time.
        t: (n,) float64 time of each row (relative to its asset's start).
        starts: (assets + 1,) int64 first row of each asset, then n.
        windows: (W,) int64 window lengths in rows.
        stats: (S,) int64 codes from :data:`STAT_CODES`, in output order.
        min_periods: Valid rows a value needs.
        out: (features, n) float32; the value of (window k, stat s, channel c) goes to row
            ``row0 + (k * S + s) * channels + c``.
    """
    n_ch = y.shape[0]
    ns = stats.shape[0]
    longest = 1
    for a in range(starts.shape[0] - 1):
        longest = max(longest, starts[a + 1] - starts[a])
    smin = np.empty(longest)
    smax = np.empty(longest)
    mp = float(min_periods)
    for a in range(starts.shape[0] - 1):
        for k in range(windows.shape[0]):
            for c in range(n_ch):
                rows = np.full(5, -1, np.int64)
                for s in range(ns):
                    rows[stats[s]] = row0 + (k * ns + s) * n_ch + c
                _window_pass(y, t, c, starts[a], starts[a + 1], windows[k], mp, out,
                             rows[0], rows[1], rows[2], rows[3], rows[4], smin, smax)


@njit(cache=True, nogil=True)
def _time_bounds(t, a0, a1, w, left):
    """``left[i - a0]``: the first row of the asset inside row i's window ``(t[i] - w, t[i]]``.

    Computed once per asset and window and shared by every channel: the window's rows do not
    depend on the channel, only its valid readings do.
    """
    lo = a0
    for i in range(a0, a1):
        while lo < i and t[lo] <= t[i] - w:
            lo += 1
        left[i - a0] = lo


@njit(cache=True, nogil=True)
def _time_window_pass(y, t, c, a0, a1, left, mp, out, r_mean, r_std, r_min, r_max, r_slope, smin, smax):
    """One time window over one asset's channel: rows ``left[i - a0]..i`` (see :func:`_time_bounds`).

    Sums slide as rows enter (every row once) and leave (when the window's start passes them),
    rebased every ``_REBASE`` rows as in :func:`_window_pass`. Extremes use the two-stack queue,
    the van Herk / Gil-Werman scheme with block edges that follow the window: the window is a
    front part ``[lo, mid)`` whose suffix extremes were computed when it was cut off, plus a back
    part ``[mid, i]`` with running extremes. When the start passes ``mid`` the rows ``[lo, i]``
    become the new front (one backward scan). Every row is scanned in at most one such cut, so
    the cost is O(1) per row whatever the window's varying row count, and the loop has no
    data-dependent branch, unlike a monotonic deque on noisy data.
    """
    nan = np.nan
    inf = np.inf
    cnt = 0.0
    sy = 0.0
    syy = 0.0
    st = 0.0
    stt = 0.0
    sty = 0.0
    ys = 0.0
    ts = 0.0
    lo = a0
    mid = a0
    pmin = inf
    pmax = -inf
    extremes = r_min >= 0 or r_max >= 0
    for i in range(a0, a1):
        v = y[c, i]
        valid = v == v
        start = left[i - a0]
        while lo < start:
            vj = y[c, lo]
            if vj == vj:
                dj = vj - ys
                uj = t[lo] - ts
                cnt -= 1.0
                sy -= dj
                syy -= dj * dj
                st -= uj
                stt -= uj * uj
                sty -= dj * uj
            lo += 1
        if (i - a0) % _REBASE == 0:
            if valid:
                ys = v
            ts = t[i]
            cnt, sy, syy, st, stt, sty = window_sums(y, t, c, lo, i, ys, ts)
        if valid:
            d = v - ys
            u = t[i] - ts
            cnt += 1.0
            sy += d
            syy += d * d
            st += u
            stt += u * u
            sty += d * u
        few = cnt < mp
        if extremes:
            # NaN as +-inf: it never wins, and the scans stay free of branches.
            pmin = min(pmin, v if valid else inf)
            pmax = max(pmax, v if valid else -inf)
            if lo >= mid:
                m1 = inf
                m2 = -inf
                for j in range(i, lo - 1, -1):
                    vj = y[c, j]
                    ok = vj == vj
                    m1 = min(m1, vj if ok else inf)
                    m2 = max(m2, vj if ok else -inf)
                    smin[j - a0] = m1
                    smax[j - a0] = m2
                mid = i + 1
                pmin = inf
                pmax = -inf
            # No valid reading in the window (cnt == 0) is NaN even where min_periods allows it.
            empty = few or cnt == 0.0
            if r_min >= 0:
                out[r_min, i] = nan if empty else min(smin[lo - a0], pmin)
            if r_max >= 0:
                out[r_max, i] = nan if empty else max(smax[lo - a0], pmax)
        if r_mean >= 0:
            out[r_mean, i] = nan if few else sy / cnt + ys
        if r_std >= 0:
            if few or cnt < 2.0:
                out[r_std, i] = nan
            else:
                var = (syy - sy * sy / cnt) / (cnt - 1.0)
                out[r_std, i] = math.sqrt(var) if var > 0.0 else 0.0
        if r_slope >= 0:
            den = cnt * stt - st * st
            if few or cnt < 2.0 or den <= 1e-12 * max(cnt * stt, 1.0):
                out[r_slope, i] = nan
            else:
                out[r_slope, i] = (cnt * sty - st * sy) / den


@njit(cache=True, nogil=True)
def rolling_time_into(y, t, starts, lengths, stats, min_periods, out, row0):
    """Rolling statistics over windows of time, written into rows of ``out``.

    As :func:`rolling_into`, but window ``k`` of row ``i`` holds the rows of its asset up to ``i``
    whose time is in ``(t[i] - lengths[k], t[i]]``: over a gap it holds fewer rows, never invented
    ones.

    Args:
        y: (channels, n) float64, C-contiguous, NaN for missing; rows sorted by asset then time.
        t: (n,) float64 time of each row in the clock's unit (relative to its asset's start),
            non-decreasing within an asset.
        starts: (assets + 1,) int64 first row of each asset, then n.
        lengths: (W,) float64 window lengths (> 0) in the unit of ``t``.
        stats: (S,) int64 codes from :data:`STAT_CODES`, in output order.
        min_periods: Valid rows a value needs.
        out: (features, n) float32; (window k, stat s, channel c) goes to row
            ``row0 + (k * S + s) * channels + c``.
    """
    n_ch = y.shape[0]
    ns = stats.shape[0]
    longest = 1
    for a in range(starts.shape[0] - 1):
        longest = max(longest, starts[a + 1] - starts[a])
    # One set of scratch arrays for the whole call: no allocation per asset, window or channel.
    left = np.empty(longest, np.int64)
    smin = np.empty(longest)
    smax = np.empty(longest)
    rows = np.empty(5, np.int64)
    mp = float(min_periods)
    for a in range(starts.shape[0] - 1):
        a0 = starts[a]
        a1 = starts[a + 1]
        for k in range(lengths.shape[0]):
            _time_bounds(t, a0, a1, lengths[k], left)
            for c in range(n_ch):
                rows[:] = -1
                for s in range(ns):
                    rows[stats[s]] = row0 + (k * ns + s) * n_ch + c
                _time_window_pass(y, t, c, a0, a1, left, mp, out,
                                  rows[0], rows[1], rows[2], rows[3], rows[4], smin, smax)


@njit(cache=True, nogil=True)
def ewm_into(y, starts, spans, min_periods, out, row0):
    """Exponentially-weighted means (pandas ``ewm(span, adjust=True)``), written into ``out``.

    Every channel of a row in the inner loop: one channel's recurrence (``num = num * beta + v``) is
    a chain of dependent multiply-adds, so a loop over one channel at a time waits on their latency;
    the channels' chains are independent and overlap. Per channel the operations and their order
    are those of a channel at a time, so the values are the same.

    Args:
        y: (channels, n) float64, C-contiguous; NaNs are skipped but still age the weights.
        starts: (assets + 1,) int64 first row of each asset, then n.
        spans: (P,) int64 spans.
        min_periods: Valid rows seen so far that a value needs.
        out: (features, n) float32; span p, channel c goes to row ``row0 + p * channels + c``.
    """
    n_ch = y.shape[0]
    nan = np.nan
    num = np.empty(n_ch)
    den = np.empty(n_ch)
    seen = np.empty(n_ch, np.int64)
    for p in range(spans.shape[0]):
        beta = 1.0 - 2.0 / (spans[p] + 1.0)
        r0 = row0 + p * n_ch
        for a in range(starts.shape[0] - 1):
            num[:] = 0.0
            den[:] = 0.0
            seen[:] = 0
            for i in range(starts[a], starts[a + 1]):
                for c in range(n_ch):
                    v = y[c, i]
                    nu = num[c] * beta
                    de = den[c] * beta
                    if v == v:
                        nu += v
                        de += 1.0
                        seen[c] += 1
                    num[c] = nu
                    den[c] = de
                    out[r0 + c, i] = nan if de == 0.0 or seen[c] < min_periods else nu / de


@njit(cache=True, nogil=True)
def normalise_(y, regime, mu, sd):
    """In place: ``y[c, i] = (y[c, i] - mu[regime[i], c]) / sd[regime[i], c]``.

    The array path gathers ``mu.T[:, regime]`` and ``sd.T[:, regime]`` (two (channels, n)
    temporaries, ~10% of a partition's transform); this reads each value once. Same float64
    operations, so the same values.

    Args:
        y: (channels, n) float64, C-contiguous.
        regime: (n,) int64 regime of each row (all 0 for one regime).
        mu: (regimes, channels) float64 means.
        sd: (regimes, channels) float64 scales, already > 0.
    """
    for c in range(y.shape[0]):
        for i in range(y.shape[1]):
            r = regime[i]
            y[c, i] = (y[c, i] - mu[r, c]) / sd[r, c]


@njit(cache=True, nogil=True)
def regime_moments(y, regime, k):
    """Per-regime count, mean and M2 (sum of squared deviations) of each channel, NaNs skipped.

    Two passes (sums, then squared deviations from the mean), as
    :func:`twinflow.tasks.features.partition_moments`'s NumPy path computes them.

    Args:
        y: (channels, n) float64.
        regime: (n,) int64 in ``0..k-1``.
        k: Number of regimes.

    Returns:
        ``(count, mean, m2)``, each (k, channels) float64; mean and M2 are 0 where count is 0.
    """
    n_ch = y.shape[0]
    count = np.zeros((k, n_ch))
    mean = np.zeros((k, n_ch))
    m2 = np.zeros((k, n_ch))
    for c in range(n_ch):
        for i in range(y.shape[1]):
            v = y[c, i]
            if v == v:
                r = regime[i]
                count[r, c] += 1.0
                mean[r, c] += v
        for r in range(k):
            if count[r, c] > 0:
                mean[r, c] /= count[r, c]
        for i in range(y.shape[1]):
            v = y[c, i]
            if v == v:
                r = regime[i]
                d = v - mean[r, c]
                m2[r, c] += d * d
    return count, mean, m2


@njit(cache=True, nogil=True)
def assign_regimes(ops, op_mean, op_scale, centroids):
    """Nearest-centroid regime of each row, as :func:`twinflow.tasks.features.assign_regimes`.

    The array version builds (rows, regimes, settings) temporaries, ~10x this per partition.
    Same float64 operations in the same order (a NaN setting counts as 0), the first of equal
    distances wins, as ``argmin``'s does.

    Args:
        ops: (n, settings) float64 operating settings.
        op_mean: (settings,) float64 means of the fit's sample.
        op_scale: (settings,) float64 standard deviations of the fit's sample.
        centroids: (regimes, settings) float64 k-means centroids in standardised units.

    Returns:
        (n,) int64 regime ids.
    """
    n, d = ops.shape
    k = centroids.shape[0]
    out = np.zeros(n, np.int64)
    z = np.empty(d)
    for i in range(n):
        for j in range(d):
            v = (ops[i, j] - op_mean[j]) / op_scale[j]
            z[j] = 0.0 if v != v else v
        best = np.inf
        arg = 0
        for r in range(k):
            acc = 0.0
            for j in range(d):
                e = z[j] - centroids[r, j]
                acc += e * e
            if acc < best:
                best = acc
                arg = r
        out[i] = arg
    return out


@njit(cache=True, nogil=True)
def nan_counts_rows(out):
    """NaN count of each row of a (features, n) float32 array, without a (features, n) mask."""
    counts = np.zeros(out.shape[0], np.int64)
    for f in range(out.shape[0]):
        m = 0
        for i in range(out.shape[1]):
            if out[f, i] != out[f, i]:
                m += 1
        counts[f] = m
    return counts


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on a tiny input."""
    y = np.zeros((1, 3))
    out = np.empty((6, 3), np.float32)
    starts = np.array([0, 3], np.int64)
    rolling_into(y, np.arange(3.0), starts, np.array([2], np.int64), np.arange(5, dtype=np.int64), 1, out, 0)
    rolling_time_into(y, np.arange(3.0), starts, np.array([2.0]), np.arange(5, dtype=np.int64), 1, out, 0)
    ewm_into(y, starts, np.array([2], np.int64), 1, out, 5)
    regime = np.zeros(3, np.int64)
    regime_moments(y, regime, 1)
    assign_regimes(np.zeros((3, 2)), np.zeros(2), np.ones(2), np.zeros((2, 2)))
    normalise_(y, regime, np.zeros((1, 1)), np.ones((1, 1)))
    nan_counts_rows(out)
