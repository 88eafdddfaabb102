"""Streaming: files larger than ``stream_threshold_bytes``, hashed, parsed and validated batch by batch.

Hashed in 8 MiB reads, parsed by pyarrow's streaming readers (``pyarrow.csv.open_csv`` over a
decompressing, line-aligned text stream; ``ParquetFile.iter_batches``) and validated ``batch_rows`` rows at
a time, with the validation state carried from batch to batch, so that the lake, the quarantine and the
counts are exactly those of reading the file whole. Memory follows the batch (plus the few 1 MiB CSV
blocks pyarrow reads ahead, or a Parquet row group), plus 16 bytes per kept row for the key check; an
asset whose stuck-sensor verdict needs all its rows is re-read whole from staging once the last batch is in.
"""

from __future__ import annotations
import gzip
import hashlib
import io
import os
import shutil
import zlib
from pathlib import Path
from typing import Any
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from twinflow import contracts as C
from twinflow import lake as lk
from twinflow.contract import FleetContract

from twinflow.tasks.ingest.landing import CHANGED, DISAPPEARED, open_fs, stat_file
from twinflow.tasks.ingest.names import COMPRESSION_SUFFIXES, detect_format
from twinflow.tasks.ingest.params import AssetExtent, FileOutcome, IngestParams, SourceFile, with_rows_note
from twinflow.tasks.ingest.parse import (BadRows, NON_BLANK, NO_COLUMNS, NO_HEADER, WHOLE_BLOCK_BYTES, canonicalise,
                                         count_lines, csv_options, first_line_is_data, gzip_error, gzip_reason,
                                         is_utf8_error, normalise_whitespace, parquet_error, parquet_footer_rows,
                                         source_columns, strip_bom, types_for)
from twinflow.tasks.ingest.route import Route
from twinflow.tasks.ingest.quarantine import quarantine_file_stream, quarantine_rows, reason_kinds, summarise_kinds
from twinflow.tasks.ingest.stage import LAKE_DICT, concat_parquet, split_by_asset, staged_asset_path, time_extent
from twinflow.tasks.ingest.validate import FileState, stuck_quality, validate_batch

CHUNK_BYTES = 8 << 20  # read size when hashing, copying and decompressing a streamed file
# CSV block of the streaming reader. pyarrow reads several blocks ahead of the batch we validate (with
# 16 MiB blocks, ~120 MB of text was held whatever batch_rows was), so keep blocks small and coalesce them
# into batch_rows batches; a file with a longer line is read again with the block parse_bytes uses
# (where a yet longer line is an error).
BLOCK_BYTES = 1 << 20


def _hash_stream(fs: Any, path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class _TextStream(io.RawIOBase):
    """The text of a landing file as :func:`parse_bytes` sees it, in line-aligned chunks.

    Decompresses gzip, normalises the whitespace of header-less text chunk by chunk (every chunk ends with a newline, so
    this equals normalising the whole text), and checks as it goes what :func:`parse_bytes` checks on the
    whole text: gzip integrity, UTF-8 (with the same byte offset), non-blank lines. After an error it reads
    as the end of the file; :meth:`drain` reads the rest only to finish the counts and checks.
    """

    def __init__(self, fh: Any, gz: bool, text: bool, count: bool = False):
        self._src = gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh
        self._count = count
        self._text = text  # header-less whitespace-separated text: normalise its whitespace
        self._pending: list[bytes] = []  # checked chunks read ahead (header, blank-file checks)
        self._cur = b""
        self._off = 0
        self._carry = b""
        self._eof = False
        self._first = True  # a UTF-8 BOM before the first line is dropped, as parse_bytes drops it
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
                data = self._src.read(CHUNK_BYTES)
            except (OSError, EOFError, zlib.error) as exc:
                self.gzip_error = gzip_reason(exc)
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
            if self._first:
                chunk, self._first = strip_bom(chunk), False
            if self._text:
                chunk = normalise_whitespace(chunk)
            if not chunk:
                continue
            if self._count:
                self.lines += count_lines(chunk)
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

    def __init__(self, folder: Path, fid: str, source: str, batch_id: str, window: int, contract: FleetContract):
        self.folder, self.fid, self.source, self.batch_id, self.window = folder, fid, source, batch_id, window
        self.contract = contract
        self._writers: dict[str, pq.ParquetWriter] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything staged so far (the file is read again from its start)."""
        self.discard()
        self.state = FileState()
        self.parts: dict[str, list[Path]] = {}
        self.assets: dict[str, AssetExtent] = {}
        self.rows_written = self.rows_quarantined = 0
        self.flagged: dict[str, int] = {}
        self.kinds: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self.channels: list[str] | None = None  # the contract channels the file holds
        self._k = 0

    def add(self, table: pa.Table, reasons: dict[int, str] | None) -> None:
        lake, quar, flagged = validate_batch(table, reasons, self.source, self.batch_id, self.window, self.state,
                                             self.contract)
        (self.folder / "parts").mkdir(parents=True, exist_ok=True)
        for asset, rows in split_by_asset(lake):
            path = self.folder / "parts" / f"{self._k}.parquet"  # one flat folder: no directory per asset
            self._k += 1
            # parts of the asset's data file: concatenated as they are
            lk.write_data_file(rows, path, contract=self.contract)
            self.parts.setdefault(asset, []).append(path)
            lo, hi = time_extent(rows, self.contract.key)
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
            self._quarantine(quarantine_rows(pa.table({}), [r for r, _ in bad_rows], self.source,
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
        reason_kinds(quar.column("reason").to_pylist(), self.kinds[kind == "bad"])

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
            target = staged_asset_path(self.folder, asset, self.fid)
            target.parent.mkdir(parents=True, exist_ok=True)
            if asset in suspects:  # the whole asset in time order decides (rare: stuck runs, disorder)
                rows = pa.concat_tables([pq.ParquetFile(p).read() for p in parts])
                rows, n = stuck_quality(rows.take(pc.sort_indices(rows, [(self.contract.key, "ascending")])),
                                         self.window, self.contract)
                stuck += n
                lk.write_data_file(rows, target, contract=self.contract)
            elif len(parts) == 1:
                os.replace(parts[0], target)
            else:  # batches kept this asset's times in order: concatenating the parts is the sorted asset
                concat_parquet(parts, target, LAKE_DICT)
        if stuck:
            self.flagged["stuck"] = self.flagged.get("stuck", 0) + stuck
        qparts = [self.folder / f"q-{k}.parquet" for k in ("rows", "bad") if (self.folder / f"q-{k}.parquet").exists()]
        if len(qparts) == 1:
            os.replace(qparts[0], self.folder / "quarantine.parquet")
        elif qparts:
            concat_parquet(qparts, self.folder / "quarantine.parquet", ["source_file", "batch_id", "reason"])
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
        out.reason = summarise_kinds(kinds) if kinds else ""


class _StreamError(Exception):
    """A file-level problem found while streaming: the whole file is quarantined."""

    def __init__(self, reason: str, rows_read: int, rows_note: str = ""):
        super().__init__(reason)
        self.reason, self.rows_read, self.rows_note = reason, rows_read, rows_note


def _stream_text(fs: Any, path: str, gz: bool, fmt: str, params: IngestParams,
                 stage: _Staged, route: Route) -> tuple[int, list[str]]:
    """Parse a CSV or header-less text file batch by batch into ``stage``; return (rows read, notes).

    Mirrors :func:`parse_bytes` decision for decision (typed read, then all-string read after a conversion
    error; the same file-level errors in the same order of precedence).

    Raises:
        _StreamError: the file as a whole is unusable.
    """
    contract = stage.contract
    columns = list(route.columns) if route.columns else None
    header = fmt == "csv" and columns is None
    mode, block = "typed", BLOCK_BYTES
    while True:
        with fs.open(path, "rb") as fh:
            ts = _TextStream(fh, gz, fmt == "text")

            def fail(reason: str | None, rows: Any = 0) -> _StreamError:
                ts.drain()
                stage.discard()
                if ts.utf8_error is not None or callable(rows):  # the counts need every line: read again
                    with fs.open(path, "rb") as again:
                        counted = _TextStream(again, gz, fmt == "text", count=True)
                        counted.drain()
                        ts.lines = counted.lines
                if ts.gzip_error:  # counted as parse_bytes counts it: lines up to the break
                    with fs.open(path, "rb") as again:
                        p = gzip_error(ts.gzip_error, again, path.rsplit("/", 1)[-1], route.format, columns)
                    return _StreamError(ts.gzip_error, p.rows_read, p.rows_note)
                if not ts.nonblank:
                    return _StreamError("empty file", 0)
                if ts.utf8_error is not None:
                    return _StreamError(f"not valid UTF-8 text (byte {ts.utf8_error})", max(ts.lines - header, 0))
                assert reason is not None
                return _StreamError(reason, rows() if callable(rows) else rows)

            text = ts.peek(lambda t: bool(t.strip()))
            if ts.failed or not text.strip():
                raise fail(None)
            if fmt == "text":
                if columns is None:
                    raise fail(NO_COLUMNS, lambda: ts.lines)
                delim, names = " ", list(columns)
            else:
                delim, names = route.delimiter, columns
            if header:
                first = text.split(b"\n", 1)[0].rstrip(b"\r")
                text = ts.peek(lambda t: NON_BLANK.search(t, len(first) + 1) is not None)
                if ts.failed:
                    raise fail(None)
                names = [h.strip().strip('"') for h in first.decode("utf-8").split(delim)]
                if first_line_is_data(names, contract):
                    raise fail(NO_HEADER, lambda: ts.lines)
                if NON_BLANK.search(text, len(first) + 1) is None:
                    raise fail("no data rows (header only)")
                if len(set(names)) != len(names):
                    raise fail(f"duplicate column names in header: {names}", lambda: ts.lines - 1)
            assert names is not None
            names, mapped = source_columns(names, contract)
            canon_of = {n: contract.canonical_name(n) for n in mapped}
            stage.channels = [c for c in contract.channel_names if c in canon_of.values()]
            types_ = types_for(contract)
            on_invalid = BadRows()
            bad_rows, actual = on_invalid.rows, on_invalid.actual

            types = {n: (types_[canon_of[n]] if mode == "typed" else pa.string()) for n in mapped}
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
                        out, reasons, error = canonicalise(table, list(names), params.allow_missing_channels,
                                                            mode == "string", batch_notes, offset=rows,
                                                            contract=contract)
                        notes = batch_notes if notes is None else notes
                        if error is None:
                            stage.add(out, reasons)
                    rows += table.num_rows

            try:
                reader = pacsv.open_csv(ts, **csv_options(names, mapped, types, header, delim, on_invalid, block))
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
                if is_utf8_error(exc):
                    raise fail("not valid UTF-8 text", lambda: ts.lines - header) from None
                if "straddl" in str(exc) and block < WHOLE_BLOCK_BYTES:  # a line longer than a block
                    stage.reset()
                    block = WHOLE_BLOCK_BYTES
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
                _, _, error = canonicalise(empty, list(names), params.allow_missing_channels, mode == "string", notes,
                                           contract=contract)
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
            canon = {stage.contract.canonical_name(c) for c in names}
            stage.channels = [c for c in stage.contract.channel_names if c in canon]
            rows = 0
            for rb in pf.iter_batches(batch_size=params.batch_rows, columns=names):
                if error is None:
                    batch_notes: list[str] = []
                    table = pa.Table.from_batches([rb]).select(names)
                    out, reasons, error = canonicalise(table, names, params.allow_missing_channels, False,
                                                        batch_notes, offset=rows, contract=stage.contract)
                    notes = batch_notes if notes is None else notes
                    if error is None:
                        stage.add(out, reasons)
                rows += rb.num_rows
        except (pa.ArrowException, OSError) as exc:
            stage.discard()
            with fs.open(path, "rb") as again:
                n, note = parquet_footer_rows(again)
            raise _StreamError(parquet_error(exc), n, note) from None
        except _StreamError:
            stage.discard()
            raise
    if error is not None:
        stage.discard()
        raise _StreamError(error, n)
    return n, notes or []


def process_streamed(src: SourceFile, params: IngestParams, staging: Path, quarantine: Path, batch_id: str,
                      so: dict[str, Any], out: FileOutcome, route: Route) -> FileOutcome | None:
    """:func:`process_file` for a large file, with memory bounded by ``params.batch_rows``, not its size.

    Returns None for the one kind of file it leaves to the whole-file path: gzip-compressed Parquet
    (Parquet needs random access).
    """
    fs, path = open_fs(src.path, so)
    try:
        sha, size = _hash_stream(fs, path)
        with fs.open(path, "rb") as fh:
            magic = fh.read(2)
            fh.seek(0)
            gz = magic == b"\x1f\x8b" or src.path.lower().endswith(COMPRESSION_SUFFIXES)
            try:
                head = gzip.GzipFile(fileobj=fh, mode="rb").read(8) if gz else fh.read(8)
            except (OSError, EOFError, zlib.error):
                head = b""
    except FileNotFoundError:
        out.status, out.reason = "deferred", DISAPPEARED
        return out
    if stat_file(src.path, so) != (src.size, src.mtime_ns) or size != src.size:
        out.status, out.reason = "deferred", CHANGED
        return out
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    fmt = detect_format(base, head, route.format)
    if fmt == "parquet" and gz:
        return None
    out.sha256, out.format = sha, fmt
    stage = _Staged(staging / out.file_id, out.file_id, src.path, batch_id, params.window(), params.fleet())
    try:
        if fmt == "parquet":
            rows_read, notes = _stream_parquet(fs, path, params, stage)
        else:
            rows_read, notes = _stream_text(fs, path, gz, fmt, params, stage, route)
    except _StreamError as exc:
        if exc.reason.startswith("corrupt gzip"):
            out.format = route.format
        if stat_file(src.path, so) != (src.size, src.mtime_ns):
            out.status, out.reason = "deferred", CHANGED
            return out
        out.status, out.reason = "quarantined", with_rows_note(exc.reason, exc.rows_note)
        out.rows_read = out.rows_quarantined = exc.rows_read
        out.rows_read_exact = not exc.rows_note
        quarantine_file_stream(fs, path, src, out.reason, stage.folder, batch_id, sha)
        out.staged = str(stage.folder)
        return out
    except FileNotFoundError:
        stage.discard()
        out.status, out.reason = "deferred", DISAPPEARED
        return out
    if stat_file(src.path, so) != (src.size, src.mtime_ns):
        stage.discard()
        out.status, out.reason = "deferred", CHANGED
        return out
    out.notes, out.rows_read = notes, rows_read
    out.channels = stage.channels
    out.params_digest = route.digest(params, out.channels)
    stage.finish(out)
    return out
