"""Commit: publish a batch's staged files into the lake and record them in the ledger, under the lake lock.
"""

from __future__ import annotations
import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Iterator
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from twinflow import contracts as C
from twinflow.errors import AlreadyRunning

from twinflow.tasks.ingest.lakeio import asset_dir
from twinflow.tasks.ingest.ledger import Ledger
from twinflow.tasks.ingest.params import AssetExtent, FileOutcome
from twinflow.tasks.ingest.quarantine import publish_file_quarantine, quarantine_rows
from twinflow.tasks.ingest.stage import atomic_write_table

LOCK_NAME = "_ingest.lock"


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
        q = quarantine_rows(bad.select([C.ASSET, C.TIME]).append_column(
            "record", pa.nulls(bad.num_rows, pa.int64())), reasons, o.source, batch_id)
        extra.append(q)
        keep = rows.filter(pc.invert(dup))
        if keep.num_rows:
            atomic_write_table(keep, path)
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
        atomic_write_table(pa.concat_tables(old + extra), qpath)
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
        publish_file_quarantine(staged, quarantine, o.file_id)
    _remove_previous(o, ledger, lake, quarantine, keep=set(o.assets))
    if o.status != "quarantined":  # an earlier, unparseable version of this source is history now
        shutil.rmtree(quarantine / "files" / o.file_id, ignore_errors=True)
    _discard(o)
    o.staged = None
