"""Micro-batch commit: messages -> contract checks and quarantine -> one Delta commit -> acks.

Per batch, in this order (what makes at-least-once delivery exactly-once in the lake):

1. messages that did not decode, rows that did not decode and rows that break the fleet contract (the
   asset id, the clock, each channel's declared range) are written to the quarantine with their reason
   and the message's raw bytes (``raw`` = ``base64:<bytes>``), as
   ``<quarantine>/rows/dataset=<name>/stream-<bridge>-<seq>-<run>-<write>-<hash>.parquet`` (the file
   ingest's layout; ``seq`` only moves on a lake commit, so a quarantine-only batch shares it with its
   neighbours, and ``<run>-<write>`` (a random token per committer, for restarts, and its count of
   writes) keeps two batches holding the same bad bytes from writing one file: quarantine delivery is
   at-least-once, a bad message redelivered after a crash may appear twice);
2. a row whose (asset, time) key is already in the lake with the same values is a redelivery (a restart
   after a commit whose acks were lost) and is dropped, as are exact repeats within the batch; the same
   key with other values is quarantined (``duplicate key`` within the batch, ``conflicts with committed
   row`` against the lake, with both values);
3. one Delta commit carrying the application transaction ``(twinflow-bridge-<id>, seq)``, then the
   dataset's recent-rows table brought forward from the batch's own rows (:func:`twinflow.lake.refresh_recent`
   with their tails: no asset file is read), so health keeps reading that table between ingests;
4. only then are the messages acknowledged to their source.

A crash before 3 loses nothing (nothing was acked); a crash between 3 and 4 duplicates nothing (2
drops the redelivered rows). ``seq`` continues from the table's transaction version on restart.

A batch whose commit fails because of what a message holds (anything but an I/O or lake error) is
split in halves and committed again, down to the single message, which is then quarantined as ``could
not be committed`` and acknowledged: no message can stop the stream or make every restart fail again.
Quality flags are per row (a channel the row carries as null: ``MISSING``; a sentinel: ``SENTINEL``),
so the same row gets the same flags whatever else is in its batch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twinflow import contracts as C
from twinflow import lake as lk
from twinflow.contract.model import FleetContract
from twinflow.errors import ConfigError
from twinflow.tasks.bridge.buffer import Message
from twinflow.tasks.bridge.decode import DecodeError, Decoder
from twinflow.tasks.ingest.quarantine import quarantine_rows
from twinflow.tasks.ingest.stage import atomic_write_table

log = logging.getLogger("twinflow.bridge")

__all__ = ["BatchResult", "Committer", "committed_rows", "existing_keys", "raw_text"]


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
    isolated: int = 0  # messages quarantined because committing them failed

    def add(self, other: "BatchResult") -> None:
        self.rows_written += other.rows_written
        self.rows_quarantined += other.rows_quarantined
        self.redelivered += other.redelivered
        self.isolated += other.isolated
        self.version = other.version if other.version is not None else self.version
        for a, n in other.assets.items():
            self.assets[a] = self.assets.get(a, 0) + n


def _us(v: Any) -> int | None:
    """A key value (int cycle, datetime, or a pyarrow timestamp) as a comparable integer."""
    if v is None:
        return None
    if isinstance(v, datetime):
        return int(pa.scalar(v, pa.timestamp("us", tz="UTC")).value)
    return int(v)


def committed_rows(lake_path: str, dataset: str, keys: dict[str, tuple[Any, Any]], key: str,
                   columns: list[str], storage_options: dict[str, Any] | None = None) -> pa.Table | None:
    """Rows of the latest version whose asset is in ``keys`` and whose ``key`` lies in its (min, max).

    Only the files whose Delta statistics overlap are read, so a micro-batch's lookup stays proportional
    to the batch, not to the table (a file without statistics is always read).
    """
    dt = lk.open_table(lake_path, dataset, storage_options=storage_options)
    if dt is None or not keys:
        return None
    actions = pa.table(dt.get_add_actions(flatten=True))
    names = actions.column_names
    n = actions.num_rows
    lo = actions.column(f"min.{key}").to_pylist() if f"min.{key}" in names else [None] * n
    hi = actions.column(f"max.{key}").to_pylist() if f"max.{key}" in names else [None] * n
    want = {a: (_us(x), _us(y)) for a, (x, y) in keys.items()}
    root = dt.table_uri.rstrip("/").removeprefix("file://")
    files = []
    for path, asset, a, b in zip(actions.column("path").to_pylist(),
                                 actions.column(f"partition.{lk.PARTITION}").to_pylist(), lo, hi):
        w = want.get(asset)
        if w is None:
            continue
        try:
            a, b = _us(a), _us(b)
        except (TypeError, ValueError):
            a = b = None
        if a is not None and b is not None and (b < w[0] or a > w[1]):
            continue
        rel = unquote(path)
        files.append(rel if "://" in rel else f"{root}/{rel}")
    if not files:
        return None
    return lk.read_files(files, [C.ASSET, key, *columns], storage_options)


def existing_keys(lake_path: str, dataset: str, keys: pa.Table, key: str = C.TIME,
                  storage_options: dict[str, Any] | None = None) -> set[tuple[str, Any]]:
    """The (asset, time) pairs of ``keys`` that the dataset's latest version already holds."""
    assets, times = keys.column(C.ASSET).to_pylist(), keys.column(key).to_pylist()
    ranges: dict[str, tuple[Any, Any]] = {}
    for a, t in zip(assets, times):
        lo_hi = ranges.get(a)
        ranges[a] = (t, t) if lo_hi is None else (min(lo_hi[0], t), max(lo_hi[1], t))
    have = committed_rows(lake_path, dataset, ranges, key, [], storage_options)
    if have is None:
        return set()
    wanted = set(zip(assets, times))
    return wanted & set(zip(have.column(C.ASSET).to_pylist(), have.column(key).to_pylist()))


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _content_error(exc: BaseException) -> bool:
    """Whether a commit failure comes from what the batch holds (isolate it) rather than the lake."""
    from deltalake.exceptions import DeltaError

    return not isinstance(exc, (OSError, MemoryError, ConfigError, DeltaError, KeyboardInterrupt, SystemExit))


class Committer:
    """Commits micro-batches of one bridge into one dataset (see the module docstring).

    Args:
        contract: The fleet contract of the dataset (default: the settings' ``contract``); refused when
            the table was written under another one.
        recent_rows: ``W`` of the recent-rows table each commit refreshes (default: the window its last
            refresh kept, else what health reads with the default feature and health parameters).
    """

    def __init__(self, lake_path: str, quarantine_path: str, dataset: str, bridge_id: str, app_id: str,
                 compact_every: int = 0, compact_files: int = 0, contract: FleetContract | None = None,
                 decoder: Decoder | None = None, storage_options: dict[str, Any] | None = None,
                 recent_rows: int | None = None) -> None:
        from twinflow.contract.store import resolve_contract

        # The lake may be on an object store (s3://): every lake call takes its options; commits are
        # then conditional puts, and the application transaction still makes a redelivery idempotent.
        self.storage_options = storage_options

        self.lake_path, self.quarantine_path, self.dataset = lake_path, quarantine_path, dataset
        self.bridge_id, self.app_id, self.compact_every = bridge_id, app_id, compact_every
        # A bound on files, not only commits: with many assets a commit adds many files (a 600-s soak at
        # one commit per ~6 s over 100 assets reached 9,723 files before its 200th commit).
        self.compact_files, self.files_since_compact = compact_files, 0
        self.contract = decoder.contract if decoder is not None else resolve_contract(contract)
        self.decoder = decoder or Decoder(self.contract)
        self.key = self.contract.clock.key
        self.schema = self.contract.lake_schema()
        self.channels = self.contract.channel_names
        self.specs = {c.name: c for c in self.contract.channels}
        self.sentinels = frozenset(float(x) for x in self.contract.sentinels)
        self.contract_stored = lk.check_contract(lake_path, dataset, self.contract, storage_options) is not None
        self.source = f"stream:{bridge_id}"
        last = lk.transaction_version(lake_path, dataset, app_id=app_id, storage_options=storage_options)
        self.seq = (last or 0) + 1
        self.commits = 0
        self.recent_rows = recent_rows
        self._window: int | None = None  # the recent table's window, looked up once (see _refresh_recent)
        self.quarantine_writes = 0
        self._run_token = uuid.uuid4().hex[:8]

    # --- one batch -----------------------------------------------------------------------------------

    def commit(self, messages: list[Message]) -> BatchResult:
        """Validate, quarantine, dedupe and commit one batch, then acknowledge its messages.

        A failure caused by the batch's content is isolated by bisection (module docstring); lake and
        I/O errors propagate with nothing acknowledged.
        """
        t0 = time.perf_counter()
        res = self._commit_isolated(messages)
        for m in messages:  # only now: what is acked is in the lake or the quarantine
            if m.ack is not None:
                m.ack()
        res.messages = len(messages)
        res.commit_s = time.perf_counter() - t0
        return res

    def _commit_isolated(self, messages: list[Message]) -> BatchResult:
        try:
            return self._commit(messages)
        except BaseException as exc:
            if not _content_error(exc):
                raise
            if len(messages) > 1:
                log.warning("bridge %s: batch of %d messages failed to commit (%s: %s); bisecting", self.bridge_id,
                            len(messages), type(exc).__name__, str(exc)[:200])
                mid = len(messages) // 2
                res = self._commit_isolated(messages[:mid])
                res.add(self._commit_isolated(messages[mid:]))
                return res
            m = messages[0]
            why = f"could not be committed ({type(exc).__name__}: {str(exc)[:300]})"
            log.error("bridge %s: message from %s quarantined: %s", self.bridge_id, m.source, why)
            res = BatchResult(seq=self.seq, isolated=1)
            res.rows_quarantined = self._quarantine([(None, None, why, raw_text(m.raw))])
            return res

    def _check(self, row: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """(row with sentinels nulled, quality) of a decoded row.

        Raises:
            DecodeError: the row breaks the contract (reason).
        """
        asset = row[C.ASSET]
        enc = len(quote(asset, safe=""))
        if enc > C.ASSET_ID_MAX_ENCODED:
            raise DecodeError(f"asset id too long: {enc} characters percent-encoded "
                              f"(limit {C.ASSET_ID_MAX_ENCODED})")
        quality = 0
        out = {C.ASSET: asset, self.key: row[self.key]}
        for ch in self.channels:
            if ch not in row:
                continue
            x = row[ch]
            if x is None:
                quality |= C.Quality.MISSING
            elif x in self.sentinels:
                x = None
                quality |= C.Quality.SENTINEL | C.Quality.MISSING
            else:
                spec = self.specs[ch]
                if not spec.low <= x <= spec.high:
                    raise DecodeError(f"{ch}={x:g} outside valid range {spec.range_text()}")
            out[ch] = x
        return out, int(quality)

    def _quarantine(self, items: list[tuple[str | None, Any, str, str]]) -> int:
        """Write (asset, time, reason, raw) quarantine rows; return how many."""
        if not items:
            return 0
        n = len(items)
        keys = pa.table({C.ASSET: pa.nulls(n, pa.string()), C.TIME: pa.nulls(n, pa.int64()),
                         "record": pa.nulls(n, pa.int64())})
        batch_id = f"{self.bridge_id}-{self.seq:012d}"
        q = quarantine_rows(keys, [why for _, _, why, _ in items], self.source, batch_id,
                            raw_text=[raw for _, _, _, raw in items])
        assets = pa.array([a for a, _, _, _ in items], pa.string())
        # the quarantine's cycle column is int64: a key outside it (the reason says which) is left null
        cycles = pa.array([t if isinstance(t, int) and not isinstance(t, bool) and -2**63 <= t < 2**63 else None
                           for _, t, _, _ in items], pa.int64())
        q = q.set_column(q.column_names.index(C.ASSET), C.ASSET, assets)
        q = q.set_column(q.column_names.index(C.TIME), C.TIME, cycles)
        self.quarantine_writes += 1
        name = (f"stream-{self.bridge_id}-{self.seq:012d}-{self._run_token}-{self.quarantine_writes:06d}-"
                f"{_digest(q)}.parquet")
        rel = f"rows/dataset={self.dataset}/{name}"
        if lk.is_local(self.quarantine_path):
            atomic_write_table(q, Path(lk.local_path(self.quarantine_path)) / rel)
        else:  # an object-store quarantine (an s3:// lake's default): one PUT, whole or absent
            import tempfile

            with tempfile.TemporaryDirectory(prefix="twinflow-bridge-q-") as tmp:
                atomic_write_table(q, Path(tmp) / name)
                lk.put_object(Path(tmp) / name, f"{self.quarantine_path.rstrip('/')}/{rel}", self.storage_options)
        log.warning("bridge %s batch %d: %d quarantined (%s)", self.bridge_id, self.seq, n, items[0][2][:200])
        return n

    def _commit(self, messages: list[Message]) -> BatchResult:
        res = BatchResult(seq=self.seq, messages=len(messages))
        batch_id = f"{self.bridge_id}-{self.seq:012d}"
        key = self.key
        rows: list[dict[str, Any]] = []
        quality: list[int] = []
        quarantine: list[tuple[str | None, Any, str, str]] = []
        cand: list[dict[str, Any]] = []
        cand_q: list[int] = []
        cand_o: list[int] = []
        for i, m in enumerate(messages):
            if m.error is not None:
                quarantine.append((None, None, m.error, raw_text(m.raw)))
                continue
            for raw_row, why in m.row_errors:
                quarantine.append((None, None, why, raw_text(m.raw)))
            for r in m.rows:
                try:
                    if not m.checked:
                        r = self.decoder.row(r)
                    r, q = self._check(r)
                except DecodeError as exc:
                    quarantine.append((r.get(C.ASSET) if isinstance(r.get(C.ASSET), str) else None,
                                       r.get(key), str(exc), raw_text(m.raw)))
                    continue
                cand.append(r)
                cand_q.append(q)
                cand_o.append(i)
        # Keys the lake holds first (a redelivery, or a conflict), then repeats within the batch.
        keep = self._against_lake(cand, messages, cand_o, quarantine, res) if cand else []
        seen: dict[tuple[str, Any], tuple[str, int]] = {}
        for r, q, i, k_ in zip(cand, cand_q, cand_o, keep):
            if not k_:
                continue
            k = (r[C.ASSET], r[key])
            digest = json.dumps(r, sort_keys=True, default=str)
            first = seen.get(k)
            if first is not None:
                if first[0] == digest:  # the same row twice in one batch: a redelivery
                    res.redelivered += 1
                else:
                    quarantine.append((k[0], k[1], f"duplicate key ({C.ASSET}={k[0]}, {key}={k[1]}): first "
                                       f"seen in message {first[1]} of this batch", raw_text(messages[i].raw)))
                continue
            seen[k] = (digest, i)
            rows.append(r)
            quality.append(q)
        table = self._table(rows, quality, batch_id) if rows else None
        res.rows_quarantined = self._quarantine(quarantine)
        if table is not None and table.num_rows:
            res.rows_written = table.num_rows
            counts = pc.value_counts(table.column(C.ASSET))
            res.assets = {d["values"]: d["counts"] for d in counts.to_pylist()}
            reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
            res.version = lk.commit(self.lake_path, self.dataset, reader, txn=(self.app_id, self.seq),
                                    storage_options=self.storage_options,
                                    metadata={"twinflow.operation": "stream", "twinflow.batch_id": batch_id,
                                              "twinflow.messages": str(len(messages)),
                                              "twinflow.contract": self.contract.ref.model_dump_json(),
                                              # per-asset new rows: the ready counts catch up from these
                                              "twinflow.assets": json.dumps(res.assets, sort_keys=True)})
            if not self.contract_stored:
                lk.write_contract(self.lake_path, self.dataset, self.contract, self.storage_options)
                self.contract_stored = True
            self._refresh_recent(table, res.version, batch_id, res.assets)
            self.seq += 1
            self.commits += 1
            self.files_since_compact += len(res.assets)
            if (self.compact_every and self.commits % self.compact_every == 0) or \
                    (self.compact_files and self.files_since_compact >= self.compact_files):
                self.compact()
        return res

    def _refresh_recent(self, table: pa.Table, version: int, batch_id: str, assets: dict[str, int]) -> None:
        """Bring the recent-rows table to the version just committed from the batch's rows in memory.

        The rows are committed already: a refresh that fails only makes health read the asset files
        (it sees the table is stale) until a later commit or ingest refreshes it, so it is logged.
        """
        try:
            from twinflow.tasks.features.params import FeatureParams
            from twinflow.tasks.health.params import HealthParams
            from twinflow.tasks.health.score import recent_rows

            # Tails as long as either window the refresh may use (the table's own is read there, once
            # here): a table whose window grew since only makes the refresh read the changed assets.
            default = recent_rows(FeatureParams(), HealthParams())
            if self._window is None and self.recent_rows is None:
                self._window = lk.recent_window(self.lake_path, self.dataset, self.storage_options) or default
            w = self.recent_rows or max(default, self._window or 0)
            tails = lk.RecentTails(version=version, batch_id=batch_id, rows=w, added=dict(assets),
                                   tails=lk.recent_tails(table, w, self.contract))
            lk.refresh_recent(self.lake_path, self.dataset, self.recent_rows, self.storage_options, new=tails,
                              default_rows=default)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("bridge %s: recent-rows table of %s not refreshed (%s); health reads the asset files "
                        "until a later refresh", self.bridge_id, self.dataset, exc)

    def _against_lake(self, rows: list[dict[str, Any]], messages: list[Message], origin: list[int],
                      quarantine: list, res: BatchResult) -> list[bool]:
        """Which rows are new: committed keys with equal values are redeliveries, other values conflicts."""
        key = self.key
        ranges: dict[str, tuple[Any, Any]] = {}
        for r in rows:
            a, t = r[C.ASSET], r[key]
            lo_hi = ranges.get(a)
            ranges[a] = (t, t) if lo_hi is None else (min(lo_hi[0], t), max(lo_hi[1], t))
        cols = [c for c in self.channels]
        have = committed_rows(self.lake_path, self.dataset, ranges, key, cols, self.storage_options)
        keep = [True] * len(rows)
        if have is None or have.num_rows == 0:
            return keep
        wanted: dict[tuple[str, int], list[int]] = {}
        for j, r in enumerate(rows):
            wanted.setdefault((r[C.ASSET], _us(r[key])), []).append(j)
        assets = have.column(C.ASSET).to_pylist()
        times = [_us(v) for v in have.column(key).to_pylist()]
        hit = [(i, wanted[(a, t)]) for i, (a, t) in enumerate(zip(assets, times)) if (a, t) in wanted]
        if not hit:
            return keep
        old = have.take(pa.array([i for i, _ in hit])).to_pylist()
        for o, (_, js) in zip(old, hit):
            for j in js:
                new = rows[j]
                keep[j] = False
                diff = {c: (o.get(c), new.get(c)) for c in cols if not _same(o.get(c), new.get(c))}
                if not diff:
                    res.redelivered += 1
                    continue
                quarantine.append((new[C.ASSET], new[key] if isinstance(new[key], int) else None,
                                   f"conflicts with committed row ({C.ASSET}={new[C.ASSET]}, {key}={new[key]}): "
                                   f"committed {json.dumps({c: d[0] for c, d in diff.items()})}, "
                                   f"received {json.dumps({c: d[1] for c, d in diff.items()})}",
                                   raw_text(messages[origin[j]].raw)))
        return keep

    def _table(self, rows: list[dict[str, Any]], quality: list[int], batch_id: str) -> pa.Table:
        """The batch's rows in the contract's lake schema, sorted by (asset, time)."""
        n = len(rows)
        order = sorted(range(n), key=lambda j: (rows[j][C.ASSET], rows[j][self.key]))
        rows = [rows[j] for j in order]
        cols = []
        for f in self.schema:
            name = f.name
            if name == C.ASSET or name == self.key:
                cols.append(pa.array([r[name] for r in rows], f.type))
            elif name in self.specs:
                cols.append(pa.array([r.get(name) for r in rows], f.type))
            elif name == "source_file":
                cols.append(pa.repeat(pa.scalar(self.source, pa.string()), n))
            elif name == "batch_id":
                cols.append(pa.repeat(pa.scalar(batch_id, pa.string()), n))
            elif name == "quality":
                cols.append(pa.array(np.asarray(quality, np.int32)[order], pa.int32()))
            else:
                cols.append(pa.nulls(n, f.type))
        return pa.Table.from_arrays(cols, schema=self.schema)

    def compact(self) -> dict[str, Any]:
        """Compact the dataset's small files (each micro-batch adds one file per asset)."""
        self.files_since_compact = 0
        try:
            out = lk.optimize(self.lake_path, self.dataset, storage_options=self.storage_options)
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
