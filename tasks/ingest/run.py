"""The ingest sequence (recover -> plan -> process -> commit) and the Prefect task for one batch of files.

:func:`ingest_sequence` is the one sequence both the ``ingest`` flow and :func:`run_local` run; they differ
only in how batches of files are processed (Prefect tasks on the cluster, or in this process).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import task

from twinflow import lake as lk
from twinflow.errors import ConfigError, TwinflowError
from twinflow.refs import LakeSnapshot
from twinflow.tasks.ingest.commit import commit_outcomes, lake_lock
from twinflow.tasks.ingest.landing import list_landing, plan_files
from twinflow.tasks.ingest.ledger import open_ledger
from twinflow.tasks.ingest.params import FileOutcome, IngestParams, SourceFile
from twinflow.tasks.ingest.process import process_file
from twinflow.tasks.ingest.quarantine import quarantine_after_error, summarise_kinds
from twinflow.tasks.ingest.route import route_file

STAGING_DIR = "_staging"
log = logging.getLogger("twinflow.ingest")

#: Processes batches of files into outcomes, staging under the given folder; returns the outcomes of
#: the batches that worked and the errors of those that failed (their files are not recorded).
ProcessBatches = Callable[[list[list[SourceFile]], Path], tuple[list[FileOutcome], list[BaseException]]]


@dataclass
class IngestRun:
    """What one ingest sequence did: the plan, every outcome, the errors and the snapshots it leaves."""

    batch_id: str
    listed: list[SourceFile]
    batches: list[list[SourceFile]]
    unchanged: int
    outcomes: list[FileOutcome] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    snapshots: dict[str, LakeSnapshot] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # landing files not ingested -> why


def recent_window(params: IngestParams) -> int:
    """``W`` of the recent-rows tables this run refreshes: ``params.recent_rows``, else what the health
    stage reads with the default feature and health parameters (``tasks/health/score.recent_rows``)."""
    if params.recent_rows is not None:
        return params.recent_rows
    from twinflow.tasks.features.params import FeatureParams
    from twinflow.tasks.health.params import HealthParams
    from twinflow.tasks.health.score import recent_rows

    return recent_rows(FeatureParams(), HealthParams())


def ingest_sequence(params: IngestParams, lake_path: str, quarantine_path: str, batch_id: str,
                    process_batches: ProcessBatches, storage_options: dict[str, Any] | None = None,
                    on_plan: Callable[[IngestRun], None] | None = None) -> IngestRun:
    """Ingest the landing folder once, under the lake's ingest lock.

    The lake may be local or on an object store (``s3://``; ``storage_options`` in delta-rs keys):
    there the lock is a lease in the lake and the ledger a file in the lake (see :func:`lake_lock`,
    :func:`~twinflow.tasks.ingest.ledger.open_ledger`), so ingest runs on several hosts take turns and
    each starts from what the last one committed; staging is then a temporary folder of this host.

    Steps: settle a crashed run's commit (:meth:`Ledger.recover`) and its staging leftovers; list the
    landing files and route them by the fleet contract (event logs, labels and files no rule matches are
    skipped, with why, in :attr:`IngestRun.skipped`); refuse, before reading anything, a dataset whose
    table holds another contract's data; diff the telemetry files against the ledger by size, mtime and
    params digest (unchanged files are not read); process the others in batches of ``files_per_batch``;
    commit the outcomes of the batches that worked (:func:`commit_outcomes`); record the batch; refresh
    the recent-rows table of every dataset the landing files feed (:func:`twinflow.lake.refresh_recent`,
    ``W`` from :func:`recent_window`) and take its snapshot. A failed batch's files are not recorded, so the
    next run reads them again.

    Raises:
        ConfigError: the contract cannot be loaded, or a dataset's table holds another contract's data
            (nothing is read or written).
    """
    so = params.storage_options if storage_options is None else storage_options
    contract = params.fleet()
    remote = not lk.is_local(lake_path)
    quarantine = local_quarantine(quarantine_path)
    started = time.time()
    with contextlib.ExitStack() as stack:
        lease = stack.enter_context(lake_lock(lake_path, params.lock_timeout_s, so, params.lease_ttl_s))
        check = lease.check if lease is not None else None
        ledger = stack.enter_context(open_ledger(lake_path, so, check=check))
        # An object-store lake's staging is this host's (the workers that process the batches write
        # there and the commit uploads it); a local lake's lives beside its tables.
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="twinflow-ingest-"))) if remote \
            else lk.local_path(lake_path)
        ledger.recover(lake_path)
        shutil.rmtree(root / STAGING_DIR, ignore_errors=True)  # leftovers of a crashed run
        listed = list_landing(params.landing, so, ["*"], [], params.follow_external_links)
        routes = {f.path: route_file(f.path, params, contract) for f in listed}
        files = [f for f in listed if routes[f.path].telemetry]
        skipped = {f.path: routes[f.path].note for f in listed if not routes[f.path].telemetry}
        for path, note in skipped.items():
            log.info("ingest: %s skipped: %s", path, note)
        for dataset in sorted({routes[f.path].dataset for f in files}):
            lk.check_contract(lake_path, dataset, contract, so)
        todo, unchanged = plan_files(files, ledger.files(), params, routes)
        n = params.files_per_batch
        run = IngestRun(batch_id=batch_id, listed=files, unchanged=unchanged,
                        batches=[todo[i:i + n] for i in range(0, len(todo), n)], skipped=skipped)
        if on_plan is not None:
            on_plan(run)
        staging = root / STAGING_DIR / batch_id
        results, run.errors = process_batches(run.batches, staging) if run.batches else ([], [])
        run.outcomes = commit_outcomes(results, ledger, lake_path, quarantine, batch_id, contract,
                                       before_commit=check)
        shutil.rmtree(staging, ignore_errors=True)
        ledger.record_batch(batch_id, started, run.outcomes, "failed" if run.errors else "completed")
        listed = {f.path for f in files}
        names = {row["dataset"] for src, row in ledger.files().items() if src in listed}
        window = recent_window(params)
        for name in sorted(names | {o.dataset for o in run.outcomes}):
            # Still under the lock: one refresh per telemetry version (a no-op when it is current).
            # The rows are committed already; a table that cannot be refreshed only makes health read
            # the asset files (it sees the table is stale), so it is not this run's failure.
            try:
                lk.refresh_recent(lake_path, name, window, so)
            except Exception as exc:  # noqa: BLE001 - logged; the next run refreshes it
                log.warning("ingest: recent-rows table of %s not refreshed (%s); health reads the asset "
                            "files until a later run refreshes it", name, exc)
            snap = ledger.snapshot(lake_path, name)
            if snap is not None:
                # A table written before contracts has none stored: it is read with this run's.
                run.snapshots[name] = snap if snap.contract is not None else \
                    snap.model_copy(update={"contract": contract})
    return run


def local_quarantine(quarantine_path: str) -> Path:
    """The quarantine folder, which must be local for now (the lake itself may be on an object store).

    Raises:
        ConfigError: ``quarantine_path`` is an object-store URL.
    """
    if not lk.is_local(quarantine_path):
        raise ConfigError(f"the quarantine must be a local path for now, got {quarantine_path!r} (the lake may "
                          "be on an object store; set TWINFLOW_LAKE__QUARANTINE to a local folder)")
    return lk.local_path(quarantine_path)


class NothingWritten(TwinflowError):
    """An ingest in which every row of a file, or of the run, was quarantined (see
    :attr:`IngestParams.fail_on_all_quarantined`): the rows and their reasons are in the quarantine."""


def all_quarantined(outcomes: list[FileOutcome], top: int = 3) -> list[str]:
    """What makes a run that wrote nothing where it should have: one line per file whose every row was
    quarantined (or which could not be parsed at all), plus one for the run when it read rows and wrote
    none. Each line names the top reasons. Empty when every file that was read wrote rows."""
    problems = []
    read = [o for o in outcomes if o.status in ("ingested", "quarantined")]
    for o in read:
        if o.rows_written == 0 and (o.rows_read > 0 or o.status == "quarantined"):
            problems.append(f"every row of {o.source} was quarantined ({o.rows_quarantined} rows): "
                            f"{o.reason or 'no reason recorded'}")
    rows_read = sum(o.rows_read for o in read)
    if read and rows_read and not sum(o.rows_written for o in read):
        kinds: dict[str, int] = {}
        for o in read:
            for part in filter(None, (o.reason or "").split("; ")):
                k, _, n = part.rpartition(" x")
                if k and n.isdigit():
                    kinds[k] = kinds.get(k, 0) + int(n)
                else:
                    kinds[part] = kinds.get(part, 0) + max(o.rows_quarantined, 1)
        names = ", ".join(o.source.rsplit("/", 1)[-1] for o in read[:3]) + (", ..." if len(read) > 3 else "")
        problems.insert(0, f"the run wrote nothing: all {rows_read} rows of {len(read)} file(s) ({names}) were "
                           f"quarantined; top reasons: {summarise_kinds(kinds, top) or 'unknown'}")
    return problems


def process_isolated(src: SourceFile, params: IngestParams, staging: Path, quarantine: Path, batch_id: str,
                     storage_options: dict[str, Any], logger: Any = None) -> FileOutcome:
    """:func:`process_file`, except that an unexpected error costs only this file, never its batch.

    The file is quarantined whole with reason ``ingest error: <type>: <message>`` (deferred when its
    bytes cannot even be copied), logged at WARNING, and the other files of the batch go on. Errors that
    are not ``Exception`` (interrupts, a killed worker) still fail the batch, which Prefect retries.
    """
    try:
        return process_file(src, params, staging, quarantine, batch_id, storage_options)
    except Exception as exc:  # noqa: BLE001 - per-file isolation: one bad file must not cost its neighbours
        return quarantine_after_error(src, params, staging, batch_id, storage_options, exc, logger)


def run_local(params: IngestParams, lake_path: str, quarantine_path: str, batch_id: str) -> list[FileOutcome]:
    """Ingest sequentially in this process, without Prefect or Dask (tests, debugging, tiny folders).

    The same :func:`ingest_sequence` as the ``ingest`` flow. Raises the first batch error after
    committing the files that worked.
    """
    quarantine = local_quarantine(quarantine_path)

    def sequential(batches: list[list[SourceFile]], staging: Path):
        outcomes, errors = [], []
        for b in batches:
            try:
                outcomes.extend(process_files(b, params, staging, quarantine, batch_id, params.storage_options))
            except Exception as exc:  # noqa: BLE001 - commit what worked, as the flow does
                errors.append(exc)
        return outcomes, errors

    run = ingest_sequence(params, lake_path, quarantine_path, batch_id, sequential)
    if run.errors:
        raise run.errors[0]
    return run.outcomes


def process_files(files: list[SourceFile], params: IngestParams, staging: Path, quarantine: Path,
                  batch_id: str, storage_options: dict[str, Any] | None, logger: Any = None) -> list[FileOutcome]:
    """Process a batch of files one by one, each isolated (what one ``ingest-batch`` task does)."""
    return [process_isolated(f, params, staging, quarantine, batch_id, storage_options or {}, logger)
            for f in files]


@task(name="ingest-batch", retries=2, retry_delay_seconds=[2, 10], task_run_name="ingest-batch-{index}")
def process_batch(index: int, files: list[SourceFile], params: IngestParams, staging: str,
                  quarantine: str, batch_id: str, storage_options: dict[str, Any]) -> list[FileOutcome]:
    """Read, validate and stage a batch of files as one Dask task (I/O-bound: retried with backoff).

    The Prefect task run lives in the flow's process; the CPU-bound reading and parsing is one plain
    Dask task (:func:`twinflow.runtime.run_on_cluster`), recomputed elsewhere by Dask if its worker is
    lost. Each file is isolated (:func:`process_isolated`): a file that raises is quarantined (or
    deferred) on its own; the retries are for what remains.
    """
    from prefect import get_run_logger

    from twinflow import runtime

    logger = get_run_logger()
    outcomes = runtime.run_on_cluster(process_files, files, params, Path(staging), Path(quarantine), batch_id,
                                      storage_options, key=f"ingest-batch-{index}")
    for o in outcomes:  # the worker logged these too, but its log does not reach the Prefect UI
        if o.reason.startswith("ingest error"):
            logger.warning("%s %s: %s (the other files of the batch went on)", o.path, o.status, o.reason)
    logger.info("batch %d: %d files, %d rows read, %d written, %d quarantined", index, len(files),
                          sum(o.rows_read for o in outcomes), sum(o.rows_written for o in outcomes),
                          sum(o.rows_quarantined for o in outcomes))
    return outcomes
