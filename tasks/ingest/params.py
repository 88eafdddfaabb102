"""The ingest stage's parameters (:class:`IngestParams`) and the records it returns per file, batch and run.
"""

from __future__ import annotations
import hashlib
import json
import re
from typing import Any, Literal
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator
from twinflow.contract import FleetContract, resolve_contract
from twinflow.refs import LakeSnapshot

from twinflow.tasks.ingest.names import COMPRESSION_SUFFIXES, DATA_SUFFIXES, Format

# The file-name globs the ingest stage took before fleet contracts routed files (kept for callers of
# :func:`~twinflow.tasks.ingest.landing.list_landing`); a contract's ``datasets`` rules now decide.
DEFAULT_INCLUDE = tuple(f"*{d}{c}" for d in DATA_SUFFIXES for c in ("", *COMPRESSION_SUFFIXES))


DEFAULT_EXCLUDE = ("rul_*",)


class IngestParams(BaseModel):
    """Parameters of the ingest stage.

    What a landing file holds and where it goes comes from the fleet contract (``contract``): its
    ``datasets`` rules route each file (first matching glob: dataset name or ``{stem}``, format,
    header-less ``columns``, delimiter; kinds ``events``, ``labels`` and ``ignore`` are never parsed as
    telemetry), and its asset key, clock, channels, ranges, sentinels and stuck window decide how rows
    are parsed and validated. The parameters below that repeat a rule's fields override it for every
    file.

    Attributes:
        landing: Landing folder, single file, or fsspec URL (``file://``, ``s3://`` ...).
        contract: The fleet contract: a YAML path or a bundled name (``cmapss``, ``pumps``); None takes
            the settings' ``contract`` (``TWINFLOW_CONTRACT``).
        dataset: Lake dataset for every file; None takes the dataset of the file's contract rule.
        format: Source format for every file; ``auto`` takes the rule's format (whose ``auto`` decides
            per file from its suffix and first bytes). ``text``: header-less whitespace-separated text
            (``cmapss`` is an older name of it).
        columns: Column names of header-less files (contract names or aliases, ``_`` skips a field); None
            takes the rule's ``columns``.
        delimiter: CSV field delimiter; None takes the rule's.
        files_per_batch: Files per Prefect task (a batch runs on one Dask worker).
        allow_missing_channels: Accept files that lack some of the contract's channels (stored as null,
            with a note naming them); by default such a file is quarantined, because an export that
            silently lost a column looks exactly like one. Plants whose files each carry a subset of the
            channels (one file per PLC or per sensor group) set it: a file is then validated against, and
            re-read after contract changes to, only the channels it carries.
        stuck_window: Consecutive identical values after which a normally varying channel is flagged
            stuck; None takes the contract's ``stuck_window``.
        settle_seconds: Files modified less than this long ago are left for the next run (still being
            written).
        lock_timeout_s: How long to wait for another ingest run on the same lake to finish.
        lease_ttl_s: On an object-store lake, how long the ingest lease outlives its holder's last
            renewal (renewed every third of it): a run killed mid-ingest holds the lake this long.
        storage_options: fsspec options for the landing URL (merged over the settings' options).
        include: File-name globs (case-insensitive) of the files to ingest; None lets the contract's rules
            decide alone. A file that ``include`` names but no rule matches is ingested as telemetry (auto
            format, dataset from its name); a rule of another kind still wins (an event log is never
            telemetry).
        exclude: File-name globs never to ingest (None: none).
        fail_on_all_quarantined: A run in which every row of a file, or of the whole run, is quarantined
            fails (after committing, so the quarantine keeps the reasons) with an error naming the top
            reasons; ``twinflow run ingest`` then exits non-zero. False only logs a WARNING and lists the
            problem in :attr:`IngestResult.warnings`.
        stream_threshold_bytes: Files larger than this (on disk, compressed or not) are hashed, parsed and
            validated in batches, so that their memory is bounded by ``batch_rows`` rather than their size;
            smaller files are read whole (faster). Does not change what the lake contains, so it is not
            part of :meth:`digest`.
        batch_rows: Rows per batch when a file is streamed (see ``stream_threshold_bytes``). Not part of
            :meth:`digest` either: any batch size gives the same lake rows, quarantined rows and counts.
        follow_external_links: Ingest files reached through symbolic links whose target is outside the
            landing folder (by default they are skipped with a warning, so a link cannot pull arbitrary
            files into the lake). Not part of :meth:`digest` (it decides which files, not what they hold).
        recent_rows: ``W``, readings per asset kept in each telemetry dataset's recent-rows table
            (``<dataset>__recent``, refreshed after every commit; the health stage reads it instead of
            every asset's files). None: what the health stage needs with the default feature and health
            parameters (``tasks/health/score.recent_rows``: the longest row window plus ten EWM spans
            plus one, at least the anomaly window); the pipeline passes what its own feature params
            need. A champion needing more than ``W`` makes health read the asset files instead (logged).
            Not part of :meth:`digest`: it changes no lake row.
    """

    model_config = ConfigDict(extra="forbid")

    landing: str = Field(min_length=1)
    contract: str | None = None
    dataset: str | None = None
    format: Format = "auto"
    columns: list[str] | None = None
    delimiter: str | None = None
    files_per_batch: int = Field(4, ge=1)
    allow_missing_channels: bool = False
    stuck_window: int | None = Field(None, ge=2)
    settle_seconds: float = Field(0.0, ge=0)
    lock_timeout_s: float = Field(600.0, gt=0)
    lease_ttl_s: float = Field(60.0, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] | None = None
    fail_on_all_quarantined: bool = True
    stream_threshold_bytes: int = Field(64 << 20, ge=1)
    batch_rows: int = Field(1_000_000, ge=1)
    follow_external_links: bool = False
    recent_rows: int | None = Field(None, ge=1)

    _fleet: FleetContract | None = PrivateAttr(None)

    def fleet(self) -> FleetContract:
        """The fleet contract these parameters ingest with (resolved once, then carried with the params).

        Raises:
            ConfigError: the contract cannot be loaded, or ``columns`` names a column it does not declare.
        """
        if self._fleet is None:
            contract = resolve_contract(self.contract)
            if self.columns is not None:
                unknown = [c for c in self.columns if c != "_" and contract.canonical_name(c) is None]
                if unknown:
                    from twinflow.errors import ConfigError

                    raise ConfigError(f"unknown column name(s) {unknown}: contract {contract.name!r} "
                                      f"v{contract.version} does not declare them (asset "
                                      f"{contract.asset.column!r}, clock {contract.clock.key!r}, channels "
                                      f"{', '.join(contract.channel_names[:6])}...); use '_' to skip a field")
            self._fleet = contract
        return self._fleet

    def window(self) -> int:
        """The stuck-sensor window: this parameter, else the contract's."""
        return self.stuck_window or self.fleet().stuck_window

    def digest(self, dataset: str, fmt: str = "auto", columns: list[str] | None = None, delimiter: str = ",",
               channels: list[str] | None = None) -> str:
        """Fingerprint of everything that changes what a file parses into: how it is read (its route:
        ``fmt``, ``columns``, ``delimiter``, ``dataset``), the parameters that change validation, and the
        contract's validation digest restricted to the ``channels`` the file holds (all: None).

        A file whose content is unchanged is read again when this changes (e.g. after fixing the
        delimiter, or widening the valid range of a channel it carries: files without that channel stay).
        """
        contract = self.fleet()
        relevant = {"format": fmt, "columns": columns, "delimiter": delimiter, "dataset": dataset,
                    "allow_missing_channels": self.allow_missing_channels, "stuck_window": self.window(),
                    "contract": contract.name, "validation": contract.validation_digest(channels)}
        return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # A named contract and header-less column names are checked at once: a typo costs a second, not a
    # server start. (The settings' contract is resolved when the stage runs.)
    @field_validator("contract")
    @classmethod
    def _loadable(cls, v: str | None) -> str | None:
        if v is not None:
            resolve_contract(v)
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is not None and "contract" in info.data:
            contract = resolve_contract(info.data["contract"])
            unknown = [c for c in v if c != "_" and contract.canonical_name(c) is None]
            if unknown:
                raise ValueError(f"unknown column name(s) {unknown}: contract {contract.name!r} v{contract.version} "
                                 f"does not declare them (asset {contract.asset.column!r}, clock "
                                 f"{contract.clock.key!r}, channels {', '.join(contract.channel_names[:6])}...); "
                                 "use '_' to skip a field")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,99}", v):
            raise ValueError("dataset must be at most 100 lower-case letters, digits, '_' or '-' "
                             "(e.g. 'train_fd001')")
        return v

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 1 or v in "\r\n\""):
            raise ValueError("delimiter must be one character other than a quote or newline")
        return v


def recent_window(params: IngestParams) -> int:
    """``W`` of the recent-rows tables a run refreshes: ``params.recent_rows``, else what the health
    stage reads with the default feature and health parameters (``tasks/health/score.recent_rows``).
    The workers cut each file's per-asset tails to it, the committer refreshes with it."""
    if params.recent_rows is not None:
        return params.recent_rows
    from twinflow.tasks.features.params import FeatureParams
    from twinflow.tasks.health.params import HealthParams
    from twinflow.tasks.health.score import recent_rows

    return recent_rows(FeatureParams(), HealthParams())


class SourceFile(BaseModel):
    """A landing file as listed: its identity for the ledger is ``path``."""

    path: str
    size: int
    mtime_ns: int


class AssetExtent(BaseModel):
    """Rows and time range one source contributes to one asset (cycles, or timestamps in µs since the
    epoch for timestamp clocks)."""

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
    # The contract channels the file holds (None: unknown, e.g. the file could not be parsed): its
    # params digest covers only these, so a contract change re-reads only files it affects.
    channels: list[str] | None = None
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
    # Landing files not ingested, with why: event logs, labels, ignored files, files no contract rule
    # matches (they are not in the ledger: each run lists them again).
    skipped: dict[str, str] = Field(default_factory=dict)
    # Problems that did not fail the run (e.g. every row quarantined, with fail_on_all_quarantined=False).
    warnings: list[str] = Field(default_factory=list)
    # Event logs read (every run: they are small and re-validated against the grown telemetry).
    events: list["EventLogOutcome"] = Field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return sum(b.rows_read for b in self.batches)

    @property
    def rows_written(self) -> int:
        return sum(b.rows_written for b in self.batches)

    @property
    def rows_quarantined(self) -> int:
        return sum(b.rows_quarantined for b in self.batches)


from twinflow.tasks.ingest.events import EventLogOutcome  # noqa: E402 - events imports this module's peers

IngestResult.model_rebuild()
