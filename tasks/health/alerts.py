"""At-risk announcements, de-duplicated across runs by the state kept in the ``fleet_health`` table.

Each row of the table carries ``announced_band``: the highest band announced for the asset since it
last fell below the alert band. A run announces an asset when its band is at or above the alert band
and higher than that (so an asset already announced as ``high`` is not announced again every hour,
but is when it becomes ``critical``); an asset that falls below the alert band resets it, so a new
rise is announced again.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twinflow.tasks.health.params import BANDS


def announce(current: pd.DataFrame, previous: pd.DataFrame | None, alert_band: str) -> tuple[np.ndarray, np.ndarray]:
    """Which assets to announce now, and the ``announced_band`` to store with this run's rows.

    Args:
        current: This run's rows (``asset_id``, ``band_rank``).
        previous: The latest earlier row per asset (``asset_id``, ``announced_band``), or None.
        alert_band: Lowest band that is announced.

    Returns:
        ``(announce mask, announced_band per row)``.
    """
    floor = BANDS.index(alert_band)
    before = pd.Series(dtype="int64")
    if previous is not None and len(previous):
        before = previous.set_index("asset_id")["announced_band"].astype("int64")
    prev = before.reindex(current["asset_id"]).fillna(-1).to_numpy(dtype="int64")
    band = current["band_rank"].to_numpy(dtype="int64")
    fire = (band >= floor) & (band > prev)
    stored = np.where(band < floor, -1, np.maximum(prev, band))
    return fire, stored


def latest_per_asset(history: pd.DataFrame, dataset: str, exclude_key: str | None = None) -> pd.DataFrame:
    """The newest row per asset of ``dataset`` in the table's history (other runs than ``exclude_key``)."""
    h = history[history["dataset"] == dataset]
    if exclude_key is not None:
        h = h[h["run_key"] != exclude_key]
    if h.empty:
        return h
    return h.sort_values("scored_at").groupby("asset_id", as_index=False).tail(1)
