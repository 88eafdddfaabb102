"""Ingest: landing files into a validated lake, incrementally and idempotently.

Pure functions (:func:`parse_bytes`, :func:`validate_table`, :func:`dataset_name`, ...) turn the bytes of one
source file into a lake table plus quarantined rows; the I/O edges (:func:`list_landing`,
:func:`process_file`, :func:`commit_outcomes`, :class:`Ledger`, :func:`read_lake`,
:func:`write_lake_table`) read the landing folder, stage and publish Parquet files, and keep the ledger.

The lake is one Delta Lake table per dataset (``twinflow/lake.py`` owns its layout). Each commit
appends a batch's rows and replaces those of sources read again in one transaction, so a source that
changes replaces exactly its own rows (idempotent re-ingest) and nothing becomes visible half-written.
The ledger (``<lake>/_ledger.sqlite``) maps each source to its content hash, row counts and status, and
each (dataset, asset, source) to its cycle extent, which makes the duplicate-key check across files cheap.

What a file holds and where it goes comes from the fleet contract (:mod:`twinflow.contract`,
``IngestParams.contract``): its ``datasets`` rules route landing files (:mod:`.route`: event logs,
labels and unmatched files are skipped with why), and its asset key, clock (cycle counter or
timestamps), channels, units, ranges, sentinels and stuck window drive parsing and validation. Each
table keeps its contract; a dataset of another contract is refused before anything is read.
:mod:`.check` is the dry run behind ``twinflow contract check``.

Rows that break the contract (bad keys, unparseable or out-of-range values, duplicate keys) go to the
quarantine dataset ``<quarantine>/rows/dataset=<name>/<file_id>.parquet`` with a reason; files that cannot
be parsed at all are copied to ``<quarantine>/files/<file_id>/`` beside a ``reason.txt``. For every file,
rows read = rows written to the lake + rows quarantined.

Files larger than ``IngestParams.stream_threshold_bytes`` are streamed: hashed in 8 MiB reads, parsed
by pyarrow's streaming readers (``pyarrow.csv.open_csv`` over a decompressing, line-aligned text stream;
``ParquetFile.iter_batches``) and validated ``batch_rows`` rows at a time, with the duplicate-key,
out-of-order and stuck-sensor state carried from batch to batch (:class:`~.validate.FileState`), so that the lake,
the quarantine and the counts are exactly those of reading the file whole. Memory then follows the batch
(plus the few 1 MiB CSV blocks pyarrow reads ahead, or a Parquet row group), plus 16 bytes per kept row for the key
check; an asset whose stuck-sensor verdict needs all its rows (a varying channel with a long unchanged
run, or cycles that go back across batches) is re-read whole from staging once the last batch is in.

Modules, one concept each: :mod:`.names` (dataset and file ids), :mod:`.params` (parameters and
results), :mod:`.route` (which files, which dataset, how to read them), :mod:`.landing` (listing and
reading the landing folder), :mod:`.parse`, :mod:`.validate`,
:mod:`.quarantine`, :mod:`.stage` (atomic staged writes), :mod:`.process` (one file read whole),
:mod:`.stream` (one large file, batch by batch), :mod:`.ledger`, :mod:`.commit` and :mod:`.run` (the
ingest sequence and the Prefect batch task). This package re-exports their public names.
"""

from __future__ import annotations

from twinflow.lake import conform, local_path, read_lake, write_lake_table  # noqa: F401  (the lake API, re-exported since 0.1)
from twinflow.refs import FileRef, LakeSnapshot  # noqa: F401  (part of this module's API since 0.1)
from twinflow.tasks.ingest.names import (  # noqa: F401
    Format,
    dataset_name,
    detect_format,
    file_id,
)
from twinflow.tasks.ingest.params import (  # noqa: F401
    AssetExtent,
    BatchSummary,
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    FileOutcome,
    IngestParams,
    IngestResult,
    SourceFile,
)
from twinflow.tasks.ingest.route import (  # noqa: F401
    Route,
    route_file,
)
from twinflow.tasks.ingest.landing import (  # noqa: F401
    list_landing,
    plan_files,
)
from twinflow.tasks.ingest.stage import (  # noqa: F401
    split_by_asset,
)
from twinflow.tasks.ingest.quarantine import (  # noqa: F401
    read_quarantine,
)
from twinflow.tasks.ingest.validate import (  # noqa: F401
    validate_table,
)
from twinflow.tasks.ingest.parse import (  # noqa: F401
    Parsed,
    WHOLE_BLOCK_BYTES,
    normalise_whitespace,
    parse_bytes,
)
from twinflow.tasks.ingest.stream import (  # noqa: F401
    BLOCK_BYTES,
    CHUNK_BYTES,
)
from twinflow.tasks.ingest.process import (  # noqa: F401
    process_file,
)
from twinflow.tasks.ingest.ledger import (  # noqa: F401
    LEDGER_NAME,
    Ledger,
    latest_snapshot,
)
from twinflow.tasks.ingest.commit import (  # noqa: F401
    LOCK_NAME,
    commit_outcomes,
    lake_lock,
)
from twinflow.tasks.ingest.run import (  # noqa: F401
    IngestRun,
    ingest_sequence,
    process_files,
    STAGING_DIR,
    NothingWritten,
    all_quarantined,
    process_batch,
    run_local,
)

__all__ = [
    "FileRef",
    "IngestRun",
    "ingest_sequence",
    "process_files",
    "conform",
    "read_lake",
    "write_lake_table",
    "LakeSnapshot",
    "Format",
    "dataset_name",
    "detect_format",
    "file_id",
    "AssetExtent",
    "BatchSummary",
    "DEFAULT_EXCLUDE",
    "DEFAULT_INCLUDE",
    "FileOutcome",
    "IngestParams",
    "IngestResult",
    "SourceFile",
    "list_landing",
    "local_path",
    "plan_files",
    "split_by_asset",
    "read_quarantine",
    "validate_table",
    "Parsed",
    "WHOLE_BLOCK_BYTES",
    "normalise_whitespace",
    "parse_bytes",
    "BLOCK_BYTES",
    "CHUNK_BYTES",
    "process_file",
    "LEDGER_NAME",
    "Ledger",
    "latest_snapshot",
    "LOCK_NAME",
    "commit_outcomes",
    "lake_lock",
    "STAGING_DIR",
    "process_batch",
    "run_local",
    "Route",
    "route_file",
    "NothingWritten",
    "all_quarantined",
]
