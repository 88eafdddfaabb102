"""A health index and an anomaly score that need no failure labels.

Each channel is standardised per operating regime (the champion's feature fit, or the data's own
statistics), and the per-regime mean of each asset's *early life* (its first ``baseline_fraction``
of readings, when machines are assumed healthy) is the healthy reference. The baseline's spread is
the covariance of ``window``-reading means over those early-life windows, across assets (so it holds
the unit-to-unit differences a healthy fleet has). An asset's anomaly score is the Mahalanobis
distance of the mean of its last ``window`` readings from the healthy reference; its health index is
the share of healthy baseline windows that lie farther away (1: as healthy as new machines, 0: beyond
all of them). Each channel's contribution ``delta_j * (Sigma^-1 delta)_j`` sums to the squared
distance; the largest ones are the evidence a planner sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Baseline:
    """The healthy reference: per-regime offsets, the window-mean covariance, baseline distances."""

    channels: list[str]
    regime_mean: np.ndarray  # (regimes, channels), in standardised units
    precision: np.ndarray  # inverse covariance of window means
    distances: np.ndarray  # sorted distances of the baseline windows themselves
    window: int
    n_windows: int

    def to_dict(self) -> dict:
        return {"channels": self.channels, "window": self.window, "n_windows": self.n_windows,
                "regime_mean": self.regime_mean.tolist(),
                "distance_quantiles": {q: float(np.quantile(self.distances, q)) for q in (0.5, 0.9, 0.99)}}


def standardise(values: np.ndarray, regime: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(values - mean[regime]) / std[regime]`` with zero spreads left unscaled."""
    sd = np.where(std > 0, std, 1.0)
    return (values - mean[regime]) / sd[regime]


def _window_means(z: np.ndarray, starts: np.ndarray, ends: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Means of consecutive ``window``-row blocks inside each [start, end) range (NaN-aware).

    Every block gathered into one (blocks, window, channels) array and averaged in one call, not a
    ``nanmean`` per block: each block's rows are still added in order, so the values are the same.
    """
    import warnings

    first = [np.arange(s, e - window + 1, stride) for s, e in zip(starts, ends)]
    first = np.concatenate(first) if first else np.zeros(0, np.int64)
    if not first.size:
        return np.zeros((0, z.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN channel in a window: NaN, dropped below
        return np.nanmean(z[first[:, None] + np.arange(window)], axis=1).reshape(-1, z.shape[1])


def fit_baseline(z: np.ndarray, regime: np.ndarray, asset_codes: np.ndarray, channels: list[str], *,
                 n_regimes: int, window: int = 10, baseline_fraction: float = 0.25,
                 shrinkage: float = 0.05) -> Baseline:
    """Fit the healthy reference from standardised readings of whole histories (time-ordered per asset).

    Args:
        z: (rows, channels) standardised readings, rows grouped by asset in time order.
        regime: Regime of each row.
        asset_codes: Asset code of each row (contiguous groups).
        channels: Channel names (columns of ``z``).
        n_regimes: Number of regimes.
        window: Readings per window.
        baseline_fraction: Share of each asset's first readings taken as healthy.
        shrinkage: Share of the diagonal mixed into the covariance (keeps it invertible).

    Raises:
        ValueError: no asset has a full early-life window.
    """
    starts = np.flatnonzero(np.r_[True, asset_codes[1:] != asset_codes[:-1]])
    ends = np.r_[starts[1:], len(asset_codes)]
    n_early = np.maximum((baseline_fraction * (ends - starts)).astype(int), 1)
    early = np.zeros(len(z), dtype=bool)
    for s, n in zip(starts, n_early):
        early[s:s + n] = True
    regime_mean = np.zeros((n_regimes, z.shape[1]))
    for r in range(n_regimes):
        rows = early & (regime == r)
        if rows.any():
            regime_mean[r] = np.nan_to_num(np.nanmean(z[rows], axis=0))
    centred = z - regime_mean[regime]
    means = _window_means(centred, starts, starts + n_early, window, stride=max(1, window // 2))
    means = means[np.isfinite(means).all(axis=1)]
    if len(means) < 2:
        raise ValueError(f"no asset has {window} early-life readings to form a healthy baseline")
    cov = np.cov(means, rowvar=False).reshape(z.shape[1], z.shape[1])
    cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov) + 1e-9)
    precision = np.linalg.pinv(cov)
    dist = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", means, precision, means), 0.0))
    return Baseline(channels, regime_mean, precision, np.sort(dist), window, len(means))


def score_recent(z: np.ndarray, regime: np.ndarray, asset_codes: np.ndarray, baseline: Baseline
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Anomaly score, health index and channel contributions of each asset's last ``window`` readings.

    Returns:
        ``(score, health_index, contributions (assets, channels), readings used)``, one row per
        asset group of ``asset_codes`` in order of appearance. An asset without a finite reading
        gets NaN.
    """
    starts = np.flatnonzero(np.r_[True, asset_codes[1:] != asset_codes[:-1]])
    ends = np.r_[starts[1:], len(asset_codes)]
    centred = z - baseline.regime_mean[regime]
    n = len(starts)
    # Window sums and finite counts taken over each window's rows, one row offset at a time for
    # every asset at once: no prefix sum over the whole frame (whose differences carry the rounding of
    # every row before the window), and no pass over rows outside the windows.
    finite = np.isfinite(centred)
    lo = np.maximum(ends - baseline.window, starts)
    tot = np.zeros((n, z.shape[1]))
    cnt = np.zeros((n, z.shape[1]), dtype=np.int64)
    for k in range(int((ends - lo).max(initial=0))):
        rows = lo + k
        inside = rows < ends
        r = rows[inside]
        tot[inside] += np.where(finite[r], centred[r], 0.0)
        cnt[inside] += finite[r]
    with np.errstate(invalid="ignore", divide="ignore"):
        recent = tot / cnt
    used = ends - lo
    # A channel with no finite reading in the window contributes its healthy mean (0).
    delta = np.where(np.isfinite(recent), recent, 0.0)
    none = ~np.isfinite(recent).any(axis=1)
    pd_ = delta @ baseline.precision
    contrib = delta * pd_
    d2 = contrib.sum(axis=1)
    score = np.sqrt(np.maximum(d2, 0.0))
    hi = 1.0 - np.searchsorted(baseline.distances, score, side="right") / len(baseline.distances)
    score[none] = np.nan
    hi = hi.astype("float64")
    hi[none] = np.nan
    contrib[none] = np.nan
    return score, hi, contrib, used


def top_channels(contrib: np.ndarray, recent_sign: np.ndarray | None, channels: list[str], k: int = 3) -> list[str]:
    """The ``k`` channels with the largest contributions per asset, as ``name (+x.x)`` strings."""
    # Ranks, totals and shares for every asset at once (row-wise, as one asset at a time gave them:
    # the same sort per row, the same pairwise sums, the same two float64 operations per share);
    # only the strings are built per asset, from Python floats rather than NumPy scalars.
    any_finite = np.isfinite(contrib).any(axis=1)
    order = np.argsort(-np.nan_to_num(contrib, nan=-np.inf), axis=1)[:, :k]
    totals = np.nansum(np.maximum(contrib, 0.0), axis=1)
    totals = np.where(totals == 0, 1.0, totals)  # ``total or 1.0``
    top = np.take_along_axis(contrib, order, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (100 * top / totals[:, None]).tolist()
    positive = (~(top <= 0)).tolist()  # a NaN among the top k is shown, as one asset at a time did
    signs = None if recent_sign is None else np.take_along_axis(recent_sign, order, axis=1) > 0
    idx = order.tolist()
    out = []
    for i in range(contrib.shape[0]):
        if not any_finite[i]:
            out.append("")
            continue
        parts = []
        for j in range(order.shape[1]):
            if not positive[i][j]:
                continue
            sign = "" if signs is None else ("↑" if signs[i, j] else "↓")
            parts.append(f"{channels[idx[i][j]]}{sign} {share[i][j]:.0f}%")
        out.append(", ".join(parts))
    return out


def codes_of(assets: pd.Series) -> np.ndarray:
    """Contiguous group codes of a time-ordered asset column."""
    return pd.factorize(assets, sort=False)[0]
