"""Prognostics metrics that maintenance engineers read next to RMSE and the PHM08 score.

Pure functions over arrays (true RUL, predicted RUL, optionally asset ids and cycles), after
Saxena et al., "Metrics for offline evaluation of prognostic performance" (IJPHM 2010):

- **α-accuracy / α-λ accuracy**: the share of predictions inside the cone ``(1 ± α) · true RUL``;
  on whole trajectories it is taken at the fractions ``λ`` of each asset's scored window
  (``t_λ = t_first + λ · (t_last − t_first)``).
- **Relative accuracy** ``RA = 1 − |true − pred| / true`` (rows with ``true > 0``), overall and at λ.
- **Prognostic horizon**: per asset, the true RUL at the first cycle from which every later
  prediction stays within ``± ph_band`` cycles of the truth (0 when the last one is outside);
  the mean over assets. Needs trajectories (more than one scored cycle per asset).
- **Early/late asymmetry**: late predictions (pred > true) let an asset run past its maintenance
  point and cost far more than early ones, so the share of late predictions, the mean late and
  mean early error and the index ``(Σ late − Σ early) / Σ |error|`` (−1 all early … +1 all late).
- **Calibrated uncertainty**: split-conformal prediction intervals ``pred ± q`` whose ``q`` is the
  conformal quantile of absolute residuals on calibration data (the validation assets), with the
  coverage and width measured on the evaluation data (the C-MAPSS test protocol when given).

The labels the train stage scores against are capped (piecewise-linear RUL), so every metric is
against the capped truth, as RMSE is.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from twinflow.contract.model import unit_label

LAMBDAS = (0.25, 0.5, 0.75)


class PredictionInterval(BaseModel):
    """A split-conformal interval ``pred ± half_width`` and how it did on the evaluation data."""

    level: float = Field(description="Nominal coverage, e.g. 0.9.")
    half_width: float = Field(description="Conformal quantile of |pred − true| on the calibration data.")
    n_calibration: int
    calibration_set: str = ""
    coverage: float | None = Field(None, description="Share of evaluation rows inside the interval.")
    n_evaluated: int = 0


class PrognosticsReport(BaseModel):
    """Prognostics metrics of one model on one evaluation set (see the module docstring)."""

    eval_set: str = ""
    n: int
    alpha: float
    alpha_accuracy: float
    relative_accuracy: float | None
    late_fraction: float
    early_fraction: float
    late_mean_error: float = Field(description="Mean of max(pred − true, 0) over all rows.")
    early_mean_error: float = Field(description="Mean of max(true − pred, 0) over all rows.")
    asymmetry: float = Field(description="(Σ late − Σ early) / Σ |error|: −1 all early, +1 all late.")
    alpha_lambda: dict[str, float] = Field(default_factory=dict, description="λ → share of assets in the cone.")
    relative_accuracy_lambda: dict[str, float] = Field(default_factory=dict)
    prognostic_horizon: float | None = None
    ph_band: float | None = None
    interval: PredictionInterval | None = None

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat finite metrics for ``mlflow.log_metrics``, names ``<prefix>_<metric>``."""
        out: dict[str, float] = {
            "alpha_accuracy": self.alpha_accuracy, "relative_accuracy": self.relative_accuracy,
            "late_fraction": self.late_fraction, "early_fraction": self.early_fraction,
            "late_mean_error": self.late_mean_error, "early_mean_error": self.early_mean_error,
            "asymmetry": self.asymmetry, "prognostic_horizon": self.prognostic_horizon}
        for lam, v in self.alpha_lambda.items():
            out[f"alpha_lambda_{_lam_key(lam)}"] = v
        for lam, v in self.relative_accuracy_lambda.items():
            out[f"relative_accuracy_lambda_{_lam_key(lam)}"] = v
        if self.interval is not None:
            out["pi_half_width"] = self.interval.half_width
            out["pi_coverage"] = self.interval.coverage
        return {f"{prefix}_{k}": float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _lam_key(lam: str) -> str:
    return f"{int(round(float(lam) * 100)):03d}"


def _arrays(true, pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(true, dtype="float64").reshape(-1)
    p = np.asarray(pred, dtype="float64").reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in length ({t.size} vs {p.size})")
    if t.size == 0:
        raise ValueError("no predictions to score")
    return t, p


def in_alpha_cone(true, pred, alpha: float) -> np.ndarray:
    """Rows whose prediction lies within ``(1 ± alpha) · true``."""
    t, p = _arrays(true, pred)
    return np.abs(p - t) <= alpha * np.abs(t) + 1e-12


def relative_accuracy(true, pred) -> float | None:
    """Mean ``1 − |true − pred| / true`` over rows with ``true > 0`` (None when there are none)."""
    t, p = _arrays(true, pred)
    ok = t > 0
    if not ok.any():
        return None
    return float(np.mean(1.0 - np.abs(t[ok] - p[ok]) / t[ok]))


def error_asymmetry(true, pred) -> dict[str, float]:
    """Late/early shares, mean late/early error and the asymmetry index (see the module docstring)."""
    t, p = _arrays(true, pred)
    d = p - t
    late, early = np.maximum(d, 0.0), np.maximum(-d, 0.0)
    total = float(np.sum(np.abs(d)))
    return {"late_fraction": float(np.mean(d > 0)), "early_fraction": float(np.mean(d < 0)),
            "late_mean_error": float(np.mean(late)), "early_mean_error": float(np.mean(early)),
            "asymmetry": 0.0 if total == 0 else float((late.sum() - early.sum()) / total)}


def _trajectories(t, p, assets, cycles):
    order = np.lexsort((cycles, assets))
    a, c, t, p = assets[order], cycles[order], t[order], p[order]
    bounds = np.flatnonzero(np.r_[True, a[1:] != a[:-1], True])
    return [(c[i:j], t[i:j], p[i:j]) for i, j in zip(bounds[:-1], bounds[1:])]


def at_lambda(cycles: np.ndarray, lam: float) -> int:
    """Index of the row nearest ``t_λ = t_first + λ (t_last − t_first)`` in one asset's sorted cycles."""
    target = cycles[0] + lam * (cycles[-1] - cycles[0])
    return int(np.argmin(np.abs(cycles - target)))


def prognostic_horizon(cycles, true, pred, band: float) -> float:
    """One asset's horizon: the true RUL at the first cycle after which all predictions stay in ``±band``."""
    inside = np.abs(np.asarray(pred, float) - np.asarray(true, float)) <= band
    if not inside[-1]:
        return 0.0
    outside = np.flatnonzero(~inside)
    first = 0 if outside.size == 0 else int(outside[-1]) + 1
    return float(np.asarray(true, float)[first])


def conformal_half_width(cal_true, cal_pred, level: float) -> float:
    """Split-conformal quantile of |pred − true|: the ``ceil((n + 1) · level)``-th smallest (inf if > n)."""
    t, p = _arrays(cal_true, cal_pred)
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    r = np.sort(np.abs(p - t))
    k = math.ceil((r.size + 1) * level)
    return math.inf if k > r.size else float(r[k - 1])


def prediction_interval(cal_true, cal_pred, eval_true, eval_pred, level: float = 0.9,
                        calibration_set: str = "") -> PredictionInterval:
    """A conformal interval fitted on calibration residuals, with its coverage on the evaluation rows."""
    q = conformal_half_width(cal_true, cal_pred, level)
    t, p = _arrays(eval_true, eval_pred)
    return PredictionInterval(level=level, half_width=q, n_calibration=int(np.size(cal_true)),
                              calibration_set=calibration_set, coverage=float(np.mean(np.abs(p - t) <= q)),
                              n_evaluated=int(t.size))


def prognostics_report(true, pred, asset_ids=None, cycles=None, *, alpha: float = 0.2,
                       lambdas: tuple[float, ...] = LAMBDAS, ph_band: float = 15.0,
                       interval: PredictionInterval | None = None, eval_set: str = "") -> PrognosticsReport:
    """All prognostics metrics of one model on one evaluation set.

    Args:
        true: True (capped) RUL per scored row.
        pred: Predicted RUL per scored row.
        asset_ids: Asset per row; with ``cycles`` enables the trajectory metrics (α-λ, RA at λ,
            prognostic horizon) when some asset has more than one scored row.
        cycles: Cycle per row.
        alpha: Half-width of the α cone as a fraction of the true RUL.
        lambdas: Fractions of each asset's scored window for α-λ and RA at λ.
        ph_band: Half-width of the prognostic-horizon band, in the clock unit of the RUL.
        interval: A prediction interval already evaluated on these rows (:func:`prediction_interval`).
        eval_set: Name of the evaluation data.

    Raises:
        ValueError: empty or mismatched arrays.
    """
    t, p = _arrays(true, pred)
    report: dict[str, Any] = dict(eval_set=eval_set, n=int(t.size), alpha=alpha,
                                  alpha_accuracy=float(np.mean(in_alpha_cone(t, p, alpha))),
                                  relative_accuracy=relative_accuracy(t, p), interval=interval,
                                  **error_asymmetry(t, p))
    if asset_ids is not None and cycles is not None:
        assets = np.asarray(asset_ids).astype(str).reshape(-1)
        cyc = np.asarray(cycles, dtype="float64").reshape(-1)
        if assets.size != t.size or cyc.size != t.size:
            raise ValueError("asset_ids and cycles must have one value per row")
        traj = [tr for tr in _trajectories(t, p, assets, cyc) if tr[0].size > 1]
        if traj:
            al, ra = {}, {}
            for lam in lambdas:
                idx = [at_lambda(c, lam) for c, _, _ in traj]
                tt = np.array([tr[1][i] for tr, i in zip(traj, idx)])
                pp = np.array([tr[2][i] for tr, i in zip(traj, idx)])
                al[f"{lam:g}"] = float(np.mean(in_alpha_cone(tt, pp, alpha)))
                r = relative_accuracy(tt, pp)
                if r is not None:
                    ra[f"{lam:g}"] = r
            report.update(alpha_lambda=al, relative_accuracy_lambda=ra, ph_band=ph_band,
                          prognostic_horizon=float(np.mean([prognostic_horizon(c, tr, pr, ph_band)
                                                            for c, tr, pr in traj])))
    return PrognosticsReport(**report)


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)
# ---------------------------------------------------------------------------------------------


def plot_alpha_lambda(true, pred, asset_ids, cycles, alpha: float = 0.2, max_assets: int = 12, *, time_unit: str):
    """Predicted vs true RUL (in the clock unit ``time_unit``) over each asset's scored window with the
    ``(1 ± α)`` cone."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t, p = _arrays(true, pred)
    traj = _trajectories(t, p, np.asarray(asset_ids).astype(str), np.asarray(cycles, dtype="float64"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (c, tr, pr) in enumerate(traj[:max_assets]):
        span = max(c[-1] - c[0], 1.0)
        x = (c - c[0]) / span
        ax.plot(x, pr, lw=0.8, alpha=0.7, label="predicted" if k == 0 else None)
        ax.plot(x, tr, "k-", lw=0.6, alpha=0.4, label="true" if k == 0 else None)
        ax.fill_between(x, (1 - alpha) * tr, (1 + alpha) * tr, color="grey", alpha=0.05)
    ax.set(xlabel="λ (fraction of the asset's scored window)", ylabel=f"RUL ({unit_label(time_unit)})",
           title=f"α-λ: predictions and the ±{alpha:.0%} cone ({min(len(traj), max_assets)} assets)")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_error_asymmetry(true, pred, *, time_unit: str):
    """Histogram of pred − true (in the clock unit ``time_unit``): early (left of 0) vs late (right of 0) errors."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t, p = _arrays(true, pred)
    d = p - t
    a = error_asymmetry(t, p)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(d.min(), -1.0), max(d.max(), 1.0), 31)
    ax.hist(d[d <= 0], bins=bins, color="tab:blue", alpha=0.7, label=f"early ({a['early_fraction']:.0%})")
    ax.hist(d[d > 0], bins=bins, color="tab:red", alpha=0.7, label=f"late ({a['late_fraction']:.0%})")
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel=f"predicted − true RUL ({unit_label(time_unit)})", ylabel="rows",
           title=f"early/late errors (asymmetry {a['asymmetry']:+.2f})")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_prediction_intervals(true, pred, interval: PredictionInterval, *, time_unit: str):
    """Evaluation rows sorted by true RUL with the conformal interval and the truth (RUL in ``time_unit``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t, p = _arrays(true, pred)
    order = np.argsort(t, kind="stable")
    x = np.arange(t.size)
    q = interval.half_width if math.isfinite(interval.half_width) else float(np.max(np.abs(p - t)))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x, p[order] - q, p[order] + q, alpha=0.3, step="mid",
                    label=f"{interval.level:.0%} conformal interval (±{q:.1f})")
    ax.plot(x, p[order], ".", ms=3, label="predicted")
    ax.plot(x, t[order], "k.", ms=3, label="true")
    cov = "" if interval.coverage is None else f", coverage {interval.coverage:.0%}"
    ax.set(xlabel="evaluation rows (sorted by true RUL)", ylabel=f"RUL ({unit_label(time_unit)})",
           title=f"prediction intervals on {interval.n_evaluated} rows{cov}")
    ax.legend()
    fig.tight_layout()
    return fig
