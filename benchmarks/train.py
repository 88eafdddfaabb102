"""Benchmark of the train stage on C-MAPSS FD001: model quality and trial throughput on Dask.

The feature datasets come from the pipeline itself: in a temporary twinflow home the embedded
runtime (Prefect API, Dask LocalCluster, MLflow) is started and the pipeline flow runs its
``ingest`` and ``features`` stages over the bundled FD001 files, exactly as ``twinflow demo`` does
(default ``FeatureParams``: 331 feature columns; the test file is transformed with the training
fit). So the figures below are what a user of the pipeline gets, not those of hand-made features.

Part 1 (quality) trains each model with the stage's own search (``search_and_evaluate``, trials on
the runtime's Dask cluster) with the pipeline's train parameters (``demo_params``: defaults plus
``nan_policy="drop"`` and the true test RUL file), then scores it with the C-MAPSS test protocol
(each test unit's last cycle against the true RUL, capped at 125): RMSE and PHM08 score, next to
published FD001 figures (CNN 18.45, LSTM 16.14, DCNN 12.61 RMSE) and the issue's targets (CPU
default <= 14.0; PyTorch <= 12.0 on a GPU). ``--quick`` uses fewer trials/iterations.

Part 2 (throughput) runs one batch of gbm trials (fixed iterations, no early stop) on the
pipeline's train features three ways and reports trials/min: baseline "sequential trials
(in-process)", then as Dask tasks on a LocalCluster with 1 worker and with all workers (1 thread
each). Scaling = (all-worker rate / 1-worker rate) / workers; the issue asks for >= 0.7.

Run: ``python -m benchmarks.train [--quick] [--models gbm,cnn] [--skip-quality] [--skip-throughput]
[--workers N] [--repeat N] [--json out.json]``.

Figures measured 2026-11-25 on a 2-core VM shared with other engineers' jobs (no GPU, torch not
installed, so the cnn model and its GPU target were not run). Load averages (1/5/15 min) were read
with ``uptime`` before and after each run; times are inflated by that contention.

``--quick --models gbm`` (load 2.61 before, 5.27 after; 475 s wall):

    pipeline ingest+features: 20,631 train rows x 331 features, 13,096 test rows (22.6 s)
    twinflow gbm   RMSE 12.36  PHM08 238.6  (2 trials, max_iter 150, 228 s)
    sequential trials (in-process)  53.9 s; dask 1 worker 63.4 s; dask 2 workers 43.3 s
    trial throughput: 1 worker 3.8 trials/min, 2 workers 5.5 trials/min; scaling 0.73 x workers

``--skip-throughput --models gbm`` (the pipeline's defaults: 4 trials, max_iter 400, early stop
40; load 4.78 before, 5.67 after; 451 s wall):

    twinflow gbm   RMSE 12.25  PHM08 233.8  (4 trials, 390 s)   -> target <= 14.0 MET
    published CNN (Babu 2016) 18.45, LSTM (Zheng 2017) 16.14, DCNN (Li 2018) 12.61

This matches ``twinflow demo`` (RMSE 12.25, PHM08 234), as it should: same stages, same params.

``--skip-quality --repeat 1`` (8 trials x 120 iterations on 16,455 rows x 331 features; load 3.48
before, 3.43 after; 721 s wall; one repeat, as three would take ~35 min on this VM):

    sequential trials (in-process)  200.8 s  1.00x
    dask trials, 1 worker(s)        228.6 s  0.88x
    dask trials, 2 worker(s)        204.1 s  0.98x
    trial throughput: 1 worker 2.1 trials/min, 2 workers 2.4 trials/min; scaling 0.56 x workers

After the gbm trainer switched from warm-start steps (re-binning and re-predicting every 10
iterations) to scikit-learn's early stopping on our by-asset split as an explicit validation set
(commit "gbm: early-stop with scikit-learn's explicit validation set"), same day, quieter VM
(load 0.45 before, 1.47 after):

    ``--quick --models gbm``: twinflow gbm RMSE 12.36  PHM08 238.6  (2 trials, max_iter 150, 61.7 s
    against 228 s before); throughput (4 trials x 40 iterations): in-process 16.3 s, dask 1 worker
    23.8 s, 2 workers 17.1 s; 1 worker 10.1 trials/min, 2 workers 14.1 trials/min; scaling 0.70
    ``--skip-throughput --models gbm``: twinflow gbm RMSE 12.25  PHM08 233.8  (4 trials, max_iter
    400, 152.9 s against 390 s before; same model quality)

Targets: CPU default <= 14.0 RMSE met (12.25); PyTorch <= 12.0 on a GPU not checked (no GPU, no
torch here); scaling >= 0.7 met in the quick run (0.73) but missed in the full run (0.56). During
the 2-worker phase of the full run each worker process got ~45% of a core (``ps``) at load ~3.4 on
2 cores: the other jobs took the second core, so this VM cannot show 2x. The trials themselves are
submitted efficiently (the train/validation frames are scattered once; each trial is one Dask
task that receives only futures, its hyperparameters and small params), and the in-process
baseline and the workers both run 1 BLAS/OpenMP thread per trial (``limit_threads`` here, the
nanny's OMP_NUM_THREADS=1 there). The scaling must be re-measured on an idle multi-core machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks._harness import Bench, arg_parser

PUBLISHED = {"CNN (Babu 2016)": 18.45, "LSTM (Zheng 2017)": 16.14, "DCNN (Li 2018)": 12.61}
TARGETS = {"gbm": 14.0, "cnn": 12.0}
# --quick: fewer trials and iterations than the pipeline's defaults, for smoke runs only.
QUICK = {
    "gbm": dict(n_trials=2, max_iter=150),
    "cnn": dict(n_trials=1, max_iter=3, early_stopping_rounds=8, search_space={"channels": [32], "batch_size": [512]}),
}


def pipeline_features(settings):
    """Run the pipeline's ingest and features stages on FD001 (as ``twinflow demo`` does).

    Returns the train and test feature references and the pipeline's train parameters (those of
    ``demo_params``: ``nan_policy="drop"``, the true test RUL file).
    """
    from twinflow.flows.pipeline import demo_params, pipeline

    params = demo_params(settings, stages=["ingest", "features"])
    t0 = time.perf_counter()
    result = pipeline(params)
    f, tf = result.features, result.test_features
    print(f"pipeline ingest+features: {f.rows:,} train rows x {len(f.feature_columns)} features, "
          f"{tf.rows:,} test rows ({time.perf_counter() - t0:.1f} s)")
    return f, tf, params.train


def quality(models: list[str], quick: bool, client, train_ref, test_ref, base) -> list[dict]:
    """Train each model with the stage's search on the cluster; score it on the FD001 test protocol."""
    from twinflow.tasks.train import TrainParams, search_and_evaluate

    rows = []
    for name in models:
        params = TrainParams.model_validate({**base.model_dump(), "model": name, **(QUICK[name] if quick else {})})
        t0 = time.perf_counter()
        out = search_and_evaluate(train_ref, params, test_ref, target=None, client=client)
        m = out.eval_metrics
        rows.append({"model": name, "trials": params.n_trials, "max_iter": params.max_iter,
                     "fd001_test_rmse": m["rmse"], "phm08_score": m["score"], "mae": m["mae"],
                     "val_rmse": out.best.val_rmse, "best_iteration": out.best.best_iteration,
                     "target_rmse": TARGETS[name], "meets_target": m["rmse"] <= TARGETS[name],
                     "seconds": time.perf_counter() - t0, "device": getattr(out.best.model, "device", "cpu"),
                     "eval": out.eval_name})
    return rows


def throughput(quick: bool, repeat: int, n_workers: int, train_ref, nan_policy: str) -> Bench:
    """gbm trials/min on the pipeline's train features: in-process vs Dask, 1 worker vs all workers."""
    from distributed import Client, LocalCluster

    from twinflow.tasks.train import TrainParams, check_frame, read_feature_frame, search, spec_for, split_by_asset

    spec = spec_for(train_ref)
    frame = check_frame(read_feature_frame(train_ref), spec, nan_policy=nan_policy, min_assets=2)
    train, val = split_by_asset(frame, spec, 0.2)
    n_trials = 2 * n_workers if quick else 4 * n_workers
    # A fixed number of boosting iterations per trial: equal work in every configuration.
    params = TrainParams(n_trials=n_trials, max_iter=40 if quick else 120, early_stopping_rounds=10_000,
                         nan_policy=nan_policy, search_space={"learning_rate": [0.05], "max_leaf_nodes": [31]})
    print(f"throughput: {n_trials} gbm trials x {params.max_iter} iterations on {len(train):,} rows x "
          f"{len(spec.feature_columns)} features")
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

    from twinflow import runtime
    from twinflow.settings import get_settings

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
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="twinflow-bench-train-") as tmp:
        settings = get_settings(home=Path(tmp), dask={"n_workers": args.workers, "threads_per_worker": 1})
        with runtime.start(settings) as rt:
            train_ref, test_ref, base = pipeline_features(settings)
            rows = [] if args.skip_quality else quality(models, args.quick, rt.cluster.client,
                                                        train_ref, test_ref, base)
        if rows:
            print("\n== FD001 test protocol (last cycle per unit, true RUL capped at 125) ==")
            print(f"{'model':<24} {'RMSE':>7} {'PHM08 score':>12} {'target':>7} {'trials':>6} {'max_iter':>8} "
                  f"{'seconds':>8}  device")
            for r in rows:
                print(f"{'twinflow ' + r['model']:<24} {r['fd001_test_rmse']:>7.2f} {r['phm08_score']:>12.1f} "
                      f"{'<= ' + str(r['target_rmse']):>7} {r['trials']:>6} {r['max_iter']:>8} {r['seconds']:>8.1f}"
                      f"  {r['device']}{'' if r['meets_target'] else '  (target missed)'}")
            for name, rmse in PUBLISHED.items():
                print(f"{'published ' + name:<24} {rmse:>7.2f}")
            summary["quality"] = rows
        if not args.skip_throughput:
            bench = throughput(args.quick, 1 if args.quick else args.repeat, args.workers, train_ref, base.nan_policy)
            summary.update(bench.report())
            one = bench.results["dask trials, 1 worker(s)"].best
            alln = bench.results[f"dask trials, {args.workers} worker(s)"].best
            summary["scaling"] = scaling = one / alln / args.workers
            print(f"trial throughput: 1 worker {60 * bench.units / one:.1f} trials/min, {args.workers} workers "
                  f"{60 * bench.units / alln:.1f} trials/min; scaling {scaling:.2f} x workers (target >= 0.7)")
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
