"""The features stage under a fleet contract: time windows, timestamp clocks, labels in the clock's unit.

The reference for every time-window value is pandas' own time-based rolling
(``groupby(asset).rolling("<w>", on=time)``), or for the slope a direct least-squares fit over the
rows in each window; nothing is compared with the code under test itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from twinflow.contract import load_contract
from twinflow.contract.model import Clock
from twinflow.errors import ConfigError
from twinflow.tasks import features as ft
from twinflow.tasks.features import FeatureParams

fc = pytest.importorskip("twinflow.tasks.features.cpu")
PUMPS = load_contract("pumps")
HOUR_US = 3_600_000_000


def _pump_frame(seed: int = 0, n_assets: int = 4) -> pd.DataFrame:
    """Irregular 10-minute readings with jitter, a 5-hour gap, NaNs and a channel absent for one pump."""
    rng = np.random.default_rng(seed)
    frames = []
    for a in range(n_assets):
        n = int(rng.integers(40, 90))
        steps = 600 + rng.integers(-120, 121, size=n)  # seconds: 10 min +- 2 min of jitter
        steps[n // 2] = 5 * 3600  # a gap of 5 hours: no readings in it
        seconds = np.cumsum(steps)
        ts = pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(seconds, unit="s")
        vib = 2.0 + 0.01 * seconds / 3600 + rng.normal(0, 0.2, n)
        vib[rng.random(n) < 0.15] = np.nan  # missing readings (sentinels are stored as null)
        temp = 60 + rng.normal(0, 1.5, n) + 0.05 * np.arange(n)
        if a == 2:
            temp[:] = np.nan  # this pump has no temperature sensor at all
        frames.append(pd.DataFrame({"asset_id": f"pump-{a:02d}", "timestamp": ts.astype("datetime64[us, UTC]"),
                                    "speed_rpm": rng.choice([1450.0, 2900.0], n), "load_pct": 80.0,
                                    "vibration_mm_s": vib, "bearing_temp_c": temp}))
    return pd.concat(frames, ignore_index=True)


def _ls_slope(t: np.ndarray, y: np.ndarray) -> float:
    ok = ~np.isnan(y)
    t, y = t[ok], y[ok]
    if len(t) < 2 or np.ptp(t) == 0:
        return np.nan
    return float(np.polyfit(t, y, 1)[0])


def _reference(frame: pd.DataFrame, channel: str, window: str, min_periods: int) -> pd.DataFrame:
    """pandas' time-based rolling per asset (window ``(t - w, t]``), slope by a direct fit per row."""
    out = []
    for _, g in frame.groupby("asset_id", sort=True):
        g = g.sort_values("timestamp")
        r = g.rolling(window, on="timestamp", min_periods=min_periods)[channel]
        hours = (g["timestamp"] - g["timestamp"].iloc[0]).dt.total_seconds().to_numpy() / 3600
        w_h = pd.Timedelta(window).total_seconds() / 3600
        y = g[channel].to_numpy()
        slope = []
        for i in range(len(g)):
            inside = (hours > hours[i] - w_h) & (hours <= hours[i])
            valid = int((~np.isnan(y[inside])).sum())
            slope.append(_ls_slope(hours[inside], y[inside]) if valid >= min_periods else np.nan)
        out.append(pd.DataFrame({"mean": r.mean().to_numpy(), "std": r.std().to_numpy(), "min": r.min().to_numpy(),
                                 "max": r.max().to_numpy(), "slope": slope, "n": r.count().to_numpy()}))
    return pd.concat(out, ignore_index=True)


@pytest.mark.parametrize("engine", ["array", "compiled"])
@pytest.mark.parametrize("min_periods", [1, 3])
def test_time_windows_match_pandas_over_irregular_timestamps_gaps_and_nans(engine, min_periods):
    frame = _pump_frame()
    channels = ["vibration_mm_s", "bearing_temp_c"]
    fit = ft.identity_fit(channels)
    params = FeatureParams(windows=[4], time_windows=["1h", "6h"], ewm_spans=[3], min_periods=min_periods,
                           rul_cap=None)
    keys, feats = ft.compute_features(frame.sample(frac=1, random_state=1), fit, params, engine=engine,
                                      clock=PUMPS.clock)
    names = ft.feature_names(fit, params, PUMPS.clock)
    assert list(keys.columns) == ["asset_id", "timestamp", "rul"]
    expected_keys = frame.sort_values(["asset_id", "timestamp"]).reset_index(drop=True)
    pd.testing.assert_series_equal(keys["timestamp"], expected_keys["timestamp"], check_names=False)
    checked = 0
    for ch in channels:
        for w in ("1h", "6h"):
            ref = _reference(frame, ch, w, min_periods)
            for stat in ("mean", "std", "min", "max", "slope"):
                got = feats[names.index(f"{ch}_{stat}_{w}")].astype(np.float64)
                want = ref[stat].to_numpy()
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{ch} {stat} {w}")
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5, equal_nan=True,
                                           err_msg=f"{ch} {stat} {w}")
                checked += int((~np.isnan(want)).sum())
    assert checked > 2000
    # The gap is honest: right after it a 1-h window holds one reading (the row itself), not a
    # window's worth of invented ones, while a 4-row window still reaches back across the gap.
    vib = frame.sort_values(["asset_id", "timestamp"]).reset_index(drop=True)
    hours = vib.groupby("asset_id")["timestamp"].diff().dt.total_seconds() / 3600
    after_gap = np.flatnonzero(hours.to_numpy() > 4)
    assert len(after_gap) == 4
    ref = _reference(frame, "vibration_mm_s", "1h", 1)
    assert (ref["n"].to_numpy()[after_gap] <= 1).all()
    std_1h = feats[names.index("vibration_mm_s_std_1h")][after_gap]
    assert np.isnan(std_1h).all()  # one reading at most: no spread to speak of
    # A channel absent on one pump gives NaN features there and leaves the other pumps' values alone.
    absent = (keys["asset_id"] == "pump-02").to_numpy()
    temp_mean = feats[names.index("bearing_temp_c_mean_6h")]
    assert np.isnan(temp_mean[absent]).all()
    assert np.isnan(temp_mean[~absent]).sum() == (min_periods - 1) * 3  # the other 3 pumps: only their first rows


def test_timestamp_clock_labels_and_time_since_start_are_in_the_clock_unit():
    frame = _pump_frame(seed=3)
    fit = ft.identity_fit(["vibration_mm_s"])
    keys, feats = ft.compute_features(frame, fit, FeatureParams(windows=[3], rul_cap=None), clock=PUMPS.clock)
    assert PUMPS.clock.time_unit == "h"
    g = frame.sort_values(["asset_id", "timestamp"]).groupby("asset_id")["timestamp"]
    ts = frame.sort_values(["asset_id", "timestamp"])["timestamp"]
    want_rul = ((g.transform("max") - ts).dt.total_seconds() / 3600).to_numpy()
    want_since = ((ts - g.transform("min")).dt.total_seconds() / 3600).to_numpy()
    np.testing.assert_allclose(keys["rul"].to_numpy(), want_rul, rtol=1e-12)
    names = ft.feature_names(fit, FeatureParams(windows=[3]), PUMPS.clock)
    assert names[0] == "time_since_start"
    np.testing.assert_allclose(feats[0], want_since, rtol=1e-6)
    assert keys["rul"].dtype == np.float64 and (keys["rul"] >= 0).all()
    # A cap applies in hours too.
    keys_cap, _ = ft.compute_features(frame, fit, FeatureParams(windows=[3], rul_cap=5), clock=PUMPS.clock)
    np.testing.assert_allclose(keys_cap["rul"].to_numpy(), np.minimum(want_rul, 5.0))
    # Minutes as the unit: the same durations, 60 times larger.
    minutes = Clock(kind="timestamp", unit="min", interval="10min")
    keys_min, _ = ft.compute_features(frame, fit, FeatureParams(windows=[3], rul_cap=None), clock=minutes)
    np.testing.assert_allclose(keys_min["rul"].to_numpy(), want_rul * 60, rtol=1e-12)


def test_cycle_clock_output_is_unchanged_by_the_contract_path():
    """The default clock is a cycle clock: keys, names and labels as before contracts."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"asset_id": np.repeat(["a", "b"], 30), "cycle": np.tile(np.arange(1, 31), 2),
                          "s2": rng.normal(size=60)})
    fit = ft.identity_fit(["s2"])
    params = FeatureParams(windows=[5])
    k0, f0 = ft.compute_features(frame, fit, params)
    k1, f1 = ft.compute_features(frame, fit, params, clock=load_contract("cmapss").clock)
    pd.testing.assert_frame_equal(k0, k1)
    np.testing.assert_array_equal(f0, f1)
    assert ft.feature_names(fit, params)[0] == "cycle_since_start" and k0["rul"].dtype == np.int32
    assert list(k0.columns) == ["asset_id", "cycle", "rul"]


def test_time_windows_need_a_timestamp_clock_and_a_valid_duration():
    frame = pd.DataFrame({"asset_id": ["a"] * 3, "cycle": [1, 2, 3], "s2": [1.0, 2.0, 3.0]})
    with pytest.raises(ConfigError, match="need a timestamp clock"):
        ft.compute_features(frame, ft.identity_fit(["s2"]), FeatureParams(time_windows=["1h"]))
    with pytest.raises(ValidationError, match="not understood"):
        FeatureParams(time_windows=["an hour"])
    with pytest.raises(ValidationError, match="at least one window"):
        FeatureParams(windows=[], time_windows=[])
    p = FeatureParams(windows=[], time_windows=["6h", "60min", "1h"])
    assert p.time_windows == ["60min", "6h"]  # 60min and 1h are one window: the first spelling is kept
    assert p.time_window_lengths(3600.0) == [1.0, 6.0]


def test_regimes_come_from_the_contracts_setting_channels():
    """Settings (kind: setting) cluster into regimes; sensors are normalised per regime."""
    frame = _pump_frame(seed=5)
    frame["vibration_mm_s"] += np.where(frame["speed_rpm"] > 2000, 3.0, 0.0)  # speed shifts the level
    params = FeatureParams(windows=[3])
    sample = ft.sample_operating_settings(frame, PUMPS.settings, 10_000, 0)
    op_columns, op_mean, op_scale, centroids = ft.fit_regimes(sample, PUMPS.settings, params)
    assert op_columns == ["speed_rpm"]  # load_pct is constant here: it separates nothing
    assert len(centroids) == 2
    moments = ft.partition_moments(frame, ["vibration_mm_s"], op_columns, op_mean, op_scale, centroids)
    fit = ft.finalize_fit(moments, ["vibration_mm_s"], op_columns, op_mean, op_scale, centroids, params)
    keys, feats = ft.compute_features(frame, fit, params, clock=PUMPS.clock)
    names = ft.feature_names(fit, params, PUMPS.clock)
    norm = feats[names.index("vibration_mm_s_norm")]
    regime = feats[names.index("regime")]
    for r in (0, 1):
        assert abs(np.nanmean(norm[regime == r])) < 1e-5
