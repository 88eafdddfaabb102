"""Orchestration overhead: twinflow's flows (Prefect orchestrates, Dask computes) vs plain Dask, same cluster.

The same computation (``stages`` stages, each ``partitions`` NumPy partitions of real work) runs as:

* baseline ``plain dask``: ``client.map`` per stage from a script;
* ``twinflow flow (stage tasks in flow process)``: what twinflow's flows do: one Prefect task per stage
  on the thread-pool task runner, fanning its partitions out through :func:`twinflow.runtime.using_dask`;
* ``twinflow flow (stage tasks on workers)``: the same with :class:`twinflow.runtime.TwinflowTaskRunner`
  (each Prefect task run on a Dask worker), twinflow's design before issue 15, for reference;
* ``twinflow flow (task per partition)``: one in-process Prefect task per partition, for reference.

Also measured: the cost of one Prefect task run (a flow of ``n`` no-op tasks against an empty flow)
and, at the demo's real granularity, the ``features`` flow on C-MAPSS FD001 against the same stage
functions called from a script on the same cluster (``--no-features`` skips it). Candidates run
round-robin (:meth:`Bench.measure_rounds`). Targets: flow <= 1.10x plain Dask at ~1 s of work per
stage, <= 30 ms per Prefect task run.

Run: ``python -m benchmarks.orchestration [--quick] [--json benchmarks/results/<date>-orchestration.json]``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._harness import Bench, arg_parser


def work(seed: int, size: int) -> float:
    """One partition of real work: a sorted random block's trimmed mean (~tens of ms)."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.standard_normal(size))
    return float(x[size // 10 : -size // 10].mean())


def plain_dask(client, stages: int, partitions: int, size: int) -> float:
    total = 0.0
    for s in range(stages):
        futs = client.map(work, [s * partitions + i for i in range(partitions)], size=size, pure=False)
        total += sum(client.gather(futs))
    return total


def _features_candidates(rt, home: Path):
    """The features flow on FD001 and the same stage functions from a script, both recomputing."""
    from twinflow import lake
    from twinflow.flows.features import features, resolve_channels
    from twinflow.tasks import features as ft
    from twinflow.tasks.features import FeatureParams
    from twinflow.tasks.ingest import IngestParams, latest_snapshot, run_local

    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    from twinflow.data import cmapss_path

    shutil.copyfile(cmapss_path("train_FD001.txt.gz"), landing / "train_FD001.txt.gz")
    settings = rt.settings
    run_local(IngestParams(landing=str(landing)), settings.lake_path, settings.quarantine_path, "bench")
    snapshot = latest_snapshot(settings.lake_path, "train_fd001")
    params = FeatureParams()
    out_root = Path(settings.features_path)

    def script() -> int:
        groups = ft.list_lake_files(snapshot, None)
        available = ft.read_schema_columns(next(iter(groups.values()))[0][0], None)
        contract = lake.snapshot_contract(snapshot)
        channels = resolve_channels(available, params, contract)
        op_columns = [c for c in contract.settings if c in available]
        parts = ft.plan_partitions(groups, params.partition_bytes, min_partitions=4 * rt.cluster.n_workers)
        fit = ft.fit_statistics(parts, channels, op_columns, params)
        out = Path(tempfile.mkdtemp(prefix="feat-script-", dir=home))
        try:
            return sum(s["rows"] for s in ft.transform_and_write(parts, fit, params, "numpy", str(out),
                                                                   clock=contract.clock))
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def flow_run() -> int:
        shutil.rmtree(out_root, ignore_errors=True)  # a cache hit would measure nothing
        return features(snapshot, params).rows

    return script, flow_run, snapshot.rows


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--no-features", action="store_true", help="skip the features-stage comparison")
    p.add_argument("--size", type=int, default=None,
                   help="values per partition (work per stage scales with it; ~1 s/stage at 400000 with --quick "
                        "on 2 cores)")
    args = p.parse_args()
    stages, partitions, size = (4, 16, 200_000) if args.quick else (4, 64, 400_000)
    size = args.size or size
    noop_tasks = 20 if args.quick else 50

    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from twinflow import runtime
    from twinflow.settings import get_settings

    @task
    def stage_task(stage: int) -> float:
        with runtime.using_dask() as c:
            futs = c.map(work, [stage * partitions + i for i in range(partitions)], size=size, pure=False)
            return sum(c.gather(futs))

    def stages_body() -> float:
        return sum(stage_task.submit(s).result() for s in range(stages))

    in_process = flow(name="bench-stages-in-process", task_runner=ThreadPoolTaskRunner())(stages_body)
    on_workers = flow(name="bench-stages-on-workers", task_runner=runtime.TwinflowTaskRunner())(stages_body)

    @task
    def partition_task(seed: int) -> float:
        return runtime.run_on_cluster(work, seed, size, key="partition")

    @flow(name="bench-task-per-partition", task_runner=ThreadPoolTaskRunner())
    def fine() -> float:
        total = 0.0
        for s in range(stages):
            futs = [partition_task.submit(s * partitions + i) for i in range(partitions)]
            total += sum(f.result() for f in futs)
        return total

    @task
    def noop(i: int) -> int:
        return i

    @flow(name="bench-noop-tasks", task_runner=ThreadPoolTaskRunner())
    def noops(n: int) -> int:
        return sum(noop.submit(i).result() for i in range(n))

    home = Path(tempfile.mkdtemp(prefix="twinflow-bench-"))
    settings = get_settings(home=home, dask={"mode": "local"})
    with runtime.start(settings) as rt:
        client = rt.cluster.client
        bench = Bench("orchestration", baseline="plain dask", units=stages * partitions, unit_name="partitions")
        labels = {"plain dask": lambda: plain_dask(client, stages, partitions, size),
                  "twinflow flow (stage tasks in flow process)": in_process,
                  "twinflow flow (stage tasks on workers)": on_workers}
        outs = bench.measure_rounds(labels, repeat=args.repeat, warmup=1)
        assert all(np.isclose(outs["plain dask"], v) for v in outs.values()), outs
        got_fine = bench.measure("twinflow flow (task per partition)", fine, repeat=1)
        assert np.isclose(outs["plain dask"], got_fine)
        summary = bench.report(None)

        cost = Bench("prefect task run", baseline="empty flow", units=noop_tasks, unit_name="task runs")
        cost.measure_rounds({"empty flow": lambda: noops(0), f"flow of {noop_tasks} no-op tasks": lambda: noops(noop_tasks)},
                            repeat=args.repeat, warmup=1)
        cost_summary = cost.report(None)

        base = bench.results["plain dask"].best
        flow_t = bench.results["twinflow flow (stage tasks in flow process)"].best
        workers_t = bench.results["twinflow flow (stage tasks on workers)"].best
        fine_t = bench.results["twinflow flow (task per partition)"].best
        per_task = (cost.results[f"flow of {noop_tasks} no-op tasks"].best - cost.results["empty flow"].best) / noop_tasks
        figures = {
            "stage_seconds_plain": base / stages,
            "flow_over_plain": flow_t / base, "flow_over_plain_target": 1.10,
            "flow_on_workers_over_plain": workers_t / base,
            "flow_overhead_per_stage_ms": (flow_t - base) / stages * 1e3,
            "task_per_partition_overhead_ms": (fine_t - base) / (stages * partitions) * 1e3,
            "prefect_task_run_ms": per_task * 1e3, "prefect_task_run_ms_target": 30,
            "empty_flow_run_s": cost.results["empty flow"].best,
        }
        print(f"\nflow / plain dask = {figures['flow_over_plain']:.3f} (target <= 1.10; stage tasks on workers: "
              f"{figures['flow_on_workers_over_plain']:.3f}) at {figures['stage_seconds_plain']:.2f} s of work per stage")
        print(f"per Prefect task run: {figures['prefect_task_run_ms']:.1f} ms (target <= 30); "
              f"empty flow run {figures['empty_flow_run_s'] * 1e3:.0f} ms; "
              f"task per partition: {figures['task_per_partition_overhead_ms']:.1f} ms each")
        summary["figures"] = figures
        summary["task_run_cost"] = cost_summary

        if not args.no_features:
            script, flow_run, rows = _features_candidates(rt, home)
            feat = Bench("features stage at demo granularity (FD001)", baseline="stage functions from a script",
                         units=rows)
            outs = feat.measure_rounds({"stage functions from a script": script, "features flow": flow_run},
                                       repeat=args.repeat, warmup=1)
            assert outs["stage functions from a script"] == outs["features flow"], outs
            feat_summary = feat.report(None)
            ratio = feat.results["features flow"].best / feat.results["stage functions from a script"].best
            print(f"features flow / script = {ratio:.3f} on {rows:,} rows")
            feat_summary["flow_over_script"] = ratio
            summary["features_stage"] = feat_summary

        import psutil

        servers = [p for p in psutil.Process().children(recursive=True)
                   if "prefect" in " ".join(p.cmdline()) and "server" in " ".join(p.cmdline())]
        print(f"Prefect server processes for this command: {len(servers)} (workers: {rt.cluster.n_workers}); "
              f"cluster mode: {rt.cluster.mode}; load average {os.getloadavg()[0]:.2f}; pid {os.getpid()}")
        summary["load_average_end"] = os.getloadavg()[0]
        summary["mode"] = "quick" if args.quick else "full"
        if args.json:
            from benchmarks._harness import write_json

            write_json(args.json, summary)
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
