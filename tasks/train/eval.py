"""Evaluation of RUL models: metrics, scoring a logged model, residuals and the report plots."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twinflow.contract.model import unit_label
from twinflow.errors import TwinflowError
from twinflow.refs import FeatureSetRef
from twinflow.tasks.prognostics import (
    PrognosticsReport,
    plot_alpha_lambda,
    plot_error_asymmetry,
    plot_prediction_intervals,
    prediction_interval,
    prognostics_report,
)
from twinflow.tasks.train.data import EvalSet, build_eval_set, natural_key
from twinflow.tasks.train.trainers import model_io_lock

if TYPE_CHECKING:
    from twinflow.tasks.train import TrainParams


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    """PHM08 asymmetric score: late predictions (pred > true) cost more than early ones.

    Errors are in the labels' unit, the fleet contract's clock unit. The constants 13 and 10 are cycles
    of the PHM08 challenge (C-MAPSS): on another clock (hours) the score weighs errors differently and
    is not comparable with C-MAPSS figures, which the run descriptions say beside it.
    """
    d = np.asarray(pred, dtype="float64") - np.asarray(true, dtype="float64")
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, PHM08 score and bias (mean pred − true)."""
    d = np.asarray(pred, dtype="float64") - np.asarray(true, dtype="float64")
    return {"rmse": float(np.sqrt(np.mean(d**2))), "mae": float(np.mean(np.abs(d))),
            "score": phm08_score(pred, true), "bias": float(np.mean(d)), "n": float(d.size)}


def residuals_csv(eval_set: EvalSet, pred: np.ndarray) -> str:
    """``asset_id,true_rul,pred_rul`` for the scored rows of an evaluation set."""
    buf = io.StringIO()
    pd.DataFrame({"asset_id": eval_set.asset_ids, "true_rul": eval_set.true, "pred_rul": pred}).to_csv(buf, index=False)
    return buf.getvalue()


def evaluate_model_uri(model_uri: str, features: FeatureSetRef, params: TrainParams,
                       test_features: FeatureSetRef | None, tracking_uri: str | None = None) -> dict[str, float]:
    """Score a logged/registered model (via ``mlflow.pyfunc``) on a run's evaluation data.

    Raises:
        TwinflowError: the model needs inputs the evaluation data lacks.
    """
    ev, pred = predict_model_uri(model_uri, features, params, test_features, tracking_uri)
    return regression_metrics(pred, ev.true)


def predict_model_uri(model_uri: str, features: FeatureSetRef, params: TrainParams,
                      test_features: FeatureSetRef | None,
                      tracking_uri: str | None = None) -> tuple[EvalSet, np.ndarray]:
    """A logged/registered model's predictions on the scored rows of a run's evaluation data.

    The model gets exactly the input columns of its signature, so models trained on other
    feature sets fail here with a clear error rather than silently mis-scoring.

    Raises:
        TwinflowError: the model needs inputs the evaluation data lacks.
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    ev = build_eval_set(features, params, test_features)
    with model_io_lock():
        model = mlflow.pyfunc.load_model(model_uri)
    sig = model.metadata.get_input_schema()
    cols = sig.input_names() if sig is not None else list(ev.frame.columns)
    missing = [c for c in cols if c not in ev.frame.columns]
    if missing:
        raise TwinflowError(f"{model_uri} needs inputs {missing} that the evaluation data lacks")
    pred = np.asarray(model.predict(ev.frame[cols]), dtype="float64").reshape(-1)[ev.rows]
    return ev, pred


def eval_cycles(ev: EvalSet) -> np.ndarray | None:
    """The cycle of each scored row of an evaluation set (None when the frame has no cycles)."""
    return ev.frame["cycle"].to_numpy()[ev.rows] if "cycle" in ev.frame else None


def evaluate_prognostics(ev: EvalSet, pred: np.ndarray, val: EvalSet, val_pred: np.ndarray, *,
                         level: float = 0.9, alpha: float = 0.2,
                         ph_band: float = 15.0) -> tuple[PrognosticsReport, PrognosticsReport]:
    """Prognostics metrics on the evaluation data and on the validation trajectories.

    The conformal interval is calibrated on validation residuals and its coverage measured on
    the evaluation data. When the evaluation data IS the validation set, its assets are split
    in two (alternating in natural order): the interval is calibrated on one half and its
    coverage measured on the other, never on the rows it was fitted to.

    Returns:
        ``(eval report, validation report)``; the validation report carries the trajectory
        metrics (α-λ, relative accuracy at λ, prognostic horizon).
    """
    if ev.name == val.name:
        assets = sorted(set(val.asset_ids), key=natural_key)
        cal_assets = set(assets[0::2])
        cal = np.isin(val.asset_ids, list(cal_assets))
        if cal.all() or not cal.any():  # one asset: nothing to hold out
            cal = np.ones_like(cal)
        interval = prediction_interval(val.true[cal], val_pred[cal], ev.true[~cal] if (~cal).any() else ev.true,
                                       pred[~cal] if (~cal).any() else pred, level,
                                       calibration_set="validation (half of the assets)")
    else:
        interval = prediction_interval(val.true, val_pred, ev.true, pred, level, calibration_set=val.name)
    ev_report = prognostics_report(ev.true, pred, ev.asset_ids, eval_cycles(ev), alpha=alpha, ph_band=ph_band,
                                   interval=interval, eval_set=ev.name)
    val_report = prognostics_report(val.true, val_pred, val.asset_ids, eval_cycles(val), alpha=alpha,
                                    ph_band=ph_band, eval_set=val.name)
    return ev_report, val_report


def log_prognostics(ev_report: PrognosticsReport, val_report: PrognosticsReport, ev_true: np.ndarray,
                    ev_pred: np.ndarray, val: EvalSet | None = None, val_pred: np.ndarray | None = None, *,
                    time_unit: str) -> None:
    """Log the prognostics metrics (``eval_*``, ``val_*``), their JSON and figures to the active run.

    ``time_unit`` is the fleet contract's clock unit: the unit of the RUL axes of the figures.
    """
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_metrics({**ev_report.metrics("eval"), **val_report.metrics("val")})
    mlflow.log_dict({"eval": ev_report.model_dump(mode="json"), "validation": val_report.model_dump(mode="json")},
                    "evaluation/prognostics.json")
    figs = {"plots/error_asymmetry.png": plot_error_asymmetry(ev_true, ev_pred, time_unit=time_unit)}
    if ev_report.interval is not None:
        figs["plots/prediction_intervals.png"] = plot_prediction_intervals(ev_true, ev_pred, ev_report.interval,
                                                                           time_unit=time_unit)
    if val is not None and val_pred is not None and eval_cycles(val) is not None:
        figs["plots/alpha_lambda.png"] = plot_alpha_lambda(val.true, val_pred, val.asset_ids, eval_cycles(val),
                                                          alpha=val_report.alpha, time_unit=time_unit)
    for path, fig in figs.items():
        mlflow.log_figure(fig, path)
        plt.close(fig)


def plot_pred_vs_true(true: np.ndarray, pred: np.ndarray, title: str, *, time_unit: str):
    """Scatter of predicted vs true RUL (in the clock unit ``time_unit``) with the identity line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=6, alpha=0.5)
    hi = float(max(np.max(true), np.max(pred), 1.0))
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    u = unit_label(time_unit)
    ax.set(xlabel=f"true RUL ({u})", ylabel=f"predicted RUL ({u})", title=title)
    fig.tight_layout()
    return fig


def plot_residuals_per_asset(asset_ids: np.ndarray, residuals: np.ndarray, label_max: int = 40, *, time_unit: str):
    """Prediction − truth per asset (in the clock unit ``time_unit``), legible at any fleet size.

    Up to ``label_max`` assets: one box (or bar) per asset in natural order, every asset named.
    More: the assets ranked by mean residual (mean and range per asset), with only the most late and
    most early ones named, next to the distribution of the per-asset means.
    """
    import matplotlib.pyplot as plt

    df = pd.DataFrame({"asset": asset_ids, "res": residuals})
    stats = df.groupby("asset")["res"].agg(["mean", "min", "max", "size"])
    n = len(stats)
    title = f"residuals per asset ({n:,} assets; > 0: late, the RUL was overestimated)"
    if n <= label_max:
        order = sorted(stats.index, key=natural_key)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * n + 2), 4.5))
        if stats["size"].max() > 1:
            ax.boxplot([df.loc[df.asset == a, "res"].to_numpy() for a in order], showfliers=False)
        else:
            ax.bar(range(1, n + 1), stats.loc[order, "mean"].to_numpy())
        ax.set_xticks(range(1, n + 1), order, rotation=90, fontsize=8)
        ax.set_xlabel("asset")
    else:
        ranked = stats.sort_values("mean")
        fig, (ax, hx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
        x = np.arange(1, n + 1)
        ax.vlines(x, ranked["min"], ranked["max"], color="lightgrey", lw=1, label="range")
        ax.scatter(x, ranked["mean"], s=8, label="mean")
        # Name only the extremes, in a text box (labels on 300 points would overlap).
        k = min(5, n // 2)
        late = ", ".join(f"{a} ({m:+.0f})" for a, m in ranked["mean"].iloc[::-1][:k].items())
        early = ", ".join(f"{a} ({m:+.0f})" for a, m in ranked["mean"].iloc[:k].items())
        ax.text(0.01, 0.98, f"most late: {late}\nmost early: {early}", transform=ax.transAxes, fontsize=8,
                va="top", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgrey"})
        ax.set_xlabel("asset rank by mean residual (most early left, most late right)")
        ax.legend(fontsize=8)
        hx.hist(ranked["mean"], bins=min(40, max(10, n // 10)), orientation="horizontal")
        hx.axhline(0, color="k", lw=1)
        hx.set_xlabel("assets")
        hx.set_title("per-asset mean", fontsize=10)
    ax.axhline(0, color="k", lw=1)
    ax.set_ylabel(f"predicted − true RUL ({unit_label(time_unit)})")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_learning_curve(history: list[dict[str, float]], best_iteration: int, *, time_unit: str):
    """Train and validation RMSE (in the clock unit ``time_unit``) by iteration/epoch of the chosen model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for key in ("train_rmse", "val_rmse"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.axvline(best_iteration, color="k", ls=":", label="best")
    ax.set(xlabel="iteration / epoch", ylabel=f"RMSE ({unit_label(time_unit)})", title="learning curve (chosen model)")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_feature_importance(importance: dict[str, float], top_n: int = 20):
    """Horizontal bar chart of the ``top_n`` largest permutation importances (RMSE increase).

    All features stay in ``evaluation/feature_importance.json``; the chart shows the few that
    matter, so it fits a screen (every one of ~330 features made it 8,000 px tall).
    """
    import matplotlib.pyplot as plt

    items = sorted(importance.items(), key=lambda kv: kv[1])[-top_n:]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v for _, v in items])
    shown = f"top {len(items)} of {len(importance)} features" if len(importance) > len(items) else \
        f"all {len(items)} features"
    ax.set(xlabel="RMSE increase when permuted", title=f"permutation importance ({shown})")
    fig.tight_layout()
    return fig
