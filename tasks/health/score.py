"""Scoring a running fleet: per asset, the last reading, RUL with interval, P(failure within H),
health index, anomaly score, risk band, recommended action with due-by and cost, evidence.

Pure functions over frames; the flow (``flows/health.py``) reads the lake and the registry and
writes the results. An asset that cannot be scored (too few readings, no recent data, features the
model needs that are missing) gets a row with ``status`` and ``reason`` instead of failing the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from twinflow import contracts as C
from twinflow.tasks.health import anomaly as an
from twinflow.tasks.health.lifetime import WeibullFit, posterior_summary, remaining_life_posterior
from twinflow.tasks.health.params import BANDS, HealthParams, bands_of

#: Rows a sequence-free live feature needs before the last reading: the longest window plus the
#: EWM's memory (weight (1 - 2/(span+1))**k < 1e-9 beyond 10 spans), so truncating histories there
#: changes no feature beyond float32 rounding. ``cycle_since_start`` is restored from the full history.
EWM_MEMORY_SPANS = 10

SCORED, PARTIAL, SKIPPED = "scored", "partial", "skipped"


@dataclass
class FleetFrame:
    """Readings of the running fleet in (asset, time) order with the clock as a float time axis.

    The asset groups are found once (``codes``, ``starts``, ``ends``, ``assets``) and shared by
    every score, instead of each one factorizing the asset column again.
    """

    frame: pd.DataFrame
    time_key: str
    time_unit: str
    step: float  # one reading's duration added to an age (1 cycle; 0 for timestamps)
    t: np.ndarray  # time in time units (cycle, or seconds since epoch / unit)
    timestamp_clock: bool
    codes: np.ndarray  # asset group of each row, 0.. in order
    starts: np.ndarray  # first row of each asset
    ends: np.ndarray  # one past its last row
    assets: np.ndarray  # each asset's id (str), in group order

    def tail(self, rows: int) -> np.ndarray:
        """Indices of each asset's last ``rows`` readings, in frame order."""
        lo = np.maximum(self.starts, self.ends - rows)
        cnt = self.ends - lo
        return np.repeat(lo - np.r_[0, np.cumsum(cnt)[:-1]], cnt) + np.arange(int(cnt.sum()))


def _time_axis(frame: pd.DataFrame, contract: Any) -> np.ndarray:
    key = contract.key
    if contract.clock.kind == "timestamp":
        ts = pd.to_datetime(frame[key], utc=True)
        # Seconds from the epoch whatever the frame's resolution (ns, or pandas 3's us).
        secs = (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        return (secs / contract.clock.unit_seconds).to_numpy(dtype="float64")
    return frame[key].to_numpy(dtype="float64")


def _groups(frame: pd.DataFrame, t: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Asset codes and ids when ``frame`` is already in (asset, time) order, else None.

    The recent-rows table and the lake's files come in that order: checking costs one factorize,
    sorting a copy of every column.
    """
    codes, uniques = pd.factorize(frame[C.ASSET], sort=False)
    if len(codes) and ((codes < 0).any() or not pd.Index(uniques).is_monotonic_increasing):
        return None
    same = codes[1:] == codes[:-1]
    if (np.diff(codes) < 0).any() or (same & ~(t[1:] >= t[:-1])).any():  # ~(>=): a NaN time is not ordered
        return None
    return codes, np.asarray(uniques, dtype=object)


def fleet_frame(frame: pd.DataFrame, contract: Any) -> FleetFrame:
    """Order readings by (asset, time) and derive a numeric time axis in the contract's time unit."""
    key = contract.key
    found = None
    if not (pd.api.types.is_string_dtype(frame[C.ASSET]) and frame[C.ASSET].notna().all()):
        # Ids that are not strings (e.g. integers) are ordered as they are, then named as strings.
        frame = frame.sort_values([C.ASSET, key], kind="stable").reset_index(drop=True)
        frame = frame.assign(**{C.ASSET: frame[C.ASSET].astype(str)})
        t = _time_axis(frame, contract)
        found = pd.factorize(frame[C.ASSET], sort=False)[0], None
    else:
        t = _time_axis(frame, contract)
        found = _groups(frame, t)
    if found is None:
        frame = frame.sort_values([C.ASSET, key], kind="stable").reset_index(drop=True)
        t = _time_axis(frame, contract)
        codes, assets = pd.factorize(frame[C.ASSET], sort=False)[0], None
    else:
        codes, assets = found
    frame = frame.reset_index(drop=True)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(codes)].astype(np.int64)
    if assets is None:
        assets = frame[C.ASSET].to_numpy(dtype=object)[starts]
    stamped = contract.clock.kind == "timestamp"
    return FleetFrame(frame, key, contract.time_unit, 0.0 if stamped else 1.0, t, stamped, codes, starts, ends,
                      assets)


def regimes(ff: FleetFrame, fit: Any, rows: np.ndarray | None = None) -> np.ndarray:
    """Operating regime of each reading (of ``rows`` when given; the fit's nearest centroid; 0 without regimes)."""
    from twinflow.tasks.features import assign_regimes

    n = len(ff.frame) if rows is None else len(rows)
    if fit is None or fit.n_regimes <= 1:
        return np.zeros(n, dtype=np.int64)
    ops = ff.frame[fit.op_columns].to_numpy(dtype="float64")
    ops = ops if rows is None else ops[rows]
    return np.asarray(assign_regimes(ops, fit.op_mean, fit.op_scale, fit.centroids), dtype=np.int64)


def standardised(ff: FleetFrame, channels: list[str], fit: Any, regime: np.ndarray,
                 rows: np.ndarray | None = None) -> np.ndarray:
    """Channels standardised per regime with the fit's statistics (or the data's own without a fit).

    ``rows``: only these readings (``regime`` is then theirs); without a fit the statistics still
    come from every reading.
    """
    if fit is not None and fit.mean:
        y = _columns(ff.frame, channels, rows)
        idx = [fit.kept.index(c) for c in channels]
        mean = np.asarray(fit.mean, dtype="float64")[:, idx]
        std = np.asarray(fit.std, dtype="float64")[:, idx]
    else:
        y = ff.frame[channels].to_numpy(dtype="float64")
        every = regime if rows is None else regimes(ff, fit)
        k = int(every.max()) + 1 if len(every) else 1
        mean = np.vstack([np.nanmean(y[every == r], axis=0) for r in range(k)])
        std = np.vstack([np.nanstd(y[every == r], axis=0) for r in range(k)])
        y = y if rows is None else y[rows]
    return an.standardise(y, regime, np.nan_to_num(mean), np.nan_to_num(std))


def _columns(frame: pd.DataFrame, channels: list[str], rows: np.ndarray | None) -> np.ndarray:
    """(rows, channels) float64 of the given rows only: one gather per column, not a copy of every row."""
    if rows is None:
        return frame[channels].to_numpy(dtype="float64")
    out = np.empty((len(rows), len(channels)))
    for j, c in enumerate(channels):
        out[:, j] = frame[c].to_numpy(dtype="float64")[rows]
    return out


def rows_needed(feature_params: Any) -> int:
    """Readings per asset the live features at the last reading can see (:data:`EWM_MEMORY_SPANS`)."""
    return max(feature_params.windows or [1]) + EWM_MEMORY_SPANS * max(feature_params.ewm_spans or [1]) + 1


def recent_rows(feature_params: Any | None, params: HealthParams) -> int:
    """``W``: readings per asset the health stage reads to score "now".

    The live features' reach (:func:`rows_needed` of the champion's feature params), the anomaly
    window and the readings an asset needs to be scored, whichever is most. Ingest keeps this many
    per asset in the recent-rows table (``twinflow.lake.refresh_recent``), computed from the feature
    params it is given (the defaults: 131 = window 30 + 10 spans of 10 + 1).
    """
    need = rows_needed(feature_params) if feature_params is not None else 0
    return max(params.window, params.min_readings, need)


def live_features(ff: FleetFrame, fit: Any, feature_params: Any, names: list[str],
                  first_t: pd.Series | np.ndarray | None = None, clock: Any = None) -> pd.DataFrame:
    """The model inputs at each asset's last reading, computed with the training fit.

    Histories are cut to the rows the windows and EWMs can see (:data:`EWM_MEMORY_SPANS`), and only
    the features in ``names`` are computed, at the last reading only
    (:func:`twinflow.tasks.features.latest.latest_features`: each window over its own rows).
    ``cycle_since_start`` is set from the asset's first reading: ``first_t`` (per asset, in time
    units: a Series by asset id, or an array in asset order) when the frame holds only recent rows,
    else the frame's own first row. One row per asset, in asset order. ``clock``: the contract's
    clock; a timestamp clock's features (time windows, ``time_since_start``) are computed on the
    real timestamps, as the training features were.
    """
    from twinflow.tasks.features import since_start_name, time_ticks
    from twinflow.tasks.features.latest import feature_plan, latest_features

    fp = feature_params.model_copy(update={"label": False})
    f = ff.frame
    stamped = clock is not None and clock.kind == "timestamp"
    rows = ff.tail(rows_needed(fp))
    codes = ff.codes if len(rows) == len(f) else ff.codes[rows]
    if stamped:
        ticks, tick_seconds = time_ticks(f[clock.key].iloc[rows] if len(rows) < len(f) else f[clock.key])
        scale = tick_seconds / clock.unit_seconds
        key_values = f[clock.key].to_numpy()[ff.ends - 1]
    else:
        # The kernels key on an integer time; a timestamp clock without its contract's clock enters
        # as whole time units since its start.
        ticks = np.round(ff.t[rows] - (ff.t[ff.starts].min() if len(ff.starts) else 0)).astype(np.int64) \
            if ff.timestamp_clock else np.take(f[ff.time_key].to_numpy(dtype=np.int64), rows)
        scale, clock = 1.0, None
        key_values = ticks[np.r_[np.flatnonzero(codes[1:] != codes[:-1]), len(codes) - 1]] if len(codes) else ticks
    # A repeated (asset, time) keeps its last row, as compute_features does.
    dup = np.r_[(codes[1:] == codes[:-1]) & (ticks[1:] == ticks[:-1]), False]
    if dup.any():
        rows, codes, ticks = rows[~dup], codes[~dup], ticks[~dup]
    starts = np.r_[np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]), len(codes)].astype(np.int64) \
        if len(codes) else np.zeros(1, np.int64)
    first_row = np.repeat(starts[:-1], np.diff(starts))
    t = (ticks - ticks[first_row]).astype(np.float64)
    if scale != 1.0:
        t *= scale
    plan = feature_plan(fit, fp, [n for n in names if n not in (C.ASSET, "cycle")], clock)
    # The recent-rows table holds as many rows as the features see: then every row is read as is.
    every = len(rows) == len(f)

    def column(c: str, out: np.ndarray) -> None:
        values = f[c].to_numpy(dtype=np.float64)
        if every:
            out[:] = values
        else:
            np.take(values, rows, out=out)

    y = np.full((len(plan.channels), len(rows)), np.nan)
    for j, c in enumerate(plan.channels):
        if c in f.columns:
            column(c, y[j])
    ops = np.empty((len(rows), len(fit.op_columns) if plan.needs_regime else 0))
    for j, c in enumerate(fit.op_columns if plan.needs_regime else []):
        column(c, ops[:, j])
    x = latest_features(y, ops, t, starts, fit, plan, fp.min_periods)
    live = pd.DataFrame(x.T.astype("float64"), columns=plan.names)
    live.insert(0, C.ASSET, ff.assets)
    live.insert(1, "cycle", key_values)
    since = since_start_name(clock.kind if clock is not None else "cycle")
    if since in live:
        first = ff.t[ff.starts]
        if first_t is not None:
            given = first_t.reindex(ff.assets).to_numpy(dtype="float64") if isinstance(first_t, pd.Series) \
                else np.asarray(first_t, dtype="float64")
            first = np.where(np.isnan(given), first, given)
        live[since] = ff.t[ff.ends - 1] - first
    return live[[C.ASSET, "cycle", *[n for n in names if n in live.columns and n not in (C.ASSET, "cycle")]]]


class _Clock:
    """Seconds per step into ``timings`` (each lap since the previous one); nothing without a dict."""

    def __init__(self, timings: dict[str, float] | None):
        import time

        self.timings, self._now = timings, time.perf_counter
        self._last = self._now()

    def lap(self, step: str) -> None:
        if self.timings is not None:
            now = self._now()
            self.timings[step] = self.timings.get(step, 0.0) + now - self._last
            self._last = now


@dataclass
class FleetScore:
    """The scored fleet and what the report needs beside it."""

    table: pd.DataFrame
    grid: np.ndarray | None = None
    posterior: dict[str, np.ndarray] = field(default_factory=dict)  # riskiest assets' posteriors
    lifetime: WeibullFit | None = None
    baseline: an.Baseline | None = None
    notes: list[str] = field(default_factory=list)


def _last_reading(ff: FleetFrame) -> pd.DataFrame:
    f, starts, ends = ff.frame, ff.starts, ff.ends
    out = pd.DataFrame({C.ASSET: ff.assets, "readings": ends - starts,
                        "first_time": ff.t[starts], "last_time": ff.t[ends - 1],
                        "age": ff.t[ends - 1] - ff.t[starts] + ff.step})
    last = f[ff.time_key].iloc[ends - 1].to_numpy()
    if ff.timestamp_clock:
        out["last_reading"] = pd.to_datetime(last, utc=True).astype(str)
    else:
        out["last_reading"] = [f"{ff.time_key} {int(v)}" for v in last]
    return out


def time_axis(values: Any, contract: Any) -> np.ndarray:
    """Time key values (cycles, or timestamps) on :class:`FleetFrame`'s float axis (the contract's unit)."""
    if contract.clock.kind == "timestamp":
        ts = pd.to_datetime(pd.Series(values), utc=True)
        secs = (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        return (secs / contract.clock.unit_seconds).to_numpy(dtype="float64")
    return pd.Series(values).to_numpy(dtype="float64", na_value=np.nan)


def life_frame(extents: pd.DataFrame | None, contract: Any, segments: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per asset, what its whole history says about its current life, on the fleet frame's time axis.

    Args:
        extents: ``asset_id``, ``readings``, ``first`` (time key) of whole histories (e.g. from
            :func:`twinflow.lake.read_recent`), or None when the scored frame holds whole histories.
        contract: The fleet contract (its clock).
        segments: The dataset's life segments (``<dataset>__segments``: ``asset_id``, ``segment``,
            ``origin``, ``start``), or None for a fleet without an event log.

    Returns:
        ``asset_id`` with ``readings`` and ``first`` (when ``extents`` is given) and, from the
        segments, the current life's ``segment`` number, ``origin`` (the renewal its age counts
        from) and ``start`` (its first reading's earliest time).
    """
    out = pd.DataFrame(columns=[C.ASSET])
    if extents is not None:
        out = pd.DataFrame({C.ASSET: extents[C.ASSET].astype(str).to_numpy(),
                            "readings": extents["readings"].to_numpy(dtype="int64"),
                            "first": time_axis(extents["first"], contract)})
    if segments is not None and len(segments):
        cur = segments.assign(**{C.ASSET: segments[C.ASSET].astype(str)}).sort_values([C.ASSET, "segment"]) \
            .drop_duplicates(C.ASSET, keep="last")
        seg = pd.DataFrame({C.ASSET: cur[C.ASSET].to_numpy(), "segment": cur["segment"].to_numpy(dtype="int64"),
                            "origin": time_axis(cur["origin"], contract), "start": time_axis(cur["start"], contract)})
        out = out.merge(seg, on=C.ASSET, how="outer") if len(out.columns) > 1 else seg
    return out


def recommend(p_by_h: dict[float, float], q_due: float, params: HealthParams) -> tuple[str, float, float]:
    """Action, due-in and expected cost for one asset.

    The due time is the posterior quantile of the remaining life at ``q = planned / failure`` cost:
    maintaining then costs the planned price for sure, waiting longer risks a failure with a
    probability above the cost ratio, where waiting costs more in expectation than maintaining.
    """
    c = params.costs
    fail = c.failure + c.failure_downtime * c.downtime_per_cycle
    plan = c.planned + c.planned_downtime * c.downtime_per_cycle
    if not math.isfinite(q_due):
        return "no estimate", float("nan"), float("nan")
    if q_due <= params.next_run:
        due = max(q_due, 0.0)
        action = "maintain now" if due < 1 else f"maintain within {due:.0f}"
    elif q_due <= max(params.horizons):
        due = q_due
        action = f"schedule maintenance within {due:.0f}"
    else:
        due = q_due
        action = "no action before the next run"
    q = c.planned / c.failure if c.failure > 0 else 0.0
    expected = q * fail + (1 - q) * plan if due <= max(params.horizons) else \
        p_by_h[max(params.horizons)] * fail
    return action, float(due), float(expected)


def recommend_fleet(p_by: dict[float, np.ndarray], q_due: np.ndarray, params: HealthParams
                    ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """:func:`recommend` for every asset at once: actions, due-in and expected costs (the same values)."""
    c = params.costs
    fail = c.failure + c.failure_downtime * c.downtime_per_cycle
    plan = c.planned + c.planned_downtime * c.downtime_per_cycle
    longest = max(params.horizons)
    q_due = np.asarray(q_due, dtype="float64")
    finite = np.isfinite(q_due)
    now = finite & (q_due <= params.next_run)
    soon = finite & ~now & (q_due <= longest)
    due = np.where(now, np.maximum(q_due, 0.0), q_due)
    q = c.planned / c.failure if c.failure > 0 else 0.0
    with np.errstate(invalid="ignore"):
        expected = np.where(due <= longest, q * fail + (1 - q) * plan, p_by[longest] * fail)
    expected[~finite] = np.nan
    actions = np.full(len(q_due), "no action before the next run", dtype=object)
    actions[~finite] = "no estimate"
    for i in np.flatnonzero(now):
        actions[i] = "maintain now" if due[i] < 1 else f"maintain within {due[i]:.0f}"
    for i in np.flatnonzero(soon):
        actions[i] = f"schedule maintenance within {due[i]:.0f}"
    return actions.tolist(), due, expected


def _by_horizon_json(p_by: dict[float, np.ndarray], horizons: list[float], n: int) -> list[str]:
    """Per asset, ``json.dumps({"<h>": P rounded to 6 places or null})``, written directly: the same
    text (JSON writes a float as its ``repr``), without a dict and an encoder per asset."""
    cols = []
    for h in horizons:
        vals = p_by[h]
        key = json.dumps(f"{h:g}")
        cols.append([f"{key}: " + ("null" if not math.isfinite(v) else repr(round(v, 6))) for v in vals.tolist()])
    return ["{" + ", ".join(parts) + "}" for parts in zip(*cols)] if cols else ["{}"] * n


def score_fleet(frame: pd.DataFrame, contract: Any, params: HealthParams, champion: Any | None = None, *,
                baseline_frame: pd.DataFrame | None = None, lifetime: WeibullFit | None = None,
                scored_at: str | None = None, lives: pd.DataFrame | None = None,
                timings: dict[str, float] | None = None) -> FleetScore:
    """Score every asset of ``frame`` (lake rows of the running fleet).

    Args:
        frame: Lake rows (``asset_id``, the clock's key, channels).
        contract: The fleet contract of the rows.
        params: Health parameters.
        champion: A :class:`~twinflow.tasks.health.champion.Champion`, or None for label-free scores.
        baseline_frame: Healthy-baseline readings (whole histories, e.g. the champion's training
            data); default: the scored fleet's own early lives.
        lifetime: Lifetime model (default: the champion's; without either, no failure probability).
        scored_at: Timestamp recorded with the rows.
        lives: :func:`life_frame`: whole-history counts when ``frame`` holds only each asset's
            recent rows, and the current life from the dataset's segments: an asset's age then
            counts from its last renewal, not its first reading.
        timings: When given, filled with the seconds each step took (``groups``, ``anomaly``,
            ``live_features``, ``predict``, ``posterior``, ``table``): where a fleet's scoring time goes.
    """
    clock = _Clock(timings)
    notes: list[str] = []
    ff = fleet_frame(frame, contract)
    rows = _last_reading(ff)
    clock.lap("groups")
    n = len(rows)
    status = np.full(n, SCORED, dtype=object)
    reasons: list[list[str]] = [[] for _ in range(n)]
    first_t = None
    life = np.zeros(n, dtype="int64")
    new_life = np.zeros(n, dtype=bool)
    if lives is not None and len(lives):
        lv = lives.set_index(C.ASSET).reindex(rows[C.ASSET].to_numpy())
        if "readings" in lv:
            rows["readings"] = lv["readings"].fillna(rows["readings"]).to_numpy(dtype="int64")
            rows["first_time"] = lv["first"].fillna(rows["first_time"]).to_numpy(dtype="float64")
            first_t = pd.Series(rows["first_time"].to_numpy(), index=rows[C.ASSET].to_numpy())
        origin = rows["first_time"].to_numpy() - ff.step
        if "origin" in lv:
            seg_origin = lv["origin"].to_numpy(dtype="float64")
            has = np.isfinite(seg_origin)
            origin = np.where(has, seg_origin, origin)
            life = lv["segment"].fillna(0).to_numpy(dtype="int64")
            # Readings of the current life: those at or after its start (the frame's tail holds more
            # rows than a new life needs to count as scored).
            codes = ff.codes
            start_row = np.repeat(lv["start"].to_numpy(dtype="float64"), np.bincount(codes, minlength=n))
            since = np.bincount(codes, weights=(ff.t >= np.nan_to_num(start_row, nan=-np.inf)), minlength=n)
            new_life = (life > 0) & (since < params.min_readings)
            for i in np.flatnonzero(new_life):
                reasons[i].append(f"new life: renewed {rows['last_time'].iat[i] - origin[i]:.0f} {ff.time_unit} "
                                  f"ago, {int(since[i])} reading(s) since (< {params.min_readings}); "
                                  "scored by its age alone")
            if (life > 0).any():
                notes.append(f"{int((life > 0).sum())} asset(s) renewed: ages count from the last renewal")
        rows["age"] = rows["last_time"].to_numpy() - origin
    fit = champion.fit if champion is not None else None
    channels = [c for c in (fit.kept if fit is not None else contract.sensors) if c in ff.frame.columns]
    absent = [c for c in (fit.kept if fit is not None else []) if c not in ff.frame.columns]
    if absent:
        notes.append(f"dataset lacks channel(s) the champion uses: {', '.join(absent)}")

    few = rows["readings"].to_numpy() < params.min_readings
    for i in np.flatnonzero(few):
        reasons[i].append(f"only {rows['readings'].iat[i]} reading(s) (< {params.min_readings})")
    stale = np.zeros(n, dtype=bool)
    if params.max_staleness and ff.timestamp_clock:
        from twinflow.contract.model import parse_duration

        limit = parse_duration(params.max_staleness).total_seconds() / contract.clock.unit_seconds
        newest = float(rows["last_time"].max())
        stale = rows["last_time"].to_numpy() < newest - limit
        for i in np.flatnonzero(stale):
            reasons[i].append(f"no recent data: last reading {rows['last_reading'].iat[i]} is "
                              f"{newest - rows['last_time'].iat[i]:.1f} {ff.time_unit} older than the fleet's newest")

    # --- label-free: anomaly score and health index -------------------------------------------------
    # Only each asset's last ``window`` readings are scored: standardise those, not the whole tail.
    win = ff.tail(params.window)
    n_regimes = fit.n_regimes if fit is not None else 1
    score = np.full(n, np.nan)
    hi = np.full(n, np.nan)
    evidence = [""] * n
    base = None
    if channels:
        if baseline_frame is not None and len(baseline_frame):
            w_regime = regimes(ff, fit, win)
            z = standardised(ff, channels, fit, w_regime, rows=win)
            bf = fleet_frame(baseline_frame, contract)
            b_regime = regimes(bf, fit)
            bz, b_codes = standardised(bf, channels, fit, b_regime), bf.codes
            base_src = "the champion's training fleet"
        else:
            # The scored fleet's own early lives are the baseline: every reading is standardised.
            regime = regimes(ff, fit)
            bz, b_codes, b_regime, base_src = standardised(ff, channels, fit, regime), ff.codes, regime, \
                "the scored fleet itself"
            z, w_regime = bz[win], regime[win]
        try:
            base = an.fit_baseline(bz, b_regime, b_codes, channels, n_regimes=n_regimes, window=params.window,
                                   baseline_fraction=params.baseline_fraction)
            score, hi, contrib, _ = an.score_recent(z, w_regime, ff.codes[win], base)
            evidence = an.top_channels(contrib, None, channels, params.top_channels)
            notes.append(f"healthy baseline: first {params.baseline_fraction:.0%} of each asset's readings "
                         f"of {base_src} ({base.n_windows} windows of {params.window})")
        except ValueError as exc:
            notes.append(f"no anomaly score: {exc}")
    else:
        notes.append("no sensor channels to score")

    clock.lap("anomaly")
    # --- model: RUL, interval, failure probabilities ---------------------------------------------------
    rul = np.full(n, np.nan)
    if champion is not None:
        names = champion.input_names
        live = None if absent else live_features(ff, fit, champion.feature_params, names, first_t=first_t,
                                                 clock=contract.clock)
        clock.lap("live_features")
        lacking = absent or [c for c in names if c not in live.columns]
        if lacking:
            what = "channel(s)" if absent else "feature(s)"
            for i in range(n):
                reasons[i].append(f"model needs {what} the data lacks: {', '.join(lacking[:5])}"
                                  + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""))
        else:
            feats = live[[c for c in names if c not in (C.ASSET, "cycle")]].to_numpy(dtype="float64")
            bad = ~np.isfinite(feats).all(axis=1)
            ok = ~bad & ~few & ~stale & ~new_life
            if ok.any() and not champion.needs_history:
                rul[ok] = champion.predict(live.loc[ok])
            elif ok.any():
                hist = ff.frame.rename(columns={ff.time_key: "cycle"})
                pred_all = champion.predict(hist)
                last_idx = ff.ends - 1
                rul[ok] = pred_all[last_idx][ok]
            names_only = [c for c in names if c not in (C.ASSET, "cycle")]
            for i in np.flatnonzero(bad & ~few & ~stale & ~new_life):
                miss = [names_only[j] for j in np.flatnonzero(~np.isfinite(feats[i]))]
                reasons[i].append(f"features missing at the last reading: {', '.join(miss[:5])}"
                                  + (f" and {len(miss) - 5} more" if len(miss) > 5 else ""))
        notes.extend(champion.notes)
    clock.lap("predict")
    lifetime = lifetime or (champion.lifetime if champion is not None else None)

    grid, grid_max = None, None
    p_by = {h: np.full(n, np.nan) for h in params.horizons}
    q_low = q_med = q_high = q_due = np.full(n, np.nan)
    can_risk = ~few & ~stale
    errors = champion.errors if champion is not None else None
    cap = champion.rul_cap if champion is not None else None
    if lifetime is not None and can_risk.any():
        idx = np.flatnonzero(can_risk)
        c = params.costs
        q_cost = c.planned / c.failure if c.failure > 0 else 0.5
        grid, grid_max, p_h, qs = posterior_summary(rows["age"].to_numpy()[idx], rul[idx], lifetime, errors, cap=cap,
                                                    horizons=params.horizons, qs=[0.1, 0.5, 0.9, q_cost])
        for j, h in enumerate(params.horizons):
            p_by[h][idx] = p_h[:, j]
        q_low, q_med, q_high, q_due = (np.full(n, np.nan) for _ in range(4))
        q_low[idx], q_med[idx], q_high[idx], q_due[idx] = qs.T
    half = champion.half_width if champion is not None else float("nan")
    p_alert = p_by[params.alert_horizon]
    bands = bands_of(p_alert, params.band_thresholds)
    actions, due_in, cost = recommend_fleet(p_by, q_due, params)
    has_reason = np.fromiter((bool(r) for r in reasons), dtype=bool, count=n)
    status[has_reason & (few | stale | ~np.isfinite(score))] = SKIPPED
    status[has_reason & ~(few | stale | ~np.isfinite(score))] = PARTIAL
    clock.lap("posterior")
    last_time = rows["last_time"].to_numpy()
    if ff.timestamp_clock:
        due_by = [str(pd.Timestamp((lt + d) * contract.clock.unit_seconds, unit="s", tz="UTC")) if np.isfinite(d) else ""
                  for lt, d in zip(last_time, due_in)]
    else:
        due_by = [f"{ff.time_key} {int(math.floor(lt + d))}" if np.isfinite(d) else "" for lt, d in zip(last_time, due_in)]
    table = pd.DataFrame({
        C.ASSET: rows[C.ASSET], "status": status, "reason": ["; ".join(r) for r in reasons],
        "last_reading": rows["last_reading"], "readings": rows["readings"].astype("int64"),
        "age": rows["age"], "time_unit": ff.time_unit, "life": life,
        "rul_estimate": rul,
        "rul_low": np.maximum(rul - half, 0.0), "rul_high": rul + half,
        "interval_level": champion.interval_level if champion is not None else float("nan"),
        "rul_p10": q_low, "rul_p50": q_med, "rul_p90": q_high,
        "p_fail": p_alert, "alert_horizon": params.alert_horizon,
        "p_fail_by_horizon": _by_horizon_json(p_by, params.horizons, n),
        "flag": np.nan_to_num(p_alert, nan=0.0) >= params.flag_probability,
        "risk_band": [BANDS[b] for b in bands], "band_rank": bands.astype("int64"),
        "health_index": hi, "anomaly_score": score, "evidence": evidence,
        "action": actions, "due_in": due_in, "due_by": due_by, "expected_cost": cost,
        "scored_at": scored_at or pd.Timestamp.now(tz="UTC").isoformat(),
    })
    # Risk order: failure probability when there is one, else the label-free score.
    key_p = np.nan_to_num(p_alert, nan=-1.0)
    key_s = np.nan_to_num(score, nan=-1.0)
    order = np.lexsort((-key_s, -key_p))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(1, "risk_rank", np.arange(1, n + 1, dtype="int64"))
    fans = {}
    if grid is not None and params.fan_assets:
        # The riskiest assets' posteriors, computed again for them alone on the same grid: the rest
        # were summarised chunk by chunk and not kept.
        pos = {a: j for j, a in enumerate(rows[C.ASSET].to_numpy()[can_risk])}
        top = [a for a in table[C.ASSET].head(params.fan_assets) if a in pos]
        if top:
            sel = np.flatnonzero(can_risk)[[pos[a] for a in top]]
            _, post = remaining_life_posterior(rows["age"].to_numpy()[sel], rul[sel], lifetime, errors, cap=cap,
                                               grid_max=grid_max)
            fans = dict(zip(top, post))
    clock.lap("table")
    return FleetScore(table, grid, fans, lifetime, base, notes)
