"""Calibration: fit the twin to run-to-failure telemetry of any fleet contract, with a KS check.

The contract says what the columns are: its ``setting`` channels define operating regimes, its
``sensor`` channels carry degradation, and its clock says how ages are measured (cycle counts, or the
time since an asset's first reading in the clock's unit, e.g. hours). Readings may be missing (NaN)
and a channel may be absent for some assets: every fit uses the readings that exist.
"""

from __future__ import annotations

import math
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field

from twinflow.contract.model import Channel, ContractRef, FleetContract
from twinflow.contracts import ASSET
from twinflow.errors import ConfigError
from twinflow.tasks.twin.fleet import sample_lifetimes
from twinflow.tasks.twin.lives import LifeCheck
from twinflow.tasks.twin.survival import LognormalFit, lognormal_fit
from twinflow.tasks.twin.model import (
    DegenerateCalibration,
    NoRunToFailureData,
    TwinModel,
    child_seed,
)

# More distinct operating conditions than this (each >= min_share of the rows) means the settings vary
# continuously: the twin then models one regime whose settings scatter around their means.
_MAX_REGIMES = 12
# Least share of a sensor's within-regime variance that wear must explain in at least one channel.
_MIN_TREND = 0.01
# Share of the rows the discrete regimes must cover for the settings to count as discrete.
_REGIME_COVERAGE = 0.9


class CalibrationReport(BaseModel):
    """Fit quality of a calibration: lifetimes observed vs simulated and the KS statistic.

    Lifetimes are in ``time_unit``: cycles, or e.g. hours for a timestamp clock (observed lifetimes
    are then fractional; simulated ones count whole simulation steps of one unit).
    """

    n_assets: int
    n_rows: int
    excluded_assets: int = 0
    observed_lifetimes: list[int | float]
    simulated_lifetimes: list[int]
    ks_statistic: float
    b: float
    sensor_r2: dict[str, float] = Field(default_factory=dict)
    time_unit: str = "cycle"
    contract: ContractRef | None = None
    fallback: bool = False
    notes: list[str] = Field(default_factory=list)
    # The lognormal fitted with suspensions that the simulated lifetimes were matched to; None when they
    # were matched to the failures' lifetimes (no suspensions, or no life segments).
    lifetime_fit: LognormalFit | None = None
    # From the life segments (failures and suspensions), where the snapshot has them.
    lives: LifeCheck | None = None



def ks_statistic(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup |F_x - F_y|`` (ties handled exactly)."""
    x, y = np.sort(np.asarray(x, float)), np.sort(np.asarray(y, float))
    grid = np.concatenate([x, y])
    fx = np.searchsorted(x, grid, side="right") / len(x)
    fy = np.searchsorted(y, grid, side="right") / len(y)
    return float(np.max(np.abs(fx - fy)))


def _contract(contract: FleetContract | None) -> FleetContract:
    from twinflow.contract.store import resolve_contract

    return resolve_contract(contract)


def asset_ages(frame, contract: FleetContract) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's age in the contract's clock unit.

    A cycle clock's age is the cycle count. For a timestamp clock an asset's life starts one sampling
    interval (its median spacing of readings) before its first reading, the way cycle 1 is one cycle
    after installation; ages are the time since then in ``contract.time_unit``.

    Args:
        frame: pandas DataFrame sorted by (``asset_id``, time key).
        contract: The frame's fleet contract.

    Returns:
        ``(assets, codes, age)``: sorted unique asset ids, each row's index into them, each row's age.
    """
    import pandas as pd

    assets, codes = np.unique(frame[ASSET].astype(str).to_numpy(), return_inverse=True)
    codes = codes.reshape(-1)
    key = contract.key
    if contract.clock.kind == "cycle":
        return assets, codes, frame[key].to_numpy(np.float64)
    ts = pd.to_datetime(frame[key], utc=True)
    if ts.isna().any():
        raise ConfigError(f"{int(ts.isna().sum())} rows have no {key}: a timestamp clock needs one per row")
    secs = (ts - ts.min()).dt.total_seconds().to_numpy(np.float64) if len(ts) else np.zeros(0)
    first = np.full(len(assets), np.inf)
    np.minimum.at(first, codes, secs)
    diffs = np.diff(secs)
    within = (codes[1:] == codes[:-1]) & (diffs > 0)
    spacing = pd.Series(diffs[within]).groupby(codes[1:][within]).median()
    step = np.full(len(assets), contract.clock.interval_s or 0.0)
    step[spacing.index.to_numpy(np.int64)] = spacing.to_numpy()
    age = (secs - first[codes] + step[codes]) / contract.clock.unit_seconds
    return assets, codes, age


def _resolution(channel: Channel, values: np.ndarray) -> float:
    """Rounding step that tells a setting's operating conditions apart: 1% of its declared range
    (of its observed spread when the contract declares none)."""
    if channel.range is not None and channel.high > channel.low:
        return (channel.high - channel.low) / 100.0
    v = values[np.isfinite(values)]
    spread = float(np.quantile(v, 0.99) - np.quantile(v, 0.01)) if v.size else 0.0
    return spread / 100.0 if spread > 0 else 1.0


def _regimes(ops: np.ndarray, resolution: np.ndarray, min_share: float = 0.005
             ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Label operating regimes by the settings rounded to ``resolution`` (discrete conditions).

    Returns:
        ``(labels, counts, discrete)``; ``discrete`` is False when the settings vary continuously
        (more than ``_MAX_REGIMES`` conditions, or the frequent ones cover too few rows): one regime.
    """
    n = len(ops)
    one = (np.zeros(n, dtype=np.int64), np.array([n]))
    if ops.shape[1] == 0 or n == 0:
        return (*one, True)
    key = np.round(ops / resolution).astype(np.int64)
    uniq, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    major = np.flatnonzero(counts >= min_share * n)
    if major.size > _MAX_REGIMES or counts[major].sum() < _REGIME_COVERAGE * n:
        return (*one, False)
    if major.size == 0:
        major = np.array([int(np.argmax(counts))])
    remap = np.full(len(uniq), -1)
    remap[major] = np.arange(major.size)
    # Rare keys join the nearest major regime.
    for i in np.flatnonzero(remap < 0):
        dist = np.abs(uniq[major] - uniq[i]).sum(axis=1)
        remap[i] = int(np.argmin(dist))
    labels = remap[inverse]
    return labels, np.bincount(labels, minlength=major.size), True


def _fit_channels(onehot: np.ndarray, damage: np.ndarray, y: np.ndarray, mask: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of each channel on (regime one-hot, damage), over the rows where it has a reading.

    Returns:
        ``(coef, resid)``: coefficients ``(k + 1, channels)`` and residuals (NaN where no reading).
    """
    x = np.column_stack([onehot, damage])
    full = mask.all(axis=0)
    if full.all():
        # Every channel read on every row: one solve (on ``y`` itself: a column copy would change the
        # summation order, and with it the last bits of the fit).
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return coef, y - x @ coef
    coef = np.zeros((x.shape[1], y.shape[1]))
    resid = np.full(y.shape, np.nan)
    if full.any():
        # Channels read on every row: one solve for all of them.
        c, *_ = np.linalg.lstsq(x, y[:, full], rcond=None)
        coef[:, full] = c
        resid[:, full] = y[:, full] - x @ c
    for j in np.flatnonzero(~full):
        rows = mask[:, j]
        c, *_ = np.linalg.lstsq(x[rows], y[rows, j], rcond=None)
        coef[:, j] = c
        resid[rows, j] = y[rows, j] - x[rows] @ c
    return coef, resid


def _column_std(resid: np.ndarray, mask: np.ndarray) -> np.ndarray:
    full = mask.all(axis=0)
    if full.all():
        return resid.std(axis=0)
    out = np.zeros(resid.shape[1])
    if full.any():
        out[full] = resid[:, full].std(axis=0)
    for j in np.flatnonzero(~full):
        r = resid[mask[:, j], j]
        out[j] = r.std() if r.size else np.nan
    return out


def _fill_unseen_regimes(base: np.ndarray, onehot: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A regime in which a channel has no reading gets the channel's reading-weighted mean base."""
    seen = onehot.T @ mask.astype(float)  # (regimes, channels): readings per regime
    if (seen > 0).all():
        return base
    base = base.copy()
    for j in np.flatnonzero((seen == 0).any(axis=0)):
        w = seen[:, j]
        base[w == 0, j] = float(np.dot(w, base[:, j]) / w.sum()) if w.sum() > 0 else np.nan
    return base


def calibrate(frame, *, contract: FleetContract | None = None, process_noise: float = 0.005, seed: int = 0,
              n_sim: int = 4000, b_grid: Sequence[float] | None = None,
              lives: tuple[Sequence[float], Sequence[bool]] | None = None) -> tuple[TwinModel, CalibrationReport]:
    """Fit the twin's parameter distributions to run-to-failure telemetry.

    1. Lifetimes: each asset's age at its last reading (:func:`asset_ages`: cycles, or the clock's
       unit from the timestamps).
    2. Operating regimes from the contract's setting channels rounded to 1% of their range;
       per-regime setting means and noise. Continuously varying settings make one regime.
    3. Shape ``b`` from the sensor trends: for each ``b`` on a grid, each asset's rate follows from
       its lifetime (``a = log(2 - d) / L**b``) and each sensor channel is regressed on the implied
       damage over the rows where it has a reading; ``b`` with the smallest standardised residual
       wins. The regression gives each sensor's base (per regime), gain and noise.
    4. Initial wear spread from each asset's early damage estimated from the sensors.
    5. ``log a`` mean/sd from the lifetimes, then corrected so that simulated lifetimes (with the
       process noise) match the observed log-lifetime mean and sd. With suspensions among ``lives``
       the target is the lognormal fitted to all of them with right censoring
       (:func:`~twinflow.tasks.twin.survival.lognormal_fit`) instead: the failures alone are the
       shorter lives (a long life is the likelier to be cut by a renewal or the end of the records),
       and a twin matched to them fails too early (on the generated pump fleet 44 % of its lifetime
       curve was inside the Kaplan–Meier band, against 100 % with the censored fit).
    6. Fit quality: KS statistic between the observed and fresh simulated lifetimes.

    Args:
        frame: pandas DataFrame with ``asset_id``, the contract's time key (``cycle`` or
            ``timestamp``) and its channels (missing readings as NaN; absent columns are not
            modelled); every asset must be run to failure.
        contract: The frame's fleet contract (default: the settings' contract).
        process_noise: Sd of the per-step health shocks (not identifiable from the sensors).
        seed: Seed of the simulations used for the correction and the KS statistic.
        n_sim: Number of simulated lifetimes.
        b_grid: Candidate shapes ``b``.
        lives: Every life of the fleet whose start was observed, with its suspensions: durations (in
            the clock's unit) and whether each ended in a failure (see :func:`twinflow.tasks.twin.lives.life_sample`). Without
            suspensions among them (or without ``lives``) the frame's run-to-failure lifetimes are the
            target of step 5.

    Returns:
        The fitted model and its calibration report.

    Raises:
        NoRunToFailureData: fewer than 2 assets.
        DegenerateCalibration: no sensor channel that varies, or a fit that is not finite.
        ConfigError: the frame lacks the contract's asset or time column.
    """
    contract = _contract(contract)
    key = contract.key
    lacking = [c for c in (ASSET, key) if c not in frame.columns]
    if lacking:
        raise ConfigError(f"calibration data lacks column(s) {', '.join(lacking)} that contract "
                          f"{contract.name!r} v{contract.version} keys its rows by")
    df = frame.sort_values([ASSET, key], kind="stable")
    assets, codes, age = asset_ages(df, contract)
    n_assets = len(assets)
    if n_assets < 2:
        raise NoRunToFailureData(f"calibration needs >= 2 run-to-failure assets, got {n_assets}")
    life = np.zeros(n_assets)
    np.maximum.at(life, codes, age)
    where = f"the {n_assets} run-to-failure assets (contract {contract.name!r} v{contract.version})"
    if not (np.isfinite(life).all() and (life > 0).all()):
        raise DegenerateCalibration(f"lifetimes of {where} are not all positive: check the {key} column")

    def present(names: list[str]) -> list[str]:
        return [c for c in names if c in df.columns and df[c].notna().any()]

    settings, sensors = present(contract.settings), present(contract.sensors)
    unread = [c for c in contract.channel_names if c not in settings and c not in sensors]
    notes = [f"channels without any reading, not modelled: {', '.join(unread)}"] if unread else []
    if not sensors:
        raise DegenerateCalibration(
            f"none of the sensor channels of {where} has a reading "
            f"({', '.join(contract.sensors) or 'the contract declares none'}): the twin needs at least one "
            "sensor channel that trends with wear")
    ops = df[settings].to_numpy(np.float64)
    y = df[sensors].to_numpy(np.float64)
    ok_y = np.isfinite(y)
    ok_ops = np.isfinite(ops)
    if not ok_ops.all():
        # A missing setting reading counts as its channel's typical value when labelling regimes.
        fill = np.nanmedian(np.where(ok_ops, ops, np.nan), axis=0)
        ops_l = np.where(ok_ops, ops, fill)
    else:
        ops_l = ops
    resolution = np.array([_resolution(contract.channel(s), ops[:, i]) for i, s in enumerate(settings)])
    labels, counts, discrete = _regimes(ops_l, resolution)
    if not discrete:
        notes.append(f"settings {', '.join(settings)} vary continuously: modelled as one operating regime")
    k = counts.size
    onehot = np.eye(k)[labels]
    if ok_ops.all():
        regime_op = np.vstack([ops[labels == r].mean(axis=0) for r in range(k)]).reshape(k, len(settings))
        op_noise = np.sqrt(np.mean((ops - regime_op[labels]) ** 2, axis=0))
    else:
        masked = np.where(ok_ops, ops, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a setting unread in one regime
            overall = np.nanmean(masked, axis=0)
            regime_op = np.vstack([np.nanmean(masked[labels == r], axis=0) for r in range(k)])
            regime_op = np.where(np.isfinite(regime_op), regime_op, overall).reshape(k, len(settings))
            op_noise = np.sqrt(np.nanmean((masked - regime_op[labels]) ** 2, axis=0))

    n_obs = ok_y.sum(axis=0)
    assets_obs = np.array([np.unique(codes[ok_y[:, j]]).size for j in range(y.shape[1])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # channels unread by some assets
        yf = np.where(ok_y, y, np.nan)
        y_mean = np.nanmean(yf, axis=0) if not ok_y.all() else y.mean(axis=0)
        y_sd = np.nanstd(yf, axis=0) if not ok_y.all() else y.std(axis=0)
    informative = (n_obs > k + 1) & (assets_obs >= 2) & (y_sd > 1e-9 * np.maximum(np.abs(y_mean), 1.0))
    if not informative.any():
        constant = [s for j, s in enumerate(sensors) if n_obs[j] > k + 1 and assets_obs[j] >= 2]
        sparse = [s for s in sensors if s not in constant]
        parts = ([f"constant: {', '.join(constant)}"] if constant else []) + \
            ([f"too few readings: {', '.join(sparse)}"] if sparse else [])
        raise DegenerateCalibration(
            f"no sensor channel of {where} varies ({'; '.join(parts)}): the twin needs at least one sensor "
            "channel that trends with wear, read on two or more assets")
    flat = [s for j, s in enumerate(sensors) if not informative[j]]
    if flat:
        notes.append(f"sensors without variation (or with too few readings), modelled as constant: {', '.join(flat)}")
    grid = np.asarray(b_grid if b_grid is not None else np.round(np.arange(1.0, 3.01, 0.1), 2))
    log_life = np.log(life)
    log_age = np.log(np.maximum(age, 1e-12))

    def implied_damage(b: float, d_mean: float) -> tuple[np.ndarray, np.ndarray]:
        log_a = np.log(np.log(2.0 - d_mean)) - b * log_life
        return log_a, np.expm1(np.exp(log_a[codes] + b * log_age))

    scores = []
    inf_mask = ok_y[:, informative]
    for b in grid:
        _, dmg = implied_damage(b, 0.0)
        _, resid = _fit_channels(onehot, dmg, y[:, informative], inf_mask)
        scores.append(float(np.nansum((resid / y_sd[informative]) ** 2)))
    b = float(grid[int(np.argmin(scores))])
    log_a_i, dmg = implied_damage(b, 0.0)
    coef, resid = _fit_channels(onehot, dmg, y, ok_y)
    base, gain = _fill_unseen_regimes(coef[:k], onehot, ok_y), coef[k]
    noise = _column_std(resid, ok_y)
    gain[~informative] = 0.0
    noise[~informative] = 0.0
    r2, trend = {}, {}
    for j, s in enumerate(sensors):
        if informative[j]:
            rows = ok_y[:, j]
            r2[s] = float(1 - resid[rows, j].var() / y[rows, j].var())
            # Share of the variance left by the regimes that wear explains: a channel that only moves
            # with the operating regime (or only scatters) says nothing about the wear.
            lab = labels[rows]
            by_regime = np.bincount(lab, weights=y[rows, j], minlength=k) / np.maximum(np.bincount(lab, minlength=k), 1)
            left = float(np.var(y[rows, j] - by_regime[lab]))
            trend[s] = 1.0 - float(resid[rows, j].var()) / left if left > 0 else 0.0
    if max(trend.values()) < _MIN_TREND:
        best = max(trend, key=trend.get)
        raise DegenerateCalibration(
            f"no sensor channel of {where} trends with wear: the best, {best}, has {trend[best]:.2%} of its "
            "variance (beyond the operating regimes) explained by the wear the lifetimes imply; the twin needs "
            "at least one channel whose readings drift as assets approach failure")

    # Initial wear: weighted damage estimate from all informative sensors over each asset's first
    # steps, minus the model's damage there; its spread (less the estimation noise) is d's spread.
    w = np.zeros(len(sensors))
    useful = informative & (np.abs(gain) > 0) & (noise > 0)
    w[useful] = gain[useful] / noise[useful] ** 2
    denom = float(np.sum(w * gain))
    d_scale = 0.0
    if denom > 0:
        if ok_y.all():
            d_obs = ((y - base[labels]) @ w) / denom
        else:
            # Each row's estimate from the channels it has: weights renormalised per row.
            dev = np.where(ok_y, y - base[labels], 0.0)
            row_denom = ok_y.astype(float) @ (w * gain)
            with np.errstate(invalid="ignore", divide="ignore"):
                d_obs = np.where(row_denom > 0, (dev @ w) / row_denom, np.nan)
        seen = np.isfinite(d_obs)
        early = (age <= np.maximum(5, 0.15 * life[codes])) & seen
        excess = d_obs[early] - dmg[early]
        n_early = np.bincount(codes[early], minlength=n_assets)
        ok = n_early > 0
        if ok.sum() >= 2:
            per_asset = np.bincount(codes[early], weights=excess, minlength=n_assets)[ok] / n_early[ok]
            resid_var = np.var(d_obs[seen] - dmg[seen])
            d_var = float(np.var(per_asset) - resid_var * np.mean(1.0 / n_early[ok]))
            d_scale = float(np.clip(math.sqrt(max(d_var, 0.0) / (1 - 2 / math.pi)), 0.0, 0.3))
    d_mean = d_scale * math.sqrt(2 / math.pi)
    # The regression saw asset-average initial wear in the base; the generator adds d explicitly.
    base = base - gain[None, :] * d_mean
    log_a_i = log_a_i + np.log(np.log(2.0 - d_mean)) - np.log(np.log(2.0))

    params = {
        "log_a_mean": float(log_a_i.mean()), "log_a_sd": float(log_a_i.std(ddof=1)), "d_scale": d_scale,
        "regime_op": regime_op, "op_noise": op_noise, "sensor_base": base, "sensor_gain": gain,
        "sensor_noise": noise,
    }
    _check_finite(params, where)
    model = TwinModel(
        log_a_mean=params["log_a_mean"], log_a_sd=params["log_a_sd"], b_mean=b, b_sd=0.0,
        d_scale=d_scale, process_noise=process_noise,
        regime_probs=(counts / counts.sum()).tolist(), regime_severity=[1.0] * k,
        settings=settings, sensors=sensors,
        regime_op=regime_op.tolist(), op_noise=op_noise.tolist(), sensor_base=base.tolist(),
        sensor_gain=gain.tolist(), sensor_noise=noise.tolist(), time_unit=contract.time_unit,
        contract=contract, source="calibrated",
    )
    obs_mean, obs_sd = float(log_life.mean()), float(log_life.std(ddof=1))
    fit = _censored_target(lives, notes, n_assets, contract.time_unit)
    if fit is not None:
        obs_mean, obs_sd = fit.mu, fit.sigma
    ss = np.random.SeedSequence(seed)
    for i in range(3):
        sim = np.log(sample_lifetimes(model, n_sim, child_seed(ss, i)))
        # log L = (log log(2 - d) - log a) / b: shifting log a moves the mean, scaling its sd the sd.
        scale = obs_sd / max(float(sim.std(ddof=1)), 1e-9)
        model = model.model_copy(update={
            "log_a_mean": model.log_a_mean + b * (float(sim.mean()) - obs_mean),
            "log_a_sd": float(np.clip(model.log_a_sd * scale, 0.0, 5.0)),
        })
    _check_finite({"log_a_mean": model.log_a_mean, "log_a_sd": model.log_a_sd}, where)
    sim_life = sample_lifetimes(model, n_sim, child_seed(ss, 99))
    observed = life.astype(int).tolist() if contract.clock.kind == "cycle" else np.round(life, 4).tolist()
    report = CalibrationReport(
        n_assets=n_assets, n_rows=len(df), observed_lifetimes=observed,
        simulated_lifetimes=sim_life.astype(int).tolist(), ks_statistic=ks_statistic(life, sim_life),
        b=b, sensor_r2=r2, time_unit=contract.time_unit, contract=contract.ref, notes=notes, lifetime_fit=fit,
    )
    return model, report


def _censored_target(lives: tuple[Sequence[float], Sequence[bool]] | None, notes: list[str], n_failed: int,
                     unit: str) -> LognormalFit | None:
    """The lognormal with suspensions the twin's lifetimes are matched to, or None (no suspensions:
    the calibrated failures are the whole sample and their own moments are the target)."""
    if lives is None:
        return None
    durations, observed = np.asarray(lives[0], float), np.asarray(lives[1], bool)
    keep = durations > 0
    durations, observed = durations[keep], observed[keep]
    if observed.all():
        return None
    try:
        fit = lognormal_fit(durations, observed)
    except ValueError as exc:
        notes.append(f"lifetimes matched to the {n_failed} failures alone ({exc}); suspensions ignored")
        return None
    notes.append(f"lifetimes matched to the lognormal fitted with {len(durations) - fit.failures} suspensions and "
                 f"{fit.failures} failures (median {fit.median:.4g} {unit}, log sd {fit.sigma:.3f}), not to the "
                 "failures alone, which are biased short")
    return fit


def _check_finite(params: dict, where: str) -> None:
    """Refuse a fit with non-finite parameters (e.g. every reading of a channel missing in a regime)."""
    bad = [name for name, v in params.items() if not np.isfinite(np.asarray(v, float)).all()]
    if bad:
        raise DegenerateCalibration(f"calibration on {where} gave non-finite parameter(s) "
                                    f"{', '.join(bad)}: the data cannot determine the twin")


def select_run_to_failure(frame, truncated_sources: str, min_lifetime: float,
                          contract: FleetContract | None = None):
    """Keep the assets that ran to failure: not from a truncated source, lives of at least
    ``min_lifetime`` (in the contract's clock unit).

    ``truncated_sources`` is searched in the base name of ``source_file`` (not its folders).

    Returns:
        ``(frame of kept assets, number of excluded assets)``.
    """
    contract = _contract(contract)
    pattern = re.compile(truncated_sources)
    assets = frame[ASSET].astype(str)
    n_all = assets.nunique()
    if "source_file" in frame.columns:
        names = frame["source_file"].astype(str).str.replace("\\", "/").str.rsplit("/", n=1).str[-1]
        truncated = names.map(lambda s: bool(pattern.search(s)))
        bad = set(assets[truncated.to_numpy()])
    else:
        bad = set()
    if len(frame):
        ordered = frame.sort_values([ASSET, contract.key], kind="stable")
        ids, codes, age = asset_ages(ordered, contract)
        life = np.zeros(len(ids))
        np.maximum.at(life, codes, age)
        bad |= set(ids[life < min_lifetime])
    kept = frame[~assets.isin(bad).to_numpy()]
    return kept, n_all - kept[ASSET].nunique()


def read_headerless(path: str | Path, contract: FleetContract, name: str | None = None):
    """A header-less text file (e.g. C-MAPSS) as a frame with lake column names, by the contract's rule.

    The contract's dataset rule for the file name (``format: text``) lists the source column of each
    whitespace-separated field; ``_`` skips one.

    Raises:
        ConfigError: when no ``format: text`` rule with ``columns`` matches the file name.
    """
    import pandas as pd

    name = name or Path(path).name
    rule = contract.rule_for(name)
    if rule is None or rule.format != "text" or not rule.columns:
        raise ConfigError(f"contract {contract.name!r} v{contract.version} declares no header-less text "
                          f"format (a datasets rule with format: text and columns) for {name!r}")
    raw = pd.read_csv(path, sep=r"\s+", header=None)
    if raw.shape[1] < len(rule.columns):
        raise ConfigError(f"{name}: {raw.shape[1]} fields per line, contract {contract.name!r} declares "
                          f"{len(rule.columns)}")
    df = pd.DataFrame({contract.canonical_name(c): raw.iloc[:, i]
                       for i, c in enumerate(rule.columns) if c != "_"})
    df[ASSET] = df[ASSET].astype(str)
    if contract.clock.kind == "timestamp":
        df[contract.key] = pd.to_datetime(df[contract.key], utc=True)
    df["source_file"] = name
    return df


# The bundled FD001 training set is C-MAPSS data: it is read with the bundled contract of that name.
BUNDLED_CONTRACT = "cmapss"


@lru_cache(maxsize=4)
def bundled_fd001_model(process_noise: float) -> tuple[TwinModel, CalibrationReport]:
    """The twin calibrated on the bundled FD001 training set, with its report (cached per noise)."""
    from twinflow.contract.store import load_contract

    return calibrate(read_cmapss_frame(), contract=load_contract(BUNDLED_CONTRACT), process_noise=process_noise)


def read_cmapss_frame(name: str = "train_FD001.txt.gz"):
    """The bundled C-MAPSS file as a frame with the lake's column names (by the bundled contract)."""
    from twinflow.contract.store import load_contract
    from twinflow.data import cmapss_path

    return read_headerless(cmapss_path(name), load_contract(BUNDLED_CONTRACT), name)


def default_model(process_noise: float = 0.005) -> TwinModel:
    """The twin calibrated on the bundled FD001 training set (cached; the documented fallback)."""
    model, _ = bundled_fd001_model(process_noise)
    return model.model_copy(update={"source": "default:bundled-FD001"})

