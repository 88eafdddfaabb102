"""The demo pipeline end to end on an ``s3://`` lake, with MLflow's artifacts on the same store.

A SeaweedFS S3 gateway on loopback holds the lake (tables, ledger, lease, staging, quarantine) and the
artifacts of an ``mlflow server --artifacts-destination s3://…`` (SQLite backend store); twinflow runs
in its own process configured only through the environment, with its own Prefect server and Dask
``LocalCluster``. Afterwards the bucket is checked: the tables and the quarantine are there, no staging
is left, the train run's artifacts went through the tracking server to the bucket, and nothing of the
lake was written to the local home.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from object_store import requires_weed, s3_filesystem
from service_procs import Procs, small_pipeline_script

pytestmark = [pytest.mark.integration, pytest.mark.slow, requires_weed, pytest.mark.timeout(900)]

# The demo on the bundled FD001 data, sized down as in the scale-out test.
PIPELINE = small_pipeline_script()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_pipeline_on_an_s3_lake_with_mlflow_artifacts_on_s3(s3, tmp_path):
    import httpx

    from twinflow import lake as lk

    so, lake_url = s3.options(), s3.url("lake")
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("TWINFLOW_", "MLFLOW_TRACKING", "PREFECT_API_URL", "AWS_"))}
    base_env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"})
    procs = Procs(tmp_path)
    try:
        port = _free_port()
        mlflow_url = f"http://127.0.0.1:{port}"
        # Only the tracking server holds the store's keys: clients upload through its artifact proxy.
        proc, log = procs.spawn("mlflow", [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", s3.url("mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"], {**base_env, "AWS_ACCESS_KEY_ID": so["AWS_ACCESS_KEY_ID"],
                                "AWS_SECRET_ACCESS_KEY": so["AWS_SECRET_ACCESS_KEY"],
                                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": s3.endpoint})
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{mlflow_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"mlflow server did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        home = tmp_path / "home"
        secret = {k: so[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env = {**base_env, "TWINFLOW_HOME": str(home), "TWINFLOW_LAKE__LAKE": lake_url,
               "TWINFLOW_LAKE__STORAGE_OPTIONS": json.dumps({k: v for k, v in so.items() if k not in secret}),
               "TWINFLOW_LAKE__SECRET_OPTIONS": json.dumps(secret),
               "TWINFLOW_MLFLOW__TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_URI": mlflow_url,
               "TWINFLOW_DASK__N_WORKERS": "2", "TWINFLOW_DASK__THREADS_PER_WORKER": "1",
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        run = subprocess.run([sys.executable, "-c", PIPELINE], env=env, capture_output=True, text=True,
                             timeout=780, cwd=tmp_path)
        assert run.returncode == 0, f"pipeline failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
        result = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    finally:
        procs.stop()

    # The lake is on the store: the ingested tables, their rows, and the quarantine beside them.
    snap = lk.latest_snapshot(lake_url, "train_fd001", so)
    assert snap is not None and lk.open_table(lake_url, "test_fd001", storage_options=so) is not None
    quarantined = lk.read_quarantine(lk.default_quarantine(lake_url), "train_fd001", so).num_rows
    assert lk.read_lake(snap, storage_options=so).num_rows + quarantined == 20631  # every row of train_FD001
    fs = s3_filesystem(s3)
    top = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3.bucket}/lake", refresh=True)}
    assert {"_ledger.sqlite", "_ingest.lock"} <= top, top
    assert lk.find_objects(lk.meta_uri(lake_url, "staging"), "**", so) == []
    assert not (home / "lake").exists() and not (home / "quarantine").exists()
    # The features of that lake, the model trained on them, and its artifacts in the bucket.
    assert result["train"]["version"] and result["simulate"]
    stored = fs.find(f"{s3.bucket}/mlartifacts")
    assert any(f"/{result['train']['run_id']}/" in p for p in stored), stored[:20]
