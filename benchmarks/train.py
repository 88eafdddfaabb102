"""Benchmark of the train stage on C-MAPSS FD001: model quality and trial throughput on Dask.

Part 1 (quality) trains each model with the stage's own search (trials on a Dask LocalCluster),
then scores it with the C-MAPSS test protocol (each test unit's last cycle against the true RUL,
capped at 125): RMSE and PHM08 score, next to published FD001 figures (CNN 18.45, LSTM 16.14,
DCNN 12.61 RMSE) and the issue's targets (CPU default <= 14.0; PyTorch <= 12.0 on a GPU).

Part 2 (throughput) runs the same batch of gbm trials three ways and reports trials/min:
baseline "sequential trials (in-process)", then as Dask tasks on a LocalCluster with 1 worker and
with all workers (1 thread each). Scaling = (all-worker rate / 1-worker rate) / workers; the issue
asks for >= 0.7.

The features are built here (per-asset rolling means/std over 10 and 30 cycles of the 14
informative sensors, plus the cycle count), so that this benchmark does not depend on the
features stage's defaults.

Run: ``python -m benchmarks.train [--quick] [--models gbm,cnn] [--json out.json]``.

Figures, ``--quick`` (2-core VM shared with other jobs, load average 15-30 during the run, no GPU;
times are dominated by that contention and are NOT representative of the code's speed):

    == benchmark: train trials (baseline: sequential trials (in-process)) ==
    candidate                          best s   ratio
    sequential trials (in-process)    285.584   1.00x
    dask trials, 1 worker(s)          107.406   2.66x
    dask trials, 2 worker(s)           96.791   2.95x
    trial throughput: 1 worker 2.2 trials/min, 2 workers 2.5 trials/min; scaling 0.55 x workers

    == FD001 test protocol (last cycle per unit, true RUL capped at 125) ==
    twinflow gbm   RMSE 16.75  PHM08 511.7  (2 trials, <= 150 iterations; target 14.0 missed)
    twinflow cnn   RMSE 16.22  PHM08 363.7  (1 trial, 3 epochs on CPU; GPU target 12.0 not run)
    published CNN 18.45, LSTM 16.14, DCNN 12.61

Full size, gbm only (``--skip-throughput --models gbm``: 8 trials, <= 600 iterations, same VM):

    twinflow gbm   RMSE 16.05  PHM08 434.4  (8 trials, 2378 s under contention; target 14.0 missed)

The scaling figure (0.55) is below the issue's 0.7 on this machine, where the two workers compete
with ~15 other processes for 2 cores; it must be re-measured on an idle multi-core machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._harness import Bench, arg_parser

COLUMNS = ["unit", "cycle", "op1", "op2", "op3", *[f"s{i}" for i in range(1, 22)]]
SENSORS = ["s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21"]
PUBLISHED = {"CNN (Babu 2016)": 18.45, "LSTM (Zheng 2017)": 16.14, "DCNN (Li 2018)": 12.61}
TARGETS = {"gbm": 14.0, "cnn": 12.0}


def fd001_features(split: str, rul_cap: float = 125.0) -> pd.DataFrame:
    """FD001 window features: rolling mean/std (10, 30 cycles) per sensor, cycle count, capped RUL."""
    from twinflow.data import cmapss_path

    raw = pd.read_csv(cmapss_path(f"{split}_FD001.txt.gz"), sep=r"\s+", header=None, names=COLUMNS)
    out = {"asset_id": "FD001-" + raw.unit.astype(str), "cycle": raw.cycle.astype("int64"),
           "cycle_f": raw.cycle.astype("float64")}
    g = raw.groupby("unit")
    for s in SENSORS:
        out[s] = raw[s].astype("float64")
        for w in (10, 30):
            out[f"{s}_mean{w}"] = g[s].transform(lambda v, w=w: v.rolling(w, min_periods=1).mean())
        out[f"{s}_std10"] = g[s].transform(lambda v: v.rolling(10, min_periods=2).std()).fillna(0.0)
    df = pd.DataFrame(out)
    if split == "train":
        df["rul"] = np.minimum(g["cycle"].transform("max") - raw["cycle"], rul_cap).astype("float64")
    return df


def write_ref(df: pd.DataFrame, out: Path, label: str | None):
    """Write a feature frame as Parquet and reference it like the features stage does."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from twinflow.data import cmapss_path
    from twinflow.refs import FeatureSetRef, FileRef, LakeSnapshot

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out / "part-0.parquet")
    raw = cmapss_path("train_FD001.txt.gz")
    snap = LakeSnapshot(lake_path=str(out.parent / "lake"), dataset="cmapss-fd001", batch_id="bench",
                        files=[FileRef(path=str(raw), sha256=hashlib.sha256(raw.read_bytes()).hexdigest())])
    feats = [c for c in df.columns if c not in ("asset_id", "cycle", "rul")]
    return FeatureSetRef(path=str(out), snapshot=snap, feature_columns=feats, label_column=label, rows=len(df))


def quality(models: list[str], quick: bool, client, tmp: Path) -> list[dict]:
    """Train each model with its search on the cluster and score it on the FD001 test protocol."""
    from twinflow.data import cmapss_path
    from twinflow.tasks.train import TrainParams, search_and_evaluate

    train_ref = write_ref(fd001_features("train"), tmp / "train", "rul")
    test_ref = write_ref(fd001_features("test"), tmp / "test", None)
    rul = str(cmapss_path("RUL_FD001.txt.gz"))
    settings = {
        "gbm": dict(n_trials=2 if quick else 8, max_iter=150 if quick else 600, early_stopping_rounds=50),
        "cnn": dict(n_trials=1 if quick else 2, max_iter=3 if quick else 40, early_stopping_rounds=8,
                    search_space={"channels": [32], "batch_size": [512]}),
    }
    rows = []
    for name in models:
        params = TrainParams(model=name, true_rul_path=rul, **settings[name])
        t0 = time.perf_counter()
        out = search_and_evaluate(train_ref, params, test_ref, target=None, client=client)
        m = out.eval_metrics
        rows.append({"model": name, "trials": params.n_trials, "fd001_test_rmse": m["rmse"],
                     "phm08_score": m["score"], "mae": m["mae"], "val_rmse": out.best.val_rmse,
                     "best_iteration": out.best.best_iteration, "target_rmse": TARGETS[name],
                     "meets_target": m["rmse"] <= TARGETS[name], "seconds": time.perf_counter() - t0,
                     "device": getattr(out.best.model, "device", "cpu")})
    return rows


def throughput(quick: bool, repeat: int, n_workers: int, tmp: Path) -> Bench:
    """gbm trials/min: sequential in-process vs Dask with 1 worker vs all workers."""
    from distributed import Client, LocalCluster

    from twinflow.tasks.train import DataSpec, TrainParams, search, split_by_asset

    df = fd001_features("train")
    spec = DataSpec(tuple(c for c in df.columns if c not in ("asset_id", "cycle", "rul")), "rul")
    train, val = split_by_asset(df, spec, 0.2)
    n_trials = 2 * n_workers if quick else 4 * n_workers
    # A fixed number of boosting iterations per trial: equal work in every configuration.
    params = TrainParams(n_trials=n_trials, max_iter=40 if quick else 120, early_stopping_rounds=10_000,
                         search_space={"learning_rate": [0.05], "max_leaf_nodes": [31]})
    bench = Bench("train trials", baseline="sequential trials (in-process)", units=n_trials, unit_name="trials")
    bench.measure("sequential trials (in-process)", lambda: search(train, val, spec, params), repeat=repeat)
    for workers in sorted({1, n_workers}):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
                Client(cl) as client:
            client.run(lambda: __import__("twinflow.tasks.train"))  # imports are not part of a trial
            bench.measure(f"dask trials, {workers} worker(s)", lambda: search(train, val, spec, params, None, client),
                          repeat=repeat)
    return bench


def main(argv: list[str] | None = None) -> None:
    import importlib.util
    import os

    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="gbm,cnn", help="comma-separated trainers for the quality part")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if "cnn" in models and importlib.util.find_spec("torch") is None:
        print("torch not installed: skipping the cnn model (pip install 'twinflow[torch]')")
        models.remove("cnn")
    with tempfile.TemporaryDirectory(prefix="twinflow-bench-train-") as tmp:
        tmp = Path(tmp)
        summary: dict = {}
        scaling = None
        if not args.skip_throughput:
            bench = throughput(args.quick, args.repeat if not args.quick else 1, args.workers, tmp)
            summary = bench.report(args.json)
            one = bench.results["dask trials, 1 worker(s)"].best
            alln = bench.results[f"dask trials, {args.workers} worker(s)"].best
            scaling = one / alln / args.workers
            print(f"trial throughput: 1 worker {60 * bench.units / one:.1f} trials/min, {args.workers} workers "
                  f"{60 * bench.units / alln:.1f} trials/min; scaling {scaling:.2f} x workers (target >= 0.7)")
        if args.skip_quality:
            return
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cl, Client(cl) as client:
            rows = quality(models, args.quick, client, tmp)
        print("\n== FD001 test protocol (last cycle per unit, true RUL capped at 125) ==")
        print(f"{'model':<24} {'RMSE':>7} {'PHM08 score':>12} {'target':>7} {'trials':>6} {'seconds':>8}  device")
        for r in rows:
            print(f"{'twinflow ' + r['model']:<24} {r['fd001_test_rmse']:>7.2f} {r['phm08_score']:>12.1f} "
                  f"{'<= ' + str(r['target_rmse']):>7} {r['trials']:>6} {r['seconds']:>8.1f}  {r['device']}"
                  f"{'' if r['meets_target'] else '  (target missed)'}")
        for name, rmse in PUBLISHED.items():
            print(f"{'published ' + name:<24} {rmse:>7.2f}")
        summary["quality"] = rows
        summary["scaling"] = scaling
        if args.json:
            import json

            with open(args.json, "w") as fh:
                json.dump(summary, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
