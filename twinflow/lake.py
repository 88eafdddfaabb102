"""The lake: one Delta Lake table per dataset, the only module that knows how stage data is stored.

Layout: ``<lake>/<dataset>/`` is a Delta Lake table (delta-rs, ``deltalake``) partitioned by
``asset_id``: ``<lake>/<dataset>/_delta_log/`` plus ``asset_id=<percent-encoded id>/part-*.parquet``.
Any reader of Delta tables opens it as it is (Spark, Trino, DuckDB's ``delta_scan``, Polars'
``read_delta``). The lake root may be a local folder or an object-store URL (``s3://…``), with
``storage_options`` passed to delta-rs.

What a table format gives and twinflow relies on:

* **Atomic commits.** :func:`commit` appends rows and drops the rows of replaced sources in one
  transaction; a crash leaves at most unreferenced data files (removed by :func:`vacuum`), never a
  half-visible write.
* **Snapshots and time travel.** A :class:`~twinflow.refs.LakeSnapshot` names a table version;
  :func:`read_lake` and :func:`list_files` read exactly that version, so a stage re-run on an old
  snapshot sees the old data.
* **Idempotent appends.** A commit may carry an application transaction (``app_id``, version): a
  writer that crashed after committing learns from :func:`transaction_version` that its commit is in,
  and does not write it again (the ingest ledger relies on this).

Bookkeeping files of writers (the ingest ledger, lock and staging) live beside the tables under
names starting with ``_`` (:func:`meta_path`), which no dataset name can take.

Lakes written by twinflow 0.1 (hive-partitioned Parquet under ``<lake>/dataset=<name>/asset=<id>/``)
are converted once by :func:`migrate_hive` (``open``-ing a dataset does it, and says so in the log).

Why one module of ~700 lines: the point of it is that the lake's layout (table paths, partition
folders, data-file format and statistics, commit protocol, legacy layout) is known in exactly one
place; its sections (writing, reading, maintenance, migration) share those private details, and a
split would have to import them across modules again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twinflow import contracts as C
from twinflow.contract.model import FleetContract
from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.refs import FileRef, LakeSnapshot
from twinflow.storage import is_object_store

if TYPE_CHECKING:
    from deltalake import DeltaTable

log = logging.getLogger("twinflow.lake")

PARTITION = C.ASSET
INGEST_APP_ID = "twinflow-ingest"
_LEGACY_PREFIX = "dataset="
_MIGRATED_DIR = "_pre_delta"
# Delta-rs writer: dictionary pages only where values repeat (keys, lineage), not on float channels.
_DICT_COLUMNS = ["source_file", "batch_id", "quality"]


def is_local(lake_path: str) -> bool:
    """True when the lake root is a local path (or a ``file://`` URL)."""
    return "://" not in lake_path or lake_path.startswith("file://")


def local_path(url: str) -> Path:
    """A local filesystem path from a path or ``file://`` URL (``~`` expanded, made absolute).

    Raises:
        ConfigError: for a URL of another scheme (the ingest ledger, lock and staging need a local
            folder; object stores are read through :func:`open_table` instead).
    """
    import os

    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise ConfigError(f"the lake must be a local path for now, got {url!r}; mount the bucket or "
                          "set TWINFLOW_LAKE__LAKE to a local folder")
    return Path(os.path.expanduser(url)).resolve()


def table_uri(lake_path: str, dataset: str) -> str:
    """Where a dataset's Delta table lives."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", dataset):
        raise ConfigError(f"dataset {dataset!r} must be lower-case letters, digits, '_' or '-'")
    return f"{lake_path.rstrip('/')}/{dataset}"


def meta_path(lake_path: str, name: str) -> Path:
    """A writer's bookkeeping file or folder beside the tables (``<lake>/_<name>``); local lakes only."""
    return local_path(lake_path) / f"_{name.lstrip('_')}"


def meta_uri(lake_path: str, name: str) -> str:
    """A writer's bookkeeping object or prefix beside the tables (``<lake>/_<name>``), on any lake root."""
    return f"{lake_path.rstrip('/')}/_{name.lstrip('_')}"


class LeaseLost(ServiceUnavailable):
    """A writer's lease on an object-store lake expired or was taken over before its work was done."""


class _Lease:
    """A held writer lease on an object-store lake (see :func:`writer_lease`)."""

    def __init__(self, fs: Any, root: str, generation: int, ttl_s: float, owner: str):
        import threading

        self.fs, self.root, self.generation, self.ttl_s, self.owner = fs, root, generation, ttl_s, owner
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="twinflow-lease", daemon=True)

    def _path(self, generation: int) -> str:
        return f"{self.root}/{generation:012d}.json"

    def _write(self, released: bool = False) -> None:
        import json
        import time

        body = {"owner": self.owner, "expires": time.time() + self.ttl_s, "released": released}
        self.fs.pipe_file(self._path(self.generation), json.dumps(body).encode())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.check()
                self._write()
            except Exception as exc:  # noqa: BLE001 - recorded; check() raises it in the writer's thread
                self.lost = self.lost or f"lease renewal failed: {exc}"

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another writer took the lease over (call before a commit).

        Raises:
            LeaseLost: a later generation exists, or renewing failed.
        """
        if self.lost is None and _lease_generations(self.fs, self.root)[-1:] != [self.generation]:
            self.lost = f"another writer took over lease generation {self.generation}"
        if self.lost is not None:
            raise LeaseLost(f"{self.root}: {self.lost}; this writer stops before committing")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost is None:
            with contextlib.suppress(Exception):  # an unreleased lease expires on its own after ttl_s
                self._write(released=True)


def _lease_generations(fs: Any, root: str) -> list[int]:
    try:
        names = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(int(n.rsplit("/", 1)[-1][:-5]) for n in names
                  if n.endswith(".json") and n.rsplit("/", 1)[-1][:-5].isdigit())


@contextlib.contextmanager
def writer_lease(lake_path: str, name: str, *, timeout_s: float, what: str, ttl_s: float = 60.0,
                 storage_options: dict[str, Any] | None = None) -> Iterator[Any]:
    """Hold the lake's ``name`` lease for the block: one writer of that kind per lake at a time.

    A local lake uses a lock file (``<lake>/_<name>``, :func:`twinflow.locks.hold`): the kernel frees it
    when its holder dies. An object-store lake has no locks, so the lease is a sequence of generation
    objects under ``<lake>/_<name>/``: a writer takes the next generation with a conditional put
    (``If-None-Match: *``; of two writers on two hosts exactly one creates it), renews it every
    ``ttl_s / 3`` and marks it released at the end. A generation whose holder died (``kill -9``, a lost
    host) expires ``ttl_s`` after its last renewal, judged by the waiting host's clock (hosts need
    clocks synchronised to well under ``ttl_s``). No DynamoDB and no local file is involved.

    Yields:
        None for a local lake; on an object store the lease, whose ``check()`` raises
        :class:`LeaseLost` if another writer has taken it over (call it before committing).

    Raises:
        AlreadyRunning: the lease was still held after ``timeout_s``.
    """
    import json
    import os
    import socket
    import time

    from twinflow.errors import AlreadyRunning

    if is_local(lake_path):
        from twinflow.locks import hold

        with hold(meta_path(lake_path, name), timeout_s=timeout_s, what=what):
            yield None
        return
    uri = meta_uri(lake_path, name)
    with store_errors(uri, storage_options):
        fs, root = _fs(uri, storage_options)
        owner = f"{socket.gethostname()}:{os.getpid()}"
        deadline = time.monotonic() + timeout_s
        while True:
            gens = _lease_generations(fs, root)
            holder = None
            if gens:
                try:
                    state = json.loads(fs.cat_file(f"{root}/{gens[-1]:012d}.json"))
                except FileNotFoundError:
                    continue  # cleaned up between listing and reading: list again
                if not state.get("released") and time.time() < float(state.get("expires", 0)):
                    holder = state.get("owner", "?")
            if holder is None:
                lease = _Lease(fs, root, (gens[-1] + 1) if gens else 0, ttl_s, owner)
                body = {"owner": owner, "expires": time.time() + ttl_s, "released": False}
                try:
                    fs.pipe_file(lease._path(lease.generation), json.dumps(body).encode(), mode="create")
                    break
                except (FileExistsError, OSError) as exc:
                    if not isinstance(exc, FileExistsError) and "condition" not in str(exc).lower():
                        raise
                    continue  # another writer created this generation first
            if time.monotonic() > deadline:
                raise AlreadyRunning(f"{what}: the lease {uri} is held by {holder} (it expires {ttl_s:.0f} s "
                                     "after its holder's last renewal)")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        for g in gens[:-1]:  # history nobody needs: the latest generation alone decides
            with contextlib.suppress(Exception):
                fs.rm_file(f"{root}/{g:012d}.json")
    lease._thread.start()
    try:
        yield lease
    finally:
        lease.release()


def fetch_meta_file(lake_path: str, name: str, dest: Path, storage_options: dict[str, Any] | None = None) -> bool:
    """Copy a writer's bookkeeping file ``<lake>/_<name>`` of an object-store lake to ``dest``.

    Returns:
        False when the lake has no such file yet (``dest`` is left alone).
    """
    uri = meta_uri(lake_path, name)
    with store_errors(uri, storage_options):
        fs, path = _fs(uri, storage_options)
        try:
            fs.get_file(path, str(dest))
        except FileNotFoundError:
            return False
    return True


def publish_meta_file(src: Path, lake_path: str, name: str, storage_options: dict[str, Any] | None = None) -> None:
    """Upload a writer's bookkeeping file to ``<lake>/_<name>`` (one PUT: readers see the old object or the
    new one, never part of it)."""
    uri = meta_uri(lake_path, name)
    with store_errors(uri, storage_options):
        fs, path = _fs(uri, storage_options)
        fs.put_file(str(src), path)


def write_meta_object(lake_path: str, name: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Replace a writer's small bookkeeping object ``<lake>/_<name>`` (a status, a counter) on any lake
    root: a reader sees the old content or the new, never part of it (a rename on a local lake, one PUT
    on an object store)."""
    import os

    if is_local(lake_path):
        path = meta_path(lake_path, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    uri = meta_uri(lake_path, name)
    with store_errors(uri, storage_options):
        fs, path = _fs(uri, storage_options)
        fs.pipe_file(path, data)


def read_meta_object(lake_path: str, name: str, storage_options: dict[str, Any] | None = None) -> bytes | None:
    """The content of ``<lake>/_<name>`` (:func:`write_meta_object`), or None when there is none."""
    if is_local(lake_path):
        path = meta_path(lake_path, name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
    uri = meta_uri(lake_path, name)
    with store_errors(uri, storage_options):
        fs, path = _fs(uri, storage_options)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


STAGING = "staging"
QUARANTINE = "quarantine"


def staging_uri(lake_path: str, batch_id: str) -> str:
    """Where an object-store lake's writers stage a batch (``<lake>/_staging/<batch_id>``): every host
    that processes part of the batch and the one that commits it see the same prefix. Nothing there is
    part of any table version; the committer removes it (:func:`remove_tree`)."""
    return f"{meta_uri(lake_path, STAGING)}/{batch_id}"


def default_quarantine(lake_path: str) -> str | None:
    """An object-store lake's quarantine when none is configured: ``<lake>/_quarantine``, on the same
    store as the rows it holds back; None for a local lake (whose quarantine stays a local folder)."""
    return None if is_local(lake_path) else meta_uri(lake_path, QUARANTINE)


def put_tree(src: Path, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Upload every file under the local folder ``src`` to the prefix ``uri`` (relative names kept).

    Each file is one PUT: a reader sees a whole object or none. Hidden temporary files are skipped.
    """
    files = [f for f in sorted(src.rglob("*")) if f.is_file() and not f.name.startswith(".")]
    if not files:
        return
    with store_errors(uri, storage_options):
        fs, root = _fs(uri, storage_options)
        fs.put([str(f) for f in files], [f"{root}/{f.relative_to(src).as_posix()}" for f in files])


def get_tree(uri: str, dest: Path, storage_options: dict[str, Any] | None = None) -> bool:
    """Download every object under the prefix ``uri`` into the local folder ``dest``.

    Returns:
        False when there is nothing under ``uri``.
    """
    with store_errors(uri, storage_options):
        fs, root = _fs(uri, storage_options)
        found = fs.find(root)
        if not found:
            return False
        targets = [dest / f[len(root):].lstrip("/") for f in found]
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
        fs.get(found, [str(t) for t in targets])
    return True


def put_object(src: Path, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Upload one local file to ``uri`` (one PUT: readers see the old object or the new one)."""
    with store_errors(uri, storage_options):
        fs, path = _fs(uri, storage_options)
        fs.put_file(str(src), path)


def find_objects(uri: str, pattern: str = "**", storage_options: dict[str, Any] | None = None) -> list[str]:
    """The objects under the prefix ``uri`` whose names relative to it match ``pattern`` (fsspec glob),
    as full URLs."""
    with store_errors(uri, storage_options):
        fs, root = _fs(uri, storage_options)
        scheme = uri.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in sorted(fs.glob(f"{root.rstrip('/')}/{pattern}")) if not fs.isdir(p)]


def remove_tree(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete every object under the prefix ``uri`` (nothing there is fine)."""
    with store_errors(uri, storage_options):
        fs, root = _fs(uri, storage_options)
        found = fs.find(root)
        if found:
            fs.rm(found)


def partition_dir(asset: str) -> str:
    """The partition folder name of an asset, as delta-rs writes it (percent-encoded value)."""
    return f"{PARTITION}={quote(asset, safe='')}"


def _settings_options(storage_options: dict[str, Any] | None, uri: str) -> dict[str, Any] | None:
    """The caller's options; for an object-store URI given none, the lake's options from the active
    settings (credentials block, ``storage_options``, ``secret_options``): stages that read the lake
    without passing options (the twin's calibration, simulate, health) then reach the same store."""
    if storage_options is not None or not is_object_store(uri):
        return storage_options
    from twinflow import runtime
    from twinflow.settings import get_settings

    active = runtime.current()
    return (active.settings if active is not None else get_settings()).lake.fsspec_options() or None


def _options(storage_options: dict[str, Any] | None, uri: str = "") -> dict[str, str] | None:
    from twinflow.storage import delta_options

    return delta_options(uri, _settings_options(storage_options, uri))


def _fs(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec file system and path of a lake URI (object-store options translated for s3fs)."""
    import fsspec

    from twinflow.storage import fsspec_options

    return fsspec.core.url_to_fs(uri, **fsspec_options(_settings_options(storage_options, uri)))


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec file system of a lake URI (or of its quarantine) and the path in it."""
    return _fs(uri, storage_options)


def _exists(uri: str, storage_options: dict[str, Any] | None) -> bool:
    from deltalake import DeltaTable

    with store_errors(uri, storage_options):
        return DeltaTable.is_deltatable(uri, storage_options=_options(storage_options, uri))


_REFUSED = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403 Forbidden", "ExpiredToken")
_UNREACHABLE = ("Connection refused", "tcp connect error", "dns error", "timed out", "Name or service not known",
                "No route to host", "Could not connect")


@contextlib.contextmanager
def store_errors(uri: str, storage_options: dict[str, Any] | None) -> Iterator[None]:
    """Turn an object store's nested error chain into one line that says what to fix.

    Raises:
        ConfigError: credentials refused, or no such bucket.
        ServiceUnavailable: the endpoint cannot be reached.
    """
    try:
        yield
    except Exception as exc:
        # delta-rs raises OSError; s3fs mostly too, but botocore's connection errors are its own.
        if is_local(uri) or not (isinstance(exc, OSError)
                                 or type(exc).__module__.startswith(("botocore", "aiobotocore"))):
            raise
        text = str(exc)
        endpoint = next((str(v) for k, v in (storage_options or {}).items()
                         if k.upper() in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT")), "the default endpoint")
        code = next((c for c in _REFUSED if c in text), None)
        if code is None and isinstance(exc, PermissionError):
            # s3fs (the lake's bookkeeping objects) says it in words, without the S3 error code.
            code = "SignatureDoesNotMatch" if "signature" in text.lower() else "AccessDenied"
        if code:
            raise ConfigError(f"object store {endpoint} refused the credentials for {uri} ({code}): check "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the lake's storage options or block") from None
        if "NoSuchBucket" in text:
            bucket = uri.split("://", 1)[1].split("/", 1)[0]
            raise ConfigError(f"bucket {bucket!r} does not exist at {endpoint}: create it first") from None
        reason = next((r for r in _UNREACHABLE if r in text), None)
        if reason:
            raise ServiceUnavailable(f"object store {endpoint} is unreachable ({reason}) for {uri}") from None
        raise


def open_table(lake_path: str, dataset: str, version: int | None = None,
               storage_options: dict[str, Any] | None = None, migrate: bool = True) -> "DeltaTable | None":
    """Open a dataset's table (at ``version``, default the latest); None when it does not exist.

    A twinflow 0.1 hive-Parquet dataset of that name is converted first (:func:`migrate_hive`), unless
    ``migrate`` is False.
    """
    from deltalake import DeltaTable

    uri = table_uri(lake_path, dataset)
    if not _exists(uri, storage_options):
        if not (migrate and is_local(lake_path) and migrate_hive(lake_path, dataset)):
            return None
    with store_errors(uri, storage_options):
        return DeltaTable(uri, version=version, storage_options=_options(storage_options, uri))


def datasets(lake_path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the datasets in a lake (local legacy ones included: they convert when opened).

    On an object store, a dataset is a prefix holding a ``_delta_log/`` prefix: one listing of the
    lake root and one of each candidate (bookkeeping prefixes ``_…`` are not datasets).
    """
    if not is_local(lake_path):
        with store_errors(lake_path, storage_options):
            fs, root = _fs(lake_path, storage_options)
            root = root.rstrip("/")
            try:
                tops = fs.ls(root, detail=True, refresh=True)
            except FileNotFoundError:
                return []
            names = []
            for entry in tops:
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if entry.get("type") != "directory" or name.startswith("_"):
                    continue
                if fs.exists(f"{root}/{name}/_delta_log"):
                    names.append(name)
        return sorted(names)
    root = local_path(lake_path)
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir() if (p / "_delta_log").is_dir()}
    names |= {p.name[len(_LEGACY_PREFIX):] for p in root.glob(f"{_LEGACY_PREFIX}*") if p.is_dir()}
    return sorted(names)


def version(lake_path: str, dataset: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """The dataset's latest table version, or None when it has no table."""
    dt = open_table(lake_path, dataset, storage_options=storage_options)
    return None if dt is None else dt.version()


def transaction_version(lake_path: str, dataset: str, app_id: str = INGEST_APP_ID,
                        storage_options: dict[str, Any] | None = None) -> int | None:
    """The last application-transaction version ``app_id`` committed to the dataset (None: none)."""
    dt = open_table(lake_path, dataset, storage_options=storage_options)
    return None if dt is None else dt.transaction_version(app_id)


# --- Writing ------------------------------------------------------------------------------------


def _contract(contract: FleetContract | None, lake_path: str | None = None, dataset: str | None = None,
              storage_options: dict[str, Any] | None = None) -> FleetContract:
    """The contract to write or read with: the one given, else the table's own, else the settings'."""
    if contract is not None:
        return contract
    if lake_path is not None and dataset is not None:
        stored = table_contract(lake_path, dataset, storage_options)
        if stored is not None:
            return stored
    from twinflow.contract.store import resolve_contract

    return resolve_contract(None)


def conform(table: pa.Table, batch_id: str, source_file: str = "generated",
            contract: FleetContract | None = None) -> pa.Table:
    """Cast a table to the contract's lake schema, adding null channels and lineage columns."""
    schema = _contract(contract).lake_schema()
    n = table.num_rows
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            cols.append(col.cast(field.type))
        elif field.name == "source_file":
            cols.append(pa.repeat(pa.scalar(source_file, pa.string()), n))
        elif field.name == "batch_id":
            cols.append(pa.repeat(pa.scalar(batch_id, pa.string()), n))
        elif field.name == "quality":
            cols.append(pa.array(np.zeros(n, np.int32)))
        elif field.nullable:
            cols.append(pa.nulls(n, field.type))
        else:
            raise ConfigError(f"table lacks required column {field.name!r}")
    return pa.Table.from_arrays(cols, schema=schema)


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def commit(lake_path: str, dataset: str, table: pa.Table | pa.RecordBatchReader | None, *, replace: dict[str, Sequence[str]] | None = None,
           txn: tuple[str, int] | None = None, metadata: dict[str, str] | None = None,
           storage_options: dict[str, Any] | None = None, contract: FleetContract | None = None,
           _migrating: bool = False) -> int | None:
    """Append rows to a dataset and drop the rows they replace, in one Delta transaction.

    Args:
        lake_path: Lake root.
        dataset: Dataset (table) name; the table is created on its first commit.
        table: Rows (a table, or a stream of batches in the telemetry schema for bounded memory); None
            or empty to only drop rows.
        replace: ``{column: values}``: existing rows whose ``column`` is one of ``values`` are removed in the
            same transaction (e.g. ``{"source_file": [...]}`` for sources read again). Every appended row
            must match it too, so that the commit is a replace of exactly those rows.
        txn: ``(app_id, version)`` recorded in the commit (see :func:`transaction_version`).
        metadata: Custom commit metadata (shown by ``DESCRIBE HISTORY`` / :func:`history`).
        storage_options: Object-store options for delta-rs.
        contract: The fleet contract of the rows (default: the table's, else the settings'). A table
            keeps one contract name; a later version that adds channels evolves the table's schema
            (older rows read the new channels as null).

    Returns:
        The table version after the commit (None when nothing was written and no table exists).

    Raises:
        ConfigError: when the table holds data of another contract (:func:`check_contract`).
    """
    from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake
    from deltalake import ColumnProperties

    uri = table_uri(lake_path, dataset)
    props = CommitProperties(
        custom_metadata=dict(metadata or {}) or None,
        app_transactions=[Transaction(app_id=txn[0], version=txn[1])] if txn else None)
    predicate = " AND ".join(f"{col} IN ({_sql_list(vals)})" for col, vals in (replace or {}).items() if vals)
    stream = isinstance(table, pa.RecordBatchReader)
    rows = table is not None and (stream or table.num_rows > 0)
    dt = open_table(lake_path, dataset, storage_options=storage_options, migrate=not _migrating)
    if not rows:
        if dt is None:
            return None
        if predicate:
            dt.delete(predicate, commit_properties=props)
            dt.update_incremental()
        return dt.version()
    contract = _contract(contract, lake_path, dataset, storage_options)
    evolve = _prepare_contract(lake_path, dataset, contract, dt, storage_options)
    props.custom_metadata = {**(props.custom_metadata or {}), **_contract_metadata(contract)}
    data = table if stream else conform(table, batch_id="", contract=contract)
    writer = WriterProperties(
        compression="SNAPPY", default_column_properties=ColumnProperties(dictionary_enabled=False),
        column_properties={c: ColumnProperties(dictionary_enabled=True) for c in _DICT_COLUMNS})
    write_deltalake(dt if dt is not None else uri, data, partition_by=[PARTITION],
                    mode="overwrite" if predicate and dt is not None else "append",
                    predicate=predicate if dt is not None and predicate else None,
                    writer_properties=writer, commit_properties=props,
                    schema_mode="merge" if evolve else None,
                    storage_options=_options(storage_options, uri))
    if evolve or dt is None:
        write_contract(lake_path, dataset, contract, storage_options)
    return open_table(lake_path, dataset, storage_options=storage_options, migrate=False).version()


def _contract_metadata(contract: FleetContract) -> dict[str, str]:
    return {"twinflow.contract": f"{contract.name} v{contract.version}",
            "twinflow.contract_digest": contract.digest}


def _prepare_contract(lake_path: str, dataset: str, contract: FleetContract, dt: "DeltaTable | None",
                      storage_options: dict[str, Any] | None) -> bool:
    """Check a write's contract against the table's; True when the table's schema must evolve.

    A table written before contracts existed (no contract file) adopts the writer's contract if its
    columns fit it.
    """
    stored = check_contract(lake_path, dataset, contract, storage_options)
    if dt is None:
        return False
    have = {f.name for f in dt.schema().fields}
    want = set(contract.lake_schema().names)
    if not want <= have:
        return True
    if stored is None or stored.digest != contract.digest:
        write_contract(lake_path, dataset, contract, storage_options)
    return False


def data_schema(contract: FleetContract | None = None) -> pa.Schema:
    """The schema of a data file of a lake table: the contract's lake schema without the partition column."""
    schema = _contract(contract).lake_schema()
    return schema.remove(schema.get_field_index(PARTITION))


def data_file_table(rows: pa.Table, contract: FleetContract | None = None) -> pa.Table:
    """Rows (with or without the asset column) cast to :func:`data_schema`, null where a column is absent."""
    cols = []
    schema = data_schema(contract)
    for f in schema:
        if f.name in rows.column_names:
            col = rows.column(f.name)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            cols.append(col.cast(f.type))
        elif f.nullable:
            cols.append(pa.nulls(rows.num_rows, f.type))
        else:
            raise ConfigError(f"rows lack required column {f.name!r}")
    return pa.Table.from_arrays(cols, schema=schema)


def write_data_file(rows: pa.Table, where: Any, contract: FleetContract | None = None) -> None:
    """Write rows of one asset as a data file of a lake table (the file :func:`commit_data_files` adds).

    Dictionary pages only on lineage (the float channels gain nothing and write ~3x slower); min/max
    statistics on the cycle and lineage columns (what readers prune on and :func:`commit_data_files`
    reads back for the commit's file statistics), not on every channel.
    """
    import pyarrow.parquet as pq

    contract = _contract(contract)
    pq.write_table(data_file_table(rows, contract), where, use_dictionary=_DICT_COLUMNS, compression="snappy",
                   write_statistics=[contract.key, *_STATS_COLUMNS])


_STATS_COLUMNS = ["source_file", "batch_id"]


def _file_stats(path: Path, key: str) -> str:
    """Delta file statistics (numRecords, min/max of the time key and lineage) from a Parquet footer."""
    import json

    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    for name in (key, *_STATS_COLUMNS):
        j = names.index(name)
        lo = hi = None
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(j).statistics
            if st is None or not st.has_min_max:
                lo = hi = None
                break
            lo = st.min if lo is None else min(lo, st.min)
            hi = st.max if hi is None else max(hi, st.max)
        if lo is not None:
            if name == C.TIMESTAMP:  # Delta statistics hold timestamps as ISO-8601 text
                lo, hi = (_iso_utc(lo), _iso_utc(hi))
            mins[name], maxs[name] = lo, hi
    return json.dumps({"numRecords": md.num_rows, "minValues": mins, "maxValues": maxs,
                       "nullCount": {key: 0, "source_file": 0, "batch_id": 0}}, default=str)


def _iso_utc(v: Any) -> str:
    """A Parquet timestamp statistic (datetime or µs integer) as Delta's ISO-8601 UTC text."""
    from datetime import datetime, timezone

    if isinstance(v, int):
        v = datetime.fromtimestamp(v / 1e6, tz=timezone.utc)
    if v.tzinfo is None:
        v = v.replace(tzinfo=timezone.utc)
    return v.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _single_source_files(dt: "DeltaTable", sources: set[str]) -> tuple[list[tuple[str, int, str]], bool]:
    """The table's files that hold rows of ``sources`` only: ``(path, size, asset)``; and whether any
    other file may hold rows of them too (no statistics, or several sources in one file)."""
    import bisect

    actions = pa.table(dt.get_add_actions(flatten=True))
    if not sources or actions.num_rows == 0:
        return [], False
    ordered = sorted(sources)
    cols = actions.column_names
    lo = actions.column("min.source_file").to_pylist() if "min.source_file" in cols else [None] * actions.num_rows
    hi = actions.column("max.source_file").to_pylist() if "max.source_file" in cols else [None] * actions.num_rows
    out, mixed = [], False
    for path, size, asset, a, b in zip(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(),
                                       actions.column(f"partition.{PARTITION}").to_pylist(), lo, hi):
        if a is None or b is None:
            mixed = True
        elif a == b:
            if a in sources:
                out.append((unquote(path), int(size), asset))
        elif bisect.bisect_left(ordered, a) < bisect.bisect_right(ordered, b):
            mixed = True  # a compacted or migrated file spanning a replaced source: rows must be rewritten
    return out, mixed


def commit_data_files(lake_path: str, dataset: str, files: Sequence[tuple[str | Path, str]], *,
                      replace_sources: Iterable[str] = (), txn: tuple[str, int] | None = None,
                      metadata: dict[str, str] | None = None, contract: FleetContract | None = None,
                      storage_options: dict[str, Any] | None = None) -> int:
    """Add data files (written with :func:`write_data_file`, one asset each) to a table and remove the
    rows of ``replace_sources``, in one Delta transaction, without rewriting a byte.

    The files are moved into their partition folders (same file system: a rename) and named in the
    commit's add actions; the replaced sources' files are named in its remove actions. Where a file
    holds rows of a replaced source and of others (after :func:`optimize`, or a converted 0.1 lake),
    the commit instead streams the new files through :func:`commit` with a ``source_file IN (...)``
    predicate: still one transaction, at the cost of rewriting. On an object store the files are
    uploaded to their partition folders first: until the commit names them no reader sees them, and a
    crash before it leaves only unreferenced files (:func:`vacuum` removes them).

    Returns:
        The table version after the commit.
    """
    import os
    import time
    import uuid

    from deltalake import CommitProperties, DeltaTable, Transaction
    from deltalake.transaction import AddAction, RemoveAction

    sources = set(replace_sources)
    so = storage_options
    uri = table_uri(lake_path, dataset)
    contract = _contract(contract, lake_path, dataset, so)
    dt = open_table(lake_path, dataset, storage_options=so)
    evolve = _prepare_contract(lake_path, dataset, contract, dt, so)
    if dt is None:
        with store_errors(uri, so):
            dt = DeltaTable.create(uri, schema=contract.lake_schema(), partition_by=[PARTITION],
                                   storage_options=_options(so, uri))
        write_contract(lake_path, dataset, contract, so)
    removes, mixed = _single_source_files(dt, sources)
    if mixed or evolve:
        # Rewriting through write_deltalake also merges the new channels into the table's schema.
        v = commit_files(lake_path, dataset, [p for p, _ in files], replace={"source_file": sorted(sources)},
                         txn=txn, metadata=metadata, contract=contract, assets=[a for _, a in files],
                         storage_options=so)
        return v if v is not None else dt.version()
    now = int(time.time() * 1000)
    actions: list[Any] = []
    remote = None if is_local(lake_path) else _fs(uri, so)
    for path, asset in files:
        rel = f"{partition_dir(asset)}/part-{uuid.uuid4()}-c000.snappy.parquet"
        if remote is None:
            dest = local_path(lake_path) / dataset / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
        else:
            dest = Path(path)
            fs, root = remote
            with store_errors(uri, so):
                # Same object name as the local layout's file name (see the local branch above).
                fs.put_file(str(dest), f"{root}/{rel}")
        actions.append(AddAction(rel, dest.stat().st_size, {PARTITION: asset}, now, True,
                                 _file_stats(dest, contract.key)))
    actions += [RemoveAction(p, True, now, size, {PARTITION: asset}) for p, size, asset in removes]
    if not actions:
        return dt.version()
    props = CommitProperties(custom_metadata={**(metadata or {}), **_contract_metadata(contract)},
                             app_transactions=[Transaction(app_id=txn[0], version=txn[1])] if txn else None)
    with store_errors(uri, so):
        dt.create_write_transaction(actions, mode="append", schema=contract.lake_schema(),
                                    partition_by=[PARTITION], commit_properties=props)
        dt.update_incremental()
    if remote is not None:
        for path, _ in files:
            Path(path).unlink(missing_ok=True)
    return dt.version()


def staged_path(lake_path: str, batch_id: str, name: str) -> Path:
    """A file in a writer's staging folder (``<lake>/_staging/<batch_id>/<name>.parquet``; local lakes).

    Workers write parts of one commit there (:func:`write_staged`); :func:`commit_files` publishes them
    in one transaction. Nothing there is part of any table version.
    """
    return meta_path(lake_path, "staging") / batch_id / f"{name}.parquet"


def write_staged(table: pa.Table, path: Path, batch_id: str, source_file: str = "generated",
                 contract: FleetContract | None = None) -> str:
    """Write rows (conformed to the telemetry schema) to a staging file atomically; return its sha256."""
    import os
    import uuid

    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(conform(table, batch_id, source_file, contract), tmp)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def commit_files(lake_path: str, dataset: str, paths: Sequence[str | Path], *,
                 replace: dict[str, Sequence[str]] | None = None, txn: tuple[str, int] | None = None,
                 metadata: dict[str, str] | None = None, storage_options: dict[str, Any] | None = None,
                 contract: FleetContract | None = None, assets: Sequence[str] | None = None) -> int | None:
    """:func:`commit` of the rows of staged Parquet files, streamed one row group at a time; the files
    are removed once the commit is in. Data files without an asset column take theirs from ``assets``
    (one per path) or else from their partition folder."""
    import pyarrow.parquet as pq

    contract = _contract(contract, lake_path, dataset, storage_options)
    schema = contract.lake_schema()

    def batches():
        for i, p in enumerate(paths):
            f = pq.ParquetFile(p)
            asset = None if PARTITION in f.schema_arrow.names else (assets[i] if assets else asset_of(str(p)))
            for g in range(f.num_row_groups):
                t = f.read_row_group(g)
                if asset is not None:  # a data file: its asset is its folder's
                    t = t.append_column(PARTITION, pa.repeat(pa.scalar(asset, pa.string()), t.num_rows))
                yield from conform(t, batch_id="", contract=contract).to_batches()

    v = commit(lake_path, dataset, pa.RecordBatchReader.from_batches(schema, batches()) if paths else None,
               replace=replace, txn=txn, metadata=metadata, storage_options=storage_options, contract=contract)
    for p in paths:
        Path(p).unlink(missing_ok=True)
    return v


def write_lake_table(table: pa.Table, lake_path: str, dataset: str, batch_id: str,
                     storage_options: dict[str, Any] | None = None,
                     contract: FleetContract | None = None) -> LakeSnapshot:
    """Write a table twinflow generated itself (e.g. a synthetic fleet) into a dataset, in one commit.

    Rows of an earlier write with the same ``batch_id`` are replaced, so writing a batch again does not
    duplicate it. This bypasses the ingest ledger and validation.

    Returns:
        A snapshot at the new table version, whose digest is the content hash of the rows written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", batch_id):
        raise ConfigError(f"batch_id {batch_id!r} must be letters, digits, '_', '-' or '.'")
    contract = _contract(contract, lake_path, dataset, storage_options)
    t = conform(table, batch_id, contract=contract)
    t = t.take(pc.sort_indices(t, [(C.ASSET, "ascending"), (contract.key, "ascending")]))
    v = commit(lake_path, dataset, t, replace={"batch_id": [batch_id]},
               metadata={"twinflow.operation": "write_lake_table", "twinflow.batch_id": batch_id},
               storage_options=storage_options, contract=contract)
    h = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    h.update(sink.getvalue())
    ref = FileRef(path=f"generated:{dataset}/{batch_id}", sha256=h.hexdigest(), rows_read=t.num_rows,
                  rows_written=t.num_rows, lake_file=batch_id)
    return LakeSnapshot(lake_path=lake_path, dataset=dataset, batch_id=batch_id, files=[ref], rows=t.num_rows,
                        version=v, contract=contract)


# --- Reading ------------------------------------------------------------------------------------


def snapshot_contract(snapshot: LakeSnapshot, storage_options: dict[str, Any] | None = None) -> FleetContract:
    """The contract to read a snapshot with: the snapshot's own, checked against the table's.

    Raises:
        ConfigError: when the snapshot names a contract other than the table's (:func:`check_contract`).
    """
    if snapshot.contract is not None:
        check_contract(snapshot.lake_path, snapshot.dataset, snapshot.contract, storage_options)
        return snapshot.contract
    return _contract(None, snapshot.lake_path, snapshot.dataset, storage_options)


def _snapshot_table(snapshot: LakeSnapshot, storage_options: dict[str, Any] | None) -> "DeltaTable":
    dt = open_table(snapshot.lake_path, snapshot.dataset, version=snapshot.version,
                    storage_options=storage_options)
    if dt is None:
        raise ConfigError(f"dataset {snapshot.dataset!r} is not in the lake at {snapshot.lake_path}; "
                          "run the ingest stage first")
    return dt


def read_lake(snapshot: LakeSnapshot, columns: list[str] | None = None, filter: Any = None,
              storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read a dataset at the snapshot's table version, as one Arrow table sorted by (asset_id, cycle).

    Args:
        snapshot: The dataset reference; without a ``version`` the latest version is read.
        columns: Columns to read (default: all canonical columns).
        filter: Optional ``pyarrow.dataset`` expression (partition pruning on ``asset_id`` applies).
        storage_options: Object-store options for delta-rs.
    """
    contract = snapshot_contract(snapshot, storage_options)
    cols = columns or contract.lake_schema().names
    if snapshot.version is None and snapshot.files and snapshot.rows == 0 and \
            open_table(snapshot.lake_path, snapshot.dataset, storage_options=storage_options) is None:
        # Files were ingested but every row was quarantined: the table was never created.
        return contract.lake_schema().empty_table().select(cols)
    dt = _snapshot_table(snapshot, storage_options)
    table = dt.to_pyarrow_dataset().to_table(columns=cols, filter=filter)
    table = _plain_strings(table)
    sort_keys = [(k, "ascending") for k in (C.ASSET, contract.key) if k in table.column_names]
    return table.sort_by(sort_keys) if sort_keys else table


def read_recent(snapshot: LakeSnapshot, rows: int, columns: list[str] | None = None,
                storage_options: dict[str, Any] | None = None, assets: Iterable[str] | None = None
                ) -> tuple[pa.Table, pa.Table]:
    """Each asset's last ``rows`` readings at the snapshot's version, and every asset's extent.

    What scoring "now" needs without a whole-history read: the files to open are chosen from the
    Delta log alone (per asset, the newest files by their time statistics until they hold ``rows``
    readings, plus any older file whose time range reaches into them), and are read file by file
    (:func:`read_files`), because building a ``pyarrow`` dataset over one fragment per asset
    partition costs more than reading the files themselves (10,000 assets: ~19 s against ~5 s).
    The extents (readings, first and last time per asset) come from the log's record counts and
    min/max statistics, so they cover the whole history although only its tail is read (the last time
    from the tail itself: a compacted file's statistics are cut to the millisecond).

    Args:
        snapshot: The dataset reference; without a ``version`` the latest version is read.
        rows: Readings per asset to return (its newest ones).
        columns: Columns to read (default: all canonical columns); the asset and time key are added.
        storage_options: Object-store options for delta-rs.
        assets: Only these assets (default: every asset of the version).

    Returns:
        ``(recent, extents)``: the rows sorted by (asset_id, time key); and one row per asset with
        ``asset_id``, ``readings`` (int64), ``first`` and ``last`` (the time key's type).
    """
    contract = snapshot_contract(snapshot, storage_options)
    key = contract.key
    cols = list(dict.fromkeys([C.ASSET, key, *(columns or contract.lake_schema().names)]))
    schema = contract.lake_schema()
    empty = (schema.empty_table().select(cols),
             pa.table({C.ASSET: pa.array([], pa.string()), "readings": pa.array([], pa.int64()),
                       "first": pa.array([], schema.field(key).type), "last": pa.array([], schema.field(key).type)}))
    if snapshot.version is None and snapshot.files and snapshot.rows == 0 and \
            open_table(snapshot.lake_path, snapshot.dataset, storage_options=storage_options) is None:
        return empty  # every row was quarantined: the table was never created
    dt = _snapshot_table(snapshot, storage_options)
    files = _files_frame(dt, key)
    if files is None:
        return empty
    root = dt.table_uri.rstrip("/").removeprefix("file://")
    if assets is not None:
        files = files[files["asset"].isin(set(assets))]
        if files.empty:
            return empty
    # Newest first per asset; a file without statistics sorts as newest, so it is always read.
    files = files.sort_values(["asset", "hi"], ascending=[True, False], na_position="first", kind="stable")
    before = files.groupby("asset", sort=False)["n"].cumsum() - files["n"]
    needed = before < rows
    # The oldest time the kept files reach; an older file overlapping it holds rows of the tail too.
    reach = files["lo"].where(needed).groupby(files["asset"], sort=False).transform("min")
    unknown = (files["lo"].isna() | files["hi"].isna()).where(needed, False).groupby(
        files["asset"], sort=False).transform("any")
    keep = needed | (files["hi"] >= reach).fillna(False) | unknown
    chosen = files[keep].sort_values(["asset", "lo"], kind="stable")
    paths = [(rel if "://" in rel else f"{root}/{rel}") for rel in map(unquote, chosen["path"])]
    assets, file_asset = np.unique(chosen["asset"].to_numpy(dtype=object).astype(str), return_inverse=True)
    data_cols = [c for c in cols if c != PARTITION]
    parts = list(_read_tables(paths, data_cols, storage_options, chosen["size"].tolist()))
    table = pa.concat_tables(parts, promote_options="permissive") if parts else schema.empty_table().select(data_cols)
    # Asset codes from the files' order: no string column is built until the tail is cut.
    codes = np.repeat(file_asset, [t.num_rows for t in parts]).astype(np.int32)
    t = table.column(key)
    tv = (t.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()) if pa.types.is_timestamp(t.type) else t
          ).to_numpy(zero_copy_only=False)
    step = np.diff(codes)
    if len(codes) > 1 and not ((step > 0) | ((step == 0) & (np.diff(tv) > 0))).all():
        order = np.lexsort((tv, codes))
        table, codes = table.take(pa.array(order)), codes[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.array([], np.int64)
    ends = np.r_[starts[1:], len(codes)].astype(np.int64)
    count = ends - starts
    pos = np.arange(len(codes)) - np.repeat(starts, count)
    tail = pos >= np.repeat(np.maximum(count - rows, 0), count)
    if not tail.all():
        table, codes = table.filter(pa.array(tail)), codes[tail]
    asset_col = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(assets.tolist(), pa.string())).cast(pa.string())
    table = table.append_column(PARTITION, asset_col)
    recent = table
    extents = _extents(files, schema.field(key).type)
    if len(codes):
        # The last reading from the rows themselves: the statistics of a compacted file (delta-rs
        # writes them) are cut to the millisecond, so they may precede it; the recent table keeps it exact.
        ends = np.r_[np.flatnonzero(codes[1:] != codes[:-1]), len(codes) - 1]
        at = pc.index_in(extents.column(C.ASSET), value_set=pa.array(assets[codes[ends]].tolist(), pa.string()))
        exact = table.column(key).take(pa.array(ends)).combine_chunks().take(at)
        extents = extents.set_column(3, "last", pc.if_else(pc.is_null(at), extents.column("last"), exact))
    return recent.select(cols), extents


def _files_frame(dt: "DeltaTable", key: str) -> "Any":
    """The version's data files from its Delta log, as a pandas frame: ``path``, ``size``, ``asset``,
    ``n`` (records) and ``lo``/``hi`` (the time key's min/max statistics as Float64 ticks: cycles, or
    µs since the epoch; NA where a file has none). None when the version has no files."""
    import pandas as pd

    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return None
    names = actions.column_names
    ticks = []
    for stat in ("min", "max"):
        col = actions.column(f"{stat}.{key}") if f"{stat}.{key}" in names else pa.nulls(actions.num_rows, pa.int64())
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        ticks.append(col.to_pandas().astype("Float64"))
    return pd.DataFrame({"path": actions.column("path").to_pylist(),
                         "size": actions.column("size_bytes").to_numpy(zero_copy_only=False).astype(np.int64),
                         "asset": actions.column(f"partition.{PARTITION}").to_pylist(),
                         "n": actions.column("num_records").to_numpy(zero_copy_only=False).astype(np.int64),
                         "lo": ticks[0], "hi": ticks[1]})


def _extents(files: "Any", key_type: pa.DataType) -> pa.Table:
    """Per asset (sorted): ``readings`` (the files' records), ``first`` and ``last`` (their min/max time
    statistics, in the time key's type), from a :func:`_files_frame`."""
    by_asset = files.groupby("asset", sort=True).agg(readings=("n", "sum"), first=("lo", "min"), last=("hi", "max"))

    def _typed(v: Any) -> pa.Array:
        arr = pa.array(v.to_numpy(dtype="float64", na_value=np.nan), pa.float64(), from_pandas=True).cast(pa.int64())
        return arr.cast(pa.timestamp("us", tz="UTC")).cast(key_type) if pa.types.is_timestamp(key_type) \
            else arr.cast(key_type)

    return pa.table({C.ASSET: pa.array(by_asset.index.astype(str).tolist(), pa.string()),
                     "readings": pa.array(by_asset["readings"].to_numpy(dtype=np.int64)),
                     "first": _typed(by_asset["first"]), "last": _typed(by_asset["last"])})


def _read_local_file(path: str, columns: Sequence[str]) -> pa.Table:
    """One local data file's ``columns`` (those it has), see :func:`_read_parquet`."""
    return _read_parquet(path.removeprefix("file://"), columns)


def _read_parquet(source: str | pa.Buffer, columns: Sequence[str]) -> pa.Table:
    """One data file's ``columns`` (those it has) from a local path or the fetched object's bytes, through
    the Parquet reader itself: ``ParquetFile``'s Python layer costs ~30 % more per small file, which
    10,000 asset files feel (on an object store the reader's CPU is what the store's time adds to)."""
    from pyarrow._parquet import ParquetReader

    reader = ParquetReader()
    reader.open(source if isinstance(source, str) else pa.BufferReader(source), use_memory_map=False,
                pre_buffer=False)
    names = reader.schema_arrow.names
    return reader.read_all(column_indices=[names.index(c) for c in columns if c in names], use_threads=False)


def _plain_strings(table: pa.Table) -> pa.Table:
    """Partition values come back dictionary-encoded; the contract's columns are plain strings."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
    return table


def list_files(snapshot: LakeSnapshot, storage_options: dict[str, Any] | None = None
               ) -> dict[str, list[tuple[str, int]]]:
    """The data files of the snapshot's table version grouped by asset: ``{asset: [(uri, bytes)]}``.

    Raises:
        ConfigError: when the dataset has no table or no files.
    """
    dt = _snapshot_table(snapshot, storage_options)
    actions = pa.table(dt.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    assets = actions.column(f"partition.{PARTITION}").to_pylist()
    root = dt.table_uri.rstrip("/")
    if root.startswith("file://"):
        root = root[len("file://"):]
    groups: dict[str, list[tuple[str, int]]] = {}
    for path, size, asset in sorted(zip(paths, sizes, assets), key=lambda r: (r[2], r[0])):
        # Add actions hold URL-encoded relative paths of files whose partition folder is itself
        # percent-encoded: one unquote gives the name on disk.
        rel = unquote(path)
        groups.setdefault(asset, []).append((rel if "://" in rel else f"{root}/{rel}", int(size)))
    if not groups:
        raise ConfigError(f"dataset {snapshot.dataset!r} at version {dt.version()} has no rows; "
                          "run the ingest stage first")
    return groups


def time_extents(snapshot: LakeSnapshot, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Each asset's first and last time key and the source file of its last reading, at the
    snapshot's version: a table ``(asset_id, first, last, last_source)`` sorted by asset.

    The Delta log's per-file min/max statistics decide which files can hold an asset's first or last
    reading, and only those are read (two columns). Statistics only narrow the read, never give the
    answer, because delta-rs truncates them (timestamps to the millisecond, strings to a prefix): an
    asset's history ingested in many batches costs two file reads here, not a scan of its history.
    """
    contract = snapshot_contract(snapshot, storage_options)
    key = contract.key
    out_schema = pa.schema([(PARTITION, pa.string()), ("first", contract.lake_schema().field(key).type),
                            ("last", contract.lake_schema().field(key).type), ("last_source", pa.string())])
    dt = open_table(snapshot.lake_path, snapshot.dataset, version=snapshot.version,
                    storage_options=storage_options)
    if dt is None:
        return out_schema.empty_table()
    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return out_schema.empty_table()
    n = actions.num_rows
    cols = actions.column_names

    def ticks(name: str) -> np.ndarray:
        if name not in cols:
            return np.full(n, np.nan)
        col = actions.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False)

    lo, hi = ticks(f"min.{key}"), ticks(f"max.{key}")
    # Truncation slack of the statistics, in the key's int64 ticks (µs for timestamps).
    slack = 1000.0 if key == C.TIMESTAMP else 0.0
    assets = np.asarray(actions.column(f"partition.{PARTITION}").to_pylist(), dtype=object)
    root = dt.table_uri.rstrip("/").removeprefix("file://")
    paths = [rel if "://" in rel else f"{root}/{rel}" for rel in map(unquote, actions.column("path").to_pylist())]
    sizes = actions.column("size_bytes").to_pylist()
    import pandas as pd

    df = pd.DataFrame({"asset": assets, "lo": lo, "hi": hi})
    g = df.groupby("asset", sort=False)
    unknown = df[["lo", "hi"]].isna().any(axis=1).groupby(df["asset"]).transform("any")
    first_min, last_max = g["lo"].transform("min"), g["hi"].transform("max")
    keep = unknown | (df["lo"] <= first_min + slack) | (df["hi"] >= last_max - slack)
    chosen = [(p, b) for p, b, k in zip(paths, sizes, keep.to_numpy()) if k]
    # Each data file holds one asset: reduce file by file (a scan each) rather than sorting all the rows
    # read. An asset's last reading is the latest file's, in read order on a tie (as a stable sort).
    ktype = out_schema.field("first").type
    ext: dict[str, list[Any]] = {}  # asset -> [first, last, last_source]
    for path, t in _read_each([p for p, _ in chosen], [key, "source_file"], storage_options,
                              sizes=[b for _, b in chosen]):
        if t.num_rows == 0:
            continue
        k = t.column(key).cast(ktype).cast(pa.int64()).to_numpy()
        lo, hi = int(k.min()), int(k.max())
        at = len(k) - 1 - int(np.argmax(k[::-1] == hi))
        source = t.column("source_file")[at].as_py()
        e = ext.setdefault(asset_of(path), [lo, hi, source])
        if lo < e[0]:
            e[0] = lo
        if hi >= e[1]:
            e[1], e[2] = hi, source
    if not ext:
        return out_schema.empty_table()
    assets = sorted(ext)
    return pa.table({PARTITION: pa.array(assets, pa.string()),
                     "first": pa.array([ext[a][0] for a in assets], pa.int64()).cast(ktype),
                     "last": pa.array([ext[a][1] for a in assets], pa.int64()).cast(ktype),
                     "last_source": pa.array([ext[a][2] for a in assets], pa.string())},
                    schema=out_schema)


def files_for_keys(lake_path: str, dataset: str, keys: pa.Table,
                   storage_options: dict[str, Any] | None = None) -> list[str]:
    """The latest version's data files that may hold any ``(asset_id, cycle)`` of ``keys``.

    Decided from the Delta log alone (each file's partition and its cycle min/max statistics), so a
    lookup opens only the files whose cycle range overlaps the keys' range for that asset: the stream
    bridge's dedupe of each micro-batch stays proportional to the batch, not to the table. A file
    without statistics is always included.
    """
    dt = open_table(lake_path, dataset, storage_options=storage_options)
    if dt is None or keys.num_rows == 0:
        return []
    key = C.TIME if C.TIME in keys.column_names else C.TIMESTAMP
    ranges = {r[C.ASSET]: (r[f"{key}_min"], r[f"{key}_max"])
              for r in keys.group_by(C.ASSET).aggregate([(key, "min"), (key, "max")]).to_pylist()}
    actions = pa.table(dt.get_add_actions(flatten=True))
    cols = actions.column_names
    n = actions.num_rows
    lo = actions.column(f"min.{key}").to_pylist() if f"min.{key}" in cols else [None] * n
    hi = actions.column(f"max.{key}").to_pylist() if f"max.{key}" in cols else [None] * n
    root = dt.table_uri.rstrip("/").removeprefix("file://")
    out = []
    for path, asset, a, b in zip(actions.column("path").to_pylist(),
                                 actions.column(f"partition.{PARTITION}").to_pylist(), lo, hi):
        want = ranges.get(asset)
        if want is None or (a is not None and b is not None and (b < want[0] or a > want[1])):
            continue
        rel = unquote(path)
        out.append(rel if "://" in rel else f"{root}/{rel}")
    return out


def asset_of(path: str) -> str:
    """The asset whose partition folder holds a data file (as :func:`list_files` returns it)."""
    folder = path.rstrip("/").rsplit("/", 2)[-2]
    if not folder.startswith(f"{PARTITION}="):
        raise ConfigError(f"{path} is not a file of an {PARTITION}-partitioned lake table")
    return unquote(folder[len(PARTITION) + 1:])


# Objects one read keeps in flight: enough to keep a store's connections busy while the caller
# decodes, few enough that a batch of large files never sits in memory all at once.
_FETCH_AHEAD = 16


def _object_handler(root: str, storage_options: dict[str, Any] | None, sizes: dict[str, int]) -> Any:
    """delta-rs' object-store file system (Rust ``object_store``) on bucket ``root``.

    With each object's size known from the Delta log, a read is one ranged GET, no HEAD first.
    """
    from deltalake.fs import DeltaStorageHandler

    return DeltaStorageHandler(root, _options(storage_options, root), known_sizes=sizes or None)


def _fetch_objects(paths: Sequence[str], sizes: Sequence[int | None], storage_options: dict[str, Any] | None
                   ) -> Iterator[bytes]:
    """The whole objects at ``paths`` (``s3://bucket/key``), in order, ``_FETCH_AHEAD`` in flight.

    Why not s3fs: botocore costs ~3 ms of the caller's CPU per request and its event loop holds the
    GIL, while delta-rs' Rust client costs ~0.3 ms and releases it, so the caller decodes one file
    while the next ones arrive.
    """
    from concurrent.futures import ThreadPoolExecutor

    roots: dict[str, dict[str, int]] = {}
    keys = []
    for path, size in zip(paths, sizes):
        scheme, rest = path.split("://", 1)
        bucket, key = rest.split("/", 1)
        root = f"{scheme}://{bucket}"
        keys.append((root, key))
        if size is not None:
            roots.setdefault(root, {})[key] = int(size)
        else:
            roots.setdefault(root, {})
    handlers = {root: _object_handler(root, storage_options, known) for root, known in roots.items()}

    def get(item: tuple[str, str]) -> bytes:
        root, key = item
        with handlers[root].open_input_file(key) as fh:
            return fh.read()

    with ThreadPoolExecutor(max_workers=min(_FETCH_AHEAD, len(keys))) as pool:
        pending = [pool.submit(get, k) for k in keys[:_FETCH_AHEAD]]
        for i in range(len(keys)):
            blob = pending[i].result()
            pending[i] = None  # type: ignore[call-overload]  # the bytes leave with the caller
            if i + _FETCH_AHEAD < len(keys):
                pending.append(pool.submit(get, keys[i + _FETCH_AHEAD]))
            yield blob


def _read_tables(paths: Sequence[str], columns: Sequence[str], storage_options: dict[str, Any] | None = None,
                 sizes: Sequence[int] | None = None) -> Iterator[pa.Table]:
    """Each data file's ``columns`` (those it has; no partition column), in the order of ``paths``."""
    from fsspec.implementations.local import LocalFileSystem

    if sizes is not None and len(sizes) != len(paths):
        raise ValueError(f"{len(sizes)} sizes for {len(paths)} paths")
    if not paths:
        return
    if is_object_store(paths[0]):
        # Whole objects, fetched ahead while the previous ones decode: opening a file and reading its
        # footer, then its column chunks, costs several sequential round trips per file.
        with store_errors(paths[0], storage_options):
            for blob in _fetch_objects(paths, sizes or [None] * len(paths), storage_options):
                yield _read_parquet(pa.py_buffer(blob), columns)
        return
    fs, _ = _fs(paths[0], storage_options)
    if isinstance(fs, LocalFileSystem):
        for path in paths:
            yield _read_local_file(path, columns)
        return
    # Other fsspec stores: one concurrent fetch of the whole files.
    with store_errors(paths[0], storage_options):
        blobs = fs.cat([fs._strip_protocol(p) for p in paths], on_error="raise")
    for path in paths:
        yield _read_parquet(pa.py_buffer(blobs.pop(fs._strip_protocol(path))), columns)


def read_files(paths: Sequence[str], columns: Sequence[str], storage_options: dict[str, Any] | None = None,
               sizes: Sequence[int] | None = None) -> pa.Table:
    """Read data files of one table (whole assets) into one Arrow table with ``columns``.

    The asset column, a partition column in Delta (not stored in the files), is filled from each
    file's partition folder. ``ParquetFile.read`` with one thread per file: much faster per small file
    than dataset discovery, and a Dask worker's thread count is the cluster's to decide.

    Args:
        paths: Data files, as :func:`list_files` names them.
        columns: Columns to return (those a file lacks are left out of its part).
        storage_options: Object-store options of the lake.
        sizes: Each file's bytes (:func:`list_files` gives them from the Delta log): on an object
            store, a file is then fetched with one request instead of two.
    """
    return read_files_counted(paths, columns, storage_options, sizes)[0]


def read_files_counted(paths: Sequence[str], columns: Sequence[str], storage_options: dict[str, Any] | None = None,
                       sizes: Sequence[int] | None = None) -> tuple[pa.Table, list[int]]:
    """:func:`read_files`, and the rows each file contributed, in the order of ``paths``.

    The table's rows are the files' rows one file after the other, so a caller holding the table
    can take any subset of the files back out of it without reading them again.
    """
    cols = [c for c in columns if c != PARTITION]
    tables = [t for _, t in _read_each(paths, cols, storage_options, sizes=sizes)]
    rows = [t.num_rows for t in tables]
    if len(tables) == 1:
        table = tables[0]
    else:
        try:  # the files of one table version usually share a schema: no unification per file
            table = pa.concat_tables(tables)
        except pa.ArrowInvalid:  # a channel added since some files were written: nulls there
            table = pa.concat_tables(tables, promote_options="permissive")
    if PARTITION in columns:
        # One column for all files (each file's rows take its folder's asset), not one per file.
        names = pa.array([asset_of(p) for p in paths], pa.string())
        table = table.append_column(PARTITION, names.take(pa.array(np.repeat(np.arange(len(paths)), rows))))
    order = [c for c in columns if c in table.column_names]
    return table.select(order), rows


def _read_each(paths: Sequence[str], columns: Sequence[str], storage_options: dict[str, Any] | None = None,
               sizes: Sequence[int] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(path, ``columns`` of the file) of each data file, in order: the one reader every data-file read
    goes through (see :func:`read_files`)."""
    yield from zip(paths, _read_tables(paths, columns, storage_options, sizes))


def read_pandas(snapshot: LakeSnapshot, columns: list[str] | None = None) -> "Any":
    """:func:`read_lake` as a pandas frame."""
    return read_lake(snapshot, columns).to_pandas()


def to_dask(snapshot: LakeSnapshot, columns: Sequence[str] | None = None, assets_per_partition: int = 100,
            storage_options: dict[str, Any] | None = None) -> "Any":
    """The snapshot's table version as a Dask DataFrame, one partition per ``assets_per_partition``
    whole assets (so per-asset work needs no shuffle), read lazily on the workers."""
    import dask.dataframe as dd

    schema = snapshot_contract(snapshot, storage_options).lake_schema()
    cols = list(columns or schema.names)
    groups = list_files(snapshot, storage_options)
    assets = sorted(groups)
    parts = [[f for a in assets[i:i + assets_per_partition] for f in groups[a]]
             for i in range(0, len(assets), assets_per_partition)]
    meta = schema.empty_table().select(cols).to_pandas()
    return dd.from_map(_read_pandas_part, parts, columns=cols, storage_options=storage_options, meta=meta,
                       enforce_metadata=False)


def _read_pandas_part(files: Sequence[tuple[str, int]], columns: Sequence[str],
                      storage_options: dict[str, Any] | None = None) -> "Any":
    return read_files([p for p, _ in files], columns, storage_options, sizes=[b for _, b in files]).to_pandas()


def read_keys(lake_path: str, dataset: str, asset: str, sources: Sequence[str],
              storage_options: dict[str, Any] | None = None, key: str = C.TIME) -> pa.Array:
    """The time keys (``key``: cycle or timestamp) that ``sources`` hold for ``asset`` in the latest
    version (for duplicate-key checks)."""
    import pyarrow.dataset as ds

    dt = open_table(lake_path, dataset, storage_options=storage_options)
    if dt is None or not sources:
        return pa.array([], pa.int32() if key == C.TIME else pa.timestamp("us", tz="UTC"))
    expr = (ds.field(PARTITION) == asset) & ds.field("source_file").isin(list(sources))
    return dt.to_pyarrow_dataset().to_table(columns=[key], filter=expr).column(key).combine_chunks()


def history(lake_path: str, dataset: str, limit: int | None = None,
            storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The table's commits, newest first (version, timestamp, operation, custom metadata)."""
    dt = open_table(lake_path, dataset, storage_options=storage_options)
    return [] if dt is None else dt.history(limit)


def snapshot(lake_path: str, dataset: str, storage_options: dict[str, Any] | None = None
             ) -> LakeSnapshot | None:
    """A snapshot of the dataset's latest version, without ingest's per-file lineage (None: no table).

    Its digest is the hash of the version's data-file list (Delta data files are immutable), so it
    changes exactly when the rows may have.
    """
    dt = open_table(lake_path, dataset, storage_options=storage_options)
    if dt is None:
        return None
    v = dt.version()
    files = sorted(dt.file_uris())
    ref = FileRef(path=f"delta:{dataset}@{v}", sha256=hashlib.sha256("\n".join(files).encode()).hexdigest(),
                  lake_file=None)
    return LakeSnapshot(lake_path=lake_path, dataset=dataset, batch_id=f"v{v}", files=[ref], version=v,
                        contract=table_contract(lake_path, dataset, storage_options))


# --- Contracts ----------------------------------------------------------------------------------
# Each table keeps the fleet contract of its data in ``<table>/_twinflow_contract.yaml`` (Delta readers
# and vacuum skip names starting with ``_``). Delta's table properties cannot hold it: delta-rs refuses
# keys outside the ``delta.*`` vocabulary.

CONTRACT_FILE = "_twinflow_contract.yaml"


def _contract_uri(lake_path: str, dataset: str) -> str:
    return f"{table_uri(lake_path, dataset)}/{CONTRACT_FILE}"


def table_contract(lake_path: str, dataset: str, storage_options: dict[str, Any] | None = None
                   ) -> FleetContract | None:
    """The fleet contract stored with a dataset's table, or None (no table, or written before contracts)."""
    uri = _contract_uri(lake_path, dataset)
    with store_errors(uri, storage_options):  # a refused key: one line, as for the table itself
        fs, path = _fs(uri, storage_options)
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as fh:
            text = fh.read()
    return _parse_table_contract(text, dataset)


@functools.lru_cache(maxsize=32)
def _parse_table_contract(text: str, dataset: str) -> FleetContract:
    # Every read and write of a table checks its contract: parse each stored text once (a contract is
    # immutable; pure-Python YAML took ~0.1 s a parse).
    import yaml

    from twinflow.contract.store import contract_from_dict

    return contract_from_dict(yaml.safe_load(text), f"of table {dataset!r}")


def write_contract(lake_path: str, dataset: str, contract: FleetContract,
                   storage_options: dict[str, Any] | None = None) -> None:
    """Store ``contract`` as the table's contract (atomically replaced on a local lake)."""
    import os
    import tempfile


    from twinflow.contract.store import dump_contract

    text = dump_contract(contract)
    uri = _contract_uri(lake_path, dataset)
    if is_local(lake_path):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".contract.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
        return
    fs, path = _fs(uri, storage_options)
    with fs.open(path, "w") as fh:  # object stores replace an object atomically
        fh.write(text)


def check_contract(lake_path: str, dataset: str, contract: FleetContract,
                   storage_options: dict[str, Any] | None = None) -> FleetContract | None:
    """Refuse to read or write a table with a contract other than its own; return the table's contract.

    A table belongs to one contract name. A later version of the same contract may add channels (the
    table's schema evolves, older rows read as null) but not drop or retype the key.

    Raises:
        ConfigError: when the table was written under another contract or another clock.
    """
    stored = table_contract(lake_path, dataset, storage_options)
    if stored is None:
        return None
    if stored.name != contract.name:
        raise ConfigError(f"dataset {dataset!r} holds data of fleet contract {stored.name!r} v{stored.version} "
                          f"({stored.digest}), not {contract.name!r} v{contract.version}: pass the table's "
                          "contract (--contract) or write to another dataset")
    if stored.clock.kind != contract.clock.kind:
        raise ConfigError(f"dataset {dataset!r} is keyed by a {stored.clock.kind} clock; contract "
                          f"{contract.name!r} v{contract.version} declares a {contract.clock.kind} clock")
    return stored


# --- Derived tables -----------------------------------------------------------------------------
# Tables that are not telemetry (a fleet's events and life segments, ...) live beside the dataset they
# describe as ``<dataset>__<kind>``, Delta tables with a schema of their own (no contract file).


def derived_name(dataset: str, kind: str) -> str:
    """The table name of a dataset's derived table: ``pumps`` + ``events`` -> ``pumps__events``."""
    return f"{dataset}__{kind}"


def write_table(lake_path: str, name: str, table: pa.Table, *, replace: dict[str, Sequence[str]] | None = None,
                metadata: dict[str, str] | None = None, storage_options: dict[str, Any] | None = None,
                overwrite: bool = False) -> int:
    """Append rows to a derived table and drop the rows they replace (``{column: values}``), atomically;
    with ``overwrite`` the rows replace the whole table (still one new version).

    Returns:
        The table version after the commit.
    """
    from deltalake import CommitProperties, write_deltalake

    uri = table_uri(lake_path, name)
    dt = open_table(lake_path, name, storage_options=storage_options, migrate=False)
    predicate = " AND ".join(f"{col} IN ({_sql_list(vals)})" for col, vals in (replace or {}).items() if vals)
    if dt is not None and predicate and table.num_rows == 0:
        dt.delete(predicate, commit_properties=CommitProperties(custom_metadata=metadata or None))
        dt.update_incremental()
        return dt.version()
    write_deltalake(dt if dt is not None else uri, table,
                    mode="overwrite" if (predicate or overwrite) and dt is not None else "append",
                    predicate=predicate if dt is not None and predicate else None,
                    schema_mode="overwrite" if overwrite and dt is not None else "merge",
                    commit_properties=CommitProperties(custom_metadata=metadata or None),
                    storage_options=_options(storage_options, uri))
    return open_table(lake_path, name, storage_options=storage_options, migrate=False).version()


def read_table(lake_path: str, name: str, version: int | None = None, filter: Any = None,
               storage_options: dict[str, Any] | None = None) -> pa.Table | None:
    """A derived table at ``version`` (default: latest), or None when it does not exist."""
    dt = open_table(lake_path, name, version=version, storage_options=storage_options, migrate=False)
    if dt is None:
        return None
    return _plain_strings(dt.to_pyarrow_dataset().to_table(filter=filter))


# --- Recent rows ----------------------------------------------------------------------------------
# ``<dataset>__recent`` holds each asset's newest ``W`` readings (asset, time key, the contract's
# channels), sorted by (asset, time key), and on each row its asset's whole-history extent
# (``_readings``, ``_first``: from the telemetry's Delta log, as :func:`read_recent` gives them; channel
# names start with a letter, so these cannot clash). Scoring "now" reads it as one table of one or a
# few files instead of opening every asset's newest files (~0.6 ms each). It is derived: a writer of
# telemetry refreshes it after its commit (:func:`refresh_recent`) with one Delta overwrite whose
# commit metadata names the telemetry version it was built from and ``W``. A reader takes the version
# built from its snapshot's telemetry version (:func:`read_recent_table`); a crash between the two
# commits leaves the previous version readable and visibly stale, and readers fall back.

RECENT = "recent"
_R_READINGS, _R_FIRST = "_readings", "_first"
_R_TELEMETRY, _R_ROWS, _R_DIGEST = "twinflow.telemetry_version", "twinflow.recent_rows", "twinflow.contract_digest"
# Versions of the recent table searched for one built from an older telemetry snapshot (a pinned run).
_RECENT_HISTORY = 50


class RecentUnavailable(Exception):
    """The recent-rows table cannot answer for a snapshot (missing, stale, too short); the message says why."""


def _recent_columns(contract: FleetContract) -> list[str]:
    schema = contract.lake_schema().names
    return [c for c in dict.fromkeys([C.ASSET, contract.key, *contract.channel_names]) if c in schema]


def _file_sets(lake_path: str, dataset: str, since: int, dt: "DeltaTable", storage_options: dict[str, Any] | None
               ) -> tuple[set[tuple[str, str]], set[tuple[str, str]]] | None:
    """The (path, asset) data files of version ``since`` and of ``dt``'s (None: ``since`` is unreadable)."""
    try:
        old = open_table(lake_path, dataset, version=since, storage_options=storage_options, migrate=False)
    except Exception:  # noqa: BLE001 - its log was cleaned up: the caller rebuilds every asset
        return None
    if old is None:
        return None

    def files(t: "DeltaTable") -> set[tuple[str, str]]:
        a = pa.table(t.get_add_actions(flatten=True))
        if a.num_rows == 0:
            return set()
        return set(zip(a.column("path").to_pylist(), a.column(f"partition.{PARTITION}").to_pylist()))

    return files(old), files(dt)


def _changed_assets(lake_path: str, dataset: str, since: int, dt: "DeltaTable",
                    storage_options: dict[str, Any] | None) -> set[str] | None:
    """Assets whose data files differ between version ``since`` and ``dt``'s (None: ``since`` is unreadable)."""
    sets = _file_sets(lake_path, dataset, since, dt, storage_options)
    return None if sets is None else {asset for _, asset in sets[0] ^ sets[1]}


@dataclass
class RecentTails:
    """What one telemetry commit added, as its writer still holds it: enough for :func:`refresh_recent`
    to bring the recent table forward without reading those assets' files again.

    Attributes:
        version: The table version the commit made. The tails are used only while it is the latest
            version and its commit carries ``batch_id`` (otherwise another writer came in between).
        batch_id: The commit's ``twinflow.batch_id`` metadata.
        rows: ``W`` the tails were cut to; used only when at least the window being refreshed.
        tails: The last ``rows`` rows of each asset of each added file (asset, time key and channels:
            :func:`recent_tails`), in any order.
        added: Rows the commit added, per asset.
        untailed: Assets with added rows whose tails are not all here (e.g. rows the committer
            rewrote): read from their files.
        removed: Whether the commit also removed files (sources read again): assets that lost a
            file are read from their files.
    """

    version: int
    batch_id: str
    rows: int
    tails: pa.Table
    added: dict[str, int]
    untailed: frozenset[str] = frozenset()
    removed: bool = False


def recent_tails(rows: pa.Table, window: int, contract: FleetContract) -> pa.Table:
    """Each asset's last ``window`` rows of a batch of lake rows (with the asset column), in the recent
    table's columns and types: what a writer hands :func:`refresh_recent` in :class:`RecentTails`."""
    schema = contract.lake_schema()
    key = contract.key
    wanted = _recent_columns(contract)
    # Cut first, cast after: only ~window rows per asset are converted.
    table = rows.select([c for c in wanted if c in rows.column_names])
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
    if not _in_asset_time_order(table, key):
        table = table.sort_by([(PARTITION, "ascending"), (key, "ascending")])
    table = _last_rows(table, window)
    # The asset field as read_recent gives it (a partition value, nullable in Arrow's eyes).
    fields = [pa.field(c, pa.string()) if c == PARTITION else schema.field(c) for c in wanted]
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in fields]
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def _asset_starts(table: pa.Table) -> np.ndarray:
    """Where each asset's run starts in a table grouped by asset."""
    a = table.column(PARTITION).combine_chunks()
    if not len(a):
        return np.array([], np.int64)
    return np.flatnonzero(np.r_[True, pc.not_equal(a[1:], a[:-1]).to_numpy(zero_copy_only=False)])


def _last_rows(table: pa.Table, rows: int) -> pa.Table:
    """The last ``rows`` rows of each asset's run of a table sorted by (asset, time)."""
    n = table.num_rows
    starts = _asset_starts(table)
    count = np.diff(np.r_[starts, n]).astype(np.int64)
    pos = np.arange(n) - np.repeat(starts, count)
    tail = pos >= np.repeat(np.maximum(count - rows, 0), count)
    return table if tail.all() else table.filter(pa.array(tail))


def _with_extents(recent: pa.Table, extents: pa.Table) -> pa.Table:
    """Recent rows (sorted by asset) with their asset's extent repeated on each row (looked up, not assumed)."""
    a = recent.column(PARTITION).combine_chunks()
    starts = _asset_starts(recent)
    counts = np.diff(np.r_[starts, len(a)])
    index = {k: i for i, k in enumerate(extents.column(C.ASSET).to_pylist())}
    at = pa.array(np.repeat(np.array([index[k] for k in a.take(pa.array(starts)).to_pylist()], dtype=np.int64),
                            counts))
    return recent.append_column(_R_READINGS, extents.column("readings").take(at)) \
        .append_column(_R_FIRST, extents.column("first").take(at))


def _not_in(table: pa.Table, assets: Iterable[str]) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table.column(PARTITION), pa.array(sorted(assets), pa.string()))))


def _only(table: pa.Table, assets: Iterable[str]) -> pa.Table:
    return table.filter(pc.is_in(table.column(PARTITION), pa.array(sorted(assets), pa.string())))


def _commit_of(dt: "DeltaTable", v: int, batch_id: str) -> bool:
    """Whether ``dt``'s latest commit is version ``v`` and carries ``batch_id``."""
    last = dt.history(1)
    return bool(last) and int(last[0].get("version", -1)) == v and last[0].get("twinflow.batch_id") == batch_id


def refresh_recent(lake_path: str, dataset: str, rows: int | None, storage_options: dict[str, Any] | None = None,
                   new: RecentTails | None = None, default_rows: int | None = None) -> int | None:
    """Bring ``<dataset>__recent`` to the dataset's latest version: each asset's last ``rows`` readings.

    With ``new`` (what the commit that made the latest version added, from its writer's memory), an
    asset whose every row the commit added takes the commit's tail; one that had rows before takes
    the last ``rows`` of its previous recent rows and the commit's tail together (the table must have
    been built from the version just before, with the same ``rows`` and contract); neither reads a
    data file. Assets the commit removed files of, or added rows to without a tail, are read again.
    Extents come from the Delta log either way (as :func:`read_recent` gives them).

    Otherwise incremental when the table was built from an earlier version with the same ``rows`` and
    contract: only the assets whose data files changed since (the add actions of the two versions
    differ) are read again (their tails, :func:`read_recent`), the other assets' rows are kept. Else
    every asset's tail is read. Either way the result is one overwrite (one new version): a reader
    sees the previous cut of the fleet or the new one. Already built from the latest version:
    nothing is written.

    Args:
        lake_path: Lake root.
        dataset: The telemetry dataset.
        rows: ``W``, readings kept per asset (what scoring needs: see ``tasks/health/score.recent_rows``);
            None: the window the table keeps, or ``default_rows`` when there is no table yet (a writer
            that does not choose one, such as the stream bridge).
        storage_options: Object-store options for delta-rs.
        new: The latest commit's added rows (:class:`RecentTails`); ignored where it does not apply
            (and where its tails are shorter than the window).
        default_rows: See ``rows``.

    Returns:
        The recent table's version, or None when the dataset has no table.
    """
    from deltalake import CommitProperties, WriterProperties, write_deltalake
    from deltalake import ColumnProperties

    so = storage_options
    dt = open_table(lake_path, dataset, storage_options=so)
    if dt is None:
        return None
    v = dt.version()
    contract = _contract(None, lake_path, dataset, so)
    key = contract.key
    name = derived_name(dataset, RECENT)
    # The recent table is opened once: its last commit says what it was built from, and its rows at
    # that version are the ones kept.
    target = open_table(lake_path, name, storage_options=so, migrate=False)
    last = target.history(1) if target is not None else []
    meta = last[0] if last else {}
    if rows is None:
        kept = str(meta.get(_R_ROWS, ""))
        rows = int(kept) if kept.isdigit() else default_rows
        if rows is None:
            raise ValueError("refresh_recent needs rows or default_rows when the recent table has no window yet")
    same = meta.get(_R_ROWS) == str(rows) and meta.get(_R_DIGEST) == contract.digest
    built = str(meta.get(_R_TELEMETRY, ""))
    if same and built == str(v):
        return int(meta["version"])
    snap = LakeSnapshot(lake_path=lake_path, dataset=dataset, batch_id=f"v{v}", version=v, contract=contract)
    cols = _recent_columns(contract)
    merged: set[str] = set()
    incremental = same and built.isdigit() and int(built) < v
    # Tails answer for a table built from the version just before the commit, or for one rebuilt anyway;
    # one built from an older version (a writer that did not refresh it, or a crash) is brought forward
    # by the diff below, which reads the assets that changed since, not every asset.
    if new is not None and new.version == v and new.rows >= rows and (not incremental or int(built) == v - 1) \
            and _commit_of(dt, v, new.batch_id):
        keep, fresh, read, merged = _from_tails(lake_path, dataset, dt, new, rows, contract,
                                                target if same and built == str(v - 1) else None, so)
        if read:
            recent, extents = read_recent(snap, rows, cols, so, assets=read)
            if recent.num_rows:
                fresh = _merge_runs(fresh, _with_extents(recent, extents).cast(fresh.schema), key)
        table, n_read = fresh, len(read)
    else:
        changed = _changed_assets(lake_path, dataset, int(built), dt, so) if incremental else None
        keep = None
        if changed is not None and target is not None:
            keep = _not_in(_plain_strings(target.to_pyarrow_dataset().to_table()), changed)
        recent, extents = read_recent(snap, rows, cols, so, assets=changed if keep is not None else None)
        table, n_read = _with_extents(recent, extents), extents.num_rows
    if keep is not None and keep.num_rows:
        table = _merge_runs(keep.select(table.column_names).cast(table.schema), table, key)
    if not _in_asset_time_order(table, key):
        table = table.sort_by([(PARTITION, "ascending"), (key, "ascending")])
    # One batch: the writer then has no batches to reorder, and readers mostly skip their sort.
    table = table.combine_chunks()
    uri = table_uri(lake_path, name)
    writer = WriterProperties(compression="SNAPPY", default_column_properties=ColumnProperties(dictionary_enabled=False),
                              column_properties={PARTITION: ColumnProperties(dictionary_enabled=True)})
    meta_out = {"twinflow.operation": "refresh_recent", _R_TELEMETRY: str(v), _R_ROWS: str(rows),
                _R_DIGEST: contract.digest, "twinflow.recent_assets_read": str(n_read),
                "twinflow.recent_assets_from_tails": str(len(merged))}
    with store_errors(uri, so):
        write_deltalake(target if target is not None else uri, table, mode="overwrite",
                        schema_mode="overwrite" if target is not None else None, writer_properties=writer,
                        commit_properties=CommitProperties(custom_metadata=meta_out),
                        storage_options=_options(so, uri))
    if target is None:
        return version(lake_path, name, so)
    target.update_incremental()
    return target.version()


def _from_tails(lake_path: str, dataset: str, dt: "DeltaTable", new: RecentTails, rows: int,
                contract: FleetContract, previous: "DeltaTable | None", storage_options: dict[str, Any] | None
                ) -> tuple[pa.Table | None, pa.Table, set[str], set[str]]:
    """:func:`refresh_recent` from the latest commit's tails: ``(kept, fresh, read, from_tails)``.

    ``kept``: the previous recent rows of the assets the commit left alone (None: every asset is
    rebuilt); ``fresh``: the rows, with extents, of the assets answered from the tails; ``read``: the
    assets still to read from their files; ``from_tails``: the assets in ``fresh``. ``previous`` is
    the recent table when it was built from the version before the commit (same window and contract).
    """
    key = contract.key
    files = _files_frame(dt, key)
    readings = files.groupby("asset", sort=False)["n"].sum().to_dict() if files is not None else {}
    tailed = set(new.added) - set(new.untailed)
    # Every row the asset has at this version came with the commit: its tail is the asset's tail.
    whole = {a for a in tailed if readings.get(a) == new.added[a]}
    lost: set[str] | None = set()
    if previous is not None and new.removed:
        sets = _file_sets(lake_path, dataset, dt.version() - 1, dt, storage_options)
        lost = None if sets is None else {asset for _, asset in sets[0] - sets[1]}
    kept = old = None
    if previous is not None and lost is not None:
        merge = tailed - whole - lost
        read = (set(new.added) | lost) - whole - merge
        prior = _plain_strings(previous.to_pyarrow_dataset().to_table())
        kept = _not_in(prior, set(new.added) | lost)
        old = _only(prior, merge).select(_recent_columns(contract)) if merge else None
    else:
        merge = set()
        read = set(readings) - whole
    use = whole | merge
    tails = _only(new.tails, use).select(_recent_columns(contract))
    parts = [tails] + ([old.cast(tails.schema)] if old is not None and old.num_rows else [])
    cand = pa.concat_tables(parts).sort_by([(PARTITION, "ascending"), (key, "ascending")])
    cand = _last_rows(cand, rows)
    ext = _extents(files[files["asset"].isin(use)], contract.lake_schema().field(key).type) \
        if files is not None and use else None
    fresh = _with_extents(cand, ext) if ext is not None else \
        _with_extents(cand, pa.table({C.ASSET: pa.array([], pa.string()), "readings": pa.array([], pa.int64()),
                                      "first": pa.array([], cand.schema.field(key).type)}))
    return kept, fresh, read, use


def _merge_runs(a: pa.Table, b: pa.Table, key: str) -> pa.Table:
    """Two tables of disjoint assets, each in (asset, time) order, as one in that order: their asset
    runs are ordered by asset and taken whole (a sort of the ~assets runs, not of every row). Tables
    not so ordered come back merely concatenated (the caller checks and sorts)."""
    table = pa.concat_tables([a, b]).combine_chunks()
    if not (_in_asset_time_order(a, key) and _in_asset_time_order(b, key)) or table.num_rows == 0:
        return table
    col = table.column(PARTITION)
    n = table.num_rows
    starts = np.flatnonzero(np.r_[True, pc.not_equal(col[1:], col[:-1]).to_numpy(zero_copy_only=False)])
    ends = np.r_[starts[1:], n]
    order = pc.sort_indices(col.take(pa.array(starts))).to_numpy()
    lengths = (ends - starts)[order]
    offsets = np.repeat(starts[order] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return table.take(pa.array(np.arange(n) + offsets))


def _in_asset_time_order(table: pa.Table, key: str) -> bool:
    """Whether rows are sorted by (asset, time key) with no key repeated within an asset."""
    if table.num_rows < 2:
        return True
    a = table.column(C.ASSET).combine_chunks()
    t = table.column(key).combine_chunks()
    a0, a1, t0, t1 = a[:-1], a[1:], t[:-1], t[1:]
    ok = pc.or_(pc.greater(a1, a0), pc.and_(pc.equal(a1, a0), pc.greater(t1, t0)))
    return bool(pc.all(ok).as_py())


def _recent_built_from(commits: Sequence[dict[str, Any]], telemetry_version: int | None) -> dict[str, Any] | None:
    """The newest of the recent table's ``commits`` built from ``telemetry_version`` (None: none is)."""
    return next((c for c in commits if str(c.get(_R_TELEMETRY)) == str(telemetry_version)), None)


def recent_window(lake_path: str, dataset: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """``W`` of ``<dataset>__recent`` as its last refresh kept it (None: no table): what a writer that
    does not choose one (the stream bridge) refreshes it with."""
    target = open_table(lake_path, derived_name(dataset, RECENT), storage_options=storage_options, migrate=False)
    last = target.history(1) if target is not None else []
    w = str(last[0].get(_R_ROWS, "")) if last else ""
    return int(w) if w.isdigit() else None


def read_recent_table(snapshot: LakeSnapshot, rows: int, columns: list[str] | None = None,
                      storage_options: dict[str, Any] | None = None) -> tuple[pa.Table, pa.Table]:
    """:func:`read_recent` answered from ``<dataset>__recent``: the same two tables, from one or a few files.

    The recent table's version built from the snapshot's telemetry version is read (the latest, or an
    older one for a pinned snapshot) and cut to each asset's last ``rows`` readings.

    Raises:
        RecentUnavailable: no recent table; none built from the snapshot's version (stale: e.g. a
            writer committed telemetry without refreshing it, or crashed in between); it keeps fewer
            than ``rows`` readings per asset; or it lacks a requested column. The message says which.
    """
    so = storage_options
    name = derived_name(snapshot.dataset, RECENT)
    dt = open_table(snapshot.lake_path, name, storage_options=so, migrate=False)
    if dt is None:
        raise RecentUnavailable(f"{name} does not exist (ingest builds it)")
    want = snapshot.version if snapshot.version is not None else version(snapshot.lake_path, snapshot.dataset, so)
    commits = dt.history(limit=_RECENT_HISTORY)
    found = _recent_built_from(commits, want)
    if found is None:
        newest = commits[0].get(_R_TELEMETRY) if commits else None
        raise RecentUnavailable(f"{name} is stale: built from telemetry version {newest}, the snapshot is "
                                f"version {want}")
    kept = int(found[_R_ROWS])
    if kept < rows:
        raise RecentUnavailable(f"{name} keeps the last {kept} readings per asset, {rows} are needed (raise "
                                "the ingest's recent_rows)")
    contract = snapshot_contract(snapshot, so)
    key = contract.key
    cols = list(dict.fromkeys([C.ASSET, key, *(columns or contract.lake_schema().names)]))
    if int(found["version"]) != dt.version():
        dt = open_table(snapshot.lake_path, name, version=int(found["version"]), storage_options=so, migrate=False)
    have = {f.name for f in dt.schema().fields}
    lacking = [c for c in cols if c not in have]
    if lacking:
        raise RecentUnavailable(f"{name} lacks column(s) {', '.join(lacking)}")
    root = dt.table_uri.rstrip("/").removeprefix("file://")
    actions = pa.table(dt.get_add_actions(flatten=True))
    paths = [rel if "://" in rel else f"{root}/{rel}" for rel in map(unquote, actions.column("path").to_pylist())]
    want_cols = [*cols, _R_READINGS, _R_FIRST]
    parts = list(_read_tables(paths, want_cols, so, actions.column("size_bytes").to_pylist()))
    table = _plain_strings(pa.concat_tables(parts) if len(parts) != 1 else parts[0])
    if not _in_asset_time_order(table, key):
        # The Delta writer may reorder batches, and a large table is several files in no set order.
        table = table.sort_by([(C.ASSET, "ascending"), (key, "ascending")])
    a = table.column(C.ASSET).combine_chunks()
    n = len(a)
    starts = np.flatnonzero(np.r_[True, pc.not_equal(a[1:], a[:-1]).to_numpy(zero_copy_only=False)]) \
        if n else np.array([], np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64)
    count = ends - starts
    if kept > rows and n:
        pos = np.arange(n) - np.repeat(starts, count)
        tail = pos >= np.repeat(np.maximum(count - rows, 0), count)
        if not tail.all():
            table = table.filter(pa.array(tail))
            starts = np.r_[0, np.cumsum(np.minimum(count, rows))[:-1]].astype(np.int64)
            ends = starts + np.minimum(count, rows)
    first_rows = pa.array(starts)
    extents = pa.table({C.ASSET: table.column(C.ASSET).take(first_rows),
                        "readings": table.column(_R_READINGS).take(first_rows).cast(pa.int64()),
                        "first": table.column(_R_FIRST).take(first_rows),
                        "last": table.column(key).take(pa.array(ends - 1))})
    return table.select(cols), extents


# --- Maintenance --------------------------------------------------------------------------------
# Upkeep names the tables it keeps as a dataset (``<lake>/<name>``, derived tables included) or a
# result table as ``_results/<name>`` (:func:`result_table`).


def snapshot_reads(snapshot: LakeSnapshot, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """The table versions that reading ``snapshot`` may touch, ``{table: version}``: what a pinned
    snapshot must keep through :func:`vacuum`.

    The dataset at the snapshot's version; its life segments at the snapshot's segments version (the
    latest when it names none: what a reader of it gets now); the recent-rows table's version built
    from that telemetry version, when one is (:func:`read_recent_table` reads it).
    """
    so = storage_options
    v = snapshot.version if snapshot.version is not None else version(snapshot.lake_path, snapshot.dataset, so)
    if v is None:
        return {}
    reads = {snapshot.dataset: int(v)}
    segments = derived_name(snapshot.dataset, "segments")
    seg = snapshot.segments if snapshot.segments is not None else version(snapshot.lake_path, segments, so)
    if seg is not None:
        reads[segments] = int(seg)
    recent = derived_name(snapshot.dataset, RECENT)
    dt = open_table(snapshot.lake_path, recent, storage_options=so, migrate=False)
    found = None if dt is None else _recent_built_from(dt.history(limit=_RECENT_HISTORY), v)
    if found is not None:
        reads[recent] = int(found["version"])
    return reads


def result_table(name: str) -> str:
    """How :func:`optimize`, :func:`vacuum` and upkeep name the result table ``name``: ``_results/<name>``."""
    results_uri("", name)  # checks the name
    return f"{RESULTS_DIR}/{name}"


def result_tables(lake_path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The lake's result tables, as :func:`result_table` names them (``_results/fleet_health``, ...)."""
    base = f"{lake_path.rstrip('/')}/{RESULTS_DIR}"
    if is_local(lake_path):
        root = local_path(lake_path) / RESULTS_DIR
        names = [p.name for p in root.iterdir() if (p / "_delta_log").is_dir()] if root.is_dir() else []
    else:
        with store_errors(base, storage_options):
            fs, root_path = _fs(base, storage_options)
            try:
                tops = fs.ls(root_path.rstrip("/"), detail=True, refresh=True)
            except FileNotFoundError:
                tops = []
            names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in tops if e.get("type") == "directory"]
            names = [n for n in names if fs.exists(f"{root_path.rstrip('/')}/{n}/_delta_log")]
    return [result_table(n) for n in sorted(names)]


def result_history(lake_path: str, name: str, limit: int | None = None,
                   storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A result table's commits, newest first (version, timestamp, operation, custom metadata)."""
    dt = _open_kept(lake_path, result_table(name), None, storage_options)
    return [] if dt is None else dt.history(limit)


def _open_kept(lake_path: str, table: str, version: int | None,
               storage_options: dict[str, Any] | None) -> "DeltaTable | None":
    """A dataset's table, or a result table named ``_results/<name>``, at ``version`` (None: no table)."""
    from deltalake import DeltaTable

    if not table.startswith(f"{RESULTS_DIR}/"):
        return open_table(lake_path, table, version=version, storage_options=storage_options)
    uri = results_uri(lake_path, table[len(RESULTS_DIR) + 1:])
    if not _exists(uri, storage_options):
        return None
    with store_errors(uri, storage_options):
        return DeltaTable(uri, version=version, storage_options=_options(storage_options, uri))


def optimize(lake_path: str, dataset: str, target_size: int | None = None,
             storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compact small files into larger ones (a new version with the same rows).

    A recent-rows table (``<dataset>__recent``) is left as it is (``{}``): each refresh rewrites it whole
    in one or a few files, and readers find the version built from their telemetry version by its
    commit metadata, which a compaction commit would not carry (the version they need would then be
    one vacuum could remove). Compacting a dataset keeps its recent-rows table current when it was
    (:func:`retag_recent`): compaction moves rows between files, it changes none, so health keeps
    reading the table instead of the asset files.

    Args:
        dataset: A dataset (derived ones too) or a result table as ``_results/<name>``.
    """
    if dataset.endswith(f"__{RECENT}"):
        return {}
    dt = _open_kept(lake_path, dataset, None, storage_options)
    if dt is None:
        raise ConfigError(f"dataset {dataset!r} is not in the lake at {lake_path}")
    before = dt.version()
    out = dt.optimize.compact(target_size=target_size)
    if dataset.startswith(f"{RESULTS_DIR}/"):
        return out  # result tables have no recent-rows table
    try:
        retag_recent(lake_path, dataset, before, storage_options)
    except Exception as exc:  # noqa: BLE001 - the compaction stands; health reads the files until a refresh
        log.warning("recent-rows table of %s not re-tagged after optimize (%s); health reads the asset files "
                    "until the next refresh", dataset, exc)
    return out


def retag_recent(lake_path: str, dataset: str, before: int, storage_options: dict[str, Any] | None = None
                 ) -> int | None:
    """Carry ``<dataset>__recent`` across commits that only rewrote files (``OPTIMIZE``) since ``before``.

    When the recent table was built from version ``before`` and every later commit of the dataset is a
    compaction, its rows are still each asset's last readings; it gets a commit tagged with the latest
    version (no data file written), so readers of that version find it current. Only the first-time
    statistics may differ (compaction rewrites a file's timestamp statistics to milliseconds), and where
    they do the table is rewritten with the log's extents, as :func:`read_recent` gives them.

    Returns:
        The recent table's new version, or None when it was not current at ``before`` or a commit since
        changed rows (the next :func:`refresh_recent` brings it forward).
    """
    from deltalake import CommitProperties, write_deltalake

    so = storage_options
    name = derived_name(dataset, RECENT)
    target = open_table(lake_path, name, storage_options=so, migrate=False)
    dt = open_table(lake_path, dataset, storage_options=so)
    if target is None or dt is None:
        return None
    last = target.history(1)
    meta = last[0] if last else {}
    v = dt.version()
    if str(meta.get(_R_TELEMETRY)) != str(before) or v <= before:
        return None
    commits = dt.history(v - before)
    if len(commits) != v - before or any(c.get("operation") != "OPTIMIZE" for c in commits):
        return None
    contract = _contract(None, lake_path, dataset, so)
    key = contract.key
    table = _plain_strings(target.to_pyarrow_dataset().to_table())
    files = _files_frame(dt, key)
    if files is None or table.num_rows == 0:
        return None
    fresh = _with_extents(table.drop_columns([_R_READINGS, _R_FIRST]), _extents(files, table.schema.field(_R_FIRST).type))
    meta_out = {"twinflow.operation": "retag_recent", _R_TELEMETRY: str(v), _R_ROWS: str(meta.get(_R_ROWS)),
                _R_DIGEST: str(meta.get(_R_DIGEST)), "twinflow.recent_assets_read": "0"}
    props = CommitProperties(custom_metadata=meta_out)
    uri = table_uri(lake_path, name)
    with store_errors(uri, so):
        if fresh.select(table.column_names).cast(table.schema).equals(table):
            target.create_write_transaction([], mode="append", schema=target.schema(),
                                            partition_by=target.metadata().partition_columns, commit_properties=props)
        else:
            write_deltalake(target, fresh.select(table.column_names).cast(table.schema).combine_chunks(),
                            mode="overwrite", commit_properties=props, storage_options=_options(so, uri))
    target.update_incremental()
    return target.version()


def vacuum(lake_path: str, dataset: str, retention_hours: int = 168, dry_run: bool = True,
           storage_options: dict[str, Any] | None = None, keep_versions: Iterable[int] = ()) -> list[str]:
    """Delete data files no version younger than ``retention_hours`` references, except those that a
    version in ``keep_versions`` still reads (pinned snapshots: the champion's training data, say).

    Delta's own vacuum cannot spare an old version's files, so the candidates come from its dry run and
    the deletion is done here, leaving out every file a pinned version references.

    Args:
        dataset: A dataset (derived ones too) or a result table as ``_results/<name>``.

    Returns:
        The files removed (or that would be, with ``dry_run``), relative to the table.
    """
    dt = _open_kept(lake_path, dataset, None, storage_options)
    if dt is None:
        return []
    # Delta's dry run lists the log's tombstones, including files a pinned run already spared or that
    # are gone: only files that exist and no pinned version reads are candidates.
    tombstones = dt.vacuum(retention_hours=retention_hours, dry_run=True, enforce_retention_duration=False)
    root = dt.table_uri.rstrip("/")
    fs, base = _fs(root, storage_options)
    base = base.rstrip("/")
    present = {p[len(base) + 1:] for p in fs.find(base)}
    pinned: set[str] = set()
    for v in sorted(set(keep_versions)):
        if v > dt.version():
            continue
        old = _open_kept(lake_path, dataset, v, storage_options)
        local_root = root.removeprefix("file://")
        pinned |= {unquote(u).removeprefix("file://").removeprefix(local_root).lstrip("/") for u in old.file_uris()}
    doomed = [unquote(c) for c in tombstones if unquote(c) in present and unquote(c) not in pinned]
    if not dry_run and doomed:
        fs.rm([f"{base}/{c}" for c in doomed])
    return doomed


def migrate_hive(lake_path: str, dataset: str | None = None) -> list[str]:
    """Convert twinflow 0.1 hive-Parquet datasets (``<lake>/dataset=<name>/asset=<id>/*.parquet``) to Delta.

    Each legacy dataset is read whole and committed as version 0 of ``<lake>/<name>`` (one commit), then
    its folder is moved to ``<lake>/_pre_delta/`` (delete it once satisfied). A crash before the move
    leaves the legacy folder in place and the conversion is redone (the Delta table is only created by
    its first commit). Local lakes only.

    Returns:
        The datasets converted.
    """
    import pyarrow.dataset as ds

    root = local_path(lake_path)
    done = []
    for legacy in sorted(root.glob(f"{_LEGACY_PREFIX}{dataset or '*'}")):
        name = legacy.name[len(_LEGACY_PREFIX):]
        uri = table_uri(lake_path, name)
        if not _exists(uri, None):
            files = [str(p) for p in legacy.glob("asset=*/*.parquet") if not p.name.startswith((".", "_"))]
            part = ds.partitioning(pa.schema([("asset", pa.string())]), flavor="hive")
            table = ds.dataset(files, format="parquet", partitioning=part,
                               partition_base_dir=str(legacy)).to_table() if files else None
            if table is not None and "asset" in table.column_names:
                table = table.drop_columns(["asset"])
            log.warning("converting the twinflow 0.1 Parquet dataset %s (%d rows) into the Delta table %s; "
                        "the old folder moves to %s", legacy, 0 if table is None else table.num_rows, uri,
                        root / _MIGRATED_DIR)
            if table is not None and table.num_rows:
                commit(lake_path, name, table, metadata={"twinflow.operation": "migrate_hive"},
                       _migrating=True)
        (root / _MIGRATED_DIR).mkdir(exist_ok=True)
        shutil.move(str(legacy), str(root / _MIGRATED_DIR / legacy.name))
        done.append(name)
    return done


def read_quarantine(quarantine_path: str, dataset: str | None = None,
                    storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read quarantined rows (all datasets, or one), with a ``dataset`` column."""
    from twinflow.tasks.ingest.quarantine import read_quarantine as _read

    return _read(quarantine_path, dataset, storage_options)


def latest_snapshot(lake_path: str, dataset: str,
                    storage_options: dict[str, Any] | None = None) -> LakeSnapshot | None:
    """The dataset's latest version with its ingest lineage (landing files and hashes) when ingest wrote it.

    Falls back to :func:`snapshot` for tables written otherwise (e.g. :func:`write_lake_table`). Returns
    None when the dataset has no table.
    """
    from twinflow.tasks.ingest.ledger import ingested_snapshot

    return (ingested_snapshot(lake_path, dataset, storage_options)
            or snapshot(lake_path, dataset, storage_options))


# --- Result tables ------------------------------------------------------------------------------
# Tables a stage derives (e.g. ``fleet_health``) live under ``<lake>/_results/<name>``: Delta tables
# any reader opens, kept out of the dataset namespace (``datasets()`` lists no ``_`` folder) so a
# stage result is never ingested, featurised or trained on as telemetry. History is kept: each run
# appends, and a re-run with the same ``key`` replaces its own rows in one transaction.

RESULTS_DIR = "_results"


def results_uri(lake_path: str, name: str) -> str:
    """Where the result table ``name`` lives."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name):
        raise ConfigError(f"result table {name!r} must be lower-case letters, digits, '_' or '-'")
    return f"{lake_path.rstrip('/')}/{RESULTS_DIR}/{name}"


def write_results(lake_path: str, name: str, table: pa.Table, *, key_column: str, key: str,
                  metadata: dict[str, str] | None = None, storage_options: dict[str, Any] | None = None) -> int:
    """Append a run's rows to a result table, replacing earlier rows with the same ``key`` (idempotent).

    Every row must have ``key_column == key``. The schema may gain columns (merged).

    Returns:
        The table version after the commit.
    """
    from deltalake import CommitProperties, write_deltalake

    if table.num_rows and pc.any(pc.not_equal(table.column(key_column), key)).as_py():
        raise ValueError(f"every row written under key {key!r} must have {key_column} = {key!r}")
    uri = results_uri(lake_path, name)
    exists = _exists(uri, storage_options)
    props = CommitProperties(custom_metadata={"twinflow.key": key, **(metadata or {})})
    predicate = f"{key_column} = '{key.replace(chr(39), chr(39) * 2)}'"
    write_deltalake(uri, table, mode="overwrite" if exists else "append",
                    predicate=predicate if exists else None, schema_mode="merge" if exists else None,
                    commit_properties=props, storage_options=_options(storage_options, uri))
    from deltalake import DeltaTable

    return DeltaTable(uri, storage_options=_options(storage_options, uri)).version()


def read_results(lake_path: str, name: str, columns: list[str] | None = None, filter: Any = None,
                 version: int | None = None, storage_options: dict[str, Any] | None = None) -> pa.Table | None:
    """Read a result table (at ``version``); None when it does not exist yet."""
    from deltalake import DeltaTable

    uri = results_uri(lake_path, name)
    if not _exists(uri, storage_options):
        return None
    dt = DeltaTable(uri, version=version, storage_options=_options(storage_options, uri))
    ds = dt.to_pyarrow_dataset()
    cols = [c for c in columns if c in ds.schema.names] if columns else None
    return _plain_strings(ds.to_table(columns=cols, filter=filter))
