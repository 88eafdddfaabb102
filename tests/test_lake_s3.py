"""The lake on S3-compatible object storage, against a real SeaweedFS S3 gateway on loopback."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from object_store import requires_weed
from twinflow import lake
from twinflow.contract import load_contract
from twinflow.errors import ConfigError, ServiceUnavailable

pytestmark = [pytest.mark.integration, requires_weed]
pytest.importorskip("s3fs")


def pump_rows(asset: str, start: str = "2026-01-01", n: int = 3) -> pa.Table:
    ts = pd.date_range(start, periods=n, freq="10min", tz="UTC")
    return pa.table({"asset_id": [asset] * n, "timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
                     "vibration_mm_s": np.arange(n, dtype=float)})


def test_write_read_and_contract_on_s3(s3):
    pumps, so, root = load_contract("pumps"), s3.options(), s3.url("lake-a")
    snap = lake.write_lake_table(pump_rows("p1"), root, "pumps", "b1", storage_options=so, contract=pumps)
    assert lake.read_lake(snap, storage_options=so).num_rows == 3
    assert lake.table_contract(root, "pumps", so) == pumps
    files = lake.list_files(snap, so)
    assert list(files) == ["p1"] and files["p1"][0][0].startswith(f"{root}/pumps/asset_id=p1/")
    # Dask workers read the data files themselves, with the options translated for s3fs.
    assert len(lake.to_dask(snap, storage_options=so).compute()) == 3
    # Writing the batch again replaces it: no duplicates.
    again = lake.write_lake_table(pump_rows("p1"), root, "pumps", "b1", storage_options=so, contract=pumps)
    assert lake.read_lake(again, storage_options=so).num_rows == 3


def test_datasets_are_listed_on_s3_without_bookkeeping_prefixes(s3):
    pumps, so, root = load_contract("pumps"), s3.options(), s3.url("lake-list")
    assert lake.datasets(root, so) == []  # nothing written under the prefix yet
    lake.write_lake_table(pump_rows("p1"), root, "pumps", "b1", storage_options=so, contract=pumps)
    lake.write_lake_table(pump_rows("p2"), root, "more_pumps", "b1", storage_options=so, contract=pumps)
    fs, base = lake.filesystem(root, so)
    fs.pipe(f"{base}/_ledger.sqlite", b"x")  # bookkeeping beside the tables is not a dataset
    fs.pipe(f"{base}/loose/part.parquet", b"x")  # nor is a prefix without a Delta log
    assert lake.datasets(root, so) == ["more_pumps", "pumps"]
    # Health's default (the lake's only fleet) lists fleets on S3 as it does locally: it was local-only.
    from twinflow.flows.health import running_fleets

    assert running_fleets(root, so) == ["more_pumps", "pumps"]


def test_concurrent_writers_commit_every_version_with_conditional_puts(s3):
    pumps, so, root = load_contract("pumps"), s3.options(), s3.url("lake-b")
    lake.write_lake_table(pump_rows("p0"), root, "pumps", "b0", storage_options=so, contract=pumps)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            lake.commit(root, "pumps", lake.conform(pump_rows(f"p{i}"), f"b{i}", contract=pumps),
                        storage_options=so, contract=pumps)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert lake.version(root, "pumps", so) == 8  # the first write plus 8 concurrent appends
    table = lake.read_lake(lake.snapshot(root, "pumps", so), storage_options=so)
    assert sorted(set(table.column("asset_id").to_pylist())) == sorted(f"p{i}" for i in range(9))
    assert table.num_rows == 27


def test_wrong_credentials_and_unreachable_endpoint_give_one_clear_line(s3):
    cmapss = load_contract("cmapss")
    rows = pa.table({"asset_id": ["1"], "cycle": [1]})
    secret = "not-the-secret-42"
    with pytest.raises(ConfigError, match="refused the credentials") as bad:
        lake.write_lake_table(rows, s3.url("lake-c"), "d", "b1", storage_options=s3.options(secret=secret),
                              contract=cmapss)
    assert "\n" not in str(bad.value) and secret not in str(bad.value)
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        lake.write_lake_table(rows, s3.url("lake-c"), "d", "b1", contract=cmapss,
                              storage_options={**s3.options(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        lake.write_lake_table(rows, "s3://no-such-bucket/lake", "d", "b1", storage_options=s3.options(),
                              contract=cmapss)
    assert lake.open_table(s3.url("lake-c"), "d", storage_options=s3.options()) is None  # nothing written


def test_reads_on_s3_equal_the_same_lake_read_locally(s3, tmp_path):
    """Whole-asset reads (features, Dask, health's tails, extents) from an S3 lake return exactly what
    the same table returns from a local folder, with or without the Delta log's sizes; asset ids that
    need percent-encoding in the partition folder included."""
    pumps, so = load_contract("pumps"), s3.options()
    remote, local = s3.url("lake-r"), str(tmp_path / "lake")
    assets = ["p1", "a/b c", "ü%25", *(f"q{i}" for i in range(30))]  # more files than are fetched ahead
    for i in range(2):  # two batches: two files per asset
        rows = pa.concat_tables([pump_rows(a, start=f"2026-01-0{i + 1}", n=4 + i) for a in assets])
        for root, opts in ((remote, so), (local, None)):
            snap = lake.write_lake_table(rows, root, "pumps", f"b{i}", storage_options=opts, contract=pumps)
    rsnap, lsnap = lake.snapshot(remote, "pumps", so), lake.snapshot(local, "pumps")
    rfiles, lfiles = lake.list_files(rsnap, so), lake.list_files(lsnap)
    assert sorted(rfiles) == sorted(lfiles) == sorted(assets)
    cols = ["asset_id", "timestamp", "vibration_mm_s", "batch_id"]

    def flat(groups):
        return [f for a in sorted(groups) for f in groups[a]]

    want = lake.read_files([p for p, _ in flat(lfiles)], cols).sort_by([("asset_id", "ascending"),
                                                                        ("timestamp", "ascending")])
    assert want.num_rows == len(assets) * 9
    for sizes in (None, [b for _, b in flat(rfiles)]):
        got = lake.read_files([p for p, _ in flat(rfiles)], cols, so, sizes=sizes)
        assert got.sort_by([("asset_id", "ascending"), ("timestamp", "ascending")]).equals(want)
    dask_frame = lake.to_dask(rsnap, cols, assets_per_partition=7, storage_options=so).compute()
    assert len(dask_frame) == want.num_rows and set(dask_frame.asset_id) == set(assets)
    for r, w in zip(lake.read_recent(rsnap, 3, ["vibration_mm_s"], so), lake.read_recent(lsnap, 3, ["vibration_mm_s"])):
        assert r.equals(w)
    assert lake.time_extents(rsnap, so).equals(lake.time_extents(lsnap))
    with pytest.raises(ValueError, match="2 sizes for 3 paths"):
        lake.read_files([p for p, _ in flat(rfiles)][:3], cols, so, sizes=[1, 2])


def test_a_read_with_the_delta_logs_sizes_is_one_get_per_file_and_no_head(s3, tmp_path):
    """What the features stage reads with: each file one GET (no HEAD for its size, no footer
    round trip), counted by a proxy between the reader and the store."""
    from object_store import CountingProxy

    pumps, so = load_contract("pumps"), s3.options()
    assets = [f"p{i}" for i in range(20)]  # more files than are fetched ahead at once
    rows = pa.concat_tables([pump_rows(a, n=5) for a in assets])
    snap = lake.write_lake_table(rows, s3.url("lake-get"), "pumps", "b1", storage_options=so, contract=pumps)
    files = [f for a in sorted(assets) for f in lake.list_files(snap, so)[a]]
    paths, sizes = [p for p, _ in files], [b for _, b in files]
    cols = ["asset_id", "timestamp", "vibration_mm_s"]
    want = lake.read_files(paths, cols, so, sizes=sizes)
    proxy = CountingProxy(s3.endpoint, tmp_path)
    try:
        via = {**so, "AWS_ENDPOINT_URL": proxy.url}
        assert lake.read_files(paths, cols, via, sizes=sizes).equals(want)
        assert proxy.methods() == {"GET": len(paths)}
        assert len({p for _, p in proxy.requests}) == len(paths)  # each file once
        proxy.clear()
        # Without the sizes the reader must ask the store for each size first: the proxy sees it.
        assert lake.read_files(paths, cols, via).equals(want)
        assert proxy.methods().get("GET") == len(paths) and proxy.methods().get("HEAD") == len(paths)
    finally:
        proxy.close()
    assert want.num_rows == 100


def test_reads_with_wrong_credentials_or_a_vanished_file_fail_clearly(s3):
    pumps, so, root = load_contract("pumps"), s3.options(), s3.url("lake-w")
    snap = lake.write_lake_table(pump_rows("p1"), root, "pumps", "b1", storage_options=so, contract=pumps)
    [(path, size)] = lake.list_files(snap, so)["p1"]
    secret = "not-the-secret-43"
    with pytest.raises(ConfigError, match="refused the credentials") as bad:
        lake.read_files([path], ["timestamp"], s3.options(secret=secret), sizes=[size])
    assert "\n" not in str(bad.value) and secret not in str(bad.value)
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        lake.read_files([path], ["timestamp"], {**so, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, sizes=[size])
    with pytest.raises(FileNotFoundError):
        lake.read_files([path + ".gone"], ["timestamp"], so, sizes=[size])


def test_readers_given_no_options_use_the_lakes_options_from_settings(s3, monkeypatch, tmp_path):
    """Stages that read the lake without passing options (twin calibration, simulate, health) reach the
    store with the settings' options; explicit options still win."""
    import json

    pumps, so, root = load_contract("pumps"), s3.options(), s3.url("lake-d")
    snap = lake.write_lake_table(pump_rows("p1"), root, "pumps", "b1", storage_options=so, contract=pumps)
    secret = {k: so[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    monkeypatch.setenv("TWINFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TWINFLOW_LAKE__STORAGE_OPTIONS", json.dumps({k: v for k, v in so.items() if k not in secret}))
    monkeypatch.setenv("TWINFLOW_LAKE__SECRET_OPTIONS", json.dumps(secret))
    assert lake.snapshot_contract(snap) == pumps
    assert lake.read_lake(snap).num_rows == 3
    assert lake.read_files([p for p, _ in lake.list_files(snap)["p1"]], ["timestamp"]).num_rows == 3
    with pytest.raises(ConfigError, match="refused the credentials"):
        lake.read_lake(snap, storage_options=s3.options(secret="wrong-secret-1"))


def test_result_tables_on_s3(s3):
    """A stage's result table (e.g. fleet health) appends and replaces its own key on an s3:// lake."""
    so, root = s3.options(), s3.url("lake-res")
    run = pa.table({"run": ["r1", "r1"], "asset_id": ["p1", "p2"], "score": [0.1, 0.2]})
    v0 = lake.write_results(root, "fleet_health", run, key_column="run", key="r1", storage_options=so)
    again = lake.write_results(root, "fleet_health", run, key_column="run", key="r1", storage_options=so)
    assert again == v0 + 1
    got = lake.read_results(root, "fleet_health", storage_options=so)
    assert got.num_rows == 2 and sorted(got.column("asset_id").to_pylist()) == ["p1", "p2"]


def test_upkeep_on_s3_keeps_the_snapshot_the_latest_health_run_read(s3, prefect_api, monkeypatch):
    """The lake-upkeep flow on an s3:// lake (configured through the environment, as a deployment is):
    result tables are listed and vacuumed there, and the versions that the latest health run of each
    fleet wrote and read (its commit's ``twinflow.reads``) survive the vacuum."""
    import json

    from twinflow.deployments.upkeep import UpkeepParams, upkeep
    from twinflow.flows.health import FLEET_HEALTH, HEALTH_READS
    from twinflow.refs import LakeSnapshot

    pumps, so, root = load_contract("pumps"), s3.options(), s3.url("lake-upkeep")
    monkeypatch.setenv("TWINFLOW_LAKE__LAKE", root)
    monkeypatch.setenv("TWINFLOW_LAKE__STORAGE_OPTIONS", json.dumps(so))
    for n in (3, 4, 5):  # versions 0-2 of one batch: each replaces the last one's file
        lake.write_lake_table(pump_rows("p1", n=n), root, "pumps", "b1", storage_options=so, contract=pumps)
    v1 = LakeSnapshot(lake_path=root, dataset="pumps", batch_id="v1", version=1)
    reads = lake.snapshot_reads(v1, so)
    assert reads == {"pumps": 1}  # no segments or recent rows in this lake
    scores = pa.table({"dataset": ["pumps"], "dataset_version": [1], "run_key": ["pumps@v1"]})
    for _ in range(2):  # a health run and its re-run (the first write's file becomes unreferenced)
        written = lake.write_results(root, FLEET_HEALTH, scores, key_column="run_key", key="pumps@v1",
                                     metadata={"twinflow.dataset": "pumps", HEALTH_READS: json.dumps(reads)},
                                     storage_options=so)
    fleet_health = lake.result_table(FLEET_HEALTH)
    assert lake.result_tables(root, so) == [fleet_health]

    report = upkeep(UpkeepParams(optimize=False, retention_hours=0))
    assert report.pinned == {fleet_health: [written], "pumps": [1]}
    # v0's telemetry file and the replaced fleet_health file go; v1's is pinned, v2's current.
    assert report.vacuumed == {"pumps": 1, fleet_health: 1}
    assert lake.read_lake(v1, storage_options=so).num_rows == 4
    assert lake.read_results(root, FLEET_HEALTH, version=written, storage_options=so).num_rows == 1
    # Unpinned, the scored snapshot's file goes too.
    assert upkeep(UpkeepParams(optimize=False, retention_hours=0, protect_health=False)).vacuumed["pumps"] == 1
    with pytest.raises(Exception):
        lake.read_lake(v1, storage_options=so)
