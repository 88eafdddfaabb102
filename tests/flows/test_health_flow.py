"""The health flow on C-MAPSS FD001's test units (the "running fleet", true RUL known), on real
Prefect, Dask and MLflow: checked against the truth, and what a planner and a reviewer see."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from twinflow.data import cmapss_path
from twinflow.flows.health import FLEET_HEALTH, HealthParams, health
from twinflow.flows.pipeline import PipelineParams, demo_params, pipeline
from twinflow.tasks.features import FeatureParams
from twinflow.tasks.health import workorders

pytestmark = pytest.mark.integration

#: Floors the FD001 test units must meet (measured well above them; see the assertion messages).
FLAG_PRECISION_FLOOR = 0.6
FLAG_RECALL_FLOOR = 0.6
COVERAGE_FLOOR = 0.8  # of a 90 % conformal interval
ANOMALY_SPEARMAN_CEILING = -0.5  # anomaly vs true RUL: degraded (low RUL) assets score higher


def _train_champion(settings) -> None:
    params = demo_params(settings, stages=["ingest", "features", "train"])
    params = params.model_copy(update={
        "features": FeatureParams(windows=[10, 20], ewm_spans=[10], channels=["s2", "s3", "s4", "s7", "s11", "s12",
                                                                             "s15", "s20", "s21"]),
        "test_dataset": None,
        "train": params.train.model_copy(update={"n_trials": 2, "max_iter": 80, "true_rul_path": None,
                                                 "promotion_mode": "rmse"}),
    })
    pipeline(params)


def test_health_scores_fd001_test_units_against_the_truth(runtime, tmp_path):
    settings = runtime.settings
    _train_champion(settings)
    params = HealthParams(dataset="test_fd001", true_rul_path=str(cmapss_path("RUL_FD001.txt.gz")),
                          export_dir=str(tmp_path / "wo"))
    first = health(params)
    m = first.metrics
    print(json.dumps(m, indent=1))
    assert first.assets == 100 and first.skipped == 0
    assert m["health_flag_precision"] >= FLAG_PRECISION_FLOOR, m
    assert m["health_flag_recall"] >= FLAG_RECALL_FLOOR, m
    assert m["health_pi_coverage"] >= COVERAGE_FLOOR, m
    assert m["health_anomaly_spearman"] <= ANOMALY_SPEARMAN_CEILING, m

    # The MLflow run: metrics, plots, the table, work orders.
    client = mlflow.MlflowClient()
    run = client.get_run(first.mlflow_run_id)
    assert run.data.tags["twinflow.stage"] == "health"
    for key in ("health_flag_precision", "health_flag_recall", "health_pi_coverage", "health_anomaly_spearman"):
        assert key in run.data.metrics
    arts = {a.path for d in ("plots", "health", "work_orders", "report") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/risk_ranking.png", "plots/rul_fans.png", "plots/health_trends.png", "health/fleet_health.json",
            "work_orders/work_orders.json", "work_orders/work_orders.csv", "report/health.md"} <= arts

    # Work orders validate against the documented schema and are the maintenance rows.
    doc = json.loads(open(first.work_orders_json).read())
    assert doc["work_orders"] and not workorders.validate(doc["work_orders"])
    assert len(pd.read_csv(first.work_orders_csv)) == len(doc["work_orders"]) == first.work_orders

    # The lake table keeps history; a re-run on the same snapshot and champion replaces its rows
    # and announces nothing again.
    from twinflow import lake

    again = health(params)
    assert again.announced == [] and first.announced
    hist = lake.read_results(settings.lake_path, FLEET_HEALTH).to_pandas()
    assert len(hist) == 100 and hist.run_key.nunique() == 1
