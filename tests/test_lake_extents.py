"""lake.time_extents: each asset's first/last reading and its source, narrowed by the Delta log's
(truncated) statistics but always exact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from twinflow import lake
from twinflow.contract import load_contract


def _batch(contract, assets, times, source):
    t = pa.table({"asset_id": pa.array(assets, pa.string()),
                  contract.key: pa.array(times, contract.lake_schema().field(contract.key).type)})
    return lake.conform(t, source.replace("/", "_"), source_file=source, contract=contract)


def _brute(contract, lake_path, dataset):
    snap = lake.snapshot(lake_path, dataset).model_copy(update={"contract": contract})
    t = lake.read_lake(snap, columns=["asset_id", contract.key, "source_file"]).to_pandas()
    g = t.groupby("asset_id")
    return {a: (f[contract.key].iloc[0], f[contract.key].iloc[-1], f["source_file"].iloc[-1]) for a, f in g}


@pytest.mark.parametrize("fleet", ["pumps", "cmapss"])
def test_time_extents_equal_a_full_scan_across_many_batches(tmp_path, fleet, monkeypatch):
    contract = load_contract(fleet)
    rng = np.random.default_rng(7)
    lake_path = str(tmp_path / "lake")
    base = np.datetime64("2026-01-01T00:00:00", "us")
    # Several batches per asset, overlapping in time, with sub-millisecond timestamps that the Delta
    # statistics truncate: the first and last readings must still come out exact.
    for b in range(6):
        assets, times = [], []
        for a in ("A", "B", "C"):
            if a == "C" and b > 1:
                continue
            k = rng.integers(1, 40)
            if contract.key == "timestamp":
                ts = base + (rng.choice(10_000_000, k, replace=False) * 997 + b * 3_000_000_000)
                times += list(ts.astype("datetime64[us]").astype(object))
            else:
                times += list(rng.choice(1000, k, replace=False) + b * 500 + 1)
            assets += [a] * k
        lake.commit(lake_path, "fleet", _batch(contract, assets, times, f"landing/batch_{b}.csv"), contract=contract)
    snap = lake.snapshot(lake_path, "fleet").model_copy(update={"contract": contract})
    read = []
    real_read_each = lake._read_each  # every data file read goes through it
    monkeypatch.setattr(lake, "_read_each", lambda paths, *a, **k: read.extend(paths) or real_read_each(paths, *a, **k))
    got = lake.time_extents(snap).to_pylist()
    total = sum(len(v) for v in lake.list_files(snap).values())
    # The statistics narrow the read to the files that can hold a first or a last reading.
    assert total == 14 and 0 < len(read) <= 6
    want = _brute(contract, lake_path, "fleet")
    assert [r["asset_id"] for r in got] == sorted(want)
    for r in got:
        first, last, source = want[r["asset_id"]]
        assert (r["first"], r["last"], r["last_source"]) == (first, last, source)


def test_time_extents_of_a_missing_table_is_empty(tmp_path):
    contract = load_contract("pumps")
    snap = lake.LakeSnapshot(lake_path=str(tmp_path), dataset="nothing", batch_id="none",
                            contract=contract)
    assert lake.time_extents(snap).num_rows == 0
