"""Quarantine: rows that break the contract and files that cannot be parsed, each with its reason.

Layout: ``<quarantine>/rows/dataset=<name>/<file_id>.parquet`` for rows and
``<quarantine>/files/<file_id>/`` (a copy of the file plus ``reason.txt``) for whole files.

File copies are staged like lake rows: the worker writes them into its batch staging folder
(``<staging>/<file_id>/file/``, :func:`quarantine_file`, :func:`quarantine_file_stream`) and the commit
publishes them (:func:`publish_file_quarantine`: moved to a hidden temp folder beside the target, then
renamed into place) at the point where it publishes the file's lake rows, before the ledger records the
outcome; so a crash leaves either the previous copy or the new one, and a quarantined file always has
its ledger row (``status='quarantined'``, its reason and counts).

File names: a landing name can be as long as the file system allows (255 bytes), so the names derived
from it must be bounded. The copy keeps the landing name when it fits in :data:`QUARANTINE_NAME_MAX`
bytes (and is not hidden nor ``reason.txt``); otherwise it is stored as ``<safe stem>~<12 hex of the
SHA-1 of the full name><original suffixes>``, at most :data:`QUARANTINE_NAME_MAX` bytes (the stem is
cut to fit; suffixes such as ``.csv.gz`` are kept when they are short and plain). The folder is the
file id (16 hex), temp names derive from the bounded name, and ``reason.txt`` keeps the full original
source path (``source``) and the stored name (``stored_as``).
"""

from __future__ import annotations
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any
import pyarrow as pa
from twinflow import contracts as C

from twinflow.lake import local_path
from twinflow.tasks.ingest.landing import open_fs, read_file_bytes
from twinflow.tasks.ingest.names import dataset_name, file_id
from twinflow.tasks.ingest.params import FileOutcome, IngestParams, SourceFile, with_rows_note
from twinflow.tasks.ingest.stage import atomic_write_bytes

log = logging.getLogger("twinflow.ingest")

QUARANTINE_NAME_MAX = 100  # bytes of a quarantined file's stored name (temp names add 14)


def quarantine_name(source: str) -> str:
    """The bounded, collision-free name under which a file's copy is stored (see the module docstring)."""
    base = source.rstrip("/").rsplit("/", 1)[-1]
    raw = base.encode("utf-8", "surrogateescape")
    if len(raw) <= QUARANTINE_NAME_MAX and base and not base.startswith(".") and base != "reason.txt":
        return base
    digest = hashlib.sha1(raw).hexdigest()[:12]
    m = re.search(r"(?:\.[A-Za-z0-9]{1,8}){1,3}$", base)
    suffix = m.group(0) if m else ""
    stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", base[: len(base) - len(suffix)]).strip("_") or "file"
    room = QUARANTINE_NAME_MAX - len(suffix) - len(digest) - 1
    return f"{stem[:room]}~{digest}{suffix}"


def quarantine_rows(rows: pa.Table, reasons: list[str], source: str, batch_id: str,
                     raw_text: list[str] | None = None) -> pa.Table:
    n = len(reasons)
    if raw_text is None:
        recs = rows.drop_columns(["record"]).to_pylist() if rows.num_rows else []
        raw_text = [json.dumps(r, default=str) for r in recs]
        record = rows.column("record") if rows.num_rows else pa.array([], pa.int64())
        asset = rows.column(C.ASSET).cast(pa.string()) if rows.num_rows else pa.array([], pa.string())
        # The ``cycle`` column holds cycle keys; rows of a timestamp clock keep their time in ``raw``.
        cycle = rows.column(C.TIME).cast(pa.int64()) if rows.num_rows and C.TIME in rows.column_names \
            else pa.nulls(rows.num_rows, pa.int64())
    else:
        record = pa.nulls(n, pa.int64())
        asset = pa.nulls(n, pa.string())
        cycle = pa.nulls(n, pa.int64())
    return pa.Table.from_arrays(
        [pa.repeat(pa.scalar(source, pa.string()), n), pa.repeat(pa.scalar(batch_id, pa.string()), n), record,
         pa.array(reasons, pa.string()), asset, cycle, pa.array(raw_text, pa.string())],
        schema=C.quarantine_schema())


def _reason_json(src: SourceFile, reason: str, batch_id: str, sha: str) -> bytes:
    return json.dumps({"source": src.path, "stored_as": quarantine_name(src.path), "reason": reason,
                       "batch_id": batch_id, "sha256": sha}, indent=2, ensure_ascii=False).encode()


def quarantine_file(data: bytes, src: SourceFile, reason: str, staged: Path, batch_id: str) -> None:
    """Stage the copy of an unusable file and its ``reason.txt`` in ``<staged>/file/`` (``staged`` is the
    file's staging folder); :func:`publish_file_quarantine` moves it into the quarantine at commit."""
    folder = staged / "file"
    shutil.rmtree(folder, ignore_errors=True)
    atomic_write_bytes(data, folder / quarantine_name(src.path))
    atomic_write_bytes(_reason_json(src, reason, batch_id, hashlib.sha256(data).hexdigest()), folder / "reason.txt")


def quarantine_file_stream(fs: Any, path: str, src: SourceFile, reason: str, staged: Path,
                            batch_id: str, sha: str | None = None) -> str:
    """:func:`quarantine_file` of a file too large to hold: copy it in chunks. Returns its SHA-256."""
    folder = staged / "file"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    name = quarantine_name(src.path)
    tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(8 << 20):
                h.update(chunk)
                fo.write(chunk)
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    sha = sha or h.hexdigest()
    atomic_write_bytes(_reason_json(src, reason, batch_id, sha), folder / "reason.txt")
    return sha


def publish_file_quarantine(staged: Path, quarantine: Path, fid: str) -> bool:
    """Move a staged file copy (``<staged>/file/``) to ``<quarantine>/files/<fid>/``, replacing any
    previous copy: moved to a hidden temp folder beside the target first (a copy when the staging is on
    another file system), then renamed into place. Returns whether there was one to publish."""
    src = staged / "file"
    if not src.is_dir():
        return False
    files = quarantine / "files"
    files.mkdir(parents=True, exist_ok=True)
    target = files / fid
    tag = uuid.uuid4().hex[:8]
    tmp, old = files / f".{fid}.{tag}.tmp", files / f".{fid}.{tag}.old"
    try:
        shutil.move(str(src), str(tmp))
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return True


def quarantine_after_error(src: SourceFile, params: IngestParams, staging: Path, batch_id: str,
                           storage_options: dict[str, Any], exc: BaseException,
                           logger: Any = None) -> FileOutcome:
    """The outcome of a file whose processing raised: the batch goes on without it.

    Whatever it staged is dropped and its bytes are staged for the file quarantine (status
    ``quarantined``, reason ``ingest error: <type>: <message>; rows: unknown``); when even that fails
    (unreadable, disk full), it is ``deferred`` with the reason, so the next run tries again.
    """
    from twinflow.tasks.ingest.route import route_file

    route = route_file(src.path, params)
    ds = route.dataset or params.dataset or dataset_name(src.path)
    fid = file_id(src.path)
    reason = f"ingest error: {type(exc).__name__}: {str(exc)[:300]}"
    (logger or log).warning("%s: %s (the other files of the batch go on)", src.path, reason)
    out = FileOutcome(source=src.path, dataset=ds, file_id=fid, size=src.size, mtime_ns=src.mtime_ns,
                      params_digest=route.digest(params), rows_read_exact=False)
    folder = staging / fid
    shutil.rmtree(folder, ignore_errors=True)
    try:
        if src.size > params.stream_threshold_bytes:
            fs, path = open_fs(src.path, storage_options)
            out.sha256 = quarantine_file_stream(fs, path, src, reason, folder, batch_id)
        else:
            data = read_file_bytes(src.path, storage_options)
            quarantine_file(data, src, reason, folder, batch_id)
            out.sha256 = hashlib.sha256(data).hexdigest()
    except Exception as exc2:  # noqa: BLE001 - the copy failed too: try the whole file again next run
        shutil.rmtree(folder, ignore_errors=True)
        out.status = "deferred"
        out.reason = f"{reason}; not copied to the quarantine ({type(exc2).__name__}: {str(exc2)[:120]})"
        return out
    out.status, out.reason, out.staged = "quarantined", with_rows_note(reason, "rows: unknown"), str(folder)
    return out


def reason_kind(reason: str) -> str:
    """The kind of a row's reason, without the row's values: ``discharge_pressure_bar=83.4 outside valid
    range [0, 40] bar`` -> ``discharge_pressure_bar outside valid range [0, 40] bar``; ``duplicate key
    (asset_id=7, ...)`` -> ``duplicate key``."""
    r = re.sub(r"^(\w+)=\S+ (outside valid range)", r"\1 \2", reason)
    return re.sub(r"[:(].*", "", r).strip()


def reason_kinds(reasons: list[str], kinds: dict[str, int]) -> dict[str, int]:
    for r in reasons:
        k = reason_kind(r)
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def summarise_reasons(quar: pa.Table, top: int = 3) -> str:
    if quar.num_rows == 0:
        return ""
    return summarise_kinds(reason_kinds(quar.column("reason").to_pylist(), {}), top)


def summarise_kinds(kinds: dict[str, int], top: int = 3) -> str:
    parts = sorted(kinds.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{k} x{v}" for k, v in parts)


def quarantine_rows_name(dataset: str, fid: str) -> str:
    """Where a source's quarantined rows lie, relative to the quarantine root (``dataset`` may be ``*``)."""
    return f"rows/dataset={dataset}/{fid}.parquet"


def read_quarantine(quarantine_path: str, dataset: str | None = None,
                    storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read quarantined rows (all datasets, or one), with a ``dataset`` column.

    ``quarantine_path`` may be an object-store URL (an ``s3://`` lake's ``_quarantine``), read with
    ``storage_options``.
    """
    import pyarrow.dataset as ds

    from twinflow import lake

    if not lake.is_local(quarantine_path):
        found = lake.find_objects(quarantine_path, quarantine_rows_name(dataset or "*", "*"), storage_options)
        if not found:
            return C.quarantine_schema().empty_table()
        with lake.store_errors(quarantine_path, storage_options):
            fs, root = lake.filesystem(quarantine_path, storage_options)
            base = f"{root.rstrip('/')}/rows"
            dset = ds.dataset([fs._strip_protocol(f) for f in found], filesystem=fs, format="parquet",
                              partitioning=ds.HivePartitioning.discover(), partition_base_dir=base)
            return dset.to_table()
    root = local_path(quarantine_path) / "rows"
    if dataset:
        root = root / f"dataset={dataset}"
    if not root.exists():
        return C.quarantine_schema().empty_table()
    dset = ds.dataset(str(root), format="parquet", partitioning="hive", schema=None)
    return dset.to_table()
