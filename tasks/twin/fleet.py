"""Synthetic fleets: trajectories, lifetimes and run-to-failure telemetry drawn from the twin.

Generated rows have the shape of the fleet contract the twin was calibrated on: its channels, and its
clock (a cycle count, or timestamps one clock unit apart for a timestamp clock).
"""

from __future__ import annotations

import warnings
from datetime import datetime, timezone
from typing import Any

import numpy as np

from twinflow.contract.model import FleetContract
from twinflow.contracts import ASSET, TIMESTAMP
from twinflow.errors import ConfigError
from twinflow.tasks.twin.model import (
    TwinModel,
    child_seed,
    damage_growth,
    draw_units,
    make_rng,
    model_arrays,
    seed_sequence,
    to_numpy,
)

# Assets whose first passage has not happened this many steps after the deterministic failure
# age are cut there (probability < 1e-6 with 5 sigma of process noise).
_MAX_EXTRA_CYCLES = 50
# Installation time of every asset of a generated fleet on a timestamp clock (fixed: generation is
# a pure function of its seed).
GENERATED_START = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _segmented_cumsum(values, starts, counts, xp):
    c = xp.cumsum(values)
    before = c - values
    return c - xp.repeat(before[starts], counts)


def _trajectories(model: TwinModel, n_assets: int, ss: np.random.SeedSequence, xp=np) -> dict[str, Any]:
    """Run-to-failure trajectories of ``n_assets`` new units, rows flat and asset-contiguous.

    ``cycle`` is the step index (1, 2, ...): one step is one unit of the twin's clock.
    """
    arr = model_arrays(model, xp)
    units = draw_units(model, make_rng(xp, child_seed(ss, 0)), n_assets, xp)
    d, log_a, b, tau_f = units["d"], units["log_a"], units["b"], units["tau_f"]
    min_sev = float(min(model.regime_severity))
    # |dh/dtau| at the failure age: how many steps 5 sigma of process noise can shift a passage.
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
    """Simulated run-to-failure lifetimes (steps: the twin's clock units) of ``n`` new units."""
    return to_numpy(_trajectories(model, n, seed_sequence(seed), xp)["lifetime"])


def health_fan(model: TwinModel, n_units: int, seed: int = 0, quantiles=(0.05, 0.25, 0.5, 0.75, 0.95),
               xp=np) -> dict[str, np.ndarray]:
    """Quantiles of simulated health ``h`` by step over ``n_units`` run-to-failure trajectories.

    Returns:
        ``cycle`` (age in clock units, 1..max life), ``q`` (quantiles x steps, NaN where fewer than
        10% of the units are still alive) and ``alive`` (fraction of units alive at each step).
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


def fleet_contract(model: TwinModel, contract: FleetContract | None = None) -> FleetContract:
    """The contract generated rows follow: ``contract``, else the twin's own, else the settings' one.

    Raises:
        ConfigError: when that contract does not declare the twin's channels (with their kinds) or
            its clock unit differs from the twin's.
    """
    if contract is None:
        contract = model.contract
    if contract is None:
        from twinflow.contract.store import resolve_contract

        contract = resolve_contract(None)
    settings, sensors = set(contract.settings), set(contract.sensors)
    wrong = [s for s in model.settings if s not in settings] + [s for s in model.sensors if s not in sensors]
    if wrong or contract.time_unit != model.time_unit:
        raise ConfigError(
            f"the twin ({model.source}; channels {model.settings + model.sensors}, clock unit "
            f"{model.time_unit!r}) does not fit contract {contract.name!r} v{contract.version} "
            + (f"(undeclared channels: {wrong})" if wrong else f"(clock unit {contract.time_unit!r})")
            + ": generate with the contract the twin was calibrated on")
    return contract


def generate_fleet(n_assets: int, seed: int | np.random.SeedSequence = 0, model: TwinModel | None = None, *,
                   asset_offset: int = 0, asset_prefix: str = "syn-", batch_id: str = "synthetic",
                   source_file: str | None = None, contract: FleetContract | None = None, xp=np):
    """Generate a synthetic run-to-failure fleet in the lake schema of the twin's fleet contract.

    Vectorised over all rows: the scale workload of the benchmarks (10 M rows in seconds). One row
    per step of the twin's clock: ``cycle`` 1, 2, ... for a cycle clock; for a timestamp clock,
    timestamps one clock unit apart from :data:`GENERATED_START` (the installation) on. The
    contract's channels the twin does not model are null.

    Args:
        n_assets: Number of assets (each a unit from new to failure).
        seed: Root seed (or SeedSequence) of this fleet.
        model: Twin parameters; default: calibrated on the bundled FD001 training set.
        asset_offset: Index of the first asset (for fleets generated in chunks).
        asset_prefix: ``asset_id`` is ``f"{asset_prefix}{index:07d}"``.
        batch_id: Lineage column value.
        source_file: Lineage column value (default ``generated:<batch_id>``).
        contract: The contract of the rows (default: the twin's, see :func:`fleet_contract`).
        xp: Array module.

    Returns:
        A ``pyarrow.Table`` with the contract's lake schema, rows ordered by asset then time.
    """
    import pyarrow as pa

    if n_assets <= 0:
        raise ConfigError("n_assets must be positive")
    if model is None:
        from twinflow.tasks.twin.calibration import default_model  # calibration draws fleets too

        model = default_model()
    contract = fleet_contract(model, contract)
    ss = seed_sequence(seed)
    tr = _trajectories(model, n_assets, ss, xp)
    arr, regime, asset = tr["arrays"], tr["regime"], tr["asset"]
    n_rows = int(asset.shape[0])
    # Row-per-channel, C-contiguous: each channel is one Arrow column without a copy.
    ops = _per_regime(arr["op"], regime, model.n_regimes, xp)
    rng_ops = make_rng(xp, child_seed(ss, 3))
    for i in range(len(model.settings)):
        if model.op_noise[i] > 0:
            ops[i] += model.op_noise[i] * rng_ops.standard_normal(n_rows)
    sensors = _per_regime(arr["base"], regime, model.n_regimes, xp)
    rng_s = make_rng(xp, child_seed(ss, 4))
    damage = tr["damage"]
    for j in range(len(model.sensors)):
        if model.sensor_gain[j] != 0:
            sensors[j] += model.sensor_gain[j] * damage
        if model.sensor_noise[j] > 0:
            sensors[j] += model.sensor_noise[j] * rng_s.standard_normal(n_rows)
    ops, sensors = to_numpy(ops), to_numpy(sensors)
    asset_np = to_numpy(asset).astype(np.int32)
    step = to_numpy(tr["cycle"])
    names = pa.array([f"{asset_prefix}{asset_offset + i:07d}" for i in range(n_assets)], pa.string())
    zeros = pa.array(np.zeros(n_rows, dtype=np.int32))
    schema = contract.lake_schema()
    if contract.clock.kind == "cycle":
        time_cols = {contract.key: pa.array(step.astype(np.int32))}
    else:
        start_us = int(GENERATED_START.timestamp()) * 1_000_000
        unit_us = int(round(contract.clock.unit_seconds * 1_000_000))
        time_cols = {TIMESTAMP: pa.array(start_us + step.astype(np.int64) * unit_us,
                                         schema.field(TIMESTAMP).type)}
    columns = {
        ASSET: names.take(pa.array(asset_np)),
        **time_cols,
        **{c: pa.array(ops[i]) for i, c in enumerate(model.settings)},
        **{c: pa.array(sensors[j]) for j, c in enumerate(model.sensors)},
        "source_file": pa.array([source_file or f"generated:{batch_id}"], pa.string()).take(zeros),
        "batch_id": pa.array([batch_id], pa.string()).take(zeros),
        "quality": zeros,
    }
    return pa.Table.from_arrays([columns[f.name] if f.name in columns else pa.nulls(n_rows, f.type)
                                 for f in schema], schema=schema)
