"""The train flow end to end on real Prefect, Dask and MLflow (SQLite): what a reviewer sees."""

from __future__ import annotations

import contextvars
import json
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from prefect_helpers import task_run_names
from pump_fixtures import pump_rows
from train_fixtures import cmapss_frame, write_features
from twinflow.data import cmapss_path
from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.flows.train import train
from twinflow.tasks.train import CHALLENGER, CHAMPION, TrainParams, champion_error_model

pytestmark = pytest.mark.integration

TRAIN_UNITS = list(range(1, 17))
TEST_UNITS = list(range(1, 11))
FAST = dict(n_trials=2, max_iter=40, early_stopping_rounds=20)


@pytest.fixture
def data(tmp_path):
    """Train features (16 units) and test features (10 units) with their true RUL file."""
    feats = write_features(cmapss_frame("train", TRAIN_UNITS), tmp_path / "features")
    test = write_features(cmapss_frame("test", TEST_UNITS), tmp_path / "test-features", label=None)
    true = np.loadtxt(cmapss_path("RUL_FD001.txt.gz"))[: len(TEST_UNITS)]
    rul = tmp_path / "rul.txt"
    np.savetxt(rul, true, fmt="%d")
    return feats, test, str(rul)


def _child_runs(client, run):
    return client.search_runs([run.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def test_train_tracks_registers_and_gates_promotion(runtime, data):
    feats, test, rul = data
    client = mlflow.MlflowClient()
    name = runtime.settings.mlflow.registered_model

    # An underfit first model becomes champion: there is none yet.
    first = train(feats, TrainParams(**{**FAST, "max_iter": 10}), test_features=None)
    assert first.version == "1" and set(first.aliases) == {CHAMPION, CHALLENGER}

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.tags["twinflow.stage"] == "train" and run.data.tags["twinflow.eval_set"] == "validation"
    assert run.data.params["model"] == "gbm" and run.data.params["n_trials"] == "2"
    for key in ("eval_rmse", "eval_mae", "eval_score", "eval_bias", "val_rmse",
                # prognostics metrics next to RMSE/PHM08
                "eval_alpha_accuracy", "eval_relative_accuracy", "eval_late_fraction", "eval_asymmetry",
                "eval_pi_half_width", "eval_pi_coverage", "val_alpha_lambda_050", "val_prognostic_horizon",
                # the default gate (both) studies the first model on the twin too
                "gate_challenger_cost", "gate_challenger_cost_ci_low", "gate_challenger_p_best"):
        assert np.isfinite(run.data.metrics[key]), key
    assert run.data.tags["twinflow.promotion_mode"] == "both"
    children = _child_runs(client, run)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["twinflow.trial"] in {"0", "1"} for c in children)
    assert len(client.get_metric_history(children[0].info.run_id, "val_rmse")) >= 1
    arts = {a.path for d in ("plots", "evaluation", "promotion", "data", "search")
            for a in client.list_artifacts(first.run_id, d)}
    assert {"plots/pred_vs_true.png", "plots/residuals_per_asset.png", "plots/learning_curve.png",
            "plots/feature_importance.png", "evaluation/residuals.csv", "promotion/decision.json",
            "plots/alpha_lambda.png", "plots/error_asymmetry.png", "plots/prediction_intervals.png",
            "evaluation/prognostics.json", "promotion/twin.json",
            "data/lineage.json", "search/trials.json"} <= arts
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest and inputs[0].dataset.source
    assert {t.key for t in inputs[0].tags} >= {"lake_snapshot_digest", "mlflow.data.context"}

    # The registered champion is served by pyfunc and reproduces the logged residuals.
    err = champion_error_model(runtime.settings)
    assert err["version"] == "1" and err["run_id"] == first.run_id
    assert err["eval_rmse"] == pytest.approx(run.data.metrics["eval_rmse"])
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    val = cmapss_frame("train", TRAIN_UNITS)
    val = val[val.asset_id.isin(set(err["asset_id"]))].sort_values(["asset_id", "cycle"])
    cols = model.metadata.get_input_schema().input_names()
    assert np.allclose(np.asarray(model.predict(val[cols])), err["pred_rul"])

    mv = client.get_model_version(name, "1")
    assert first.run_id in mv.description and "promoted to champion" in mv.description
    assert "v1" in client.get_registered_model(name).description

    # The RMSE rule (promotion_mode=rmse): a better model (more boosting) on the same validation
    # assets is promoted at margin 0 ...
    second = train(feats, TrainParams(**FAST, promotion_margin=0.0, promotion_mode="rmse"))
    assert second.metrics["eval_rmse"] < first.metrics["eval_rmse"]
    assert second.version == "2" and CHAMPION in second.aliases
    # ... and a third, gated by both rules with an impossible RMSE margin, stays challenger while
    # v2 stays champion; the decision carries both models' twin costs.
    third = train(feats, TrainParams(**FAST, seed=1, promotion_margin=1000.0, promotion_mode="both"))
    assert third.version == "3" and third.aliases == [CHALLENGER]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    # The champion's evaluation task run says which version it scored.
    assert "train-evaluate-champion-v2" in task_run_names(client.get_run(third.run_id).data.tags["prefect.flow_run_id"])
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{third.run_id}/promotion/decision.json"))
    decision = pd.DataFrame(table["data"], columns=table["columns"])
    assert set(decision["decision"]) == {"keep champion"}
    assert decision.set_index("role").loc[CHAMPION, "version"] == "2"
    assert np.isfinite(decision["twin_expected_cost"].astype(float)).all() and len(decision) == 2
    assert set(decision["mode"]) == {"both"}
    assert client.get_run(third.run_id).data.metrics["champion_eval_rmse"] == pytest.approx(
        second.metrics["eval_rmse"])


def test_train_cmapss_test_protocol(runtime, data):
    feats, test, rul = data
    res = train(feats, TrainParams(**FAST, true_rul_path=rul), test_features=test)
    run = mlflow.MlflowClient().get_run(res.run_id)
    assert run.data.tags["twinflow.eval_set"] == "cmapss-test"
    assert run.data.metrics["eval_n"] == len(TEST_UNITS)
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "evaluation"}
    err = champion_error_model(runtime.settings)
    assert len(err["asset_id"]) == len(TEST_UNITS)
    truth = np.minimum(np.loadtxt(rul), 125.0)
    assert np.allclose(err["true_rul"], truth)  # units matched in natural order 1..10


def test_two_trainings_at_once_on_sqlite(runtime, data):
    feats, _, _ = data

    def one(seed):
        return train(feats, TrainParams(**FAST, seed=seed))

    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(contextvars.copy_context().run, one, s) for s in (0, 1)]
        results = [f.result() for f in futs]
    assert sorted(r.version for r in results) == ["1", "2"]
    runs = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name(runtime.settings.mlflow.experiment).experiment_id])
    assert len(runs) == 2 + 2 * 2 and all(r.info.status == "FINISHED" for r in runs)


def test_single_asset_fails_the_run_cleanly(runtime, tmp_path):
    feats = write_features(cmapss_frame("train", [3]), tmp_path / "one")
    with pytest.raises(ConfigError, match="asset"):
        train(feats, TrainParams(**FAST))
    assert mlflow.active_run() is None
    runs = mlflow.search_runs(experiment_names=[runtime.settings.mlflow.experiment], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_train_on_a_timestamped_pump_fleet_with_missing_readings(runtime):
    """Features of a non-C-MAPSS contract (hours, NaNs, a channel one pump lacks) train as they are."""
    import pyarrow as pa

    from twinflow import lake
    from twinflow.contract import load_contract
    from twinflow.flows.features import features
    from twinflow.tasks.features import FeatureParams

    pumps = load_contract("pumps")
    snap = lake.write_lake_table(pa.Table.from_pandas(pump_rows(n_assets=8), preserve_index=False),
                                 runtime.settings.lake_path, "pumps", "b1", contract=pumps)
    feats = features(snap, FeatureParams(windows=[3], time_windows=["1h", "6h"], ewm_spans=[6], rul_cap=24))
    assert feats.time_unit == "h" and feats.key_columns == ["asset_id", "timestamp"]
    frame = pq.read_table(feats.path).to_pandas()
    assert frame[feats.feature_columns].isna().any().any()  # missing readings reach the model as NaN
    with pytest.raises(ConfigError, match="NaN"):
        train(feats, TrainParams(**FAST, use_registry=False))  # the default still refuses them, clearly
    result = train(feats, TrainParams(**FAST, nan_policy="keep", rul_cap=24, use_registry=False))
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["twinflow.contract.name"] == "pumps"
    assert run.data.tags["twinflow.contract.version"] == str(pumps.version)
    assert run.data.tags["twinflow.contract.digest"] == pumps.digest
    assert run.data.tags["twinflow.time_unit"] == "h"
    # Every labelled row of the held-out pumps was scored, in hours: the error is within the label's range.
    assert 0 < run.data.metrics["eval_rmse"] < 24


def test_tracking_server_down_is_a_clear_error(prefect_api, settings, tmp_path, monkeypatch):
    import socket

    from twinflow import runtime as rt_mod

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    feats = write_features(cmapss_frame("train", [1, 2, 3]), tmp_path / "f")
    down = settings.model_copy(update={"mlflow": settings.mlflow.model_copy(
        update={"tracking_uri": f"http://127.0.0.1:{port}"})})
    with rt_mod.start(down, mlflow=False, cluster=False):
        with pytest.raises(ServiceUnavailable, match="does not answer"):
            train(feats, TrainParams(**FAST))
    assert mlflow.active_run() is None
