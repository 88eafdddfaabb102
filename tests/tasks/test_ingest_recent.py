"""The recent-rows table after each ingest (``tasks/ingest/run.py``, ``twinflow.lake.refresh_recent``):
built from the tails the workers stage where a commit only adds rows, read from the asset files where it
replaces them, and equal, either way, to what the asset files answer (:func:`twinflow.lake.read_recent`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from twinflow import contracts as C
from twinflow import lake
from twinflow.contract.store import load_contract
from twinflow.tasks.ingest import IngestParams, latest_snapshot, read_quarantine, run_local

W = 20


class Fleet:
    """Landing Parquet files in one bundled contract's source shape, ingested with :func:`run_local`."""

    def __init__(self, root: Path, name: str):
        self.contract = load_contract(name)
        self.name = name
        self.landing, self.lake, self.quarantine = root / "landing", root / "lake", root / "quarantine"
        self.landing.mkdir(parents=True)
        self.runs = 0
        self.rng = np.random.default_rng(7)
        timestamps = self.contract.clock.kind == "timestamp"
        self.asset_col = self.contract.asset.column
        self.time_col = self.contract.clock.column or self.contract.key
        self.channels = [(c.aliases[0] if c.aliases and timestamps else c.name, c) for c in self.contract.channels]
        self.dataset = "fleet"

    def write(self, file: str, rows: dict[str, list[int]]) -> None:
        """One landing file holding, per asset, readings at the given steps (cycles, or 10-minute steps
        with sub-millisecond jitter on a timestamp clock: extents must survive to the microsecond)."""
        assets = [a for a, steps in rows.items() for _ in steps]
        steps = np.array([s for a in rows for s in rows[a]], dtype=np.int64)
        if self.contract.clock.kind == "cycle":
            t = pa.array(steps, pa.int32())
        else:
            us = np.datetime64("2026-01-01T00:00:00", "us").astype(np.int64) + steps * 600_000_000 + \
                (steps * 7919) % 997
            t = pa.array(us, pa.timestamp("us", tz="UTC"))
        cols = {self.asset_col: pa.array(assets, pa.string()), self.time_col: t}
        for header, c in self.channels:
            mid, spread = (c.low + c.high) / 2, (c.high - c.low) / 50
            cols[header] = pa.array(np.round(mid + spread * self.rng.standard_normal(len(steps)), 4))
        prefix = "pumps_" if self.name == "pumps" else ""
        pq.write_table(pa.table(cols), self.landing / f"{prefix}{file}.parquet")

    def ingest(self):
        self.runs += 1
        params = IngestParams(landing=str(self.landing), contract=self.name, recent_rows=W, dataset="fleet")
        return run_local(params, str(self.lake), str(self.quarantine), f"b{self.runs}")

    def refreshed(self) -> dict:
        """The recent table's last commit: what the latest refresh read and took from tails."""
        return lake.history(str(self.lake), lake.derived_name(self.dataset, lake.RECENT), limit=1)[0]

    def assert_table_answers_as_the_files(self) -> lake.LakeSnapshot:
        snap = latest_snapshot(str(self.lake), self.dataset)
        cols = [C.ASSET, self.contract.key, *self.contract.channel_names]
        for n in (W, 7):
            got, got_ext = lake.read_recent_table(snap, n, cols)
            want, want_ext = lake.read_recent(snap, n, cols)
            assert got.equals(want), (got.to_pandas(), want.to_pandas())
            assert got_ext.equals(want_ext), (got_ext.to_pandas(), want_ext.to_pandas())
        return snap


def steps(lo: int, hi: int, every: int = 1) -> list[int]:
    return list(range(lo, hi + 1, every))


@pytest.mark.parametrize("name", ["cmapss", "pumps"])
def test_ingests_that_only_add_rows_refresh_the_recent_table_from_the_staged_tails(tmp_path, name):
    f = Fleet(tmp_path, name)
    f.write("a", {"1": steps(101, 160), "2": steps(101, 219, 2), "3": steps(101, 105)})
    f.write("b", {"4": steps(101, 130)})
    f.ingest()
    first = f.refreshed()
    assert (first["twinflow.recent_assets_read"], first["twinflow.recent_assets_from_tails"]) == ("0", "4")
    f.assert_table_answers_as_the_files()

    # Appends to existing assets and a new asset: each previous tail and the new rows merged, nothing read.
    f.write("c", {"1": steps(161, 190), "4": steps(131, 135), "9": steps(1, 10)})
    f.ingest()
    second = f.refreshed()
    assert (second["twinflow.recent_assets_read"], second["twinflow.recent_assets_from_tails"]) == ("0", "3")
    assert int(second["twinflow.telemetry_version"]) == int(first["twinflow.telemetry_version"]) + 1
    f.assert_table_answers_as_the_files()

    # Rows older than the tail (asset 3: before everything it has) and inside it (asset 2: the even
    # steps between its odd ones), in a later batch: merged by time, not appended.
    f.write("d", {"2": steps(150, 218, 2), "3": steps(1, 50)})
    f.ingest()
    assert f.refreshed()["twinflow.recent_assets_read"] == "0"
    snap = f.assert_table_answers_as_the_files()
    recent, extents = lake.read_recent_table(snap, W, [C.ASSET, f.contract.key])
    two = recent.filter(pc.equal(recent.column(C.ASSET), "2")).num_rows
    assert two == W
    assert dict(zip(extents.column(C.ASSET).to_pylist(), extents.column("readings").to_pylist())) == \
        {"1": 90, "2": 60 + 35, "3": 55, "4": 35, "9": 10}
    before = f.refreshed()["version"]
    f.ingest()  # nothing new: no new version
    assert f.refreshed()["version"] == before


@pytest.mark.parametrize("name", ["cmapss", "pumps"])
def test_assets_whose_rows_a_commit_replaces_or_rewrites_are_read_from_their_files(tmp_path, name):
    f = Fleet(tmp_path, name)
    f.write("a", {"1": steps(1, 60), "2": steps(1, 40)})
    f.write("b", {"3": steps(1, 50), "2": steps(41, 45)})
    f.ingest()
    f.assert_table_answers_as_the_files()

    # b read again with other content: assets 2 and 3 lose b's old file; 1 gains rows from c.
    f.write("b", {"3": steps(1, 30)})
    f.write("c", {"1": steps(61, 70)})
    f.ingest()
    r = f.refreshed()
    assert (r["twinflow.recent_assets_read"], r["twinflow.recent_assets_from_tails"]) == ("1", "2")
    snap = f.assert_table_answers_as_the_files()
    ext = lake.read_recent_table(snap, W, [C.ASSET, f.contract.key])[1]
    assert dict(zip(ext.column(C.ASSET).to_pylist(), ext.column("readings").to_pylist())) == \
        {"1": 70, "2": 40, "3": 30}

    # A file repeating keys the lake holds: its duplicate rows are quarantined and its staged rows of
    # that asset rewritten by the committer, so that asset's staged tail is not used.
    f.write("d", {"1": steps(66, 80)})
    f.ingest()
    assert read_quarantine(str(f.quarantine), f.dataset).num_rows == 5
    r = f.refreshed()
    assert (r["twinflow.recent_assets_read"], r["twinflow.recent_assets_from_tails"]) == ("1", "0")
    f.assert_table_answers_as_the_files()


@pytest.mark.parametrize("name", ["cmapss", "pumps"])
def test_optimize_leaves_a_current_recent_table_current_and_a_stale_one_stale(tmp_path, name):
    f = Fleet(tmp_path, name)
    f.write("a", {"1": steps(1, 30), "2": steps(1, 12)})
    f.write("b", {"1": steps(31, 50), "2": steps(13, 40)})
    f.ingest()
    root = str(f.lake)
    before = lake.version(root, f.dataset)
    out = lake.optimize(root, f.dataset)
    assert out["numFilesRemoved"] == 4 and lake.version(root, f.dataset) == before + 1
    r = f.refreshed()
    assert (r["twinflow.operation"], r["twinflow.telemetry_version"]) == ("retag_recent", str(before + 1))
    # Compaction writes millisecond timestamp statistics: the extents follow the log, as the files' do.
    f.assert_table_answers_as_the_files()
    f.write("c", {"2": steps(41, 45)})
    f.ingest()  # and the next ingest merges its tails onto the re-tagged table
    assert f.refreshed()["twinflow.recent_assets_from_tails"] == "1"
    f.assert_table_answers_as_the_files()

    # Telemetry committed without a refresh, then compacted: still stale, never re-tagged as current.
    rows = lake.read_lake(latest_snapshot(root, f.dataset))
    rows = rows.filter(pc.equal(rows.column(C.ASSET), "1")).select([C.ASSET, f.contract.key, *f.contract.channel_names])
    lake.write_lake_table(rows.set_column(rows.column_names.index(C.ASSET), C.ASSET,
                                          pa.array(["7"] * rows.num_rows, pa.string())),
                          root, f.dataset, "by-hand", contract=f.contract)
    lake.optimize(root, f.dataset)
    assert f.refreshed()["twinflow.operation"] == "refresh_recent"
    with pytest.raises(lake.RecentUnavailable, match="stale"):
        lake.read_recent_table(lake.snapshot(root, f.dataset), W, [C.ASSET, f.contract.key])


def test_a_table_left_behind_by_a_writer_that_did_not_refresh_is_brought_forward_by_what_changed(tmp_path):
    f = Fleet(tmp_path, "pumps")
    f.write("a", {"1": steps(1, 30), "2": steps(1, 30), "3": steps(1, 30)})
    f.ingest()
    root = str(f.lake)
    rows = lake.read_lake(latest_snapshot(root, f.dataset))
    rows = rows.filter(pc.equal(rows.column(C.ASSET), "1")).select([C.ASSET, f.contract.key, *f.contract.channel_names])
    lake.write_lake_table(rows.set_column(0, C.ASSET, pa.array(["7"] * rows.num_rows, pa.string())),
                          root, f.dataset, "by-hand", contract=f.contract)  # no refresh: the table is stale
    f.write("b", {"2": steps(31, 40)})
    f.ingest()
    # The tails of b alone cannot bring it forward (7 came in between): the assets whose files changed
    # since the table's version are read, the others kept.
    r = f.refreshed()
    assert (r["twinflow.recent_assets_read"], r["twinflow.recent_assets_from_tails"]) == ("2", "0")
    f.assert_table_answers_as_the_files()
