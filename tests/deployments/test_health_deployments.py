"""The health deployments on a real Prefect server: the data.ready trigger, and (slow tier) a served
``health-hourly`` that a data.ready event makes score the event's dataset into the fleet_health table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pyarrow as pa
import pytest

from health_fixtures import pumps_frame
from twinflow import events as ev
from twinflow.deployments.triggers import HEALTH_ON_NEW_DATA
from twinflow.settings import get_settings

pytestmark = pytest.mark.integration


def _runs_of(client, deployment_id, since):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.created is not None and r.created >= since and not r.auto_scheduled]


def _wait(fn, timeout=90.0, every=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(every)
    return fn()


def test_data_ready_makes_the_server_run_health_on_the_events_dataset_and_version(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.types._datetime import now

    from twinflow.deployments.entrypoints import raw_flow
    from twinflow.deployments.standard import build_deployments

    (dep,) = build_deployments(get_settings(), only=["health-hourly"], paused=True)
    assert dep.schedules[0].schedule.cron == "15 * * * *"
    dep_id = dep.apply()
    with get_client(sync_client=True) as client:
        auto = next(a for a in client.read_automations() if a.name == HEALTH_ON_NEW_DATA)
        assert auto.actions[0].deployment_id == dep_id and auto.enabled
        since = now("UTC")
        dataset = f"stream_{uuid.uuid4().hex[:8]}"
        ev.emit(ev.DATA_READY, ev.dataset_resource(dataset), {"dataset": dataset, "version": 4, "assets": {"a": 60}})
        ev.flush()
        runs = _wait(lambda: _runs_of(client, dep_id, since))
        try:
            assert len(runs) == 1, runs
            params = runs[0].parameters["params"]
            assert (params["dataset"], params["version"]) == (dataset, 4)
            raw_flow("health").validate_parameters(runs[0].parameters)
        finally:
            for r in runs:
                client.delete_flow_run(r.id)
            # Later tests' data.ready events start no health runs.
            for a in client.read_automations_by_name(HEALTH_ON_NEW_DATA):
                client.delete_automation(a.id)
            client.delete_deployment(dep_id)


@pytest.mark.slow
def test_served_health_hourly_scores_the_fleet_a_data_ready_event_names(prefect_api, dask_scheduler_address, tmp_path):
    """data.ready -> automation -> served health run -> fleet_health rows at the event's table version."""
    from prefect.client.orchestration import get_client

    from test_serve_and_deploy import _env
    from twinflow import lake
    from twinflow.contract.store import load_contract
    from twinflow.flows.health import FLEET_HEALTH

    home = tmp_path / "home"
    df, _ = pumps_frame(n=12)
    df = df.assign(quality=0, source_file="generated", batch_id="b1")
    snap = lake.write_lake_table(pa.Table.from_pandas(df, preserve_index=False), str(home / "lake"), "pumps", "b1",
                                 contract=load_contract("pumps"))
    cmd = [sys.executable, "-m", "twinflow.deployments", "serve", "--only", "health-hourly", "--paused"]
    log = tmp_path / "serve.log"
    env = _env(prefect_api, dask_scheduler_address, tmp_path)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "being served" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        t0 = time.monotonic()
        ev.emit(ev.DATA_READY, ev.dataset_resource("pumps"), {"dataset": "pumps", "version": snap.version,
                                                              "assets": {"p-01": 60}})
        ev.flush()

        def scored():
            t = lake.read_results(str(home / "lake"), FLEET_HEALTH)
            return t is not None and t.num_rows > 0 and t

        table = _wait(scored, timeout=240, every=1.0)
        assert table, log.read_text()[-3000:]
        rows = table.to_pandas()
        assert set(rows.dataset) == {"pumps"} and set(rows.dataset_version) == {snap.version}
        # No champion in this home: the label-free scores rank the fleet, and say there is no estimate.
        assert len(rows) == 12 and (rows.status == "scored").all() and rows.anomaly_score.notna().all()
        assert rows.action.eq("no estimate").all() and rows.risk_rank.tolist() == list(range(1, 13))
        print(f"data.ready -> fleet_health rows: {time.monotonic() - t0:.1f} s")
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("health/health-hourly")
            run = _wait(lambda: [r for r in client.read_flow_runs() if r.deployment_id == dep.id
                                 and r.state and r.state.is_final()], timeout=60)
            assert run and run[0].state.is_completed(), run
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with get_client(sync_client=True) as client:
            for a in client.read_automations_by_name(HEALTH_ON_NEW_DATA):
                client.delete_automation(a.id)
            client.delete_deployment(client.read_deployment_by_name("health/health-hourly").id)
