"""Features at each asset's last reading (tasks/features/latest.py) against the full pass of
``compute_features`` at the same rows: the health stage computes only these."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from health_fixtures import pumps_frame
from twinflow.contract.store import load_contract
from twinflow.tasks.features import FeatureParams, compute_features, feature_names, time_ticks
from twinflow.tasks.features.fit import finalize_fit, fit_regimes, partition_moments
from twinflow.tasks.features.latest import feature_plan, latest_features

SENSORS = ["bearing_temp_c", "vibration_mm_s", "motor_current_a", "flow_m3h"]


def _fleet() -> tuple[pd.DataFrame, object, FeatureParams, object]:
    """Pumps on a timestamp clock with two load regimes, gaps, missing readings and a two-row asset."""
    df, _ = pumps_frame(n=12, seed=4)
    rng = np.random.default_rng(0)
    df = df[rng.random(len(df)) > 0.1].copy()  # gaps: time windows hold fewer rows
    df.loc[rng.random(len(df)) < 0.15, "vibration_mm_s"] = np.nan
    df.loc[df.asset_id == "p-03", "flow_m3h"] = np.nan  # a channel with no reading in any window
    df = df[(df.asset_id != "p-05") | (df.groupby("asset_id").cumcount() < 2)]  # shorter than every window
    contract = load_contract("pumps")
    fp = FeatureParams(windows=[3, 8], time_windows=["1h", "3h"], ewm_spans=[4, 9], channels=SENSORS, regimes=2,
                       normalise=True, min_periods=2)
    ops, om, osc, cent = fit_regimes(df[["load_pct"]].to_numpy(float), ["load_pct"], fp)
    fit = finalize_fit(partition_moments(df, SENSORS, ops, om, osc, cent), SENSORS, ops, om, osc, cent, fp)
    assert fit.n_regimes == 2
    return df.sort_values(["asset_id", "timestamp"]).reset_index(drop=True), fit, fp, contract.clock


def _latest(df, fit, fp, clock, names):
    codes = pd.factorize(df.asset_id, sort=False)[0]
    starts = np.r_[np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]), len(df)].astype(np.int64)
    ticks, tick_s = time_ticks(df[clock.key])
    first = np.repeat(starts[:-1], np.diff(starts))
    t = (ticks - ticks[first]).astype(np.float64) * (tick_s / clock.unit_seconds)
    plan = feature_plan(fit, fp, names, clock)
    y = np.stack([df[c].to_numpy(float) for c in plan.channels])
    x = latest_features(y, df[fit.op_columns].to_numpy(float), t, starts, fit, plan, fp.min_periods)
    return plan, x


def test_the_last_readings_features_equal_the_full_pass_at_that_reading():
    df, fit, fp, clock = _fleet()
    keys, full = compute_features(df, fit, fp, clock=clock)
    last = np.r_[np.flatnonzero(keys.asset_id.to_numpy()[1:] != keys.asset_id.to_numpy()[:-1]), len(keys) - 1]
    want = full[:, last]
    names = feature_names(fit, fp, clock)
    plan, got = _latest(df, fit, fp, clock, names)
    assert plan.names == names and got.shape == want.shape and got.dtype == np.float32
    # The same NaNs (short windows, a channel never read, min_periods) ...
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(want).any() and (~np.isnan(want)).any()
    # ... the EWMs are the same recurrence over the same rows: the same bits; values and regimes too.
    exact = [j for j, n in enumerate(names) if "_ewm_" in n or n.endswith("_norm") or n in ("regime", "time_since_start")]
    np.testing.assert_array_equal(got[exact], want[exact])
    # Window statistics are summed over each window instead of slid along the history: the same to
    # float32 rounding (one unit in the last place at most).
    np.testing.assert_allclose(got, want, rtol=2.4e-7, atol=1e-6)
    assert (got == want).mean() > 0.95


def test_only_the_features_asked_for_are_computed_in_the_order_asked():
    df, fit, fp, clock = _fleet()
    names = feature_names(fit, fp, clock)
    _, every = _latest(df, fit, fp, clock, names)
    wanted = ["vibration_mm_s_slope_1h", "regime", "bearing_temp_c_ewm_9", "vibration_mm_s_max_8", "not_a_feature"]
    plan, some = _latest(df, fit, fp, clock, wanted)
    assert plan.names == wanted[:4]
    assert plan.channels == ["bearing_temp_c", "vibration_mm_s"]  # the channels those read, nothing else
    np.testing.assert_array_equal(some, every[[names.index(n) for n in wanted[:4]]])


@pytest.mark.parametrize("windows", [[1], [5, 30]])
def test_a_cycle_clock_without_regimes_or_normalisation(windows):
    from twinflow.tasks.features.fit import identity_fit

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 60, 40)
    df = pd.DataFrame({"asset_id": np.repeat([f"a{i:02d}" for i in range(40)], lengths),
                       "cycle": np.concatenate([np.arange(1, n + 1) for n in lengths]),
                       "s1": rng.normal(500, 3, lengths.sum()), "s2": np.full(lengths.sum(), 7.25)})
    fit, fp = identity_fit(["s1", "s2"]), FeatureParams(windows=windows, ewm_spans=[10], channels=["s1", "s2"])
    keys, full = compute_features(df, fit, fp)
    last = np.r_[np.flatnonzero(np.diff(pd.factorize(keys.asset_id)[0])), len(keys) - 1]
    codes = pd.factorize(df.asset_id, sort=False)[0]
    starts = np.r_[np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]), len(df)].astype(np.int64)
    t = (df.cycle.to_numpy() - np.repeat(df.cycle.to_numpy()[starts[:-1]], lengths)).astype(float)
    plan = feature_plan(fit, fp)
    got = latest_features(np.stack([df.s1.to_numpy(), df.s2.to_numpy()]), np.empty((len(df), 0)), t, starts, fit,
                          plan, fp.min_periods)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(full[:, last]))
    np.testing.assert_allclose(got, full[:, last], rtol=2.4e-7, atol=1e-6)
    # A constant channel: std exactly 0 and slope exactly 0 wherever the full pass gives them.
    for s in ("std", "slope"):
        j = [plan.names.index(f"s2_{s}_{w}") for w in windows]
        np.testing.assert_array_equal(got[j], full[:, last][j])
