"""A small timestamped pump fleet run to failure, in the bundled ``pumps`` contract, for the twin's tests.

Not C-MAPSS in any respect: readings every 10 minutes with jitter, dropped readings and an outage per
pump, two operating regimes (speed and load set points), plant units, wear that shows in vibration,
bearing temperature, flow, current and outlet temperature, scattered missing readings, one channel
(motor current) not fitted on the first pumps and one (casing temperature) on none.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

SENSOR_NAN_SHARE = 0.03


def pump_fleet(n_pumps: int = 20, seed: int = 0, no_current: int = 4, wear: float = 1.0
               ) -> tuple[pa.Table, np.ndarray]:
    """Rows of ``n_pumps`` pumps from installation to failure, and each pump's true life in hours.

    Args:
        n_pumps: Pumps in the fleet.
        seed: Random seed.
        no_current: The first pumps have no motor-current sensor (the channel is NaN for them).
        wear: How strongly wear shows in the sensors (0: not at all).

    Returns:
        ``(table, lifetimes_h)``: a table with ``asset_id``, ``timestamp`` (UTC) and pump channels, and
        the hours from installation to the failure (the last reading).
    """
    rng = np.random.default_rng(seed)
    parts, lives = [], []
    for i in range(n_pumps):
        life_h = float(np.exp(rng.normal(np.log(500.0), 0.3)))
        installed = pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=int(rng.integers(0, 200 * 3600)))
        n = int(life_h * 6)
        secs = np.arange(1, n + 1) * 600.0 + rng.uniform(-120, 120, n)  # every 10 min, +-2 min jitter
        secs[-1] = life_h * 3600.0  # the last reading is the failure
        keep = rng.random(n) > 0.05  # dropped readings
        outage = int(rng.integers(n // 4, n // 2))
        keep[outage:outage + 36] = False  # a 6-hour outage
        keep[0] = keep[-1] = True
        secs = np.sort(secs[keep])
        m = len(secs)
        age = secs / 3600.0
        damage = wear * (age / life_h) ** 2
        regime = (np.floor(age / 8.0) % 2).astype(int)  # the set point alternates every 8 h
        noise = rng.standard_normal((8, m))
        inlet = 20.0 + 0.5 * noise[0]
        cols = {
            "speed_rpm": np.where(regime == 0, 1480.0, 2960.0) + 3.0 * noise[1],
            "load_pct": np.where(regime == 0, 72.0, 96.0) + 0.2 * noise[2],
            "inlet_temp_c": inlet,
            "outlet_temp_c": inlet + 3.0 + 2.0 * damage + 0.3 * noise[3],
            "bearing_temp_c": 55.0 + 10.0 * regime + 30.0 * damage + 1.0 * noise[4],
            "discharge_pressure_bar": np.where(regime == 0, 4.0, 12.0) + 0.1 * noise[5],
            "flow_m3h": np.where(regime == 0, 150.0, 300.0) - 20.0 * damage + 3.0 * noise[6],
            "vibration_mm_s": 2.0 + 0.8 * regime + 8.0 * damage + 0.3 * noise[7],
            "motor_current_a": (np.where(regime == 0, 80.0, 200.0) + 15.0 * damage + 2.0 * rng.standard_normal(m)
                                if i >= no_current else np.full(m, np.nan)),
        }
        for name in cols:
            if name not in ("speed_rpm", "load_pct"):
                cols[name] = np.where(rng.random(m) < SENSOR_NAN_SHARE, np.nan, cols[name])
        ts = installed + pd.to_timedelta(np.round(secs * 1e6).astype(np.int64), unit="us")
        parts.append(pd.DataFrame({"asset_id": f"pump-{i:02d}", "timestamp": ts, **cols}))
        lives.append((secs[-1]) / 3600.0)
    frame = pd.concat(parts, ignore_index=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.set_column(1, "timestamp", table.column("timestamp").cast(pa.timestamp("us", tz="UTC")))
    return table, np.array(lives)


def constant_pump_fleet(n_pumps: int = 3, all_nan: bool = False) -> pa.Table:
    """Pumps whose every sensor reads a constant (or, with ``all_nan``, nothing at all)."""
    table, _ = pump_fleet(n_pumps, seed=5)
    sensors = ["inlet_temp_c", "outlet_temp_c", "bearing_temp_c", "discharge_pressure_bar", "flow_m3h",
               "vibration_mm_s", "motor_current_a"]
    for name in sensors:
        i = table.schema.get_field_index(name)
        col = pa.nulls(table.num_rows, pa.float64()) if all_nan else pa.array(np.full(table.num_rows, 42.0))
        table = table.set_column(i, name, col)
    return table
