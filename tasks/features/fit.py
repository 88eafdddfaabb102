"""Regimes and normalisation statistics: passes 1 and 2 of the features stage.

Pure functions over pandas frames and NumPy/CuPy arrays: sample the operating settings, cluster them
into regimes (k-means; ``auto`` picks k), per-regime moments of every channel per partition, combined
into per-regime mean/std with constant and all-NaN channels dropped (:class:`FitStats`). The Dask
drivers that run them over the lake's partitions are in :mod:`twinflow.tasks.features`, which
re-exports these names.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import numpy as np
import pandas as pd

from twinflow.errors import ConfigError
from twinflow.tasks.features.params import FeatureParams, FitStats

__all__ = ["sample_operating_settings", "fit_regimes", "assign_regimes", "partition_moments",
           "combine_moments", "finalize_fit", "identity_fit", "compiled_kernels"]


def compiled_kernels():
    """The numba CPU kernels module (:mod:`twinflow.tasks.features.cpu`), or None without numba."""
    try:
        from twinflow.tasks.features import cpu as features_cpu
    except ImportError:
        return None
    return features_cpu


def sample_operating_settings(frame: pd.DataFrame, op_columns: Sequence[str], n: int,
                              seed: int) -> np.ndarray:
    """A uniform random sample of up to ``n`` rows of the operating settings (NaN rows dropped)."""
    ops = frame[list(op_columns)].to_numpy(dtype=np.float64)
    ops = ops[~np.isnan(ops).any(axis=1)]
    if len(ops) <= n:
        return ops
    rng = np.random.default_rng(seed)
    return ops[rng.choice(len(ops), size=n, replace=False)]


def fit_regimes(sample: np.ndarray, op_columns: Sequence[str], params: FeatureParams
                ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Standardise the operating settings and cluster them with k-means.

    Returns:
        ``(op_columns kept, op_mean, op_scale, centroids)``; constant settings are left out and
        ``centroids`` is empty when one regime is chosen.
    """
    empty = (list(op_columns), np.zeros(len(op_columns)), np.ones(len(op_columns)), np.empty((0, 0)))
    if params.regimes == 1 or len(sample) == 0 or not len(op_columns):
        return empty
    mean = sample.mean(axis=0)
    scale = sample.std(axis=0)
    use = scale > 1e-9 * np.maximum(np.abs(mean), 1.0)
    if not use.any():
        return [], np.zeros(0), np.ones(0), np.empty((0, 0))
    cols = [c for c, u in zip(op_columns, use) if u]
    mean, scale = mean[use], scale[use]
    z = (sample[:, use] - mean) / scale
    from sklearn.cluster import KMeans

    from threadpoolctl import threadpool_limits

    def fit(k: int, data: np.ndarray, n_init: int = 3):
        # One thread: the sample is small, and OpenMP threads on a busy host are ~20x slower.
        with threadpool_limits(1):
            return KMeans(n_clusters=k, n_init=n_init, random_state=params.seed).fit(data)

    if params.regimes == "auto":
        # Choosing k on a small subsample is enough: set points separate at any sample size.
        sub = z[np.random.default_rng(params.seed).permutation(len(z))[:4000]]
        distinct = len(np.unique(sub.round(9), axis=0))
        base = float(((sub - sub.mean(axis=0)) ** 2).sum())
        chosen = None
        for k in range(2, min(params.max_regimes, distinct) + 1):
            km = fit(k, sub, n_init=2)
            if km.inertia_ <= params.regime_tol * base:
                chosen = km
                break
        if chosen is None:
            return cols, mean, scale, np.empty((0, 0))
        # Refine the subsample's centroids on the whole sample (one run, already converged).
        with threadpool_limits(1):
            km = KMeans(n_clusters=chosen.n_clusters, init=chosen.cluster_centers_, n_init=1).fit(z)
    else:
        if params.regimes > len(z):
            raise ConfigError(f"regimes={params.regimes} exceeds the {len(z)} sampled rows")
        km = fit(params.regimes, z)
    # Order regimes by their first coordinate so that ids are stable across refits.
    centroids = km.cluster_centers_[np.lexsort(km.cluster_centers_.T[::-1])]
    return cols, mean, scale, centroids


def assign_regimes(ops, op_mean, op_scale, centroids, xp=np, compiled=None):
    """Nearest-centroid regime per row (0 when there is a single regime).

    ``compiled``: the numba kernels module (:func:`compiled_kernels`), used for NumPy input.
    """
    n = ops.shape[0]
    if centroids is None or len(centroids) == 0:
        return xp.zeros(n, dtype=xp.int64)
    if compiled is not None and isinstance(ops, np.ndarray):
        f64 = np.float64
        return compiled.assign_regimes(np.ascontiguousarray(ops, dtype=f64), np.asarray(op_mean, dtype=f64),
                                       np.asarray(op_scale, dtype=f64), np.ascontiguousarray(centroids, dtype=f64))
    z = (ops - xp.asarray(op_mean)) / xp.asarray(op_scale)
    z = xp.where(xp.isnan(z), 0.0, z)
    cent = xp.asarray(centroids)
    d = ((z[:, None, :] - cent[None, :, :]) ** 2).sum(axis=2)
    return xp.argmin(d, axis=1)


def partition_moments(frame: pd.DataFrame, channels: Sequence[str], op_columns: Sequence[str],
                      op_mean, op_scale, centroids,
                      engine: Literal["auto", "array"] = "auto") -> dict[str, np.ndarray]:
    """Per-regime count/mean/M2 of each channel in one partition (combine with :func:`combine_moments`).

    ``engine="auto"`` uses the compiled kernel when numba is installed, ``"array"`` NumPy; they
    agree up to float64 summation order.
    """
    k = max(1, len(centroids))
    y = frame[list(channels)].to_numpy(dtype=np.float64)
    compiled = compiled_kernels() if engine != "array" else None
    reg = assign_regimes(frame[list(op_columns)].to_numpy(dtype=np.float64), op_mean, op_scale,
                         centroids, compiled=compiled) if len(centroids) else np.zeros(len(y), dtype=np.int64)
    if compiled is not None:
        # One pass per channel instead of a masked copy and three reductions per regime.
        count, mean, m2 = compiled.regime_moments(np.ascontiguousarray(y.T), reg.astype(np.int64, copy=False), k)
        return {"count": count, "mean": mean, "m2": m2}
    count = np.zeros((k, y.shape[1]))
    mean = np.zeros((k, y.shape[1]))
    m2 = np.zeros((k, y.shape[1]))
    for r in range(k):
        yr = y[reg == r]
        cnt = (~np.isnan(yr)).sum(axis=0)
        count[r] = cnt
        if len(yr):
            with np.errstate(invalid="ignore"), _quiet():
                mu = np.nanmean(yr, axis=0)
            mu = np.where(cnt > 0, mu, 0.0)
            mean[r] = mu
            m2[r] = np.nansum((yr - mu) ** 2, axis=0)
    return {"count": count, "mean": mean, "m2": m2}


@contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def combine_moments(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-partition moments (Chan et al.'s parallel variance; stable for large offsets)."""
    acc = None
    for p in parts:
        if acc is None:
            acc = {k: v.copy() for k, v in p.items()}
            continue
        na, nb = acc["count"], p["count"]
        n = na + nb
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = p["mean"] - acc["mean"]
            frac = np.where(n > 0, nb / n, 0.0)
            acc["mean"] = acc["mean"] + delta * frac
            acc["m2"] = acc["m2"] + p["m2"] + np.where(n > 0, delta**2 * na * nb / n, 0.0)
        acc["count"] = n
    return acc


def finalize_fit(moments: dict[str, np.ndarray], channels: Sequence[str], op_columns: Sequence[str],
                 op_mean, op_scale, centroids, params: FeatureParams) -> FitStats:
    """Per-regime mean/std and the channels to drop, from combined moments.

    Raises:
        ConfigError: when every channel is constant or all NaN.
    """
    count, mean, m2 = moments["count"], moments["mean"], moments["m2"]
    with np.errstate(divide="ignore", invalid="ignore"):
        std = np.sqrt(np.where(count > 1, m2 / (count - 1), 0.0))
        total = count.sum(axis=0)
        gmean = np.where(total > 0, (mean * count).sum(axis=0) / np.maximum(total, 1), 0.0)
        gm2 = (m2 + count * (mean - gmean) ** 2).sum(axis=0)
        gstd = np.sqrt(np.where(total > 1, gm2 / np.maximum(total - 1, 1), 0.0))
    dropped: dict[str, str] = {}
    for j, ch in enumerate(channels):
        if total[j] == 0:
            dropped[ch] = "all-NaN"
            continue
        if not params.drop_constant:
            continue
        # Normalised per regime, a channel that only moves with the regime carries nothing.
        spread = std[:, j].max() if params.normalise else gstd[j]
        if spread <= params.constant_tol * max(abs(gmean[j]), 1.0):
            dropped[ch] = "constant"
    if not params.drop_constant:
        dropped = {k: v for k, v in dropped.items() if v == "all-NaN"}
    kept = [c for c in channels if c not in dropped]
    if not kept:
        raise ConfigError("no usable channels: every channel is constant or all NaN "
                          f"({', '.join(f'{c}={r}' for c, r in dropped.items())})")
    keep_idx = [channels.index(c) for c in kept]
    # A regime without data for a channel falls back to the channel's global statistics.
    mean_k = np.where(count > 0, mean, gmean)[:, keep_idx]
    std_k = np.where(count > 1, std, gstd)[:, keep_idx]
    return FitStats(channels=list(channels), kept=kept, dropped=dropped, op_columns=list(op_columns),
                    op_mean=[float(v) for v in op_mean], op_scale=[float(v) for v in op_scale],
                    centroids=np.asarray(centroids).tolist() if len(centroids) else [],
                    mean=mean_k.tolist(), std=std_k.tolist(), normalised=params.normalise,
                    rows=int(count.sum(axis=0).max()) if count.size else 0)


def identity_fit(channels: Sequence[str]) -> FitStats:
    """A fit that keeps every channel unnormalised (no passes over the data needed)."""
    return FitStats(channels=list(channels), kept=list(channels), mean=[[0.0] * len(channels)],
                    std=[[1.0] * len(channels)], normalised=False)
