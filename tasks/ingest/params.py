"""The ingest stage's parameters (:class:`IngestParams`) and the records it returns per file, batch and run.
"""

from __future__ import annotations
import hashlib
import json
import re
from typing import Any, Literal
from pydantic import BaseModel, ConfigDict, Field, field_validator
from twinflow import contracts as C
from twinflow.refs import LakeSnapshot

from twinflow.tasks.ingest.names import COMPRESSION_SUFFIXES, DATA_SUFFIXES, Format

DEFAULT_INCLUDE = tuple(f"*{d}{c}" for d in DATA_SUFFIXES for c in ("", *COMPRESSION_SUFFIXES))


DEFAULT_EXCLUDE = ("rul_*",)


class IngestParams(BaseModel):
    """Parameters of the ingest stage.

    Attributes:
        landing: Landing folder, single file, or fsspec URL (``file://``, ``s3://`` ...).
        dataset: Lake dataset for every file; None derives it per file from its name
            (``train_FD001.txt.gz`` -> ``train_fd001``).
        format: Source format; ``auto`` decides per file from its suffix and first bytes.
        columns: Column names for header-less CSV files (canonical names or aliases such as ``unit``).
        delimiter: CSV field delimiter.
        files_per_batch: Files per Prefect task (a batch runs on one Dask worker).
        allow_missing_channels: Accept files that lack some channels (stored as null); by default such a
            file is quarantined.
        stuck_window: Consecutive identical values after which a normally varying channel is flagged stuck.
        settle_seconds: Files modified less than this long ago are left for the next run (still being
            written).
        lock_timeout_s: How long to wait for another ingest run on the same lake to finish.
        storage_options: fsspec options for the landing URL (merged over the settings' options).
        include: File-name globs (case-insensitive) of the files to ingest; other files are ignored.
        exclude: File-name globs to skip; by default C-MAPSS ground-truth ``RUL_*`` files, which are
            labels read by the train stage, not telemetry.
        stream_threshold_bytes: Files larger than this (on disk, compressed or not) are hashed, parsed and
            validated in batches, so that their memory is bounded by ``batch_rows`` rather than their size;
            smaller files are read whole (faster). Does not change what the lake contains, so it is not
            part of :meth:`digest`.
        batch_rows: Rows per batch when a file is streamed (see ``stream_threshold_bytes``). Not part of
            :meth:`digest` either: any batch size gives the same lake rows, quarantined rows and counts.
        follow_external_links: Ingest files reached through symbolic links whose target is outside the
            landing folder (by default they are skipped with a warning, so a link cannot pull arbitrary
            files into the lake). Not part of :meth:`digest` (it decides which files, not what they hold).
    """

    model_config = ConfigDict(extra="forbid")

    landing: str = Field(min_length=1)
    dataset: str | None = None
    format: Format = "auto"
    columns: list[str] | None = None
    delimiter: str = ","
    files_per_batch: int = Field(4, ge=1)
    allow_missing_channels: bool = False
    stuck_window: int = Field(20, ge=2)
    settle_seconds: float = Field(0.0, ge=0)
    lock_timeout_s: float = Field(600.0, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    stream_threshold_bytes: int = Field(64 << 20, ge=1)
    batch_rows: int = Field(1_000_000, ge=1)
    follow_external_links: bool = False

    def digest(self, dataset: str) -> str:
        """Fingerprint of everything that changes what a file of ``dataset`` parses into (params, contract).

        A file whose content is unchanged is read again when this changes (e.g. after fixing the
        delimiter, or widening a valid range in ``twinflow/contracts.py``).
        """
        relevant = self.model_dump(include={"format", "columns", "delimiter", "allow_missing_channels",
                                            "stuck_window"})
        relevant["dataset"] = dataset
        contract = [(s.name, s.low, s.high) for s in C.CHANNEL_SPECS.values()], C.SENTINELS, C.CYCLE_RANGE
        return hashlib.sha1(json.dumps([relevant, contract], sort_keys=True, default=str).encode()).hexdigest()[:16]

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,99}", v):
            raise ValueError("dataset must be at most 100 lower-case letters, digits, '_' or '-' "
                             "(e.g. 'train_fd001')")
        return v

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1 or v in "\r\n\"":
            raise ValueError("delimiter must be one character other than a quote or newline")
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            unknown = [c for c in v if C.canonical_name(c) is None and c != "_"]
            if unknown:
                raise ValueError(f"unknown column name(s) {unknown}; use canonical names "
                                 f"({C.ASSET}, {C.TIME}, op_setting_1..3, s1..s21) or '_' to skip a column")
        return v


class SourceFile(BaseModel):
    """A landing file as listed: its identity for the ledger is ``path``."""

    path: str
    size: int
    mtime_ns: int


class AssetExtent(BaseModel):
    """Rows and cycle range one source contributes to one asset."""

    rows: int
    tmin: int
    tmax: int


class FileOutcome(BaseModel):
    """What processing one source file produced (returned by the batch task, committed by the flow)."""

    source: str
    dataset: str
    file_id: str
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    format: str = ""
    params_digest: str = ""
    status: Literal["ingested", "quarantined", "deferred", "unchanged", "duplicate"] = "ingested"
    reason: str = ""
    rows_read: int = 0
    # False when the file could not be read to its end (corrupt gzip, unreadable Parquet, an ingest
    # error): rows_read is then a lower bound or 0 for unknown, and ``reason`` says which ("rows: ...").
    rows_read_exact: bool = True
    rows_written: int = 0
    rows_quarantined: int = 0
    flagged: dict[str, int] = Field(default_factory=dict)
    assets: dict[str, AssetExtent] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    staged: str | None = None  # staging folder of this file's lake/quarantine files

    @property
    def conserved(self) -> bool:
        return self.rows_read == self.rows_written + self.rows_quarantined


def with_rows_note(reason: str, note: str) -> str:
    """A file-level reason plus how its rows were counted when they could not all be read."""
    return f"{reason}; {note}" if note else reason


class BatchSummary(BaseModel):
    """Conservation numbers of one batch of files (one Prefect task)."""

    index: int
    files: list[str]
    rows_read: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    files_ingested: int = 0
    files_quarantined: int = 0
    files_skipped: int = 0
    files_deferred: int = 0

    @property
    def conserved(self) -> bool:
        return self.rows_read == self.rows_written + self.rows_quarantined


class IngestResult(BaseModel):
    """Result of an ingest run: lake snapshots per dataset plus per-batch conservation numbers."""

    batch_id: str
    snapshots: dict[str, LakeSnapshot] = Field(default_factory=dict)
    batches: list[BatchSummary] = Field(default_factory=list)
    files: list[FileOutcome] = Field(default_factory=list)
    unchanged: int = 0

    @property
    def rows_read(self) -> int:
        return sum(b.rows_read for b in self.batches)

    @property
    def rows_written(self) -> int:
        return sum(b.rows_written for b in self.batches)

    @property
    def rows_quarantined(self) -> int:
        return sum(b.rows_quarantined for b in self.batches)
