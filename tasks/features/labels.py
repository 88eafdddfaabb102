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

from twinflow.contract.model import Clock
from twinflow.tasks.ingest.events import life_positions, time_ticks

__all__ = ["lives_frame", "segment_labels", "segment_targets"]


def lives_frame(segments) -> pd.DataFrame:
    """The columns of a segments table the labels need, with times as int64 ticks (cycles or µs).

    Read once per dataset and shipped to every partition's job, so it is small and plain pandas.
    """
    return pd.DataFrame({"asset_id": [str(a) for a in segments.column("asset_id").to_pylist()],
                         "segment": segments.column("segment").to_numpy(zero_copy_only=False).astype(np.int64),
                         "start": time_ticks(segments.column("start")), "end": time_ticks(segments.column("end")),
                         "end_reason": segments.column("end_reason").to_pylist()})


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
    return segment_targets(keys, lives, clock, rul_cap)[0]


def segment_targets(keys: pd.DataFrame, lives: pd.DataFrame, clock: Clock,
                    rul_cap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's label (as :func:`segment_labels`) and its lower bound.

    The lower bound is the end of the row's life minus its time whatever ended that life: an asset
    replaced preventively, or still running at its last reading, lived at least that long after the
    row. It equals the label in failure-ended lives, and is NaN only for rows outside every life.

    Returns:
        ``(label, lower)``, float64, aligned with ``keys``, both capped at ``rul_cap``.
    """
    n = len(keys)
    if n == 0 or lives.empty:
        return np.full(n, np.nan), np.full(n, np.nan)
    t, table, pos = life_positions(keys, lives, clock)
    inside = pos >= 0
    life = np.maximum(pos, 0)
    scale = 1.0 if clock.kind == "cycle" else 1e-6 / clock.unit_seconds
    lower = (table["end"].to_numpy(np.int64)[life] - t).astype(np.float64) * scale
    lower = np.where(inside, lower, np.nan)
    if rul_cap is not None:
        lower = np.minimum(lower, float(rul_cap))  # NaN stays NaN
    # Whether each life ended in a failure: one comparison per life, not per row.
    failed = (table["end_reason"] == "failure").to_numpy(bool)
    rul = np.where(inside & failed[life], lower, np.nan)
    return rul, lower
