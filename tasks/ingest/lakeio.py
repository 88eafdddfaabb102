"""Lake reads and writes used by other stages (moving to :mod:`twinflow.lake`).
"""

from __future__ import annotations
import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from twinflow import contracts as C
from twinflow.errors import ConfigError
from twinflow.refs import FileRef, LakeSnapshot

from twinflow.tasks.ingest.landing import local_path
from twinflow.tasks.ingest.stage import atomic_write_bytes, split_by_asset, write_parquet

def asset_dir(asset: str) -> str:
    """Hive partition directory of an asset (URI-escaped, as pyarrow's hive partitioning decodes it)."""
    return f"asset={quote(asset, safe='')}"


def _asset_partitioning():
    import pyarrow.dataset as ds

    return ds.partitioning(pa.schema([("asset", pa.string())]), flavor="hive")


def read_lake(snapshot: LakeSnapshot, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
    """Read a lake dataset as one Arrow table sorted by (asset_id, cycle).

    When the snapshot lists files with their lake file ids (snapshots returned by ingest), only those
    sources' rows are read; otherwise every file of the dataset folder is.

    Args:
        snapshot: The dataset reference.
        columns: Columns to read (default: all canonical columns).
        filter: Optional ``pyarrow.dataset`` expression.
    """
    import pyarrow.dataset as ds

    root = snapshot.dataset_path
    ids = {f.lake_file for f in snapshot.files if getattr(f, "lake_file", None)}
    if ids:
        paths = [str(p) for p in Path(root).glob("asset=*/*.parquet") if p.stem in ids]
        dset = ds.dataset(paths, format="parquet", partitioning=_asset_partitioning(),
                          partition_base_dir=root, schema=C.telemetry_schema())
    else:
        dset = ds.dataset(root, format="parquet", partitioning=_asset_partitioning())
    cols = columns or [f.name for f in C.telemetry_schema()]
    table = dset.to_table(columns=cols, filter=filter)
    sort_keys = [(k, "ascending") for k in (C.ASSET, C.TIME) if k in table.column_names]
    return table.sort_by(sort_keys) if sort_keys else table


def conform(table: pa.Table, batch_id: str, source_file: str = "generated") -> pa.Table:
    """Cast a table to the canonical telemetry schema, adding null channels and lineage columns."""
    schema = C.telemetry_schema()
    n = table.num_rows
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        elif field.name == "source_file":
            cols.append(pa.array([source_file] * n, pa.string()))
        elif field.name == "batch_id":
            cols.append(pa.array([batch_id] * n, pa.string()))
        elif field.name == "quality":
            cols.append(pa.array(np.zeros(n, np.int32)))
        elif field.nullable:
            cols.append(pa.nulls(n, field.type))
        else:
            raise ConfigError(f"table lacks required column {field.name!r}")
    return pa.Table.from_arrays(cols, schema=schema)


def write_lake_table(table: pa.Table, lake_path: str, dataset: str, batch_id: str) -> LakeSnapshot:
    """Write a table into the lake layout directly (e.g. a generated fleet), one atomic file per asset.

    Files are named ``<batch_id>.parquet``, so writing the same batch again replaces it. This bypasses the
    ingest ledger and validation: use it for data twinflow generated itself.

    Returns:
        A snapshot of this batch, whose digest is the content hash of the written files.
    """
    lake = local_path(lake_path)
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", batch_id):
        raise ConfigError(f"batch_id {batch_id!r} must be letters, digits, '_', '-' or '.'")
    t = conform(table, batch_id)
    t = t.take(pc.sort_indices(t, [(C.ASSET, "ascending"), (C.TIME, "ascending")]))
    h = hashlib.sha256()
    for asset, rows in split_by_asset(t):
        path = lake / f"dataset={dataset}" / asset_dir(asset) / f"{batch_id}.parquet"
        buf = pa.BufferOutputStream()
        write_parquet(rows, buf)
        data = buf.getvalue().to_pybytes()
        h.update(asset.encode())
        h.update(data)
        atomic_write_bytes(data, path)
    ref = FileRef(path=f"generated:{dataset}/{batch_id}", sha256=h.hexdigest(), rows_read=t.num_rows,
                  rows_written=t.num_rows, lake_file=batch_id)
    return LakeSnapshot(lake_path=str(lake), dataset=dataset, batch_id=batch_id, files=[ref], rows=t.num_rows)
