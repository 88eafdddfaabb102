"""The health stage's pure parts: censored lifetimes, the Bayesian combination, the label-free score,
alert de-duplication and the work-order schema."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twinflow.errors import TwinflowError
from twinflow.tasks.health import alerts, anomaly, workorders
from twinflow.tasks.health.evaluate import spearman
from twinflow.tasks.health.lifetime import ErrorDensity, fit_weibull, prob_within, quantiles, remaining_life_posterior


def test_censored_weibull_recovers_the_truth_where_treating_suspensions_as_failures_does_not():
    rng = np.random.default_rng(0)
    life = 200.0 * rng.weibull(3.0, 4000)
    stop = rng.uniform(50, 400, life.size)  # preventive replacements / still running
    t, censored = np.minimum(life, stop), stop < life
    assert 0.15 < censored.mean() < 0.6
    fit = fit_weibull(t, censored)
    assert fit.shape == pytest.approx(3.0, rel=0.08) and fit.scale == pytest.approx(200.0, rel=0.04)
    assert fit.n_censored == int(censored.sum())
    naive = fit_weibull(t)  # every end counted as a failure: lives look shorter
    assert naive.scale < 0.9 * 200.0


def test_weibull_needs_failures():
    with pytest.raises(TwinflowError, match="2 observed failures"):
        fit_weibull([10.0, 20.0], [True, False])


def test_prior_alone_is_the_conditional_survival():
    fit = fit_weibull(200.0 * np.random.default_rng(1).weibull(3.0, 3000))
    ages = np.array([50.0, 150.0, 250.0])
    grid, post = remaining_life_posterior(ages, np.full(3, np.nan), fit, None, cap=None, grid_step=0.5)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    for a, p in zip(ages, prob_within(grid, post, 30.0)):
        exact = 1 - fit.survival(a + 30) / fit.survival(a)
        assert p == pytest.approx(exact, abs=2e-3)
    # An older asset is more likely to fail within the horizon (increasing hazard, shape > 1).
    p = prob_within(grid, post, 30.0)
    assert p[0] < p[1] < p[2]


def test_a_precise_model_moves_the_posterior_to_its_estimate_and_a_capped_one_defers_to_the_prior():
    rng = np.random.default_rng(2)
    true = rng.uniform(0, 125, 5000)
    errors = ErrorDensity.from_residuals(true, true + rng.normal(0, 5, true.size))
    fit = fit_weibull(200.0 * rng.weibull(3.0, 3000))
    grid, post = remaining_life_posterior([150.0, 150.0], [12.0, 125.0], fit, errors, cap=125.0)
    q = quantiles(grid, post, [0.05, 0.5, 0.95])
    assert 5 < q[0, 1] < 20 and q[0, 2] - q[0, 0] < 25  # near 12, about +-2 sd
    p = prob_within(grid, post, 30.0)
    assert p[0] > 0.95 and p[1] < 0.05
    assert q[1, 1] > 110  # at the cap: "at least ~125" is all the model says, the prior says the rest


def _fleet(n_assets=40, seed=0):
    """Standardised readings: healthy noise with a per-asset offset; the second half of each history
    drifts along a fixed direction by an amount that grows with the asset's degradation."""
    rng = np.random.default_rng(seed)
    rows, codes, degr = [], [], rng.uniform(0, 1, n_assets)
    direction = np.array([1.0, -0.5, 0.8, 0.0])
    for i in range(n_assets):
        n = 80
        z = rng.normal(0, 1, (n, 4)) + rng.normal(0, 0.2, 4)
        z[n // 2:] += np.linspace(0, 3 * degr[i], n - n // 2)[:, None] * direction
        rows.append(z)
        codes += [i] * n
    return np.vstack(rows), np.array(codes), degr


def test_anomaly_score_ranks_degradation_without_labels_and_names_the_channels():
    z, codes, degr = _fleet()
    regime = np.zeros(len(z), dtype=np.int64)
    base = anomaly.fit_baseline(z, regime, codes, ["a", "b", "c", "d"], n_regimes=1, window=10)
    score, hi, contrib, used = anomaly.score_recent(z, regime, codes, base)
    assert spearman(score, degr) > 0.8 and spearman(hi, degr) < -0.6
    np.testing.assert_allclose(contrib.sum(axis=1), score ** 2, rtol=1e-9)
    ev = anomaly.top_channels(contrib, None, ["a", "b", "c", "d"], k=2)
    worst = int(np.argmax(degr))
    assert ev[worst].split()[0] in {"a", "c"} and (used == 10).all()


def test_at_risk_is_announced_once_per_band_rise_and_again_after_recovery():
    def run(bands, previous):
        cur = pd.DataFrame({"asset_id": ["x", "y"], "band_rank": bands})
        fire, stored = alerts.announce(cur, previous, "high")
        return fire.tolist(), pd.DataFrame({"asset_id": ["x", "y"], "announced_band": stored})

    fire, state = run([2, 1], None)  # x high: announced; y elevated: below the alert band
    assert fire == [True, False]
    fire, state = run([2, 2], state)  # x still high: quiet; y rose to high: announced
    assert fire == [False, True]
    fire, state = run([3, 2], state)  # x worsened to critical: announced again
    assert fire == [True, False]
    fire, state = run([2, 0], state)  # x eased to high (still at risk): quiet; y recovered
    assert fire == [False, False]
    fire, state = run([2, 2], state)  # y at risk again after recovering: announced
    assert fire == [False, True]


def _scored_rows():
    return pd.DataFrame({
        "asset_id": ["7", "9"], "action": ["maintain within 4", "no action before the next run"],
        "due_by": ["cycle 120", ""], "due_in": [4.0, 80.0], "time_unit": ["cycle", "cycle"],
        "risk_band": ["critical", "low"], "p_fail": [0.9, 0.01], "alert_horizon": [30.0, 30.0],
        "rul_estimate": [9.0, 110.0], "rul_low": [0.0, 80.0], "rul_high": [30.0, 140.0],
        "health_index": [0.0, 0.9], "expected_cost": [40000.0, 1000.0], "anomaly_score": [7.5, 1.0],
        "evidence": ["s11↑ 40%, s4↑ 30%", ""]})


def test_work_orders_validate_against_the_schema_and_export_atomically(tmp_path):
    orders = workorders.work_orders(_scored_rows(), dataset="test_fd001", run_key="k1",
                                    links={"mlflow_run": "http://mlflow/#/runs/r"})
    assert [o["asset"] for o in orders] == ["7"] and workorders.validate(orders) == []
    bad = [{**orders[0], "priority": "urgent"}, {k: v for k, v in orders[0].items() if k != "due_by"},
           {**orders[0], "p_failure": 1.5}]
    errs = workorders.validate(bad)
    assert any("urgent" in e for e in errs) and any("due_by" in e for e in errs) and any("1.5" in e for e in errs)
    j, c = workorders.export(orders, tmp_path, meta={"dataset": "test_fd001"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work_order.schema.json", "work_orders.csv",
                                                          "work_orders.json"]
    assert pd.read_csv(c).asset.astype(str).tolist() == ["7"]


def test_drift_flags_the_shifted_channel_per_regime():
    from twinflow.tasks.health import drift

    rng = np.random.default_rng(3)
    ref = rng.normal(0, 1, (4000, 3))
    ref_regime = rng.integers(0, 2, 4000)
    cur = rng.normal(0, 1, (1000, 3))
    cur_regime = rng.integers(0, 2, 1000)
    cur[cur_regime == 1, 2] += 1.0  # channel c shifts in regime 1 only
    table = drift.drift_table(ref, ref_regime, cur, cur_regime, ["a", "b", "c"])
    assert set(table.regime) == {"all", "0", "1"}
    bad = drift.drifted(table, psi_threshold=0.25)
    assert set(zip(bad.channel, bad.regime)) == {("c", "1")} or set(bad.channel) == {"c"}
    assert ("c", "1") in set(zip(bad.channel, bad.regime))
    assert table.set_index(["channel", "regime"]).loc[("a", "all"), "psi"] < 0.05
    assert drift.psi(ref[:, 0], ref[:, 0]) == pytest.approx(0.0, abs=1e-12)


# The scoring path's fleet-wide forms give exactly what the per-asset forms they replaced gave: the
# references below are those forms, verbatim.

def _top_channels_per_asset(contrib, recent_sign, channels, k=3):
    out = []
    for i in range(contrib.shape[0]):
        row = contrib[i]
        if not np.isfinite(row).any():
            out.append("")
            continue
        order = np.argsort(-np.nan_to_num(row, nan=-np.inf))[:k]
        total = np.nansum(np.maximum(row, 0.0)) or 1.0
        parts = []
        for j in order:
            if row[j] <= 0:
                continue
            sign = "" if recent_sign is None else ("↑" if recent_sign[i, j] > 0 else "↓")
            parts.append(f"{channels[j]}{sign} {100 * row[j] / total:.0f}%")
        out.append(", ".join(parts))
    return out


def _score_recent_prefix_counts(z, regime, asset_codes, baseline):
    """The window means as the fleet-wide prefix sums gave them before (differences of running sums)."""
    starts = np.flatnonzero(np.r_[True, asset_codes[1:] != asset_codes[:-1]])
    ends = np.r_[starts[1:], len(asset_codes)]
    centred = z - baseline.regime_mean[regime]
    finite = np.isfinite(centred)
    csum = np.vstack([np.zeros(z.shape[1]), np.cumsum(np.where(finite, centred, 0.0), axis=0)])
    ccnt = np.vstack([np.zeros(z.shape[1]), np.cumsum(finite, axis=0)])
    lo = np.maximum(ends - baseline.window, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (csum[ends] - csum[lo]) / (ccnt[ends] - ccnt[lo])


def _window_means_per_asset(z, regime, asset_codes, baseline):
    """Each asset's last-window mean, one asset and channel at a time: the window's finite values summed in order."""
    starts = np.flatnonzero(np.r_[True, asset_codes[1:] != asset_codes[:-1]])
    ends = np.r_[starts[1:], len(asset_codes)]
    centred = z - baseline.regime_mean[regime]
    out = np.full((len(starts), z.shape[1]), np.nan)
    for i, (s, e) in enumerate(zip(starts, ends)):
        for j in range(z.shape[1]):
            total, count = 0.0, 0
            for v in centred[max(s, e - baseline.window):e, j]:
                if np.isfinite(v):
                    total += v
                    count += 1
            if count:
                out[i, j] = total / count
    return out


def test_the_fleet_wide_evidence_and_window_means_equal_the_per_asset_ones_bit_for_bit():
    rng = np.random.default_rng(3)
    channels = [f"c{j}" for j in range(9)]
    contrib = rng.normal(size=(500, 9))
    contrib[::7] = np.round(contrib[::7], 1)  # ties
    contrib[::11, 2] = np.nan
    contrib[5] = np.nan
    contrib[6] = -np.abs(contrib[6])  # nothing positive: no evidence
    contrib[8, :3] = 0.0
    contrib[9, 2:] = np.nan  # fewer finite channels than k: a NaN is among the top 3
    sign = rng.normal(size=contrib.shape)
    for s in (None, sign):
        assert anomaly.top_channels(contrib, s, channels, 3) == _top_channels_per_asset(contrib, s, channels, 3)

    lengths = rng.integers(1, 40, 300)
    codes = np.repeat(np.arange(300), lengths)
    z = rng.normal(size=(len(codes), 4)) * 1e3 + 5e4  # large sums: rounding would show
    z[rng.random(z.shape) < 0.2] = np.nan
    z[codes == 4] = np.nan
    regime = rng.integers(0, 2, len(codes))
    base = anomaly.Baseline(list("abcd"), rng.normal(size=(2, 4)), np.eye(4), np.sort(rng.random(50)), 10, 50)
    score, hi, contrib_, used = anomaly.score_recent(z, regime, codes, base)
    recent = _window_means_per_asset(z, regime, codes, base)
    delta = np.where(np.isfinite(recent), recent, 0.0)
    want = np.sqrt(np.maximum((delta * (delta @ base.precision)).sum(axis=1), 0.0))
    want[~np.isfinite(recent).any(axis=1)] = np.nan
    np.testing.assert_array_equal(score, want)
    # The fleet-wide prefix sums this replaced carried the rounding of every row before each window:
    # the same means to that rounding (relative 1e-12 at these magnitudes), not bit for bit.
    before = _score_recent_prefix_counts(z, regime, codes, base)
    np.testing.assert_allclose(recent, before, rtol=1e-12, atol=0)


def test_the_fleet_wide_bands_and_horizon_json_equal_the_per_asset_ones():
    import json

    from twinflow.tasks.health.params import HealthParams, band_of, bands_of
    from twinflow.tasks.health.score import _by_horizon_json

    rng = np.random.default_rng(4)
    p = rng.random(400)
    p[::9] = np.nan
    p[1:4] = HealthParams().band_thresholds  # exactly on a threshold
    p_by = {10.0: p, 30.0: np.sqrt(p), 2.5: p / 3}
    horizons = sorted(p_by)
    want = [json.dumps({f"{h:g}": (None if not np.isfinite(p_by[h][i]) else round(float(p_by[h][i]), 6))
                        for h in horizons}) for i in range(len(p))]
    assert _by_horizon_json(p_by, horizons, len(p)) == want
    thresholds = HealthParams().band_thresholds
    assert bands_of(p, thresholds).tolist() == [band_of(x, thresholds) for x in p]


def test_the_posterior_summarised_in_chunks_equals_one_pass_over_the_fleet_bit_for_bit():
    from twinflow.tasks.health.lifetime import posterior_summary

    rng = np.random.default_rng(5)
    life = fit_weibull(rng.weibull(4.0, 200) * 220)
    true = rng.uniform(0, 150, 400)
    errors = ErrorDensity.from_residuals(true, np.minimum(true, 125) + rng.normal(0, 15, true.size))
    ages = rng.uniform(0, 300, 1000)
    rul = np.where(rng.random(1000) < 0.1, np.nan, rng.uniform(0, 140, 1000))  # some assets without an estimate
    grid, post = remaining_life_posterior(ages, rul, life, errors, cap=125.0)
    horizons, qs = [10.0, 30.0, 55.5], [0.1, 0.5, 0.9, 0.37]
    for chunk in (1, 7, 8, 256, 5000):  # rounded up to whole blocks of 4 rows (see posterior_summary)
        g, grid_max, p, q = posterior_summary(ages, rul, life, errors, cap=125.0, horizons=horizons, qs=qs, chunk=chunk)
        np.testing.assert_array_equal(g, grid)
        np.testing.assert_array_equal(p, np.stack([prob_within(grid, post, h) for h in horizons], axis=1))
        np.testing.assert_array_equal(q, quantiles(grid, post, qs))
    # A few assets' posteriors again on the fleet's grid (the risk report's fans): the same rows.
    some = np.array([3, 999, 0, 512])
    _, again = remaining_life_posterior(ages[some], rul[some], life, errors, cap=125.0, grid_max=grid_max)
    np.testing.assert_array_equal(again, post[some])


def test_the_fleet_wide_recommendations_equal_the_per_asset_ones():
    from twinflow.tasks.health.params import HealthParams
    from twinflow.tasks.health.score import recommend, recommend_fleet

    rng = np.random.default_rng(6)
    params = HealthParams()
    q_due = rng.uniform(-1, 3 * max(params.horizons), 2000)
    q_due[::13] = np.nan
    q_due[::17] = 0.4  # "maintain now"
    q_due[5] = params.next_run
    q_due[6] = max(params.horizons)
    p_by = {h: rng.random(2000) for h in params.horizons}
    p_by[max(params.horizons)][::19] = np.nan
    actions, due, cost = recommend_fleet(p_by, q_due, params)
    want = [recommend({h: p_by[h][i] for h in params.horizons}, q_due[i], params) for i in range(2000)]
    assert actions == [w[0] for w in want]
    np.testing.assert_array_equal(due, [w[1] for w in want])
    np.testing.assert_array_equal(cost, [w[2] for w in want])
    assert {"maintain now", "no estimate", "no action before the next run"} <= set(actions)
    assert any(a.startswith("schedule maintenance within") for a in actions)


def test_the_baselines_window_means_in_one_call_equal_one_nanmean_per_window_bit_for_bit():
    import warnings

    rng = np.random.default_rng(7)
    z = rng.normal(size=(3000, 5)) * 1e3 + 4e4
    z[rng.random(z.shape) < 0.1] = np.nan
    z[100:140, 2] = np.nan  # a window with a channel never read
    starts = np.array([0, 90, 500, 503, 1700])
    ends = np.array([90, 500, 503, 1700, 3000])
    for window, stride in ((10, 5), (7, 1), (30, 30)):
        got = anomaly._window_means(z, starts, ends, window, stride)
        want = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for s, e in zip(starts, ends):
                want += [np.nanmean(z[a:a + window], axis=0) for a in range(s, e - window + 1, stride)]
        np.testing.assert_array_equal(got, np.asarray(want))
    assert anomaly._window_means(z, starts[:1], starts[:1] + 3, 10, 5).shape == (0, 5)
