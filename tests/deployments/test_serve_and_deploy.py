"""Both deployment paths against the real Prefect server: ``twinflow serve`` and ``prefect deploy``.

Each runs the healthcheck deployment with its default parameters and checks what the run left
behind (Prefect state, the MLflow run tagged with the flow run, the lake probe file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
YAML = REPO / "deployments" / "prefect.yaml"

pytestmark = pytest.mark.integration


def _env(prefect_api: str, dask_address: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWINFLOW_", "MLFLOW_TRACKING"))}
    env.update({"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
                "TWINFLOW_HOME": str(tmp_path / "home"), "TWINFLOW_DASK__MODE": "address",
                "TWINFLOW_DASK__ADDRESS": dask_address, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _check_run_left_its_traces(flow_run, home: Path) -> None:
    import mlflow

    assert flow_run.state.is_completed(), flow_run.state
    assert flow_run.parameters["params"]["partitions"] == 4  # the deployment's default parameters
    assert (home / "lake" / "_healthcheck" / f"{flow_run.id}.json").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("twinflow")
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["rows"] > 0


@pytest.mark.slow
def test_twinflow_serve_registers_deployments_and_runs_them(prefect_api, dask_scheduler_address, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from twinflow.deployments.entrypoints import available

    only = ["healthcheck"] + (["ingest-hourly"] if "ingest" in available() else [])
    cmd = [sys.executable, "-m", "twinflow.deployments", "serve", "--timezone", "Europe/Berlin"]
    for name in only:
        cmd += ["--only", name]
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=_env(prefect_api, dask_scheduler_address, tmp_path), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "being served" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("healthcheck/healthcheck")
            assert dep.entrypoint == "twinflow.deployments.entrypoints.healthcheck"
            assert dep.work_pool_name is None  # served: no work pool
            if "ingest-hourly" in only:
                ingest = client.read_deployment_by_name("ingest/ingest-hourly")
                (sched,) = ingest.schedules
                assert sched.schedule.cron == "0 * * * *" and sched.schedule.timezone == "Europe/Berlin"
                assert ingest.parameters["params"]["landing"] == str((tmp_path / "home" / "landing").resolve())
                assert ingest.global_concurrency_limit.limit == 1
        flow_run = run_deployment("healthcheck/healthcheck", timeout=240)
        _check_run_left_its_traces(flow_run, tmp_path / "home")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_rejects_bad_input_before_starting_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINFLOW_")}
    bad_cron = subprocess.run([sys.executable, "-m", "twinflow.deployments", "serve", "--cron",
                               "ingest-hourly=every hour"], env=env, capture_output=True, text=True, timeout=120)
    assert bad_cron.returncode == 1
    assert "invalid cron 'every hour' for deployment 'ingest-hourly'" in bad_cron.stderr
    assert "Traceback" not in bad_cron.stderr
    down = subprocess.run([sys.executable, "-m", "twinflow.deployments", "backfill", "ingest-hourly",
                           "--start", "2026-01-01", "--end", "2026-01-02"],
                          env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}, capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 1 and "does not answer" in down.stderr and "Traceback" not in down.stderr
    serve_down = subprocess.run([sys.executable, "-m", "twinflow.deployments", "serve", "--only", "healthcheck"],
                                env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api",
                                     "TWINFLOW_HOME": str(tmp_path / "home")},
                                capture_output=True, text=True, timeout=120)
    assert serve_down.returncode == 1 and "http://127.0.0.1:9/api does not answer" in serve_down.stderr
    assert "Traceback" not in serve_down.stderr


@pytest.mark.slow
def test_serve_unknown_block_or_refusing_scheduler_is_a_one_line_error(prefect_api, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed
    env = _env(prefect_api, dead, tmp_path, TWINFLOW_DASK__CONNECT_TIMEOUT="2")
    block = subprocess.run([sys.executable, "-m", "twinflow.deployments", "serve", "--config-block", "no-such-plant"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert block.returncode == 1 and "unknown twinflow-config block 'no-such-plant'" in block.stderr
    refused = subprocess.run([sys.executable, "-m", "twinflow.deployments", "serve", "--only", "healthcheck"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert f"cannot connect to the Dask scheduler at {dead}" in refused.stderr
    assert "Traceback" not in refused.stderr


def _prefect(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _deploy(prefect_api: str, dask_address: str, tmp_path: Path, names: list[str]) -> dict[str, str]:
    env = _env(prefect_api, dask_address, tmp_path, TWINFLOW_LAKE__LANDING=str(tmp_path / "plant-landing"))
    pool = _prefect(["work-pool", "create", "twinflow-process", "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stdout + pool.stderr
    args = ["--no-prompt", "deploy", "--prefect-file", str(YAML)]
    for name in names:
        args += ["-n", name]
    out = _prefect(args, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return env


def test_prefect_deploy_with_the_yaml_registers_the_managed_deployments(prefect_api, dask_scheduler_address,
                                                                        tmp_path):
    from prefect.client.orchestration import get_client

    from twinflow.deployments.entrypoints import available

    names = ["healthcheck"] + (["ingest-hourly"] if "ingest" in available() else [])
    _deploy(prefect_api, dask_scheduler_address, tmp_path, names)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("healthcheck/healthcheck")
        assert dep.work_pool_name == "twinflow-process"
        assert dep.entrypoint == "twinflow.deployments.entrypoints.healthcheck"
        assert dep.parameters == {"params": {"partitions": 4, "log_to_mlflow": True, "fail": False}}
        if "ingest-hourly" in names:
            ingest = client.read_deployment_by_name("ingest/ingest-hourly")
            assert ingest.work_pool_name == "twinflow-process"
            (sched,) = ingest.schedules
            assert sched.schedule.cron == "0 * * * *" and sched.schedule.timezone == "UTC"
            assert ingest.parameters["params"]["landing"] == str(tmp_path / "plant-landing")
            assert ingest.global_concurrency_limit.limit == 1
            assert {"twinflow", "ingest", "scheduled"} <= set(ingest.tags)


@pytest.mark.slow
def test_process_worker_runs_the_deployed_flow(prefect_api, dask_scheduler_address, tmp_path):
    from prefect.client.orchestration import get_client

    env = _deploy(prefect_api, dask_scheduler_address, tmp_path, ["healthcheck"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("healthcheck/healthcheck")
        flow_run = client.create_flow_run_from_deployment(dep.id, tags=["worker-test"])
    worker = _prefect(["worker", "start", "--pool", "twinflow-process", "--run-once"], env, timeout=300)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run.id)
    _check_run_left_its_traces(flow_run, tmp_path / "home")
