"""Training with censored lives: ``censored="exclude"`` leaves them out, ``censored="aft"`` fits XGBoost's
accelerated-failure-time objective on them as lower bounds of the remaining life."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from train_fixtures import cmapss_frame, feature_columns, write_features
from twinflow.errors import ConfigError
from twinflow.tasks.train import AftTrainer, DataSpec, TrainParams, search_and_evaluate, split_by_asset
from twinflow.tasks.train.trainers import aft_bounds
from twinflow.tracking import tracked_run

pytest.importorskip("xgboost")

SPEC = DataSpec(tuple(feature_columns()), "rul")
HP = {"learning_rate": 0.1, "max_depth": 4, "min_child_weight": 5, "colsample_bytree": 0.8,
      "aft_loss_distribution": "normal", "aft_loss_distribution_scale": 1.0}


@pytest.fixture(scope="module")
def censored_fleet():
    """FD001 engines where the 12 longest-lived were replaced preventively at 60 % of their life: their
    rows have no label, only the lower bound ``rul_lower`` (replacement minus the row's cycle, capped)."""
    df = cmapss_frame("train", list(range(1, 41)))
    longest = set(df.groupby("asset_id").cycle.max().sort_values().index[-12:])
    parts = []
    for asset, g in df.groupby("asset_id", sort=False):
        g = g.assign(rul_lower=g["rul"])
        if asset in longest:
            g = g.iloc[: int(0.6 * len(g))]
            g = g.assign(rul_lower=np.minimum(g.cycle.max() - g.cycle, 125.0).astype(float), rul=np.nan)
        parts.append(g)
    return pd.concat(parts, ignore_index=True), longest


def test_censored_rows_are_right_censored_intervals(censored_fleet):
    df, longest = censored_fleet
    lo, hi = aft_bounds(df, SPEC)
    cens = df.asset_id.isin(longest).to_numpy()
    assert np.array_equal(lo[~cens], hi[~cens]) and np.array_equal(lo[~cens], df.rul[~cens])
    assert np.isinf(hi[cens]).all() and np.array_equal(lo[cens], df.rul_lower[cens])


def test_censored_lives_change_the_fit_towards_longer_lives(censored_fleet):
    df, _ = censored_fleet
    train, val = split_by_asset(df, SPEC, 0.25)
    val = val[val.rul.notna()]
    params = TrainParams(censored="aft", max_iter=200, early_stopping_rounds=20)
    with_cens = AftTrainer().fit(train, val, SPEC, HP, params, seed=0)
    without = AftTrainer().fit(train[train.rul.notna()], val, SPEC, HP, params, seed=0)
    # The censored lives are the longest ones: leaving them out biases the remaining life downwards,
    # using them as lower bounds lifts the early-life predictions.
    early = val[val.rul >= 100]
    assert with_cens.predict(early).mean() > without.predict(early).mean() + 1.0
    # The early-stopping metric is the RMSE of the predictions the model makes (same transform).
    rmse = float(np.sqrt(np.mean((with_cens.predict(val) - val.rul) ** 2)))
    assert min(h["val_rmse"] for h in with_cens.history) == pytest.approx(rmse, rel=1e-3)
    assert rmse < 40 and (with_cens.predict(val) >= 0).all()


def test_aft_and_exclude_runs_and_the_logged_model(censored_fleet, tmp_path):
    df, longest = censored_fleet
    ref = write_features(df, tmp_path / "features")
    common = dict(n_trials=1, max_iter=60, early_stopping_rounds=10, use_registry=False)
    aft = search_and_evaluate(ref, TrainParams(censored="aft", **common), None, None)
    excl = search_and_evaluate(ref, TrainParams(**common), None, None)
    # aft trains on the censored assets' rows too; exclude leaves those rows out.
    assert aft.rows_train > excl.rows_train
    assert set(aft.eval_assets).isdisjoint(longest) and np.isfinite(aft.eval_metrics["rmse"])
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("aft", (tmp_path / "art").as_uri()))
    with tracked_run("aft"):
        info = aft.best.model.log("model", aft.example)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    x = df[list(SPEC.feature_columns)].head(50)
    assert np.allclose(np.asarray(loaded.predict(x)), aft.best.model.predict(x), atol=1e-4)


def test_aft_needs_lower_bounds_and_a_model_with_a_censored_variant(tmp_path):
    with pytest.raises(ValidationError, match="censored='aft' is available"):
        TrainParams(model="cnn", censored="aft")
    ref = write_features(cmapss_frame("train", list(range(1, 6))), tmp_path / "f")
    with pytest.raises(ConfigError, match="rul_lower"):
        search_and_evaluate(ref, TrainParams(censored="aft", n_trials=1, max_iter=5), None, None)
