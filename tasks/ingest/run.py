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
from twinflow.errors import ServiceUnavailable, TwinflowError
from twinflow.refs import LakeSnapshot
from twinflow.tasks.ingest.commit import commit_outcomes, lake_lock
from twinflow.tasks.ingest.landing import list_landing, plan_files
from twinflow.tasks.ingest.ledger import open_ledger
from twinflow.tasks.ingest.params import FileOutcome, IngestParams, SourceFile, recent_window
from twinflow.tasks.ingest.process import process_file
from twinflow.tasks.ingest.quarantine import quarantine_after_error, summarise_kinds
from twinflow.tasks.ingest.route import route_file

STAGING_DIR = "_staging"
log = logging.getLogger("twinflow.ingest")

#: Processes batches of files into outcomes, staging under the given folder (a local path, or an
#: object-store prefix for a lake on one: :func:`process_files`); returns the outcomes of the batches
#: that worked and the errors of those that failed (their files are not recorded).
ProcessBatches = Callable[[list[list[SourceFile]], Path | str], tuple[list[FileOutcome], list[BaseException]]]


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


def ingest_sequence(params: IngestParams, lake_path: str, quarantine_path: str, batch_id: str,
                    process_batches: ProcessBatches, storage_options: dict[str, Any] | None = None,
                    on_plan: Callable[[IngestRun], None] | None = None,
                    shared_staging: bool | None = None) -> IngestRun:
    """Ingest the landing folder once, under the lake's ingest lock.

    The lake may be local or on an object store (``s3://``; ``storage_options`` in delta-rs keys):
    there the lock is a lease in the lake and the ledger a file in the lake (see :func:`lake_lock`,
    :func:`~twinflow.tasks.ingest.ledger.open_ledger`), so ingest runs on several hosts take turns and
    each starts from what the last one committed; staging is then under the lake's prefix
    (:func:`twinflow.lake.staging_uri`), where the workers on any host upload what they staged and this
    host fetches it to commit, and the quarantine may be on the store too. ``shared_staging=False``
    keeps an object-store lake's staging in this host's temporary folder instead, for callers whose
    batches run on this host (in this process, or on a ``LocalCluster``): it saves the round trip.

    Steps: settle a crashed run's commit (:meth:`Ledger.recover`) and its staging leftovers; list the
    landing files and route them by the fleet contract (event logs, labels and files no rule matches are
    skipped, with why, in :attr:`IngestRun.skipped`); refuse, before reading anything, a dataset whose
    table holds another contract's data; diff the telemetry files against the ledger by size, mtime and
    params digest (unchanged files are not read); process the others in batches of ``files_per_batch``;
    commit the outcomes of the batches that worked (:func:`commit_outcomes`); record the batch; refresh
    the recent-rows table of every dataset the landing files feed (:func:`twinflow.lake.refresh_recent`,
    ``W`` from :func:`recent_window`; the assets a commit only added rows to are answered from the tails
    the workers staged, not read again) and take its snapshot. A failed batch's files are not recorded, so the
    next run reads them again.

    Raises:
        ConfigError: the contract cannot be loaded, or a dataset's table holds another contract's data
            (nothing is read or written).
    """
    so = params.storage_options if storage_options is None else storage_options
    contract = params.fleet()
    remote = not lk.is_local(lake_path)
    quarantine = quarantine_root(quarantine_path)
    started = time.time()
    with contextlib.ExitStack() as stack:
        lease = stack.enter_context(lake_lock(lake_path, params.lock_timeout_s, so, params.lease_ttl_s))
        check = lease.check if lease is not None else None
        ledger = stack.enter_context(open_ledger(lake_path, so, check=check))
        # An object-store lake's staging is under its prefix (workers on any host upload there) and
        # fetched to this host's temporary folder for the commit; a local lake's lives beside its tables.
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="twinflow-ingest-"))) if remote \
            else lk.local_path(lake_path)
        ledger.recover(lake_path)
        shutil.rmtree(root / STAGING_DIR, ignore_errors=True)  # leftovers of a crashed run
        if remote:  # under the lease: no other run is staging now
            lk.remove_tree(lk.meta_uri(lake_path, lk.STAGING), so)
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
        shared = lk.staging_uri(lake_path, batch_id) if remote and shared_staging is not False else None
        results, run.errors = process_batches(run.batches, shared or staging) if run.batches else ([], [])
        if shared is not None:
            results = fetch_staged(results, shared, staging, so)
        added: dict[str, lk.RecentTails] = {}
        run.outcomes = commit_outcomes(results, ledger, lake_path, quarantine, batch_id, contract,
                                       before_commit=check, tails=added)
        shutil.rmtree(staging, ignore_errors=True)
        if shared is not None:
            lk.remove_tree(shared, so)
        ledger.record_batch(batch_id, started, run.outcomes, "failed" if run.errors else "completed")
        listed = {f.path for f in files}
        names = {row["dataset"] for src, row in ledger.files().items() if src in listed}
        window = recent_window(params)
        for name in sorted(names | {o.dataset for o in run.outcomes}):
            # Still under the lock: one refresh per telemetry version (a no-op when it is current),
            # from the tails the workers cut where the commit only added rows. The rows are committed
            # already; a table that cannot be refreshed only makes health read the asset files (it
            # sees the table is stale), so it is not this run's failure.
            try:
                lk.refresh_recent(lake_path, name, window, so, new=added.get(name))
            except Exception as exc:  # noqa: BLE001 - logged; the next run refreshes it
                log.warning("ingest: recent-rows table of %s not refreshed (%s); health reads the asset "
                            "files until a later run refreshes it", name, exc)
            snap = ledger.snapshot(lake_path, name)
            if snap is not None:
                # A table written before contracts has none stored: it is read with this run's.
                run.snapshots[name] = snap if snap.contract is not None else \
                    snap.model_copy(update={"contract": contract})
    return run


def quarantine_root(quarantine_path: str) -> Path | str:
    """The quarantine: a local folder (resolved), or an object-store URL kept as it is (the commit
    uploads to it; an ``s3://`` lake's default is its ``_quarantine`` prefix)."""
    return lk.local_path(quarantine_path) if lk.is_local(quarantine_path) else quarantine_path.rstrip("/")


def fetch_staged(outcomes: list[FileOutcome], shared: str, local: Path,
                 storage_options: dict[str, Any] | None) -> list[FileOutcome]:
    """Bring what the workers staged under the lake's prefix ``shared`` to this host's ``local``
    staging folder, for the commit (which reads, may rewrite, and publishes the staged files).

    A staged folder that is missing (its upload was lost) fails the run before anything is committed:
    the ledger has not recorded those files, so the next run reads them again.
    """
    out = []
    for o in outcomes:
        if o.staged and o.staged.startswith(shared + "/"):
            dest = local / o.staged[len(shared) + 1:]
            if not lk.get_tree(o.staged, dest, storage_options):
                raise ServiceUnavailable(f"ingest: the staged output of {o.source} is missing at {o.staged}; "
                                         "nothing was committed, run the ingest again")
            o = o.model_copy(update={"staged": str(dest)})
        out.append(o)
    return out


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
    quarantine = quarantine_root(quarantine_path)

    def sequential(batches: list[list[SourceFile]], staging: Path | str):
        outcomes, errors = [], []
        for b in batches:
            try:
                outcomes.extend(process_files(b, params, staging, quarantine, batch_id, params.storage_options))
            except Exception as exc:  # noqa: BLE001 - commit what worked, as the flow does
                errors.append(exc)
        return outcomes, errors

    # Every batch runs in this process: staging needs no trip through an object store.
    run = ingest_sequence(params, lake_path, quarantine_path, batch_id, sequential, shared_staging=False)
    if run.errors:
        raise run.errors[0]
    return run.outcomes


def process_files(files: list[SourceFile], params: IngestParams, staging: Path | str, quarantine: Path | str,
                  batch_id: str, storage_options: dict[str, Any] | None, logger: Any = None,
                  staging_options: dict[str, Any] | None = None) -> list[FileOutcome]:
    """Process a batch of files one by one, each isolated (what one ``ingest-batch`` task does).

    ``staging`` on an object store (an ``s3://`` lake's :func:`~twinflow.lake.staging_uri`): each file is
    staged in a local temporary folder, then uploaded under that prefix (each object one PUT) with
    ``staging_options`` (the lake's; default ``storage_options``, the landing's), and its outcome names
    the uploaded folder, so the committing host may be another one.
    """
    so = storage_options or {}
    if lk.is_local(str(staging)):
        return [process_isolated(f, params, Path(staging), Path(quarantine), batch_id, so, logger) for f in files]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="twinflow-stage-") as tmp:
        for f in files:
            # The workers never write the quarantine itself (the commit publishes it): any root will do.
            o = process_isolated(f, params, Path(tmp), Path(tmp) / "quarantine", batch_id, so, logger)
            if o.staged:
                folder = Path(o.staged)
                uri = f"{staging}/{folder.relative_to(tmp).as_posix()}"
                lk.put_tree(folder, uri, so if staging_options is None else staging_options)
                shutil.rmtree(folder, ignore_errors=True)
                o.staged = uri
            outcomes.append(o)
    return outcomes


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
    outcomes = runtime.run_on_cluster(process_files, files, params, staging, quarantine, batch_id,
                                      storage_options, key=f"ingest-batch-{index}")
    for o in outcomes:  # the worker logged these too, but its log does not reach the Prefect UI
        if o.reason.startswith("ingest error"):
            logger.warning("%s %s: %s (the other files of the batch went on)", o.path, o.status, o.reason)
    logger.info("batch %d: %d files, %d rows read, %d written, %d quarantined", index, len(files),
                          sum(o.rows_read for o in outcomes), sum(o.rows_written for o in outcomes),
                          sum(o.rows_quarantined for o in outcomes))
    return outcomes
