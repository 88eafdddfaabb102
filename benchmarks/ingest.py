"""Ingest benchmark: twinflow's validated, idempotent ingest vs a bare pyarrow read + write loop.

Generates a landing folder of CSV and Parquet files (half each, disjoint assets per file, values inside
the contract's ranges) and measures, in the same run:

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

Run: ``python -m benchmarks.ingest [--quick] [--json benchmarks/results/<date>-ingest.json]``. Figures of
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
from twinflow import contracts as C


def make_landing(root: Path, n_files: int, rows_per_file: int, assets_per_file: int = 10,
                 seed: int = 0) -> int:
    """Write ``n_files`` files (even: CSV with header, odd: Parquet) into ``root``; return the row count."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    cycles = rows_per_file // assets_per_file
    mid = np.array([(C.CHANNEL_SPECS[c].low + C.CHANNEL_SPECS[c].high) / 2 for c in C.CHANNELS])
    spread = np.array([(C.CHANNEL_SPECS[c].high - C.CHANNEL_SPECS[c].low) / 50 for c in C.CHANNELS])
    total = 0
    for k in range(n_files):
        n = cycles * assets_per_file
        assets = np.repeat(np.arange(k * assets_per_file, (k + 1) * assets_per_file), cycles)
        values = np.round(mid + spread * rng.standard_normal((n, len(C.CHANNELS))), 4)
        cols = {C.ASSET: pa.array(assets.astype(str)), C.TIME: pa.array(np.tile(np.arange(1, cycles + 1), assets_per_file), pa.int32())}
        cols |= {c: pa.array(values[:, j]) for j, c in enumerate(C.CHANNELS)}
        table = pa.table(cols)
        if k % 2 == 0:
            pacsv.write_csv(table, root / f"part{k:04d}.csv")
        else:
            pq.write_table(table, root / f"part{k:04d}.parquet")
        total += n
    return total


def baseline(landing: Path, out: Path) -> int:
    """The bare loop: read each file with pyarrow, write it hive-partitioned by asset."""
    shutil.rmtree(out, ignore_errors=True)
    rows = 0
    for path in sorted(landing.iterdir()):
        if path.suffix == ".csv":
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={C.ASSET: pa.string()}))
        else:
            table = pq.read_table(path)
        pq.write_to_dataset(table, out, partition_cols=[C.ASSET])
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


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--large-file", type=int, default=None, metavar="N",
                        help="only the bounded-memory check: one CSV of N rows, then one of 2N rows, ingested "
                             "in-process read whole and streamed (peak RSS of a fresh process each)")
    parser.add_argument("--batch-rows", type=int, default=100_000, help="batch_rows of the streamed runs")
    args = parser.parse_args()
    if args.large_file:
        large_file([args.large_file, 2 * args.large_file], args.batch_rows)
        return
    from twinflow import runtime
    from twinflow.flows.ingest import IngestParams, ingest
    from twinflow.settings import get_settings

    sizes = [(10, 25_000), (10, 50_000)] if args.quick else [(20, 125_000), (40, 125_000)]
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
            for n_files, rows_per_file in sizes:
                landing = work / f"landing-{n_files}x{rows_per_file}"
                rows = make_landing(landing, n_files, rows_per_file)
                params = IngestParams(landing=str(landing), dataset="bench", files_per_batch=2)

                def first_run() -> object:
                    shutil.rmtree(lake, ignore_errors=True)
                    shutil.rmtree(quarantine, ignore_errors=True)
                    result = ingest(params)
                    assert result.rows_written == rows and result.rows_quarantined == 0
                    return result

                bench = Bench(f"ingest ({rows:,} rows in {n_files} files, CSV+Parquet)",
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
                peaks[rows] = first.peak_rss_mb
                shutil.rmtree(landing, ignore_errors=True)
            print("peak RSS of the first run (process + Dask workers + Prefect server): " +
                  ", ".join(f"{r:,} rows: {mb:,.0f} MB" for r, mb in peaks.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
