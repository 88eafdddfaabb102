"""The GPU path: the same kernels on CuPy arrays agree with NumPy (needs a CUDA GPU; skips here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twinflow.tasks import features as ft

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")


def _frame(seed: int = 0, assets: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 400, size=assets)
    n = int(sizes.sum())
    reg = rng.integers(0, 3, size=n)
    frame = pd.DataFrame({"asset_id": np.repeat([f"a{i:03d}" for i in range(assets)], sizes),
                          "cycle": np.concatenate([np.arange(1, k + 1) for k in sizes]),
                          "op_setting_1": np.array([0.0, 20.0, 42.0])[reg] + rng.normal(0, 1e-3, n),
                          "op_setting_2": np.array([0.0, 0.7, 0.84])[reg] + rng.normal(0, 1e-4, n)})
    for j in range(6):
        col = 500 + 40 * reg + rng.normal(scale=1 + j, size=n) + 0.01 * frame.cycle
        col[rng.random(n) < 0.05] = np.nan
        frame[f"s{j + 1}"] = col
    return frame


def test_cupy_features_match_numpy():
    frame = _frame()
    params = ft.FeatureParams(windows=[1, 5, 30, 64], ewm_spans=[3, 30], min_periods=1)
    ops = ["op_setting_1", "op_setting_2"]
    cols, mean, scale, cent = ft.fit_regimes(ft.sample_operating_settings(frame, ops, 5000, 0), ops, params)
    channels = [f"s{j + 1}" for j in range(6)]
    moments = ft.combine_moments([ft.partition_moments(frame, channels, cols, mean, scale, cent)])
    fit = ft.finalize_fit(moments, channels, cols, mean, scale, cent, params)
    assert fit.n_regimes == 3
    keys_cpu, cpu = ft.compute_features(frame, fit, params, np)
    keys_gpu, gpu = ft.compute_features(frame, fit, params, cupy)
    pd.testing.assert_frame_equal(keys_cpu, keys_gpu)
    np.testing.assert_array_equal(np.isnan(cpu), np.isnan(gpu))
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_cupy_backend_is_selected_on_a_cuda_cluster():
    assert ft.resolve_backend("auto", "cuda") == "cupy"
    assert ft.array_module("cupy") is cupy
