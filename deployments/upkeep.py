"""Lake upkeep: compact small files and vacuum old ones, never removing what a pinned snapshot reads.

The stream bridge and hourly ingest add many small files and every replace leaves the old ones
behind; ``optimize`` rewrites small files into large ones (same rows, new version) and ``vacuum``
deletes files no recent version references. Time travel to a version older than the retention then
fails — so the versions that results still point at are pinned and their files kept:

* the champion model's training data (its train run's ``twinflow.lake.dataset`` /
  ``twinflow.lake.version`` tags, and ``twinflow.lake.segments``: the life segments its labels came
  from, which health reads again);
* the running health table: for each dataset, the ``fleet_health`` version its latest health run
  wrote and every table version that run read (its snapshot, life segments, recent rows: the
  ``twinflow.reads`` metadata of that commit), so that run can be re-read and re-scored as it was.

Result tables (``_results/<name>``: ``fleet_health``) are compacted and vacuumed as well.
"""

from __future__ import annotations

import json
import logging

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from twinflow.deployments.ops import on_failure, stage_timeout

log = logging.getLogger("twinflow.upkeep")

__all__ = ["UpkeepParams", "UpkeepReport", "champion_pins", "health_pins", "upkeep"]

DATASET_TAG = "twinflow.lake.dataset"
VERSION_TAG = "twinflow.lake.version"
SEGMENTS_TAG = "twinflow.lake.segments"


class UpkeepParams(BaseModel):
    """Parameters of the lake upkeep.

    Attributes:
        datasets: Tables to keep (a result table as ``_results/<name>``); None: every dataset of the
            lake and, with ``results``, its result tables.
        results: With ``datasets`` None, keep the result tables (``fleet_health``) too.
        optimize: Compact small files.
        vacuum: Delete unreferenced files older than ``retention_hours``.
        retention_hours: How long unreferenced files stay (time travel within it keeps working).
        dry_run: Report what vacuum would delete without deleting.
        protect_champion: Keep the files of the champion's training snapshot, however old.
        protect_health: Keep the files of each dataset's latest health run: the ``fleet_health``
            version it wrote and the snapshot it scored, however old.
    """

    model_config = ConfigDict(extra="forbid")

    datasets: list[str] | None = None
    results: bool = True
    optimize: bool = True
    vacuum: bool = True
    retention_hours: int = Field(168, ge=0)
    dry_run: bool = False
    protect_champion: bool = True
    protect_health: bool = True


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
    pins = {dataset: {int(version)}}
    if tags.get(SEGMENTS_TAG, "").isdigit():
        from twinflow.lake import derived_name

        pins[derived_name(dataset, "segments")] = {int(tags[SEGMENTS_TAG])}
    return pins


def health_pins(settings, storage_options: dict | None = None) -> dict[str, set[int]]:
    """``{table: {versions}}`` the running health table needs: for each dataset in ``fleet_health``,
    the version its latest health run wrote and the table versions that run read (empty without one).

    The runs are found in the table's commit history, newest first, read in growing pages until every
    dataset in the table has been met.
    """
    import pyarrow.compute as pc

    from twinflow import lake
    from twinflow.flows.health import FLEET_HEALTH, HEALTH_READS

    root = settings.lake_path
    current = lake.read_results(root, FLEET_HEALTH, columns=["dataset"], storage_options=storage_options)
    if current is None or current.num_rows == 0:
        return {}
    wanted = set(pc.unique(current.column("dataset")).to_pylist())
    table = lake.result_table(FLEET_HEALTH)
    pins: dict[str, set[int]] = {}
    limit, seen = 64, set()
    while True:
        commits = lake.result_history(root, FLEET_HEALTH, limit=limit, storage_options=storage_options)
        for c in commits:
            dataset = c.get("twinflow.dataset")
            if dataset not in wanted or dataset in seen or c.get("version") is None:
                continue
            seen.add(dataset)
            version = int(c["version"])
            pins.setdefault(table, set()).add(version)
            reads = json.loads(c.get(HEALTH_READS) or "{}")
            if not reads:
                # Written before health recorded its reads: the scored version is in the run's rows.
                rows = lake.read_results(root, FLEET_HEALTH, columns=["dataset_version"], version=version,
                                         filter=pc.field("run_key") == c.get("twinflow.key", ""),
                                         storage_options=storage_options)
                scored = set() if rows is None else {v for v in rows.column("dataset_version").to_pylist()
                                                     if v is not None and v >= 0}
                reads = {dataset: v for v in scored}
            for name, v in reads.items():
                pins.setdefault(name, set()).add(int(v))
        if seen >= wanted or len(commits) < limit:
            break
        limit *= 4
    return pins


def _merge(*pins: dict[str, set[int]]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for p in pins:
        for name, versions in p.items():
            out.setdefault(name, set()).update(versions)
    return out


@flow(name="lake-upkeep", task_runner=ThreadPoolTaskRunner(), timeout_seconds=stage_timeout("upkeep"),
      on_failure=[on_failure], on_crashed=[on_failure])
def upkeep(params: UpkeepParams = UpkeepParams()) -> UpkeepReport:
    """Compact and vacuum the lake's tables, sparing pinned snapshots.

    Steps:
        1. Find the tables (``params.datasets``, or every dataset of the lake and its result tables).
        2. Pin the champion model's training snapshot (MLflow registry alias ``champion``) and, for each
           dataset, what its latest health run wrote and read (the ``fleet_health`` commit history).
        3. ``optimize`` each table (small files into large ones; a new version, same rows).
        4. ``vacuum`` each table with the retention, keeping every file a pinned version reads.
    """
    from twinflow import lake
    from twinflow.settings import get_settings

    logger = get_run_logger()
    params = UpkeepParams.model_validate(params)
    settings = get_settings()
    root, options = settings.lake_path, settings.lake.fsspec_options() or None
    if params.datasets is not None:
        names = params.datasets
    else:
        names = lake.datasets(root, options) + (lake.result_tables(root, options) if params.results else [])
    # Pinned before optimizing: an optimize commit must not hide which versions the runs read.
    pins = _merge(champion_pins(settings) if params.protect_champion else {},
                  health_pins(settings, options) if params.protect_health else {})
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
