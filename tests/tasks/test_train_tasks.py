"""Train stage logic: data checks, the by-asset split, metrics, trainers, trials and the gate."""

from __future__ import annotations

import pickle

import mlflow
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from train_fixtures import cmapss_frame, feature_columns, write_features
from twinflow.errors import ConfigError
from twinflow.tasks.train import (
    DataSpec,
    TrainParams,
    available_trainers,
    champion_error_model,
    check_frame,
    cmapss_test_set,
    decide_promotion,
    phm08_score,
    read_feature_frame,
    regression_metrics,
    run_trial,
    sample_hparams,
    search,
    split_by_asset,
)
from twinflow.tracking import tracked_run

SPEC = DataSpec(tuple(feature_columns()), "rul")
FAST = TrainParams(n_trials=2, max_iter=30, early_stopping_rounds=10)


@pytest.fixture(scope="module")
def small():
    return cmapss_frame("train", list(range(1, 13)))


def test_params_reject_unknown_model_listing_the_available_ones():
    with pytest.raises(ValidationError, match="available: cnn, gbm"):
        TrainParams(model="xgboost")
    with pytest.raises(ValidationError, match="unknown to model 'gbm'"):
        TrainParams(search_space={"epochs": [1]})
    assert available_trainers() == ["cnn", "gbm"]


def test_split_is_by_asset_and_stable(small):
    train, val = split_by_asset(small, SPEC, 0.25)
    assert set(train.asset_id).isdisjoint(val.asset_id)
    assert len(train) + len(val) == len(small) and val.asset_id.nunique() == 3
    # The split depends on the asset ids only: shuffled rows give the same validation assets.
    _, val2 = split_by_asset(small.sample(frac=1.0, random_state=1), SPEC, 0.25)
    assert set(val2.asset_id) == set(val.asset_id)
    with pytest.raises(ConfigError, match="1 asset"):
        split_by_asset(small[small.asset_id == "FD001-1"], SPEC, 0.2)


def test_bad_frames_are_rejected_with_the_reason(small):
    with pytest.raises(ConfigError, match="empty"):
        check_frame(small.iloc[:0], SPEC)
    bad = small.copy()
    bad.loc[3, "s7"] = np.nan
    bad.loc[5, "s11_mean5"] = np.inf
    with pytest.raises(ConfigError, match=r"\['s7', 's11_mean5'\]"):
        check_frame(bad, SPEC)
    assert len(check_frame(bad, SPEC, nan_policy="drop")) == len(small) - 2
    with pytest.raises(ConfigError, match="at least 2"):
        check_frame(small[small.asset_id == "FD001-1"], SPEC, min_assets=2)


def test_reads_hive_partitioned_features_and_requires_labels(tmp_path, small):
    ref = write_features(small, tmp_path / "hive", hive=True)
    frame = read_feature_frame(ref)
    assert pd.api.types.is_string_dtype(frame.asset_id) and set(frame.asset_id) == set(small.asset_id)
    assert len(frame) == len(small) and frame.rul.dtype == np.float64
    unlabeled = write_features(small.drop(columns="rul"), tmp_path / "nolabel")
    with pytest.raises(ConfigError, match="no label column 'rul'"):
        read_feature_frame(unlabeled)
    with pytest.raises(ConfigError, match="lacks columns"):
        read_feature_frame(ref.model_copy(update={"feature_columns": ["s2", "nope"]}))


def test_metrics_and_phm08_asymmetry():
    true = np.array([50.0, 50.0])
    late, early = phm08_score(true + 10, true), phm08_score(true - 10, true)
    assert late > early > 0  # late predictions are penalised more
    assert phm08_score(np.array([60.0]), np.array([50.0])) == pytest.approx(np.e - 1)
    m = regression_metrics(np.array([1.0, 3.0]), np.array([2.0, 2.0]))
    assert m["rmse"] == pytest.approx(1.0) and m["bias"] == pytest.approx(0.0) and m["mae"] == pytest.approx(1.0)


def test_test_protocol_matches_units_in_natural_order():
    frame = pd.DataFrame({"u": ["m-10", "m-10", "m-2", "m-1"], "c": [1, 2, 1, 1], "x": [0.0, 1, 2, 3]})
    spec = DataSpec(("x",), "rul", "u", "c")
    ev = cmapss_test_set(frame, spec, np.array([5.0, 200.0, 7.0]), rul_cap=125)
    assert list(ev.asset_ids) == ["m-1", "m-2", "m-10"]
    assert list(ev.true) == [5.0, 125.0, 7.0] and ev.frame.loc[ev.rows, "cycle"].tolist() == [1, 1, 2]
    with pytest.raises(ConfigError, match="3 units but the true RUL file has 2"):
        cmapss_test_set(frame, spec, np.array([1.0, 2.0]), rul_cap=125)


def test_hparam_sampling_is_seeded_and_distinct():
    space = {"a": [1, 2, 3], "b": [0.1, 0.2]}
    first = sample_hparams(space, 6, seed=3)
    assert first == sample_hparams(space, 6, seed=3)
    assert len({tuple(sorted(d.items())) for d in first}) == 6  # the whole space, no repeats


def test_promotion_gate():
    assert decide_promotion(20.0, None, 1.0, challenger_version="1", time_unit="cycle").promote
    assert decide_promotion(18.0, 20.0, 1.0, challenger_version="2", champion_version="1", time_unit="cycle").promote
    kept = decide_promotion(19.5, 20.0, 1.0, challenger_version="2", champion_version="1", time_unit="cycle")
    assert not kept.promote and kept.table().set_index("role").loc["champion", "version"] == "1"
    assert not decide_promotion(20.0, 20.0, 0.0, champion_version="1",
                                time_unit="cycle").promote  # a tie is no evidence
    assert not decide_promotion(1.0, None, 0.0, champion_version="1", champion_error="bad inputs",
                                time_unit="cycle").promote
    assert "kept" in kept.markdown("m")


def test_the_evaluation_plots_label_durations_in_the_clock_unit():
    from twinflow.tasks.train import plot_learning_curve, plot_pred_vs_true, plot_residuals_per_asset

    true = np.array([30.0, 20.0, 10.0, 25.0])
    pred = np.array([28.0, 23.0, 9.0, 20.0])
    history = [{"step": 1, "train_rmse": 9.0, "val_rmse": 10.0}, {"step": 2, "train_rmse": 7.0, "val_rmse": 8.0}]
    figs = [plot_pred_vs_true(true, pred, "val", time_unit="h"),
            plot_residuals_per_asset(np.array(["a", "a", "b", "b"]), pred - true, time_unit="h"),
            plot_learning_curve(history, 2, time_unit="h")]
    labels = [f.axes[0].get_xlabel() + " | " + f.axes[0].get_ylabel() for f in figs]
    assert all("(h)" in lab and "cycle" not in lab for lab in labels), labels
    assert plot_pred_vs_true(true, pred, "val", time_unit="cycle").axes[0].get_xlabel() == "true RUL (cycles)"


def test_gbm_early_stops_on_the_validation_assets(small):
    train, val = split_by_asset(small, SPEC, 0.25)
    params = TrainParams(max_iter=400, early_stopping_rounds=20, search_space={"learning_rate": [0.3]})
    out = run_trial(0, {"learning_rate": 0.3, "max_leaf_nodes": 31}, train, val, SPEC, params)
    steps = [h["step"] for h in out.model.history]
    best = min(out.model.history, key=lambda h: h["val_rmse"])
    assert out.best_iteration == best["step"] and out.val_rmse == best["val_rmse"]
    assert steps[-1] == out.best_iteration + 20 < 400  # stopped `patience` after the best
    assert out.model.estimator.n_iter_ == out.best_iteration  # the best model is kept, not the last
    pred = out.model.predict(val)
    assert np.isfinite(pred).all() and len(pred) == len(val)
    # The kept model scores on the validation assets exactly what the learning curve says at its best.
    label = val[SPEC.label].to_numpy()
    assert np.sqrt(np.mean((pred - label) ** 2)) == pytest.approx(out.val_rmse, rel=1e-9)


def test_trials_on_dask_match_sequential_and_log_child_runs(small, dask_scheduler_address, tmp_path):
    from distributed import Client

    from twinflow.settings import get_settings
    from twinflow.tasks.train import TrackingTarget
    from twinflow.tracking import configure_mlflow

    settings = get_settings(home=tmp_path / "home")
    exp = configure_mlflow(settings)
    train, val = split_by_asset(small, SPEC, 0.25)
    sequential = search(train, val, SPEC, FAST)
    with tracked_run("parent", stage="train") as parent:
        target = TrackingTarget(settings.mlflow_tracking_uri, exp, parent.info.run_id)
        with Client(dask_scheduler_address) as client:
            parallel = search(train, val, SPEC, FAST, target, client)
    assert [(o.trial, o.val_rmse) for o in parallel] == [(o.trial, o.val_rmse) for o in sequential]
    mc = mlflow.MlflowClient()
    for o in parallel:
        run = mc.get_run(o.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.metrics["best_val_rmse"] == pytest.approx(o.val_rmse)
        assert len(mc.get_metric_history(o.run_id, "val_rmse")) == len(o.model.history)


def test_no_champion_means_no_error_model(tmp_path):
    from twinflow.settings import get_settings
    from twinflow.tracking import configure_mlflow

    settings = get_settings(home=tmp_path / "home")
    configure_mlflow(settings)
    assert champion_error_model(settings) is None


def test_cnn_windows_fit_and_pyfunc_roundtrip(tmp_path):
    pytest.importorskip("torch")
    from twinflow.tasks.train.cnn import make_windows

    frame = pd.DataFrame({"a": ["x"] * 3 + ["y"] * 2, "c": [1, 2, 3, 1, 2], "f": [1.0, 2, 3, 10, 20]})
    w, order = make_windows(frame.iloc[::-1].reset_index(drop=True), "a", "c", ["f"], 3, np.zeros(1), np.ones(1))
    assert w[:, -1, 0].tolist() == [1, 2, 3, 10, 20]  # each window ends at its own row
    assert w[0, :, 0].tolist() == [1, 1, 1] and w[2, :, 0].tolist() == [1, 2, 3]  # padded with the first cycle
    assert w[4, :, 0].tolist() == [10, 10, 20]

    data = cmapss_frame("train", [1, 2, 3, 4, 5])
    train, val = split_by_asset(data, SPEC, 0.2)
    params = TrainParams(model="cnn", window=8, max_iter=2, early_stopping_rounds=2,
                         search_space={"channels": [8], "batch_size": [512]})
    out = run_trial(0, {"channels": 8, "batch_size": 512}, train, val, SPEC, params)
    assert [h["step"] for h in out.model.history] == [1, 2]
    model = pickle.loads(pickle.dumps(out.model))
    pred = model.predict(val)
    assert np.allclose(pred, out.model.predict(val)) and np.isfinite(pred).all()
    # This test's own experiment, with its artifacts under tmp_path: a bare set_experiment on SQLite
    # would put them in ./mlruns of the working directory.
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("cnn", (tmp_path / "art").as_uri()))
    with tracked_run("cnn"):
        info = model.log("model", val.head(10))
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    cols = loaded.metadata.get_input_schema().input_names()
    assert cols[:2] == ["asset_id", "cycle"]
    assert np.allclose(np.asarray(loaded.predict(val[cols])), pred, atol=1e-4)


def test_keep_policy_passes_missing_readings_to_both_trainers(small):
    """nan_policy='keep': NaN features reach the model (a sensor one asset lacks, gaps); inf and a
    missing label are still refused; gbm and cnn both train and predict finite RUL on such data."""
    pytest.importorskip("torch")
    data = small.copy()
    rng = np.random.default_rng(0)
    data.loc[rng.random(len(data)) < 0.1, "s7"] = np.nan
    data.loc[data.asset_id == "FD001-2", "s11"] = np.nan  # an asset without this sensor at all
    kept = check_frame(data, SPEC, nan_policy="keep")
    assert len(kept) == len(data) and kept["s7"].isna().any()
    bad = data.copy()
    bad.loc[4, "s4_mean5"] = np.inf
    with pytest.raises(ConfigError, match="s4_mean5"):
        check_frame(bad, SPEC, nan_policy="keep")
    bad = data.copy()
    bad.loc[4, "rul"] = np.nan
    with pytest.raises(ConfigError, match="rul"):
        check_frame(bad, SPEC, nan_policy="keep")
    train, val = split_by_asset(kept, SPEC, 0.25)
    gbm = run_trial(0, {}, train, val, SPEC, FAST)
    assert np.isfinite(gbm.val_rmse) and np.isfinite(gbm.model.predict(val)).all()
    params = TrainParams(model="cnn", window=8, max_iter=2, early_stopping_rounds=2,
                         search_space={"channels": [8], "batch_size": [512]})
    cnn = run_trial(0, {"channels": 8, "batch_size": 512}, train, val, SPEC, params)
    assert np.isfinite(cnn.val_rmse) and np.isfinite(cnn.model.predict(val)).all()
    from twinflow.tasks.train.cnn import make_windows

    frame = pd.DataFrame({"a": ["x"] * 3, "c": [1, 2, 3], "f": [1.0, np.nan, 3.0]})
    w, _ = make_windows(frame, "a", "c", ["f"], 2, np.array([2.0]), np.array([1.0]))
    assert w[:, -1, 0].tolist() == [-1.0, 0.0, 1.0]  # a missing reading reads as the training mean


def test_store_writes_retry_only_concurrent_writer_conflicts():
    from mlflow.exceptions import MlflowException

    from twinflow.tasks.train import retry_store

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.name")
        return "linked"

    assert retry_store(flaky) == "linked" and len(calls) == 2

    def broken():
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")

    calls.clear()
    with pytest.raises(MlflowException, match="no such run"):
        retry_store(broken)
    assert len(calls) == 1
