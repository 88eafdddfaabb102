"""Window kernels of the features stage over an array module ``xp`` (NumPy on CPU, CuPy on GPU).

Arrays are ``(rows, channels)`` with rows sorted by asset and time; every kernel is vectorised
over all rows and channels of a partition at once, and windows are clipped at each asset's first
row so they never cross assets. Python loops run only over windows, doubling levels (log2 of the
window) or EWM scan steps (log2 of the EWM horizon), never over rows or assets. These are the GPU
path and the reference of the compiled CPU kernels in :mod:`twinflow.tasks.features.cpu`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from twinflow.errors import ConfigError

# EWM scan terms whose weight falls below this are dropped: below float64 resolution of the sum.
_EWM_EPS = 1e-18


# ----------------------------------------------------------------------------------------------
# Array module
# ----------------------------------------------------------------------------------------------


def array_module(name: str):
    """Return ``numpy`` or ``cupy`` by name (``cupy`` raises ConfigError when not installed)."""
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError:
            raise ConfigError("backend 'cupy' needs CuPy: pip install 'twinflow[gpu]'") from None
        return cupy
    raise ConfigError(f"unknown array backend {name!r}; use numpy or cupy")


def resolve_backend(backend: str, cluster_mode: str | None) -> str:
    """``auto`` -> ``cupy`` on a cuda cluster, else ``numpy``."""
    if backend == "auto":
        return "cupy" if cluster_mode == "cuda" else "numpy"
    return backend


def to_numpy(a) -> np.ndarray:
    """A host (NumPy) array from a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


# ----------------------------------------------------------------------------------------------
# Window kernels (xp = numpy or cupy); arrays are (rows, channels), rows sorted by asset and time
# ----------------------------------------------------------------------------------------------


def group_bounds(codes, xp=np):
    """Per row: index of its group's first row and its position within the group.

    Args:
        codes: (n,) integer group codes, equal codes contiguous.
    """
    n = codes.shape[0]
    is_start = xp.ones(n, dtype=bool)
    if n > 1:
        is_start[1:] = codes[1:] != codes[:-1]
    starts = xp.nonzero(is_start)[0]
    gstart = starts[xp.cumsum(is_start) - 1]
    pos = xp.arange(n) - gstart
    return gstart, pos


def group_ends(gstart, xp=np):
    """Per row: index of its group's last row (from :func:`group_bounds`'s ``gstart``)."""
    n = gstart.shape[0]
    # Groups are contiguous runs: number them with a cumulative sum instead of a sort and a search.
    is_start = gstart == xp.arange(n)
    starts = xp.nonzero(is_start)[0]
    ends = xp.concatenate([starts[1:] - 1, xp.asarray([n - 1])])
    return ends[xp.cumsum(is_start) - 1]


class _BlockPrefix:
    """Prefix sums along rows restarted every ``block`` rows, for sums over windows <= ``block``.

    A window spans at most two blocks, so its sum is ``P[i] - P[a-1] (+ total of a's block)``
    with every term block-local: the rounding error is that of a sum of ~``block`` terms, not of
    a prefix over the whole partition (which would cancel catastrophically for t^2 or y^2 sums).
    Arrays are channels-first, ``(channels, rows)``.
    """

    def __init__(self, values, block: int, xp):
        self.xp, self.block = xp, block
        r, n = values.shape
        nb = max(1, -(-n // block))
        pad = nb * block - n
        if pad:
            values = xp.concatenate([values, xp.zeros((r, pad), values.dtype)], axis=1)
        self.p3 = xp.cumsum(values.reshape(r, nb, block), axis=2)
        self.totals = self.p3[:, :, -1]
        self.flat = self.p3.reshape(r, nb * block)
        self.n = n

    def window_sum(self, w: int, gstart, partial):
        """Sum over the last ``w`` rows of each row's asset (fewer at the asset's start).

        Args:
            w: Window length (<= block).
            gstart: (n,) first row of each row's asset.
            partial: Indices of rows whose window is clipped by their asset's start.
        """
        xp, p3, b = self.xp, self.p3, self.block
        s3 = xp.empty_like(p3)
        if w < b:
            s3[:, :, w:] = p3[:, :, w:] - p3[:, :, :-w]
        # Rows in the first w of a block: the tail of the previous block plus this block's head.
        s3[:, 1:, :w] = p3[:, 1:, :w] + (self.totals[:, :-1, None] - p3[:, :-1, b - w:])
        s3[:, 0, :w] = p3[:, 0, :w]
        out = s3.reshape(p3.shape[0], -1)[:, : self.n]
        if partial.shape[0]:
            a = gstart[partial]
            prev = xp.where((a % b == 0)[None, :], 0.0, self.flat[:, a - 1])
            cross = ((a // b) != (partial // b))[None, :]
            out[:, partial] = (self.flat[:, partial] - prev
                               + xp.where(cross, self.totals[:, a // b], 0.0))
        return out


    def range_sum(self, a):
        """Sum over rows ``a[i]..i`` of each row ``i`` (``i - a[i] < block``).

        A range spans at most two blocks: this block's prefix up to ``i``, plus the tail of the
        previous block from ``a[i]`` when the range crosses a block boundary.
        """
        xp, b = self.xp, self.block
        i = xp.arange(self.n)
        prev = xp.where((a % b == 0)[None, :], 0.0, self.flat[:, xp.maximum(a - 1, 0)])
        cross = ((a // b) != (i // b))[None, :]
        return self.flat[:, i] - prev + xp.where(cross, self.totals[:, a // b], 0.0)


def _set_nan(a, cond, xp):
    """NaN where ``cond`` (broadcast to ``a``), in place; returns ``a``."""
    if bool(cond.any()):
        a[xp.broadcast_to(cond, a.shape)] = xp.nan
    return a


def _sparse_levels(y, kmax: int, op, xp):
    """levels[k][:, i] = op over rows i-2^k+1..i (NaN-ignoring), for k = 0..kmax."""
    levels = [y]
    for k in range(kmax):
        s = 2**k
        prev = levels[-1]
        nxt = xp.empty_like(prev)
        nxt[:, :s] = prev[:, :s]
        op(prev[:, s:], prev[:, :-s], out=nxt[:, s:])
        levels.append(nxt)
    return levels


def _floor_log2(length, xp):
    k = xp.floor(xp.log2(length.astype(xp.float64))).astype(xp.int64)
    k = xp.where((2 ** (k + 1)) <= length, k + 1, k)
    return xp.where((2**k) > length, k - 1, k)


def _range_extreme(levels, w: int, gstart, pos, partial, op, xp):
    """op over each row's window using sparse-table levels (two overlapping power-of-2 ranges)."""
    kw = int(math.floor(math.log2(w)))
    lv = levels[kw]
    d = w - 2**kw
    out = lv.copy()
    if d:
        out[:, d:] = op(lv[:, d:], lv[:, :-d])
    if partial.shape[0]:
        # Windows clipped at the asset's start: per-row level, redone on those rows only.
        a = gstart[partial]
        ks = _floor_log2(pos[partial] + 1, xp)
        for k in range(kw + 1):
            m = ks == k
            if bool(m.any()):
                sel, start = partial[m], a[m]
                out[:, sel] = op(levels[k][:, sel], levels[k][:, start + 2**k - 1])
    return out


def rolling_features(y, t, gstart, windows: Sequence[int], stats: Sequence[str], min_periods: int,
                     xp=np, shift=None) -> dict[tuple[str, int], Any]:
    """Rolling mean/std/min/max/slope per window over rows of the same asset.

    Matches pandas ``groupby(asset).rolling(w, min_periods)`` (std with ddof=1); ``slope`` is
    the least-squares slope of y against ``t`` over the window's valid rows. NaNs are skipped.

    Args:
        y: (channels, n) float64 values, NaN for missing; rows sorted by asset then time.
        t: (n,) float64 time per row, relative to its asset's start (keeps t^2 sums small).
        gstart: (n,) first row of each row's asset.
        windows: Window lengths in rows.
        stats: Subset of :data:`STATS`.
        min_periods: Valid rows needed for a value.
        shift: :func:`asset_shift` of ``y`` when already computed.

    Returns:
        ``{(stat, window): (channels, n) array}``.
    """
    c, n = y.shape
    if n == 0:
        return {(s, w): xp.empty((c, 0)) for w in windows for s in stats}
    valid = ~xp.isnan(y)
    has_nan = not bool(valid.all())
    shift = asset_shift(y, gstart, xp) if shift is None else shift
    yc = xp.where(valid, y - shift, 0.0) if has_nan else y - shift
    need_sums = {"mean", "std", "slope"} & set(stats)
    block = 1 << max(6, (max(windows) - 1).bit_length())
    pre: dict[str, _BlockPrefix] = {}
    trow = t[None, :]
    m = valid.astype(xp.float64) if has_nan else None
    if need_sums:
        pre["y"] = _BlockPrefix(yc, block, xp)
        if "std" in stats:
            pre["yy"] = _BlockPrefix(yc * yc, block, xp)
        if "slope" in stats:
            pre["ty"] = _BlockPrefix(yc * trow, block, xp)
            pre["t"] = _BlockPrefix(m * trow if has_nan else trow, block, xp)
            pre["tt"] = _BlockPrefix(m * trow * trow if has_nan else trow * trow, block, xp)
    if has_nan:
        pre["m"] = _BlockPrefix(m, block, xp)
    kmax = int(math.floor(math.log2(max(windows))))
    levels = {s: _sparse_levels(y, kmax, xp.fmin if s == "min" else xp.fmax, xp)
              for s in ("min", "max") if s in stats}
    pos = xp.arange(n) - gstart
    out: dict[tuple[str, int], Any] = {}
    for w in windows:
        partial = xp.nonzero(pos < w - 1)[0]
        if has_nan:
            cnt = pre["m"].window_sum(w, gstart, partial)
        else:
            cnt = xp.minimum(pos + 1, w).astype(xp.float64)[None, :]
        too_few = cnt < min_periods
        under2 = too_few | (cnt < 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            if need_sums:
                sy = pre["y"].window_sum(w, gstart, partial)
            if "mean" in stats:
                out[("mean", w)] = _set_nan(sy / cnt + shift, too_few, xp)
            if "std" in stats:
                var = pre["yy"].window_sum(w, gstart, partial) - sy * sy / cnt
                var = xp.maximum(var, 0.0, out=var) / (cnt - 1)
                out[("std", w)] = _set_nan(xp.sqrt(var, out=var), under2, xp)
            if "slope" in stats:
                st = pre["t"].window_sum(w, gstart, partial)
                stt = pre["tt"].window_sum(w, gstart, partial)
                den = cnt * stt - st * st
                bad = under2 | (den <= 1e-12 * xp.maximum(cnt * stt, 1.0))
                num = cnt * pre["ty"].window_sum(w, gstart, partial) - st * sy
                out[("slope", w)] = _set_nan(num / xp.where(bad, 1.0, den), bad, xp)
        for s, lv in levels.items():
            op = xp.fmin if s == "min" else xp.fmax
            out[(s, w)] = _set_nan(_range_extreme(lv, w, gstart, pos, partial, op, xp), too_few, xp)
    return out


def window_starts(t, gstart, length: float, xp=np):
    """Per row: the first row of its asset whose time is in ``(t_i - length, t_i]``.

    Args:
        t: (n,) float64 time relative to each asset's start (>= 0, increasing within an asset).
        gstart: (n,) first row of each row's asset.
        length: Window length in the unit of ``t`` (> 0).
    """
    n = t.shape[0]
    if n == 0:
        return xp.zeros(0, dtype=xp.int64)
    # One increasing key over the partition: each asset's times shifted past the previous asset's
    # last time plus the window, so a search never lands in another asset.
    is_start = gstart == xp.arange(n)
    ends = xp.concatenate([xp.nonzero(is_start)[0][1:] - 1, xp.asarray([n - 1])])
    span = t[ends] + length + 1.0
    offset = xp.concatenate([xp.zeros(1), xp.cumsum(span)[:-1]])
    key = t + offset[xp.cumsum(is_start) - 1]
    left = xp.searchsorted(key, key - length, side="right")
    return xp.maximum(left, gstart).astype(xp.int64)


def time_window_features(y, t, gstart, lengths: Sequence[float], stats: Sequence[str], min_periods: int,
                         xp=np, shift=None) -> dict[tuple[str, int], Any]:
    """Rolling mean/std/min/max/slope over windows of time, per asset.

    Row ``i``'s window holds the rows of its asset whose time is in ``(t_i - length, t_i]``: over a
    gap it holds fewer rows (none are invented), with irregular sampling as many as fell in it.
    Matches pandas ``groupby(asset).rolling("<length>", on=time, min_periods=...)`` (std with
    ddof=1; NaNs skipped, ``min_periods`` counts valid values); ``slope`` is the least-squares slope
    against ``t``. Sums over a window are differences of block-local prefix sums (as in
    :func:`rolling_features`), extremes come from the sparse table's two overlapping power-of-2
    ranges, so the cost does not depend on how many rows a window holds.

    Args:
        y: (channels, n) float64 values, NaN for missing; rows sorted by asset then time.
        t: (n,) float64 time per row relative to its asset's start, in the clock's unit.
        gstart: (n,) first row of each row's asset.
        lengths: Window lengths in the unit of ``t``.
        stats: Subset of :data:`STATS`.
        min_periods: Valid rows needed for a value.
        shift: :func:`asset_shift` of ``y`` when already computed.

    Returns:
        ``{(stat, k): (channels, n) array}`` for the ``k``-th window of ``lengths``.
    """
    c, n = y.shape
    if n == 0:
        return {(s, k): xp.empty((c, 0)) for k in range(len(lengths)) for s in stats}
    starts = [window_starts(t, gstart, float(length), xp) for length in lengths]
    rows = xp.arange(n)
    longest = max(int((rows - a).max()) + 1 for a in starts)
    valid = ~xp.isnan(y)
    has_nan = not bool(valid.all())
    shift = asset_shift(y, gstart, xp) if shift is None else shift
    yc = xp.where(valid, y - shift, 0.0) if has_nan else y - shift
    block = 1 << max(6, (longest - 1).bit_length())
    trow = t[None, :]
    m = valid.astype(xp.float64) if has_nan else xp.ones((1, n))
    pre: dict[str, _BlockPrefix] = {"m": _BlockPrefix(m, block, xp)}
    if {"mean", "std", "slope"} & set(stats):
        pre["y"] = _BlockPrefix(yc, block, xp)
        if "std" in stats:
            pre["yy"] = _BlockPrefix(yc * yc, block, xp)
        if "slope" in stats:
            pre["ty"] = _BlockPrefix(yc * trow, block, xp)
            pre["t"] = _BlockPrefix(m * trow, block, xp)
            pre["tt"] = _BlockPrefix(m * trow * trow, block, xp)
    kmax = int(math.floor(math.log2(longest)))
    levels = {s: _sparse_levels(y, kmax, xp.fmin if s == "min" else xp.fmax, xp)
              for s in ("min", "max") if s in stats}
    out: dict[tuple[str, int], Any] = {}
    for k, a in enumerate(starts):
        cnt = pre["m"].range_sum(a)
        too_few = cnt < min_periods
        under2 = too_few | (cnt < 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            if "y" in pre:
                sy = pre["y"].range_sum(a)
            if "mean" in stats:
                out[("mean", k)] = _set_nan(sy / cnt + shift, too_few, xp)
            if "std" in stats:
                var = pre["yy"].range_sum(a) - sy * sy / cnt
                var = xp.maximum(var, 0.0, out=var) / (cnt - 1)
                out[("std", k)] = _set_nan(xp.sqrt(var, out=var), under2, xp)
            if "slope" in stats:
                st = pre["t"].range_sum(a)
                stt = pre["tt"].range_sum(a)
                den = cnt * stt - st * st
                bad = under2 | (den <= 1e-12 * xp.maximum(cnt * stt, 1.0))
                num = cnt * pre["ty"].range_sum(a) - st * sy
                out[("slope", k)] = _set_nan(num / xp.where(bad, 1.0, den), bad, xp)
        length = rows - a + 1
        ks = _floor_log2(length, xp)
        for s, lv in levels.items():
            op = xp.fmin if s == "min" else xp.fmax
            res = xp.empty_like(y)
            for j in range(kmax + 1):
                sel = xp.nonzero(ks == j)[0]
                if sel.shape[0]:
                    res[:, sel] = op(lv[j][:, sel], lv[j][:, a[sel] + 2**j - 1])
            out[(s, k)] = _set_nan(res, too_few, xp)
    return out


def asset_shift(y, gstart, xp=np):
    """Per asset and channel reference value (broadcast to rows), subtracted before window sums.

    Any value constant within an asset works; the asset's first value keeps the summed terms
    small (so a channel constant over an asset gives a std of exactly 0, not rounding noise).
    Where that value is NaN, the channel's mean over the partition is used.
    """
    c, n = y.shape
    if n == 0:
        return xp.zeros((c, 1))
    first = y[:, gstart]
    missing = xp.isnan(first)
    if bool(missing.any()):
        valid = ~xp.isnan(y)
        cnt = valid.sum(axis=1, keepdims=True)
        glob = xp.where(valid, y, 0.0).sum(axis=1, keepdims=True) / xp.maximum(cnt, 1)
        first = xp.where(missing, glob, first)
    return first


def ewm_mean(y, pos, span: int, min_periods: int = 1, xp=np, shift=None):
    """Exponentially-weighted mean per asset, as pandas ``ewm(span=span, adjust=True).mean()``.

    A log-step (Hillis-Steele) scan of ``S_i = x_i + beta * S_{i-1}``: step k adds the partial sum
    ``2^k`` rows back, within the asset; steps stop once ``beta^(2^k)`` is below float64
    resolution, so the cost is O(log horizon) vectorised passes, independent of asset length.

    Args:
        y: (channels, n) values, NaN for missing (skipped; weights by position, as pandas with
            ``ignore_na=False``).
        pos: (n,) position of each row within its asset.
        span: EWM span (alpha = 2 / (span + 1)).
        min_periods: Valid rows seen so far that a value needs.
        shift: :func:`asset_shift` of ``y`` when already computed.
    """
    c, n = y.shape
    if n == 0:
        return xp.empty((c, 0))
    beta = 1.0 - 2.0 / (span + 1.0)
    valid = ~xp.isnan(y)
    has_nan = not bool(valid.all())
    shift = asset_shift(y, gstart_from_pos(pos, xp), xp) if shift is None else shift
    num = xp.where(valid, y - shift, 0.0) if has_nan else y - shift
    # Without NaNs the weights are the same for every channel: one row serves all.
    den = valid.astype(xp.float64) if has_nan else xp.ones((1, n))
    max_pos = int(pos.max())
    step = 1
    while step <= max_pos and beta**step >= _EWM_EPS:
        f = (beta**step) * (pos[step:] >= step)
        num[:, step:] += f * num[:, :-step]
        den[:, step:] += f * den[:, :-step]
        step *= 2
    with np.errstate(divide="ignore", invalid="ignore"):
        res = num / den + shift
    if min_periods > 1:
        if has_nan:
            cs = xp.cumsum(valid, axis=1)
            base = xp.where((gstart_from_pos(pos, xp) > 0)[None, :],
                            cs[:, xp.maximum(gstart_from_pos(pos, xp) - 1, 0)], 0)
            cnt = cs - base
        else:
            cnt = (pos + 1)[None, :]
        return _set_nan(res, (den == 0) | (cnt < min_periods), xp)
    return _set_nan(res, den == 0, xp)


def gstart_from_pos(pos, xp=np):
    """First row of each row's asset, from positions within assets."""
    return xp.arange(pos.shape[0]) - pos
