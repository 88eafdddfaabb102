"""The GPU path: same code, GPU arrays when the cluster has GPUs.

With ``pip install 'twinflow[gpu]'`` on an NVIDIA machine, ``TWINFLOW_DASK__MODE=auto`` starts a
``dask_cuda.LocalCUDACluster`` (one worker per GPU); the feature window kernels and the twin's
Monte-Carlo kernels then run on CuPy arrays on each worker. Without a GPU this example says so and
runs the identical flow on the CPU, so it is safe to run anywhere.

Run: ``python examples/gpu_path.py``.
"""

from __future__ import annotations

from twinflow import runtime
from twinflow.cluster import resolve_mode
from twinflow.settings import get_settings


def main() -> None:
    settings = get_settings()
    mode, reason = resolve_mode(settings)
    print(f"cluster mode: {mode} ({reason})")
    if mode != "cuda":
        print("no usable GPU here: running the same flow on the CPU (NumPy backend)")
    from twinflow.flows.simulate import simulate
    from twinflow.tasks.twin import TwinParams

    params = TwinParams(n_scenarios=20, n_assets=20, horizon=300, batch_scenarios=10,
                        intervals=[100, 150], thresholds=[20.0, 40.0], fan_units=50)
    with runtime.start(settings) as rt:
        print(f"Dask: {rt.cluster.mode}, {rt.cluster.n_workers} worker(s)")
        result = simulate(params)
    print(f"recommended policy: {result.recommended_policy} (expected cost {result.expected_cost:,.0f})")


if __name__ == "__main__":
    main()
