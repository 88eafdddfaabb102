"""The features stage's lake I/O on an ``s3://`` lake (a real SeaweedFS on loopback)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from object_store import requires_weed, s3_filesystem
from twinflow import lake
from twinflow.contract import load_contract
from twinflow.tasks import features as ft

pytestmark = [pytest.mark.integration, requires_weed]
pytest.importorskip("s3fs")


def test_listing_fingerprint_and_schema_read_on_s3(s3):
    pumps, so, root = load_contract("pumps"), s3.options(), s3.url("lake-f")
    ts = pd.date_range("2026-01-01", periods=5, freq="10min", tz="UTC")
    rows = pa.concat_tables([pa.table({"asset_id": [a] * 5, "timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
                                       "vibration_mm_s": np.arange(5, dtype=float)}) for a in ("p1", "p2")])
    snap = lake.write_lake_table(rows, root, "pumps", "b1", storage_options=so, contract=pumps)
    groups = ft.list_lake_files(snap, so)
    assert sorted(groups) == ["p1", "p2"]
    path = groups["p1"][0][0]
    # The lake's options come in delta-rs' keys; the stage's own readers translate them for s3fs.
    assert {"timestamp", "vibration_mm_s"} <= set(ft.read_schema_columns(path, so))
    first = ft.lake_fingerprint(groups, snap.dataset_path, so)
    assert ft.lake_fingerprint(groups, snap.dataset_path, so) == first
    # The same file rewritten in place (same name and size, new object) is another lake.
    fs = s3_filesystem(s3)
    key = path.removeprefix("s3://")
    time.sleep(1.1)  # a store's LastModified counts seconds
    fs.pipe(key, fs.cat(key))
    assert ft.lake_fingerprint(groups, snap.dataset_path, so) != first
