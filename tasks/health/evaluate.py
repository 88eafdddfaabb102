"""Checking a health run against known truth (C-MAPSS test units: the true RUL of each running unit)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN pairs dropped."""
    a = pd.Series(np.asarray(x, dtype="float64"))
    b = pd.Series(np.asarray(y, dtype="float64"))
    ok = a.notna() & b.notna()
    if ok.sum() < 3:
        return float("nan")
    return float(a[ok].rank().corr(b[ok].rank()))


def evaluate_against_truth(table: pd.DataFrame, true_rul: pd.Series, *, cap: float | None = None) -> dict[str, float]:
    """Precision/recall of the "fails within H" flags, interval coverage, and the label-free score's ranking.

    Args:
        table: A scored fleet (:func:`~twinflow.tasks.health.score.score_fleet`'s table).
        true_rul: True remaining life per asset id (index: asset id).
        cap: The model's label cap: its interval is checked against ``min(true, cap)``, as the
            train stage's evaluation does.

    Returns:
        ``health_flag_precision``, ``health_flag_recall``, ``health_flag_n`` (flagged), ``health_failing_n``
        (truly failing within H), ``health_pi_coverage``, ``health_brier``, ``health_anomaly_spearman``
        (anomaly score vs true RUL: negative when degraded assets score higher), ``health_hi_spearman``.
    """
    t = table.set_index("asset_id")
    truth = true_rul.reindex(t.index).astype("float64")
    ok = truth.notna() & t["p_fail"].notna()
    h = float(t["alert_horizon"].iat[0])
    failing = (truth <= h)[ok]
    flag = t["flag"][ok].astype(bool)
    tp = int((flag & failing).sum())
    out = {"health_flag_n": float(flag.sum()), "health_failing_n": float(failing.sum()),
           "health_flag_precision": tp / max(int(flag.sum()), 1) if flag.any() else float("nan"),
           "health_flag_recall": tp / max(int(failing.sum()), 1) if failing.any() else float("nan"),
           "health_brier": float(np.mean((t["p_fail"][ok] - failing.astype(float)) ** 2))}
    has = truth.notna() & t["rul_estimate"].notna()
    target = np.minimum(truth[has], cap) if cap is not None else truth[has]
    inside = (t["rul_low"][has] <= target) & (target <= t["rul_high"][has])
    out["health_pi_coverage"] = float(inside.mean()) if has.any() else float("nan")
    out["health_anomaly_spearman"] = spearman(t["anomaly_score"], truth)
    out["health_hi_spearman"] = spearman(t["health_index"], truth)
    return out


def true_rul_from_lives(lives: list[dict], time_unit_hours: float = 1.0) -> pd.Series:
    """True remaining life of each asset's running life, from a fleet generator's ground truth.

    A generated life (``twinflow.fleets.pumps``: ``ground_truth.json``'s ``lives``) that was still
    running at the export's end (``end_reason == "censored"``) fails at ``start + time_to_failure_h
    - initial_age_h``; its remaining life at the end is that minus ``end``.

    Args:
        lives: The generator's lives (``machine``, ``start``, ``end``, ``end_reason``,
            ``time_to_failure_h``, ``initial_age_h``).
        time_unit_hours: Hours per time unit of the scored fleet's clock.

    Returns:
        Remaining life in the clock's unit, indexed by asset id (assets with a running life only).
    """
    out = {}
    for lf in lives:
        if lf["end_reason"] != "censored":
            continue
        used_h = (pd.Timestamp(lf["end"]) - pd.Timestamp(lf["start"])).total_seconds() / 3600
        out[str(lf["machine"])] = (lf["time_to_failure_h"] - lf["initial_age_h"] - used_h) / time_unit_hours
    return pd.Series(out, dtype="float64")
