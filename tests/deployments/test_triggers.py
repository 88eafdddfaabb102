"""Deployment triggers: their definitions in Python and prefect.yaml agree, and on a real Prefect server an
emitted event makes the server's automations create a flow run of the target deployment."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml

from twinflow import events as ev
from twinflow.deployments.triggers import (
    RETRAIN_ON_NEW_DATA,
    SIMULATE_ON_NEW_CHAMPION,
    TRIGGERS,
    deployment_triggers,
)
from twinflow.settings import get_settings

YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


def test_prefect_yaml_has_the_same_triggers(tmp_path):
    settings = get_settings(lake={"landing": str(tmp_path / "landing")})
    by_name = {d["name"]: d for d in yaml.safe_load(YAML.read_text())["deployments"]}
    for name in by_name:
        ours = [t.model_dump(mode="json") for t in deployment_triggers(name, settings)]
        theirs = by_name[name].get("triggers") or []
        assert [t["name"] for t in theirs] == [t["name"] for t in ours]
        for mine, yml in zip(ours, theirs):
            for key in ("expect", "match", "for_each", "posture", "threshold", "within", "enabled"):
                got = yml.get(key, {"for_each": [], "enabled": True}.get(key))
                assert sorted(got) == sorted(mine[key]) if isinstance(got, list) else got == mine[key], key
            yparams = (yml.get("parameters") or {}).get("params")
            mparams = (mine.get("parameters") or {}).get("params")
            if mparams is None:
                assert yparams is None
            else:  # the yaml names what differs from the flow's defaults; the templates are the same
                for key in ("train_dataset", "train_version", "stages", "test_dataset", "dataset", "version"):
                    if key in mparams:
                        assert yparams.get(key) == mparams[key], key
    assert set(TRIGGERS) == {n for n, d in by_name.items() if d.get("triggers")}


def _triggered_runs(client, deployment_id, since):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    # Scheduled runs of the cron are off (paused); what remains is what an automation created.
    return [r for r in runs if r.created is not None and r.created >= since and not r.auto_scheduled]


def _wait_runs(client, deployment_id, since, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _triggered_runs(client, deployment_id, since)
        if runs:
            return runs
        time.sleep(1.0)
    return []


@pytest.mark.integration
def test_events_make_the_server_run_the_target_deployments(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.types._datetime import now

    from twinflow.deployments.standard import build_deployments

    settings = get_settings(lake={"landing": str(tmp_path / "landing")})
    deps = {d.name: d for d in build_deployments(settings, only=["retrain-nightly", "simulate-weekly"],
                                                 paused=True)}
    ids = {name: d.apply() for name, d in deps.items()}  # registers each with its automations
    with get_client(sync_client=True) as client:
        automations = {a.name: a for a in client.read_automations()}
        for name, trigger in ((RETRAIN_ON_NEW_DATA, "retrain-nightly"), (SIMULATE_ON_NEW_CHAMPION, "simulate-weekly")):
            assert automations[name].actions[0].deployment_id == ids[trigger]
            assert automations[name].enabled

        since = now("UTC")
        # Nothing happens on an unrelated event (another model's promotion).
        ev.emit(ev.MODEL_PROMOTED, ev.model_resource("some-other-model"), {"version": "1"})
        dataset = f"stream_{uuid.uuid4().hex[:8]}"
        ev.emit(ev.DATA_READY, ev.dataset_resource(dataset),
                {"dataset": dataset, "version": 7, "assets": {"u1": 60, "u2": 55}})
        ev.flush()
        runs = _wait_runs(client, ids["retrain-nightly"], since)
        assert len(runs) == 1, runs
        params = runs[0].parameters["params"]
        # The event's dataset and version reached the run, typed (7, not "7"); the rest are the defaults.
        assert (params["train_dataset"], params["train_version"]) == (dataset, 7)
        assert params["stages"] == ["ingest", "features", "train"] and params["test_dataset"] is None
        assert params["ingest"]["landing"] == str(tmp_path / "landing")
        assert runs[0].state.type.value in {"SCHEDULED", "PENDING", "RUNNING"}
        from twinflow.deployments.entrypoints import raw_flow

        raw_flow("pipeline").validate_parameters(runs[0].parameters)  # the flow accepts them

        assert _triggered_runs(client, ids["simulate-weekly"], since) == []
        ev.emit_model_promoted(settings.mlflow.registered_model, f"9{uuid.uuid4().int % 1000}", "run-x",
                               {"promote": True, "mode": "rmse"})
        ev.flush()
        sims = _wait_runs(client, ids["simulate-weekly"], since)
        assert len(sims) == 1 and sims[0].parameters == deps["simulate-weekly"].parameters
        # The retrain run is still the only one (the promotion event is not the retrain trigger's).
        assert len(_triggered_runs(client, ids["retrain-nightly"], since)) == 1
        for r in runs + sims:  # leave no scheduled runs for later tests' servers/workers
            client.delete_flow_run(r.id)


@pytest.mark.integration
def test_prefect_deploy_registers_the_yaml_triggers(prefect_api, dask_scheduler_address, tmp_path):
    """`prefect deploy` with prefect.yaml creates the same automations (the event templates survive it)."""
    from prefect.client.orchestration import get_client

    from test_serve_and_deploy import _deploy

    _deploy(prefect_api, dask_scheduler_address, tmp_path, ["retrain-nightly", "simulate-weekly"])
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("pipeline/retrain-nightly")
        simulate = client.read_deployment_by_name("simulate/simulate-weekly")
        owned = {a.name: a for a in client.read_automations()
                 if a.actions and getattr(a.actions[0], "deployment_id", None) in {retrain.id, simulate.id}}
    assert set(owned) >= {RETRAIN_ON_NEW_DATA, SIMULATE_ON_NEW_CHAMPION}
    retrain_auto = owned[RETRAIN_ON_NEW_DATA]
    assert retrain_auto.actions[0].deployment_id == retrain.id
    assert retrain_auto.trigger.expect == {ev.DATA_READY}
    params = retrain_auto.actions[0].parameters["params"]
    assert params["train_dataset"] == "{{ event.payload.dataset }}"
    assert params["train_version"] == "{{ event.payload.version }}"
    assert params["ingest"]["landing"] == str(tmp_path / "plant-landing")  # the env template was rendered
    assert owned[SIMULATE_ON_NEW_CHAMPION].actions[0].deployment_id == simulate.id
