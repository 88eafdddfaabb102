"""The ingest stage flow: landing folder -> validated, partitioned Parquet lake (see ``tasks/ingest/``)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from twinflow import runtime
from twinflow.flows.naming import landing_name, run_name
from twinflow.settings import Settings, get_settings
from twinflow.tasks.ingest import (
    BatchSummary,
    FileOutcome,
    IngestParams,
    IngestResult,
    IngestRun,
    SourceFile,
    ingest_sequence,
    process_batch,
)
from twinflow.tasks.ingest.run import NothingWritten, all_quarantined

__all__ = ["ingest", "IngestParams", "IngestResult", "new_batch_id"]


def new_batch_id() -> str:
    """A sortable, unique ingest batch id: UTC time plus a random suffix."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def _storage_options(settings: Settings, params: IngestParams) -> dict[str, Any]:
    lake = settings.lake
    base = lake.fsspec_options() if hasattr(lake, "fsspec_options") else dict(lake.storage_options)
    return {**base, **params.storage_options}


def _summaries(batches: list[list[SourceFile]], outcomes: list[FileOutcome]) -> list[BatchSummary]:
    by_source = {o.source: o for o in outcomes}
    out = []
    for i, batch in enumerate(batches):
        os_ = [by_source[f.path] for f in batch if f.path in by_source]
        out.append(BatchSummary(
            index=i, files=[f.path for f in batch],
            rows_read=sum(o.rows_read for o in os_), rows_written=sum(o.rows_written for o in os_),
            rows_quarantined=sum(o.rows_quarantined for o in os_),
            files_ingested=sum(o.status == "ingested" for o in os_),
            files_quarantined=sum(o.status == "quarantined" for o in os_),
            files_skipped=sum(o.status in ("unchanged", "duplicate") for o in os_),
            files_deferred=sum(o.status == "deferred" for o in os_)))
    return out


def _artifacts(batch_id: str, batches: list[list[SourceFile]], outcomes: list[FileOutcome],
               summaries: list[BatchSummary], unchanged: int) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    by_source = {o.source: o for o in outcomes}
    for i, batch in enumerate(batches):
        rows = []
        for f in batch:
            o = by_source.get(f.path)
            if o is None:
                continue
            rows.append({"file": o.source, "dataset": o.dataset, "format": o.format, "status": o.status,
                         "rows_read": o.rows_read, "rows_written": o.rows_written,
                         "rows_quarantined": o.rows_quarantined,
                         "flagged": ", ".join(f"{k}={v}" for k, v in o.flagged.items()),
                         "reasons": o.reason, "notes": "; ".join(o.notes)})
        s = summaries[i]
        create_table_artifact(
            table=rows, key=f"ingest-batch-{i}",
            description=(f"Ingest batch {batch_id}, task {i}: {s.rows_read} rows read = {s.rows_written} "
                         f"written + {s.rows_quarantined} quarantined "
                         f"({'conserved' if s.conserved else 'NOT CONSERVED'})"))
    total = (sum(s.rows_read for s in summaries), sum(s.rows_written for s in summaries),
             sum(s.rows_quarantined for s in summaries))
    create_markdown_artifact(
        key="ingest-summary",
        markdown=(f"## Ingest {batch_id}\n\n| files read | unchanged (not read) | rows read | written | "
                  f"quarantined |\n|---|---|---|---|---|\n| {len(outcomes)} | {unchanged} | {total[0]} | "
                  f"{total[1]} | {total[2]} |\n"),
        description="Ingest run summary")


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(), validate_parameters=True,
      flow_run_name=run_name("ingest", lambda p: landing_name(p["params"].landing)))
def ingest(params: IngestParams) -> IngestResult:
    """Ingest the landing files into the lake, incrementally and idempotently.

    Steps:
        1. Resolve settings and the fleet contract (``params.contract``, else the settings'), and check
           that the landing path exists (a one-line ``ConfigError`` otherwise), before any cluster work.
        2. Take the lake's ingest lock: a concurrent run on the same lake waits, then finds the files
           already in the ledger, so rows are never duplicated. Settle a crashed run's commit.
        3. List the landing files and route them by the contract's ``datasets`` rules (event logs, labels
           and unmatched files are skipped, with why, in ``IngestResult.skipped``); refuse a dataset whose
           table holds another contract's data; diff the telemetry files against the ledger by size,
           mtime and params digest: unchanged files are not even read.
        4. Split the other files into batches of ``files_per_batch``; each batch is one Prefect task on
           the Dask cluster that reads, hashes, parses, validates and stages its files.
        5. Commit in source order: an unchanged hash or content already ingested from another file is
           skipped; rows whose (asset, cycle) another file holds are quarantined; then one Delta
           transaction per dataset appends the rows and replaces those of sources read again, and
           the ledger records it (crash-safe: see ``tasks/ingest/commit.py``).
        6. Publish a Prefect table artifact per batch (conservation: rows read = written + quarantined)
           and return the lake snapshots of every dataset the landing files feed (each names its contract).

    Raises:
        NothingWritten: every row of a file or of the run was quarantined, unless
            ``fail_on_all_quarantined`` is False (then a WARNING and ``IngestResult.warnings``). The
            commit happened first: the quarantine holds the rows and their reasons.
    """
    rt = runtime.current()
    settings = rt.settings if rt is not None else get_settings()
    so = _storage_options(settings, params)
    _check_landing(params.landing, so)
    contract = params.fleet()
    quarantine = settings.quarantine_path
    batch_id = new_batch_id()
    logger = get_run_logger()
    logger.info("ingest with fleet contract %s", contract.summary())

    def log_plan(run: IngestRun) -> None:
        logger.info("ingest %s: %d landing files, %d to read in %d batches, %d unchanged", batch_id,
                    len(run.listed), sum(len(b) for b in run.batches), len(run.batches), run.unchanged)

    def on_cluster(batches: list[list[SourceFile]], staging: Path):
        futures = [process_batch.submit(i, b, params, str(staging), quarantine, batch_id, so)
                   for i, b in enumerate(batches)]
        results: list[FileOutcome] = []
        errors: list[BaseException] = []
        for fut in futures:
            try:
                results.extend(fut.result())
            except BaseException as exc:  # noqa: BLE001 - commit the batches that worked, then raise
                errors.append(exc)
        return results, errors

    with runtime.ensure(settings) as active:
        # A cluster twinflow started runs on this host and shares its disk; an external scheduler's
        # workers may not, so an object-store lake's staging then goes through the store.
        cluster = active.cluster
        local_workers = cluster is not None and cluster.owned and cluster.mode != "address"
        run = ingest_sequence(params, settings.lake_path, quarantine, batch_id, on_cluster, so, on_plan=log_plan,
                              shared_staging=False if local_workers else None)
    summaries = _summaries(run.batches, run.outcomes)
    if run.batches:
        _artifacts(batch_id, run.batches, run.outcomes, summaries, run.unchanged)
    if run.errors:
        raise run.errors[0]
    for s in summaries:
        if not s.conserved:  # a bug, not bad input: make it loud
            raise AssertionError(f"ingest batch {s.index} does not conserve rows: {s}")
    for path, note in run.skipped.items():
        logger.info("skipped %s: %s", path, note)
    problems = all_quarantined(run.outcomes)
    if problems and params.fail_on_all_quarantined:
        more = f" (and {len(problems) - 1} more: see the ingest-batch artifacts)" if len(problems) > 1 else ""
        raise NothingWritten(f"ingest {batch_id}: {problems[0]}{more}; the quarantine "
                             f"({quarantine}) holds the rows and reasons (fail_on_all_quarantined=False "
                             "only warns)")
    for p in problems:
        logger.warning("NOTHING WRITTEN: %s", p)
    logs, snapshots = _events_and_segments(run, params, contract, settings.lake_path, quarantine, so, logger)
    return IngestResult(batch_id=batch_id, snapshots=snapshots, batches=summaries, files=run.outcomes,
                        unchanged=run.unchanged, skipped=run.skipped, warnings=problems, events=logs)


def _events_and_segments(run: IngestRun, params: IngestParams, contract, lake_path: str, quarantine: str,
                         so: dict[str, Any], logger) -> tuple[list, dict]:
    """Read the run's event logs (every run: re-validated against the telemetry) and rebuild the life
    segments of every dataset they or the run's telemetry touch; snapshots then name the segments version.

    Raises:
        ConfigError: an event log that cannot be used at all (no telemetry for its dataset, unreadable).
    """
    from twinflow.errors import ConfigError
    from twinflow.tasks.ingest.events import ingest_event_log, rebuild_segments
    from twinflow.tasks.ingest.names import dataset_name
    from twinflow.tasks.ingest.route import route_file

    logs = []
    touched = set(run.snapshots)
    for path in sorted(run.skipped):
        if route_file(path, params, contract).kind != "events":
            continue
        rule = contract.rule_for(path.rstrip("/").rsplit("/", 1)[-1])
        outcome = ingest_event_log(path, rule.dataset_for(dataset_name(path)), contract, lake_path, quarantine, so)
        if outcome.error:
            raise ConfigError(outcome.error)
        logger.info("event log %s -> %s__events: %d rows = %d accepted + %d quarantined%s", path,
                    outcome.dataset, outcome.rows_read, outcome.rows_accepted, outcome.rows_quarantined,
                    f" ({', '.join(f'{k}: {v}' for k, v in outcome.reasons.items())})" if outcome.reasons else "")
        logs.append(outcome)
        touched.add(outcome.dataset)
    snapshots = dict(run.snapshots)
    for name in sorted(touched):
        version = rebuild_segments(lake_path, name, contract, so)
        if name in snapshots and version is not None:
            snapshots[name] = snapshots[name].model_copy(update={"segments": version})
    return logs, snapshots


def _check_landing(landing: str, storage_options: dict[str, Any]) -> None:
    import fsspec

    from twinflow.errors import ConfigError

    fs, root = fsspec.core.url_to_fs(landing, **storage_options)
    if not fs.exists(root):
        raise ConfigError(f"landing path {landing!r} does not exist; create it or pass --landing PATH")


if __name__ == "__main__":
    import sys

    with runtime.start():
        print(ingest(IngestParams(landing=sys.argv[1] if len(sys.argv) > 1 else get_settings().landing_path)))
