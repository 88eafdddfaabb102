"""Micro-batch commit: messages -> contract validation and quarantine -> one Delta commit -> acks.

Per batch, in this order (what makes at-least-once delivery exactly-once in the lake):

1. decode failures and rows that break the data contract (:func:`twinflow.tasks.ingest.validate_table`,
   the file ingest's checks) are written to the quarantine with their reason and the message's raw
   bytes (``raw`` = ``base64:<bytes>``), as ``<quarantine>/rows/dataset=<name>/stream-<bridge>-<seq>-<hash>.parquet``
   (the file ingest's layout; named by batch sequence and content, so no batch overwrites another's:
   quarantine delivery is at-least-once, a bad message redelivered after a crash may appear twice);
2. rows whose (asset, cycle) key is already in the lake are dropped as redeliveries (a restart after
   a commit whose acks were lost: the broker sends them again), as are exact repeats within the batch;
3. one Delta commit carrying the application transaction ``(twinflow-bridge-<id>, seq)``;
4. only then are the messages acknowledged to their source.

A crash before 3 loses nothing (nothing was acked); a crash between 3 and 4 duplicates nothing (2
drops the redelivered rows). ``seq`` continues from the table's transaction version on restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twinflow import contracts as C
from twinflow import lake as lk
from twinflow.tasks.bridge.buffer import Message
from twinflow.tasks.ingest.quarantine import quarantine_rows
from twinflow.tasks.ingest.stage import atomic_write_table
from twinflow.tasks.ingest.validate import validate_table

log = logging.getLogger("twinflow.bridge")

__all__ = ["BatchResult", "Committer", "existing_keys", "raw_text"]

_NUMERIC = [C.TIME, *C.CHANNELS]


def raw_text(data: bytes) -> str:
    """A message's raw bytes as quarantine text (``base64:...``; decode with ``base64.b64decode``)."""
    return "base64:" + base64.b64encode(bytes(data)).decode()


@dataclass
class BatchResult:
    """What one micro-batch did."""

    seq: int
    messages: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    redelivered: int = 0
    version: int | None = None
    assets: dict[str, int] = field(default_factory=dict)  # asset -> rows written
    max_cycle: dict[str, int] = field(default_factory=dict)
    commit_s: float = 0.0


def existing_keys(lake_path: str, dataset: str, keys: pa.Table) -> set[tuple[str, int]]:
    """The (asset, cycle) pairs of ``keys`` that the dataset's latest version already holds.

    Only the files whose statistics overlap the keys are read (:func:`twinflow.lake.files_for_keys`):
    reading every file of the batch's assets made each commit slower as the table grew.
    """
    files = lk.files_for_keys(lake_path, dataset, keys)
    if not files:
        return set()
    have = lk.read_files(files, [C.ASSET, C.TIME])
    wanted = set(zip(keys.column(C.ASSET).to_pylist(), keys.column(C.TIME).to_pylist()))
    return wanted & set(zip(have.column(C.ASSET).to_pylist(), have.column(C.TIME).to_pylist()))


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols: dict[str, Any] = {C.ASSET: pa.array([r.get(C.ASSET) for r in rows], pa.string())}
    cols[C.TIME] = pa.array([r.get(C.TIME) for r in rows], pa.int64())
    for ch in C.CHANNELS:
        if any(ch in r for r in rows):
            cols[ch] = pa.array([r.get(ch) for r in rows], pa.float64())
    if any(C.TIMESTAMP in r for r in rows):
        cols[C.TIMESTAMP] = pa.array([r.get(C.TIMESTAMP) for r in rows], pa.timestamp("us", tz="UTC"))
    cols["record"] = pa.array(np.arange(len(rows), dtype=np.int64))
    return pa.table(cols)


class Committer:
    """Commits micro-batches of one bridge into one dataset (see the module docstring)."""

    def __init__(self, lake_path: str, quarantine_path: str, dataset: str, bridge_id: str, app_id: str,
                 compact_every: int = 0, compact_files: int = 0) -> None:
        self.lake_path, self.quarantine_path, self.dataset = lake_path, quarantine_path, dataset
        self.bridge_id, self.app_id, self.compact_every = bridge_id, app_id, compact_every
        # A bound on files, not only commits: with many assets a commit adds many files (a 600-s soak at
        # one commit per ~6 s over 100 assets reached 9,723 files before its 200th commit).
        self.compact_files, self.files_since_compact = compact_files, 0
        self.source = f"stream:{bridge_id}"
        last = lk.transaction_version(lake_path, dataset, app_id=app_id)
        self.seq = (last or 0) + 1
        self.commits = 0

    def commit(self, messages: list[Message]) -> BatchResult:
        """Validate, quarantine, dedupe and commit one batch, then acknowledge its messages."""
        t0 = time.perf_counter()
        res = BatchResult(seq=self.seq, messages=len(messages))
        batch_id = f"{self.bridge_id}-{self.seq:012d}"
        rows: list[dict[str, Any]] = []
        origin: list[int] = []  # row -> message index
        bad_msgs: list[tuple[int, str]] = []
        seen: dict[tuple[str, int], str] = {}
        for i, m in enumerate(messages):
            if m.error is not None:
                bad_msgs.append((i, m.error))
                continue
            for r in m.rows:
                key = (r[C.ASSET], r[C.TIME])
                digest = json.dumps(r, sort_keys=True, default=str)
                if seen.get(key) == digest:  # the same row twice in one batch: a redelivery
                    res.redelivered += 1
                    continue
                seen.setdefault(key, digest)
                rows.append(r)
                origin.append(i)
        quarantine: list[pa.Table] = []
        if bad_msgs:
            keys = pa.table({C.ASSET: pa.nulls(len(bad_msgs), pa.string()), C.TIME: pa.nulls(len(bad_msgs), pa.int64()),
                             "record": pa.nulls(len(bad_msgs), pa.int64())})
            quarantine.append(quarantine_rows(keys, [why for _, why in bad_msgs], self.source, batch_id,
                                              raw_text=[raw_text(messages[i].raw) for i, _ in bad_msgs]))
        lake_rows = None
        if rows:
            table = _rows_table(rows)
            lake_rows, quar, _flags = validate_table(table, None, self.source, batch_id)
            if quar.num_rows:
                recs = quar.column("record").to_pylist()
                quar = quar.set_column(quar.column_names.index("raw"), "raw",
                                       pa.array([raw_text(messages[origin[r]].raw) for r in recs], pa.string()))
                quarantine.append(quar)
            if lake_rows.num_rows:
                have = existing_keys(self.lake_path, self.dataset, lake_rows.select([C.ASSET, C.TIME]))
                if have:
                    keep = [(a, c) not in have for a, c in zip(lake_rows.column(C.ASSET).to_pylist(),
                                                                lake_rows.column(C.TIME).to_pylist())]
                    res.redelivered += len(keep) - sum(keep)
                    lake_rows = lake_rows.filter(pa.array(keep))
        if quarantine:
            q = pa.concat_tables(quarantine)
            res.rows_quarantined = q.num_rows
            path = Path(lk.local_path(self.quarantine_path)) / "rows" / f"dataset={self.dataset}" / \
                f"stream-{self.bridge_id}-{self.seq:012d}-{_digest(q)}.parquet"
            atomic_write_table(q, path)
            log.warning("bridge %s batch %d: %d quarantined (%s)", self.bridge_id, self.seq, q.num_rows,
                        q.column("reason")[0].as_py())
        if lake_rows is not None and lake_rows.num_rows:
            res.rows_written = lake_rows.num_rows
            counts = pc.value_counts(lake_rows.column(C.ASSET))
            res.assets = {d["values"]: d["counts"] for d in counts.to_pylist()}
            res.version = lk.commit(self.lake_path, self.dataset, lake_rows, txn=(self.app_id, self.seq),
                                    metadata={"twinflow.operation": "stream", "twinflow.batch_id": batch_id,
                                              "twinflow.messages": str(len(messages)),
                                              # per-asset new cycles: the ready counts catch up from these
                                              "twinflow.assets": json.dumps(res.assets, sort_keys=True)})
            self.seq += 1
            self.commits += 1
            self.files_since_compact += len(res.assets)
            if (self.compact_every and self.commits % self.compact_every == 0) or \
                    (self.compact_files and self.files_since_compact >= self.compact_files):
                self.compact()
        for m in messages:  # only now: what is acked is in the lake or the quarantine
            if m.ack is not None:
                m.ack()
        res.commit_s = time.perf_counter() - t0
        return res

    def compact(self) -> dict[str, Any]:
        """Compact the dataset's small files (each micro-batch adds one file per asset)."""
        self.files_since_compact = 0
        try:
            out = lk.optimize(self.lake_path, self.dataset)
            log.info("bridge %s: compacted %s", self.bridge_id, {k: out.get(k) for k in ("numFilesAdded", "numFilesRemoved")})
            return out
        except Exception as exc:  # noqa: BLE001 - a concurrent writer won; compaction is retried next time
            log.warning("bridge %s: compaction skipped (%s)", self.bridge_id, exc)
            return {}


def _digest(t: pa.Table) -> str:
    h = hashlib.sha256()
    for col in ("reason", "raw"):
        for v in t.column(col).to_pylist():
            h.update((v or "").encode())
            h.update(b"\0")
    return h.hexdigest()[:12]


def message_id(data: bytes) -> str:
    """A short content id of a message (for logs)."""
    return hashlib.sha1(bytes(data)).hexdigest()[:12]
