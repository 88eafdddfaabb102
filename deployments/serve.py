"""``twinflow serve``: a long-running process that serves the standard deployments (Prefect serve).

No work pool is needed: the serving process polls the Prefect API and runs each scheduled or
triggered run in a subprocess. It runs inside :func:`twinflow.runtime.start`, so those
subprocesses reach the same Prefect API, Dask cluster, MLflow backend and lake as the serving
process: :func:`runtime_env` exports them (``PREFECT_API_URL``, ``TWINFLOW_DASK__MODE=address``
with the cluster's address, ``TWINFLOW_MLFLOW__TRACKING_URI`` …) to the environment that
subprocesses inherit.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

from pydantic import BaseModel, SecretStr

from twinflow.settings import ENV_PREFIX, Settings

log = logging.getLogger("twinflow.deployments")

__all__ = ["settings_env", "runtime_env", "serve_deployments"]


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return json.dumps({k: _env_value(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """``TWINFLOW_*`` environment variables that reproduce ``settings`` in another process.

    Only values that differ from the defaults are exported. Secrets are revealed here (the
    environment of a child process is not a log); never print the result.
    """
    env = {f"{ENV_PREFIX}HOME": str(settings.home)}
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        if not isinstance(section, BaseModel):
            continue
        defaults = type(section)()
        for key in type(section).model_fields:
            value = getattr(section, key)
            if value is None or value == getattr(defaults, key):
                continue
            env[f"{ENV_PREFIX}{section_name.upper()}__{key.upper()}"] = _env_value(value)
    return env


def runtime_env(rt: Any) -> dict[str, str]:
    """Environment for processes that must join the runtime ``rt`` (same API, cluster, tracking)."""
    settings = rt.settings
    env = settings_env(settings)
    if rt.prefect_url:
        env["PREFECT_API_URL"] = rt.prefect_url
    if rt.cluster is not None:
        env[f"{ENV_PREFIX}DASK__MODE"] = "address"
        env[f"{ENV_PREFIX}DASK__ADDRESS"] = rt.cluster.address
    env[f"{ENV_PREFIX}MLFLOW__TRACKING_URI"] = settings.mlflow_tracking_uri
    return env


def serve_deployments(
    settings: Settings,
    *,
    only: Iterable[str] | None = None,
    timezone: str = "UTC",
    crons: dict[str, str] | None = None,
    limit: int | None = None,
    paused: bool = False,
) -> None:
    """Register the standard deployments and serve them until interrupted (blocks).

    Args:
        settings: Runtime settings (from the environment or blocks).
        only: Deployment names to serve (default: every available one).
        timezone: IANA timezone of the schedules.
        crons: Per-deployment cron overrides.
        limit: Most flow runs this process runs at once (None: Prefect's default).
        paused: Register schedules paused (runs only when triggered).

    Raises:
        ConfigError: bad cron/timezone/deployment name, checked before anything starts.
        ServiceUnavailable: a configured Prefect API, Dask scheduler or MLflow server is down.
    """
    from prefect import serve

    from twinflow import runtime
    from twinflow.deployments.ops import ensure_cluster_limit
    from twinflow.deployments.standard import build_deployments

    # Validate names, crons and timezone before starting servers and clusters.
    from twinflow.deployments.standard import spec, validate_cron, validate_timezone

    validate_timezone(timezone)
    for name in only or []:
        spec(name)
    for name, cron in (crons or {}).items():
        spec(name)
        validate_cron(cron, f"deployment {name!r}")

    # Served runs are the ones a "run vanished" automation watches: their heartbeats stay on unless
    # the settings turn them off explicitly.
    keep = settings.prefect.flow_heartbeats != "off"
    with runtime.start(settings, heartbeats=keep) as rt:
        env = runtime_env(rt)
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ensure_cluster_limit()
            deployments = build_deployments(settings, only=only, timezone=timezone, crons=crons, paused=paused)
            log.info("serving %d deployment(s) on %s: %s", len(deployments), rt.prefect_url,
                     ", ".join(d.name for d in deployments))
            serve(*deployments, limit=limit, print_starting_message=True)
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
