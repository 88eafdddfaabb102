"""Pure feature functions: kernels against pandas/NumPy oracles, regimes, fits, params."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from pydantic import ValidationError

from twinflow.errors import ConfigError
from twinflow.tasks import features as ft
from twinflow.tasks.features import FeatureParams


def _fleet(seed: int, n_assets: int = 30, max_len: int = 70, nan_frac: float = 0.1, gaps: bool = False):
    """Ragged assets (some shorter than the windows), channels at very different scales, NaNs."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_len, size=n_assets)
    aid = np.repeat(np.arange(n_assets), sizes)
    steps = [rng.integers(1, 4, size=k) if gaps else np.ones(k, int) for k in sizes]
    cycle = np.concatenate([np.cumsum(s) + 10 for s in steps])
    y = rng.normal(size=(len(aid), 3)) * [1.0, 50.0, 0.01] + [0.0, 1e4, 5.0]
    y[:, 1] += 0.3 * cycle  # a trend, so slopes are not ~0
    y[rng.random(y.shape) < nan_frac] = np.nan
    y[aid == 3, 2] = np.nan  # an asset with an all-NaN channel
    return aid, cycle, y


fc = pytest.importorskip("twinflow.tasks.features.cpu")  # numba: a core dependency
IMPLS = ["array", "compiled"]


def _rolling(impl, y, t, gstart, windows, stats, min_periods):
    """``rolling_features``'s result from the array kernels or the compiled (numba) ones."""
    if impl == "array":
        return ft.rolling_features(y, t, gstart, windows, stats, min_periods)
    c, n = y.shape
    starts = np.append(np.flatnonzero(gstart == np.arange(n)), n).astype(np.int64)
    out = np.full((len(windows) * len(stats) * c, n), -1.0, np.float32)
    fc.rolling_into(np.ascontiguousarray(y, dtype=np.float64), t, starts, np.array(windows, np.int64),
                    np.array([fc.STAT_CODES[s] for s in stats], np.int64), min_periods, out, 0)
    return {(s, w): out[(k * len(stats) + i) * c:(k * len(stats) + i + 1) * c].astype(np.float64)
            for k, w in enumerate(windows) for i, s in enumerate(stats)}


def _ewm(impl, y, pos, span, min_periods=1):
    if impl == "array":
        return ft.ewm_mean(y.copy(), pos, span, min_periods)
    starts = np.append(np.flatnonzero(pos == 0), len(pos)).astype(np.int64)
    out = np.empty(y.shape, np.float32)
    fc.ewm_into(np.ascontiguousarray(y, dtype=np.float64), starts, np.array([span], np.int64), min_periods, out, 0)
    return out.astype(np.float64)


# The compiled kernels store float32: compare them at float32 resolution.
def _tol(impl, rtol):
    return (rtol, 1e-9) if impl == "array" else (max(rtol, 2e-6), 1e-6)


def _pandas_rolling(aid, y, w, stat, min_periods):
    df = pd.DataFrame(y, columns=list("abc")).assign(g=aid)
    r = df.groupby("g")[list("abc")].rolling(w, min_periods=min_periods)
    return getattr(r, stat)().reset_index(level=0, drop=True).sort_index().to_numpy()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("min_periods", [1, 3])
@pytest.mark.parametrize("nan_frac", [0.0, 0.15])
def test_rolling_stats_match_pandas_groupby_rolling(min_periods, nan_frac, impl):
    aid, cycle, y = _fleet(0, nan_frac=nan_frac)
    if nan_frac == 0.0:
        y[aid == 3, 2] = 1.0
    gstart, _ = ft.group_bounds(aid)
    t = (cycle - cycle[gstart]).astype(float)
    windows = [3, 5, 8, 64]
    got = _rolling(impl, y.T.copy(), t, gstart, windows, ft.STATS, min_periods)
    rtol, atol = _tol(impl, 1e-9)
    for w in windows:
        for stat in ("mean", "std", "min", "max"):
            ref = _pandas_rolling(aid, y, w, stat, min_periods)
            np.testing.assert_allclose(got[(stat, w)].T, ref, rtol=rtol, atol=atol,
                                       err_msg=f"{stat} w={w}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nan_frac", [0.0, 0.2])
def test_slope_is_the_least_squares_trend_over_the_window(nan_frac, impl):
    aid, cycle, y = _fleet(1, nan_frac=nan_frac, gaps=True)
    gstart, _ = ft.group_bounds(aid)
    t = (cycle - cycle[gstart]).astype(float)
    w = 7
    got = _rolling(impl, y.T.copy(), t, gstart, [w], ["slope"], 2)[("slope", w)].T
    rtol, atol = _tol(impl, 1e-7)
    checked = 0
    for i in np.random.default_rng(0).choice(len(aid), size=300, replace=False):
        a = max(i - w + 1, gstart[i])
        for j in range(3):
            yy, tt = y[a: i + 1, j], t[a: i + 1]
            m = ~np.isnan(yy)
            if m.sum() >= 2:
                np.testing.assert_allclose(got[i, j], np.polyfit(tt[m], yy[m], 1)[0], rtol=rtol, atol=atol)
                checked += 1
            else:
                assert np.isnan(got[i, j])
    assert checked > 300


@pytest.mark.parametrize("impl", IMPLS)
def test_long_assets_keep_precision(impl):
    """Sums are block-local: no cancellation on long series with a large offset."""
    n = 200_000
    rng = np.random.default_rng(2)
    t = np.arange(n, dtype=float)
    y = (1e6 + 1e-3 * t + rng.normal(scale=0.01, size=n))[None, :]
    gstart = np.zeros(n, dtype=np.int64)
    got = _rolling(impl, y, t, gstart, [10], ["std", "slope"], 1)
    from numpy.lib.stride_tricks import sliding_window_view

    ref_std = sliding_window_view(y[0], 10).std(axis=1, ddof=1)  # two-pass: the exact oracle
    np.testing.assert_allclose(got[("std", 10)][0, 9:], ref_std, rtol=1e-5)
    # pandas' online algorithm loses this (up to ~20% off here); the block-local sums do not.
    i = n - 1
    tw = t[i - 9:] - t[i - 9:].mean()
    np.testing.assert_allclose(got[("slope", 10)][0, i], np.polyfit(tw, y[0, i - 9:], 1)[0], rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("min_periods", [1, 4])
@pytest.mark.parametrize("span", [3, 30])
def test_ewm_matches_pandas(span, min_periods, impl):
    aid, _, y = _fleet(3, max_len=300)
    _, pos = ft.group_bounds(aid)
    got = _ewm(impl, y.T.copy(), pos, span, min_periods).T
    df = pd.DataFrame(y).assign(g=aid)
    ref = df.groupby("g")[[0, 1, 2]].transform(lambda s: s.ewm(span=span, min_periods=min_periods).mean())
    rtol, atol = _tol(impl, 1e-9)
    np.testing.assert_allclose(got, ref.to_numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@hsettings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=4), w=st.integers(1, 12),
       seed=st.integers(0, 10_000))
def test_windows_never_cross_assets(impl, sizes, w, seed):
    """Each asset's features equal those computed on the asset alone."""
    rng = np.random.default_rng(seed)
    aid = np.repeat(np.arange(len(sizes)), sizes)
    y = rng.normal(size=(1, len(aid))) * 10 ** rng.integers(0, 4, size=len(aid))
    gstart, pos = ft.group_bounds(aid)
    t = pos.astype(float)
    together = _rolling(impl, y, t, gstart, [w], ft.STATS, 1)
    ewm = _ewm(impl, y, pos, w)
    for g in range(len(sizes)):
        rows = np.nonzero(aid == g)[0]
        n = len(rows)
        alone = _rolling(impl, y[:, rows].copy(), t[rows], np.zeros(n, np.int64), [w], ft.STATS, 1)
        for key, val in alone.items():
            # Equal up to rounding (block alignment differs); a crossed window would be far off.
            np.testing.assert_allclose(together[key][:, rows], val, rtol=1e-7,
                                       atol=1e-9 * np.abs(y).max(), err_msg=str(key))
        np.testing.assert_allclose(ewm[:, rows], _ewm(impl, y[:, rows], np.arange(n), w),
                                   rtol=1e-9, atol=1e-12)


def test_compiled_and_array_engines_agree_on_every_feature():
    """The CPU (numba) kernels and the array kernels (the GPU path's code) give the same output."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 700, size=40)  # some assets shorter than the windows, some > 256 rows
    n = int(sizes.sum())
    reg = rng.integers(0, 3, size=n)
    frame = pd.DataFrame({"asset_id": np.repeat([f"a{i:03d}" for i in range(40)], sizes),
                          "cycle": np.concatenate([np.arange(1, k + 1) for k in sizes]),
                          "op_setting_1": np.array([0.0, 20.0, 42.0])[reg] + rng.normal(0, 1e-3, n)})
    for j in range(4):
        col = 500 + 40 * reg + rng.normal(scale=1 + j, size=n) + 0.01 * frame.cycle
        col[rng.random(n) < 0.05] = np.nan
        frame[f"s{j + 1}"] = col
    params = FeatureParams(windows=[1, 5, 30, 64], ewm_spans=[3, 30], min_periods=1)
    cols, mean, scale, cent = ft.fit_regimes(ft.sample_operating_settings(frame, ["op_setting_1"], 5000, 0),
                                             ["op_setting_1"], params)
    channels = [f"s{j + 1}" for j in range(4)]
    moments = ft.combine_moments([ft.partition_moments(frame, channels, cols, mean, scale, cent)])
    fit = ft.finalize_fit(moments, channels, cols, mean, scale, cent, params)
    assert fit.n_regimes == 3
    keys_a, arr = ft.compute_features(frame, fit, params, engine="array")
    keys_c, comp = ft.compute_features(frame, fit, params, engine="compiled")
    pd.testing.assert_frame_equal(keys_a, keys_c)
    np.testing.assert_array_equal(np.isnan(arr), np.isnan(comp))
    np.testing.assert_allclose(comp, arr, rtol=1e-5, atol=1e-5)
    _, auto = ft.compute_features(frame, fit, params)
    np.testing.assert_array_equal(auto, comp)  # auto picks the compiled kernels on NumPy


def test_regime_sample_reads_a_seeded_subset_of_files():
    parts = [[f"p{i}/f{j}" for j in range(10)] for i in range(5)]
    assert ft.sample_partitions(parts, 100, 0) == parts
    sub = ft.sample_partitions(parts, 12, 0)
    flat = [f for p in sub for f in p]
    assert len(flat) == 12 and len(set(flat)) == 12
    assert all(set(p) <= set(parts[int(p[0][1])]) for p in sub)  # files stay in their partition
    assert sub == ft.sample_partitions(parts, 12, 0) and sub != ft.sample_partitions(parts, 12, 1)


def test_params_are_validated_before_any_work():
    for bad in ([0], [-3], [5, 0]):
        with pytest.raises(ValidationError, match="greater than 0"):
            FeatureParams(windows=bad)
    with pytest.raises(ValidationError):
        FeatureParams(windows=[])
    with pytest.raises(ValidationError, match="min_periods"):
        FeatureParams(windows=[3, 10], min_periods=4)
    with pytest.raises(ValidationError):
        FeatureParams(stats=["median"])
    with pytest.raises(ValidationError):
        FeatureParams(window=[5])  # a typo is not silently ignored
    assert FeatureParams(windows=[10, 5, 10]).windows == [5, 10]
    # Execution-only fields do not change what is computed, so not the cache digest either.
    a, b = FeatureParams(partition_bytes=1), FeatureParams(partition_bytes=2, compression="none")
    assert ft.stage_digest("s", "l", a, None, "c") == ft.stage_digest("s", "l", b, None, "c")
    with pytest.raises(ValidationError):
        FeatureParams(compression="gzip9")
    assert ft.stage_digest("s", "l", a, None, "c") != ft.stage_digest("s", "l", FeatureParams(rul_cap=100), None, "c")


def _split(frame: pd.DataFrame, k: int) -> list[pd.DataFrame]:
    return [frame.iloc[idx] for idx in np.array_split(np.arange(len(frame)), k)]


def _regime_frame(n_regimes: int, n: int = 6000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    points = np.array([[0, 0, 100], [10, 0.25, 100], [20, 0.7, 60], [25, 0.62, 80], [35, 0.84, 100],
                       [42, 0.84, 100]])[:n_regimes]
    reg = rng.integers(0, n_regimes, size=n)
    ops = points[reg] + rng.normal(scale=[1e-3, 1e-4, 0], size=(n, 3))
    frame = pd.DataFrame(ops, columns=["op_setting_1", "op_setting_2", "op_setting_3"])
    frame["s2"] = 500 + 40 * reg + rng.normal(scale=1 + reg, size=n)  # level and spread by regime
    frame["s3"] = 7.0 + 3 * reg  # constant within each regime
    frame["s4"] = rng.normal(size=n)
    frame["regime_true"] = reg
    return frame


@pytest.mark.parametrize("k", [1, 3, 6])
def test_auto_regimes_find_the_operating_conditions(k):
    frame = _regime_frame(k)
    params = FeatureParams()
    ops = ["op_setting_1", "op_setting_2", "op_setting_3"]
    cols, mean, scale, centroids = ft.fit_regimes(ft.sample_operating_settings(frame, ops, 5000, 0), ops, params)
    assert "op_setting_3" not in cols or k > 2  # constant settings are left out
    assert max(1, len(centroids)) == k
    if k > 1:
        reg = ft.assign_regimes(frame[cols].to_numpy(), mean, scale, centroids)
        # Same partition of rows as the truth (ids may be permuted).
        assert pd.crosstab(reg, frame.regime_true).gt(0).sum(axis=1).eq(1).all()
        moments = ft.combine_moments([ft.partition_moments(part, ["s2", "s3", "s4"], cols, mean, scale, centroids)
                                      for part in _split(frame, 4)])
        fit = ft.finalize_fit(moments, ["s2", "s3", "s4"], cols, mean, scale, centroids, params)
        # s3 only moves with the regime: constant once normalised per regime, so dropped.
        assert fit.dropped == {"s3": "constant"} and fit.kept == ["s2", "s4"]
        z = (frame.s2.to_numpy() - np.asarray(fit.mean)[reg, 0]) / np.asarray(fit.std)[reg, 0]
        for r in range(k):
            assert abs(z[reg == r].mean()) < 1e-9 and abs(z[reg == r].std(ddof=1) - 1) < 1e-9


def test_combined_moments_equal_direct_statistics():
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"s2": rng.normal(1e5, 2, 999), "s4": rng.normal(size=999)})
    frame.loc[::7, "s4"] = np.nan
    parts = [ft.partition_moments(p, ["s2", "s4"], [], [], [], []) for p in _split(frame, 5)]
    m = ft.combine_moments(parts)
    np.testing.assert_allclose(m["count"][0], frame.count().to_numpy())
    np.testing.assert_allclose(m["mean"][0], frame.mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(m["m2"][0] / (m["count"][0] - 1), frame.var().to_numpy(), rtol=1e-9)


def test_compiled_moments_normalisation_and_nan_counts_match_numpy():
    pytest.importorskip("numba")
    rng = np.random.default_rng(9)
    n = 5000
    reg = rng.integers(0, 3, size=n)
    frame = pd.DataFrame({"op_setting_1": np.array([0.0, 20.0, 42.0])[reg] + rng.normal(0, 1e-3, n),
                          "s1": 1e4 + 50 * reg + rng.normal(size=n), "s2": rng.normal(size=n),
                          "s3": np.nan})  # an all-NaN channel: count 0, mean and M2 0
    frame.loc[rng.random(n) < 0.1, "s2"] = np.nan
    params = FeatureParams(windows=[5], ewm_spans=[3])
    cols, mean, scale, cent = ft.fit_regimes(ft.sample_operating_settings(frame, ["op_setting_1"], 5000, 0),
                                             ["op_setting_1"], params)
    assert len(cent) == 3
    channels = ["s1", "s2", "s3"]
    comp = ft.partition_moments(frame, channels, cols, mean, scale, cent)
    arr = ft.partition_moments(frame, channels, cols, mean, scale, cent, engine="array")
    for key in ("count", "mean", "m2"):
        np.testing.assert_allclose(comp[key], arr[key], rtol=1e-10, atol=0, err_msg=key)
    assert (comp["count"][:, 2] == 0).all() and (comp["mean"][:, 2] == 0).all()
    # Per-regime normalisation: the compiled path writes a private copy, never the caller's frame.
    before = frame.copy()
    fit = ft.finalize_fit(ft.combine_moments([comp]), channels, cols, mean, scale, cent, params)
    frame["asset_id"], frame["cycle"] = "a", np.arange(1, n + 1)
    _, feats_c = ft.compute_features(frame, fit, params, engine="compiled")
    _, feats_a = ft.compute_features(frame, fit, params, engine="array")
    pd.testing.assert_frame_equal(frame[before.columns], before)
    names = ft.feature_names(fit, params)
    for ch in fit.kept:  # the normalised channel itself is the same float64 arithmetic on both paths
        np.testing.assert_array_equal(feats_c[names.index(f"{ch}_norm")], feats_a[names.index(f"{ch}_norm")])
    feats_c[3, ::17] = np.nan
    keys = pd.DataFrame({"asset_id": ["a"] * n})
    counts = ft.nan_counts(keys, feats_c, names)
    assert [counts[nm] for nm in names] == np.isnan(feats_c).sum(axis=1).tolist()
    assert counts["asset_id"] == 0


def test_every_channel_unusable_is_an_error():
    moments = {"count": np.array([[0.0, 10.0]]), "mean": np.array([[0.0, 3.0]]), "m2": np.zeros((1, 2))}
    with pytest.raises(ConfigError, match="no usable channels.*s1=all-NaN.*s2=constant"):
        ft.finalize_fit(moments, ["s1", "s2"], [], [], [], [], FeatureParams())


def test_compute_features_label_keys_and_order():
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({"asset_id": ["b"] * 4 + ["a"] * 200, "cycle": [*range(1, 5), *range(1, 201)],
                          "s2": rng.normal(size=204), "s4": rng.normal(size=204)}).sample(frac=1, random_state=1)
    fit = ft.identity_fit(["s2", "s4"])
    params = FeatureParams(windows=[3], ewm_spans=[4], rul_cap=125)
    keys, feats = ft.compute_features(frame, fit, params)
    names = ft.feature_names(fit, params)
    assert feats.shape == (len(names), 204) and feats.dtype == np.float32
    assert keys.asset_id.tolist() == ["a"] * 200 + ["b"] * 4 and keys.cycle.is_monotonic_increasing is False
    expected_rul = np.r_[np.minimum(np.arange(199, -1, -1), 125), [3, 2, 1, 0]]
    np.testing.assert_array_equal(keys.rul.to_numpy(), expected_rul)
    out = pd.DataFrame(feats.T, columns=names)
    np.testing.assert_array_equal(out.cycle_since_start.to_numpy(), np.r_[np.arange(200), np.arange(4)])
    b = frame[frame.asset_id == "b"].sort_values("cycle").s2
    np.testing.assert_allclose(out.s2_max_3.to_numpy()[200:], b.rolling(3, min_periods=1).max(), rtol=1e-6)
    no_label, _ = ft.compute_features(frame, fit, params.model_copy(update={"label": False}))
    assert "rul" not in no_label.columns


@pytest.mark.parametrize("case", ["ordered", "duplicate key", "assets out of order", "time out of order"])
def test_ordered_partitions_skip_the_sort_with_the_same_result(case):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"asset_id": ["a"] * 50 + ["b"] * 30, "cycle": [*range(1, 51), *range(1, 31)],
                          "s2": rng.normal(size=80)})
    if case == "duplicate key":
        frame.loc[10, "cycle"] = 10  # rows 9 and 10 are both (a, 10): the later one is kept
    elif case == "assets out of order":
        frame = pd.concat([frame.iloc[50:], frame.iloc[:50]])
    elif case == "time out of order":
        frame.iloc[[3, 4]] = frame.iloc[[4, 3]].to_numpy()
    from twinflow.tasks.features.transform import _codes_if_ordered

    assert (_codes_if_ordered(frame) is not None) == (case == "ordered")
    fit = ft.identity_fit(["s2"])
    params = FeatureParams(windows=[3], ewm_spans=[4])
    keys, feats = ft.compute_features(frame, fit, params)
    expected = frame.sort_values(["asset_id", "cycle"], kind="stable").drop_duplicates(
        ["asset_id", "cycle"], keep="last").reset_index(drop=True)
    pd.testing.assert_frame_equal(keys[["asset_id", "cycle"]], expected[["asset_id", "cycle"]].astype({"cycle": "int32"}))
    names = ft.feature_names(fit, params)
    np.testing.assert_array_equal(feats[names.index("s2")], expected.s2.to_numpy(np.float32))
    _, shuffled = ft.compute_features(frame.sample(frac=1, random_state=0), fit, params)
    if case != "duplicate key":  # with a repeated key, which row is "last" depends on the input order
        np.testing.assert_array_equal(feats, shuffled)


def test_plan_partitions_keeps_assets_whole():
    groups = {f"{i:03d}": [(f"/lake/asset={i:03d}/p{j}.parquet", 100) for j in range(i % 3 + 1)]
              for i in range(50)}
    parts = ft.plan_partitions(groups, target_bytes=450)
    assert 1 < len(parts) < 50
    flat = [p for part in parts for p in part]
    assert sorted(flat) == sorted(p for files in groups.values() for p, _ in files)
    owner = {}
    for i, part in enumerate(parts):
        for p in part:
            owner.setdefault(p.split("/")[2], set()).add(i)
    assert all(len(v) == 1 for v in owner.values())


def test_a_reused_output_buffer_gives_the_same_features():
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"asset_id": np.repeat(["a", "b", "c"], [50, 7, 120]), "cycle": np.r_[1:51, 1:8, 1:121],
                          "s2": rng.normal(size=177), "s3": rng.normal(size=177)})
    fit, params = ft.identity_fit(["s2", "s3"]), FeatureParams(windows=[3, 10])
    _, fresh = ft.compute_features(frame, fit, params)
    buf = np.full(fresh.size + 11, 7.0, np.float32)  # stale values from an earlier partition
    _, reused = ft.compute_features(frame, fit, params, buffer=buf)
    assert np.shares_memory(reused, buf)
    np.testing.assert_array_equal(reused, fresh)
    _, small = ft.compute_features(frame, fit, params, buffer=np.empty(10, np.float32))
    np.testing.assert_array_equal(small, fresh)  # too small: a fresh array instead


def test_compiled_regime_assignment_matches_the_array_version():
    """Nearest centroid per row, NaN settings counted as 0, the first of equal distances wins."""
    rng = np.random.default_rng(5)
    ops = np.array([0.0, 20.0, 42.0])[rng.integers(0, 3, size=(3000, 1))] + rng.normal(0, 0.5, (3000, 2))
    ops[::37, 1] = np.nan
    mean, scale = ops[~np.isnan(ops).any(axis=1)].mean(axis=0), np.array([2.0, 3.0])
    cent = np.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # ids 1 and 3 tie: 1 wins
    arr = ft.assign_regimes(ops, mean, scale, cent)
    comp = ft.assign_regimes(ops, mean, scale, cent, compiled=fc)
    np.testing.assert_array_equal(comp, arr)
    assert set(np.unique(comp)) == {0, 1, 2}
    assert ft.assign_regimes(ops, mean, scale, np.empty((0, 0)), compiled=fc).tolist() == [0] * len(ops)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_feature_files_use_the_chosen_codec_with_the_same_values(tmp_path, codec):
    import pyarrow.parquet as pq

    frame = pd.DataFrame({"asset_id": np.repeat(["a", "b"], 50), "cycle": np.tile(np.arange(1, 51), 2),
                          "s1": np.random.default_rng(0).normal(size=100)})
    params = FeatureParams(windows=[5], regimes=1, normalise=False, drop_constant=False, compression=codec)
    fit = ft.identity_fit(["s1"])
    files = {}
    for name, codec_ in (("default", "snappy"), ("chosen", codec)):
        (tmp_path / name).mkdir()
        summary = ft.transform_job(frame, fit, params.model_copy(update={"compression": codec_}), "numpy",
                                   str(tmp_path / name), 0)
        assert summary["rows"] == 100
        files[name] = pq.ParquetFile(tmp_path / name / summary["file"])
    assert files["default"].metadata.row_group(0).column(2).compression == "SNAPPY"
    assert files["chosen"].metadata.row_group(0).column(2).compression == {"none": "UNCOMPRESSED"}.get(codec, "ZSTD")
    pd.testing.assert_frame_equal(files["default"].read().to_pandas(), files["chosen"].read().to_pandas())


def test_the_cache_key_covers_every_module_of_the_stage(monkeypatch):
    """An edit to the regime fit, the parameters or either kernel module must invalidate cached feature sets."""
    import sys
    from pathlib import Path

    read: list[str] = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or original(self))
    ft.code_version()
    stage_modules = {Path(m.__file__).name for name, m in sys.modules.items()
                     if name.startswith("twinflow.tasks.features") and m}
    assert stage_modules >= {"__init__.py", "stage.py", "fit.py", "params.py", "kernels.py", "cpu.py"}
    assert set(read) >= stage_modules, stage_modules - set(read)
