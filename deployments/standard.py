"""The standard deployment set: what runs when, with which parameters, tags and limits.

============== =========== ===================== ======================================== =======
deployment     flow        schedule (cron)       default parameters                       heavy
============== =========== ===================== ======================================== =======
ingest-hourly  ingest      ``0 * * * *``         landing = the configured landing folder  no
retrain-nightly pipeline   ``30 1 * * *``        stages ingest, features, train           yes
simulate-weekly simulate   ``0 4 * * 1``         the twin's default study                 yes
pipeline       pipeline    on demand             all four stages on the landing folder    yes
healthcheck    healthcheck on demand             4 probe tasks, MLflow on                 no
lake-upkeep    upkeep      ``0 3 * * 0``         compact + vacuum (7 days), champion kept no
health-hourly  health      ``15 * * * *``        the running fleet's dataset (health)     no
============== =========== ===================== ======================================== =======

Nightly retraining runs the pipeline's ingest → features → train stages: features need a lake
snapshot, and ingest returns the current snapshots even when no new file landed (cheap no-op).
All schedules use one IANA timezone (``timezone=``, default UTC) so "nightly" means the plant's
night. Every deployment runs its flow through :mod:`twinflow.deployments.entrypoints` (timeouts,
failure hooks); heavy ones hold the ``twinflow-cluster`` global concurrency limit (1 slot) and
each scheduled deployment has a deployment concurrency limit of 1 (runs queue, never overlap).
``retrain-nightly``, ``simulate-weekly`` and ``health-hourly`` also run on events (new stream data, a new
champion):
see :mod:`twinflow.deployments.triggers`.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twinflow.errors import ConfigError
from twinflow.settings import Settings

log = logging.getLogger("twinflow.deployments")

__all__ = ["DeploymentSpec", "STANDARD", "build_deployments", "default_parameters", "validate_cron",
           "validate_timezone", "spec"]

ENTRYPOINT_MODULE = "twinflow.deployments.entrypoints"


def _model_params(stage: str, settings: Settings, **values: Any) -> dict[str, Any]:
    """``{"params": <the stage's params model with values, as JSON>}`` (values alone if it won't build)."""
    from twinflow.deployments.entrypoints import raw_flow

    flow_obj = raw_flow(stage)
    try:
        hints = typing.get_type_hints(flow_obj.fn)
    except Exception:  # unresolvable annotations: fall back to the raw values
        hints = {}
    model = hints.get("params")
    if model is not None and hasattr(model, "model_validate"):
        try:
            return {"params": model.model_validate(values).model_dump(mode="json")}
        except Exception as exc:
            log.warning("default parameters of %s do not validate (%s); passing %s", stage, exc, values)
    return {"params": values}


def _ingest_params(settings: Settings) -> dict[str, Any]:
    return _model_params("ingest", settings, landing=settings.landing_path)


def _pipeline_params(stages: list[str] | None) -> Callable[[Settings], dict[str, Any]]:
    # The configured landing folder, not the demo data; no C-MAPSS test protocol (plant data has no
    # RUL truth file). Operators edit the rest in the Prefect UI or with --param.
    def build(settings: Settings) -> dict[str, Any]:
        values: dict[str, Any] = {"ingest": {"landing": settings.landing_path}, "test_dataset": None}
        if stages:
            values["stages"] = stages
        return _model_params("pipeline", settings, **values)

    return build


def _simulate_params(settings: Settings) -> dict[str, Any]:
    return _model_params("simulate", settings)


def _healthcheck_params(settings: Settings) -> dict[str, Any]:
    return _model_params("healthcheck", settings)


def _upkeep_params(settings: Settings) -> dict[str, Any]:
    return _model_params("upkeep", settings)
def _health_params(settings: Settings) -> dict[str, Any]:
    return _model_params("health", settings)


@dataclass(frozen=True)
class DeploymentSpec:
    """One standard deployment.

    Attributes:
        name: Deployment name (the full Prefect name is ``<flow>/<name>``).
        stage: Stage whose flow runs (a key of ``entrypoints.STAGES``).
        cron: Cron schedule, or None for on-demand only.
        description: Shown in the Prefect UI.
        tags: Prefect tags (``twinflow`` and the stage are always added).
        parameters: Builds the default parameters from settings.
    """

    name: str
    stage: str
    cron: str | None
    description: str
    parameters: Callable[[Settings], dict[str, Any]]
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def heavy(self) -> bool:
        from twinflow.deployments.entrypoints import HEAVY

        return self.stage in HEAVY

    def all_tags(self) -> list[str]:
        extra = ["gpu-heavy"] if self.heavy else ["io"]
        return sorted({"twinflow", self.stage, *self.tags, *extra})


STANDARD: tuple[DeploymentSpec, ...] = (
    DeploymentSpec("ingest-hourly", "ingest", "0 * * * *",
                   "Ingest new files from the landing folder into the lake, every hour.", _ingest_params,
                   ("scheduled",)),
    DeploymentSpec("retrain-nightly", "pipeline", "30 1 * * *",
                   "Nightly: refresh features from the lake and retrain; promote if better than the champion.",
                   _pipeline_params(["ingest", "features", "train"]), ("scheduled",)),
    DeploymentSpec("simulate-weekly", "simulate", "0 4 * * 1",
                   "Weekly digital-twin maintenance-policy study with the champion model's error model.",
                   _simulate_params, ("scheduled",)),
    DeploymentSpec("pipeline", "pipeline", None,
                   "The full pipeline ingest → features → train → simulate, on demand.", _pipeline_params(None),
                   ("on-demand",)),
    DeploymentSpec("healthcheck", "healthcheck", None,
                   "Check the Prefect API, Dask workers, lake and MLflow are reachable, on demand.",
                   _healthcheck_params, ("on-demand",)),
    DeploymentSpec("lake-upkeep", "upkeep", "0 3 * * 0",
                   "Weekly: compact small lake files and vacuum old ones, keeping the champion's training snapshot.",
                   _upkeep_params, ("scheduled",)),
    DeploymentSpec("health-hourly", "health", "15 * * * *",
                   "Score every running asset (RUL, P(failure), health index, action, due-by), export work "
                   "orders and announce assets at risk, every hour after ingest.", _health_params, ("scheduled",)),
)


def spec(name: str) -> DeploymentSpec:
    """The standard deployment called ``name``.

    Raises:
        ConfigError: unknown name (lists the known ones).
    """
    for s in STANDARD:
        if s.name == name:
            return s
    raise ConfigError(f"unknown deployment {name!r}; standard ones: {', '.join(s.name for s in STANDARD)}")


def validate_cron(cron: str, what: str = "schedule") -> str:
    """Return ``cron`` if Prefect accepts it.

    Raises:
        ConfigError: a cron string that does not parse, in one line.
    """
    from prefect._internal.schemas.validators import validate_cron_string

    try:
        return validate_cron_string(cron.strip())
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"invalid cron {cron!r} for {what}: {exc}; expected 5 fields, "
                          "e.g. '0 * * * *' (hourly) or '30 1 * * *' (01:30 daily)") from None


def validate_timezone(tz: str) -> str:
    """Return ``tz`` if it is an IANA timezone name.

    Raises:
        ConfigError: unknown timezone.
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown timezone {tz!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
    return tz


def default_parameters(name: str, settings: Settings) -> dict[str, Any]:
    """Default parameters of the standard deployment ``name`` under ``settings``."""
    return spec(name).parameters(settings)


def build_deployments(
    settings: Settings,
    *,
    only: Iterable[str] | None = None,
    timezone: str = "UTC",
    crons: dict[str, str] | None = None,
    paused: bool = False,
    triggers: bool = True,
) -> list[Any]:
    """Build the standard deployments (``RunnerDeployment`` objects) for the stages that exist.

    Args:
        settings: Settings that give default parameters (e.g. the landing folder).
        only: Deployment names to build (default: all whose stage is importable).
        timezone: IANA timezone of every schedule.
        crons: Per-deployment cron overrides, ``{"ingest-hourly": "*/15 * * * *"}``.
        paused: Register schedules paused.
        triggers: Attach the event triggers of :mod:`twinflow.deployments.triggers` (retrain on new
            stream data, simulate on a new champion).

    Raises:
        ConfigError: unknown deployment name, invalid cron or timezone, or a requested
            deployment whose stage is not available.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from twinflow.deployments import entrypoints
    from twinflow.deployments.triggers import deployment_triggers

    validate_timezone(timezone)
    crons = dict(crons or {})
    for name, cron in crons.items():
        spec(name)
        validate_cron(cron, f"deployment {name!r}")
    wanted = list(only) if only else None
    specs = [spec(n) for n in wanted] if wanted else list(STANDARD)
    present = set(entrypoints.available())
    out = []
    for s in specs:
        if s.stage not in present:
            if wanted:
                raise ConfigError(f"deployment {s.name!r} needs stage {s.stage!r}, which is not available")
            log.warning("skipping deployment %s: stage %s is not available", s.name, s.stage)
            continue
        cron = crons.get(s.name, s.cron)
        schedules = [Cron(validate_cron(cron, f"deployment {s.name!r}"), timezone=timezone, active=not paused)] \
            if cron else []
        flow_obj = entrypoints.load(s.stage)
        dep = flow_obj.to_deployment(
            name=s.name,
            description=s.description,
            schedules=schedules,
            parameters=s.parameters(settings),
            tags=s.all_tags(),
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
            if cron else None,
            entrypoint_type=EntrypointType.MODULE_PATH,
            triggers=deployment_triggers(s.name, settings) if triggers else None,
        )
        # The runner must load the flow with operations applied, not the bare stage flow.
        dep.entrypoint = f"{ENTRYPOINT_MODULE}.{s.stage}"
        out.append(dep)
    return out
