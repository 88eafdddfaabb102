"""The recent-rows table (``<dataset>__recent``, ``twinflow/lake.py``): built and refreshed from the
telemetry's versions, read as :func:`lake.read_recent` reads the asset files, and refused when stale."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from twinflow import contracts as C
from twinflow import lake
from twinflow.contract.store import load_contract

COLS = [C.ASSET, C.TIME, "s2"]


def _rows(asset: str, cycles: list[int], offset: float = 0.0) -> pa.Table:
    return pa.table({C.ASSET: [asset] * len(cycles), C.TIME: pa.array(cycles, pa.int32()),
                     "s2": np.asarray(cycles, dtype="float64") + offset})


def _same(snap, rows: int, cols=COLS) -> None:
    got, got_ext = lake.read_recent_table(snap, rows, cols)
    want, want_ext = lake.read_recent(snap, rows, cols)
    assert got.equals(want), (got.to_pandas(), want.to_pandas())
    assert got_ext.equals(want_ext), (got_ext.to_pandas(), want_ext.to_pandas())


def _last_commit(root: str, dataset: str) -> dict:
    return lake.history(root, lake.derived_name(dataset, lake.RECENT), limit=1)[0]


def test_the_recent_table_answers_as_the_asset_files_do_and_refreshes_only_changed_assets(tmp_path):
    root = str(tmp_path / "lake")
    lake.write_lake_table(pa.concat_tables([_rows("a", list(range(1, 51))), _rows("b", [1, 2, 3]),
                                            _rows("c", list(range(1, 21)))]), root, "fleet", "g1")
    v = lake.refresh_recent(root, "fleet", 8)
    assert _last_commit(root, "fleet")["twinflow.recent_assets_read"] == "3"
    snap1 = lake.latest_snapshot(root, "fleet")
    for n in (1, 3, 8):  # W = 8 answers any tail up to 8 rows
        _same(snap1, n)
    recent, extents = lake.read_recent_table(snap1, 8, COLS)
    assert recent.num_rows == 8 + 3 + 8
    assert dict(zip(extents.column(C.ASSET).to_pylist(), extents.column("readings").to_pylist())) == \
        {"a": 50, "b": 3, "c": 20}
    with pytest.raises(lake.RecentUnavailable, match="keeps the last 8 readings per asset, 9 are needed"):
        lake.read_recent_table(snap1, 9, COLS)
    assert lake.refresh_recent(root, "fleet", 8) == v  # current already: no new version, no duplicate rows

    # New rows of a, and two interleaving files: only asset a is read again.
    lake.write_lake_table(_rows("a", [52, 54, 56]), root, "fleet", "g2")
    snap2 = lake.write_lake_table(_rows("a", [51, 53, 55]), root, "fleet", "g3")
    with pytest.raises(lake.RecentUnavailable, match=f"stale: built from telemetry version {snap1.version}, "
                                                     f"the snapshot is version {snap2.version}"):
        lake.read_recent_table(snap2, 3, COLS)
    assert lake.refresh_recent(root, "fleet", 8) == v + 1
    assert _last_commit(root, "fleet")["twinflow.recent_assets_read"] == "1"
    _same(snap2, 8)
    recent, _ = lake.read_recent_table(snap2, 8, COLS)
    assert [k for a, k in zip(recent.column(C.ASSET).to_pylist(), recent.column(C.TIME).to_pylist())
            if a == "a"] == list(range(49, 57))
    # The older snapshot still reads the version built from it (a pinned run sees its own data).
    _same(snap1, 8)

    # Sources written again: g3 now holds only a's cycle 51 (a's tail reaches back into older rows),
    # g1 no longer holds b (b has no rows left).
    lake.write_lake_table(_rows("a", [51]), root, "fleet", "g3")
    g1 = pa.concat_tables([_rows("a", list(range(1, 51))), _rows("c", list(range(1, 21)))])
    snap3 = lake.write_lake_table(g1, root, "fleet", "g1")
    lake.refresh_recent(root, "fleet", 8)
    _same(snap3, 8)
    recent, extents = lake.read_recent_table(snap3, 8, COLS)
    assert extents.column(C.ASSET).to_pylist() == ["a", "c"]
    assert [k for a, k in zip(recent.column(C.ASSET).to_pylist(), recent.column(C.TIME).to_pylist())
            if a == "a"] == [47, 48, 49, 50, 51, 52, 54, 56]


def test_a_refresh_with_another_window_rebuilds_every_asset(tmp_path):
    root = str(tmp_path / "lake")
    snap = lake.write_lake_table(pa.concat_tables([_rows("a", list(range(1, 30))), _rows("b", [1, 2])]),
                                 root, "fleet", "g1")
    lake.refresh_recent(root, "fleet", 4)
    lake.refresh_recent(root, "fleet", 12)
    assert _last_commit(root, "fleet")["twinflow.recent_assets_read"] == "2"
    _same(snap, 12)


def test_a_missing_recent_table_or_column_is_refused_with_the_reason(tmp_path):
    root = str(tmp_path / "lake")
    snap = lake.write_lake_table(_rows("a", [1, 2, 3]), root, "fleet", "g1")
    with pytest.raises(lake.RecentUnavailable, match="fleet__recent does not exist"):
        lake.read_recent_table(snap, 2, COLS)
    lake.refresh_recent(root, "fleet", 2)
    with pytest.raises(lake.RecentUnavailable, match="lacks column"):
        lake.read_recent_table(snap, 2, [C.ASSET, C.TIME, "source_file"])


def test_a_timestamp_fleets_recent_table_equals_its_asset_files(tmp_path):
    root = str(tmp_path / "lake")
    contract = load_contract("pumps")
    sensor = contract.sensors[0]
    rng = np.random.default_rng(0)
    parts = []
    for i, n in enumerate([40, 7, 25]):
        ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n) * 10 + i, unit="min")
        parts.append(pa.table({C.ASSET: [f"p-{i}"] * n, C.TIMESTAMP: pa.array(ts.to_pydatetime(), pa.timestamp("us", tz="UTC")),
                               sensor: rng.normal(size=n)}))
    lake.write_lake_table(pa.concat_tables(parts), root, "pumps", "g1", contract=contract)
    snap = lake.write_lake_table(parts[0].slice(0, 5).set_column(
        1, C.TIMESTAMP, pa.array((pd.Timestamp("2026-02-01", tz="UTC") + pd.to_timedelta(np.arange(5), unit="h"))
                                 .to_pydatetime(), pa.timestamp("us", tz="UTC"))), root, "pumps", "g2", contract=contract)
    lake.refresh_recent(root, "pumps", 12)
    cols = [C.ASSET, C.TIMESTAMP, sensor]
    got, got_ext = lake.read_recent_table(snap, 10, cols)
    want, want_ext = lake.read_recent(snap, 10, cols)
    assert got.equals(want) and got_ext.equals(want_ext)
    assert got.num_rows == 10 + 7 + 10
