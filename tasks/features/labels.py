"""RUL labels from life segments: only lives that ended in an observed failure have a remaining life.

Without segments the label is "the asset's last reading minus this reading", which is right for
run-to-failure records and wrong for everything else: an asset replaced preventively, or still
running, did not fail at its last reading. With the dataset's segments (``<dataset>__segments``, from
the event log and the contract's ``life_end`` rules) a row's label is the end of *its* life minus its
time when that life ended in a failure, and missing (NaN) when the life was censored or is still
running: such rows are never labelled as failures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twinflow import contracts
from twinflow.contract.model import Clock

__all__ = ["lives_frame", "segment_labels"]


def lives_frame(segments) -> pd.DataFrame:
    """The columns of a segments table the labels need, with times as int64 ticks (cycles or µs)."""
    import pyarrow as pa

    cols = {}
    for name in ("start", "end"):
        col = segments.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        cols[name] = col.to_numpy(zero_copy_only=False).astype(np.int64)
    return pd.DataFrame({contracts.ASSET: segments.column(contracts.ASSET).to_pylist(), **cols,
                         "failed": (np.array(segments.column("end_reason").to_pylist()) == "failure")})


def _ticks(values: pd.Series, clock: Clock) -> np.ndarray:
    if clock.kind == "cycle":
        return values.to_numpy(dtype=np.int64)
    return pd.to_datetime(values, utc=True).astype("datetime64[us, UTC]").array.asi8


def segment_labels(keys: pd.DataFrame, lives: pd.DataFrame, clock: Clock, rul_cap: float | None = None) -> np.ndarray:
    """Each row's RUL in the clock's unit within its life, NaN outside failure-ended lives.

    Args:
        keys: ``asset_id`` and the clock's key column, one row per feature row.
        lives: :func:`lives_frame` of the dataset's segments.
        clock: The data's clock.
        rul_cap: Cap of the label (piecewise-linear RUL), as the features' ``rul_cap``.

    Returns:
        float64 labels aligned with ``keys``.
    """
    n = len(keys)
    out = np.full(n, np.nan)
    if n == 0 or lives.empty:
        return out
    t = _ticks(keys[clock.key], clock)
    left = pd.DataFrame({contracts.ASSET: keys[contracts.ASSET].astype(str).to_numpy(), "_t": t,
                         "_row": np.arange(n)}).sort_values("_t", kind="stable")
    right = lives.assign(**{contracts.ASSET: lives[contracts.ASSET].astype(str)}).rename(columns={"start": "_t"})
    joined = pd.merge_asof(left, right.sort_values("_t", kind="stable"), on="_t", by=contracts.ASSET,
                           direction="backward")
    inside = joined["end"].notna() & (joined["_t"] <= joined["end"]) & joined["failed"].fillna(False).astype(bool)
    scale = 1.0 if clock.kind == "cycle" else 1e-6 / clock.unit_seconds
    rul = (joined["end"].to_numpy(dtype=np.float64) - joined["_t"].to_numpy(dtype=np.float64)) * scale
    rul = np.where(inside.to_numpy(), rul, np.nan)
    if rul_cap is not None:
        rul = np.minimum(rul, float(rul_cap))  # NaN stays NaN
    out[joined["_row"].to_numpy()] = rul
    return out
