"""Calibration: fit the twin to run-to-failure telemetry, with a KS check of the lifetimes."""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field

from twinflow.contracts import ASSET, OP_SETTINGS, SENSORS, TIME
from twinflow.tasks.twin.fleet import sample_lifetimes
from twinflow.tasks.twin.model import N_SENSORS, NoRunToFailureData, TwinModel, child_seed


class CalibrationReport(BaseModel):
    """Fit quality of a calibration: lifetimes observed vs simulated and the KS statistic."""

    n_assets: int
    n_rows: int
    excluded_assets: int = 0
    observed_lifetimes: list[int]
    simulated_lifetimes: list[int]
    ks_statistic: float
    b: float
    sensor_r2: dict[str, float] = Field(default_factory=dict)
    fallback: bool = False
    notes: list[str] = Field(default_factory=list)


def ks_statistic(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup |F_x - F_y|`` (ties handled exactly)."""
    x, y = np.sort(np.asarray(x, float)), np.sort(np.asarray(y, float))
    grid = np.concatenate([x, y])
    fx = np.searchsorted(x, grid, side="right") / len(x)
    fy = np.searchsorted(y, grid, side="right") / len(y)
    return float(np.max(np.abs(fx - fy)))


def _regimes(ops: np.ndarray, min_share: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """Label operating regimes by the rounded settings (C-MAPSS conditions are discrete)."""
    key = np.round(ops * np.array([1.0, 100.0, 1.0])).astype(np.int64)
    uniq, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    major = np.flatnonzero(counts >= min_share * len(ops))
    if major.size == 0:
        major = np.array([int(np.argmax(counts))])
    remap = np.full(len(uniq), -1)
    remap[major] = np.arange(major.size)
    # Rare keys join the nearest major regime.
    for i in np.flatnonzero(remap < 0):
        dist = np.abs(uniq[major] - uniq[i]).sum(axis=1)
        remap[i] = int(np.argmin(dist))
    labels = remap[inverse]
    return labels, np.bincount(labels, minlength=major.size)


def _lstsq_fit(onehot: np.ndarray, damage: np.ndarray, y: np.ndarray):
    x = np.column_stack([onehot, damage])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    return coef, resid


def calibrate(frame, *, process_noise: float = 0.005, seed: int = 0, n_sim: int = 4000,
              b_grid: Sequence[float] | None = None) -> tuple[TwinModel, CalibrationReport]:
    """Fit the twin's parameter distributions to run-to-failure telemetry.

    1. Lifetimes: the last cycle of each asset.
    2. Operating regimes from the rounded settings; per-regime setting means and noise.
    3. Shape ``b`` from the sensor trends: for each ``b`` on a grid, each asset's rate follows from
       its lifetime (``a = log(2 - d) / L**b``) and the sensors are regressed on the implied
       damage; ``b`` with the smallest standardised residual wins. The regression gives each
       sensor's base (per regime), gain and noise.
    4. Initial wear spread from each asset's early damage estimated from the sensors.
    5. ``log a`` mean/sd from the lifetimes, then corrected so that simulated lifetimes (with the
       process noise) match the observed log-lifetime mean and sd.
    6. Fit quality: KS statistic between the observed and fresh simulated lifetimes.

    Args:
        frame: pandas DataFrame with ``asset_id``, ``cycle``, ``op_setting_1..3``, ``s1..s21``;
            every asset must be run to failure.
        process_noise: Sd of the per-cycle health shocks (not identifiable from the sensors).
        seed: Seed of the simulations used for the correction and the KS statistic.
        n_sim: Number of simulated lifetimes.
        b_grid: Candidate shapes ``b``.

    Returns:
        The fitted model and its calibration report.

    Raises:
        NoRunToFailureData: fewer than 2 assets.
    """
    df = frame.sort_values([ASSET, TIME], kind="stable")
    assets, codes = np.unique(df[ASSET].astype(str).to_numpy(), return_inverse=True)
    codes = codes.reshape(-1)
    n_assets = len(assets)
    if n_assets < 2:
        raise NoRunToFailureData(f"calibration needs >= 2 run-to-failure assets, got {n_assets}")
    cycle = df[TIME].to_numpy(np.float64)
    life = np.zeros(n_assets)
    np.maximum.at(life, codes, cycle)
    ops = df[OP_SETTINGS].to_numpy(np.float64)
    y = df[SENSORS].to_numpy(np.float64)
    labels, counts = _regimes(ops)
    k = counts.size
    onehot = np.eye(k)[labels]
    regime_op = np.vstack([ops[labels == r].mean(axis=0) for r in range(k)])
    op_noise = np.sqrt(np.mean((ops - regime_op[labels]) ** 2, axis=0))

    y_sd = y.std(axis=0)
    informative = y_sd > 1e-9 * np.maximum(np.abs(y.mean(axis=0)), 1.0)
    grid = np.asarray(b_grid if b_grid is not None else np.round(np.arange(1.0, 3.01, 0.1), 2))
    log_life = np.log(life)

    def implied_damage(b: float, d_mean: float) -> tuple[np.ndarray, np.ndarray]:
        log_a = np.log(np.log(2.0 - d_mean)) - b * log_life
        return log_a, np.expm1(np.exp(log_a[codes] + b * np.log(cycle)))

    scores = []
    for b in grid:
        _, dmg = implied_damage(b, 0.0)
        _, resid = _lstsq_fit(onehot, dmg, y[:, informative])
        scores.append(float(np.sum((resid / y_sd[informative]) ** 2)))
    b = float(grid[int(np.argmin(scores))])
    log_a_i, dmg = implied_damage(b, 0.0)
    coef, resid = _lstsq_fit(onehot, dmg, y)
    base, gain = coef[:k], coef[k]
    noise = resid.std(axis=0)
    gain[~informative] = 0.0
    noise[~informative] = 0.0
    r2 = {s: float(1 - resid[:, j].var() / y[:, j].var()) for j, s in enumerate(SENSORS) if informative[j]}

    # Initial wear: weighted damage estimate from all informative sensors over each asset's first
    # cycles, minus the model's damage there; its spread (less the estimation noise) is d's spread.
    w = np.zeros(N_SENSORS)
    useful = informative & (np.abs(gain) > 0) & (noise > 0)
    w[useful] = gain[useful] / noise[useful] ** 2
    denom = float(np.sum(w * gain))
    d_scale = 0.0
    if denom > 0:
        d_obs = ((y - base[labels]) @ w) / denom
        early = cycle <= np.maximum(5, 0.15 * life[codes])
        excess = d_obs[early] - dmg[early]
        n_early = np.bincount(codes[early], minlength=n_assets)
        ok = n_early > 0
        per_asset = np.bincount(codes[early], weights=excess, minlength=n_assets)[ok] / n_early[ok]
        resid_var = np.var(d_obs - dmg)
        d_var = float(np.var(per_asset) - resid_var * np.mean(1.0 / n_early[ok]))
        d_scale = float(np.clip(math.sqrt(max(d_var, 0.0) / (1 - 2 / math.pi)), 0.0, 0.3))
    d_mean = d_scale * math.sqrt(2 / math.pi)
    # The regression saw asset-average initial wear in the base; the generator adds d explicitly.
    base = base - gain[None, :] * d_mean
    log_a_i = log_a_i + np.log(np.log(2.0 - d_mean)) - np.log(np.log(2.0))

    model = TwinModel(
        log_a_mean=float(log_a_i.mean()), log_a_sd=float(log_a_i.std(ddof=1)), b_mean=b, b_sd=0.0,
        d_scale=d_scale, process_noise=process_noise,
        regime_probs=(counts / counts.sum()).tolist(), regime_severity=[1.0] * k,
        regime_op=regime_op.tolist(), op_noise=op_noise.tolist(), sensor_base=base.tolist(),
        sensor_gain=gain.tolist(), sensor_noise=noise.tolist(), source="calibrated",
    )
    obs_mean, obs_sd = float(log_life.mean()), float(log_life.std(ddof=1))
    ss = np.random.SeedSequence(seed)
    for i in range(3):
        sim = np.log(sample_lifetimes(model, n_sim, child_seed(ss, i)))
        # log L = (log log(2 - d) - log a) / b: shifting log a moves the mean, scaling its sd the sd.
        scale = obs_sd / max(float(sim.std(ddof=1)), 1e-9)
        model = model.model_copy(update={
            "log_a_mean": model.log_a_mean + b * (float(sim.mean()) - obs_mean),
            "log_a_sd": float(np.clip(model.log_a_sd * scale, 0.0, 5.0)),
        })
    sim_life = sample_lifetimes(model, n_sim, child_seed(ss, 99))
    report = CalibrationReport(
        n_assets=n_assets, n_rows=len(df), observed_lifetimes=life.astype(int).tolist(),
        simulated_lifetimes=sim_life.astype(int).tolist(), ks_statistic=ks_statistic(life, sim_life),
        b=b, sensor_r2=r2,
    )
    return model, report


def select_run_to_failure(frame, truncated_sources: str, min_lifetime: int):
    """Keep the assets that ran to failure: not from a truncated source, at least ``min_lifetime``.

    ``truncated_sources`` is searched in the base name of ``source_file`` (not its folders).

    Returns:
        ``(frame of kept assets, number of excluded assets)``.
    """
    pattern = re.compile(truncated_sources)
    assets = frame[ASSET].astype(str)
    n_all = assets.nunique()
    if "source_file" in frame.columns:
        names = frame["source_file"].astype(str).str.replace("\\", "/").str.rsplit("/", n=1).str[-1]
        truncated = names.map(lambda s: bool(pattern.search(s)))
        bad = set(assets[truncated.to_numpy()])
    else:
        bad = set()
    life = frame.groupby(assets)[TIME].max()
    bad |= set(life.index[life < min_lifetime])
    kept = frame[~assets.isin(bad).to_numpy()]
    return kept, n_all - kept[ASSET].nunique()


@lru_cache(maxsize=4)
def bundled_fd001_model(process_noise: float) -> tuple[TwinModel, CalibrationReport]:
    """The twin calibrated on the bundled FD001 training set, with its report (cached per noise)."""
    return calibrate(read_cmapss_frame(), process_noise=process_noise)


def read_cmapss_frame(name: str = "train_FD001.txt.gz"):
    """The bundled C-MAPSS file as a frame with the lake's column names."""
    import pandas as pd

    from twinflow.contracts import CMAPSS_COLUMNS
    from twinflow.data import cmapss_path

    df = pd.read_csv(cmapss_path(name), sep=r"\s+", header=None, names=CMAPSS_COLUMNS)
    df[ASSET] = df.pop("unit").astype(str)
    df["source_file"] = name
    return df


def default_model(process_noise: float = 0.005) -> TwinModel:
    """The twin calibrated on the bundled FD001 training set (cached; the documented fallback)."""
    model, _ = bundled_fd001_model(process_noise)
    return model.model_copy(update={"source": "default:bundled-FD001"})
