"""Test harness: every test gets its own twinflow home, Prefect home and MLflow store.

Expensive real services are shared per session: one real Prefect server process and one real
Dask LocalCluster (2 worker processes). Tests that need them ask for the ``prefect_api`` and
``runtime`` fixtures; nothing here is mocked.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Prefect reads its settings when first imported: isolate its home before anything imports it.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="twinflow-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-client")
os.environ.pop("PREFECT_API_URL", None)
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
}.items():
    os.environ.setdefault(_key, _value)
for _key in [k for k in os.environ if k.startswith("TWINFLOW_") or k.startswith("MLFLOW_TRACKING")]:
    del os.environ[_key]

import pytest  # noqa: E402


def pytest_configure(config):
    """SIGTERM (CI's timeout, ``kill``) unwinds like Ctrl-C, so session fixtures stop their servers.

    Without it the interpreter dies at once and the session's Prefect server and Dask workers outlive it.
    """
    import signal
    import threading

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Point the twinflow home and MLflow tracking at ``tmp_path``; fail if a run is left active."""
    import mlflow

    home = tmp_path / "twinflow-home"
    monkeypatch.setenv("TWINFLOW_HOME", str(home))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield
    active = mlflow.active_run()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    assert active is None, f"MLflow run {active.info.run_id} was left active"


@pytest.fixture(scope="session")
def prefect_server():
    """One real ``prefect server start`` process on loopback for the whole session."""
    from twinflow.prefect_server import acquire_server, release_server
    from twinflow.settings import Settings

    settings = Settings(home=_SESSION_DIR / "prefect-server-home")
    server = acquire_server(settings)
    server.settings = settings  # for tests of reuse by the same home
    yield server
    release_server(settings, server)


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """Export the session server's URL (env and Prefect settings) for one test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.url)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        yield prefect_server.url


@pytest.fixture(scope="session")
def dask_scheduler_address(prefect_server):
    """A real Dask LocalCluster (2 worker processes), shared by the session.

    Started after the Prefect server so that its workers inherit the API URL.
    """
    from distributed import LocalCluster

    os.environ["PREFECT_API_URL"] = prefect_server.url
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=":0", memory_limit="4GiB") as cluster:
            yield cluster.scheduler_address
    finally:
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture
def settings(tmp_path, dask_scheduler_address):
    """Settings for a test: its own home, the session's Dask cluster by address."""
    from twinflow.settings import get_settings

    return get_settings(home=tmp_path / "twinflow-home",
                        dask={"mode": "address", "address": dask_scheduler_address})


@pytest.fixture
def runtime(settings, prefect_api):
    """A started twinflow runtime on the session's Prefect server and Dask cluster."""
    from twinflow import runtime as rt_mod

    with rt_mod.start(settings) as rt:
        yield rt


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real SeaweedFS S3 server on free loopback ports, one per test module (see object_store.py)."""
    from object_store import start_seaweedfs

    store = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield store
    store.stop()
