"""A small timestamped fleet under the bundled ``pumps`` contract, for the features and train tests.

Not C-MAPSS in any respect: a timestamp clock (readings every 10 minutes with jitter and a gap of
four hours per pump), plant channel names and units, two operating speeds, missing readings, and a
channel one pump lacks entirely.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pump_rows(n_assets: int = 6, seed: int = 0) -> pd.DataFrame:
    """Lake rows (``asset_id``, ``timestamp``, some of the contract's channels) of a degrading pump fleet."""
    rng = np.random.default_rng(seed)
    frames = []
    for a in range(n_assets):
        n = int(rng.integers(60, 120))
        steps = 600 + rng.integers(-120, 121, size=n)
        steps[n // 3] = 4 * 3600
        ts = pd.Timestamp("2026-05-01", tz="UTC") + pd.to_timedelta(np.cumsum(steps), unit="s")
        wear = np.linspace(0, 1, n) ** 2
        speed = rng.choice([1450.0, 2900.0], n)
        frame = pd.DataFrame({"asset_id": f"P-{a + 1:03d}", "timestamp": ts.astype("datetime64[us, UTC]"),
                              "speed_rpm": speed, "load_pct": np.where(speed > 2000, 95.0, 70.0),
                              "vibration_mm_s": 2 + 4 * wear + speed / 2900 + rng.normal(0, 0.1, n),
                              "bearing_temp_c": 55 + 20 * wear + rng.normal(0, 0.5, n),
                              "discharge_pressure_bar": 8 - 2 * wear + rng.normal(0, 0.05, n)})
        frame.loc[rng.random(n) < 0.1, "vibration_mm_s"] = np.nan
        if a == 1:
            frame["bearing_temp_c"] = np.nan  # this pump has no bearing thermometer
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
