"""The ingest stage flow: landing folder -> validated, partitioned Parquet lake (see ``tasks/ingest/``)."""

from __future__ import annotations

import shutil
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger

from twinflow import runtime
from twinflow.runtime import TwinflowTaskRunner
from twinflow.settings import Settings, get_settings
from twinflow.tasks.ingest import (
    STAGING_DIR,
    BatchSummary,
    FileOutcome,
    IngestParams,
    IngestResult,
    Ledger,
    SourceFile,
    commit_outcomes,
    lake_lock,
    plan_files,
    list_landing,
    local_path,
    process_batch,
)

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


@flow(name="ingest", task_runner=TwinflowTaskRunner(), validate_parameters=True)
def ingest(params: IngestParams) -> IngestResult:
    """Ingest the landing files into the lake, incrementally and idempotently.

    Steps:
        1. Resolve settings and check that the landing path exists (a one-line ``ConfigError``
           otherwise), before any cluster work.
        2. Take the lake's ingest lock: a concurrent run on the same lake waits, then finds the files
           already in the ledger, so rows are never duplicated.
        3. List the landing files and diff them against the ledger by size and mtime: unchanged files
           are not even read.
        4. Split the other files into batches of ``files_per_batch``; each batch is one Prefect task on
           the Dask cluster that reads, hashes, parses, validates and stages its files.
        5. Commit in source order: an unchanged hash or content already ingested from another file is
           skipped; rows whose (asset, cycle) another file holds are quarantined; staged files are
           renamed into place (replacing the source's previous version) and the ledger is updated.
        6. Publish a Prefect table artifact per batch (conservation: rows read = written + quarantined)
           and return the lake snapshots of every dataset the landing files feed.
    """
    rt = runtime.current()
    settings = rt.settings if rt is not None else get_settings()
    so = _storage_options(settings, params)
    _check_landing(params.landing, so)
    lake = local_path(settings.lake_path)
    quarantine = local_path(settings.quarantine_path)
    batch_id = new_batch_id()
    started = time.time()
    logger = get_run_logger()
    with runtime.ensure(settings), lake_lock(lake, params.lock_timeout_s):
        ledger = Ledger(lake)
        try:
            shutil.rmtree(lake / STAGING_DIR, ignore_errors=True)  # leftovers of a crashed run
            files = list_landing(params.landing, so, params.include, params.exclude, params.follow_external_links)
            known = ledger.files()
            todo, unchanged = plan_files(files, known, params)
            n = params.files_per_batch
            batches = [todo[i:i + n] for i in range(0, len(todo), n)]
            logger.info("ingest %s: %d landing files, %d to read in %d batches, %d unchanged", batch_id,
                        len(files), len(todo), len(batches), unchanged)
            staging = lake / STAGING_DIR / batch_id
            futures = [process_batch.submit(i, b, params, str(staging), str(quarantine), batch_id, so)
                       for i, b in enumerate(batches)]
            results: list[FileOutcome] = []
            errors: list[BaseException] = []
            for fut in futures:
                try:
                    results.extend(fut.result())
                except BaseException as exc:  # noqa: BLE001 - commit the batches that worked, then raise
                    errors.append(exc)
            outcomes = commit_outcomes(results, ledger, lake, quarantine, batch_id)
            shutil.rmtree(staging, ignore_errors=True)
            ledger.record_batch(batch_id, started, outcomes, "failed" if errors else "completed")
            summaries = _summaries(batches, outcomes)
            if batches:
                _artifacts(batch_id, batches, outcomes, summaries, unchanged)
            if errors:
                raise errors[0]
            listed = {f.path for f in files}
            datasets = {row["dataset"] for src, row in ledger.files().items() if src in listed}
            datasets |= {o.dataset for o in outcomes}
            snapshots = {}
            for ds_name in sorted(datasets):
                snap = ledger.snapshot(str(lake), ds_name)
                if snap is not None:
                    snapshots[ds_name] = snap
        finally:
            ledger.close()
    for s in summaries:
        if not s.conserved:  # a bug, not bad input: make it loud
            raise AssertionError(f"ingest batch {s.index} does not conserve rows: {s}")
    return IngestResult(batch_id=batch_id, snapshots=snapshots, batches=summaries, files=outcomes,
                        unchanged=unchanged)


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
