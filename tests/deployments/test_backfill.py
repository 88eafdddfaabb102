"""Backfill against the real Prefect server: one run per past slot, idempotent, clear errors."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from twinflow.deployments.backfill import backfill, parse_time, schedule_slots
from twinflow.errors import ConfigError, ServiceUnavailable

UTC = dt.timezone.utc


def test_schedule_slots_in_timezone():
    start = dt.datetime(2026, 3, 28, 0, 0, tzinfo=UTC)
    end = dt.datetime(2026, 3, 30, 0, 0, tzinfo=UTC)
    # 01:30 Berlin time across the DST change at 02:00 on 2026-03-29: CET (+1) until then, CEST (+2) after.
    slots = schedule_slots("30 1 * * *", start, end, tz="Europe/Berlin")
    assert slots == [dt.datetime(2026, 3, 28, 0, 30, tzinfo=UTC), dt.datetime(2026, 3, 29, 0, 30, tzinfo=UTC),
                     dt.datetime(2026, 3, 29, 23, 30, tzinfo=UTC)]
    hourly = schedule_slots("0 * * * *", start, start + dt.timedelta(hours=5))
    assert len(hourly) == 6 and hourly[0] == start  # both ends inclusive
    with pytest.raises(ConfigError, match="after end"):
        schedule_slots("0 * * * *", end, start)
    with pytest.raises(ConfigError, match="more than 10 runs"):
        schedule_slots("* * * * *", start, end, max_runs=10)
    with pytest.raises(ConfigError, match="invalid cron"):
        schedule_slots("0 25 * * *", start, end)


def test_parse_time():
    assert parse_time("2026-11-01", "UTC") == dt.datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_time("2026-11-01T06:00+01:00").utcoffset() == dt.timedelta(hours=1)
    with pytest.raises(ConfigError, match="cannot parse time"):
        parse_time("yesterday")


@pytest.fixture
def deployment(prefect_api, tmp_path):
    """The standard healthcheck deployment applied (not served) with a 6-hourly, paused schedule."""
    from twinflow.deployments.standard import build_deployments
    from twinflow.settings import get_settings

    name = f"healthcheck-{os.urandom(3).hex()}"
    (dep,) = build_deployments(get_settings(), only=["healthcheck"], crons={"healthcheck": "0 */6 * * *"},
                               paused=True)
    dep.name = name
    dep.apply()
    return f"healthcheck/{name}", name


def test_backfill_creates_one_run_per_past_slot_once(deployment):
    from prefect.client.orchestration import get_client

    full, name = deployment
    start, end = "2026-01-01T00:00+00:00", "2026-01-02T00:00+00:00"
    planned = backfill(name, start, end, dry_run=True)
    assert [r.slot.hour for r in planned] == [0, 6, 12, 18, 0]

    runs = backfill(full, start, end, parameters={"params": {"partitions": 2}})
    assert [r.slot for r in runs] == [r.slot for r in planned] and all(r.created for r in runs)
    with get_client(sync_client=True) as client:
        for r in runs:
            fr = client.read_flow_run(r.flow_run_id)
            assert fr.state.is_scheduled()
            assert fr.expected_start_time == r.slot
            assert "backfill" in fr.tags
            assert fr.parameters["params"]["partitions"] == 2  # override merged onto the defaults
            assert fr.parameters["params"]["log_to_mlflow"] is True

    again = backfill(name, start, end)
    assert [r.flow_run_id for r in again] == [r.flow_run_id for r in runs]
    assert not any(r.created for r in again)

    # Slots in the future are left to the scheduler.
    future = dt.datetime.now(UTC) + dt.timedelta(days=2)
    assert backfill(name, future.isoformat(), (future + dt.timedelta(days=1)).isoformat(), dry_run=True) == []


def test_backfill_errors(prefect_api, deployment, monkeypatch):
    with pytest.raises(ConfigError, match="unknown deployment"):
        backfill("no-such-deployment", "2026-01-01", "2026-01-02")
    with pytest.raises(ConfigError, match="unknown deployment"):
        backfill("healthcheck/no-such-deployment", "2026-01-01", "2026-01-02")
    with pytest.raises(ConfigError, match="cannot parse time"):
        backfill(deployment[1], "last tuesday", "2026-01-02")


def test_backfill_with_server_down_is_a_clear_error(monkeypatch):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with pytest.raises(ServiceUnavailable, match="does not answer"):
            backfill("ingest-hourly", "2026-01-01", "2026-01-02")
