"""The train flow against a real ``mlflow server`` process on loopback (REST tracking + registry).

Checks what a reviewer sees through the MLflow client: the run tree, metrics, artifacts served
by the server's artifact proxy, the registered version and its aliases.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from train_fixtures import cmapss_frame, write_features
from twinflow.tasks.train import CHAMPION, TrainParams, champion_error_model

# Starting `mlflow server` costs ~25 s on the shared 2-core machine: run with `-m slow`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1:<free port> with its own SQLite store and artifact root."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not become healthy in 180 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_train_against_a_real_tracking_server(mlflow_server, prefect_api, dask_scheduler_address, tmp_path):
    from twinflow import runtime as rt_mod
    from twinflow.flows.train import train
    from twinflow.settings import get_settings

    settings = get_settings(home=tmp_path / "home", mlflow={"tracking_uri": mlflow_server},
                            dask={"mode": "address", "address": dask_scheduler_address})
    feats = write_features(cmapss_frame("train", list(range(1, 11))), tmp_path / "features")
    try:
        with rt_mod.start(settings):
            res = train(feats, TrainParams(n_trials=2, max_iter=30, early_stopping_rounds=10))
    finally:
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # back to the test's own store

    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{res.run_id}'")
    assert len(children) == 2
    assert np.isfinite(run.data.metrics["eval_rmse"]) and run.data.metrics["eval_rmse"] == res.metrics["eval_rmse"]
    assert len(client.get_metric_history(res.run_id, "val_rmse")) >= 1
    assert {a.path for a in client.list_artifacts(res.run_id, "plots")} >= {"plots/pred_vs_true.png",
                                                                          "plots/learning_curve.png"}
    mv = client.get_model_version_by_alias(settings.mlflow.registered_model, CHAMPION)
    assert str(mv.version) == res.version == "1" and mv.aliases == [CHAMPION]
    assert mv.run_id == res.run_id
    err = champion_error_model(settings)  # residuals downloaded through the server's artifact proxy
    assert err["run_id"] == res.run_id and len(err["residuals"]) == int(run.data.params["data.eval_n"])
