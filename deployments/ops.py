"""Operations: retries with backoff for I/O, stage timeouts, failure summaries, one GPU-heavy run.

Reusable pieces for stage flows and deployments:

* :data:`IO_TASK_OPTIONS` / :func:`io_task`: Prefect task options for I/O-bound tasks (reading a
  landing folder, writing the lake, talking to MLflow): exponential backoff with jitter, and
  retries only for transient errors (a :class:`~twinflow.errors.ConfigError` fails at once).
* :data:`STAGE_TIMEOUTS` / :func:`stage_timeout`: a wall-clock limit for every stage flow.
* :func:`on_failure`: a flow hook (``on_failure=[on_failure], on_crashed=[on_failure]``) that
  writes a clear summary under ``<home>/failures/`` and, when the Prefect variable
  ``twinflow_notify_block`` names a notification block, sends the summary through it.
* :func:`cluster_slot` / :func:`exclusive`: a Prefect global concurrency limit
  (:data:`CLUSTER_LIMIT`, one slot) so that at most one GPU-heavy run uses the cluster at a time.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from twinflow.errors import ConfigError, TwinflowError

log = logging.getLogger("twinflow.ops")

__all__ = [
    "CLUSTER_LIMIT",
    "IO_TASK_OPTIONS",
    "NOTIFY_VARIABLE",
    "STAGE_TIMEOUTS",
    "cluster_slot",
    "ensure_cluster_limit",
    "exclusive",
    "failure_summary",
    "io_task",
    "is_transient",
    "on_failure",
    "stage_timeout",
    "with_ops",
]

#: Name of the global concurrency limit that GPU-heavy runs hold while they use the cluster.
CLUSTER_LIMIT = "twinflow-cluster"
#: Prefect variable naming a notification block that :func:`on_failure` calls (unset: no notification).
NOTIFY_VARIABLE = "twinflow_notify_block"

#: Wall-clock limit per stage flow, in seconds: generous for FD001-sized data on one machine,
#: small enough that a hung run frees the cluster slot the same day.
STAGE_TIMEOUTS: dict[str, float] = {
    "healthcheck": 10 * 60,
    "ingest": 60 * 60,
    "features": 2 * 60 * 60,
    "train": 4 * 60 * 60,
    "simulate": 2 * 60 * 60,
    "pipeline": 8 * 60 * 60,
    "upkeep": 2 * 60 * 60,
    "health": 30 * 60,
}

_TRANSIENT = (ConnectionError, TimeoutError, OSError)


def stage_timeout(stage: str) -> float:
    """Timeout in seconds for a stage flow (``@flow(timeout_seconds=stage_timeout("ingest"))``).

    Raises:
        ConfigError: unknown stage.
    """
    try:
        return STAGE_TIMEOUTS[stage]
    except KeyError:
        raise ConfigError(f"no timeout defined for stage {stage!r}; known: {', '.join(STAGE_TIMEOUTS)}") from None


def is_transient(exc: BaseException | None) -> bool:
    """True for errors worth retrying: network, timeouts, file-system hiccups, a lost Dask worker.

    Bad input (:class:`~twinflow.errors.ConfigError`, ``ValueError``) and missing files are not
    transient: retrying them only delays a clear failure.
    """
    if exc is None:
        return False
    if isinstance(exc, (ConfigError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, TwinflowError):
        # ServiceUnavailable is transient (a server restarting); other twinflow errors are not.
        from twinflow.errors import ServiceUnavailable

        return isinstance(exc, ServiceUnavailable)
    try:
        from distributed.scheduler import KilledWorker

        if isinstance(exc, KilledWorker):
            return True
    except ImportError:  # pragma: no cover - distributed is a dependency
        pass
    return isinstance(exc, _TRANSIENT)


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we classify whatever the task raised
        return is_transient(exc)
    return False


#: Task options for I/O-bound tasks: ``@task(**IO_TASK_OPTIONS)``.
IO_TASK_OPTIONS: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2.0, 4.0, 8.0],
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_transient,
}


def io_task(fn: Callable | None = None, **overrides: Any):
    """``@task`` with :data:`IO_TASK_OPTIONS` (overridable), for I/O-bound work.

    Example::

        @io_task(name="write-lake-batch")
        def write_batch(...): ...
    """
    from prefect import task

    options = {**IO_TASK_OPTIONS, **overrides}
    if fn is None:
        return lambda f: task(f, **options)
    return task(fn, **options)


# --- failure summaries ---------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|key|credential)", re.I)


def _redact(value: Any) -> Any:
    from pydantic import BaseModel, SecretStr

    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, BaseModel):
        return _redact(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {k: ("**********" if _SECRET_KEY.search(str(k)) and v not in (None, "") else _redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def _failures_dir() -> Path:
    from twinflow import runtime

    rt = runtime.current()
    if rt is not None:
        home = rt.settings.home
    else:
        from twinflow.settings import get_settings

        try:
            home = get_settings().home
        except TwinflowError:
            home = Path(os.environ.get("TWINFLOW_HOME", ".twinflow")).resolve()
    return home / "failures"


def failure_summary(flow_name: str, flow_run: Any, state: Any) -> dict[str, Any]:
    """A JSON-able summary of a failed flow run: what failed, why, with which (redacted) params."""
    from prefect.exceptions import MissingResult

    exc_text = state.message or ""
    try:
        state.result(raise_on_failure=True)
    except MissingResult:  # e.g. a crash: the state message is all there is
        pass
    except BaseException as exc:  # noqa: BLE001 - summarising whatever happened
        exc_text = f"{type(exc).__name__}: {exc}"
    ui = None
    try:
        from prefect.settings import PREFECT_UI_URL

        base = PREFECT_UI_URL.value()
        ui = f"{base.rstrip('/')}/runs/flow-run/{flow_run.id}" if base else None
    except Exception:  # pragma: no cover - the UI URL is a convenience
        pass
    return {
        "flow": flow_name,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "deployment_id": str(flow_run.deployment_id) if flow_run.deployment_id else None,
        "state": state.type.value if hasattr(state.type, "value") else str(state.type),
        "state_name": state.name,
        "error": exc_text.strip().splitlines()[-1] if exc_text.strip() else "",
        "parameters": _redact(dict(flow_run.parameters or {})),
        "tags": list(flow_run.tags or []),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ui_url": ui,
    }


def _markdown(summary: dict[str, Any]) -> str:
    lines = [f"# twinflow: flow `{summary['flow']}` {summary['state_name']}", "",
             f"- run: `{summary['flow_run_name']}` ({summary['flow_run_id']})",
             f"- error: `{summary['error']}`",
             f"- time: {summary['time']}"]
    if summary.get("ui_url"):
        lines.append(f"- Prefect UI: {summary['ui_url']}")
    lines += ["", "## parameters", "```json", json.dumps(summary["parameters"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def _notify(summary: dict[str, Any]) -> None:
    from prefect.variables import Variable

    name = Variable.get(NOTIFY_VARIABLE, default=None)
    if not name:
        return
    from prefect.blocks.core import Block

    block = Block.load(name) if "/" in str(name) else None
    if block is None:
        raise ConfigError(f"Prefect variable {NOTIFY_VARIABLE} must be '<block-type-slug>/<name>', got {name!r}")
    block.notify(body=_markdown(summary), subject=f"twinflow {summary['flow']} {summary['state_name']}")


def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook for failed/crashed runs: write ``<home>/failures/<time>-<flow>-<run>.{json,md}``.

    Also sends the summary through the notification block named by the Prefect variable
    :data:`NOTIFY_VARIABLE` (``<block-type-slug>/<block-name>``) when it is set. The hook never
    raises: a broken notifier must not hide the original failure.
    """
    name = getattr(flow, "name", str(flow))
    try:
        summary = failure_summary(name, flow_run, state)
        folder = _failures_dir()
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{summary['time'].replace(':', '')}-{name}-{flow_run.name}"
        (folder / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str))
        (folder / f"{stem}.md").write_text(_markdown(summary))
        log.error("flow %s run %s %s: %s (summary: %s)", name, flow_run.name, summary["state_name"],
                  summary["error"], folder / f"{stem}.md")
    except Exception as exc:  # pragma: no cover - last-resort logging
        log.error("could not write the failure summary of %s: %s", name, exc)
        return
    try:
        _notify(summary)
    except Exception as exc:
        log.error("failure notification for %s not sent: %s", name, exc)


# --- one GPU-heavy run at a time -----------------------------------------------------------------

def ensure_cluster_limit(limit: int = 1, name: str = CLUSTER_LIMIT) -> None:
    """Create the global concurrency limit (idempotent; an existing limit keeps its value)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:  # created concurrently
            pass


@contextmanager
def cluster_slot(name: str = CLUSTER_LIMIT, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the cluster's concurrency slot for the block; waits while another heavy run holds it.

    The limit is created (with one slot) if it does not exist yet.
    """
    from prefect.concurrency.sync import concurrency

    ensure_cluster_limit(name=name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


def exclusive(flow_obj: Any, name: str = CLUSTER_LIMIT) -> Any:
    """A copy of ``flow_obj`` whose runs hold the cluster slot :func:`cluster_slot` for their duration.

    Same flow name, parameters and options; apply it to the flow a deployment runs (not to
    subflows: the pipeline's own stage calls must not wait for the slot the pipeline holds).
    """
    inner = flow_obj.fn

    @functools.wraps(inner)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with cluster_slot(name):
            return inner(*args, **kwargs)

    new = flow_obj.with_options()
    new.fn = guarded
    return new


def with_ops(flow_obj: Any, stage: str, *, heavy: bool = False) -> Any:
    """The flow with twinflow's operations applied: stage timeout, failure hooks, and the cluster slot.

    Hooks already on the flow are kept.
    """
    hooks = list(getattr(flow_obj, "on_failure_hooks", None) or [])
    crashed = list(getattr(flow_obj, "on_crashed_hooks", None) or [])
    new = flow_obj.with_options(
        timeout_seconds=flow_obj.timeout_seconds or stage_timeout(stage),
        on_failure=hooks + ([on_failure] if on_failure not in hooks else []),
        on_crashed=crashed + ([on_failure] if on_failure not in crashed else []),
    )
    return exclusive(new) if heavy else new
