"""A small timestamped pump fleet in the bundled ``pumps`` contract's channels, for the health tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pumps_frame(n=30, seed=0):
    """Timestamped pump readings (10 min) in the pumps contract's channels; each pump's bearing wears
    by a hidden amount: vibration and bearing temperature rise with it. Pump ``p-00`` stopped reporting after two days."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-11-01", tz="UTC")
    rows, wear = [], {}
    for i in range(n):
        a = f"p-{i:02d}"
        wear[a] = rng.uniform(0, 1)
        k = 400
        ts = start + pd.to_timedelta(np.arange(k) * 10 + rng.integers(-2, 3, k), unit="min")
        w = np.r_[np.zeros(k // 2), np.linspace(0, wear[a], k - k // 2)]
        load = rng.choice([60.0, 90.0], k)
        rows.append(pd.DataFrame({
            "asset_id": a, "timestamp": ts, "speed_rpm": 1480 + 10 * (load > 70), "load_pct": load,
            "inlet_temp_c": 20 + rng.normal(0, 0.5, k), "outlet_temp_c": 24 + 0.03 * load + rng.normal(0, 0.5, k),
            "casing_temp_c": 35 + 0.05 * load + rng.normal(0, 0.7, k),
            "bearing_temp_c": 45 + 0.05 * load + 12 * w + rng.normal(0, 0.8, k),
            "discharge_pressure_bar": 6 + 0.02 * load + rng.normal(0, 0.1, k),
            "flow_m3h": 2.0 * load + rng.normal(0, 2, k),
            "vibration_mm_s": 2.0 + 6 * w + rng.normal(0, 0.3, k),
            "motor_current_a": 50 + 0.4 * load + rng.normal(0, 1, k)}))
    df = pd.concat(rows, ignore_index=True)
    df = df[~((df.asset_id == "p-00") & (df.timestamp > start + pd.Timedelta("2D")))]  # stale pump
    return df, pd.Series(wear)
