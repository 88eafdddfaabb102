"""Orchestration overhead: twinflow's flow + task runner vs a plain Dask script, same cluster.

The same computation (``stages`` stages, each ``partitions`` NumPy partitions of real work) runs:

* baseline ``plain dask``: ``client.map`` per stage from a script;
* ``twinflow flow``: a Prefect flow whose stage tasks run on the Dask workers through
  :class:`twinflow.runtime.TwinflowTaskRunner` and fan their partitions out with
  :func:`twinflow.runtime.dask_client` — the pipeline's real task granularity (coarse Prefect tasks,
  fine-grained Dask tasks);
* ``twinflow fine-grained``: one Prefect task per partition (the anti-pattern), for reference.

Printed: ratio (baseline time / time; the issue's b/a is its inverse), per-Prefect-task-run overhead
in ms, and the number of Prefect server processes (must be 1: started once per command, not per worker).

Run: ``python -m benchmarks.orchestration [--quick]``.

Measured on the 2-core dev machine, 2026-11-25, quiet (load ~1), LocalCluster 2 workers x 1 thread:

    full (4 stages x 64 partitions x 400k, ~1 s of work per stage), --repeat 2:
      plain dask                         4.09 s   1.00x
      twinflow flow (coarse tasks)       6.20 s   0.66x   -> b/a = 1.51 (target <= 1.25: NOT met at 1 s/stage)
      twinflow flow (task per partition) 66.7 s   0.06x
      overhead per Prefect task run: coarse 526 ms (incl. the flow run's own start-up), per-partition 244 ms
      Prefect server processes for the command: 1
    --quick (4 x 16 x 200k, ~0.15 s/stage): b/a = 4.94; coarse 634 ms, per-partition 244 ms.

Same machine, idle, 2026-11-25 (later), ``--repeat 2``, after in-process flows stopped waiting for
Prefect's heartbeat thread (~1 s per flow run) and loopback API clients got a one-certificate CA
file (``runtime._loopback_ca_file``)::

      plain dask                         3.54 s   1.00x
      twinflow flow (coarse tasks)       5.15 s   0.69x   -> b/a = 1.45 (target <= 1.25: still NOT met)
      twinflow flow (task per partition) 49.6 s   0.07x   (was 66.7 s: 244 -> 180 ms per task run)

Where a task run's time goes on a worker (py-spy of a no-op task, 365 ms per task run before the
CA file, 220 ms after): each Prefect client parsed the system CA bundle into an ``SSLContext`` (two
per task run, ~130 ms, even for an ``http://`` API; Prefect PR #19106 would let clients share one),
and ``hydrated_context`` rebuilds the whole pydantic ``Settings`` from the serialized context
(~200 ms, every settings source re-read); the task engine's API calls are a few ms each. The
coarse flow's remaining gap is those four task runs plus the flow run's own start (creating the run,
connecting the task runner's Dask client).

The fixed cost is ~2 s per flow (flow run + 4 task runs on workers); the demo's real stages take 4-60 s
each, where that is <= ~10%, but this benchmark has not yet been run at that granularity.
"""

from __future__ import annotations

import os
import tempfile

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


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    stages, partitions, size = (4, 16, 200_000) if args.quick else (4, 64, 400_000)

    from prefect import flow, task

    from twinflow import runtime
    from twinflow.settings import get_settings

    @task
    def stage_task(stage: int) -> float:
        with runtime.using_dask() as c:
            futs = c.map(work, [stage * partitions + i for i in range(partitions)], size=size, pure=False)
            return sum(c.gather(futs))

    @flow(task_runner=runtime.TwinflowTaskRunner())
    def coarse() -> float:
        total = 0.0
        for s in range(stages):
            total += stage_task.submit(s).result()
        return total

    @task
    def partition_task(seed: int) -> float:
        return work(seed, size)

    @flow(task_runner=runtime.TwinflowTaskRunner())
    def fine() -> float:
        total = 0.0
        for s in range(stages):
            futs = [partition_task.submit(s * partitions + i) for i in range(partitions)]
            total += sum(f.result() for f in futs)
        return total

    home = tempfile.mkdtemp(prefix="twinflow-bench-")
    settings = get_settings(home=home, dask={"mode": "local"})
    with runtime.start(settings) as rt:
        client = rt.cluster.client
        bench = Bench("orchestration", baseline="plain dask", units=stages * partitions, unit_name="partitions")
        ref = bench.measure("plain dask", lambda: plain_dask(client, stages, partitions, size),
                            repeat=args.repeat, warmup=1)
        got = bench.measure("twinflow flow (coarse tasks)", coarse, repeat=args.repeat, warmup=1)
        assert np.isclose(ref, got), (ref, got)
        got_fine = bench.measure("twinflow flow (task per partition)", fine, repeat=max(1, args.repeat - 1))
        assert np.isclose(ref, got_fine), (ref, got_fine)
        summary = bench.report(args.json)

        import psutil

        servers = [p for p in psutil.Process().children(recursive=True)
                   if "prefect" in " ".join(p.cmdline()) and "server" in " ".join(p.cmdline())]
        base = bench.results["plain dask"].best
        coarse_t = bench.results["twinflow flow (coarse tasks)"].best
        fine_t = bench.results["twinflow flow (task per partition)"].best
        print(f"\nb/a (twinflow coarse / plain dask) = {coarse_t / base:.2f}  (target <= 1.25)")
        print(f"per Prefect task run: coarse {(coarse_t - base) / stages * 1e3:.0f} ms, "
              f"task-per-partition {(fine_t - base) / (stages * partitions) * 1e3:.0f} ms")
        print(f"Prefect server processes for this command: {len(servers)} (workers: {rt.cluster.n_workers}); "
              f"cluster mode: {rt.cluster.mode}; pid {os.getpid()}")
        summary["b_over_a"] = coarse_t / base


if __name__ == "__main__":
    main()
