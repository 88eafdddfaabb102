"""Process one landing file read whole: hash, parse, validate and stage its lake and quarantine rows.
"""

from __future__ import annotations
import hashlib
import shutil
import time
import zlib
from pathlib import Path
from typing import Any
import pyarrow as pa

from twinflow.tasks.ingest.landing import CHANGED, DISAPPEARED, read_file_bytes, stat_file
from twinflow.tasks.ingest.names import detect_format, file_id
from twinflow.tasks.ingest.params import (AssetExtent, FileOutcome, IngestParams, SourceFile, recent_window,
                                          with_rows_note)
from twinflow.tasks.ingest.parse import decompress, parse_bytes
from twinflow.tasks.ingest.quarantine import quarantine_file, quarantine_rows, summarise_reasons
from twinflow.tasks.ingest.route import route_file
from twinflow.tasks.ingest.stage import (atomic_write_lake_rows, atomic_write_table, split_by_asset,
                                         stage_tails, staged_asset_path, time_extent)
from twinflow.tasks.ingest.stream import process_streamed
from twinflow.tasks.ingest.validate import validate_table

def process_file(src: SourceFile, params: IngestParams, staging: Path, quarantine: Path,
                 batch_id: str, storage_options: dict[str, Any] | None = None) -> FileOutcome:
    """Read, hash, parse and validate one source file; stage its lake and quarantine Parquet files.

    Files larger than ``params.stream_threshold_bytes`` are streamed: hashed in chunks, parsed and
    validated ``params.batch_rows`` rows at a time (:func:`process_streamed`), with the same result as
    reading them whole. Nothing becomes visible in the lake here: staged files are published by :func:`commit_outcomes`.
    A file whose size or modification time changed while it was read is deferred to the next run.
    Files that cannot be parsed at all are copied to the quarantine folder with a reason. The file's
    route (dataset, format, columns) and its validation come from the fleet contract (``params.fleet()``).

    Raises:
        ValueError: the file is not telemetry under the contract (the ingest sequence never passes one).
    """
    so = storage_options or {}
    contract = params.fleet()
    route = route_file(src.path, params, contract)
    if not route.telemetry:
        raise ValueError(f"{src.path} is not telemetry: {route.note}")
    fid = file_id(src.path)
    out = FileOutcome(source=src.path, dataset=route.dataset, file_id=fid, size=src.size, mtime_ns=src.mtime_ns,
                      params_digest=route.digest(params))
    if params.settle_seconds and src.mtime_ns and \
            time.time() - src.mtime_ns / 1e9 < params.settle_seconds:
        out.status, out.reason = "deferred", f"modified less than {params.settle_seconds:g}s ago"
        return out
    if src.size > params.stream_threshold_bytes:
        done = process_streamed(src, params, staging, quarantine, batch_id, so, out, route)
        if done is not None:
            return done
    try:
        data = read_file_bytes(src.path, so)
    except FileNotFoundError:
        out.status, out.reason = "deferred", DISAPPEARED
        return out
    after = stat_file(src.path, so)
    if after is None or after != (src.size, src.mtime_ns) or len(data) != src.size:
        out.status, out.reason = "deferred", CHANGED
        return out
    out.sha256 = hashlib.sha256(data).hexdigest()
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    columns = list(route.columns) if route.columns else None
    parsed = parse_bytes(data, base, route.format, columns, route.delimiter, params.allow_missing_channels,
                         contract)
    out.notes = parsed.notes
    out.rows_read = parsed.rows_read
    try:
        out.format = detect_format(base, decompress(data, base)[:8], route.format)
    except (OSError, EOFError, zlib.error):
        out.format = route.format
    if parsed.file_error:
        out.status, out.reason = "quarantined", with_rows_note(parsed.file_error, parsed.rows_note)
        out.rows_quarantined = parsed.rows_read
        out.rows_read_exact = not parsed.rows_note
        folder = staging / fid
        shutil.rmtree(folder, ignore_errors=True)
        quarantine_file(data, src, out.reason, folder, batch_id)
        out.staged = str(folder)
        return out
    out.channels = [c for c in contract.channel_names if c in parsed.table.column_names]
    out.params_digest = route.digest(params, out.channels)
    lake, quar, flagged = validate_table(parsed.table, parsed.reasons, src.path, batch_id, params.window(), contract)
    if parsed.bad_rows:
        extra = quarantine_rows(pa.table({}), [r for r, _ in parsed.bad_rows], src.path, batch_id,
                                 raw_text=[t for _, t in parsed.bad_rows])
        quar = pa.concat_tables([quar, extra])
    folder = staging / fid
    if folder.exists():
        shutil.rmtree(folder)
    for asset, rows in split_by_asset(lake):
        atomic_write_lake_rows(rows, staged_asset_path(folder, asset, fid), contract)
        lo, hi = time_extent(rows, contract.key)
        out.assets[asset] = AssetExtent(rows=rows.num_rows, tmin=lo, tmax=hi)
    if lake.num_rows:
        # The rows are in memory now; the recent-rows refresh after the commit would read them back.
        stage_tails(lake, recent_window(params), contract, folder)
    if quar.num_rows:
        atomic_write_table(quar, folder / "quarantine.parquet")
    out.staged = str(folder)
    out.rows_written = lake.num_rows
    out.rows_quarantined = quar.num_rows
    out.flagged = {k: v for k, v in flagged.items() if v}
    out.reason = summarise_reasons(quar)
    return out
