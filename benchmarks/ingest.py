"""Ingest benchmark: twinflow's validated, idempotent ingest vs a bare pyarrow read + write loop.

Generates a landing folder of CSV and Parquet files (half each, disjoint assets per file, values inside
the contract's ranges) for each bundled fleet contract (``--fleet``): C-MAPSS-shaped (``asset_id``,
``cycle``, 24 channels) and pump-shaped (``machine``, an ISO ``ts`` every 10 minutes, 10 channels with
plant-unit headers such as ``casing_temp [degC]``), and measures, in the same run:

* ``pyarrow read + write_to_dataset`` (baseline): for each file, ``pyarrow.csv.read_csv`` or
  ``pyarrow.parquet.read_table``, then ``pyarrow.parquet.write_to_dataset(partition_cols=["asset_id"])``,
  sequentially, no validation, no ledger;
* ``twinflow ingest`` (first run, empty lake): the ``ingest`` flow on a local Dask cluster (2 workers)
  with a real Prefect server: hashing, parsing, validation, staging, atomic renames, ledger, artifacts;
* ``twinflow re-run`` (nothing new): the same flow again over the same landing folder;

then the peak RSS (this process plus its children: Dask workers and the Prefect server) of the first
run at two input sizes. Targets: first run >= 0.75x the baseline's throughput; re-run <= 2 % of the
first run's time; peak memory flat as the input doubles.

``--large-file N`` runs only the bounded-memory check of one large file: one CSV of N rows, then one of
2N rows (200 cycles per asset), each ingested by the in-process stage in a fresh Python process, read
whole (``stream_threshold_bytes`` above its size) and streamed (``--batch-rows``, default 100,000), and
reports each process's peak RSS (``VmHWM``) above its peak after imports. Read whole, the peak follows
the file; streamed, it stays flat as the file doubles.

``--lake s3`` runs only the object-store comparison: the in-process ingest stage (plan, parse, validate,
stage, commit, ledger) of the same landing into a local lake (baseline) and into an ``s3://`` lake on a
SeaweedFS S3 gateway this run starts on loopback (lease, ledger and data files in the bucket), round-robin;
the ratio is local time / S3 time (goal >= 0.5x), with the peak RSS of each at two sizes.

Run: ``python -m benchmarks.ingest [--quick] [--fleet cmapss|pumps|both] [--files N ...] [--lake local|s3]
[--json benchmarks/results/<date>-ingest.json]``. Figures of
recorded runs (machine, date, commit) are in ``benchmarks/results/``; earlier hand-recorded tables are in
this file's git history.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from benchmarks._harness import Bench, arg_parser
from twinflow.contract import FleetContract, load_contract


def _source_names(contract: FleetContract) -> tuple[str, str, list[str]]:
    """The header a plant's export of this fleet has: asset column, clock column, channel headers
    (the pump fleet's first alias, e.g. ``casing_temp [degC]``; C-MAPSS's lake names)."""
    chans = [c.aliases[0] if c.aliases and contract.clock.kind == "timestamp" else c.name for c in contract.channels]
    return contract.asset.column, contract.clock.column or contract.key, chans


def make_landing(root: Path, n_files: int, rows_per_file: int, assets_per_file: int = 10,
                 seed: int = 0, fleet: str = "cmapss") -> int:
    """Write ``n_files`` files (even: CSV with header, odd: Parquet) of the ``fleet`` contract's shape into
    ``root``; return the row count. Pump-shaped files are named ``pumps_*`` (the contract's routing)."""
    contract = load_contract(fleet)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    steps = rows_per_file // assets_per_file
    lo = np.array([c.low for c in contract.channels])
    hi = np.array([c.high for c in contract.channels])
    mid, spread = (lo + hi) / 2, (hi - lo) / 50
    asset_col, time_col, chans = _source_names(contract)
    prefix = "pumps_" if fleet == "pumps" else ""
    total = 0
    for k in range(n_files):
        n = steps * assets_per_file
        assets = np.repeat(np.arange(k * assets_per_file, (k + 1) * assets_per_file), steps)
        values = np.round(mid + spread * rng.standard_normal((n, len(chans))), 4)
        step = np.tile(np.arange(1, steps + 1), assets_per_file)
        if contract.clock.kind == "cycle":
            t = pa.array(step, pa.int32())
        else:  # every 10 minutes with up to a minute of jitter, from 2026-01-01 UTC
            us = np.datetime64("2026-01-01T00:00:00", "us").astype(np.int64) + step * 600_000_000 + \
                rng.integers(-60_000_000, 60_000_000, n)
            t = pa.array(us, pa.timestamp("us", tz="UTC"))
        cols = {asset_col: pa.array(assets.astype(str)), time_col: t}
        cols |= {c: pa.array(values[:, j]) for j, c in enumerate(chans)}
        table = pa.table(cols)
        if k % 2 == 0:
            pacsv.write_csv(table, root / f"{prefix}part{k:04d}.csv")
        else:
            pq.write_table(table, root / f"{prefix}part{k:04d}.parquet")
        total += n
    return total


def baseline(landing: Path, out: Path) -> int:
    """The bare loop: read each file with pyarrow (timestamps parsed by its CSV reader), write it
    hive-partitioned by asset."""
    shutil.rmtree(out, ignore_errors=True)
    rows = 0
    for path in sorted(landing.iterdir()):
        if path.suffix == ".csv":
            with path.open() as fh:
                asset = "machine" if "machine" in fh.readline().split(",") else "asset_id"
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={asset: pa.string()}))
        else:
            table = pq.read_table(path)
        asset = "machine" if "machine" in table.column_names else "asset_id"
        pq.write_to_dataset(table, out, partition_cols=[asset])
        rows += table.num_rows
    return rows


def in_process(params, lake: Path, quarantine: Path) -> int:
    """The ingest stage's own work (plan, parse, validate, stage, commit) sequentially in this process."""
    from twinflow.tasks.ingest import run_local

    shutil.rmtree(lake, ignore_errors=True)
    shutil.rmtree(quarantine, ignore_errors=True)
    return sum(o.rows_written for o in run_local(params, str(lake), str(quarantine), "local"))


_CHILD = """
import json, sys, time
from twinflow.tasks.ingest import IngestParams, run_local

def hwm_mb():  # peak RSS of this process (VmHWM starts afresh at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

landing, lake, quarantine, threshold, batch_rows = sys.argv[1:6]
base = hwm_mb()
t = time.perf_counter()
params = IngestParams(landing=landing, dataset="big", stream_threshold_bytes=int(threshold), batch_rows=int(batch_rows))
(o,) = run_local(params, lake, quarantine, "big")
print(json.dumps({"s": time.perf_counter() - t, "rows": o.rows_written, "status": o.status,
                  "import_mb": base, "peak_mb": hwm_mb()}))
"""


def large_file(rows_list: list[int], batch_rows: int) -> None:
    """Peak RSS of the in-process stage on ONE CSV file of each size, read whole and streamed.

    Each run is a fresh Python process (its ``VmHWM`` is the peak of that run alone, with nothing
    freed-but-kept from an earlier run); ``import_mb`` is its peak after importing twinflow, before any work.
    Linux only (``/proc/self/status``).
    """
    import json
    import subprocess
    import sys

    work = Path(tempfile.mkdtemp(prefix="twinflow-bench-ingest-large-"))
    try:
        print(f"{'rows':>10} {'file MB':>8} {'mode':<26} {'s':>7} {'import MB':>10} {'peak RSS MB':>12} "
              f"{'above import':>13}")
        for rows in rows_list:
            landing = work / f"landing-{rows}"
            make_landing(landing, 1, rows, assets_per_file=max(rows // 200, 1))  # one CSV, 200 cycles per asset
            size = sum(p.stat().st_size for p in landing.iterdir())
            for mode, threshold in (("whole file", 1 << 40), (f"streamed, {batch_rows:,} rows/batch", 1)):
                shutil.rmtree(work / "lake", ignore_errors=True)
                shutil.rmtree(work / "q", ignore_errors=True)
                out = subprocess.run([sys.executable, "-c", _CHILD, str(landing), str(work / "lake"),
                                      str(work / "q"), str(threshold), str(batch_rows)],
                                     check=True, capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                assert r["status"] == "ingested" and r["rows"] == rows, r
                print(f"{rows:>10,} {size / 2**20:>8.0f} {mode:<26} {r['s']:>7.1f} {r['import_mb']:>10.0f} "
                      f"{r['peak_mb']:>12.0f} {r['peak_mb'] - r['import_mb']:>13.0f}")
            shutil.rmtree(landing, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def s3_lake(args) -> None:
    """The same in-process ingest into a local lake and into an S3 lake, round-robin (``--lake s3``)."""
    import uuid

    from benchmarks._harness import start_s3
    from twinflow import lake as lk
    from twinflow.tasks.ingest import IngestParams, run_local

    sizes = [(10, 25_000), (10, 50_000)] if args.quick else [(n, 125_000) for n in (args.files or [20, 40])]
    fleets = ["cmapss", "pumps"] if args.fleet == "both" else [args.fleet]
    work = Path(tempfile.mkdtemp(prefix="twinflow-bench-ingest-s3-"))
    store = start_s3(work / "seaweedfs")
    try:
        so = store.options()
        for fleet, (n_files, rows_per_file) in [(f, s) for f in fleets for s in sizes]:
            landing = work / f"landing-{fleet}-{n_files}x{rows_per_file}"
            rows = make_landing(landing, n_files, rows_per_file, fleet=fleet)
            params = IngestParams(landing=str(landing), dataset=f"bench-{fleet}", contract=fleet)

            def on_s3() -> int:
                # A fresh prefix per round: an empty lake, as the local candidate's.
                root = store.url(f"lake-{uuid.uuid4().hex[:8]}")
                # Staging and the quarantine on the store too, as an s3:// lake has them by default.
                out = run_local(params.model_copy(update={"storage_options": so}), root,
                                lk.default_quarantine(root), "s3")
                written = sum(o.rows_written for o in out)
                assert written == rows, (written, rows)
                return written

            bench = Bench(f"ingest {fleet} into an S3 lake ({rows:,} rows in {n_files} files, CSV+Parquet)",
                          baseline="local lake (in-process ingest)", units=rows)
            bench.measure_rounds({
                "local lake (in-process ingest)": lambda: in_process(params, work / "lake-local", work / "q-local"),
                "S3 lake, SeaweedFS loopback (in-process)": on_s3,
            }, repeat=args.repeat)
            bench.report(args.json.replace(".json", f"-{fleet}-{rows}.json") if args.json else None)
            print(f"S3 / local lake throughput: {bench.ratio('S3 lake, SeaweedFS loopback (in-process)'):.2f}x "
                  "(goal >= 0.5x)")
            shutil.rmtree(landing, ignore_errors=True)
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--large-file", type=int, default=None, metavar="N",
                        help="only the bounded-memory check: one CSV of N rows, then one of 2N rows, ingested "
                             "in-process read whole and streamed (peak RSS of a fresh process each)")
    parser.add_argument("--batch-rows", type=int, default=100_000, help="batch_rows of the streamed runs")
    parser.add_argument("--fleet", choices=["cmapss", "pumps", "both"], default="both",
                        help="which bundled contract's file shape to ingest (default: both, one after the other)")
    parser.add_argument("--files", type=int, nargs="+", default=None,
                        help="file counts of 125,000 rows to run (default: 20 and 40)")
    parser.add_argument("--lake", choices=["local", "s3"], default="local",
                        help="s3: only the in-process ingest into an S3 lake (SeaweedFS on loopback) against "
                             "a local lake")
    args = parser.parse_args()
    if args.large_file:
        large_file([args.large_file, 2 * args.large_file], args.batch_rows)
        return
    if args.lake == "s3":
        s3_lake(args)
        return
    from twinflow import runtime
    from twinflow.flows.ingest import IngestParams, ingest
    from twinflow.settings import get_settings

    sizes = [(10, 25_000), (10, 50_000)] if args.quick else [(n, 125_000) for n in (args.files or [20, 40])]
    fleets = ["cmapss", "pumps"] if args.fleet == "both" else [args.fleet]
    work = Path(tempfile.mkdtemp(prefix="twinflow-bench-ingest-"))
    settings = get_settings(home=work / "home", dask={"mode": "local", "n_workers": 2, "threads_per_worker": 1})
    lake = Path(settings.lake_path)
    quarantine = Path(settings.quarantine_path)
    try:
        with runtime.start(settings):
            # Import twinflow/pyarrow on the Dask workers once, outside the timings (a cold start is
            # a fixed cost, not throughput).
            warm = work / "landing-warmup"
            make_landing(warm, 2, 2_000)
            ingest(IngestParams(landing=str(warm), dataset="warmup"))
            shutil.rmtree(warm, ignore_errors=True)
            peaks = {}
            for fleet, (n_files, rows_per_file) in [(f, s) for f in fleets for s in sizes]:
                landing = work / f"landing-{fleet}-{n_files}x{rows_per_file}"
                rows = make_landing(landing, n_files, rows_per_file, fleet=fleet)
                params = IngestParams(landing=str(landing), dataset=f"bench-{fleet}", files_per_batch=2,
                                      contract=fleet)

                def first_run() -> object:
                    shutil.rmtree(lake, ignore_errors=True)
                    shutil.rmtree(quarantine, ignore_errors=True)
                    result = ingest(params)
                    assert result.rows_written == rows and result.rows_quarantined == 0
                    return result

                bench = Bench(f"ingest {fleet} ({rows:,} rows in {n_files} files, CSV+Parquet)",
                              baseline="pyarrow read + write_to_dataset", units=rows)
                # Round-robin, so that load on a shared machine falls on every candidate alike. The
                # in-process stage is the same plan/parse/validate/commit without Prefect and Dask: the
                # cost of the stage itself, so that orchestration overhead is visible.
                bench.measure_rounds({
                    "pyarrow read + write_to_dataset": lambda: baseline(landing, work / "baseline"),
                    "twinflow ingest (first run)": first_run,
                    "twinflow stage in-process (no Prefect/Dask)":
                        lambda: in_process(params, work / "lake-local", work / "q-local"),
                }, repeat=args.repeat)
                bench.measure("twinflow re-run (nothing new)", lambda: ingest(params), repeat=args.repeat)
                bench.report(args.json)
                first = bench.results["twinflow ingest (first run)"]
                rerun = bench.results["twinflow re-run (nothing new)"]
                print(f"re-run / first run time: {rerun.best / first.best:.1%} (target <= 2%)")
                print(f"first run throughput vs baseline: {bench.ratio('twinflow ingest (first run)'):.2f}x "
                      "(target >= 0.75x)")
                peaks[f"{fleet} {rows:,} rows"] = first.peak_rss_mb
                shutil.rmtree(landing, ignore_errors=True)
            print("peak RSS of the first run (process + Dask workers + Prefect server): " +
                  ", ".join(f"{r}: {mb:,.0f} MB" for r, mb in peaks.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
