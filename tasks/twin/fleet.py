"""Synthetic fleets: trajectories, lifetimes and run-to-failure telemetry drawn from the twin."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from twinflow.contracts import ASSET, OP_SETTINGS, SENSORS, TIME
from twinflow.errors import ConfigError
from twinflow.tasks.twin.model import (
    N_SENSORS,
    TwinModel,
    child_seed,
    damage_growth,
    draw_units,
    make_rng,
    model_arrays,
    seed_sequence,
    to_numpy,
)

# Assets whose first passage has not happened this many cycles after the deterministic failure
# age are cut there (probability < 1e-6 with 5 sigma of process noise).
_MAX_EXTRA_CYCLES = 50


def _segmented_cumsum(values, starts, counts, xp):
    c = xp.cumsum(values)
    before = c - values
    return c - xp.repeat(before[starts], counts)


def _trajectories(model: TwinModel, n_assets: int, ss: np.random.SeedSequence, xp=np) -> dict[str, Any]:
    """Run-to-failure trajectories of ``n_assets`` new units, rows flat and asset-contiguous."""
    arr = model_arrays(model, xp)
    units = draw_units(model, make_rng(xp, child_seed(ss, 0)), n_assets, xp)
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
        u = make_rng(xp, child_seed(ss, 1)).random(total)
        regime = xp.searchsorted(arr["cum_probs"], u, side="right")
        tau = _segmented_cumsum(arr["severity"][regime], starts, counts, xp)
    else:
        regime = xp.zeros(total, dtype=xp.int64)
        tau = cycle * float(model.regime_severity[0])
    eps = make_rng(xp, child_seed(ss, 2)).standard_normal(total)
    x = damage_growth(log_a[asset], b[asset], tau, xp)
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
    return to_numpy(_trajectories(model, n, seed_sequence(seed), xp)["lifetime"])


def health_fan(model: TwinModel, n_units: int, seed: int = 0, quantiles=(0.05, 0.25, 0.5, 0.75, 0.95),
               xp=np) -> dict[str, np.ndarray]:
    """Quantiles of simulated health ``h`` by cycle over ``n_units`` run-to-failure trajectories.

    Returns:
        ``cycle`` (1..max life), ``q`` (quantiles x cycles, NaN where fewer than 10% of the units
        are still alive) and ``alive`` (fraction of units alive at each cycle).
    """
    tr = _trajectories(model, n_units, seed_sequence(seed), xp)
    cycle, health, asset = (to_numpy(tr[k]) for k in ("cycle", "damage", "asset"))
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
    if model is None:
        from twinflow.tasks.twin.calibration import default_model  # calibration draws fleets too

        model = default_model()
    ss = seed_sequence(seed)
    tr = _trajectories(model, n_assets, ss, xp)
    arr, regime, asset = tr["arrays"], tr["regime"], tr["asset"]
    n_rows = int(asset.shape[0])
    # Row-per-channel, C-contiguous: each channel is one Arrow column without a copy.
    ops = _per_regime(arr["op"], regime, model.n_regimes, xp)
    rng_ops = make_rng(xp, child_seed(ss, 3))
    for i in range(3):
        if model.op_noise[i] > 0:
            ops[i] += model.op_noise[i] * rng_ops.standard_normal(n_rows)
    sensors = _per_regime(arr["base"], regime, model.n_regimes, xp)
    rng_s = make_rng(xp, child_seed(ss, 4))
    damage = tr["damage"]
    for j in range(N_SENSORS):
        if model.sensor_gain[j] != 0:
            sensors[j] += model.sensor_gain[j] * damage
        if model.sensor_noise[j] > 0:
            sensors[j] += model.sensor_noise[j] * rng_s.standard_normal(n_rows)
    ops, sensors = to_numpy(ops), to_numpy(sensors)
    asset_np = to_numpy(asset).astype(np.int32)
    names = pa.array([f"{asset_prefix}{asset_offset + i:07d}" for i in range(n_assets)], pa.string())
    zeros = pa.array(np.zeros(n_rows, dtype=np.int32))
    schema = telemetry_schema()
    columns = {
        ASSET: names.take(pa.array(asset_np)),
        TIME: pa.array(to_numpy(tr["cycle"]).astype(np.int32)),
        "timestamp": pa.nulls(n_rows, schema.field("timestamp").type),
        **{c: pa.array(ops[i]) for i, c in enumerate(OP_SETTINGS)},
        **{c: pa.array(sensors[j]) for j, c in enumerate(SENSORS)},
        "source_file": pa.array([source_file or f"generated:{batch_id}"], pa.string()).take(zeros),
        "batch_id": pa.array([batch_id], pa.string()).take(zeros),
        "quality": zeros,
    }
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
