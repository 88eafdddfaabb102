"""Evaluation of RUL models: metrics, scoring a logged model, residuals and the report plots."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twinflow.errors import TwinflowError
from twinflow.refs import FeatureSetRef
from twinflow.tasks.train_data import EvalSet, build_eval_set, natural_key
from twinflow.tasks.trainers import model_io_lock

if TYPE_CHECKING:
    from twinflow.tasks.train import TrainParams


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    """PHM08 asymmetric score: late predictions (pred > true) cost more than early ones."""
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
    return regression_metrics(pred, ev.true)


def plot_pred_vs_true(true: np.ndarray, pred: np.ndarray, title: str):
    """Scatter of predicted vs true RUL with the identity line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=6, alpha=0.5)
    hi = float(max(np.max(true), np.max(pred), 1.0))
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    ax.set(xlabel="true RUL", ylabel="predicted RUL", title=title)
    fig.tight_layout()
    return fig


def plot_residuals_per_asset(asset_ids: np.ndarray, residuals: np.ndarray):
    """Box plot (or bar) of prediction − truth per asset, assets in natural order."""
    import matplotlib.pyplot as plt

    df = pd.DataFrame({"asset": asset_ids, "res": residuals})
    order = sorted(df["asset"].unique(), key=natural_key)
    fig, ax = plt.subplots(figsize=(max(6, len(order) * 0.12), 4))
    if df.groupby("asset").size().max() > 1:
        ax.boxplot([df.loc[df.asset == a, "res"].to_numpy() for a in order], showfliers=False)
    else:
        ax.bar(range(1, len(order) + 1), df.set_index("asset").loc[order, "res"].to_numpy())
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(range(1, len(order) + 1), order, rotation=90, fontsize=5)
    ax.set(xlabel="asset", ylabel="predicted − true RUL", title="residuals per asset")
    fig.tight_layout()
    return fig


def plot_learning_curve(history: list[dict[str, float]], best_iteration: int):
    """Train and validation RMSE by iteration/epoch of the chosen model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for key in ("train_rmse", "val_rmse"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.axvline(best_iteration, color="k", ls=":", label="best")
    ax.set(xlabel="iteration / epoch", ylabel="RMSE", title="learning curve")
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
