"""``twinflow backfill``: create flow runs for the past schedule slots of a deployment.

Each slot of the deployment's cron schedule(s) in ``[start, end]`` becomes one flow run, scheduled
at the slot time (so ``prefect.runtime.flow_run.scheduled_start_time`` is the logical date) and
picked up at once by ``twinflow serve`` or a worker of the deployment's pool. Runs carry an
idempotency key per (deployment, slot): running the same backfill twice creates no duplicates.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from twinflow.errors import ConfigError, ServiceUnavailable

log = logging.getLogger("twinflow.deployments")

__all__ = ["BackfillRun", "backfill", "parse_time", "schedule_slots", "find_deployment"]

MAX_RUNS = 1000


@dataclass(frozen=True)
class BackfillRun:
    """One created (or already existing) backfill run."""

    slot: dt.datetime
    flow_run_id: str
    flow_run_name: str
    created: bool


def parse_time(value: str | dt.datetime, tz: str = "UTC") -> dt.datetime:
    """Parse an ISO date/time; naive values are in ``tz``.

    Raises:
        ConfigError: not an ISO 8601 date or date-time.
    """
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ConfigError(f"cannot parse time {value!r}; use ISO 8601, e.g. 2026-11-01 or "
                              "2026-11-01T06:00+01:00") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(tz))
    return parsed


def schedule_slots(cron: str, start: dt.datetime, end: dt.datetime, tz: str = "UTC",
                   max_runs: int = MAX_RUNS) -> list[dt.datetime]:
    """Times of ``cron`` (evaluated in ``tz``) with ``start <= t <= end``, in UTC.

    Raises:
        ConfigError: invalid cron, ``start`` after ``end``, or more than ``max_runs`` slots.
    """
    # Prefect's own schedule model: slots are exactly those its scheduler would have created,
    # including its DST rules (plain croniter gets wall times around DST changes wrong).
    from prefect.server.schemas.schedules import CronSchedule

    from twinflow.deployments.standard import validate_cron, validate_timezone

    validate_cron(cron)
    validate_timezone(tz)
    if start > end:
        raise ConfigError(f"backfill start {start.isoformat()} is after end {end.isoformat()}")
    schedule = CronSchedule(cron=cron, timezone=tz)
    slots: list[dt.datetime] = []
    cursor = start
    chunk = 200  # the generator checks a bounded number of candidates per call
    while True:
        batch = [d.astimezone(dt.timezone.utc) for d in schedule._get_dates_generator(n=chunk, start=cursor, end=end)]
        batch = [d for d in batch if start <= d <= end and (not slots or d > slots[-1])]
        slots.extend(batch)
        if len(slots) > max_runs:
            raise ConfigError(f"backfill would create more than {max_runs} runs; narrow --start/--end "
                              f"or raise --max-runs")
        if len(batch) < chunk:
            return slots
        cursor = batch[-1] + dt.timedelta(seconds=1)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def find_deployment(client: Any, name: str) -> Any:
    """Read a deployment by ``flow/deployment`` or by a unique deployment name.

    Raises:
        ConfigError: no (or several) deployments with that name.
    """
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"unknown deployment {name!r}; list them with `prefect deployment ls`") from None
    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    if not found:
        raise ConfigError(f"unknown deployment {name!r}; start `twinflow serve` or `prefect deploy` first, "
                          "or list them with `prefect deployment ls`")
    if len(found) > 1:
        raise ConfigError(f"several deployments are called {name!r}; use <flow>/{name}")
    return found[0]


def _existing_keys(client: Any, keys: list[str]) -> set[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    found: set[str] = set()
    for i in range(0, len(keys), 200):
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            idempotency_key=FlowRunFilterIdempotencyKey(any_=keys[i:i + 200])), limit=200)
        found.update(r.idempotency_key for r in runs if r.idempotency_key)
    return found


def backfill(
    deployment: str,
    start: str | dt.datetime,
    end: str | dt.datetime,
    *,
    parameters: dict[str, Any] | None = None,
    max_runs: int = MAX_RUNS,
    dry_run: bool = False,
) -> list[BackfillRun]:
    """Create one flow run per past schedule slot of ``deployment`` between ``start`` and ``end``.

    Args:
        deployment: ``flow/deployment`` or a unique deployment name (e.g. ``ingest-hourly``).
        start: First slot time (ISO 8601; naive times use the schedule's timezone).
        end: Last slot time, inclusive; slots later than now are left to the scheduler.
        parameters: Overrides deep-merged onto the deployment's (and schedule's) parameters, so
            ``{"params": {"partitions": 2}}`` keeps the other fields of ``params``.
        max_runs: Refuse to create more runs than this.
        dry_run: Only compute the slots.

    Returns:
        One :class:`BackfillRun` per slot (``created=False`` when the run already existed).

    Raises:
        ConfigError: unknown deployment, a deployment without a cron schedule, bad times.
        ServiceUnavailable: the Prefect API does not answer.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Scheduled

    from twinflow.prefect_server import api_healthy

    url = PREFECT_API_URL.value()
    if not url or not api_healthy(url, timeout=5.0):
        raise ServiceUnavailable(f"the Prefect API {'at ' + url if url else '(PREFECT_API_URL unset)'} "
                                 "does not answer; start the server (or `twinflow serve`) and retry")
    now = dt.datetime.now(dt.timezone.utc)
    with get_client(sync_client=True) as client:
        dep = find_deployment(client, deployment)
        crons = [s for s in (dep.schedules or []) if getattr(s.schedule, "cron", None)]
        if not crons:
            raise ConfigError(f"deployment {deployment!r} has no cron schedule to backfill; "
                              "trigger it with `prefect deployment run` instead")
        planned: list[tuple[dt.datetime, dict[str, Any]]] = []
        for sched in crons:
            tz = sched.schedule.timezone or "UTC"
            lo, hi = parse_time(start, tz), parse_time(end, tz)
            if lo > hi:
                raise ConfigError(f"backfill start {lo.isoformat()} is after end {hi.isoformat()}")
            hi = min(hi, now)
            if lo > hi:  # the whole range is in the future: the scheduler creates those runs
                continue
            for slot in schedule_slots(sched.schedule.cron, lo, hi, tz, max_runs=max_runs):
                merged = _deep_merge(_deep_merge(dep.parameters or {}, sched.parameters or {}), parameters or {})
                planned.append((slot, merged))
        planned.sort(key=lambda p: p[0])
        if len(planned) > max_runs:
            raise ConfigError(f"backfill would create {len(planned)} runs (> {max_runs}); narrow the range")
        if dry_run:
            return [BackfillRun(slot=s, flow_run_id="", flow_run_name="", created=False) for s, _ in planned]
        keys = [f"twinflow-backfill:{dep.id}:{slot.isoformat()}" for slot, _ in planned]
        existing = _existing_keys(client, keys)
        out = []
        for (slot, params), key in zip(planned, keys):
            # The server returns the existing run for a known idempotency key: no duplicates.
            run = client.create_flow_run_from_deployment(
                dep.id, parameters=params, state=Scheduled(scheduled_time=slot), idempotency_key=key,
                tags=["backfill"], name=f"backfill-{slot.strftime('%Y%m%dT%H%MZ')}",
            )
            out.append(BackfillRun(slot=slot, flow_run_id=str(run.id), flow_run_name=run.name,
                                   created=key not in existing))
        log.info("backfill %s: %d run(s) for %d slot(s)", deployment, sum(r.created for r in out), len(out))
        return out
