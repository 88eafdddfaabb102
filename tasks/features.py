"""Feature engineering: per-asset window features, regime normalisation and the RUL label.

Pure functions over pandas frames and an *array module* ``xp`` (``numpy`` on CPU, ``cupy`` on
GPU workers), so one code path serves both. Every window kernel is vectorised over all rows and
channels of a partition at once; Python loops run only over windows, doubling levels (log2 of the
window) or EWM scan steps (log2 of the EWM horizon), never over rows or assets.

A partition holds whole assets sorted by ``(asset_id, cycle)``; windows are clipped at the
asset's first row, so they never cross assets. The stage is three passes over the lake, each a
map over partitions on the Dask cluster whose results are small (a sample, moments, a summary):

1. sample the operating settings and cluster them into regimes (k-means; ``auto`` picks k);
2. per-regime moments of every channel -> per-regime mean/std and constant/all-NaN channels;
3. normalise, compute window features and the label, write one Parquet file per partition.

I/O sits at the edges (:func:`plan_partitions`, :func:`read_partition`, :func:`write_partition`);
the thin Prefect ``@task`` wrappers at the bottom add logging and retries.

The window kernels live in :mod:`twinflow.tasks.feature_kernels` (re-exported here).

Why this stays one module (~890 lines): what is left is the one pipeline of the stage (params,
regime fit, per-partition transform, I/O edges, partition jobs, their Dask drivers and the two
Prefect tasks), whose parts share ``FeatureParams``/``FitStats`` and call each other in pass
order. The I/O edges are being rewritten to read through :mod:`twinflow.lake`; splitting the
regime fit and the drivers out (they need the params in a module of their own) is the next step,
after that rewrite lands, so that the two changes do not collide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from twinflow import contracts
from twinflow.errors import ConfigError
from twinflow.refs import LakeSnapshot
from twinflow.tasks.feature_kernels import (  # the window kernels; re-exported for callers of this module
    array_module,
    asset_shift,
    ewm_mean,
    group_bounds,
    group_ends,
    gstart_from_pos,
    resolve_backend,
    rolling_features,
    to_numpy,
)

log = logging.getLogger("twinflow.features")

STATS = ("mean", "std", "min", "max", "slope")
Stat = Literal["mean", "std", "min", "max", "slope"]
# Parameters that change how the stage runs, not what it computes: excluded from the cache digest.
EXECUTION_FIELDS = frozenset({"partition_bytes", "backend", "compression"})
FIT_FILE = "_fit.json"
MANIFEST_FILE = "_manifest.json"
SINCE_START = "cycle_since_start"
REGIME = "regime"
LABEL = "rul"


class FeatureParams(BaseModel):
    """What the features stage computes, validated before any work.

    Attributes:
        windows: Rolling window lengths in rows (cycles), each > 0.
        stats: Rolling statistics per window and channel.
        channels: Channels to use; None means every sensor channel (``s1..s21``) present.
        ewm_spans: Spans of exponentially-weighted means (pandas ``ewm(span=...)``, adjust=True).
        min_periods: Valid rows a window needs for a value (std and slope need 2); at most the
            smallest window. With 1, the first rows of an asset get partial-window features.
        regimes: Number of operating regimes (k-means on the operating settings), or ``"auto"``.
        max_regimes: Largest k tried by ``auto``.
        regime_tol: ``auto`` picks the smallest k whose k-means inertia is below this fraction
            of the one-cluster inertia (discrete set points collapse to ~0; noise never does).
        normalise: Standardise channels per regime (mean/std of the fit) before windowing.
        drop_constant: Drop channels that are constant (within every regime) or all NaN.
        constant_tol: Relative std below which a channel counts as constant.
        label: Add the RUL label (run-to-failure data only; False e.g. for C-MAPSS test files).
        rul_cap: Piecewise-linear cap of the label; None for no cap.
        sample_rows: Rows of operating settings sampled to fit the regimes.
        sample_files: Lake files (a random subset, by ``seed``) that sample is drawn from; all
            of them when there are fewer. Saves a full pass over a large lake.
        seed: Seed of the sampling and k-means.
        partition_bytes: Target Parquet bytes per partition (whole assets are never split).
        backend: Array module: ``auto`` (CuPy when the cluster mode is cuda), ``numpy``, ``cupy``.
        compression: Parquet codec of the feature files. Measured on a 190k-row partition of
            170 float32 features: ``snappy`` (default) files are ~26% smaller than ``none``,
            which writes ~30% faster (the write is up to half of the transform on a 2-worker
            cluster), worth it for a feature set on a fast local disk; ``zstd`` (level 1) files
            are ~14% smaller than snappy's and ~1.5x slower to write. Like ``partition_bytes``
            and ``backend`` it does not change the values, so it is not part of the cache key.
    """

    model_config = ConfigDict(extra="forbid")

    windows: list[PositiveInt] = Field(default_factory=lambda: [5, 10, 20, 30], min_length=1)
    stats: list[Stat] = Field(default_factory=lambda: list(STATS))
    channels: list[str] | None = None
    ewm_spans: list[PositiveInt] = Field(default_factory=lambda: [10])
    min_periods: PositiveInt = 1
    regimes: PositiveInt | Literal["auto"] = "auto"
    max_regimes: PositiveInt = 8
    regime_tol: float = Field(1e-3, gt=0, lt=1)
    normalise: bool = True
    drop_constant: bool = True
    constant_tol: float = Field(1e-6, ge=0)
    label: bool = True
    rul_cap: PositiveInt | None = 125
    sample_rows: PositiveInt = 50_000
    sample_files: PositiveInt = 256
    seed: int = 0
    partition_bytes: PositiveInt = 32 * 2**20
    backend: Literal["auto", "numpy", "cupy"] = "auto"
    compression: Literal["snappy", "lz4", "zstd", "none"] = "snappy"

    @field_validator("windows", "ewm_spans", "stats")
    @classmethod
    def _sorted_unique(cls, v: list) -> list:
        return sorted(set(v), key=v.index) if v and isinstance(v[0], str) else sorted(set(v))

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("channels must name at least one channel (or be null for all)")
        return v if v is None else list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _min_periods_fit(self) -> "FeatureParams":
        if self.min_periods > min(self.windows):
            raise ValueError(f"min_periods={self.min_periods} exceeds the smallest window "
                             f"{min(self.windows)}")
        return self

    def digest_payload(self) -> dict[str, Any]:
        """The parameters that determine the output (execution-only fields excluded)."""
        return self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))


class FitStats(BaseModel):
    """Normalisation statistics of a training feature set, reused to transform other data.

    Attributes:
        channels: Channels considered (before dropping).
        kept: Channels that become features, in order.
        dropped: Dropped channel -> reason (``constant`` or ``all-NaN``).
        op_columns: Operating settings used for regimes (constant ones are left out).
        op_mean, op_scale: Standardisation of ``op_columns`` before clustering.
        centroids: k-means centroids in standardised space; empty for a single regime.
        mean, std: Per regime (outer) and kept channel (inner).
        rows: Rows seen by the fit.
    """

    channels: list[str]
    kept: list[str]
    dropped: dict[str, str] = Field(default_factory=dict)
    op_columns: list[str] = Field(default_factory=list)
    op_mean: list[float] = Field(default_factory=list)
    op_scale: list[float] = Field(default_factory=list)
    centroids: list[list[float]] = Field(default_factory=list)
    mean: list[list[float]] = Field(default_factory=list)
    std: list[list[float]] = Field(default_factory=list)
    normalised: bool = True
    rows: int = 0

    @property
    def n_regimes(self) -> int:
        return max(1, len(self.centroids))


# ----------------------------------------------------------------------------------------------
# Regimes and normalisation statistics
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The per-partition transform
# ----------------------------------------------------------------------------------------------


def feature_names(fit: FitStats, params: FeatureParams) -> list[str]:
    """The model-input columns, in output order (grouped by feature, then channel)."""
    names = [SINCE_START]
    if fit.n_regimes > 1:
        names.append(REGIME)
    suffix = "_norm" if fit.normalised else ""
    names.extend(f"{ch}{suffix}" for ch in fit.kept)
    for w in params.windows:
        for s in params.stats:
            names.extend(f"{ch}_{s}_{w}" for ch in fit.kept)
    for span in params.ewm_spans:
        names.extend(f"{ch}_ewm_{span}" for ch in fit.kept)
    return names


def compiled_kernels():
    """The numba CPU kernels module (:mod:`twinflow.tasks.features_cpu`), or None without numba."""
    try:
        from twinflow.tasks import features_cpu
    except ImportError:
        return None
    return features_cpu


def _codes_if_ordered(frame: pd.DataFrame) -> np.ndarray | None:
    """Asset codes when ``frame`` is already in (asset, time) order with unique keys, else None.

    A lake partition of whole assets usually is (its files are listed by asset and written in
    time order), and checking costs a factorize instead of a two-key sort and a dedupe.
    """
    if len(frame) == 0:
        return None
    codes, uniques = pd.factorize(frame[contracts.ASSET], sort=False)
    if (codes < 0).any() or not pd.Index(uniques).is_monotonic_increasing:
        return None
    step = np.diff(codes)
    dt = np.diff(frame[contracts.TIME].to_numpy())
    if (step < 0).any() or ((step == 0) & ~(dt > 0)).any():  # ~(>): a NaN time is not ordered
        return None
    return codes


def compute_features(frame: pd.DataFrame, fit: FitStats, params: FeatureParams, xp=np,
                     engine: Literal["auto", "compiled", "array"] = "auto",
                     buffer: np.ndarray | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Features of one partition of whole assets.

    Args:
        frame: Rows of whole assets with ``asset_id``, ``cycle``, the operating settings and the
            fit's channels; any order (sorted here; a repeated (asset, cycle) keeps the last row).
        fit: Normalisation statistics (:func:`finalize_fit` or a training set's ``_fit.json``).
        params: What to compute.
        xp: Array module the kernels run on.
        engine: Window kernels: ``compiled`` (numba, CPU only), ``array`` (the ``xp`` kernels,
            the GPU path), or ``auto``: compiled when ``xp`` is NumPy and numba is installed.
        buffer: A flat float32 array the features are written into when it is large enough
            (the result is then a view of it); a worker reuses one across partitions.

    Returns:
        ``(keys, features)``: a frame with ``asset_id``, ``cycle`` (and ``rul`` when
        ``params.label``), and a float32 NumPy array (n_features, rows) in
        :func:`feature_names` order, feature-major so each column is contiguous.
    """
    codes = _codes_if_ordered(frame)
    if codes is None:
        frame = frame.sort_values([contracts.ASSET, contracts.TIME], kind="stable")
        frame = frame.drop_duplicates([contracts.ASSET, contracts.TIME], keep="last")
        codes = pd.factorize(frame[contracts.ASSET], sort=False)[0]
    n = len(frame)
    names = feature_names(fit, params)
    keys = pd.DataFrame({contracts.ASSET: frame[contracts.ASSET].reset_index(drop=True),
                         contracts.TIME: frame[contracts.TIME].to_numpy(dtype=np.int32)})
    size = len(names) * n
    if buffer is not None and buffer.dtype == np.float32 and buffer.size >= size:
        out = buffer[:size].reshape(len(names), n)
    else:
        out = np.empty((len(names), n), dtype=np.float32)
    if n == 0:
        if params.label:
            keys[LABEL] = np.zeros(0, dtype=np.int32)
        return keys, out
    codes = xp.asarray(codes)
    cycle = xp.asarray(frame[contracts.TIME].to_numpy(dtype=np.int64))
    gstart, pos = group_bounds(codes, xp)
    t = (cycle - cycle[gstart]).astype(xp.float64)
    # Channels-first: each channel's rows are contiguous for the window kernels and the output.
    y = xp.asarray(np.ascontiguousarray(frame[fit.kept].to_numpy(dtype=np.float64).T))
    compiled = compiled_kernels() if engine != "array" and xp is np else None
    if engine == "compiled" and compiled is None:
        raise ConfigError("engine='compiled' needs numba and NumPy arrays (pip install numba)")
    regime = None
    if fit.n_regimes > 1:
        ops = xp.asarray(frame[fit.op_columns].to_numpy(dtype=np.float64))
        regime = assign_regimes(ops, fit.op_mean, fit.op_scale, fit.centroids, xp, compiled)
    if fit.normalised:
        mu = xp.asarray(fit.mean)
        sd = xp.asarray(fit.std)
        sd = xp.where(sd > 0, sd, 1.0)
        if compiled is not None:
            if not y.flags.owndata:  # a view of the frame's block: normalise a private copy
                y = y.copy()
            compiled.normalise_(y, np.zeros(n, np.int64) if regime is None else regime.astype(np.int64, copy=False),
                                np.ascontiguousarray(mu, dtype=np.float64), np.ascontiguousarray(sd, dtype=np.float64))
        elif regime is None:
            y = (y - mu[0][:, None]) / sd[0][:, None]
        else:
            y = (y - mu.T[:, regime]) / sd.T[:, regime]
    row = 0

    def put(block) -> None:
        nonlocal row
        out[row: row + block.shape[0]] = to_numpy(block)
        row += block.shape[0]

    put(t[None, :])
    if regime is not None:
        put(regime[None, :])
    put(y)
    if compiled is not None:
        # Straight into the float32 output: no per-feature temporaries.
        y = np.ascontiguousarray(y, dtype=np.float64)
        starts = np.append(np.flatnonzero(pos == 0), n).astype(np.int64)
        codes = np.array([compiled.STAT_CODES[s] for s in params.stats], dtype=np.int64)
        compiled.rolling_into(y, t, starts, np.array(params.windows, dtype=np.int64), codes,
                              params.min_periods, out, row)
        row += len(params.windows) * len(codes) * y.shape[0]
        compiled.ewm_into(y, starts, np.array(params.ewm_spans, dtype=np.int64), params.min_periods, out, row)
        row += len(params.ewm_spans) * y.shape[0]
    else:
        shift = asset_shift(y, gstart, xp)
        rolled = rolling_features(y, t, gstart, params.windows, params.stats, params.min_periods, xp, shift)
        for w in params.windows:
            for s in params.stats:
                put(rolled.pop((s, w)))
        for span in params.ewm_spans:
            put(ewm_mean(y, pos, span, params.min_periods, xp, shift))
    assert row == len(names)
    if params.label:
        last = cycle[group_ends(gstart, xp)]
        rul = last - cycle
        if params.rul_cap is not None:
            rul = xp.minimum(rul, params.rul_cap)
        keys[LABEL] = to_numpy(rul).astype(np.int32)
    return keys, out


# ----------------------------------------------------------------------------------------------
# I/O edges
# ----------------------------------------------------------------------------------------------


def _fs(path: str, storage_options: dict | None = None):
    import fsspec

    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def list_lake_files(snapshot: LakeSnapshot, storage_options: dict | None = None
                    ) -> dict[str, list[tuple[str, int]]]:
    """Data files of the snapshot's table version grouped by asset: ``{asset: [(path, bytes)]}``.

    Exactly the files of that version (``twinflow.lake.list_files``), so a stage re-run on an older
    snapshot reads the older rows.

    Raises:
        ConfigError: when the dataset has no table or no rows.
    """
    from twinflow import lake

    return lake.list_files(snapshot, storage_options)


def lake_fingerprint(groups: dict[str, list[tuple[str, int]]], dataset_path: str,
                     storage_options: dict | None = None) -> str:
    """Digest of the dataset's file listing (paths, sizes, modification times).

    Part of the cache key, so that a lake rewritten under an unchanged snapshot still recomputes.
    """
    fs, _ = _fs(dataset_path, storage_options)
    h = hashlib.sha256()
    for asset in sorted(groups):
        for path, size in groups[asset]:
            try:
                info = fs.info(path)
                mtime = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
            except OSError:  # a file vanishing between listing and here changes the digest too
                mtime = "?"
            h.update(f"{path}|{size}|{mtime}\n".encode())
    return h.hexdigest()[:16]


def plan_partitions(groups: dict[str, list[tuple[str, int]]], target_bytes: int,
                    min_partitions: int = 1) -> list[list[str]]:
    """Pack whole assets into partitions of about ``target_bytes`` of Parquet each.

    Args:
        groups: :func:`list_lake_files`'s listing.
        target_bytes: Upper target per partition (bounds a worker's memory).
        min_partitions: Make at least this many partitions when there are enough assets (so
            every worker gets several and the last ones do not run alone).
    """
    total = sum(b for files in groups.values() for _, b in files)
    target_bytes = max(1, min(target_bytes, -(-total // max(1, min_partitions))))
    parts: list[list[str]] = []
    current: list[str] = []
    size = 0
    for asset in sorted(groups):
        files = groups[asset]
        asset_bytes = sum(b for _, b in files)
        if current and size + asset_bytes > target_bytes:
            parts.append(current)
            current, size = [], 0
        current.extend(p for p, _ in files)
        size += asset_bytes
    if current:
        parts.append(current)
    return parts


def read_schema_columns(path: str, storage_options: dict | None = None) -> list[str]:
    """Column names of one lake file."""
    import pyarrow.parquet as pq

    fs, p = _fs(path, storage_options)
    with fs.open(p, "rb") as fh:
        return list(pq.read_schema(fh).names)


def read_partition(files: Sequence[str], columns: Sequence[str],
                   storage_options: dict | None = None) -> pd.DataFrame:
    """Read the given lake files (whole assets) into one frame with ``columns``."""
    from twinflow import lake

    frame = lake.read_files(files, columns, storage_options).to_pandas()
    if contracts.ASSET in frame.columns:
        frame[contracts.ASSET] = frame[contracts.ASSET].astype(str)
    return frame


def write_partition(keys: pd.DataFrame, features: np.ndarray, names: Sequence[str], path: str,
                    compression: str = "snappy") -> None:
    """Write one partition's keys and feature matrix (feature-major) as a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key_table = pa.Table.from_pandas(keys, preserve_index=False)
    arrays = [*key_table.columns, *(pa.array(features[i]) for i in range(len(names)))]
    table = pa.Table.from_arrays(arrays, names=[*keys.columns, *names])
    # Dictionary encoding of float features costs ~10x the write time and saves nothing; min/max
    # statistics of 170 float columns cost ~25% of it and serve no reader (they filter on the keys).
    pq.write_table(table, path, use_dictionary=[contracts.ASSET], write_statistics=list(keys.columns),
                   compression=compression)


def nan_counts(keys: pd.DataFrame, features: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """NaN count per output column."""
    counts = {c: int(keys[c].isna().sum()) for c in keys.columns}
    compiled = compiled_kernels()
    if not features.size:
        per_feature = np.zeros(len(names), int)
    elif compiled is not None and isinstance(features, np.ndarray) and features.dtype == np.float32:
        per_feature = compiled.nan_counts_rows(features)  # no (features, rows) boolean temporary
    else:
        per_feature = np.isnan(features).sum(axis=1)
    counts.update({name: int(v) for name, v in zip(names, per_feature)})
    return counts


# ----------------------------------------------------------------------------------------------
# Partition jobs (run on Dask workers) and their drivers
# ----------------------------------------------------------------------------------------------


def sample_job(frame: pd.DataFrame, op_columns: Sequence[str], n: int, seed: int) -> np.ndarray:
    """One partition's share of the operating-settings sample (pass 1)."""
    return sample_operating_settings(frame, op_columns, n, seed)


_BUFFERS = threading.local()


def _feature_buffer(frame: pd.DataFrame, fit: FitStats, params: FeatureParams) -> np.ndarray:
    # A worker's partitions are of similar size: one output buffer per thread, grown when needed,
    # instead of a fresh ~100 MB array per partition that the worker (which trims freed memory
    # back to the OS) page-faults in again every time.
    size = len(feature_names(fit, params)) * len(frame)
    buf = getattr(_BUFFERS, "features", None)
    if buf is None or buf.size < size:
        buf = _BUFFERS.features = np.empty(int(size * 1.25) + 1, dtype=np.float32)
    return buf


def transform_job(frame: pd.DataFrame, fit: FitStats, params: FeatureParams, backend: str,
                  out_dir: str, index: int) -> dict[str, Any]:
    """Compute one partition's features and write them; return its summary (rows, NaN counts)."""
    xp = array_module(backend)
    keys, feats = compute_features(frame, fit, params, xp, buffer=_feature_buffer(frame, fit, params))
    names = feature_names(fit, params)
    name = f"part-{index:05d}.parquet"
    if len(keys):
        write_partition(keys, feats, names, os.path.join(out_dir, name), params.compression)
    return {"file": name if len(keys) else None, "rows": len(keys),
            "assets": int(keys[contracts.ASSET].nunique()) if len(keys) else 0,
            "nan": nan_counts(keys, feats, names)}


def stage_digest(snapshot_digest: str, lake_fp: str, params: FeatureParams,
                 fit_from_digest: str | None, code: str) -> str:
    """Cache key of a feature set: input snapshot, lake listing, parameters, fit source, code."""
    payload = json.dumps({"snapshot": snapshot_digest, "lake": lake_fp, "params": params.digest_payload(),
                          "fit_from": fit_from_digest, "code": code}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def code_version(*modules: Any) -> str:
    """Digest of the source files of the given modules (this one and its CPU kernels always included)."""
    h = hashlib.sha256()
    kernels = str(Path(__file__).with_name("features_cpu.py"))
    for path in sorted({__file__, kernels, *(getattr(m, "__file__", m) for m in modules)}):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def load_fit(feature_set_path: str) -> FitStats:
    """The fit stored beside a feature set.

    Raises:
        ConfigError: when the feature set has no ``_fit.json``.
    """
    path = Path(feature_set_path) / FIT_FILE
    if not path.exists():
        raise ConfigError(f"{feature_set_path} has no {FIT_FILE}; pass a feature set written by the "
                          "features stage as fit_from")
    return FitStats.model_validate_json(path.read_text())


def summarise(parts: Sequence[dict[str, Any]], names: Sequence[str], key_columns: Sequence[str]
              ) -> dict[str, Any]:
    """Combine partition summaries: rows, assets, files and NaN count per column."""
    rows = sum(p["rows"] for p in parts)
    nan: dict[str, int] = {c: 0 for c in [*key_columns, *names]}
    for p in parts:
        for c, v in p["nan"].items():
            nan[c] = nan.get(c, 0) + v
    return {"rows": rows, "assets": sum(p["assets"] for p in parts),
            "files": [p["file"] for p in parts if p["file"]], "nan_counts": nan,
            "columns": [*key_columns, *names]}


def new_temp_dir(final: Path) -> Path:
    """A hidden sibling of ``final`` to write into before the atomic rename."""
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> bool:
    """Rename ``tmp`` to ``final`` atomically; False (and ``tmp`` removed) if another run won."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if (final / MANIFEST_FILE).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


# ----------------------------------------------------------------------------------------------
# Drivers: run the partition jobs on the Dask cluster, collect only small results
# ----------------------------------------------------------------------------------------------


def _dask():
    from twinflow import runtime

    return runtime.using_dask()


def lake_frame(parts: Sequence[Sequence[str]], columns: Sequence[str], storage_options: dict | None = None):
    """A dask DataFrame over the lake, one partition per group of whole assets."""
    import dask.dataframe as dd

    meta = pd.DataFrame({c: pd.Series(dtype=object if c == contracts.ASSET else
                                      ("int32" if c == contracts.TIME else "float64"))
                         for c in columns})
    return dd.from_map(read_partition, [list(p) for p in parts], columns=list(columns),
                       storage_options=storage_options, meta=meta, label="read-lake",
                       enforce_metadata=False)


def _run_per_partition(ddf, fn, *args: Any) -> list[Any]:
    """``fn(partition, *args)`` for every partition on the cluster; gathers only the results."""
    import dask

    jobs = [dask.delayed(fn, pure=False)(part, *args) for part in ddf.to_delayed()]
    with _dask() as client:
        return client.gather(client.compute(jobs))


def sample_partitions(parts: Sequence[Sequence[str]], n_files: int, seed: int) -> list[list[str]]:
    """A random subset of ``n_files`` files of ``parts`` (all when fewer), grouped as they were."""
    total = sum(len(p) for p in parts)
    if total <= n_files:
        return [list(p) for p in parts]
    keep = set(np.random.default_rng(seed).choice(total, size=n_files, replace=False).tolist())
    out, i = [], 0
    for part in parts:
        chosen = [f for j, f in enumerate(part, start=i) if j in keep]
        i += len(part)
        if chosen:
            out.append(chosen)
    return out


def fit_statistics(parts: Sequence[Sequence[str]], channels: Sequence[str], op_columns: Sequence[str],
                   params: FeatureParams, storage_options: dict | None = None) -> FitStats:
    """Passes 1-2 on the cluster: regimes from a sample of operating settings (read from a random
    subset of files, see ``sample_files``), then moments over every row."""
    if not params.normalise and not params.drop_constant and params.regimes == 1:
        return identity_fit(channels)
    op_columns = list(op_columns)
    op_mean, op_scale, centroids = np.zeros(0), np.ones(0), np.empty((0, 0))
    if params.regimes != 1 and op_columns:
        sample_parts = sample_partitions(parts, params.sample_files, params.seed)
        per_part = max(1, -(-params.sample_rows // len(sample_parts)))
        import dask

        ddf = lake_frame(sample_parts, op_columns, storage_options)  # no keys: the sample needs none
        jobs = [dask.delayed(sample_job, pure=False)(p, op_columns, per_part, params.seed + i)
                for i, p in enumerate(ddf.to_delayed())]
        with _dask() as client:
            samples = client.gather(client.compute(jobs))
        sample = np.concatenate([s for s in samples if len(s)] or [np.empty((0, len(op_columns)))])
        op_columns, op_mean, op_scale, centroids = fit_regimes(sample, op_columns, params)
    if len(centroids) == 0:
        op_columns, op_mean, op_scale = [], np.zeros(0), np.ones(0)
    # Moments need no keys: decoding the asset strings and cycles would be ~20% of this pass.
    moments = _run_per_partition(
        lake_frame(parts, [*op_columns, *channels], storage_options),
        partition_moments, list(channels), op_columns, op_mean, op_scale, centroids)
    return finalize_fit(combine_moments(moments), list(channels), op_columns, op_mean, op_scale,
                        centroids, params)


def transform_and_write(parts: Sequence[Sequence[str]], fit: FitStats, params: FeatureParams,
                        backend: str, out_dir: str, storage_options: dict | None = None
                        ) -> list[dict[str, Any]]:
    """Pass 3 on the cluster: features of every partition written under ``out_dir``."""
    import dask

    op_columns = fit.op_columns if fit.n_regimes > 1 else []
    ddf = lake_frame(parts, [contracts.ASSET, contracts.TIME, *op_columns, *fit.kept], storage_options)
    jobs = [dask.delayed(transform_job, pure=False)(p, fit, params, backend, out_dir, i)
            for i, p in enumerate(ddf.to_delayed())]
    with _dask() as client:
        from twinflow.runtime import gpu_resources

        # CuPy partitions must land on GPU workers of a mixed cluster.
        return client.gather(client.compute(jobs, resources=gpu_resources(client, backend == "cupy")))


# ----------------------------------------------------------------------------------------------
# Prefect tasks: coarse (one per pass), the fine-grained work is Dask tasks inside them
# ----------------------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="features-fit", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def fit_task(parts: list[list[str]], channels: list[str], op_columns: list[str], params: FeatureParams,
             storage_options: dict | None = None) -> FitStats:
    """Fit regimes and normalisation statistics over the lake partitions (passes 1-2)."""
    from prefect import get_run_logger

    fit = fit_statistics(parts, channels, op_columns, params, storage_options)
    get_run_logger().info("fit: %d regime(s), kept %d channel(s), dropped %s", fit.n_regimes,
                          len(fit.kept), fit.dropped or "none")
    return fit


@task(name="features-transform", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def transform_task(parts: list[list[str]], fit: FitStats, params: FeatureParams, backend: str,
                   out_dir: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Compute and write the features of every partition into ``out_dir`` (pass 3)."""
    from prefect import get_run_logger

    # A retry starts from an empty directory: no file of a failed attempt survives.
    for leftover in Path(out_dir).glob("part-*.parquet"):
        leftover.unlink()
    summaries = transform_and_write(parts, fit, params, backend, out_dir, storage_options)
    get_run_logger().info("features: %d rows in %d partition(s) on %s", sum(s["rows"] for s in summaries),
                          len(summaries), backend)
    return summaries
