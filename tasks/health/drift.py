"""Drift of recent channel distributions from the champion's training data: PSI and KS per channel and regime.

PSI (population stability index) over the reference's deciles: ``sum((p - q) * log(p / q))``;
by the usual reading, < 0.1 is stable, 0.1-0.25 a moderate shift, > 0.25 a shift worth retraining
for. KS is the two-sample Kolmogorov-Smirnov statistic. Both are computed per channel over all
regimes and per (channel, regime) with enough rows in both samples.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def psi(reference: np.ndarray, recent: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``recent`` against ``reference`` (quantile bins of the reference)."""
    ref = reference[np.isfinite(reference)]
    cur = recent[np.isfinite(recent)]
    if ref.size < bins or cur.size == 0:
        return float("nan")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    p, q = np.maximum(p, eps), np.maximum(q, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def ks(reference: np.ndarray, recent: np.ndarray) -> float:
    """Two-sample KS statistic (NaNs ignored)."""
    from twinflow.tasks.twin import ks_statistic

    ref = reference[np.isfinite(reference)]
    cur = recent[np.isfinite(recent)]
    if ref.size == 0 or cur.size == 0:
        return float("nan")
    return ks_statistic(ref, cur)


def drift_table(reference: np.ndarray, ref_regime: np.ndarray, recent: np.ndarray, recent_regime: np.ndarray,
                channels: list[str], *, min_rows: int = 50) -> pd.DataFrame:
    """PSI and KS per channel (``regime`` = ``all``) and per (channel, regime).

    Returns:
        Columns ``channel, regime, psi, ks, n_reference, n_recent``.
    """
    rows = []
    regimes = sorted(set(np.unique(ref_regime).tolist()) & set(np.unique(recent_regime).tolist()))
    for j, ch in enumerate(channels):
        rows.append({"channel": ch, "regime": "all", "psi": psi(reference[:, j], recent[:, j]),
                     "ks": ks(reference[:, j], recent[:, j]), "n_reference": int(len(reference)),
                     "n_recent": int(len(recent))})
        if len(regimes) > 1:
            for r in regimes:
                a, b = reference[ref_regime == r, j], recent[recent_regime == r, j]
                if len(a) >= min_rows and len(b) >= min_rows:
                    rows.append({"channel": ch, "regime": str(r), "psi": psi(a, b), "ks": ks(a, b),
                                 "n_reference": int(len(a)), "n_recent": int(len(b))})
    return pd.DataFrame(rows, columns=["channel", "regime", "psi", "ks", "n_reference", "n_recent"])


def drifted(table: pd.DataFrame, psi_threshold: float, ks_threshold: float | None = None) -> pd.DataFrame:
    """Rows whose PSI (or KS, when a threshold is given) exceeds the threshold."""
    bad = table["psi"] > psi_threshold
    if ks_threshold is not None:
        bad |= table["ks"] > ks_threshold
    return table.loc[bad.fillna(False)]
