"""The lake API (``twinflow/lake.py``): Delta tables, snapshots by version, outside readers, migration, crashes."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twinflow import contracts as C
from twinflow import lake
from twinflow.data import cmapss_path
from twinflow.errors import ConfigError
from twinflow.tasks.ingest import IngestParams, Ledger, run_local
from twinflow.tasks.ingest import commit as commit_mod

TRAIN_LINES = [ln for ln in gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode().splitlines()
               if ln.strip()]


def _fleet(assets: list[str], cycles: int, offset: float = 0.0) -> pa.Table:
    n = len(assets) * cycles
    return pa.table({C.ASSET: [a for a in assets for _ in range(cycles)],
                     C.TIME: pa.array([c for _ in assets for c in range(1, cycles + 1)], pa.int32()),
                     "s2": np.full(n, 640.0 + offset)})


def _keys(t: pa.Table) -> list[tuple[str, int]]:
    return list(zip(t.column(C.ASSET).to_pylist(), t.column(C.TIME).to_pylist()))


def test_a_snapshot_reads_its_own_version_after_the_table_changed(tmp_path):
    root = str(tmp_path / "lake")
    old = lake.write_lake_table(_fleet(["a", "b"], 5), root, "fleet", "g1")
    new = lake.write_lake_table(_fleet(["a", "b"], 5, offset=1.0), root, "fleet", "g1")  # same batch: replaced
    lake.write_lake_table(_fleet(["c"], 3), root, "fleet", "g2")
    assert new.version == old.version + 1
    assert set(lake.read_lake(old).column("s2").to_pylist()) == {640.0}
    assert set(lake.read_lake(new).column("s2").to_pylist()) == {641.0}
    latest = lake.read_lake(lake.snapshot(root, "fleet"))
    assert latest.num_rows == 13 and len(set(_keys(latest))) == 13
    # The file listing of a version is that version's: the features stage reads exactly these.
    assert sorted(lake.list_files(old)) == ["a", "b"]
    assert sorted(lake.list_files(lake.snapshot(root, "fleet"))) == ["a", "b", "c"]
    files = [p for group in lake.list_files(old).values() for p, _ in group]
    back = lake.read_files(files, [C.ASSET, C.TIME, "s2"])
    assert sorted(_keys(back)) == sorted(_keys(lake.read_lake(old)))


def test_a_snapshot_as_pandas_and_as_dask_partitions_of_whole_assets(tmp_path):
    root = str(tmp_path / "lake")
    snap = lake.write_lake_table(_fleet([f"u{i}" for i in range(5)], 4), root, "fleet", "g1")
    frame = lake.read_pandas(snap, [C.ASSET, C.TIME, "s2"])
    ddf = lake.to_dask(snap, [C.ASSET, C.TIME, "s2"], assets_per_partition=2)
    assert ddf.npartitions == 3
    got = ddf.compute(scheduler="sync").sort_values([C.ASSET, C.TIME]).reset_index(drop=True)
    # Same rows (Dask may hold the strings as pyarrow strings, pandas as objects).
    assert got.astype({C.ASSET: str}).values.tolist() == frame.astype({C.ASSET: str}).values.tolist()
    per_part = ddf.map_partitions(lambda df: df[C.ASSET].nunique()).compute(scheduler="sync").tolist()
    assert per_part == [2, 2, 1]


def test_features_stage_rerun_on_an_older_snapshot_returns_the_older_data(tmp_path):
    from twinflow.tasks import features as ft

    root = str(tmp_path / "lake")
    old = lake.write_lake_table(_fleet(["a"], 4), root, "fleet", "g1")
    lake.write_lake_table(_fleet(["a"], 4, offset=5.0), root, "fleet", "g1")
    parts = ft.plan_partitions(ft.list_lake_files(old), 1 << 30)
    frame = ft.read_partition(parts[0], [C.ASSET, C.TIME, "s2"])
    assert frame["s2"].tolist() == [640.0] * 4 and frame[C.ASSET].tolist() == ["a"] * 4


def test_outside_readers_see_the_same_rows(tmp_path):
    """Polars (through its Delta reader) and DuckDB (reading the Delta log itself) agree with twinflow."""
    import duckdb
    import polars as pl

    root = str(tmp_path / "lake")
    lake.write_lake_table(_fleet(["a", "é x", "b/c"], 6), root, "fleet", "g1")
    snap = lake.write_lake_table(_fleet(["a", "é x", "b/c"], 6, offset=1.0), root, "fleet", "g1")
    ours = sorted(zip(*[lake.read_lake(snap).column(c).to_pylist() for c in (C.ASSET, C.TIME, "s2")]))

    polars = pl.read_delta(snap.dataset_path).select(C.ASSET, C.TIME, "s2").rows()
    assert sorted(polars) == ours
    # DuckDB without its delta extension (no downloads here): replay the JSON log's add/remove actions and
    # read the live files with hive partitioning: the protocol an outside reader implements.
    log = f"{snap.dataset_path}/_delta_log/*.json"
    live = duckdb.sql(f"""
        WITH actions AS (SELECT * FROM read_json_auto('{log}', filename=true, union_by_name=true)),
        adds AS (SELECT "add".path AS path, filename FROM actions WHERE "add" IS NOT NULL),
        removes AS (SELECT remove.path AS path FROM actions WHERE remove IS NOT NULL)
        SELECT path FROM adds WHERE path NOT IN (SELECT path FROM removes)""").fetchall()
    from urllib.parse import unquote

    paths = [f"{snap.dataset_path}/{unquote(p)}" for (p,) in live]
    rows = duckdb.sql(f"""SELECT {C.ASSET}, {C.TIME}, s2 FROM read_parquet({paths!r}, hive_partitioning=true)""").fetchall()
    assert sorted(rows) == ours


def test_an_old_hive_parquet_lake_is_converted_once_with_a_message(tmp_path, caplog):
    root = tmp_path / "lake"
    t = lake.conform(_fleet(["1", "2"], 3), "old", "legacy.txt")
    for asset in ("1", "2"):
        folder = root / "dataset=legacy" / f"asset={asset}"
        folder.mkdir(parents=True)
        pq.write_table(t.filter(pa.compute.equal(t.column(C.ASSET), asset)), folder / "abc.parquet")
    assert lake.datasets(str(root)) == ["legacy"]
    with caplog.at_level("WARNING", logger="twinflow.lake"):
        snap = lake.snapshot(str(root), "legacy")
    assert "converting the twinflow 0.1 Parquet dataset" in caplog.text
    assert sorted(_keys(lake.read_lake(snap))) == sorted(_keys(t))
    assert not (root / "dataset=legacy").exists() and (root / "_pre_delta" / "dataset=legacy").is_dir()
    assert lake.snapshot(str(root), "legacy").version == snap.version  # once: nothing converts again


def test_bad_dataset_names_and_missing_tables_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset"):
        lake.table_uri(str(tmp_path), "../x")
    assert lake.snapshot(str(tmp_path), "nothing") is None
    with pytest.raises(ConfigError, match="not in the lake"):
        lake.read_lake(lake.LakeSnapshot(lake_path=str(tmp_path), dataset="nothing", batch_id="x"))


def _landing(tmp_path, n_files: int = 3):
    landing = tmp_path / "landing"
    landing.mkdir()
    per = 40
    for i in range(n_files):
        (landing / f"part{i}.txt").write_text("\n".join(TRAIN_LINES[i * per:(i + 1) * per]) + "\n")
    return landing


def _ingest(tmp_path, batch: str):
    params = IngestParams(landing=str(tmp_path / "landing"), dataset="plant")
    return run_local(params, str(tmp_path / "lake"), str(tmp_path / "q"), batch)


def test_crash_after_the_delta_commit_before_the_ledger_neither_duplicates_nor_loses(tmp_path, monkeypatch):
    _landing(tmp_path)
    real_apply = Ledger.apply

    def crash(self, dataset, txn):  # the process dies right after the table committed
        raise KeyboardInterrupt("killed between the Delta commit and the ledger")

    monkeypatch.setattr(Ledger, "apply", crash)
    with pytest.raises(KeyboardInterrupt):
        _ingest(tmp_path, "b1")
    monkeypatch.setattr(Ledger, "apply", real_apply)
    committed = lake.read_lake(lake.snapshot(str(tmp_path / "lake"), "plant"))
    assert committed.num_rows == 120  # the commit is in the table; the ledger does not know it yet

    again = _ingest(tmp_path, "b2")  # recovery applies the intent: nothing to read again
    assert [o.status for o in again] == [] or all(o.status == "unchanged" for o in again)
    snap = lake.latest_snapshot(str(tmp_path / "lake"), "plant")
    table = lake.read_lake(snap)
    assert table.num_rows == 120 and len(set(_keys(table))) == 120 and snap.rows == 120


def test_crash_before_the_delta_commit_reads_the_files_again(tmp_path, monkeypatch):
    _landing(tmp_path)
    real_commit = lake.commit_data_files

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the Delta commit")

    monkeypatch.setattr(commit_mod.lk, "commit_data_files", crash)
    with pytest.raises(KeyboardInterrupt):
        _ingest(tmp_path, "b1")
    monkeypatch.setattr(commit_mod.lk, "commit_data_files", real_commit)
    assert lake.snapshot(str(tmp_path / "lake"), "plant") is None
    again = _ingest(tmp_path, "b2")
    assert sorted(o.status for o in again) == ["ingested"] * 3
    table = lake.read_lake(lake.latest_snapshot(str(tmp_path / "lake"), "plant"))
    assert table.num_rows == 120 and len(set(_keys(table))) == 120
    ledger = Ledger(tmp_path / "lake")
    try:
        assert ledger.conn.execute("SELECT count(*) FROM intents").fetchone()[0] == 0
    finally:
        ledger.close()


def test_a_changed_source_replaces_its_rows_in_one_commit(tmp_path):
    landing = _landing(tmp_path, 2)
    _ingest(tmp_path, "b1")
    v1 = lake.version(str(tmp_path / "lake"), "plant")
    (landing / "part0.txt").write_text("\n".join(TRAIN_LINES[:10]) + "\n")
    _ingest(tmp_path, "b2")
    hist = lake.history(str(tmp_path / "lake"), "plant")
    assert lake.version(str(tmp_path / "lake"), "plant") == v1 + 1  # delete + append: one version
    assert hist[0]["operation"] in ("WRITE", "write") and hist[0].get("twinflow.batch_id") == "b2"
    table = lake.read_lake(lake.latest_snapshot(str(tmp_path / "lake"), "plant"))
    assert table.num_rows == 50 and len(set(_keys(table))) == 50


def test_a_changed_source_in_a_compacted_table_is_still_replaced_in_one_commit(tmp_path):
    """After optimize, data files hold several sources: replacing one rewrites them (predicate path)."""
    landing = _landing(tmp_path, 3)
    _ingest(tmp_path, "b1")
    lake.optimize(str(tmp_path / "lake"), "plant")
    v = lake.version(str(tmp_path / "lake"), "plant")
    (landing / "part1.txt").write_text("\n".join(TRAIN_LINES[40:45]) + "\n")
    _ingest(tmp_path, "b2")
    assert lake.version(str(tmp_path / "lake"), "plant") == v + 1
    table = lake.read_lake(lake.latest_snapshot(str(tmp_path / "lake"), "plant"))
    assert table.num_rows == 85 and len(set(_keys(table))) == 85
    per_source = pa.table({"s": table.column("source_file")}).group_by("s").aggregate([("s", "count")])
    assert sorted(per_source.column("s_count").to_pylist()) == [5, 40, 40]


def test_optimize_keeps_the_rows_and_vacuum_removes_unreferenced_files(tmp_path):
    root = str(tmp_path / "lake")
    for i in range(3):
        lake.write_lake_table(_fleet([f"a{i}", "z"], 2) if i == 0 else _fleet([f"a{i}"], 2), root, "fleet", f"g{i}")
    before = sorted(_keys(lake.read_lake(lake.snapshot(root, "fleet"))))
    lake.optimize(root, "fleet")
    assert sorted(_keys(lake.read_lake(lake.snapshot(root, "fleet")))) == before
    lake.write_lake_table(_fleet(["a0"], 1), root, "fleet", "g0")  # replaces g0: its old files are unreferenced
    stale = lake.vacuum(root, "fleet", retention_hours=0, dry_run=True)
    assert stale and lake.vacuum(root, "fleet", retention_hours=0, dry_run=False) == stale
    assert lake.read_lake(lake.snapshot(root, "fleet")).num_rows == 1 + 2 + 2
    assert json.dumps(lake.history(root, "fleet", limit=1), default=str)


# --- Fleet contracts: the table's key, schema and contract come from the data's contract -----------

def _pump_rows(assets, start="2026-01-01", n=3, channel="vibration_mm_s"):
    import pandas as pd

    ts = pd.date_range(start, periods=n, freq="10min", tz="UTC")
    return pa.table({"asset_id": [a for a in assets for _ in range(n)],
                     "timestamp": pa.array(list(ts) * len(assets), pa.timestamp("us", tz="UTC")),
                     channel: np.arange(n * len(assets), dtype=float)})


def test_timestamp_contract_table_keys_on_timestamp_and_keeps_its_contract(tmp_path):
    from twinflow.contract import load_contract

    pumps = load_contract("pumps")
    snap = lake.write_lake_table(_pump_rows(["p2", "p1"]), str(tmp_path), "pumps", "b1", contract=pumps)
    assert snap.contract == pumps and lake.table_contract(str(tmp_path), "pumps") == pumps
    table = lake.read_lake(snap)
    assert "cycle" not in table.column_names and table.schema.field("timestamp").nullable is False
    assert table.column("asset_id").to_pylist() == ["p1"] * 3 + ["p2"] * 3
    assert lake.history(str(tmp_path), "pumps")[0]["twinflow.contract_digest"] == pumps.digest
    # The key's statistics prune files by time, as for cycles.
    keys = _pump_rows(["p1"], start="2030-01-01").select(["asset_id", "timestamp"])
    assert lake.files_for_keys(str(tmp_path), "pumps", keys) == []
    keys = _pump_rows(["p1"]).select(["asset_id", "timestamp"])
    assert len(lake.files_for_keys(str(tmp_path), "pumps", keys)) == 1


def test_a_contract_version_that_adds_a_channel_evolves_the_schema(tmp_path):
    from twinflow.contract import load_contract
    from twinflow.contract.model import Channel

    v1 = load_contract("pumps")
    lake.write_lake_table(_pump_rows(["p1"]), str(tmp_path), "pumps", "b1", contract=v1)
    v2 = v1.model_copy(update={"version": 2, "channels": [*v1.channels, Channel(name="oil_ppm", unit="ppm")]})
    snap = lake.write_lake_table(_pump_rows(["p2"], channel="oil_ppm"), str(tmp_path), "pumps", "b2", contract=v2)
    table = lake.read_lake(snap)
    assert table.num_rows == 6
    by_asset = dict(zip(table.column("asset_id").to_pylist(), table.column("oil_ppm").to_pylist()))
    assert by_asset["p1"] is None and by_asset["p2"] is not None  # old rows read the new channel as null
    assert lake.table_contract(str(tmp_path), "pumps").version == 2
    # The file reader too: the old file's part of the new channel is null, each file's rows counted.
    files = [p for a in ("p1", "p2") for p, _ in lake.list_files(snap)[a]]
    read, rows = lake.read_files_counted(files, ["oil_ppm", "asset_id"])
    assert rows == [3, 3] and read.column_names == ["oil_ppm", "asset_id"]
    assert read.column("asset_id").to_pylist() == ["p1"] * 3 + ["p2"] * 3
    assert read.column("oil_ppm").null_count == 3 and read.column("oil_ppm").slice(3).null_count == 0


def test_reading_or_writing_with_another_contract_is_a_clear_error(tmp_path):
    from twinflow.contract import load_contract

    snap = lake.write_lake_table(_pump_rows(["p1"]), str(tmp_path), "pumps", "b1", contract=load_contract("pumps"))
    cmapss = load_contract("cmapss")
    with pytest.raises(ConfigError, match="holds data of fleet contract 'pumps'"):
        lake.read_lake(snap.model_copy(update={"contract": cmapss}))
    with pytest.raises(ConfigError, match="not 'cmapss'"):
        lake.write_lake_table(pa.table({"asset_id": ["1"], "cycle": [1]}), str(tmp_path), "pumps", "b2",
                              contract=cmapss)


def test_derived_tables_replace_their_rows_atomically(tmp_path):
    name = lake.derived_name("pumps", "events")
    assert name == "pumps__events" and lake.read_table(str(tmp_path), name) is None
    first = pa.table({"source_file": ["a", "a", "b"], "x": [1, 2, 3]})
    lake.write_table(str(tmp_path), name, first, replace={"source_file": ["a", "b"]})
    again = pa.table({"source_file": ["a"], "x": [9]})
    v = lake.write_table(str(tmp_path), name, again, replace={"source_file": ["a"]})
    got = lake.read_table(str(tmp_path), name).sort_by("x")
    assert got.column("x").to_pylist() == [3, 9] and v == 1
    assert lake.read_table(str(tmp_path), name, version=0).num_rows == 3


def test_vacuum_spares_the_files_of_pinned_versions(tmp_path):
    root = str(tmp_path)
    for i in range(3):  # three versions, each replacing the batch's rows: v0 and v1's files become garbage
        lake.write_lake_table(pa.table({"asset_id": ["1"], "cycle": [i + 1]}), root, "d", "b1")
    assert lake.version(root, "d") == 2
    would = lake.vacuum(root, "d", retention_hours=0, dry_run=True)
    assert len(would) == 2
    removed = lake.vacuum(root, "d", retention_hours=0, dry_run=False, keep_versions=[1])
    assert len(removed) == 1
    from twinflow.refs import LakeSnapshot

    pinned = LakeSnapshot(lake_path=root, dataset="d", batch_id="v1", version=1)
    assert lake.read_lake(pinned).column("cycle").to_pylist() == [2]  # the pinned snapshot still reads
    assert lake.vacuum(root, "d", retention_hours=0, dry_run=False) != []  # unpinned: its files go too


def test_read_recent_reads_each_assets_tail_from_the_files_that_hold_it(tmp_path):
    root = str(tmp_path / "lake")

    def rows(asset: str, cycles: list[int]) -> pa.Table:
        return pa.table({C.ASSET: [asset] * len(cycles), C.TIME: pa.array(cycles, pa.int32()),
                         "s2": np.asarray(cycles, dtype="float64")})

    lake.write_lake_table(pa.concat_tables([rows("a", list(range(1, 51))), rows("b", [1, 2, 3])]), root, "fleet", "g1")
    lake.write_lake_table(rows("a", list(range(51, 61))), root, "fleet", "g2")
    # Two files whose time ranges interleave: the tail needs both.
    lake.write_lake_table(rows("a", [62, 64, 66, 68]), root, "fleet", "g3")
    snap = lake.write_lake_table(rows("a", [61, 63, 65, 67]), root, "fleet", "g4")
    cols = [C.ASSET, C.TIME, "s2"]

    recent, extents = lake.read_recent(snap, 3, cols)
    assert recent.column_names == cols
    assert _keys(recent) == [("a", 66), ("a", 67), ("a", 68), ("b", 1), ("b", 2), ("b", 3)]
    ext = {r[C.ASSET]: r for r in extents.to_pylist()}
    assert ext["a"]["readings"] == 68 and ext["a"]["first"] == 1 and ext["a"]["last"] == 68
    assert ext["b"]["readings"] == 3 and ext["b"]["first"] == 1 and ext["b"]["last"] == 3

    # Asset a's first file is not needed for its last 8 readings: it is never opened (gone, the read
    # still answers; the whole-table read cannot).
    for path, _ in lake.list_files(snap)["a"]:
        if lake.read_files([path], [C.TIME]).column(C.TIME).to_pylist()[0] == 1:
            import os

            os.remove(path)
    recent, _ = lake.read_recent(snap, 8, cols)
    assert _keys(recent) == [("a", c) for c in range(61, 69)] + [("b", 1), ("b", 2), ("b", 3)]
    assert recent.column("s2").to_pylist()[:8] == [float(c) for c in range(61, 69)]
    with pytest.raises(Exception):
        lake.read_lake(snap)
