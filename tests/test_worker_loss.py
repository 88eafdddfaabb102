"""A Dask worker that disappears mid-run: the stage finishes on the survivors, nothing lost or doubled.

A separately started ``dask scheduler`` with two ``dask worker`` processes (as an operator runs them);
``twinflow run ingest`` in its own process connects by address. While an ``ingest-batch`` task is
running on worker ``w2``, that worker's process is killed (SIGKILL: no clean shutdown). Dask reschedules
the batch's Dask task on ``w1`` while its Prefect task run (in the flow's process) waits; the checks are what an operator relies on: the flow
run is COMPLETED in the Prefect API, every input row is in the lake exactly once, the ledger holds
every file once, and no temporary or staged file is left visible.
"""

from __future__ import annotations

import gzip
import os
import signal
import time
from pathlib import Path

import pytest
from service_procs import BINDIR, Procs, start_dask

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

N_FILES = 6
COPIES = 4  # FD001 train (20,631 rows) repeated with shifted unit ids: ~80k rows per file


def _landing(root: Path) -> int:
    """Write ``N_FILES`` C-MAPSS text files with disjoint units; return the number of rows."""
    from twinflow.data import cmapss_path

    lines = gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode().splitlines()
    rows = [line.split(None, 1) for line in lines if line.strip()]
    root.mkdir(parents=True)
    total = 0
    for k in range(N_FILES):
        out = []
        for c in range(COPIES):
            shift = (k * COPIES + c) * 1000
            out.extend(f"{int(unit) + shift} {rest}" for unit, rest in rows)
        (root / f"plant_{k}.txt").write_text("\n".join(out) + "\n")
        total += len(out)
    return total


def test_worker_killed_mid_ingest_loses_and_duplicates_nothing(prefect_server, tmp_path):
    import httpx
    from distributed import Client

    from twinflow.tasks.ingest import latest_snapshot, read_lake

    total = _landing(tmp_path / "landing")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TWINFLOW_", "MLFLOW_TRACKING"))}
    base.update({"PREFECT_API_URL": prefect_server.url, "PREFECT_HOME": str(tmp_path / "prefect"),
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"})
    home = tmp_path / "home"
    procs = Procs(tmp_path)
    try:
        # Workers get no Prefect settings: they run plain Dask tasks only.
        worker_env = {k: v for k, v in base.items() if not k.startswith("PREFECT_")}
        address, workers = start_dask(procs, tmp_path / "scheduler.json", base, worker_env)
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=90)
            w2_addr = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                           if w["id"] == "w2")

            env = {**base, "TWINFLOW_HOME": str(home), "TWINFLOW_DASK__MODE": "address",
                   "TWINFLOW_DASK__ADDRESS": address}
            run, run_log = procs.spawn("run", [str(BINDIR / "twinflow"), "run", "ingest", "--landing",
                                               str(tmp_path / "landing"), "-p", "dataset=plant",
                                               "-p", "files_per_batch=1"], env)
            # Kill w2 while it is running an ingest batch (not before: the point is a task in flight).
            killed_during = None
            deadline = time.monotonic() + 240
            while killed_during is None and run.poll() is None and time.monotonic() < deadline:
                keys = client.processing().get(w2_addr, [])
                batch = [k for k in keys if "ingest-batch" in str(k) or "process_batch" in str(k)]
                if batch:
                    time.sleep(0.3)  # let the task get into its reading/parsing
                    os.killpg(workers["w2"].pid, signal.SIGKILL)
                    killed_during = batch
                time.sleep(0.05)
            assert killed_during, ("w2 never ran an ingest batch before the run ended: "
                                   + run_log.read_text()[-2000:])
            rc = run.wait(timeout=400)
            log = run_log.read_text()
            assert rc == 0, log[-4000:]
            assert list(client.scheduler_info(n_workers=-1)["workers"]) != [w2_addr]  # w2 is gone

        # Every row in the lake exactly once.
        snapshot = latest_snapshot(str(home / "lake"), "plant")
        assert snapshot is not None and len(snapshot.files) == N_FILES and snapshot.rows == total
        table = read_lake(snapshot, columns=["asset_id", "cycle"])
        assert table.num_rows == total
        keys = table.group_by(["asset_id", "cycle"]).aggregate([([], "count_all")])
        assert keys.num_rows == total
        # Nothing temporary or staged is left visible.
        leftovers = [p for p in home.rglob("*") if p.is_file() and
                     (".tmp" in p.name or p.name.startswith(".") or "_staging" in p.parts)]
        assert leftovers == []
        # The flow run completed in the Prefect API, with a task run per file.
        flows = httpx.post(f"{prefect_server.url}/flow_runs/filter", timeout=10,
                           json={"flow_runs": {"tags": {"all_": []}},
                                 "sort": "START_TIME_DESC", "limit": 20}).json()
        mine = [f for f in flows if f["parameters"].get("params", {}).get("landing") == str(tmp_path / "landing")]
        assert len(mine) == 1 and mine[0]["state_type"] == "COMPLETED", [f["state_type"] for f in mine]
        trs = httpx.post(f"{prefect_server.url}/task_runs/filter", timeout=10,
                         json={"flow_runs": {"id": {"any_": [mine[0]["id"]]}}}).json()
        batches = [t for t in trs if t["name"].startswith("ingest-batch")]
        assert len(batches) == N_FILES and all(t["state_type"] == "COMPLETED" for t in batches), \
            [(t["name"], t["state_type"]) for t in batches]
    finally:
        procs.stop()
