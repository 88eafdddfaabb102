"""Lake upkeep: compact small files and vacuum old ones, never removing what a pinned snapshot reads.

The stream bridge and hourly ingest add many small files and every replace leaves the old ones
behind; ``optimize`` rewrites small files into large ones (same rows, new version) and ``vacuum``
deletes files no recent version references. Time travel to a version older than the retention then
fails — so the versions that results still point at are pinned and their files kept: the champion
model's training data (its train run's ``twinflow.lake.dataset`` / ``twinflow.lake.version`` tags).
"""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from twinflow.deployments.ops import on_failure, stage_timeout

log = logging.getLogger("twinflow.upkeep")

__all__ = ["UpkeepParams", "UpkeepReport", "champion_pins", "upkeep"]

DATASET_TAG = "twinflow.lake.dataset"
VERSION_TAG = "twinflow.lake.version"


class UpkeepParams(BaseModel):
    """Parameters of the lake upkeep.

    Attributes:
        datasets: Tables to keep; None: every dataset of the (local) lake. Object-store lakes name them.
        optimize: Compact small files.
        vacuum: Delete unreferenced files older than ``retention_hours``.
        retention_hours: How long unreferenced files stay (time travel within it keeps working).
        dry_run: Report what vacuum would delete without deleting.
        protect_champion: Keep the files of the champion's training snapshot, however old.
    """

    model_config = ConfigDict(extra="forbid")

    datasets: list[str] | None = None
    optimize: bool = True
    vacuum: bool = True
    retention_hours: int = Field(168, ge=0)
    dry_run: bool = False
    protect_champion: bool = True


class UpkeepReport(BaseModel):
    """What the upkeep did, per dataset."""

    optimized: dict[str, dict] = Field(default_factory=dict)
    vacuumed: dict[str, int] = Field(default_factory=dict)
    pinned: dict[str, list[int]] = Field(default_factory=dict)


def champion_pins(settings) -> dict[str, set[int]]:
    """``{dataset: {table versions}}`` the champion model was trained on (empty without one)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from twinflow.tasks.registry import CHAMPION
    from twinflow.tracking import configure_mlflow

    configure_mlflow(settings)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(settings.mlflow.registered_model, CHAMPION)
    except MlflowException:
        return {}
    tags = client.get_run(mv.run_id).data.tags
    dataset, version = tags.get(DATASET_TAG), tags.get(VERSION_TAG)
    if not dataset or version in (None, "", "None"):
        log.warning("champion v%s's run %s names no lake snapshot (%s/%s tags): nothing pinned",
                    mv.version, mv.run_id, DATASET_TAG, VERSION_TAG)
        return {}
    return {dataset: {int(version)}}


@flow(name="lake-upkeep", task_runner=ThreadPoolTaskRunner(), timeout_seconds=stage_timeout("upkeep"),
      on_failure=[on_failure], on_crashed=[on_failure])
def upkeep(params: UpkeepParams = UpkeepParams()) -> UpkeepReport:
    """Compact and vacuum the lake's tables, sparing pinned snapshots.

    Steps:
        1. Find the tables (``params.datasets`` or every dataset of a local lake).
        2. Pin the champion model's training snapshot (MLflow registry alias ``champion``).
        3. ``optimize`` each table (small files into large ones; a new version, same rows).
        4. ``vacuum`` each table with the retention, keeping every file a pinned version reads.
    """
    from twinflow import lake
    from twinflow.settings import get_settings

    logger = get_run_logger()
    params = UpkeepParams.model_validate(params)
    settings = get_settings()
    root, options = settings.lake_path, settings.lake.fsspec_options() or None
    names = params.datasets if params.datasets is not None else lake.datasets(root)
    pins = champion_pins(settings) if params.protect_champion else {}
    report = UpkeepReport(pinned={k: sorted(v) for k, v in pins.items()})
    for name in names:
        if params.optimize and not params.dry_run:
            report.optimized[name] = lake.optimize(root, name, storage_options=options)
        if params.vacuum:
            removed = lake.vacuum(root, name, retention_hours=params.retention_hours, dry_run=params.dry_run,
                                  storage_options=options, keep_versions=pins.get(name, ()))
            report.vacuumed[name] = len(removed)
        logger.info("upkeep %s: %s files %s; pinned versions %s", name, report.vacuumed.get(name, 0),
                    "would be removed" if params.dry_run else "removed", sorted(pins.get(name, ())) or "none")
    return report
