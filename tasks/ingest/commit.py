"""Commit: publish a batch's staged rows into the lake's Delta tables and record them in the ledger.

One Delta transaction per dataset and batch: it adds the staged data files (the workers wrote them in
the table's own file format, so the commit moves them into place and rewrites nothing) and, in the
same commit, removes the files of every source read again, so readers see a source's old rows or its
new ones, never both or neither (:func:`twinflow.lake.commit_data_files`). Ordering makes a crash at any point safe:

1. the ledger writes an *intent* (the outcomes, the dataset and the application-transaction version
   the commit will carry);
2. quarantined rows and files are published (idempotent: named by the source's file id);
3. the Delta commit, carrying ``(twinflow-ingest, txn)``;
4. the ledger applies the intent (files, extents, the table's txn) and deletes it, in one SQLite
   transaction.

On an object-store lake the same steps run under the lake's writer lease (:func:`twinflow.lake.writer_lease`),
each ledger step is uploaded before the next (:meth:`Ledger.publish`), and the lease is checked once
more just before the Delta commit (``before_commit``).

:meth:`Ledger.recover` runs before each ingest: an intent whose txn the table already has is applied
(crash between 3 and 4: no row is written twice), any other is dropped (crash before 3: its files were
never recorded, so they are read again). Must run under :func:`lake_lock`.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twinflow import contracts as C
from twinflow import lake as lk
from twinflow.contract import FleetContract
from twinflow.tasks.ingest.landing import DUPLICATE_REASON
from twinflow.tasks.ingest.ledger import Ledger
from twinflow.tasks.ingest.params import AssetExtent, FileOutcome
from twinflow.tasks.ingest.quarantine import publish_file_quarantine, quarantine_rows, quarantine_rows_name
from twinflow.tasks.ingest.stage import (atomic_write_lake_rows, atomic_write_table, read_staged_tails,
                                         staged_asset_path, time_extent)

LOCK_NAME = "_ingest.lock"


@contextlib.contextmanager
def lake_lock(lake: Path | str, timeout_s: float, storage_options: dict[str, Any] | None = None,
              lease_ttl_s: float = 60.0) -> Iterator[Any]:
    """Hold the lake's ingest lock (one ingest run per lake at a time); wait up to ``timeout_s``.

    A local lake's is the lock file ``<lake>/_ingest.lock``; an object-store lake's is a lease under
    ``<lake>/_ingest.lock/`` (:func:`twinflow.lake.writer_lease`), which yields the lease.

    Raises:
        AlreadyRunning: the lock was not released in time (naming the holder).
    """
    with lk.writer_lease(str(lake), LOCK_NAME, timeout_s=timeout_s, ttl_s=lease_ttl_s,
                         what="ingest run on this lake (raise lock_timeout_s to wait longer)",
                         storage_options=storage_options) as lease:
        yield lease


class _BatchKeys:
    """Extents of the rows this batch has accepted so far, per (dataset, asset): earlier files win."""

    def __init__(self) -> None:
        self._by_asset: dict[tuple[str, str], list[tuple[int, int, Path]]] = {}

    def overlapping(self, dataset: str, asset: str, tmin: int, tmax: int) -> list[Path]:
        return [p for lo, hi, p in self._by_asset.get((dataset, asset), []) if hi >= tmin and lo <= tmax]

    def add(self, o: FileOutcome) -> None:
        for asset, ext in o.assets.items():
            self._by_asset.setdefault((o.dataset, asset), []).append(
                (ext.tmin, ext.tmax, staged_asset_path(Path(o.staged), asset, o.file_id)))


def _drop_cross_file_duplicates(o: FileOutcome, ledger: Ledger, lake_path: str, batch_id: str,
                                batch: _BatchKeys, rereading: set[str], contract: FleetContract,
                                rewritten: set[tuple[str, str]]) -> None:
    """Quarantine staged rows whose (asset, time) another source holds in the lake or earlier in this batch.

    Sources read again in this batch do not count with their lake rows: this commit replaces those.
    Each (source, asset) whose staged rows change is added to ``rewritten`` (its staged tail is stale).
    """
    key = contract.key
    staged = Path(o.staged) if o.staged else None
    extra: list[pa.Table] = []
    for asset, ext in list(o.assets.items()):
        others = [s for s in ledger.overlapping(o.dataset, asset, o.file_id, ext.tmin, ext.tmax)
                  if s not in rereading]
        earlier = batch.overlapping(o.dataset, asset, ext.tmin, ext.tmax)
        if not others and not earlier:
            continue
        taken = [lk.read_keys(lake_path, o.dataset, asset, others, storage_options=ledger.storage_options,
                              key=key)] if others else []
        taken += [pq.read_table(p, columns=[key]).column(key).combine_chunks() for p in earlier]
        path = staged_asset_path(staged, asset, o.file_id)
        rows = pq.read_table(path)
        ktype = rows.schema.field(key).type
        dup = pc.is_in(rows.column(key), value_set=pa.concat_arrays([t.cast(ktype) for t in taken]))
        ndup = pc.sum(dup).as_py() or 0
        if not ndup:
            continue
        bad = rows.filter(dup)
        shown = [c.isoformat().replace("+00:00", "Z") if hasattr(c, "isoformat") else c
                 for c in bad.column(key).to_pylist()]
        reasons = [f"duplicate key ({C.ASSET}={asset}, {key}={c}): already in the lake from another file"
                   for c in shown]
        keys = pa.table({C.ASSET: pa.repeat(pa.scalar(asset, pa.string()), bad.num_rows), key: bad.column(key),
                         "record": pa.nulls(bad.num_rows, pa.int64())})
        q = quarantine_rows(keys, reasons, o.source, batch_id)
        extra.append(q)
        keep = rows.filter(pc.invert(dup))
        rewritten.add((o.source, asset))
        if keep.num_rows:
            atomic_write_lake_rows(keep, path, contract)
            lo, hi = time_extent(keep, key)
            o.assets[asset] = AssetExtent(rows=keep.num_rows, tmin=lo, tmax=hi)
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


def commit_outcomes(outcomes: list[FileOutcome], ledger: Ledger, lake: Path | str, quarantine: Path | str,
                    batch_id: str, contract: FleetContract | None = None,
                    before_commit: Callable[[], None] | None = None,
                    tails: dict[str, lk.RecentTails] | None = None) -> list[FileOutcome]:
    """Publish the staged rows of a batch into the lake and record every outcome in the ledger.

    Per file, in source order: an unchanged hash only refreshes size/mtime; content already ingested
    from another source is a duplicate (its earlier rows, if any, are dropped); otherwise rows whose keys
    another source holds (in the lake, or earlier in this batch) are quarantined. Then one Delta commit
    per dataset appends the rows and replaces those of sources read again (see the module docstring for
    the crash-safe order). Deferred files are not recorded, so the next run reads them again.
    ``contract`` is the fleet contract the rows were validated with (default: the settings'): each
    table is written under it (:func:`twinflow.lake.commit_data_files` refuses a table of another).
    ``before_commit`` runs before each Delta commit (the object-store lease's check); the lake's
    object-store options are the ledger's. ``tails``, when given, receives per dataset what its commit
    added (:class:`twinflow.lake.RecentTails`, from the tails the workers staged), for the recent-rows
    refresh.
    """
    if contract is None:
        from twinflow.contract import resolve_contract

        contract = resolve_contract(None)
    lake_path = str(lake)
    known = ledger.files()
    done: list[FileOutcome] = []
    batch = _BatchKeys()
    rewritten: set[tuple[str, str]] = set()
    hashes: dict[tuple[str, str], str] = {}
    # What this batch read per source: a twin the ledger names is no twin if it now holds other content.
    read_now = {o.source: (o.sha256, o.status) for o in outcomes if o.status != "deferred"}
    # dataset -> (outcomes recorded with this commit, sources whose earlier rows it drops)
    plan: dict[str, tuple[list[FileOutcome], set[str]]] = {}

    def drop(dataset: str, source: str) -> None:
        plan.setdefault(dataset, ([], set()))[1].add(source)

    for o in sorted(outcomes, key=lambda o: o.source):
        prev = known.get(o.source)
        if o.status == "deferred":
            done.append(o)
            continue
        # A duplicate read again (its twin changed) is decided anew, even with the same content.
        if prev and prev["status"] != "duplicate" and (prev["sha256"], prev["dataset"], prev["params_digest"]) == \
                (o.sha256, o.dataset, o.params_digest):
            ledger.touch(o.source, o.size, o.mtime_ns)
            _discard(o)
            done.append(o.model_copy(update=dict(status="unchanged", rows_read=0, rows_written=0,
                                                 rows_quarantined=0, assets={}, staged=None)))
            continue
        twin = None
        if o.status == "ingested":
            twin = hashes.get((o.sha256, o.dataset)) or ledger.ingested_with_hash(o.sha256, o.dataset)
            if twin in read_now and read_now[twin] != (o.sha256, "ingested"):
                twin = hashes.get((o.sha256, o.dataset))
        if twin and twin != o.source:
            _discard(o)
            o = o.model_copy(update=dict(status="duplicate", reason=f"{DUPLICATE_REASON}{twin}", rows_read=0,
                                         rows_written=0, rows_quarantined=0, assets={}, staged=None))
        elif o.status == "ingested":
            _drop_cross_file_duplicates(o, ledger, lake_path, batch_id, batch, set(read_now), contract, rewritten)
            batch.add(o)
            hashes[(o.sha256, o.dataset)] = o.source
        if prev:
            drop(prev["dataset"], o.source)
        plan.setdefault(o.dataset, ([], set()))[0].append(o)
        done.append(o)

    # Datasets that only lose rows (a source moved to another dataset) go first: a crash between two
    # commits then leaves a source missing for a run (read again), never in two datasets.
    for dataset in sorted(plan, key=lambda d: (bool(plan[d][0]), d)):
        recorded, replaced = plan[dataset]
        added = _commit_dataset(dataset, recorded, replaced, ledger, lake_path, quarantine, batch_id, contract,
                                before_commit, rewritten if tails is not None else None)
        if added is not None:
            tails[dataset] = added
    return done


def _commit_dataset(dataset: str, recorded: list[FileOutcome], replaced: set[str], ledger: Ledger,
                    lake_path: str, quarantine: Path | str, batch_id: str, contract: FleetContract,
                    before_commit: Callable[[], None] | None = None,
                    rewritten: set[tuple[str, str]] | None = None) -> lk.RecentTails | None:
    """One dataset's commit (module docstring); with ``rewritten`` (the (source, asset) whose staged rows
    the committer changed), what it added, for the recent-rows refresh (None: no rows added, or not asked)."""
    with_rows = [o for o in recorded if o.staged and o.assets]
    added = None
    so = ledger.storage_options
    txn = ledger.next_txn(dataset, lk.transaction_version(lake_path, dataset, storage_options=so))
    ledger.begin(dataset, txn, batch_id, recorded)
    for o in recorded:
        _publish_quarantine(o, quarantine, so)
    if with_rows or replaced:
        files = [(staged_asset_path(Path(o.staged), asset, o.file_id), asset) for o in with_rows for asset in o.assets]
        if before_commit is not None:
            before_commit()
        if rewritten is not None and with_rows:
            added = _added(with_rows, rewritten, batch_id, bool(replaced), contract)
        v = lk.commit_data_files(lake_path, dataset, files, replace_sources=replaced | {o.source for o in with_rows},
                             txn=(lk.INGEST_APP_ID, txn),
                             metadata={"twinflow.operation": "ingest", "twinflow.batch_id": batch_id,
                                       "twinflow.files": str(len(recorded))}, contract=contract,
                             storage_options=so)
        if added is not None:
            added.version = v
    ledger.apply(dataset, txn)
    for o in recorded:
        _discard(o)
        o.staged = None
    return added


def _added(with_rows: list[FileOutcome], rewritten: set[tuple[str, str]], batch_id: str, removed: bool,
           contract: FleetContract) -> lk.RecentTails:
    """What a commit of these outcomes adds, with the tails their workers staged (read before the commit
    moves the staged files; ``version`` is set once it is known)."""
    parts: list[pa.Table] = []
    untailed: set[str] = set()
    added: dict[str, int] = {}
    window = None
    for o in with_rows:
        for asset, ext in o.assets.items():
            added[asset] = added.get(asset, 0) + ext.rows
        staged = read_staged_tails(Path(o.staged))
        stale = {a for s, a in rewritten if s == o.source}
        if staged is None:
            untailed |= set(o.assets)
            continue
        table, w = staged
        window = w if window is None else min(window, w)
        untailed |= stale
        if stale:
            table = table.filter(pc.invert(pc.is_in(table.column(C.ASSET), pa.array(sorted(stale), pa.string()))))
        parts.append(table)
    tails = pa.concat_tables(parts) if parts else lk.recent_tails(contract.lake_schema().empty_table(), 1, contract)
    return lk.RecentTails(version=-1, batch_id=batch_id, rows=window or 0, tails=tails, added=added,
                          untailed=frozenset(untailed), removed=removed)


def _discard(o: FileOutcome) -> None:
    if o.staged:
        shutil.rmtree(o.staged, ignore_errors=True)


def _publish_quarantine(o: FileOutcome, quarantine: Path | str, storage_options: dict[str, Any] | None = None
                        ) -> None:
    """Move a source's staged quarantined rows into place; drop those of its earlier versions."""
    if not lk.is_local(str(quarantine)):
        _publish_quarantine_remote(o, str(quarantine), storage_options)
        return
    quarantine = Path(quarantine)
    qsrc = Path(o.staged) / "quarantine.parquet" if o.staged else None
    for q in quarantine.glob(f"rows/dataset=*/{o.file_id}.parquet"):
        if q.parent.name != f"dataset={o.dataset}" or not (qsrc and qsrc.exists()):
            q.unlink(missing_ok=True)
    if qsrc is not None and qsrc.exists():
        qdst = quarantine / "rows" / f"dataset={o.dataset}" / f"{o.file_id}.parquet"
        qdst.parent.mkdir(parents=True, exist_ok=True)
        qsrc.replace(qdst)
    if o.staged:
        publish_file_quarantine(Path(o.staged), quarantine, o.file_id)
    if o.status != "quarantined":  # an earlier, unparseable version of this source is history now
        shutil.rmtree(quarantine / "files" / o.file_id, ignore_errors=True)


def _publish_quarantine_remote(o: FileOutcome, quarantine: str, storage_options: dict[str, Any] | None) -> None:
    """:func:`_publish_quarantine` on an object store: the new objects are uploaded first (each one PUT),
    then those of the source's earlier versions removed, so a crash leaves the old quarantine or the new
    one side by side, never a file without its reason (the ledger intent makes the commit run again)."""
    so = storage_options
    qsrc = Path(o.staged) / "quarantine.parquet" if o.staged else None
    has_rows = qsrc is not None and qsrc.exists()
    target = f"{quarantine}/{quarantine_rows_name(o.dataset, o.file_id)}"
    if has_rows:
        lk.put_object(qsrc, target, so)
        qsrc.unlink()
    stale = [q for q in lk.find_objects(quarantine, quarantine_rows_name("*", o.file_id), so)
             if not (has_rows and q == target)]
    files = f"{quarantine}/files/{o.file_id}"
    copy = Path(o.staged) / "file" if o.staged else None
    if copy is not None and copy.is_dir():
        kept = {f"{files}/{f.relative_to(copy).as_posix()}" for f in copy.rglob("*") if f.is_file()}
        lk.put_tree(copy, files, so)
        stale += [q for q in lk.find_objects(files, "**", so) if q not in kept]
    elif o.status != "quarantined":  # an earlier, unparseable version of this source is history now
        stale += lk.find_objects(files, "**", so)
    for q in stale:
        lk.remove_tree(q, so)
