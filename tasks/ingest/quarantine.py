"""Quarantine: rows that break the contract and files that cannot be parsed, each with its reason.

Layout: ``<quarantine>/rows/dataset=<name>/<file_id>.parquet`` for rows and
``<quarantine>/files/<file_id>/`` (the file plus ``reason.txt``) for whole files.
"""

from __future__ import annotations
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any
import pyarrow as pa
from twinflow import contracts as C

from twinflow.tasks.ingest.landing import local_path
from twinflow.tasks.ingest.names import file_id
from twinflow.tasks.ingest.params import SourceFile
from twinflow.tasks.ingest.stage import atomic_write_bytes

def quarantine_rows(rows: pa.Table, reasons: list[str], source: str, batch_id: str,
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


def quarantine_file(data: bytes, src: SourceFile, reason: str, quarantine: Path, batch_id: str) -> None:
    folder = quarantine / "files" / file_id(src.path)
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    atomic_write_bytes(data, folder / base)
    atomic_write_bytes(
        json.dumps({"source": src.path, "reason": reason, "batch_id": batch_id,
                    "sha256": hashlib.sha256(data).hexdigest()}, indent=2).encode(),
        folder / "reason.txt")


def quarantine_file_stream(fs: Any, path: str, src: SourceFile, reason: str, quarantine: Path,
                            batch_id: str, sha: str) -> None:
    """:func:`quarantine_file` of a file too large to hold: copy it in chunks."""
    folder = quarantine / "files" / file_id(src.path)
    base = src.path.rstrip("/").rsplit("/", 1)[-1]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{base}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open(path, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 8 << 20)
        os.replace(tmp, folder / base)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(json.dumps({"source": src.path, "reason": reason, "batch_id": batch_id,
                                    "sha256": sha}, indent=2).encode(), folder / "reason.txt")


def reason_kinds(reasons: list[str], kinds: dict[str, int]) -> dict[str, int]:
    for r in reasons:
        k = re.sub(r"[:(].*", "", r).strip()
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def summarise_reasons(quar: pa.Table, top: int = 3) -> str:
    if quar.num_rows == 0:
        return ""
    return summarise_kinds(reason_kinds(quar.column("reason").to_pylist(), {}), top)


def summarise_kinds(kinds: dict[str, int], top: int = 3) -> str:
    parts = sorted(kinds.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{k} x{v}" for k, v in parts)


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
