"""GPU twin kernels (CuPy): fused policy kernel and generator vs the NumPy kernels' statistics.

Skipped without CuPy and a CUDA device (``-m gpu`` selects them).
"""

from __future__ import annotations

import numpy as np
import pytest

from twinflow.tasks import twin

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _need_device():
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA driver")


POLICIES = twin.build_policies([100, 150], [20.0, 40.0])
COSTS = twin.CostModel()


@pytest.mark.parametrize("error_model", [
    twin.RulErrorModel.gaussian(20.0),
    twin.RulErrorModel.from_residuals(np.arange(300.0), np.arange(300.0) + np.random.default_rng(0).normal(0, 15, 300)),
])
def test_fused_kernel_matches_numpy_statistics(error_model):
    model = twin.default_model()
    n_s, n_a, horizon = 40, 50, 800
    gpu = twin.simulate_batch_fused(model, POLICIES, COSTS, n_s, n_a, horizon, 1, error_model)
    cpu = twin.simulate_batch(model, POLICIES, COSTS, n_s, n_a, horizon, 2, error_model)
    again = twin.simulate_batch_fused(model, POLICIES, COSTS, n_s, n_a, horizon, 1, error_model)
    for key in ("failures", "planned", "downtime"):
        assert np.array_equal(gpu[key], again[key])
        for p in range(len(POLICIES)):
            g, c = gpu[key][p].astype(float), cpu[key][p].astype(float)
            se = np.sqrt(g.var(ddof=1) / n_s + c.var(ddof=1) / n_s) + 1e-9
            assert abs(g.mean() - c.mean()) <= 4 * se + 0.02 * max(c.mean(), 1.0), (key, POLICIES[p].name)


def test_cupy_generator_matches_numpy_lifetimes():
    model = twin.default_model()
    on_gpu = twin.generate_fleet(400, seed=1, model=model, xp=cupy)
    on_cpu = twin.generate_fleet(400, seed=1, model=model)
    assert on_gpu.schema.equals(on_cpu.schema)
    life_gpu = on_gpu.to_pandas().groupby("asset_id")["cycle"].max().to_numpy()
    life_cpu = on_cpu.to_pandas().groupby("asset_id")["cycle"].max().to_numpy()
    assert twin.ks_statistic(life_gpu, life_cpu) <= 0.12


def test_dask_cuda_cluster_runs_gpu_batches():
    dask_cuda = pytest.importorskip("dask_cuda")
    from distributed import Client

    params = twin.TwinParams(n_scenarios=20, batch_scenarios=5, n_assets=50, horizon=500, backend="cupy",
                             intervals=[100, 150], thresholds=[20.0, 40.0])
    model = twin.default_model()
    err = twin.RulErrorModel.gaussian(20.0)
    with dask_cuda.LocalCUDACluster(n_workers=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        a = twin.run_batches(client, model, POLICIES, params, err)
        b = twin.run_batches(client, model, POLICIES, params, err)
    for k in a:
        assert np.array_equal(a[k], b[k])
    ref = twin.simulate_batch(model, POLICIES, COSTS, 20, 50, 500, 3, err)
    for p in range(len(POLICIES)):
        g, c = a["failures"][p].astype(float), ref["failures"][p].astype(float)
        se = np.sqrt(g.var(ddof=1) / 20 + c.var(ddof=1) / 20) + 1e-9
        assert abs(g.mean() - c.mean()) <= 4 * se + 0.02 * max(c.mean(), 1.0)
