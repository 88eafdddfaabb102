"""The ingest ledger (``<lake>/_ledger.sqlite``): per source its content hash, counts and status; per
(dataset, asset, source) its cycle extent, which makes the duplicate-key check across files cheap.

It also holds the commit *intents* that make a Delta commit and its ledger records one step (see
``commit.py``): :meth:`Ledger.begin` before the commit, :meth:`Ledger.apply` after, and
:meth:`Ledger.recover` at the next run for a crash in between.

On an object-store lake the ledger is the same SQLite file, kept as the object ``<lake>/_ledger.sqlite``
(:func:`open_ledger`): the ingest run that holds the lake's writer lease downloads it, and uploads it
after every step that must survive a crash (an intent written, applied or dropped; the batch recorded),
so a run on any host starts from what the last one committed. Why not a Delta table of ledger rows: the
lease already serialises ingest runs (they must not plan the same files at once), and under it one
SQLite file keeps the intent protocol, its indexes and its tests exactly as on a local lake.
"""

from __future__ import annotations
import contextlib
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from twinflow.refs import FileRef, LakeSnapshot

from twinflow import lake as lk
from twinflow.tasks.ingest.params import FileOutcome

LEDGER_NAME = "_ledger.sqlite"
log = logging.getLogger("twinflow.ingest")


class Ledger:
    """Per-lake SQLite ledger: source -> content hash, counts, status; (dataset, asset, source) -> extent.

    Only the ingest flow process writes it, while it holds the lake lock; readers may open it any time.
    """

    def __init__(self, lake: Path, publish: Callable[[Path], None] | None = None,
                 storage_options: dict[str, Any] | None = None):
        """Open (or create) the ledger file in the folder ``lake``.

        Args:
            lake: The folder of ``_ledger.sqlite`` (a local lake's root, or a working copy's folder).
            publish: Called with the file after each durable step (object-store lakes: the upload).
            storage_options: The lake's object-store options, for the table look-ups.
        """
        lake.mkdir(parents=True, exist_ok=True)
        self.path = lake / LEDGER_NAME
        self._publish_to = publish
        self.storage_options = storage_options
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
                rows_quarantined INTEGER, committed_at REAL, params_digest TEXT, channels TEXT);
            CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
            CREATE INDEX IF NOT EXISTS files_dataset ON files(dataset);
            CREATE TABLE IF NOT EXISTS extents (
                dataset TEXT NOT NULL, asset_id TEXT NOT NULL, file_id TEXT NOT NULL, source TEXT NOT NULL,
                tmin INTEGER, tmax INTEGER, rows INTEGER, PRIMARY KEY (dataset, asset_id, file_id));
            CREATE INDEX IF NOT EXISTS extents_file ON extents(file_id);
            CREATE TABLE IF NOT EXISTS batches (
                batch_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, files INTEGER,
                rows_read INTEGER, rows_written INTEGER, rows_quarantined INTEGER, status TEXT);
            CREATE TABLE IF NOT EXISTS tables (dataset TEXT PRIMARY KEY, txn INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS intents (
                dataset TEXT NOT NULL, txn INTEGER NOT NULL, batch_id TEXT NOT NULL, outcomes TEXT NOT NULL,
                PRIMARY KEY (dataset, txn));
            """
        )
        # Ledgers written before fleet contracts lack the channels a file holds (its params digest then
        # differs, and the file is read once more).
        cols = {r[1] for r in self.conn.execute("PRAGMA table_info(files)").fetchall()}
        if "channels" not in cols:
            self.conn.execute("ALTER TABLE files ADD COLUMN channels TEXT")

    def close(self) -> None:
        self.conn.close()

    def publish(self) -> None:
        """Make the ledger's committed state durable where other hosts read it (no-op on a local lake)."""
        if self._publish_to is not None:
            # The upload is the main file alone: fold the WAL into it first.
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._publish_to(self.path)

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
        """Sources other than ``fid``'s whose rows of ``asset`` span cycles overlapping [tmin, tmax]."""
        rows = self.conn.execute(
            "SELECT source FROM extents WHERE dataset=? AND asset_id=? AND file_id<>? AND tmax>=? AND tmin<=?",
            (dataset, asset, fid, tmin, tmax)).fetchall()
        return [r[0] for r in rows]

    # --- Commit intents: a Delta commit and its ledger records as one step ---------------------------

    def next_txn(self, dataset: str, table_txn: int | None) -> int:
        """The application-transaction version the next commit to ``dataset`` carries."""
        row = self.conn.execute("SELECT txn FROM tables WHERE dataset=?", (dataset,)).fetchone()
        return max(row[0] if row else 0, table_txn or 0) + 1

    def begin(self, dataset: str, txn: int, batch_id: str, outcomes: list[FileOutcome]) -> None:
        """Write the intent of a commit: what the ledger records once the table has ``txn``."""
        payload = json.dumps([o.model_dump(exclude={"staged"}) for o in outcomes])
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO intents VALUES (?,?,?,?)", (dataset, txn, batch_id, payload))
        self.publish()

    def apply(self, dataset: str, txn: int) -> None:
        """Record an intent's outcomes and the table's txn, and drop the intent, in one transaction."""
        row = self.conn.execute("SELECT batch_id, outcomes FROM intents WHERE dataset=? AND txn=?",
                                (dataset, txn)).fetchone()
        if row is None:
            return
        batch_id, payload = row
        with self.transaction() as c:
            for o in (FileOutcome.model_validate(d) for d in json.loads(payload)):
                self._record(c, o, batch_id)
            c.execute("INSERT OR REPLACE INTO tables VALUES (?, ?)", (dataset, txn))
            c.execute("DELETE FROM intents WHERE dataset=? AND txn=?", (dataset, txn))
        self.publish()

    def recover(self, lake_path: str) -> list[tuple[str, int, str]]:
        """Settle the intents a crashed run left: apply those the table committed, drop the others.

        Returns:
            ``(dataset, txn, "applied" | "dropped")`` per intent found.
        """
        out = []
        for dataset, txn in self.conn.execute("SELECT dataset, txn FROM intents ORDER BY dataset, txn").fetchall():
            committed = (lk.transaction_version(lake_path, dataset, storage_options=self.storage_options)
                         or 0) >= txn
            if committed:
                self.apply(dataset, txn)
            else:
                with self.transaction() as c:
                    c.execute("DELETE FROM intents WHERE dataset=? AND txn=?", (dataset, txn))
                self.publish()
            verdict = "applied" if committed else "dropped"
            log.warning("ingest: an earlier run stopped during its commit to %s (txn %d): its records were %s",
                        dataset, txn, "applied (the table has the commit)" if committed else
                        "dropped (the table does not have the commit; its files are read again)")
            out.append((dataset, txn, verdict))
        return out

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

    @staticmethod
    def _record(c: sqlite3.Connection, o: FileOutcome, batch_id: str) -> None:
        """Record a file outcome and replace its extents (inside the caller's transaction)."""
        c.execute(
            "INSERT OR REPLACE INTO files (source, dataset, file_id, sha256, size, mtime_ns, batch_id, status, "
            "reason, rows_read, rows_written, rows_quarantined, committed_at, params_digest, channels) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (o.source, o.dataset, o.file_id, o.sha256, o.size, o.mtime_ns, batch_id, o.status,
             o.reason, o.rows_read, o.rows_written, o.rows_quarantined, time.time(), o.params_digest,
             None if o.channels is None else json.dumps(o.channels)))
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
        self.publish()

    def snapshot(self, lake_path: str, dataset: str) -> LakeSnapshot | None:
        """The dataset as the ledger knows it, at the table's current version (None: no file ingested),
        with the fleet contract stored with its table."""
        rows = self.conn.execute(
            "SELECT source, sha256, rows_read, rows_written, rows_quarantined, status, batch_id, file_id "
            "FROM files WHERE dataset=? AND status='ingested' ORDER BY committed_at, source",
            (dataset,)).fetchall()
        if not rows:
            return None
        files = [FileRef(path=r[0], sha256=r[1], rows_read=r[2], rows_written=r[3], rows_quarantined=r[4],
                         status=r[5], lake_file=r[7]) for r in rows]
        return LakeSnapshot(lake_path=lake_path, dataset=dataset, batch_id=rows[-1][6], files=files,
                            rows=sum(r[3] for r in rows),
                            version=lk.version(lake_path, dataset, self.storage_options),
                            contract=lk.table_contract(lake_path, dataset, self.storage_options))


def ingested_snapshot(lake_path: str, dataset: str,
                      storage_options: dict[str, Any] | None = None) -> LakeSnapshot | None:
    """The ingested state of a lake dataset from its ledger, without ingesting anything.

    For stages run on their own (``twinflow run features --param dataset=...``): the snapshot lists the
    contributing files and hashes, so its digest changes exactly when the data does, and names the
    table version it describes. Returns None when the lake has no ledger or the dataset no ingested
    file (e.g. data written by :func:`twinflow.lake.write_lake_table`).
    """
    with open_ledger(lake_path, storage_options, create=False) as ledger:
        return None if ledger is None else ledger.snapshot(lake_path, dataset)


@contextlib.contextmanager
def open_ledger(lake_path: str, storage_options: dict[str, Any] | None = None, create: bool = True,
                check: Callable[[], None] | None = None) -> Iterator[Ledger | None]:
    """The lake's ledger for the block: in place on a local lake, a working copy of ``<lake>/_ledger.sqlite``
    on an object store (published after each durable step; only the holder of the lake's ingest lease
    may open it with ``create=True`` and write).

    Args:
        check: Called before each upload (the lease's ``check``: a writer that lost its lease must not
            overwrite the ledger of the one that took it over).

    Yields:
        The ledger, or None when ``create`` is False and the lake has none.
    """
    import tempfile

    if lk.is_local(lake_path):
        lake = lk.local_path(lake_path)
        if not create and not (lake / LEDGER_NAME).exists():
            yield None
            return
        ledger = Ledger(lake, storage_options=storage_options)
        try:
            yield ledger
        finally:
            ledger.close()
        return
    with tempfile.TemporaryDirectory(prefix="twinflow-ledger-") as work:
        folder = Path(work)
        if not lk.fetch_meta_file(lake_path, LEDGER_NAME, folder / LEDGER_NAME, storage_options) and not create:
            yield None
            return

        def publish(path: Path) -> None:
            if check is not None:
                check()
            lk.publish_meta_file(path, lake_path, LEDGER_NAME, storage_options)

        ledger = Ledger(folder, publish=publish if create else None, storage_options=storage_options)
        try:
            yield ledger
        finally:
            ledger.close()


def latest_snapshot(lake_path: str, dataset: str) -> LakeSnapshot | None:
    """The dataset's latest snapshot: see :func:`twinflow.lake.latest_snapshot`."""
    return lk.latest_snapshot(lake_path, dataset)
