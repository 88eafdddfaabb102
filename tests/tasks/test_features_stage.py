"""The features stage's Dask drivers on a real cluster: partitions read once and held between passes."""

from __future__ import annotations

from pathlib import Path

import cmapss_names as CM
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from twinflow.tasks import features as ft
from twinflow.tasks.features import FeatureParams

from twinflow import contracts, lake

pytestmark = pytest.mark.integration

SENSORS = CM.SENSORS[:5]


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as cluster, Client(cluster) as c:
        yield c


def _batch(rng: np.random.Generator, assets: range, first: int, rows: int) -> pa.Table:
    n = len(assets) * rows
    regime = rng.integers(0, 3, size=n)
    frame = pd.DataFrame({contracts.ASSET: np.repeat([f"a{a:02d}" for a in assets], rows),
                          contracts.TIME: np.tile(np.arange(first, first + rows, dtype=np.int32), len(assets))})
    ops = np.array([[0.0, 0.0, 100.0], [20.0, 0.7, 100.0], [42.0, 0.84, 60.0]])[regime] + rng.normal(0, 1e-3, (n, 3))
    for j, c in enumerate(CM.OP_SETTINGS):
        frame[c] = ops[:, j]
    for j, c in enumerate(SENSORS):
        y = 500 + 40 * regime + rng.normal(scale=1 + j, size=n) + 0.01 * frame[contracts.TIME]
        y[rng.random(n) < 0.03] = np.nan
        frame[c] = y
    return pa.Table.from_pandas(frame, preserve_index=False)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """12 assets in three regimes, each in two files (two commits of consecutive cycles)."""
    root = tmp_path_factory.mktemp("lake")
    rng = np.random.default_rng(3)
    for batch, first in enumerate((1, 41)):
        table = _batch(rng, range(12), first, 40)
        lake.commit(str(root), "fleet", lake.conform(table, f"b{batch}", f"f{batch}.txt"))
    snap = lake.snapshot(str(root), "fleet")
    groups = ft.list_lake_files(snap)
    assert {len(files) for files in groups.values()} == {2}
    return snap, groups


def _stage(parts, groups, out: Path, held_budget: int, params: FeatureParams):
    """fit + transform as the flow runs them, holding the partitions when the budget allows."""
    sizes = {p: s for files in groups.values() for p, s in files}
    ops = list(CM.OP_SETTINGS)
    out.mkdir()
    with ft.hold_partitions(parts, [contracts.ASSET, contracts.TIME, *ops, *SENSORS], None, sizes,
                            held_budget) as held:
        fit = ft.fit_statistics(parts, SENSORS, ops, params, file_sizes=sizes, held=held)
        summaries = ft.transform_and_write(parts, fit, params, "numpy", str(out), file_sizes=sizes, held=held)
    return held, fit, summaries


def test_held_partitions_give_the_same_fit_and_files_as_reading_each_pass(fleet, client, tmp_path):
    _, groups = fleet
    parts = ft.plan_partitions(groups, 1, min_partitions=4)
    assert len(parts) > 1
    # A sample from 7 of the 24 files: the held path must take exactly those files' rows.
    params = FeatureParams(windows=[3, 10], ewm_spans=[5], sample_files=7)
    _, fit_read, sum_read = _stage(parts, groups, tmp_path / "read", 0, params)
    from distributed import get_task_stream

    with get_task_stream(client) as stream:  # which tasks ran
        held, fit_held, sum_held = _stage(parts, groups, tmp_path / "held", 2**30, params)
    assert held is not None and not held.covers(parts, [contracts.ASSET])  # released after the transform
    assert fit_read.n_regimes == 3
    assert fit_held == fit_read
    assert sum_held == sum_read
    for s in sum_read:
        a, b = pq.read_table(tmp_path / "read" / s["file"]), pq.read_table(tmp_path / "held" / s["file"])
        assert a.schema.equals(b.schema, check_metadata=True), s["file"]
        pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas(), check_exact=True)  # NaN where NaN
    # Each partition was read once: by the held reads, never by a pass's own lake read.
    reads = [str(t["key"]) for t in stream.data if "read-lake" in str(t["key"])]
    assert len(reads) == len(parts) and all("read-lake-held" in k for k in reads), reads


def test_a_fleet_over_the_budget_is_read_per_pass_with_the_same_result(fleet, client, tmp_path):
    _, groups = fleet
    parts = ft.plan_partitions(groups, 1, min_partitions=3)
    total = ft.held_bytes(parts, {p: s for files in groups.values() for p, s in files})
    params = FeatureParams(windows=[5], ewm_spans=[5])
    held, fit_small, sum_small = _stage(parts, groups, tmp_path / "over", total - 1, params)
    assert held is None
    held, fit_big, sum_big = _stage(parts, groups, tmp_path / "within", total, params)
    assert held is not None
    assert fit_small == fit_big and sum_small == sum_big
    # Unknown sizes cannot be checked against the budget: no holding either.
    assert ft.held_bytes(parts, None) is None
    with ft.hold_partitions(parts, [contracts.ASSET], None, None, 2**40) as held:
        assert held is None


def test_counted_reads_give_each_files_rows(fleet):
    _, groups = fleet
    files = [p for a in sorted(groups)[:3] for p, _ in groups[a]]
    frame, rows = ft.read_partition_counted(files, [contracts.ASSET, contracts.TIME, CM.OP_SETTINGS[0]])
    assert rows == [40] * 6 and len(frame) == 240
    pd.testing.assert_frame_equal(frame, ft.read_partition(files, [contracts.ASSET, contracts.TIME,
                                                                   CM.OP_SETTINGS[0]]))
    # The rows of one file, taken back out, are that file read alone.
    alone = ft.read_partition(files[3:4], [contracts.ASSET, contracts.TIME])
    pd.testing.assert_frame_equal(frame.iloc[120:160][[contracts.ASSET, contracts.TIME]].reset_index(drop=True),
                                  alone)
