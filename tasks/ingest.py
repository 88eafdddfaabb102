"""Ingest: landing files into a validated, hive-partitioned Parquet lake, incrementally and idempotently.

Pure functions (:func:`parse_bytes`, :func:`validate_table`, :func:`dataset_name`, ...) turn the bytes of one
source file into a lake table plus quarantined rows; the I/O edges (:func:`list_landing`,
:func:`process_file`, :func:`commit_outcomes`, :class:`Ledger`, :func:`read_lake`,
:func:`write_lake_table`) read the landing folder, stage and publish Parquet files, and keep the ledger.

Lake layout: ``<lake>/dataset=<name>/asset=<asset_id>/<file_id>.parquet`` where ``file_id`` is derived from
the source path, so a source that changes replaces exactly its own rows (idempotent re-ingest), and rows of
one source never become visible half-written (temp name + atomic rename). The ledger
(``<lake>/_ledger.sqlite``) maps each source to its content hash, row counts and status, and each
(dataset, asset, source) to its cycle extent, which makes the duplicate-key check across files cheap.

Rows that break the contract (bad keys, unparseable or out-of-range values, duplicate keys) go to the
quarantine dataset ``<quarantine>/rows/dataset=<name>/<file_id>.parquet`` with a reason; files that cannot
be parsed at all are copied to ``<quarantine>/files/<file_id>/`` beside a ``reason.txt``. For every file,
rows read = rows written to the lake + rows quarantined.

Files larger than ``IngestParams.stream_threshold_bytes`` are streamed: hashed in 8 MiB reads, parsed
by pyarrow's streaming readers (``pyarrow.csv.open_csv`` over a decompressing, line-aligned text stream;
``ParquetFile.iter_batches``) and validated ``batch_rows`` rows at a time, with the duplicate-key,
out-of-order and stuck-sensor state carried from batch to batch (:class:`_FileState`), so that the lake,
the quarantine and the counts are exactly those of reading the file whole. Memory then follows the batch
(plus the few 1 MiB CSV blocks pyarrow reads ahead, or a Parquet row group), plus 16 bytes per kept row for the key
check; an asset whose stuck-sensor verdict needs all its rows (a varying channel with a long unchanged
run, or cycles that go back across batches) is re-read whole from staging once the last batch is in.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator
from prefect import task

from twinflow import contracts as C
from twinflow.errors import AlreadyRunning, ConfigError
from twinflow.refs import FileRef, LakeSnapshot

log = logging.getLogger("twinflow.ingest")

Format = Literal["auto", "csv", "parquet", "cmapss"]
_COMPRESSION_SUFFIXES = (".gz", ".gzip")
_DATA_SUFFIXES = (".txt", ".csv", ".parquet", ".pq", ".dat", ".tsv")
# Names a writer uses while a file is in flight, and bookkeeping files: never ingested.
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~", ".lock")
DEFAULT_INCLUDE = tuple(f"*{d}{c}" for d in _DATA_SUFFIXES for c in ("", *_COMPRESSION_SUFFIXES))
DEFAULT_EXCLUDE = ("rul_*",)
LEDGER_NAME = "_ledger.sqlite"
LOCK_NAME = "_ingest.lock"
STAGING_DIR = "_staging"
# Why a file is left for the next run (the whole-file and streamed readers say the same).
_DISAPPEARED = "file disappeared before it was read"
_CHANGED = "file changed while it was read (still being written?)"


# --- Parameters and results ----------------------------------------------------------------------


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
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", v):
            raise ValueError("dataset must be lower-case letters, digits, '_' or '-' (e.g. 'train_fd001')")
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
    rows_written: int = 0
    rows_quarantined: int = 0
    flagged: dict[str, int] = Field(default_factory=dict)
    assets: dict[str, AssetExtent] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    staged: str | None = None  # staging folder of this file's lake/quarantine files

    @property
    def conserved(self) -> bool:
        return self.rows_read == self.rows_written + self.rows_quarantined


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


# --- Naming --------------------------------------------------------------------------------------


def dataset_name(path: str) -> str:
    """Dataset name derived from a file name: lower-cased stem without data/compression suffixes.

    ``train_FD001.txt.gz`` -> ``train_fd001``; characters outside ``[a-z0-9_-]`` become ``_``.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffixes in (_COMPRESSION_SUFFIXES, _DATA_SUFFIXES):
        for s in suffixes:
            if name.endswith(s):
                name = name[: -len(s)]
                break
    name = re.sub(r"[^a-z0-9_\-]", "_", name).strip("_-") or "data"
    return name


def file_id(source: str) -> str:
    """Stable id of a source path: the lake file name of its rows (so re-ingest replaces, never duplicates)."""
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def asset_dir(asset: str) -> str:
    """Hive partition directory of an asset (URI-escaped, as pyarrow's hive partitioning decodes it)."""
    return f"asset={quote(asset, safe='')}"


def detect_format(name: str, head: bytes, declared: Format = "auto") -> str:
    """Decide how to parse a file: ``declared`` unless ``auto``, else by suffix, else by its first bytes."""
    if declared != "auto":
        return declared
    lower = name.lower()
    for s in _COMPRESSION_SUFFIXES:
        lower = lower.removesuffix(s)
    if lower.endswith((".parquet", ".pq")) or head[:4] == b"PAR1":
        return "parquet"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".txt", ".dat")):
        return "cmapss"
    first = head.split(b"\n", 1)[0]
    return "csv" if b"," in first or b";" in first else "cmapss"


# --- Parsing: bytes -> canonical typed table ----------------------------------------------------


class Parsed(BaseModel):
    """A parsed source: typed canonical columns plus rows that could not be parsed."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    table: pa.Table | None = None  # canonical columns present in the source, plus "record"
    reasons: dict[int, str] = Field(default_factory=dict)  # row -> reason (cells that did not convert)
    bad_rows: list[tuple[str, str]] = Field(default_factory=list)  # (reason, raw text) of unparseable rows
    file_error: str | None = None
    rows_read: int = 0
    notes: list[str] = Field(default_factory=list)


_TYPES = {C.ASSET: pa.string(), C.TIME: pa.int64(), C.TIMESTAMP: pa.timestamp("us", tz="UTC"),
          **{c: pa.float64() for c in C.CHANNELS}}


_NON_BLANK = re.compile(rb"\S")


def _count_lines(data: bytes) -> int:
    # Rows the source holds as far as a reader can tell: non-blank lines.
    return sum(1 for line in data.splitlines() if line.strip())


def _decompress(data: bytes, name: str) -> bytes:
    if data[:2] == b"\x1f\x8b" or name.lower().endswith(_COMPRESSION_SUFFIXES):
        return gzip.decompress(data)
    return data


def _normalise_whitespace(data: bytes) -> bytes:
    # C-MAPSS files separate fields by runs of spaces and end lines with trailing spaces: make
    # them single-space separated so that the CSV reader counts fields exactly.
    # bytes.replace runs at memory speed; a regex over every separator is ~50x slower.
    data = data.replace(b"\t", b" ").replace(b"\r\n", b"\n")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.replace(b" \n", b"\n").replace(b"\n ", b"\n").strip(b" ")


def _is_utf8_error(exc: Exception) -> bool:
    return "utf8" in str(exc).lower() or "utf-8" in str(exc).lower()


def _coerce(col: pa.ChunkedArray | pa.Array, name: str) -> tuple[pa.Array, np.ndarray]:
    """Cast a string column to its canonical type; return the values and a mask of unparseable cells."""
    import pandas as pd

    s = pd.Series(col.to_pylist(), dtype=object)
    stripped = s.map(lambda v: v.strip() if isinstance(v, str) else v)
    blank = stripped.isna() | stripped.isin(["", "nan", "NaN", "NA", "N/A", "null", "NULL", "-nan"])
    if name == C.ASSET:
        return pa.array(stripped.where(~stripped.isna(), None).tolist(), pa.string()), np.zeros(len(s), bool)
    if name == C.TIMESTAMP:
        ts = pd.to_datetime(stripped.where(~blank, None), utc=True, errors="coerce")
        bad = (ts.isna() & ~blank).to_numpy()
        return pa.array(ts, pa.timestamp("us", tz="UTC")), bad
    num = pd.to_numeric(stripped.where(~blank, None), errors="coerce").astype("float64")
    bad = (num.isna() & ~blank).to_numpy()
    if name == C.TIME:
        nonint = (~num.isna() & (num != np.floor(num))).to_numpy()
        bad = bad | nonint
        vals = num.to_numpy()
        ok = ~np.isnan(vals) & ~bad & (np.abs(np.nan_to_num(vals)) < 2**62)
        out = np.zeros(len(vals), np.int64)
        out[ok] = vals[ok].astype(np.int64)
        return pa.array(out, pa.int64(), mask=~ok), bad
    return pa.array(num.to_numpy(), pa.float64(), from_pandas=True), bad


def _canonicalise(table: pa.Table, names: list[str], allow_missing: bool, type_errors: bool,
                  notes: list[str], offset: int = 0) -> tuple[pa.Table | None, dict[int, str] | None, str | None]:
    """Rename source columns to canonical names, check required ones, cast (string fallback).

    ``offset`` numbers the rows (``record``) of a batch that does not start the file."""
    mapping: dict[str, str] = {}
    ignored = []
    for src in names:
        canon = C.canonical_name(src) if src != "_" else None
        if canon is None:
            if src != "_":
                ignored.append(src)
            continue
        if canon in mapping.values():
            return None, None, f"two columns map to {canon!r}: fix the header"
        mapping[src] = canon
    missing_keys = [k for k in (C.ASSET, C.TIME) if k not in mapping.values()]
    if missing_keys:
        hint = ""
        if len(names) == 1:
            hint = f" (the header has a single column {names[0][:40]!r}: wrong delimiter?)"
        return None, None, f"missing required column(s) {', '.join(missing_keys)}{hint}"
    missing = [c for c in C.CHANNELS if c not in mapping.values()]
    if missing and not allow_missing:
        return None, None, (f"missing channel column(s) {', '.join(missing)} "
                            "(set allow_missing_channels=True to accept them as null)")
    if missing:
        notes.append(f"missing channels stored as null: {', '.join(missing)}")
    if ignored:
        notes.append(f"ignored columns not in the contract: {', '.join(ignored)}")
    n = table.num_rows
    reasons: dict[int, str] = {}
    cols, out_names = [], []
    for src, canon in mapping.items():
        col = table.column(src)
        if canon == C.ASSET:
            arr = pc.utf8_trim_whitespace(pc.cast(col, pa.string())).combine_chunks()
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or type_errors:
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                arr, bad = _coerce(col, canon)
            else:
                arr, bad = col.combine_chunks().cast(_TYPES[canon]), np.zeros(n, bool)
            if bad.any():
                raw = col.to_pylist()
                for i in np.flatnonzero(bad):
                    reasons.setdefault(int(i), f"non-numeric value in {canon}: {str(raw[i])[:40]!r}")
        else:
            try:
                arr = pc.cast(col, _TYPES[canon]) if canon != C.ASSET else pc.cast(col, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                arr, bad = _coerce(col.cast(pa.string()), canon)
                for i in np.flatnonzero(bad):
                    reasons.setdefault(int(i), f"value of {canon} not convertible to {_TYPES[canon]}")
        cols.append(arr)
        out_names.append(canon)
    cols.append(pa.array(np.arange(offset, offset + n, dtype=np.int64)))
    out_names.append("record")
    return pa.Table.from_arrays(cols, names=out_names), reasons, None


def _source_columns(names: list[str], fmt: str) -> tuple[list[str], set[str]]:
    """A text source's column names with C-MAPSS aliases applied, and those the contract knows."""
    names = ["cycle" if n == "cycle" else ("asset_id" if n == "unit" and fmt == "cmapss" else n)
             for n in names]
    return names, {n for n in names if n != "_" and C.canonical_name(n) is not None}


class _BadRows:
    """pyarrow's ``invalid_row_handler``: skips rows with a wrong field count, recording why and their text."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []  # (reason, raw text)
        self.actual: list[int] = []  # field count of each such row

    def __call__(self, row: Any) -> str:
        self.actual.append(row.actual_columns)
        self.rows.append((f"expected {row.expected_columns} fields, got {row.actual_columns}"
                          + (" (truncated line?)" if row.actual_columns < row.expected_columns else ""),
                          row.text[:500]))
        return "skip"


def parse_bytes(data: bytes, name: str, fmt: Format = "auto", columns: list[str] | None = None,
                delimiter: str = ",", allow_missing_channels: bool = False) -> Parsed:
    """Parse the bytes of one source file into canonical typed columns.

    Never raises for bad content: problems come back as ``file_error`` (the whole file is unusable) or
    as row-level reasons (``bad_rows`` for rows with a wrong field count, ``reasons`` for cells that do not
    convert).

    Args:
        data: File content, possibly gzip-compressed.
        name: File name (for format detection and messages).
        fmt: Declared format or ``auto``.
        columns: Column names of a header-less CSV.
        delimiter: CSV delimiter.
        allow_missing_channels: Accept sources that lack some channels.
    """
    if not data:
        return Parsed(file_error="empty file")
    try:
        raw = _decompress(data, name)
    except (OSError, EOFError, zlib.error) as exc:
        return Parsed(file_error=f"corrupt gzip stream ({exc.__class__.__name__}: {str(exc)[:80]})")
    fmt = detect_format(name, raw[:8], fmt)
    if fmt == "parquet":
        return _parse_parquet(raw, allow_missing_channels)
    if not raw.strip():
        return Parsed(file_error="empty file")
    header = fmt == "csv" and columns is None
    if fmt == "cmapss":
        raw, delim, names = _normalise_whitespace(raw), " ", list(C.CMAPSS_COLUMNS)
        if columns is not None:
            names = columns
    else:
        delim = delimiter
        names = columns
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Parsed(file_error=f"not valid UTF-8 text (byte {exc.start})",
                          rows_read=max(_count_lines(raw) - header, 0))
    if header:
        first = raw.split(b"\n", 1)[0].rstrip(b"\r")
        try:
            names = [h.strip().strip('"') for h in first.decode("utf-8").split(delim)]
        except UnicodeDecodeError:
            return Parsed(file_error="not valid UTF-8 text (header)", rows_read=max(_count_lines(raw) - 1, 0))
        if _NON_BLANK.search(raw, len(first) + 1) is None:
            return Parsed(file_error="no data rows (header only)")
        if len(set(names)) != len(names):
            return Parsed(file_error=f"duplicate column names in header: {names}",
                          rows_read=_count_lines(raw) - 1)
    assert names is not None
    names, mapped = _source_columns(names, fmt)
    on_invalid = _BadRows()
    bad_rows, actual = on_invalid.rows, on_invalid.actual

    def read(types: dict[str, pa.DataType]) -> pa.Table:
        bad_rows.clear()
        actual.clear()
        return pacsv.read_csv(
            io.BytesIO(raw),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if header else 0,
                                           block_size=_WHOLE_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delim, invalid_row_handler=on_invalid,
                                             newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=[n for n in names if n in mapped], column_types=types,
                quoted_strings_can_be_null=True),
        )

    canon_of = {n: C.canonical_name(n) for n in mapped}
    type_errors = False
    try:
        table = read({n: _TYPES[canon_of[n]] for n in mapped})
    except pa.ArrowInvalid as exc:
        if _is_utf8_error(exc):
            return Parsed(file_error="not valid UTF-8 text", rows_read=_count_lines(raw) - header)
        try:
            table = read({n: pa.string() for n in mapped})
            type_errors = True
        except pa.ArrowInvalid as exc2:
            if _is_utf8_error(exc2):
                return Parsed(file_error="not valid UTF-8 text", rows_read=_count_lines(raw) - header)
            return Parsed(file_error=f"unparseable {fmt}: {str(exc2).splitlines()[0][:160]}",
                          rows_read=_count_lines(raw) - header)
    rows_read = table.num_rows + len(bad_rows)
    if table.num_rows == 0 and bad_rows:
        return Parsed(file_error=f"no row has the expected {len(names)} fields (the first has {actual[0]}): "
                                 "wrong delimiter or wrong format", rows_read=rows_read)
    notes: list[str] = []
    out, reasons, err = _canonicalise(table, list(names), allow_missing_channels, type_errors, notes)
    if err:
        return Parsed(file_error=err, rows_read=rows_read)
    return Parsed(table=out, reasons=reasons, bad_rows=list(bad_rows), rows_read=rows_read, notes=notes)


def _parquet_error(exc: Exception) -> str:
    # The same words whether the file was read from memory or streamed from its file system.
    msg = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(exc).splitlines()[0])
    return f"unreadable Parquet ({msg[:120]})"


def _parse_parquet(raw: bytes, allow_missing: bool) -> Parsed:
    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError) as exc:
        return Parsed(file_error=_parquet_error(exc))
    if table.num_rows == 0:
        return Parsed(file_error="no data rows (empty Parquet file)")
    notes: list[str] = []
    lineage = set(C.LINEAGE)
    names = [n for n in table.column_names if n not in lineage and n not in ("asset", "dataset")]
    out, reasons, err = _canonicalise(table.select(names), names, allow_missing, False, notes)
    if err:
        return Parsed(file_error=err, rows_read=table.num_rows)
    return Parsed(table=out, reasons=reasons, rows_read=table.num_rows, notes=notes)


# --- Validation: canonical table -> lake rows + quarantined rows --------------------------------


def _group_starts(codes_sorted: np.ndarray) -> np.ndarray:
    if len(codes_sorted) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, codes_sorted[1:] != codes_sorted[:-1]])


def _stuck_mask(x: np.ndarray, same: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Rows in runs of >= ``window`` identical values of a channel that normally changes step to step.

    ``x`` is sorted by (asset, cycle); ``same[i]`` says row i belongs to the asset of row i-1. Channels that
    are constant or quantised by design (changing in fewer than half of the steps of an asset) are not
    judged, so C-MAPSS's fixed setpoints are not reported as stuck sensors.
    """
    n = len(x)
    eq = np.zeros(n, bool)
    eq[1:] = (x[1:] == x[:-1]) & same[1:]
    if eq.sum() < window - 1:  # no run long enough anywhere: the usual case for live sensor data
        return np.zeros(n, bool)
    steps = np.add.reduceat(same.astype(np.int64), starts) if n else np.zeros(0, np.int64)
    changes = np.add.reduceat((same & ~eq).astype(np.int64), starts) if n else np.zeros(0, np.int64)
    varying = changes >= 0.5 * np.maximum(steps, 1)
    lengths = np.diff(np.r_[starts, n])
    judged = np.repeat(varying, lengths)
    run_id = np.cumsum(~eq)
    run_len = np.bincount(run_id)[run_id]
    return judged & (run_len >= window) & ~np.isnan(x)


class _FileState:
    """What validating one file in batches carries from batch to batch (see :func:`_validate_batch`).

    Per asset (indexed in order of first appearance): the largest cycle kept so far (out-of-order check),
    and, per channel, the last value in cycle order plus counts of steps, unchanged steps and changes
    (which say after the last batch whether a stuck run is possible at all). The keys kept so far are one
    sorted int64 array (asset index << 32 | cycle) with the record of each: 16 bytes per kept row, the
    only state that grows with the file.
    """

    def __init__(self) -> None:
        self.asset_ix: dict[str, int] = {}
        self.keys = np.zeros(0, np.int64)
        self.recs = np.zeros(0, np.int64)
        self.maxc = np.zeros(0, np.int64)
        self.rows = np.zeros(0, np.int64)
        self.disorder = np.zeros(0, bool)
        self.channels: list[str] | None = None
        self.last = self.eq = self.changes = self.steps = None

    def index(self, names: list[Any]) -> np.ndarray:
        out = np.empty(len(names), np.int64)
        for i, a in enumerate(names):
            out[i] = self.asset_ix.setdefault(a, len(self.asset_ix))
        grow = len(self.asset_ix) - len(self.maxc)
        if grow > 0:
            self.maxc = np.r_[self.maxc, np.full(grow, -1, np.int64)]
            self.rows = np.r_[self.rows, np.zeros(grow, np.int64)]
            self.disorder = np.r_[self.disorder, np.zeros(grow, bool)]
            if self.channels is not None:
                k = len(self.channels)
                self.last = np.r_[self.last, np.full((grow, k), np.nan)]
                self.eq = np.r_[self.eq, np.zeros((grow, k), np.int64)]
                self.changes = np.r_[self.changes, np.zeros((grow, k), np.int64)]
                self.steps = np.r_[self.steps, np.zeros(grow, np.int64)]
        return out

    def suspects(self, window: int) -> set[str]:
        """Assets that may hold a stuck run: cycles out of order across batches, or a varying channel with
        enough unchanged steps. Any other asset has none (exactly as :func:`_stuck_mask` would judge)."""
        sus = self.disorder.copy()
        if self.channels:
            varying = self.changes >= 0.5 * np.maximum(self.steps, 1)[:, None]
            sus |= (varying & (self.eq >= window - 1)).any(axis=1)
        names = list(self.asset_ix)
        return {names[i] for i in np.flatnonzero(sus)}


def validate_table(table: pa.Table, reasons: dict[int, str] | None, source: str, batch_id: str,
                   stuck_window: int = 20) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Apply the data contract to a parsed table.

    Quarantines rows with a missing/invalid key, an unparseable value (``reasons``), a value out of its
    valid range, or a duplicate (asset, cycle) key (the first occurrence is kept). Flags, in ``quality``,
    rows with missing or sentinel values (stored as null), rows whose cycle went backwards within the file,
    and stuck sensors.

    Args:
        table: Output of :func:`parse_bytes` (canonical columns present in the source plus ``record``).
        reasons: Row -> reason from parsing (cells that did not convert), or None.
        source: Source file (lineage column).
        batch_id: Ingest batch (lineage column).
        stuck_window: Identical consecutive values that make a varying channel "stuck".

    Returns:
        (lake table in the canonical schema sorted by asset and cycle, quarantine table, flag counts).
    """
    return _validate_batch(table, reasons, source, batch_id, stuck_window, None)


def _validate_batch(table: pa.Table, reasons: dict[int, str] | None, source: str, batch_id: str,
                    stuck_window: int, state: _FileState | None) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """:func:`validate_table` of one batch of a file's rows (``record`` numbers rows across the file).

    With ``state`` None the table is the whole file. Otherwise keys, cycles and channel statistics of
    earlier batches come from ``state`` (and this batch's are added): duplicate keys and out-of-order
    cycles are judged against the whole file so far, and stuck sensors are NOT flagged here (a later batch
    can extend a run or change whether a channel varies); :func:`_stuck_quality` flags them over each
    asset that :meth:`_FileState.suspects` names once the last batch is in.
    """
    n = table.num_rows
    st = state if state is not None else _FileState()
    # Rejections are rare: a boolean mask for the vectorised checks, reason strings only for rejects.
    reason: dict[int, str] = dict(reasons or {})
    rejected = np.zeros(n, bool)
    if reason:
        rejected[list(reason)] = True

    def reject(mask: np.ndarray, why) -> None:
        for i in np.flatnonzero(mask & ~rejected):
            reason[int(i)] = why(int(i)) if callable(why) else why
        rejected[mask] = True

    record = table.column("record").to_numpy()
    asset = pc.utf8_trim_whitespace(table.column(C.ASSET)).combine_chunks() if n else pa.array([], pa.string())
    asset_valid = pc.and_(pc.is_valid(asset), pc.not_equal(asset, "")).to_numpy(zero_copy_only=False) \
        if n else np.zeros(0, bool)
    asset_valid = np.asarray(asset_valid, bool) & ~np.asarray(pc.is_null(asset).to_numpy(zero_copy_only=False), bool)
    cyc_arr = table.column(C.TIME).combine_chunks()
    cyc_null = np.asarray(pc.is_null(cyc_arr).to_numpy(zero_copy_only=False), bool)
    cycle = cyc_arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    reject(~asset_valid, "missing asset id")
    reject(cyc_null, "missing cycle")
    lo, hi = C.CYCLE_RANGE
    reject((cycle < lo) | (cycle > hi), lambda i: f"cycle {cycle[i]} outside [{lo}, {hi}]")

    quality = np.zeros(n, np.int32)
    values: dict[str, np.ndarray] = {}
    for ch in C.CHANNELS:
        if ch not in table.column_names:
            continue
        x = table.column(ch).combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
        sentinel = np.isin(x, C.SENTINELS)
        x[sentinel] = np.nan
        quality[sentinel] |= C.Quality.SENTINEL
        quality[np.isnan(x)] |= C.Quality.MISSING
        low, high = C.valid_range(ch)
        with np.errstate(invalid="ignore"):
            bad = (x < low) | (x > high)
        if bad.any():
            reject(bad, lambda i, ch=ch, x=x, low=low, high=high:
                   f"{ch}={x[i]:g} outside valid range [{low:g}, {high:g}] {C.CHANNEL_SPECS[ch].unit}")
        values[ch] = x

    # Asset codes in order of first appearance in the file (a fresh state: in this table).
    if n:
        enc = pc.dictionary_encode(asset)
        local = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        names = enc.dictionary.to_pylist()
        codes = st.index(names)[local] if names else np.zeros(n, np.int64)
    else:
        codes = np.zeros(0, np.int64)

    # Duplicate keys among rows not already rejected: keep the first occurrence in file order (a key an
    # earlier batch kept was first seen there).
    idx = np.flatnonzero(~rejected)
    order = idx[np.lexsort((record[idx], cycle[idx], codes[idx]))]
    if len(order):
        dup = np.r_[False, (codes[order][1:] == codes[order][:-1]) & (cycle[order][1:] == cycle[order][:-1])]
        first_rec = record[order[np.maximum.accumulate(np.where(~dup, np.arange(len(order)), 0))]]
        keys = (codes[order] << 32) | cycle[order]
        if len(st.keys):
            pos = np.minimum(np.searchsorted(st.keys, keys), len(st.keys) - 1)
            hit = st.keys[pos] == keys
            if hit.any():
                dup |= hit
                first_rec = np.where(hit, st.recs[pos], first_rec)
        if state is not None:  # keep the new keys (sorted, unique): one linear merge per batch
            new = ~dup
            at = np.searchsorted(st.keys, keys[new])
            st.keys, st.recs = np.insert(st.keys, at, keys[new]), np.insert(st.recs, at, record[order[new]])
        assets_py = asset.to_pylist() if dup.any() else None
        for pos_ in np.flatnonzero(dup):
            i = int(order[pos_])
            reason[i] = (f"duplicate key ({C.ASSET}={assets_py[i]}, {C.TIME}={cycle[i]}): "
                         f"first seen at record {first_rec[pos_]}")
            rejected[i] = True
    ok = ~rejected

    # Out-of-order: a cycle below the running maximum of its asset, in file order (earlier batches
    # included).
    idx = np.flatnonzero(ok)
    by_asset = idx[np.lexsort((record[idx], codes[idx]))]
    if len(by_asset):
        key = codes[by_asset] * (1 << 32) + cycle[by_asset]
        runmax = np.maximum.accumulate(key)
        before = codes[by_asset] * (1 << 32) + st.maxc[codes[by_asset]]
        back = key < np.maximum(np.r_[np.iinfo(np.int64).min, runmax[:-1]], before)
        quality[by_asset[back]] |= C.Quality.OUT_OF_ORDER

    # Lake order: (asset, cycle); stuck sensors are judged along time.
    good = idx[np.lexsort((cycle[idx], codes[idx]))]
    gcodes = codes[good]
    same = np.r_[False, gcodes[1:] == gcodes[:-1]] if len(good) else np.zeros(0, bool)
    starts = _group_starts(gcodes)
    if state is None:
        for ch, x in values.items():
            if len(good):
                stuck = _stuck_mask(x[good], same, starts, stuck_window)
                quality[good[stuck]] |= C.Quality.STUCK
    elif len(good):
        _carry_stats(st, values, good, gcodes, same, starts, cycle)

    schema = C.telemetry_schema()
    cols = []
    for field in schema:
        if field.name == C.ASSET:
            cols.append(asset.take(pa.array(good)))
        elif field.name == C.TIME:
            cols.append(pa.array(cycle[good].astype(np.int32)))
        elif field.name == C.TIMESTAMP:
            cols.append(table.column(C.TIMESTAMP).combine_chunks().take(pa.array(good))
                        if C.TIMESTAMP in table.column_names else pa.nulls(len(good), field.type))
        elif field.name in values:
            cols.append(pa.array(values[field.name][good], pa.float64(), from_pandas=True))
        elif field.name in C.CHANNELS:
            cols.append(pa.nulls(len(good), pa.float64()))
        elif field.name == "source_file":
            cols.append(pa.repeat(pa.scalar(source, pa.string()), len(good)))
        elif field.name == "batch_id":
            cols.append(pa.repeat(pa.scalar(batch_id, pa.string()), len(good)))
        elif field.name == "quality":
            cols.append(pa.array(quality[good], pa.int32()))
    lake = pa.Table.from_arrays(cols, schema=schema)

    flagged = {q.name.lower(): int(((quality[good] & q) != 0).sum()) for q in C.Quality if q}
    bad = np.flatnonzero(~ok)
    quarantine = _quarantine_rows(table.take(pa.array(bad)), [reason[i] for i in bad], source, batch_id)
    return lake, quarantine, flagged


def _carry_stats(st: _FileState, values: dict[str, np.ndarray], good: np.ndarray, gcodes: np.ndarray,
                 same: np.ndarray, starts: np.ndarray, cycle: np.ndarray) -> None:
    """Add one batch's kept rows (``good``, in (asset, cycle) order) to the per-asset channel statistics."""
    if st.channels is None:
        st.channels = list(values)
        a, k = len(st.maxc), len(st.channels)
        st.last, st.eq = np.full((a, k), np.nan), np.zeros((a, k), np.int64)
        st.changes, st.steps = np.zeros((a, k), np.int64), np.zeros(a, np.int64)
    ga = gcodes[starts]
    ends = np.r_[starts[1:], len(good)] - 1
    seen = st.rows[ga] > 0
    # Cycles of an asset that go below what earlier batches kept: the file's (asset, cycle) order is not
    # the order of the batches, so only the whole asset can say which runs there are.
    st.disorder[ga] |= seen & (cycle[good[starts]] < st.maxc[ga])
    st.steps[ga] += np.add.reduceat(same.astype(np.int64), starts) + seen
    if st.channels:
        x = np.column_stack([values[ch][good] for ch in st.channels])
        eq = np.zeros(x.shape, bool)
        eq[1:] = (x[1:] == x[:-1]) & same[1:, None]
        beq = (x[starts] == st.last[ga]) & seen[:, None]
        st.eq[ga] += np.add.reduceat(eq.astype(np.int64), starts, axis=0) + beq
        st.changes[ga] += np.add.reduceat((same[:, None] & ~eq).astype(np.int64), starts, axis=0) \
            + (seen[:, None] & ~beq)
        st.last[ga] = x[ends]
    st.maxc[ga] = np.maximum(st.maxc[ga], np.maximum.reduceat(cycle[good], starts))
    st.rows[ga] += np.diff(np.r_[starts, len(good)])


def _stuck_quality(rows: pa.Table, window: int) -> tuple[pa.Table, int]:
    """Flag stuck sensors over all lake rows of one asset, in cycle order; return them and the count."""
    n = rows.num_rows
    quality = rows.column("quality").to_numpy().astype(np.int32, copy=True)
    same = np.r_[False, np.ones(max(n - 1, 0), bool)][:n]
    starts = np.zeros(1 if n else 0, np.int64)
    for ch in C.CHANNELS:
        col = rows.column(ch)
        if col.null_count == n:
            continue
        x = col.to_numpy().astype(np.float64) if col.null_count == 0 else \
            col.combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
        quality[_stuck_mask(x, same, starts, window)] |= C.Quality.STUCK
    i = rows.schema.get_field_index("quality")
    out = rows.set_column(i, rows.schema.field(i), pa.array(quality, pa.int32()))
    return out, int(((quality & C.Quality.STUCK) != 0).sum())


def _quarantine_rows(rows: pa.Table, reasons: list[str], source: str, batch_id: str,
                     raw_text: list[str] | None = None) -> pa.Table:
    n = len(reasons)
    if raw_text is None:
        recs = rows.drop_columns(["record"]).to_pylist() if rows.num_rows else []
        raw_text = [json.dumps(r, default=str) for r in recs]
        record = rows.column("record") if rows.num_rows else pa.array([], pa.int64())
        asset = rows.column(C.ASSET).cast(pa.string()) if rows.num_rows else pa.array([], pa.string())
        cycle = rows.column(C.TIME).cast(pa.int64()) if rows.num_rows else pa.array([], pa.int64())
    else:
        record = pa.nulls(n, pa.int64())
        asset = pa.nulls(n, pa.string())
        cycle = pa.nulls(n, pa.int64())
    return pa.Table.from_arrays(
        [pa.array([source] * n, pa.string()), pa.array([batch_id] * n, pa.string()), record,
         pa.array(reasons, pa.string()), asset, cycle, pa.array(raw_text, pa.string())],
        schema=C.quarantine_schema())


def split_by_asset(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """Yield (asset_id, rows) slices of a table sorted by asset (zero-copy slices)."""
    if table.num_rows == 0:
        return
    asset = table.column(C.ASSET).combine_chunks()
    enc = pc.dictionary_encode(asset)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    starts = _group_starts(codes)
    ends = np.r_[starts[1:], len(codes)]
    if len(np.unique(codes[starts])) != len(starts):
        order = pc.sort_indices(table, [(C.ASSET, "ascending"), (C.TIME, "ascending")])
        yield from split_by_asset(table.take(order))
        return
    for s, e in zip(starts, ends):
        yield enc.dictionary[codes[s]].as_py(), table.slice(int(s), int(e - s))


# --- File I/O ------------------------------------------------------------------------------------


def _write_parquet(table: pa.Table, where: Any) -> None:
    # Dictionary-encode only the low-cardinality columns: trying it on every float channel (pyarrow's
    # default) triples the write time and makes sensor data files larger, not smaller.
    dict_cols = [c for c in (C.ASSET, "source_file", "batch_id", "quality", "reason") if c in table.column_names]
    pq.write_table(table, where, use_dictionary=dict_cols, compression="snappy")


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write Parquet to a hidden temp name beside ``path``, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_parquet(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def local_path(url: str) -> Path:
    """A local filesystem path from a path or ``file://`` URL (the lake and quarantine are local)."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise ConfigError(f"the lake must be a local path for now, got {url!r}; mount the bucket or "
                          "set TWINFLOW_LAKE__LAKE to a local folder")
    return Path(os.path.expanduser(url)).resolve()


def _fs(url: str, storage_options: dict[str, Any]):
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options)


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return int(v.timestamp() * 1e9)
        try:
            return int(float(v) * 1e9)
        except (TypeError, ValueError):
            continue
    return 0


def _ignored(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith((".", "_")) or base.lower().endswith(_IGNORED_SUFFIXES) or \
        base.endswith(".reason.txt")


def _selected(path: str, include: list[str] | tuple[str, ...], exclude: list[str] | tuple[str, ...]) -> bool:
    base = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatchcase(base, g.lower()) for g in include) and \
        not any(fnmatch.fnmatchcase(base, g.lower()) for g in exclude)


def list_landing(landing: str, storage_options: dict[str, Any] | None = None,
                 include: list[str] | tuple[str, ...] = DEFAULT_INCLUDE,
                 exclude: list[str] | tuple[str, ...] = DEFAULT_EXCLUDE) -> list[SourceFile]:
    """List the files of a landing folder (recursively) or a single landing file, sorted by path.

    Hidden files, ``_``-prefixed files and names writers use while a file is in flight (``.tmp``,
    ``.part``...) are skipped, as are files that ``include``/``exclude`` (file-name globs) rule out.
    A single landing file is always listed.

    Raises:
        ConfigError: the landing path does not exist.
    """
    fs, root = _fs(landing, storage_options or {})
    if not fs.exists(root):
        raise ConfigError(f"landing path {landing!r} does not exist; create it or pass --landing PATH")
    local = "://" not in landing or landing.startswith("file://")

    def name_of(p: str) -> str:
        return str(Path(p).resolve()) if local else fs.unstrip_protocol(p)

    if fs.isfile(root):
        info = fs.info(root)
        return [SourceFile(path=name_of(root), size=int(info.get("size") or 0), mtime_ns=_mtime_ns(info))]
    out = []
    for p, info in fs.find(root, detail=True).items():
        rel = p[len(root.rstrip("/")) + 1:] if p.startswith(root.rstrip("/")) else p
        if info.get("type") == "directory" or any(_ignored(part) for part in rel.split("/")) \
                or not _selected(p, include, exclude):
            continue
        out.append(SourceFile(path=name_of(p), size=int(info.get("size") or 0), mtime_ns=_mtime_ns(info)))
    return sorted(out, key=lambda f: f.path)


def _stat(path: str, storage_options: dict[str, Any]) -> tuple[int, int] | None:
    fs, p = _fs(path, storage_options)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return None
    return int(info.get("size") or 0), _mtime_ns(info)


def _read_bytes(path: str, storage_options: dict[str, Any]) -> bytes:
    fs, p = _fs(path, storage_options)
    return fs.cat_file(p)


def _quarantine_file(data: bytes, src: SourceFile, reason: str, quarantine: Path, batch_id: str) -> None:
    folder = quarantine / "files" / file_id(src.path)
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    _atomic_write_bytes(data, folder / base)
    _atomic_write_bytes(
        json.dumps({"source": src.path, "reason": reason, "batch_id": batch_id,
                    "sha256": hashlib.sha256(data).hexdigest()}, indent=2).encode(),
        folder / "reason.txt")


def process_file(src: SourceFile, params: IngestParams, staging: Path, quarantine: Path,
                 batch_id: str, storage_options: dict[str, Any] | None = None) -> FileOutcome:
    """Read, hash, parse and validate one source file; stage its lake and quarantine Parquet files.

    Files larger than ``params.stream_threshold_bytes`` are streamed: hashed in chunks, parsed and
    validated ``params.batch_rows`` rows at a time (:func:`_process_streamed`), with the same result as
    reading them whole. Nothing becomes visible in the lake here: staged files are published by :func:`commit_outcomes`.
    A file whose size or modification time changed while it was read is deferred to the next run.
    Files that cannot be parsed at all are copied to the quarantine folder with a reason.
    """
    so = storage_options or {}
    ds_name = params.dataset or dataset_name(src.path)
    fid = file_id(src.path)
    out = FileOutcome(source=src.path, dataset=ds_name, file_id=fid, size=src.size, mtime_ns=src.mtime_ns,
                      params_digest=params.digest(ds_name))
    if params.settle_seconds and src.mtime_ns and \
            time.time() - src.mtime_ns / 1e9 < params.settle_seconds:
        out.status, out.reason = "deferred", f"modified less than {params.settle_seconds:g}s ago"
        return out
    if src.size > params.stream_threshold_bytes:
        done = _process_streamed(src, params, staging, quarantine, batch_id, so, out)
        if done is not None:
            return done
    try:
        data = _read_bytes(src.path, so)
    except FileNotFoundError:
        out.status, out.reason = "deferred", _DISAPPEARED
        return out
    after = _stat(src.path, so)
    if after is None or after != (src.size, src.mtime_ns) or len(data) != src.size:
        out.status, out.reason = "deferred", _CHANGED
        return out
    out.sha256 = hashlib.sha256(data).hexdigest()
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    parsed = parse_bytes(data, base, params.format, params.columns, params.delimiter,
                         params.allow_missing_channels)
    out.notes = parsed.notes
    out.rows_read = parsed.rows_read
    try:
        out.format = detect_format(base, _decompress(data, base)[:8], params.format)
    except (OSError, EOFError, zlib.error):
        out.format = params.format
    if parsed.file_error:
        out.status, out.reason = "quarantined", parsed.file_error
        out.rows_quarantined = parsed.rows_read
        _quarantine_file(data, src, parsed.file_error, quarantine, batch_id)
        return out
    lake, quar, flagged = validate_table(parsed.table, parsed.reasons, src.path, batch_id, params.stuck_window)
    if parsed.bad_rows:
        extra = _quarantine_rows(pa.table({}), [r for r, _ in parsed.bad_rows], src.path, batch_id,
                                 raw_text=[t for _, t in parsed.bad_rows])
        quar = pa.concat_tables([quar, extra])
    folder = staging / fid
    if folder.exists():
        shutil.rmtree(folder)
    for asset, rows in split_by_asset(lake):
        _atomic_write_table(rows, folder / "lake" / asset_dir(asset) / f"{fid}.parquet")
        cyc = rows.column(C.TIME)
        out.assets[asset] = AssetExtent(rows=rows.num_rows, tmin=pc.min(cyc).as_py(), tmax=pc.max(cyc).as_py())
    if quar.num_rows:
        _atomic_write_table(quar, folder / "quarantine.parquet")
    out.staged = str(folder)
    out.rows_written = lake.num_rows
    out.rows_quarantined = quar.num_rows
    out.flagged = {k: v for k, v in flagged.items() if v}
    out.reason = _summarise_reasons(quar)
    return out


# --- Streaming: files larger than stream_threshold_bytes, batch by batch -------------------------

_CHUNK_BYTES = 8 << 20  # read size when hashing, copying and decompressing a streamed file
# CSV block of the streaming reader. pyarrow reads several blocks ahead of the batch we validate (with
# 16 MiB blocks, ~120 MB of text was held whatever batch_rows was), so keep blocks small and coalesce them
# into batch_rows batches; a file with a longer line is read again with the block parse_bytes uses
# (where a yet longer line is an error).
_BLOCK_BYTES = 1 << 20
_WHOLE_BLOCK_BYTES = 16 << 20


def _hash_stream(fs: Any, path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class _TextStream(io.RawIOBase):
    """The text of a landing file as :func:`parse_bytes` sees it, in line-aligned chunks.

    Decompresses gzip, normalises C-MAPSS whitespace chunk by chunk (every chunk ends with a newline, so
    this equals normalising the whole text), and checks as it goes what :func:`parse_bytes` checks on the
    whole text: gzip integrity, UTF-8 (with the same byte offset), non-blank lines. After an error it reads
    as the end of the file; :meth:`drain` reads the rest only to finish the counts and checks.
    """

    def __init__(self, fh: Any, gz: bool, cmapss: bool, count: bool = False):
        self._src = gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh
        self._count = count
        self._cmapss = cmapss
        self._pending: list[bytes] = []  # checked chunks read ahead (header, blank-file checks)
        self._cur = b""
        self._off = 0
        self._carry = b""
        self._eof = False
        self.gzip_error: str | None = None
        self.utf8_error: int | None = None  # byte offset of the first invalid UTF-8 sequence
        self.lines = 0  # non-blank lines so far (when counting: only file errors need it)
        self.nonblank = False
        self.pos = 0  # bytes of text so far

    def readable(self) -> bool:
        return True

    @property
    def failed(self) -> bool:
        return self.gzip_error is not None or self.utf8_error is not None

    def _next(self) -> bytes | None:
        while not self._eof:
            try:
                data = self._src.read(_CHUNK_BYTES)
            except (OSError, EOFError, zlib.error) as exc:
                self.gzip_error = f"corrupt gzip stream ({exc.__class__.__name__}: {str(exc)[:80]})"
                self._eof = True
                return None
            if data:
                data = self._carry + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    self._carry = data
                    continue
                chunk, self._carry = data[:cut], data[cut:]
            else:
                self._eof = True
                chunk, self._carry = self._carry, b""
            if self._cmapss:
                chunk = _normalise_whitespace(chunk)
            if not chunk:
                continue
            if self._count:
                self.lines += _count_lines(chunk)
            self.nonblank = self.nonblank or bool(chunk.strip())
            if self.utf8_error is None and not chunk.isascii():
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self.utf8_error = self.pos + exc.start
            self.pos += len(chunk)
            return chunk
        return None

    def peek(self, want: Any) -> bytes:
        """Read ahead until ``want(text so far)`` holds or the file ends; return the text read ahead."""
        while True:
            text = b"".join(self._pending)
            if want(text) or self._eof or self.failed:
                return text
            chunk = self._next()
            if chunk is not None:
                self._pending.append(chunk)

    def read(self, n: int = -1) -> bytes:
        while self._off >= len(self._cur):
            if self.failed:
                return b""
            chunk = self._pending.pop(0) if self._pending else self._next()
            if chunk is None or self.failed:
                return b""
            self._cur, self._off = chunk, 0
        n = len(self._cur) - self._off if n is None or n < 0 else n
        out = self._cur[self._off:self._off + n]
        self._off += len(out)
        return out

    def readinto(self, b: Any) -> int:
        out = self.read(len(b))
        b[:len(out)] = out
        return len(out)

    def drain(self) -> None:
        self._pending.clear()
        while self._next() is not None:
            pass


class _Staged:
    """One streamed file's staged output: lake rows per (asset, batch) part, quarantine rows, counts.

    :meth:`finish` merges each asset's parts into the one ``<file_id>.parquet`` that :func:`commit_outcomes`
    publishes (flagging stuck sensors over the whole asset where a run is possible), so the staging layout
    is the same as for a file read whole.
    """

    def __init__(self, folder: Path, fid: str, source: str, batch_id: str, window: int):
        self.folder, self.fid, self.source, self.batch_id, self.window = folder, fid, source, batch_id, window
        self._writers: dict[str, pq.ParquetWriter] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything staged so far (the file is read again from its start)."""
        self.discard()
        self.state = _FileState()
        self.parts: dict[str, list[Path]] = {}
        self.assets: dict[str, AssetExtent] = {}
        self.rows_written = self.rows_quarantined = 0
        self.flagged: dict[str, int] = {}
        self.kinds: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self._k = 0

    def add(self, table: pa.Table, reasons: dict[int, str] | None) -> None:
        lake, quar, flagged = _validate_batch(table, reasons, self.source, self.batch_id, self.window, self.state)
        (self.folder / "parts").mkdir(parents=True, exist_ok=True)
        for asset, rows in split_by_asset(lake):
            path = self.folder / "parts" / f"{self._k}.parquet"  # one flat folder: no directory per asset
            self._k += 1
            _write_parquet(rows, path)
            self.parts.setdefault(asset, []).append(path)
            cyc = rows.column(C.TIME)
            lo, hi = pc.min(cyc).as_py(), pc.max(cyc).as_py()
            e = self.assets.get(asset)
            self.assets[asset] = AssetExtent(rows=rows.num_rows, tmin=lo, tmax=hi) if e is None else \
                AssetExtent(rows=e.rows + rows.num_rows, tmin=min(e.tmin, lo), tmax=max(e.tmax, hi))
        self.rows_written += lake.num_rows
        for k, v in flagged.items():
            self.flagged[k] = self.flagged.get(k, 0) + v
        self._quarantine(quar, "rows")

    def add_bad(self, bad_rows: list[tuple[str, str]]) -> None:
        """Rows with a wrong field count (they follow the other quarantined rows, as for a whole file)."""
        if bad_rows:
            self._quarantine(_quarantine_rows(pa.table({}), [r for r, _ in bad_rows], self.source,
                                              self.batch_id, raw_text=[t for _, t in bad_rows]), "bad")

    def _quarantine(self, quar: pa.Table, kind: str) -> None:
        if not quar.num_rows:
            return
        if kind not in self._writers:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._writers[kind] = pq.ParquetWriter(self.folder / f"q-{kind}.parquet", quar.schema,
                                                   use_dictionary=["source_file", "batch_id", "reason"],
                                                   compression="snappy")
        self._writers[kind].write_table(quar)
        self.rows_quarantined += quar.num_rows
        _reason_kinds(quar.column("reason").to_pylist(), self.kinds[kind == "bad"])

    def discard(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def finish(self, out: FileOutcome) -> None:
        """Merge the parts, flag stuck sensors, write the quarantine file; fill ``out``'s counts."""
        for w in self._writers.values():
            w.close()
        suspects = self.state.suspects(self.window)
        stuck = 0
        for asset, parts in self.parts.items():
            target = self.folder / "lake" / asset_dir(asset) / f"{self.fid}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            if asset in suspects:  # the whole asset in cycle order decides (rare: stuck runs, disorder)
                rows = pa.concat_tables([pq.ParquetFile(p).read() for p in parts])
                rows, n = _stuck_quality(rows.take(pc.sort_indices(rows, [(C.TIME, "ascending")])),
                                         self.window)
                stuck += n
                _write_parquet(rows, target)
            elif len(parts) == 1:
                os.replace(parts[0], target)
            else:  # batches kept this asset's cycles in order: concatenating the parts is the sorted asset
                _concat_parquet(parts, target, _LAKE_DICT)
        if stuck:
            self.flagged["stuck"] = self.flagged.get("stuck", 0) + stuck
        qparts = [self.folder / f"q-{k}.parquet" for k in ("rows", "bad") if (self.folder / f"q-{k}.parquet").exists()]
        if len(qparts) == 1:
            os.replace(qparts[0], self.folder / "quarantine.parquet")
        elif qparts:
            _concat_parquet(qparts, self.folder / "quarantine.parquet", ["source_file", "batch_id", "reason"])
        shutil.rmtree(self.folder / "parts", ignore_errors=True)
        for q in qparts:
            q.unlink(missing_ok=True)
        kinds = dict(self.kinds[0])
        for k, v in self.kinds[1].items():
            kinds[k] = kinds.get(k, 0) + v
        out.staged = str(self.folder)
        out.assets = self.assets
        out.rows_written = self.rows_written
        out.rows_quarantined = self.rows_quarantined
        out.flagged = {k: v for k, v in self.flagged.items() if v}
        out.reason = _summarise_kinds(kinds) if kinds else ""


_LAKE_DICT = [C.ASSET, "source_file", "batch_id", "quality"]


def _concat_parquet(parts: list[Path], target: Path, dict_cols: list[str]) -> None:
    """Concatenate Parquet files of one schema into ``target``, one row group at a time."""
    writer = None
    try:
        for p in parts:
            pf = pq.ParquetFile(p)
            for i in range(pf.num_row_groups):
                t = pf.read_row_group(i)
                if writer is None:
                    writer = pq.ParquetWriter(target, t.schema, use_dictionary=dict_cols, compression="snappy")
                writer.write_table(t)
    finally:
        if writer is not None:
            writer.close()


class _StreamError(Exception):
    """A file-level problem found while streaming: the whole file is quarantined."""

    def __init__(self, reason: str, rows_read: int):
        super().__init__(reason)
        self.reason, self.rows_read = reason, rows_read


def _stream_text(fs: Any, path: str, gz: bool, fmt: str, params: IngestParams,
                 stage: _Staged) -> tuple[int, list[str]]:
    """Parse a CSV or C-MAPSS text file batch by batch into ``stage``; return (rows read, notes).

    Mirrors :func:`parse_bytes` decision for decision (typed read, then all-string read after a conversion
    error; the same file-level errors in the same order of precedence).

    Raises:
        _StreamError: the file as a whole is unusable.
    """
    header = fmt == "csv" and params.columns is None
    mode, block = "typed", _BLOCK_BYTES
    while True:
        with fs.open(path, "rb") as fh:
            ts = _TextStream(fh, gz, fmt == "cmapss")

            def fail(reason: str | None, rows: Any = 0) -> _StreamError:
                ts.drain()
                stage.discard()
                if ts.utf8_error is not None or callable(rows):  # the counts need every line: read again
                    with fs.open(path, "rb") as again:
                        counted = _TextStream(again, gz, fmt == "cmapss", count=True)
                        counted.drain()
                        ts.lines = counted.lines
                if ts.gzip_error:
                    return _StreamError(ts.gzip_error, 0)
                if not ts.nonblank:
                    return _StreamError("empty file", 0)
                if ts.utf8_error is not None:
                    return _StreamError(f"not valid UTF-8 text (byte {ts.utf8_error})", max(ts.lines - header, 0))
                assert reason is not None
                return _StreamError(reason, rows() if callable(rows) else rows)

            text = ts.peek(lambda t: bool(t.strip()))
            if ts.failed or not text.strip():
                raise fail(None)
            if fmt == "cmapss":
                delim, names = " ", list(params.columns or C.CMAPSS_COLUMNS)
            else:
                delim, names = params.delimiter, params.columns
            if header:
                first = text.split(b"\n", 1)[0].rstrip(b"\r")
                text = ts.peek(lambda t: _NON_BLANK.search(t, len(first) + 1) is not None)
                if ts.failed:
                    raise fail(None)
                names = [h.strip().strip('"') for h in first.decode("utf-8").split(delim)]
                if _NON_BLANK.search(text, len(first) + 1) is None:
                    raise fail("no data rows (header only)")
                if len(set(names)) != len(names):
                    raise fail(f"duplicate column names in header: {names}", lambda: ts.lines - 1)
            assert names is not None
            names, mapped = _source_columns(names, fmt)
            canon_of = {n: C.canonical_name(n) for n in mapped}
            on_invalid = _BadRows()
            bad_rows, actual = on_invalid.rows, on_invalid.actual

            types = {n: (_TYPES[canon_of[n]] if mode == "typed" else pa.string()) for n in mapped}
            rows = n_bad = 0
            notes: list[str] | None = None
            error: str | None = None
            held: list[pa.RecordBatch] = []  # reader batches (one per block) not yet validated

            def validate(final: bool) -> None:
                # Blocks are coalesced into batches of batch_rows rows (the last one shorter).
                nonlocal rows, notes, error, held
                while held and (final or sum(b.num_rows for b in held) >= params.batch_rows):
                    pending = pa.Table.from_batches(held)
                    table = pending.slice(0, params.batch_rows)
                    held = pending.slice(params.batch_rows).to_batches()
                    if error is None:
                        batch_notes: list[str] = []
                        out, reasons, error = _canonicalise(table, list(names), params.allow_missing_channels,
                                                            mode == "string", batch_notes, offset=rows)
                        notes = batch_notes if notes is None else notes
                        if error is None:
                            stage.add(out, reasons)
                    rows += table.num_rows

            try:
                reader = pacsv.open_csv(
                    ts,
                    read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if header else 0,
                                                   block_size=block),
                    parse_options=pacsv.ParseOptions(delimiter=delim, invalid_row_handler=on_invalid,
                                                     newlines_in_values=False),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=[n for n in names if n in mapped], column_types=types,
                        quoted_strings_can_be_null=True))
                for rb in reader:
                    if rb.num_rows:
                        held.append(rb)
                    validate(False)
                    # Rows the reader skipped so far (it reports them as it parses, possibly ahead; its
                    # threads may append while we take them: take a prefix, then drop it).
                    got = bad_rows[:len(bad_rows)]
                    del bad_rows[:len(got)]
                    n_bad += len(got)
                    if error is None:
                        stage.add_bad(got)
                    if ts.failed:
                        break
                validate(True)
            except pa.ArrowInvalid as exc:
                if ts.failed:
                    raise fail(None) from None
                if _is_utf8_error(exc):
                    raise fail("not valid UTF-8 text", lambda: ts.lines - header) from None
                if "straddl" in str(exc) and block < _WHOLE_BLOCK_BYTES:  # a line longer than a block
                    stage.reset()
                    block = _WHOLE_BLOCK_BYTES
                    continue
                if mode == "typed":  # as parse_bytes: read the whole file again, every column as text
                    stage.reset()
                    mode = "string"
                    continue
                raise fail(f"unparseable {fmt}: {str(exc).splitlines()[0][:160]}",
                           lambda: ts.lines - header) from None
            if ts.failed:
                raise fail(None)
            n_bad += len(bad_rows)
            if error is None:
                stage.add_bad(bad_rows)
            rows_read = rows + n_bad
            if rows == 0 and n_bad:
                raise fail(f"no row has the expected {len(names)} fields (the first has {actual[0] if actual else '?'}): "
                           "wrong delimiter or wrong format", rows_read)
            if notes is None:  # no data row at all: the header alone decides
                notes = []
                empty = pa.table({n: pa.array([], types[n]) for n in names if n in mapped})
                _, _, error = _canonicalise(empty, list(names), params.allow_missing_channels, mode == "string", notes)
            if error is not None:
                raise fail(error, rows_read)
            return rows_read, notes


def _stream_parquet(fs: Any, path: str, params: IngestParams, stage: _Staged) -> tuple[int, list[str]]:
    """Read a Parquet file ``batch_rows`` rows at a time into ``stage``; return (rows read, notes).

    Raises:
        _StreamError: the file is unreadable, empty or lacks required columns.
    """
    notes: list[str] | None = None
    error = None
    with fs.open(path, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh)
            n = pf.metadata.num_rows
            if n == 0:
                raise _StreamError("no data rows (empty Parquet file)", 0)
            lineage = set(C.LINEAGE)
            names = [c for c in pf.schema_arrow.names if c not in lineage and c not in ("asset", "dataset")]
            rows = 0
            for rb in pf.iter_batches(batch_size=params.batch_rows, columns=names):
                if error is None:
                    batch_notes: list[str] = []
                    table = pa.Table.from_batches([rb]).select(names)
                    out, reasons, error = _canonicalise(table, names, params.allow_missing_channels, False,
                                                        batch_notes, offset=rows)
                    notes = batch_notes if notes is None else notes
                    if error is None:
                        stage.add(out, reasons)
                rows += rb.num_rows
        except (pa.ArrowException, OSError) as exc:
            stage.discard()
            raise _StreamError(_parquet_error(exc), 0) from None
        except _StreamError:
            stage.discard()
            raise
    if error is not None:
        stage.discard()
        raise _StreamError(error, n)
    return n, notes or []


def _quarantine_file_stream(fs: Any, path: str, src: SourceFile, reason: str, quarantine: Path,
                            batch_id: str, sha: str) -> None:
    """:func:`_quarantine_file` of a file too large to hold: copy it in chunks."""
    folder = quarantine / "files" / file_id(src.path)
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{base}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open(path, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, _CHUNK_BYTES)
        os.replace(tmp, folder / base)
    finally:
        tmp.unlink(missing_ok=True)
    _atomic_write_bytes(json.dumps({"source": src.path, "reason": reason, "batch_id": batch_id,
                                    "sha256": sha}, indent=2).encode(), folder / "reason.txt")


def _process_streamed(src: SourceFile, params: IngestParams, staging: Path, quarantine: Path, batch_id: str,
                      so: dict[str, Any], out: FileOutcome) -> FileOutcome | None:
    """:func:`process_file` for a large file, with memory bounded by ``params.batch_rows``, not its size.

    Returns None for the one kind of file it leaves to the whole-file path: gzip-compressed Parquet
    (Parquet needs random access).
    """
    fs, path = _fs(src.path, so)
    try:
        sha, size = _hash_stream(fs, path)
        with fs.open(path, "rb") as fh:
            magic = fh.read(2)
            fh.seek(0)
            gz = magic == b"\x1f\x8b" or src.path.lower().endswith(_COMPRESSION_SUFFIXES)
            try:
                head = gzip.GzipFile(fileobj=fh, mode="rb").read(8) if gz else fh.read(8)
            except (OSError, EOFError, zlib.error):
                head = b""
    except FileNotFoundError:
        out.status, out.reason = "deferred", _DISAPPEARED
        return out
    if _stat(src.path, so) != (src.size, src.mtime_ns) or size != src.size:
        out.status, out.reason = "deferred", _CHANGED
        return out
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    fmt = detect_format(base, head, params.format)
    if fmt == "parquet" and gz:
        return None
    out.sha256, out.format = sha, fmt
    stage = _Staged(staging / out.file_id, out.file_id, src.path, batch_id, params.stuck_window)
    try:
        if fmt == "parquet":
            rows_read, notes = _stream_parquet(fs, path, params, stage)
        else:
            rows_read, notes = _stream_text(fs, path, gz, fmt, params, stage)
    except _StreamError as exc:
        if exc.reason.startswith("corrupt gzip"):
            out.format = params.format
        if _stat(src.path, so) != (src.size, src.mtime_ns):
            out.status, out.reason = "deferred", _CHANGED
            return out
        out.status, out.reason = "quarantined", exc.reason
        out.rows_read = out.rows_quarantined = exc.rows_read
        _quarantine_file_stream(fs, path, src, exc.reason, quarantine, batch_id, sha)
        return out
    except FileNotFoundError:
        stage.discard()
        out.status, out.reason = "deferred", _DISAPPEARED
        return out
    if _stat(src.path, so) != (src.size, src.mtime_ns):
        stage.discard()
        out.status, out.reason = "deferred", _CHANGED
        return out
    out.notes, out.rows_read = notes, rows_read
    stage.finish(out)
    return out


def _reason_kinds(reasons: list[str], kinds: dict[str, int]) -> dict[str, int]:
    for r in reasons:
        k = re.sub(r"[:(].*", "", r).strip()
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def _summarise_reasons(quar: pa.Table, top: int = 3) -> str:
    if quar.num_rows == 0:
        return ""
    return _summarise_kinds(_reason_kinds(quar.column("reason").to_pylist(), {}), top)


def _summarise_kinds(kinds: dict[str, int], top: int = 3) -> str:
    parts = sorted(kinds.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{k} x{v}" for k, v in parts)


# --- Ledger --------------------------------------------------------------------------------------


class Ledger:
    """Per-lake SQLite ledger: source -> content hash, counts, status; (dataset, asset, source) -> extent.

    Only the ingest flow process writes it, while it holds the lake lock; readers may open it any time.
    """

    def __init__(self, lake: Path):
        lake.mkdir(parents=True, exist_ok=True)
        self.path = lake / LEDGER_NAME
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives process crashes (the failure we design for); only power loss can drop
        # the last commits, which the next run then redoes idempotently.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS files (
                source TEXT PRIMARY KEY, dataset TEXT NOT NULL, file_id TEXT NOT NULL,
                sha256 TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, batch_id TEXT NOT NULL,
                status TEXT NOT NULL, reason TEXT, rows_read INTEGER, rows_written INTEGER,
                rows_quarantined INTEGER, committed_at REAL, params_digest TEXT);
            CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
            CREATE INDEX IF NOT EXISTS files_dataset ON files(dataset);
            CREATE TABLE IF NOT EXISTS extents (
                dataset TEXT NOT NULL, asset_id TEXT NOT NULL, file_id TEXT NOT NULL, source TEXT NOT NULL,
                tmin INTEGER, tmax INTEGER, rows INTEGER, PRIMARY KEY (dataset, asset_id, file_id));
            CREATE INDEX IF NOT EXISTS extents_file ON extents(file_id);
            CREATE TABLE IF NOT EXISTS batches (
                batch_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, files INTEGER,
                rows_read INTEGER, rows_written INTEGER, rows_quarantined INTEGER, status TEXT);
            """
        )

    def close(self) -> None:
        self.conn.close()

    def files(self) -> dict[str, dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM files")
        cols = [d[0] for d in cur.description]
        return {row[0]: dict(zip(cols, row)) for row in cur.fetchall()}

    def ingested_with_hash(self, sha: str, dataset: str) -> str | None:
        row = self.conn.execute(
            "SELECT source FROM files WHERE sha256=? AND dataset=? AND status='ingested' LIMIT 1",
            (sha, dataset)).fetchone()
        return row[0] if row else None

    def overlapping(self, dataset: str, asset: str, fid: str, tmin: int, tmax: int) -> list[str]:
        rows = self.conn.execute(
            "SELECT file_id FROM extents WHERE dataset=? AND asset_id=? AND file_id<>? AND tmax>=? AND tmin<=?",
            (dataset, asset, fid, tmin, tmax)).fetchall()
        return [r[0] for r in rows]

    def assets_of(self, fid: str) -> list[tuple[str, str]]:
        return self.conn.execute("SELECT dataset, asset_id FROM extents WHERE file_id=?", (fid,)).fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def record(self, o: FileOutcome, batch_id: str) -> None:
        """Record a file outcome (and replace its extents) in one transaction."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (o.source, o.dataset, o.file_id, o.sha256, o.size, o.mtime_ns, batch_id, o.status,
                 o.reason, o.rows_read, o.rows_written, o.rows_quarantined, time.time(), o.params_digest))
            c.execute("DELETE FROM extents WHERE file_id=?", (o.file_id,))
            c.executemany(
                "INSERT INTO extents VALUES (?,?,?,?,?,?,?)",
                [(o.dataset, a, o.file_id, o.source, e.tmin, e.tmax, e.rows) for a, e in o.assets.items()])

    def touch(self, source: str, size: int, mtime_ns: int) -> None:
        """Record a new size/mtime for a source whose content hash did not change."""
        with self.transaction() as c:
            c.execute("UPDATE files SET size=?, mtime_ns=? WHERE source=?", (size, mtime_ns, source))

    def record_batch(self, batch_id: str, started: float, outcomes: list[FileOutcome], status: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO batches VALUES (?,?,?,?,?,?,?,?)",
                      (batch_id, started, time.time(), len(outcomes), sum(o.rows_read for o in outcomes),
                       sum(o.rows_written for o in outcomes), sum(o.rows_quarantined for o in outcomes), status))

    def snapshot(self, lake_path: str, dataset: str) -> LakeSnapshot | None:
        """The dataset as the ledger knows it (None when no file of it was ingested)."""
        rows = self.conn.execute(
            "SELECT source, sha256, rows_read, rows_written, rows_quarantined, status, batch_id, file_id "
            "FROM files WHERE dataset=? AND status='ingested' ORDER BY committed_at, source",
            (dataset,)).fetchall()
        if not rows:
            return None
        files = [FileRef(path=r[0], sha256=r[1], rows_read=r[2], rows_written=r[3], rows_quarantined=r[4],
                         status=r[5], lake_file=r[7]) for r in rows]
        return LakeSnapshot(lake_path=lake_path, dataset=dataset, batch_id=rows[-1][6], files=files,
                            rows=sum(r[3] for r in rows))


def latest_snapshot(lake_path: str, dataset: str) -> LakeSnapshot | None:
    """The ingested state of a lake dataset from its ledger, without ingesting anything.

    For stages run on their own (``twinflow run features --param dataset=...``): the snapshot lists the
    contributing files and hashes, so its digest changes exactly when the data does. Returns None when
    the lake has no ledger or the dataset no ingested file (e.g. data written by :func:`write_lake_table`).
    """
    lake = local_path(lake_path)
    if not (lake / LEDGER_NAME).exists():
        return None
    ledger = Ledger(lake)
    try:
        return ledger.snapshot(str(lake), dataset)
    finally:
        ledger.close()


@contextlib.contextmanager
def lake_lock(lake: Path, timeout_s: float) -> Iterator[None]:
    """Hold the lake's ingest lock (one ingest run per lake at a time); wait up to ``timeout_s``.

    Raises:
        AlreadyRunning: the lock was not released in time.
    """
    lake.mkdir(parents=True, exist_ok=True)
    with open(lake / LOCK_NAME, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AlreadyRunning(f"another ingest run holds {lake / LOCK_NAME} for more than "
                                         f"{timeout_s:g}s; wait for it or raise lock_timeout_s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- Commit: publish staged files, cross-file duplicate keys, ledger ------------------------------


def _drop_cross_file_duplicates(o: FileOutcome, ledger: Ledger, lake: Path, batch_id: str) -> None:
    """Quarantine staged rows whose (asset, cycle) another source already holds in the lake."""
    staged = Path(o.staged) if o.staged else None
    extra: list[pa.Table] = []
    for asset, ext in list(o.assets.items()):
        others = ledger.overlapping(o.dataset, asset, o.file_id, ext.tmin, ext.tmax)
        if not others:
            continue
        part = lake / f"dataset={o.dataset}" / asset_dir(asset)
        taken = pa.concat_tables([pq.read_table(part / f"{f}.parquet", columns=[C.TIME]) for f in others
                                  if (part / f"{f}.parquet").exists()] or [pa.table({C.TIME: pa.array([], pa.int32())})])
        path = staged / "lake" / asset_dir(asset) / f"{o.file_id}.parquet"
        rows = pq.read_table(path)
        dup = pc.is_in(rows.column(C.TIME), value_set=taken.column(C.TIME).combine_chunks())
        ndup = pc.sum(dup).as_py() or 0
        if not ndup:
            continue
        bad = rows.filter(dup)
        reasons = [f"duplicate key ({C.ASSET}={asset}, {C.TIME}={c}): already in the lake from another file"
                   for c in bad.column(C.TIME).to_pylist()]
        q = _quarantine_rows(bad.select([C.ASSET, C.TIME]).append_column(
            "record", pa.nulls(bad.num_rows, pa.int64())), reasons, o.source, batch_id)
        extra.append(q)
        keep = rows.filter(pc.invert(dup))
        if keep.num_rows:
            _atomic_write_table(keep, path)
            cyc = keep.column(C.TIME)
            o.assets[asset] = AssetExtent(rows=keep.num_rows, tmin=pc.min(cyc).as_py(), tmax=pc.max(cyc).as_py())
        else:
            path.unlink()
            del o.assets[asset]
        o.rows_written -= ndup
        o.rows_quarantined += ndup
    if extra:
        qpath = staged / "quarantine.parquet"
        old = [pq.read_table(qpath)] if qpath.exists() else []
        _atomic_write_table(pa.concat_tables(old + extra), qpath)
        o.reason = "; ".join(filter(None, [o.reason, f"duplicate key across files x{sum(t.num_rows for t in extra)}"]))


def commit_outcomes(outcomes: list[FileOutcome], ledger: Ledger, lake: Path, quarantine: Path,
                    batch_id: str) -> list[FileOutcome]:
    """Publish staged files of a batch and record them in the ledger, in source order.

    Per file: an unchanged hash only refreshes size/mtime; content already ingested from another source
    is skipped as a duplicate; otherwise rows whose keys another source holds are quarantined, staged
    files are renamed into place (replacing this source's previous version), assets of the previous
    version that the new one lacks are removed, and the ledger row is written. Deferred files are not
    recorded, so the next run reads them again. Must run under :func:`lake_lock`.
    """
    known = ledger.files()
    done = []
    for o in sorted(outcomes, key=lambda o: o.source):
        prev = known.get(o.source)
        if o.status == "deferred":
            done.append(o)
            continue
        if prev and (prev["sha256"], prev["dataset"], prev["params_digest"]) == \
                (o.sha256, o.dataset, o.params_digest):
            ledger.touch(o.source, o.size, o.mtime_ns)
            _discard(o)
            done.append(o.model_copy(update=dict(status="unchanged", rows_read=0, rows_written=0,
                                                 rows_quarantined=0, assets={}, staged=None)))
            continue
        twin = ledger.ingested_with_hash(o.sha256, o.dataset) if o.status == "ingested" else None
        if twin and twin != o.source:
            _discard(o)
            o = o.model_copy(update=dict(status="duplicate", reason=f"same content as {twin}", rows_read=0,
                                         rows_written=0, rows_quarantined=0, assets={}, staged=None))
            _remove_previous(o, ledger, lake, quarantine, keep=set())
            ledger.record(o, batch_id)
            done.append(o)
            continue
        if o.status == "ingested":
            _drop_cross_file_duplicates(o, ledger, lake, batch_id)
        _publish(o, ledger, lake, quarantine)
        ledger.record(o, batch_id)
        done.append(o)
    return done


def _discard(o: FileOutcome) -> None:
    if o.staged:
        shutil.rmtree(o.staged, ignore_errors=True)


def _remove_previous(o: FileOutcome, ledger: Ledger, lake: Path, quarantine: Path, keep: set[str]) -> None:
    for dataset, asset in ledger.assets_of(o.file_id):
        if dataset == o.dataset and asset in keep:
            continue
        (lake / f"dataset={dataset}" / asset_dir(asset) / f"{o.file_id}.parquet").unlink(missing_ok=True)
    for q in quarantine.glob(f"rows/dataset=*/{o.file_id}.parquet"):
        if q.parent.name != f"dataset={o.dataset}" or o.rows_quarantined == 0 or o.status != "ingested":
            q.unlink(missing_ok=True)


def _publish(o: FileOutcome, ledger: Ledger, lake: Path, quarantine: Path) -> None:
    dataset_dir = lake / f"dataset={o.dataset}"
    if o.staged:
        staged = Path(o.staged)
        for asset in o.assets:
            target = dataset_dir / asset_dir(asset) / f"{o.file_id}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / "lake" / asset_dir(asset) / f"{o.file_id}.parquet", target)
        qsrc = staged / "quarantine.parquet"
        if qsrc.exists():
            qdst = quarantine / "rows" / f"dataset={o.dataset}" / f"{o.file_id}.parquet"
            qdst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(qsrc, qdst)
    _remove_previous(o, ledger, lake, quarantine, keep=set(o.assets))
    if o.status != "quarantined":  # an earlier, unparseable version of this source is history now
        shutil.rmtree(quarantine / "files" / o.file_id, ignore_errors=True)
    _discard(o)
    o.staged = None


def plan_files(files: list[SourceFile], known: dict[str, dict[str, Any]],
               params: IngestParams) -> tuple[list[SourceFile], int]:
    """Files to read: new, with another size/mtime than the ledger recorded (the hash decides later), or
    ingested under other parsing parameters.

    Returns:
        (files to read, number of files skipped as unchanged).
    """
    def same(f: SourceFile) -> bool:
        k = known.get(f.path)
        digest = params.digest(params.dataset or dataset_name(f.path))
        return k is not None and (k["size"], k["mtime_ns"], k["params_digest"]) == (f.size, f.mtime_ns, digest)

    todo = [f for f in files if not same(f)]
    return todo, len(files) - len(todo)


def run_local(params: IngestParams, lake_path: str, quarantine_path: str, batch_id: str) -> list[FileOutcome]:
    """Ingest sequentially in this process, without Prefect or Dask (tests, debugging, tiny folders).

    Same plan, processing and commit as the ``ingest`` flow, under the same lake lock.
    """
    lake, quarantine = local_path(lake_path), local_path(quarantine_path)
    with lake_lock(lake, params.lock_timeout_s):
        ledger = Ledger(lake)
        try:
            files = list_landing(params.landing, params.storage_options, params.include, params.exclude)
            todo, _ = plan_files(files, ledger.files(), params)
            staging = lake / STAGING_DIR / batch_id
            outcomes = [process_file(f, params, staging, quarantine, batch_id, params.storage_options)
                        for f in todo]
            done = commit_outcomes(outcomes, ledger, lake, quarantine, batch_id)
            shutil.rmtree(staging, ignore_errors=True)
            return done
        finally:
            ledger.close()


# --- Prefect task: one batch of files -------------------------------------------------------------


@task(name="ingest-batch", retries=2, retry_delay_seconds=[2, 10], task_run_name="ingest-batch-{index}")
def process_batch(index: int, files: list[SourceFile], params: IngestParams, staging: str,
                  quarantine: str, batch_id: str, storage_options: dict[str, Any]) -> list[FileOutcome]:
    """Read, validate and stage a batch of files on one Dask worker (I/O-bound: retried with backoff)."""
    from prefect import get_run_logger

    outcomes = [process_file(f, params, Path(staging), Path(quarantine), batch_id, storage_options)
                for f in files]
    get_run_logger().info("batch %d: %d files, %d rows read, %d written, %d quarantined", index, len(files),
                          sum(o.rows_read for o in outcomes), sum(o.rows_written for o in outcomes),
                          sum(o.rows_quarantined for o in outcomes))
    return outcomes


# --- Reading and writing the lake for other stages ----------------------------------------------


def _asset_partitioning():
    import pyarrow.dataset as ds

    return ds.partitioning(pa.schema([("asset", pa.string())]), flavor="hive")


def read_lake(snapshot: LakeSnapshot, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
    """Read a lake dataset as one Arrow table sorted by (asset_id, cycle).

    When the snapshot lists files with their lake file ids (snapshots returned by ingest), only those
    sources' rows are read; otherwise every file of the dataset folder is.

    Args:
        snapshot: The dataset reference.
        columns: Columns to read (default: all canonical columns).
        filter: Optional ``pyarrow.dataset`` expression.
    """
    import pyarrow.dataset as ds

    root = snapshot.dataset_path
    ids = {f.lake_file for f in snapshot.files if getattr(f, "lake_file", None)}
    if ids:
        paths = [str(p) for p in Path(root).glob("asset=*/*.parquet") if p.stem in ids]
        dset = ds.dataset(paths, format="parquet", partitioning=_asset_partitioning(),
                          partition_base_dir=root, schema=C.telemetry_schema())
    else:
        dset = ds.dataset(root, format="parquet", partitioning=_asset_partitioning())
    cols = columns or [f.name for f in C.telemetry_schema()]
    table = dset.to_table(columns=cols, filter=filter)
    sort_keys = [(k, "ascending") for k in (C.ASSET, C.TIME) if k in table.column_names]
    return table.sort_by(sort_keys) if sort_keys else table


def conform(table: pa.Table, batch_id: str, source_file: str = "generated") -> pa.Table:
    """Cast a table to the canonical telemetry schema, adding null channels and lineage columns."""
    schema = C.telemetry_schema()
    n = table.num_rows
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        elif field.name == "source_file":
            cols.append(pa.array([source_file] * n, pa.string()))
        elif field.name == "batch_id":
            cols.append(pa.array([batch_id] * n, pa.string()))
        elif field.name == "quality":
            cols.append(pa.array(np.zeros(n, np.int32)))
        elif field.nullable:
            cols.append(pa.nulls(n, field.type))
        else:
            raise ConfigError(f"table lacks required column {field.name!r}")
    return pa.Table.from_arrays(cols, schema=schema)


def write_lake_table(table: pa.Table, lake_path: str, dataset: str, batch_id: str) -> LakeSnapshot:
    """Write a table into the lake layout directly (e.g. a generated fleet), one atomic file per asset.

    Files are named ``<batch_id>.parquet``, so writing the same batch again replaces it. This bypasses the
    ingest ledger and validation: use it for data twinflow generated itself.

    Returns:
        A snapshot of this batch, whose digest is the content hash of the written files.
    """
    lake = local_path(lake_path)
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", batch_id):
        raise ConfigError(f"batch_id {batch_id!r} must be letters, digits, '_', '-' or '.'")
    t = conform(table, batch_id)
    t = t.take(pc.sort_indices(t, [(C.ASSET, "ascending"), (C.TIME, "ascending")]))
    h = hashlib.sha256()
    for asset, rows in split_by_asset(t):
        path = lake / f"dataset={dataset}" / asset_dir(asset) / f"{batch_id}.parquet"
        buf = pa.BufferOutputStream()
        _write_parquet(rows, buf)
        data = buf.getvalue().to_pybytes()
        h.update(asset.encode())
        h.update(data)
        _atomic_write_bytes(data, path)
    ref = FileRef(path=f"generated:{dataset}/{batch_id}", sha256=h.hexdigest(), rows_read=t.num_rows,
                  rows_written=t.num_rows, lake_file=batch_id)
    return LakeSnapshot(lake_path=str(lake), dataset=dataset, batch_id=batch_id, files=[ref], rows=t.num_rows)


def read_quarantine(quarantine_path: str, dataset: str | None = None) -> pa.Table:
    """Read quarantined rows (all datasets, or one), with a ``dataset`` column."""
    import pyarrow.dataset as ds

    root = local_path(quarantine_path) / "rows"
    if dataset:
        root = root / f"dataset={dataset}"
    if not root.exists():
        return C.quarantine_schema().empty_table()
    dset = ds.dataset(str(root), format="parquet", partitioning="hive", schema=None)
    return dset.to_table()
