"""The standard deployment set and the prefect.yaml that mirrors it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from twinflow.deployments import entrypoints
from twinflow.deployments.ops import CLUSTER_LIMIT, STAGE_TIMEOUTS, on_failure
from twinflow.deployments.standard import STANDARD, build_deployments, spec, validate_cron, validate_timezone
from twinflow.errors import ConfigError
from twinflow.settings import get_settings

YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


@pytest.mark.parametrize("cron", ["61 * * * *", "every hour", "* * *", "0 0 31 2 * *x", "H * * * *"])
def test_bad_cron_is_a_clear_error(cron):
    with pytest.raises(ConfigError, match="invalid cron"):
        validate_cron(cron)
    with pytest.raises(ConfigError, match="invalid cron .* for deployment 'ingest-hourly'"):
        build_deployments(get_settings(), crons={"ingest-hourly": cron})


def test_bad_timezone_and_unknown_deployment_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown timezone"):
        validate_timezone("Mars/Olympus_Mons")
    with pytest.raises(ConfigError, match="unknown deployment 'hourly'"):
        spec("hourly")
    with pytest.raises(ConfigError, match="unknown deployment"):
        build_deployments(get_settings(), only=["nope"])


def test_standard_set_schedules_parameters_tags(tmp_path):
    settings = get_settings(lake={"landing": str(tmp_path / "landing")})
    deps = {d.name: d for d in build_deployments(settings, timezone="Europe/Berlin",
                                                 crons={"ingest-hourly": "*/15 * * * *"})}
    present = set(entrypoints.available())
    expected = {s.name for s in STANDARD if s.stage in present}
    assert set(deps) == expected and "healthcheck" in deps

    for s in STANDARD:
        if s.name not in deps:
            continue
        dep = deps[s.name]
        cron = "*/15 * * * *" if s.name == "ingest-hourly" else s.cron
        if cron:
            (sched,) = dep.schedules
            assert sched.schedule.cron == cron and sched.schedule.timezone == "Europe/Berlin"
            assert dep.concurrency_limit == 1
        else:
            assert not dep.schedules
        assert {"twinflow", s.stage} <= set(dep.tags)
        assert ("gpu-heavy" in dep.tags) == (s.stage in entrypoints.HEAVY)
        assert dep.entrypoint == f"twinflow.deployments.entrypoints.{s.stage}"
        # Default parameters validate against the flow's own parameter schema.
        flow_obj = entrypoints.raw_flow(s.stage)
        flow_obj.validate_parameters(dep.parameters)
    if "ingest-hourly" in deps:
        assert deps["ingest-hourly"].parameters["params"]["landing"] == str(tmp_path / "landing")
    if "retrain-nightly" in deps:
        assert deps["retrain-nightly"].parameters["params"]["stages"] == ["ingest", "features", "train"]


def test_entrypoints_add_timeouts_hooks_and_the_cluster_slot():
    from prefect.flows import load_flow_from_entrypoint

    for stage in entrypoints.available():
        loaded = load_flow_from_entrypoint(f"twinflow.deployments.entrypoints.{stage}")
        raw = entrypoints.raw_flow(stage)
        assert loaded.name == raw.name
        assert loaded.parameters == raw.parameters
        assert loaded.timeout_seconds == (raw.timeout_seconds or STAGE_TIMEOUTS[stage])
        assert on_failure in loaded.on_failure_hooks and on_failure in loaded.on_crashed_hooks
        assert (loaded.fn is not raw.fn) == (stage in entrypoints.HEAVY)
    with pytest.raises(ConfigError, match="unknown stage"):
        entrypoints.raw_flow("deploy-everything")


def test_prefect_yaml_mirrors_the_standard_set():
    config = yaml.safe_load(YAML.read_text())
    by_name = {d["name"]: d for d in config["deployments"]}
    assert set(by_name) == {s.name for s in STANDARD}
    for s in STANDARD:
        d = by_name[s.name]
        assert d["entrypoint"] == f"twinflow.deployments.entrypoints.{s.stage}"
        assert d["work_pool"]["name"] == "twinflow-process"
        assert sorted(d["tags"]) == s.all_tags()
        crons = [x["cron"] for x in d.get("schedules") or []]
        assert crons == ([s.cron] if s.cron else [])
        assert ("concurrency_limit" in d) == bool(s.cron)
    assert CLUSTER_LIMIT in YAML.read_text()
