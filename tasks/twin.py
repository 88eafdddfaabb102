"""Fleet digital twin: degradation model, synthetic fleets, calibration and policy Monte-Carlo.

Pure functions over an array module ``xp`` (``numpy`` on CPU, ``cupy`` on a GPU worker); the
``@task`` wrappers and the flows live in ``flows/simulate.py``.

Degradation model (the exponential damage propagation used to generate C-MAPSS): a unit installed
with initial wear ``d`` has health ``h(tau) = 1 - d - (exp(a * tau**b) - 1)`` at effective age
``tau`` (cycles weighted by the severity of the operating regime of each cycle). Process noise
enters the damage growth multiplicatively, ``h = 1 - d - (exp(a * tau**b + process_noise * eps) - 1)``
with a fresh ``eps ~ N(0, 1)`` each cycle, and the unit fails at the first cycle with ``h <= 0``,
i.e. ``a * tau**b + process_noise * eps >= log(2 - d)``: a comparison that needs no
transcendental function per cycle, which keeps the kernels cheap. Per unit ``log a ~ N(log_a_mean, log_a_sd)``,
``b ~ N(b_mean, b_sd)``, ``d = d_scale * |N(0, 1)|``: only normals are drawn (and exponentiated)
because CuPy's ``random.Generator`` lacks e.g. ``lognormal``. Sensors are linear in damage
``D = 1 - h`` per regime: ``s_j = base[regime, j] + gain_j * D + noise_j * eps``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from functools import lru_cache
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinflow.contracts import ASSET, OP_SETTINGS, SENSORS, TIME
from twinflow.errors import ConfigError, TwinflowError

log = logging.getLogger("twinflow.twin")

N_SENSORS = len(SENSORS)
_TINY_AGE = 1e-9
# Assets whose first passage has not happened this many cycles after the deterministic failure
# age are cut there (probability < 1e-6 with 5 sigma of process noise).
_MAX_EXTRA_CYCLES = 50


class NoRunToFailureData(TwinflowError, ValueError):
    """The lake snapshot holds no run-to-failure assets to calibrate the twin on."""


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


class TwinModel(BaseModel):
    """Parameter distributions of the fleet twin (see the module docstring for the model)."""

    model_config = ConfigDict(extra="forbid")

    log_a_mean: float
    log_a_sd: float = Field(ge=0)
    b_mean: float = Field(gt=0)
    b_sd: float = Field(0.0, ge=0)
    d_scale: float = Field(0.0, ge=0, le=0.5)
    process_noise: float = Field(0.005, ge=0)
    regime_probs: list[float] = Field(default_factory=lambda: [1.0])
    regime_severity: list[float] = Field(default_factory=lambda: [1.0])
    regime_op: list[list[float]] = Field(default_factory=lambda: [[0.0, 0.0, 100.0]])
    op_noise: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    sensor_base: list[list[float]] = Field(default_factory=lambda: [[0.0] * N_SENSORS])
    sensor_gain: list[float] = Field(default_factory=lambda: [0.0] * N_SENSORS)
    sensor_noise: list[float] = Field(default_factory=lambda: [0.0] * N_SENSORS)
    source: str = "default"

    @model_validator(mode="after")
    def _shapes(self) -> "TwinModel":
        k = len(self.regime_probs)
        if k == 0 or abs(sum(self.regime_probs) - 1.0) > 1e-6 or min(self.regime_probs) < 0:
            raise ValueError("regime_probs must be non-negative and sum to 1")
        if len(self.regime_severity) != k or min(self.regime_severity) <= 0:
            raise ValueError("regime_severity needs one positive value per regime")
        if len(self.regime_op) != k or any(len(r) != 3 for r in self.regime_op):
            raise ValueError("regime_op needs 3 operating settings per regime")
        if len(self.sensor_base) != k or any(len(r) != N_SENSORS for r in self.sensor_base):
            raise ValueError(f"sensor_base needs {N_SENSORS} values per regime")
        if len(self.sensor_gain) != N_SENSORS or len(self.sensor_noise) != N_SENSORS:
            raise ValueError(f"sensor_gain and sensor_noise need {N_SENSORS} values")
        if len(self.op_noise) != 3:
            raise ValueError("op_noise needs 3 values")
        return self

    @property
    def n_regimes(self) -> int:
        return len(self.regime_probs)

    @property
    def mean_severity(self) -> float:
        return float(np.dot(self.regime_probs, self.regime_severity))


class CostModel(BaseModel):
    """Costs (any currency) and downtimes of maintenance events."""

    model_config = ConfigDict(extra="forbid")

    failure: float = Field(100_000.0, ge=0, description="Cost of one unplanned failure (repair).")
    planned: float = Field(20_000.0, ge=0, description="Cost of one planned maintenance.")
    downtime_per_cycle: float = Field(2_000.0, ge=0, description="Cost of one asset-cycle down.")
    failure_downtime: int = Field(20, ge=0, description="Cycles down after a failure.")
    planned_downtime: int = Field(5, ge=0, description="Cycles down for a planned maintenance.")


class TwinParams(BaseModel):
    """Parameters of the ``simulate`` stage (validated before any cluster work)."""

    model_config = ConfigDict(extra="forbid")

    n_scenarios: int = Field(100, gt=0, description="Monte-Carlo scenarios per policy.")
    n_assets: int = Field(100, gt=0, description="Assets in the simulated fleet.")
    horizon: int = Field(1000, gt=0, description="Simulated cycles per scenario.")
    seed: int = Field(0, ge=0, description="Root seed; batches get SeedSequence(seed).spawn(n).")
    batch_scenarios: int = Field(10, gt=0, description="Scenarios per Dask batch (fixed split, so "
                                 "results do not depend on the number of workers).")
    intervals: list[int] = Field(default_factory=lambda: [75, 100, 125, 150, 175],
                                 description="Fixed-interval policies: maintain every k cycles.")
    thresholds: list[float] = Field(default_factory=lambda: [10.0, 20.0, 30.0, 45.0, 60.0],
                                    description="Predictive policies: maintain at RUL estimate <= x.")
    inspect_every: int = Field(10, gt=0, description="Cycles between RUL estimates.")
    costs: CostModel = Field(default_factory=CostModel)
    process_noise: float = Field(0.005, ge=0, description="Sd of the per-cycle shock on log(1 + damage).")
    rul_error_sd: float = Field(20.0, gt=0, description="Sd of the fallback Gaussian RUL error.")
    backend: Literal["auto", "numpy", "cupy"] = "auto"
    on_no_run_to_failure: Literal["error", "defaults"] = "error"
    truncated_sources: str = Field(r"^test_", description="Regex searched in the base name of each "
                                   "source file; matching files' assets are truncated (not run to "
                                   "failure), e.g. C-MAPSS test_FD001.txt.")
    min_lifetime: int = Field(20, gt=0, description="Assets with fewer cycles are not calibrated on.")
    fan_units: int = Field(300, gt=0, description="Units in the health fan chart.")

    @field_validator("intervals")
    @classmethod
    def _positive_intervals(cls, v: list[int]) -> list[int]:
        if any(k <= 0 for k in v):
            raise ValueError("intervals must be positive cycle counts")
        return sorted(set(v))

    @field_validator("thresholds")
    @classmethod
    def _non_negative_thresholds(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError("thresholds must be finite and >= 0")
        return sorted(set(v))

    @field_validator("truncated_sources")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"truncated_sources is not a valid regex: {exc}") from None
        return v


class GenerateParams(BaseModel):
    """Parameters of the ``generate`` flow (synthetic run-to-failure fleet)."""

    model_config = ConfigDict(extra="forbid")

    n_assets: int = Field(100, gt=0)
    seed: int = Field(0, ge=0)
    dataset: str = Field("synthetic", pattern=r"^[a-z0-9][a-z0-9_-]*$",
                         description="Lake dataset name (lower-case, as the ingest stage names them).")
    target: Literal["lake", "landing"] = "lake"
    chunk_assets: int = Field(2000, gt=0, description="Assets per Dask task (fixed split).")
    batch_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    asset_prefix: str = Field("syn-", pattern=r"^[A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# Array-module helpers
# ---------------------------------------------------------------------------------------------


def array_module(backend: str = "numpy"):
    """Return ``numpy`` or ``cupy`` for ``backend`` (``auto``: CuPy when a GPU is visible)."""
    if backend == "numpy":
        return np
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception as exc:  # noqa: BLE001 - no CUDA driver, no cupy, ...
        if backend == "cupy":
            raise ConfigError(f"backend 'cupy' needs CuPy and a CUDA GPU on the worker ({exc})") from None
    if backend == "cupy":
        raise ConfigError("backend 'cupy' needs a CUDA GPU on the worker")
    return np


def _to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _seed_seq(seed: int | np.random.SeedSequence) -> np.random.SeedSequence:
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)


def _child(ss: np.random.SeedSequence, i: int) -> np.random.SeedSequence:
    # Independent of how often ss.spawn() was called before: a pure function of (ss, i).
    return np.random.SeedSequence(entropy=ss.entropy, spawn_key=tuple(ss.spawn_key) + (i,))


def _rng(xp, ss: np.random.SeedSequence):
    if xp is np:
        return np.random.Generator(np.random.PCG64(ss))
    return xp.random.default_rng(int(ss.generate_state(1, np.uint64)[0]))


def _model_arrays(model: TwinModel, xp) -> dict[str, Any]:
    f = xp.float64
    return {
        "cum_probs": xp.asarray(np.cumsum(model.regime_probs)[:-1], dtype=f),
        "severity": xp.asarray(model.regime_severity, dtype=f),
        "op": xp.asarray(model.regime_op, dtype=f),
        "op_noise": xp.asarray(model.op_noise, dtype=f),
        "base": xp.asarray(model.sensor_base, dtype=f),
        "gain": xp.asarray(model.sensor_gain, dtype=f),
        "noise": xp.asarray(model.sensor_noise, dtype=f),
    }


def failure_age(d, log_a, b, xp=np):
    """Deterministic effective age at which ``h`` reaches 0: ``(log(2 - d) / a) ** (1 / b)``."""
    return xp.exp((xp.log(xp.log(2.0 - d)) - log_a) / b)


def draw_units(model: TwinModel, rng, n: int | tuple[int, ...], xp=np) -> dict[str, Any]:
    """Draw units' parameters: ``d``, ``log_a``, ``a``, ``b``, ``c = log(2 - d)`` (failure level of
    ``a * tau**b``) and ``tau_f``, the deterministic failure age."""
    shape = (n,) if isinstance(n, int) else tuple(n)
    z = rng.standard_normal((3, *shape))
    log_a = model.log_a_mean + model.log_a_sd * z[0]
    b = xp.clip(model.b_mean + model.b_sd * z[1], 0.3, 6.0)
    d = xp.minimum(model.d_scale * xp.abs(z[2]), 0.9)
    return {"d": d, "log_a": log_a, "a": xp.exp(log_a), "b": b, "c": xp.log(2.0 - d),
            "tau_f": failure_age(d, log_a, b, xp)}


def _growth(log_a, b, tau, xp):
    """The damage exponent ``a * tau**b`` (0 at age 0)."""
    x = xp.log(xp.maximum(tau, _TINY_AGE))
    x *= b
    x += log_a
    xp.exp(x, out=x)
    return x


# ---------------------------------------------------------------------------------------------
# Synthetic fleets
# ---------------------------------------------------------------------------------------------


def _segmented_cumsum(values, starts, counts, xp):
    c = xp.cumsum(values)
    before = c - values
    return c - xp.repeat(before[starts], counts)


def _trajectories(model: TwinModel, n_assets: int, ss: np.random.SeedSequence, xp=np) -> dict[str, Any]:
    """Run-to-failure trajectories of ``n_assets`` new units, rows flat and asset-contiguous."""
    arr = _model_arrays(model, xp)
    units = draw_units(model, _rng(xp, _child(ss, 0)), n_assets, xp)
    d, log_a, b, tau_f = units["d"], units["log_a"], units["b"], units["tau_f"]
    min_sev = float(min(model.regime_severity))
    # |dh/dtau| at the failure age: how many cycles 5 sigma of process noise can shift a passage.
    slope = b * xp.log(2.0 - d) / tau_f
    extra = xp.ceil(xp.minimum(5.0 * model.process_noise / slope, _MAX_EXTRA_CYCLES)) + 2
    counts = (xp.ceil(tau_f / min_sev) + extra).astype(xp.int64)
    total = int(counts.sum())
    ends = xp.cumsum(counts)
    starts = ends - counts
    asset = xp.repeat(xp.arange(n_assets, dtype=xp.int64), counts)
    cycle = xp.arange(total, dtype=xp.int64) - xp.repeat(starts, counts) + 1
    if model.n_regimes > 1:
        u = _rng(xp, _child(ss, 1)).random(total)
        regime = xp.searchsorted(arr["cum_probs"], u, side="right")
        tau = _segmented_cumsum(arr["severity"][regime], starts, counts, xp)
    else:
        regime = xp.zeros(total, dtype=xp.int64)
        tau = cycle * float(model.regime_severity[0])
    eps = _rng(xp, _child(ss, 2)).standard_normal(total)
    x = _growth(log_a[asset], b[asset], tau, xp)
    x += model.process_noise * eps
    failed = (x >= xp.log(2.0 - d)[asset]).astype(xp.int64)
    damage = xp.expm1(x)
    damage += d[asset]
    # Keep each asset's rows up to and including its first failure.
    before = _segmented_cumsum(failed, starts, counts, xp) - failed
    keep = before == 0
    lifetime = xp.bincount(asset[keep], minlength=n_assets)
    return {"asset": asset[keep], "cycle": cycle[keep], "regime": regime[keep],
            "damage": damage[keep], "lifetime": lifetime, "arrays": arr}


def sample_lifetimes(model: TwinModel, n: int, seed: int | np.random.SeedSequence = 0, xp=np) -> np.ndarray:
    """Simulated run-to-failure lifetimes (cycles) of ``n`` new units."""
    return _to_numpy(_trajectories(model, n, _seed_seq(seed), xp)["lifetime"])


def health_fan(model: TwinModel, n_units: int, seed: int = 0, quantiles=(0.05, 0.25, 0.5, 0.75, 0.95),
               xp=np) -> dict[str, np.ndarray]:
    """Quantiles of simulated health ``h`` by cycle over ``n_units`` run-to-failure trajectories.

    Returns:
        ``cycle`` (1..max life), ``q`` (quantiles x cycles, NaN where fewer than 10% of the units
        are still alive) and ``alive`` (fraction of units alive at each cycle).
    """
    tr = _trajectories(model, n_units, _seed_seq(seed), xp)
    cycle, health, asset = (_to_numpy(tr[k]) for k in ("cycle", "damage", "asset"))
    health = 1.0 - health
    horizon = int(cycle.max())
    grid = np.full((n_units, horizon), np.nan)
    grid[asset, cycle - 1] = health
    alive = np.mean(~np.isnan(grid), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = np.nanquantile(grid, quantiles, axis=0)
    q[:, alive < 0.1] = np.nan
    return {"cycle": np.arange(1, horizon + 1), "q": q, "quantiles": np.asarray(quantiles), "alive": alive}


def _per_regime(table, regime, n_regimes: int, xp):
    """``out[j, i] = table[regime[i], j]`` as a C-contiguous (channels x rows) array."""
    out = xp.empty((table.shape[1], regime.shape[0]), dtype=xp.float64)
    for j in range(table.shape[1]):
        out[j] = table[0, j] if n_regimes == 1 else table[:, j][regime]
    return out


def generate_fleet(n_assets: int, seed: int | np.random.SeedSequence = 0, model: TwinModel | None = None, *,
                   asset_offset: int = 0, asset_prefix: str = "syn-", batch_id: str = "synthetic",
                   source_file: str | None = None, xp=np):
    """Generate a synthetic run-to-failure fleet in the lake schema (``twinflow.contracts``).

    Vectorised over all rows: the scale workload of the benchmarks (10 M rows in seconds).

    Args:
        n_assets: Number of assets (each a unit from new to failure).
        seed: Root seed (or SeedSequence) of this fleet.
        model: Twin parameters; default: calibrated on the bundled FD001 training set.
        asset_offset: Index of the first asset (for fleets generated in chunks).
        asset_prefix: ``asset_id`` is ``f"{asset_prefix}{index:07d}"``.
        batch_id: Lineage column value.
        source_file: Lineage column value (default ``generated:<batch_id>``).
        xp: Array module.

    Returns:
        A ``pyarrow.Table`` with the canonical telemetry schema, rows ordered by asset then cycle.
    """
    import pyarrow as pa

    from twinflow.contracts import telemetry_schema

    if n_assets <= 0:
        raise ConfigError("n_assets must be positive")
    model = model or default_model()
    ss = _seed_seq(seed)
    tr = _trajectories(model, n_assets, ss, xp)
    arr, regime, asset = tr["arrays"], tr["regime"], tr["asset"]
    n_rows = int(asset.shape[0])
    # Row-per-channel, C-contiguous: each channel is one Arrow column without a copy.
    ops = _per_regime(arr["op"], regime, model.n_regimes, xp)
    rng_ops = _rng(xp, _child(ss, 3))
    for i in range(3):
        if model.op_noise[i] > 0:
            ops[i] += model.op_noise[i] * rng_ops.standard_normal(n_rows)
    sensors = _per_regime(arr["base"], regime, model.n_regimes, xp)
    rng_s = _rng(xp, _child(ss, 4))
    damage = tr["damage"]
    for j in range(N_SENSORS):
        if model.sensor_gain[j] != 0:
            sensors[j] += model.sensor_gain[j] * damage
        if model.sensor_noise[j] > 0:
            sensors[j] += model.sensor_noise[j] * rng_s.standard_normal(n_rows)
    ops, sensors = _to_numpy(ops), _to_numpy(sensors)
    asset_np = _to_numpy(asset).astype(np.int32)
    names = pa.array([f"{asset_prefix}{asset_offset + i:07d}" for i in range(n_assets)], pa.string())
    zeros = pa.array(np.zeros(n_rows, dtype=np.int32))
    schema = telemetry_schema()
    columns = {
        ASSET: names.take(pa.array(asset_np)),
        TIME: pa.array(_to_numpy(tr["cycle"]).astype(np.int32)),
        "timestamp": pa.nulls(n_rows, schema.field("timestamp").type),
        **{c: pa.array(ops[i]) for i, c in enumerate(OP_SETTINGS)},
        **{c: pa.array(sensors[j]) for j, c in enumerate(SENSORS)},
        "source_file": pa.array([source_file or f"generated:{batch_id}"], pa.string()).take(zeros),
        "batch_id": pa.array([batch_id], pa.string()).take(zeros),
        "quality": zeros,
    }
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


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
        sim = np.log(sample_lifetimes(model, n_sim, _child(ss, i)))
        # log L = (log log(2 - d) - log a) / b: shifting log a moves the mean, scaling its sd the sd.
        scale = obs_sd / max(float(sim.std(ddof=1)), 1e-9)
        model = model.model_copy(update={
            "log_a_mean": model.log_a_mean + b * (float(sim.mean()) - obs_mean),
            "log_a_sd": float(np.clip(model.log_a_sd * scale, 0.0, 5.0)),
        })
    sim_life = sample_lifetimes(model, n_sim, _child(ss, 99))
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


# ---------------------------------------------------------------------------------------------
# RUL estimate error
# ---------------------------------------------------------------------------------------------


class RulErrorModel(BaseModel):
    """Error of the RUL estimate: the champion's residuals by true-RUL bin, or a Gaussian."""

    kind: Literal["empirical", "gaussian"]
    bin_edges: list[float] = Field(default_factory=list, description="Interior true-RUL edges.")
    residuals: list[list[float]] = Field(default_factory=list, description="pred - true per bin.")
    gaussian_mean: float = 0.0
    gaussian_sd: float = 20.0
    source: str = ""

    @classmethod
    def gaussian(cls, sd: float, mean: float = 0.0, source: str = "fallback") -> "RulErrorModel":
        return cls(kind="gaussian", gaussian_mean=mean, gaussian_sd=sd, source=source)

    @classmethod
    def from_residuals(cls, true_rul, pred_rul, n_bins: int = 5, min_per_bin: int = 10,
                       source: str = "champion") -> "RulErrorModel":
        """Empirical error conditional on the true RUL (quantile bins of ``true_rul``)."""
        t = np.asarray(true_rul, float)
        p = np.asarray(pred_rul, float)
        ok = np.isfinite(t) & np.isfinite(p)
        t, p = t[ok], p[ok]
        if t.size < min_per_bin:
            raise ValueError(f"need >= {min_per_bin} residuals, got {t.size}")
        n_bins = max(1, min(n_bins, t.size // min_per_bin))
        edges = np.unique(np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1]))
        bins = np.searchsorted(edges, t, side="right")
        res = [(p - t)[bins == i].tolist() for i in range(len(edges) + 1)]
        keep = [i for i, r in enumerate(res) if r]
        edges_kept = [float(edges[i - 1]) for i in keep[1:]]
        return cls(kind="empirical", bin_edges=edges_kept, residuals=[res[i] for i in keep], source=source)

    def device_arrays(self, xp) -> dict[str, Any]:
        if self.kind == "gaussian":
            return {}
        counts = np.array([len(r) for r in self.residuals], dtype=np.int64)
        return {"edges": xp.asarray(self.bin_edges, dtype=xp.float64),
                "offsets": xp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), dtype=xp.int64),
                "counts": xp.asarray(counts, dtype=xp.int64),
                "flat": xp.asarray(np.concatenate(self.residuals), dtype=xp.float64)}


def error_model_from_champion(champion: dict | None, fallback_sd: float) -> tuple[RulErrorModel, str | None]:
    """Error model from ``champion_error_model(settings)``'s dict, else the Gaussian fallback.

    Returns:
        ``(model, warning or None)``.
    """
    fallback = RulErrorModel.gaussian(fallback_sd, source=f"fallback: Gaussian(0, {fallback_sd:g})")
    if not champion:
        return fallback, (f"no champion model error distribution found; RUL estimates use the stated "
                          f"fallback error model N(0, {fallback_sd:g}) cycles")
    try:
        src = str(champion.get("model_uri") or champion.get("run_id") or "champion")
        return RulErrorModel.from_residuals(champion["true_rul"], champion["pred_rul"], source=src), None
    except (KeyError, ValueError, TypeError) as exc:
        return fallback, (f"champion error distribution unusable ({exc}); RUL estimates use the stated "
                          f"fallback error model N(0, {fallback_sd:g}) cycles")


# ---------------------------------------------------------------------------------------------
# Policies and the Monte-Carlo kernel
# ---------------------------------------------------------------------------------------------


class Policy(NamedTuple):
    """A maintenance policy: ``kind`` in run_to_failure / fixed_interval / predictive."""

    name: str
    kind: str
    value: float


def build_policies(intervals: Sequence[int], thresholds: Sequence[float]) -> list[Policy]:
    """Run-to-failure, one fixed-interval policy per ``k`` and one predictive per threshold."""
    out = [Policy("run_to_failure", "run_to_failure", math.inf)]
    out += [Policy(f"fixed_k{int(k)}", "fixed_interval", float(k)) for k in intervals]
    out += [Policy(f"predictive_rul{x:g}", "predictive", float(x)) for x in thresholds]
    return out


_OUTPUTS = ("failures", "planned", "downtime")


class _UnitTable:
    """Per-slot sequence of replacement units, drawn lazily in blocks from one stream.

    Every policy lane of a slot installs the same j-th unit (common random numbers), and the table
    grows in a deterministic order, so a batch is a pure function of its seed.
    """

    def __init__(self, model: TwinModel, rng, n_slots: int, block: int, xp):
        self.model, self.rng, self.n, self.block, self.xp = model, rng, n_slots, block, xp
        self.cols: dict[str, Any] | None = None
        self.extend(1)

    def extend(self, need: int) -> None:
        xp = self.xp
        while self.cols is None or self.cols["d"].shape[1] < need:
            new = draw_units(self.model, self.rng, (self.n, self.block), xp)
            self.cols = new if self.cols is None else {
                k: xp.concatenate([self.cols[k], new[k]], axis=1) for k in new}

    def take(self, slot, j) -> dict[str, Any]:
        return {k: v[slot, j] for k, v in self.cols.items()}


def simulate_batch(model: TwinModel, policies: Sequence[Policy], costs: CostModel, n_scenarios: int,
                   n_assets: int, horizon: int, seed: int | np.random.SeedSequence,
                   error_model: RulErrorModel, *, inspect_every: int = 10, xp=np) -> dict[str, np.ndarray]:
    """Monte-Carlo of ``n_scenarios`` x ``n_assets`` x ``horizon`` cycles under every policy.

    Vectorised over (policy, scenario, asset) lanes, stepping through cycles. The per-cycle shocks,
    regimes, RUL-estimate draws and replacement units are shared by the policies' lanes of one
    (scenario, asset) slot (common random numbers), so policy differences are not sampling noise.

    At each cycle an operating asset ages by its regime's severity and fails when its noisy health
    reaches 0 (unplanned repair: cost ``costs.failure``, ``failure_downtime`` cycles down); else
    the policy may stop it for planned maintenance (``costs.planned``, ``planned_downtime``
    cycles): fixed interval when its age reaches ``k`` cycles; predictive when, at an inspection
    (every ``inspect_every`` cycles), true RUL + a draw of the RUL error is ``<= threshold``.
    Either event installs a new unit from the slot's unit sequence.

    Returns:
        numpy arrays of shape ``(n_policies, n_scenarios)``: ``failures``, ``planned``, ``downtime``
        (asset-cycles down) and ``cost``, each summed over the fleet.
    """
    ss = _seed_seq(seed)
    n_pol, n_slots = len(policies), n_scenarios * n_assets
    f64 = xp.float64
    arr = _model_arrays(model, xp)
    interval = xp.asarray([p.value if p.kind == "fixed_interval" else np.inf for p in policies], f64)[:, None]
    threshold = xp.asarray([p.value if p.kind == "predictive" else -np.inf for p in policies], f64)[:, None]
    predictive = any(p.kind == "predictive" for p in policies)
    err = error_model.device_arrays(xp)
    rng_units, rng_noise, rng_regime, rng_error = (_rng(xp, _child(ss, i)) for i in range(4))
    table = _UnitTable(model, rng_units, n_slots, max(2, horizon // 100), xp)
    shape = (n_pol, n_slots)
    first = table.take(xp.arange(n_slots), xp.zeros(n_slots, dtype=xp.int64))
    lane = {k: xp.broadcast_to(v, shape).copy() for k, v in first.items()}
    # One regime and one shape b: the age is the cycle count and a * tau**b = a * table[age].
    fast = model.n_regimes == 1 and model.b_sd == 0
    sev0 = float(model.regime_severity[0])
    if fast:
        pow_table = (sev0 * xp.arange(horizon + 2, dtype=f64)) ** model.b_mean
    else:
        tau = xp.zeros(shape, f64)
    unit_j = xp.zeros(shape, dtype=xp.int64)
    resume = xp.ones(shape, dtype=xp.int64)  # first cycle the lane's current unit operates
    out = {k: xp.zeros(shape, dtype=xp.int64) for k in _OUTPUTS}
    mean_sev, sigma = model.mean_severity, model.process_noise
    for t in range(1, horizon + 1):
        age = (t + 1) - resume  # cycles operated by the current unit, this one included
        active = age > 0
        if fast:
            x = lane["a"] * pow_table[xp.maximum(age, 0)]
        else:
            if model.n_regimes > 1:
                regime = xp.searchsorted(arr["cum_probs"], rng_regime.random(n_slots), side="right")
                tau += arr["severity"][regime] * active
            else:
                tau += sev0 * active
            x = _growth(lane["log_a"], lane["b"], tau, xp)
        eps = rng_noise.standard_normal(n_slots)
        eps *= sigma
        fail = (x >= lane["c"] - eps) & active
        plan = (age >= interval) & ~fail
        if predictive and t % inspect_every == 0:
            tau_now = sev0 * xp.maximum(age, 0) if fast else tau
            rul = (lane["tau_f"] - tau_now) / mean_sev
            if error_model.kind == "gaussian":
                e = error_model.gaussian_mean + error_model.gaussian_sd * rng_error.standard_normal(n_slots)
            else:
                u = rng_error.random(n_slots)
                bins = xp.searchsorted(err["edges"], rul, side="right")
                cnt = err["counts"][bins]
                e = err["flat"][err["offsets"][bins] + xp.minimum((u * cnt).astype(xp.int64), cnt - 1)]
            plan |= active & ~fail & (rul + e <= threshold)
        lanes = xp.nonzero(fail | plan)
        if lanes[0].shape[0] == 0:
            continue
        lf = fail[lanes]
        out["failures"][lanes] += lf
        out["planned"][lanes] += ~lf
        dur = xp.where(lf, costs.failure_downtime, costs.planned_downtime)
        out["downtime"][lanes] += xp.minimum(dur, horizon - t)
        resume[lanes] = t + 1 + dur
        unit_j[lanes] += 1
        table.extend(int(unit_j[lanes].max()) + 1)
        new = table.take(lanes[1], unit_j[lanes])
        for k, v in new.items():
            lane[k][lanes] = v
        if not fast:
            tau[lanes] = 0.0
    res = {k: _to_numpy(v.reshape(n_pol, n_scenarios, n_assets).sum(axis=2)) for k, v in out.items()}
    res["cost"] = (costs.failure * res["failures"] + costs.planned * res["planned"]
                   + costs.downtime_per_cycle * res["downtime"])
    return res


def simulate_loop(model: TwinModel, policy: Policy, costs: CostModel, n_scenarios: int, n_assets: int,
                  horizon: int, seed: int, error_model: RulErrorModel, *, inspect_every: int = 10) -> dict[str, np.ndarray]:
    """Reference and benchmark baseline: the same model as :func:`simulate_batch`, one policy,
    a straightforward Python loop per asset and cycle (own random streams, same distributions).

    Returns:
        numpy arrays of shape ``(n_scenarios,)``: ``failures``, ``planned``, ``downtime``, ``cost``.
    """
    rng = np.random.default_rng(seed)
    cum = np.cumsum(model.regime_probs)[:-1]
    sev = model.regime_severity
    mean_sev = model.mean_severity
    flat = np.concatenate(error_model.residuals) if error_model.kind == "empirical" else None
    counts = [len(r) for r in error_model.residuals]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts else []

    def new_unit():
        u = draw_units(model, rng, 1)
        return float(u["a"][0]), float(u["b"][0]), float(u["c"][0]), float(u["tau_f"][0])

    res = {k: np.zeros(n_scenarios, dtype=np.int64) for k in _OUTPUTS}
    for s in range(n_scenarios):
        for _ in range(n_assets):
            a, b, c, tau_f = new_unit()
            tau = age = 0.0
            down = 0
            eps = rng.standard_normal(horizon)
            draws = rng.random(horizon)
            for t in range(1, horizon + 1):
                if down > 0:
                    down -= 1
                    res["downtime"][s] += 1
                    continue
                tau += sev[int(np.searchsorted(cum, draws[t - 1], side="right"))] if len(cum) else sev[0]
                age += 1
                failed = a * tau ** b >= c - model.process_noise * eps[t - 1]
                planned = False
                if not failed:
                    if policy.kind == "fixed_interval":
                        planned = age >= policy.value
                    elif policy.kind == "predictive" and t % inspect_every == 0:
                        rul = (tau_f - tau) / mean_sev
                        if error_model.kind == "gaussian":
                            e = error_model.gaussian_mean + error_model.gaussian_sd * rng.standard_normal()
                        else:
                            i = int(np.searchsorted(error_model.bin_edges, rul, side="right"))
                            e = flat[offsets[i] + min(int(rng.random() * counts[i]), counts[i] - 1)]
                        planned = rul + e <= policy.value
                if failed or planned:
                    res["failures" if failed else "planned"][s] += 1
                    down = costs.failure_downtime if failed else costs.planned_downtime
                    a, b, c, tau_f = new_unit()
                    tau = age = 0.0
    res["cost"] = (costs.failure * res["failures"] + costs.planned * res["planned"]
                   + costs.downtime_per_cycle * res["downtime"])
    return res


# ---------------------------------------------------------------------------------------------
# Fused GPU kernel (CuPy RawKernel): one thread per (policy, slot) lane, state in registers
# ---------------------------------------------------------------------------------------------

_FUSED_SRC = r"""
typedef unsigned long long u64;

__device__ __forceinline__ u64 mix64(u64 x) {
    // splitmix64 finaliser: a bijective avalanche of the counter.
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27; x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

__device__ __forceinline__ u64 ctr_hash(u64 key, u64 stream, u64 slot, u64 step) {
    return mix64(mix64(key ^ (stream * 0x9E3779B97F4A7C15ULL)) + slot * 0xD1B54A32D192ED03ULL
                 + step * 0x8CB92BA72F3D8DD7ULL);
}

__device__ __forceinline__ float u01(unsigned int bits24) {
    return ((float)bits24 + 0.5f) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ float normal(u64 h) {
    float u1 = u01((unsigned int)(h >> 40));
    float u2 = u01((unsigned int)(h & 0xFFFFFFULL));
    return sqrtf(-2.0f * __logf(u1)) * __cosf(6.283185307f * u2);
}

struct Unit { float a, b, c, tau_f; };

__device__ __forceinline__ Unit draw_unit(u64 key, u64 slot, u64 j, float mu, float sd_a, float b_mean,
                                          float b_sd, float d_scale) {
    float z0 = normal(ctr_hash(key, 10, slot, 3 * j));
    float z1 = normal(ctr_hash(key, 10, slot, 3 * j + 1));
    float z2 = normal(ctr_hash(key, 10, slot, 3 * j + 2));
    float log_a = mu + sd_a * z0;
    float b = fminf(fmaxf(b_mean + b_sd * z1, 0.3f), 6.0f);
    float d = fminf(d_scale * fabsf(z2), 0.9f);
    Unit u;
    u.a = __expf(log_a);
    u.b = b;
    u.c = __logf(2.0f - d);
    u.tau_f = __expf((__logf(u.c) - log_a) / b);
    return u;
}

extern "C" __global__ void twin_policy_kernel(
    const float* interval, const float* threshold, const int* predictive, int n_pol, long long n_slots,
    int horizon, int inspect_every, u64 key,
    float mu, float sd_a, float b_mean, float b_sd, float d_scale, float sigma,
    int n_regimes, const float* cum_probs, const float* severity, float mean_sev,
    int err_kind, float g_mean, float g_sd, int n_bins, const float* edges, const long long* offsets,
    const long long* counts, const float* flat,
    int fail_down, int plan_down,
    int* out_fail, int* out_plan, int* out_down)
{
    long long lane = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (lane >= (long long)n_pol * n_slots) return;
    int p = (int)(lane / n_slots);
    u64 slot = (u64)(lane % n_slots);
    float k = interval[p], thr = threshold[p];
    int pred = predictive[p];
    u64 j = 0;
    Unit u = draw_unit(key, slot, j, mu, sd_a, b_mean, b_sd, d_scale);
    float tau = 0.0f;
    int resume = 1, nf = 0, np_ = 0, nd = 0;
    for (int t = 1; t <= horizon; ++t) {
        int age = t + 1 - resume;
        if (age <= 0) continue;
        float sev = severity[0];
        if (n_regimes > 1) {
            float r = u01((unsigned int)(ctr_hash(key, 2, slot, t) >> 40));
            int g = 0;
            while (g < n_regimes - 1 && r >= cum_probs[g]) ++g;
            sev = severity[g];
        }
        tau += sev;
        float x = u.a * __powf(tau, u.b);
        float z = normal(ctr_hash(key, 1, slot, t));
        bool fail = x >= u.c - sigma * z;
        bool plan = !fail && (float)age >= k;
        if (!fail && !plan && pred && (t % inspect_every) == 0) {
            float rul = (u.tau_f - tau) / mean_sev;
            u64 h = ctr_hash(key, 3, slot, t);
            float e;
            if (err_kind == 0) {
                e = g_mean + g_sd * normal(h);
            } else {
                int bin = 0;
                while (bin < n_bins - 1 && rul >= edges[bin]) ++bin;
                long long cnt = counts[bin];
                long long idx = (long long)(u01((unsigned int)(h >> 40)) * (float)cnt);
                if (idx > cnt - 1) idx = cnt - 1;
                e = flat[offsets[bin] + idx];
            }
            plan = rul + e <= thr;
        }
        if (fail || plan) {
            int dur = fail ? fail_down : plan_down;
            nf += fail; np_ += plan;
            nd += min(dur, horizon - t);
            resume = t + 1 + dur;
            ++j;
            u = draw_unit(key, slot, j, mu, sd_a, b_mean, b_sd, d_scale);
            tau = 0.0f;
        }
    }
    out_fail[lane] = nf; out_plan[lane] = np_; out_down[lane] = nd;
}
"""


@lru_cache(maxsize=1)
def _fused_kernel():
    import cupy

    return cupy.RawKernel(_FUSED_SRC, "twin_policy_kernel", options=("--use_fast_math",))


def fused_kernel_args(model: TwinModel, policies: Sequence[Policy], costs: CostModel, n_scenarios: int,
                      n_assets: int, horizon: int, seed: int | np.random.SeedSequence,
                      error_model: RulErrorModel, *, inspect_every: int = 10, xp=np) -> tuple[tuple, dict, int]:
    """Arguments of ``twin_policy_kernel`` in ``_FUSED_SRC`` order, as ``xp`` arrays and NumPy scalars.

    Returns:
        ``(args, outputs, lanes)``: ``outputs`` are the int32 per-lane counters the kernel fills.
    """
    ss = _seed_seq(seed)
    n_pol, n_slots = len(policies), n_scenarios * n_assets
    f32 = np.float32
    interval = xp.asarray([p.value if p.kind == "fixed_interval" else 3.0e38 for p in policies], f32)
    threshold = xp.asarray([p.value if p.kind == "predictive" else -3.0e38 for p in policies], f32)
    predictive = xp.asarray([p.kind == "predictive" for p in policies], np.int32)
    cum = xp.asarray(np.r_[np.cumsum(model.regime_probs)[:-1], 2.0], f32)
    sev = xp.asarray(model.regime_severity, f32)
    if error_model.kind == "empirical":
        counts = np.array([len(r) for r in error_model.residuals], np.int64)
        edges = xp.asarray(np.r_[error_model.bin_edges, 3.0e38], f32)
        offsets = xp.asarray(np.r_[0, np.cumsum(counts)[:-1]], np.int64)
        counts_d = xp.asarray(counts)
        flat = xp.asarray(np.concatenate(error_model.residuals), f32)
        err_kind, n_bins = 1, len(counts)
    else:
        edges, offsets, counts_d = xp.zeros(1, f32), xp.zeros(1, np.int64), xp.ones(1, np.int64)
        flat, err_kind, n_bins = xp.zeros(1, f32), 0, 1
    lanes = n_pol * n_slots
    out = {k: xp.zeros(lanes, np.int32) for k in _OUTPUTS}
    key = np.uint64(ss.generate_state(1, np.uint64)[0])
    args = (interval, threshold, predictive, np.int32(n_pol), np.int64(n_slots), np.int32(horizon),
            np.int32(inspect_every), key, f32(model.log_a_mean), f32(model.log_a_sd), f32(model.b_mean),
            f32(model.b_sd), f32(model.d_scale), f32(model.process_noise), np.int32(model.n_regimes), cum, sev,
            f32(model.mean_severity), np.int32(err_kind), f32(error_model.gaussian_mean),
            f32(error_model.gaussian_sd), np.int32(n_bins), edges, offsets, counts_d, flat,
            np.int32(costs.failure_downtime), np.int32(costs.planned_downtime),
            out["failures"], out["planned"], out["downtime"])
    return args, out, lanes


def fused_kernel_results(out: dict, n_pol: int, n_scenarios: int, n_assets: int, costs: CostModel) -> dict[str, np.ndarray]:
    """Per-(policy, scenario) fleet totals from the kernel's per-lane counters."""
    res = {k: _to_numpy(v.reshape(n_pol, n_scenarios, n_assets).sum(axis=2, dtype=np.int64))
           for k, v in out.items()}
    res["cost"] = (costs.failure * res["failures"] + costs.planned * res["planned"]
                   + costs.downtime_per_cycle * res["downtime"])
    return res


def simulate_batch_fused(model: TwinModel, policies: Sequence[Policy], costs: CostModel, n_scenarios: int,
                         n_assets: int, horizon: int, seed: int | np.random.SeedSequence,
                         error_model: RulErrorModel, *, inspect_every: int = 10) -> dict[str, np.ndarray]:
    """GPU version of :func:`simulate_batch`: one fused CUDA kernel, one thread per lane.

    Same model, policies and outputs; float32 state kept in registers across all cycles and a
    counter-based random stream (splitmix64 of seed, stream, slot, cycle), so draws are shared by
    a slot's policy lanes (common random numbers) without storing them. Results are deterministic
    for a seed but are not the NumPy kernel's numbers: they agree in distribution.
    """
    import cupy

    args, out, lanes = fused_kernel_args(model, policies, costs, n_scenarios, n_assets, horizon, seed,
                                         error_model, inspect_every=inspect_every, xp=cupy)
    threads = 256
    _fused_kernel()(((lanes + threads - 1) // threads,), (threads,), args)
    return fused_kernel_results(out, len(policies), n_scenarios, n_assets, costs)


# ---------------------------------------------------------------------------------------------
# Batches, aggregation
# ---------------------------------------------------------------------------------------------


def plan_batches(n_scenarios: int, batch_scenarios: int, seed: int) -> list[tuple[int, np.random.SeedSequence]]:
    """Fixed decomposition of the scenarios into batches, each with its own spawned seed.

    Depends only on the parameters, never on the cluster, so results are identical for any number
    of workers.
    """
    sizes = [batch_scenarios] * (n_scenarios // batch_scenarios)
    if n_scenarios % batch_scenarios:
        sizes.append(n_scenarios % batch_scenarios)
    seeds = np.random.SeedSequence(seed).spawn(len(sizes))
    return list(zip(sizes, seeds))


def run_batch(model: TwinModel, policies: Sequence[Policy], params: TwinParams, n_scenarios: int,
              seed: np.random.SeedSequence, error_model: RulErrorModel) -> dict[str, np.ndarray]:
    """One Dask unit of work: a scenario batch on this worker's backend (GPU when it has one)."""
    xp = array_module(params.backend)
    if xp is not np:
        return simulate_batch_fused(model, policies, params.costs, n_scenarios, params.n_assets,
                                             params.horizon, seed, error_model,
                                             inspect_every=params.inspect_every)
    return simulate_batch(model, policies, params.costs, n_scenarios, params.n_assets, params.horizon,
                          seed, error_model, inspect_every=params.inspect_every, xp=np)


def run_batches(client, model: TwinModel, policies: Sequence[Policy], params: TwinParams,
                error_model: RulErrorModel) -> dict[str, np.ndarray]:
    """Submit the scenario batches to a Dask client; results concatenated in batch order.

    Returns:
        arrays of shape ``(n_policies, n_scenarios)``.
    """
    plan = plan_batches(params.n_scenarios, params.batch_scenarios, params.seed)
    model_f, pol_f, par_f, err_f = client.scatter([model, list(policies), params, error_model], broadcast=True,
                                                   hash=False)
    futures = [client.submit(run_batch, model_f, pol_f, par_f, n, ss, err_f, pure=False)
               for n, ss in plan]
    parts = client.gather(futures)
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def _mean_ci(x: np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    x = np.asarray(x, float)
    m = float(x.mean())
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return m, m - half, m + half


def summarize(policies: Sequence[Policy], results: dict[str, np.ndarray], n_assets: int,
              horizon: int) -> tuple[list[dict], str]:
    """Per-policy expected fleet cost, availability, failures and planned stops with 95% CIs.

    Returns:
        ``(rows, recommended policy name)``: the recommendation is the least expected cost.
    """
    rows = []
    for i, p in enumerate(policies):
        cost = _mean_ci(results["cost"][i])
        avail = _mean_ci(1.0 - results["downtime"][i] / (n_assets * horizon))
        fails = _mean_ci(results["failures"][i])
        rows.append({
            "policy": p.name, "kind": p.kind, "value": None if math.isinf(p.value) else p.value,
            "expected_cost": cost[0], "cost_ci_low": cost[1], "cost_ci_high": cost[2],
            "availability": avail[0], "availability_ci_low": avail[1], "availability_ci_high": avail[2],
            "failures": fails[0], "failures_ci_low": fails[1], "failures_ci_high": fails[2],
            "planned": float(np.mean(results["planned"][i])),
            "cost_per_asset_cycle": cost[0] / (n_assets * horizon),
        })
    best = min(rows, key=lambda r: r["expected_cost"])["policy"]
    return rows, best
