"""Pass 3 of the features stage: the features of one partition of whole assets.

:func:`compute_features` is pure (a pandas frame and the fitted statistics in, keys and a feature
matrix out) and runs on a Dask worker per partition (:mod:`.stage` drives it); :func:`feature_names`
says what its rows are. The clock of the fleet contract decides the time axis: cycles, or a
timestamp's time in the clock's unit, which time windows measure and the label is expressed in.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from twinflow import contracts
from twinflow.contract.model import Clock
from twinflow.errors import ConfigError
from twinflow.tasks.features.fit import assign_regimes, compiled_kernels
from twinflow.tasks.features.kernels import (
    asset_shift,
    ewm_mean,
    group_bounds,
    group_ends,
    rolling_features,
    time_window_features,
    to_numpy,
)
from twinflow.tasks.features.params import LABEL, REGIME, FeatureParams, FitStats, since_start_name

__all__ = ["feature_names", "time_ticks", "compute_features"]



_CYCLE_CLOCK = Clock()


def feature_names(fit: FitStats, params: FeatureParams, clock: Clock | None = None) -> list[str]:
    """The model-input columns, in output order (grouped by feature, then channel).

    ``clock``: the data's clock (default a cycle clock); it names the time-since-start column.
    """
    names = [since_start_name((clock or _CYCLE_CLOCK).kind)]
    if fit.n_regimes > 1:
        names.append(REGIME)
    suffix = "_norm" if fit.normalised else ""
    names.extend(f"{ch}{suffix}" for ch in fit.kept)
    for w in [*params.windows, *params.time_windows]:
        for s in params.stats:
            names.extend(f"{ch}_{s}_{w}" for ch in fit.kept)
    for span in params.ewm_spans:
        names.extend(f"{ch}_ewm_{span}" for ch in fit.kept)
    return names


def time_ticks(column: pd.Series) -> tuple[np.ndarray, float]:
    """A time key as int64 ticks and the seconds per tick: cycles (1 each) or timestamps."""
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        values = column.array
        return np.asarray(values.asi8, dtype=np.int64), _TICK_SECONDS[values.unit]
    return column.to_numpy(dtype=np.int64), 1.0


_TICK_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _codes_if_ordered(frame: pd.DataFrame, key: str = contracts.TIME) -> np.ndarray | None:
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
    column = frame[key]
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        if column.isna().any():
            return None
        dt = np.diff(time_ticks(column)[0])
    else:
        dt = np.diff(column.to_numpy())
    if (step < 0).any() or ((step == 0) & ~(dt > 0)).any():  # ~(>): a NaN time is not ordered
        return None
    return codes


def compute_features(frame: pd.DataFrame, fit: FitStats, params: FeatureParams, xp=np,
                     engine: Literal["auto", "compiled", "array"] = "auto",
                     buffer: np.ndarray | None = None, clock: Clock | None = None
                     ) -> tuple[pd.DataFrame, np.ndarray]:
    """Features of one partition of whole assets.

    Time is the clock's: the cycle number, or for a timestamp clock the reading's time in the
    clock's unit (``clock.time_unit``, e.g. hours) since the asset's first row. It is the
    time-since-start feature, the x of every ``slope``, what ``time_windows`` measure (a row's window
    holds its asset's rows with a time in ``(t - window, t]``: fewer rows over a gap, none invented),
    and the label's unit: RUL = the asset's last time (the end of its life in run-to-failure
    data) minus the row's time. Row windows and EWM spans count rows whatever the clock. Missing
    readings (NaN, including sentinels the lake stored as null) are skipped by every statistic, so
    a window's value comes from the valid readings in it (``min_periods`` of them at least).

    Args:
        frame: Rows of whole assets with ``asset_id``, the clock's key column (``cycle`` or
            ``timestamp``), the fit's setting and channel columns; any order (sorted here; a
            repeated (asset, time) keeps the last row).
        fit: Normalisation statistics (:func:`finalize_fit` or a training set's ``_fit.json``).
        params: What to compute.
        xp: Array module the kernels run on.
        engine: Window kernels: ``compiled`` (numba, CPU only), ``array`` (the ``xp`` kernels,
            the GPU path), or ``auto``: compiled when ``xp`` is NumPy and numba is installed.
        buffer: A flat float32 array the features are written into when it is large enough
            (the result is then a view of it); a worker reuses one across partitions.
        clock: The data's clock (the fleet contract's); default a cycle clock.

    Returns:
        ``(keys, features)``: a frame with ``asset_id``, the key column (and ``rul`` when
        ``params.label``: int32 cycles, or float64 in the clock's unit), and a float32 NumPy
        array (n_features, rows) in :func:`feature_names` order, feature-major so each column
        is contiguous.

    Raises:
        ConfigError: ``time_windows`` with a cycle clock.
    """
    clock = clock or _CYCLE_CLOCK
    key = clock.key
    if params.time_windows and clock.kind != "timestamp":
        raise ConfigError(f"time_windows {params.time_windows} need a timestamp clock; this data counts "
                          "cycles: use windows (rows) instead")
    codes = _codes_if_ordered(frame, key)
    if codes is None:
        frame = frame.sort_values([contracts.ASSET, key], kind="stable")
        frame = frame.drop_duplicates([contracts.ASSET, key], keep="last")
        codes = pd.factorize(frame[contracts.ASSET], sort=False)[0]
    n = len(frame)
    names = feature_names(fit, params, clock)
    key_values = (frame[key].to_numpy(dtype=np.int32) if clock.kind == "cycle"
                  else frame[key].reset_index(drop=True))
    keys = pd.DataFrame({contracts.ASSET: frame[contracts.ASSET].reset_index(drop=True), key: key_values})
    size = len(names) * n
    if buffer is not None and buffer.dtype == np.float32 and buffer.size >= size:
        out = buffer[:size].reshape(len(names), n)
    else:
        out = np.empty((len(names), n), dtype=np.float32)
    if n == 0:
        if params.label:
            keys[LABEL] = np.zeros(0, dtype=np.int32 if clock.kind == "cycle" else np.float64)
        return keys, out
    codes = xp.asarray(codes)
    ticks, tick_seconds = time_ticks(frame[key])
    ticks = xp.asarray(ticks)
    gstart, pos = group_bounds(codes, xp)
    # Integer ticks relative to the asset's start first: exact, then one scaling to the clock's unit.
    t = (ticks - ticks[gstart]).astype(xp.float64)
    if clock.kind == "timestamp":
        t *= tick_seconds / clock.unit_seconds
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
    lengths = params.time_window_lengths(clock.unit_seconds)
    if compiled is not None:
        # Straight into the float32 output: no per-feature temporaries.
        y = np.ascontiguousarray(y, dtype=np.float64)
        starts = np.append(np.flatnonzero(pos == 0), n).astype(np.int64)
        codes = np.array([compiled.STAT_CODES[s] for s in params.stats], dtype=np.int64)
        if params.windows:
            compiled.rolling_into(y, t, starts, np.array(params.windows, dtype=np.int64), codes,
                                  params.min_periods, out, row)
            row += len(params.windows) * len(codes) * y.shape[0]
        if lengths:
            compiled.rolling_time_into(y, t, starts, np.array(lengths, dtype=np.float64), codes,
                                       params.min_periods, out, row)
            row += len(lengths) * len(codes) * y.shape[0]
        compiled.ewm_into(y, starts, np.array(params.ewm_spans, dtype=np.int64), params.min_periods, out, row)
        row += len(params.ewm_spans) * y.shape[0]
    else:
        shift = asset_shift(y, gstart, xp)
        if params.windows:
            rolled = rolling_features(y, t, gstart, params.windows, params.stats, params.min_periods, xp, shift)
            for w in params.windows:
                for s in params.stats:
                    put(rolled.pop((s, w)))
        if lengths:
            rolled = time_window_features(y, t, gstart, lengths, params.stats, params.min_periods, xp, shift)
            for k in range(len(lengths)):
                for s in params.stats:
                    put(rolled.pop((s, k)))
        for span in params.ewm_spans:
            put(ewm_mean(y, pos, span, params.min_periods, xp, shift))
    assert row == len(names)
    if params.label:
        last = ticks[group_ends(gstart, xp)]
        if clock.kind == "cycle":
            rul = last - ticks
            if params.rul_cap is not None:
                rul = xp.minimum(rul, params.rul_cap)
            keys[LABEL] = to_numpy(rul).astype(np.int32)
        else:
            rul = (last - ticks).astype(xp.float64) * (tick_seconds / clock.unit_seconds)
            if params.rul_cap is not None:
                rul = xp.minimum(rul, float(params.rul_cap))
            keys[LABEL] = to_numpy(rul)
    return keys, out
