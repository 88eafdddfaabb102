"""The ingest flow (Prefect + the Dask cluster) into a lake on S3-compatible object storage (a real
SeaweedFS on loopback): the lake's options come from the settings, the batches run on Dask workers."""

from __future__ import annotations

import gzip

import pytest

from object_store import requires_weed, s3_filesystem, start_seaweedfs
from twinflow import lake as lk
from twinflow.data import cmapss_path
from twinflow.flows.ingest import IngestParams, ingest

pytestmark = [pytest.mark.slow, pytest.mark.integration,
              requires_weed]
pytest.importorskip("s3fs")


def test_the_ingest_flow_writes_an_s3_lake_and_a_rerun_reads_nothing(tmp_path, dask_scheduler_address, prefect_api):
    from twinflow import runtime as rt_mod
    from twinflow.settings import get_settings

    store = start_seaweedfs(tmp_path / "seaweedfs")
    try:
        so, root = store.options(), store.url("flow-lake")
        settings = get_settings(home=tmp_path / "home", dask={"mode": "address", "address": dask_scheduler_address},
                                lake={"lake": root, "storage_options": so})
        lines = [x for x in gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode().splitlines()
                 if x.strip()]
        landing = tmp_path / "landing"
        landing.mkdir()
        for k in range(3):
            (landing / f"part{k}.txt").write_text("\n".join(lines[k * 500:(k + 1) * 500]) + "\n")
        with rt_mod.start(settings):
            first = ingest(IngestParams(landing=str(landing), dataset="fleet", contract="cmapss", files_per_batch=1))
            again = ingest(IngestParams(landing=str(landing), dataset="fleet", contract="cmapss", files_per_batch=1))
        assert first.rows_written + first.rows_quarantined == 1500 and first.rows_written > 1400
        assert again.rows_read == 0 and again.rows_written == 0  # the ledger in the lake has every file
        snap = first.snapshots["fleet"]
        assert snap.lake_path == root
        assert lk.read_lake(snap, storage_options=so).num_rows == first.rows_written
        keys = {p.rsplit("/", 1)[-1] for p in s3_filesystem(store).ls(root.removeprefix("s3://"), refresh=True)}
        assert {"_ledger.sqlite", "_ingest.lock", "fleet"} <= keys
    finally:
        store.stop()
