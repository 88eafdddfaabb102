"""Benchmark of the digital twin: policy Monte-Carlo kernels and the synthetic fleet generator.

Policy kernel, in (policy x scenario x asset)-steps per second ("asset-steps/s"):
  (a) baseline: ``simulate_loop``, a straightforward per-asset Python loop over cycles (one policy
      at a time, each policy kind measured);
  (b) ``simulate_batch``, the vectorised NumPy kernel in one process, and (b') the same on a Dask
      LocalCluster with one single-threaded worker per core (``run_batches``);
  (c) ``simulate_batch_fused``, the fused CuPy kernel, when CuPy and a GPU are present, up to
      >= 1e10 asset-steps, also as a fraction of the card's FP32 peak (asset-steps per FP32 FLOP).
Generator, rows/s: a per-asset loop (one ``generate_fleet`` call per asset) vs the vectorised
generator in chunks of 5000 assets, and a 10 M-row fleet on the Dask cluster (full run only).

Run: ``python -m benchmarks.simulate [--quick]``. The harness's ``ratio`` column compares times of
calls with different amounts of work, so the throughput ratios b/a, b'/b and c/b are printed below it.

Figures, 2-core shared VM without GPU, measured 2026-11-25 while other sessions' test runs kept the
load average at 15-34, so absolute rates are low and noisy (ratios are from the same run):

``--quick --repeat 1`` (load ~20):
  (a) loop 119,516 asset-steps/s; (b) NumPy kernel 6,631,670/s -> b/a = 55.5x;
  (b') Dask 2 workers 4,094,847/s -> b'/b = 0.62x (both cores already saturated by other work);
  generator: per-asset loop 20,158 rows/s, vectorised 220,740 rows/s (11.0x).
full, ``--repeat 2`` (load 25-34):
  (a) loop 84,433 asset-steps/s (3 policy kinds x 4 scenarios x 25 assets x 1000 cycles);
  (b) NumPy kernel 5,313,164/s (11 policies x 40 x 100 x 1000) -> b/a = 62.9x;
  (b') Dask 2 workers 2,788,040/s -> b'/b = 0.52x;
  generator: per-asset loop 23,553 rows/s, vectorised 333,171 rows/s (14.1x);
  10 M-row fleet (50,000 assets, 10,382,757 rows) on Dask with 2 workers: 98 s.
Earlier, at load ~5: NumPy kernel 21.5 M asset-steps/s vs loop 0.23-0.41 M/s (52-93x).
(c) GPU: not measured, no GPU in this environment. The fused kernel's logic is checked on the CPU
by compiling its CUDA source as C++ (tests/tasks/test_twin_tasks.py, ``..._on_cpu``); the device
checks are in tests/tasks/test_twin_gpu.py (skipped here).
"""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks._harness import Bench, arg_parser
from twinflow.tasks import twin


def _policy_bench(args, model, err) -> dict[str, float]:
    costs = twin.CostModel()
    pols = twin.build_policies([75, 100, 125, 150, 175], [10.0, 20.0, 30.0, 45.0, 60.0])
    horizon = 1000
    loop_s, loop_a = (2, 10) if args.quick else (4, 25)
    vec_s, vec_a = (10, 100) if args.quick else (40, 100)
    loop_kinds = [pols[0], pols[2], pols[8]]
    loop_units = loop_s * loop_a * horizon * len(loop_kinds)
    vec_units = len(pols) * vec_s * vec_a * horizon

    bench = Bench("simulate: policy kernel", baseline="(a) per-asset Python loop", unit_name="asset-steps")
    bench.measure("(a) per-asset Python loop",
                  lambda: [twin.simulate_loop(model, p, costs, loop_s, loop_a, horizon, 1, err) for p in loop_kinds],
                  repeat=1, units=loop_units)
    bench.measure("(b) vectorised NumPy kernel, 1 process",
                  lambda: twin.simulate_batch(model, pols, costs, vec_s, vec_a, horizon, 1, err),
                  repeat=args.repeat, warmup=0, units=vec_units)

    from distributed import Client, LocalCluster

    cores = os.cpu_count() or 1
    params = twin.TwinParams(n_scenarios=vec_s * cores, batch_scenarios=vec_s, n_assets=vec_a, horizon=horizon,
                             intervals=[75, 100, 125, 150, 175], thresholds=[10.0, 20.0, 30.0, 45.0, 60.0],
                             backend="numpy")
    with LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        twin.run_batches(client, model, pols, params.model_copy(update={"n_scenarios": cores}), err)  # warm
        bench.measure(f"(b') NumPy kernel on Dask, {cores} workers",
                      lambda: twin.run_batches(client, model, pols, params, err), repeat=args.repeat,
                      units=vec_units * cores)

    gpu = _gpu_available()
    if gpu is not None:
        sizes = [(100, 100)] if args.quick else [(100, 100), (1000, 100), (10_000, 100)]
        for s, a in sizes:
            units = len(pols) * s * a * horizon
            twin.simulate_batch_fused(model, pols, costs, min(s, 10), a, 10, 0, err)  # compile
            bench.measure(f"(c) fused CuPy kernel, {units:.1e} steps",
                          lambda s=s, a=a: twin.simulate_batch_fused(model, pols, costs, s, a, horizon, 1, err),
                          repeat=1 if units > 1e9 else args.repeat, units=units)
    summary = bench.report(args.json)

    def rate(label: str) -> float:
        r = bench.results[label]
        return r.extra["units"] / r.best

    a = rate("(a) per-asset Python loop")
    b = rate("(b) vectorised NumPy kernel, 1 process")
    bd = rate(f"(b') NumPy kernel on Dask, {cores} workers")
    print(f"throughput ratios: b/a = {b / a:.1f}x   b'/b = {bd / b:.2f}x ({cores} cores)")
    out = {"a": a, "b": b, "b_dask": bd}
    if gpu is not None:
        labels = [k for k in bench.results if k.startswith("(c)")]
        c = max(rate(k) for k in labels)
        print(f"GPU: c = {c:.3e} asset-steps/s, c/b = {c / b:.0f}x, c/b' = {c / bd:.0f}x; "
              f"{gpu['name']} FP32 peak {gpu['fp32']:.3e} FLOP/s -> {c / gpu['fp32']:.4f} asset-steps per FP32 FLOP")
        out["c"] = c
    summary["throughput"] = out
    return out


def _gpu_available() -> dict | None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        props = cupy.cuda.runtime.getDeviceProperties(0)
        # FP32 peak: SMs x 128 FP32 lanes (Ampere/Hopper) x 2 (FMA) x clock.
        fp32 = props["multiProcessorCount"] * 128 * 2 * props["clockRate"] * 1e3
        return {"name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"], "fp32": fp32}
    except Exception:  # noqa: BLE001 - no cupy / no driver
        return None


def _count_rows(n_assets: int, seed, model: twin.TwinModel, offset: int) -> int:
    return twin.generate_fleet(n_assets, seed, model, asset_offset=offset).num_rows


def _generator_bench(args, model) -> None:
    n_loop = 100 if args.quick else 300
    n_vec = 5000 if args.quick else 20_000
    chunk = 5000
    rows_per_asset = float(np.mean(twin.sample_lifetimes(model, 2000, seed=0)))
    bench = Bench("simulate: fleet generator", baseline="per-asset loop", unit_name="rows")
    bench.measure("per-asset loop", lambda: [twin.generate_fleet(1, i, model, asset_offset=i) for i in range(n_loop)],
                  repeat=1, units=n_loop * rows_per_asset)

    def vectorised() -> int:
        seeds = np.random.SeedSequence(1).spawn(n_vec // chunk)
        return sum(_count_rows(chunk, ss, model, i * chunk) for i, ss in enumerate(seeds))

    bench.measure(f"vectorised, chunks of {chunk} assets", vectorised, repeat=args.repeat,
                  units=n_vec * rows_per_asset)
    if not args.quick:
        from distributed import Client, LocalCluster

        n_big = int(np.ceil(10_000_000 / rows_per_asset / chunk)) * chunk
        cores = os.cpu_count() or 1
        with LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            seeds = np.random.SeedSequence(2).spawn(n_big // chunk)

            def on_dask() -> int:
                futs = [client.submit(_count_rows, chunk, ss, model, i * chunk, pure=False)
                        for i, ss in enumerate(seeds)]
                return sum(client.gather(futs))

            t0 = time.perf_counter()
            rows = on_dask()
            print(f"10 M-row fleet on Dask ({cores} workers): {rows:,} rows in {time.perf_counter() - t0:.1f} s")
            bench.measure(f"vectorised on Dask, {cores} workers, {n_big} assets", on_dask, repeat=1,
                          units=rows)
    bench.report()
    a = bench.results["per-asset loop"]
    v = bench.results[f"vectorised, chunks of {chunk} assets"]
    print(f"throughput ratio: vectorised / per-asset loop = "
          f"{(v.extra['units'] / v.best) / (a.extra['units'] / a.best):.1f}x")


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    model = twin.default_model()
    err = twin.RulErrorModel.gaussian(20.0)
    _policy_bench(args, model, err)
    _generator_bench(args, model)


if __name__ == "__main__":
    main()
