"""The ingest sequence (plan -> process -> commit) and the Prefect task that processes one batch of files.
"""

from __future__ import annotations
import shutil
from pathlib import Path
from typing import Any
from prefect import task

from twinflow.tasks.ingest.commit import commit_outcomes, lake_lock
from twinflow.tasks.ingest.landing import list_landing, local_path, plan_files
from twinflow.tasks.ingest.ledger import Ledger
from twinflow.tasks.ingest.params import FileOutcome, IngestParams, SourceFile
from twinflow.tasks.ingest.process import process_file
from twinflow.tasks.ingest.quarantine import quarantine_after_error

STAGING_DIR = "_staging"


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

    Same plan, processing and commit as the ``ingest`` flow, under the same lake lock.
    """
    lake, quarantine = local_path(lake_path), local_path(quarantine_path)
    with lake_lock(lake, params.lock_timeout_s):
        ledger = Ledger(lake)
        try:
            files = list_landing(params.landing, params.storage_options, params.include, params.exclude,
                                 params.follow_external_links)
            todo, _ = plan_files(files, ledger.files(), params)
            staging = lake / STAGING_DIR / batch_id
            outcomes = [process_isolated(f, params, staging, quarantine, batch_id, params.storage_options)
                        for f in todo]
            done = commit_outcomes(outcomes, ledger, lake, quarantine, batch_id)
            shutil.rmtree(staging, ignore_errors=True)
            return done
        finally:
            ledger.close()


@task(name="ingest-batch", retries=2, retry_delay_seconds=[2, 10], task_run_name="ingest-batch-{index}")
def process_batch(index: int, files: list[SourceFile], params: IngestParams, staging: str,
                  quarantine: str, batch_id: str, storage_options: dict[str, Any]) -> list[FileOutcome]:
    """Read, validate and stage a batch of files on one Dask worker (I/O-bound: retried with backoff).

    Each file is isolated (:func:`process_isolated`): a file that raises is quarantined (or deferred) on
    its own; the retries are for what remains, such as losing the worker.
    """
    from prefect import get_run_logger

    logger = get_run_logger()
    outcomes = [process_isolated(f, params, Path(staging), Path(quarantine), batch_id, storage_options, logger)
                for f in files]
    logger.info("batch %d: %d files, %d rows read, %d written, %d quarantined", index, len(files),
                          sum(o.rows_read for o in outcomes), sum(o.rows_written for o in outcomes),
                          sum(o.rows_quarantined for o in outcomes))
    return outcomes
