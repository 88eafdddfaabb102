"""Lifetimes with suspensions: the censored Weibull fit recovers the truth where treating suspensions
as failures does not, and the Kaplan–Meier check accepts a correct model and rejects a wrong one."""

from __future__ import annotations

import numpy as np
import pytest

from twinflow.tasks.twin.survival import kaplan_meier, km_check, lognormal_fit, weibull_fit

TRUE_SHAPE, TRUE_SCALE = 3.0, 200.0


def censored_fleet(n: int = 400, seed: int = 7, censor_share: float = 0.25):
    """True Weibull lives; a random ~``censor_share`` of assets are renewed preventively before failing."""
    rng = np.random.default_rng(seed)
    life = TRUE_SCALE * rng.weibull(TRUE_SHAPE, n)
    # Preventive replacements at a random age: only the ones before the failure censor the life.
    replace_at = rng.uniform(0.2, 1.0, n) * TRUE_SCALE * 1.2
    chosen = rng.random(n) < censor_share * 1.6
    censored = chosen & (replace_at < life)
    durations = np.where(censored, replace_at, life)
    return durations, ~censored


def test_censored_weibull_fit_recovers_the_true_parameters_within_its_intervals():
    durations, failed = censored_fleet()
    share = 1 - failed.mean()
    assert 0.15 <= share <= 0.30, share  # the 15-30 % censoring
    fit = weibull_fit(durations, failed)
    assert fit.shape_ci[0] <= TRUE_SHAPE <= fit.shape_ci[1], fit
    assert fit.scale_ci[0] <= TRUE_SCALE <= fit.scale_ci[1], fit
    assert fit.failures == int(failed.sum()) and fit.n == len(durations)


def test_treating_replacements_as_failures_is_measurably_biased():
    durations, failed = censored_fleet()
    honest = weibull_fit(durations, failed)
    naive = weibull_fit(durations, np.ones_like(failed))
    # Suspensions counted as failures shorten the lives: the scale's interval no longer holds the truth
    # and lies below the censored fit's estimate.
    assert naive.scale_ci[1] < TRUE_SCALE
    assert naive.scale < honest.scale


def test_uncensored_fit_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(3)
    lives = 150.0 * rng.weibull(2.2, 300)
    fit = weibull_fit(lives, np.ones(300, bool))
    c, _, scale = stats.weibull_min.fit(lives, floc=0)
    assert fit.shape == pytest.approx(c, rel=1e-3) and fit.scale == pytest.approx(scale, rel=1e-3)


def test_censored_lognormal_fit_recovers_the_truth_where_the_failures_alone_do_not():
    rng = np.random.default_rng(5)
    mu, sigma, n = np.log(300.0), 0.4, 600
    life = np.exp(rng.normal(mu, sigma, n))
    # Planned renewals at ages unrelated to the unit's own life: they cut the long lives more often.
    renew = rng.uniform(0.6, 2.0, n) * 300.0
    failed = life <= renew
    durations = np.minimum(life, renew)
    assert 0.3 <= 1 - failed.mean() <= 0.6
    fit = lognormal_fit(durations, failed)
    assert fit.mu == pytest.approx(mu, abs=0.05) and fit.sigma == pytest.approx(sigma, abs=0.05)
    assert fit.failures == int(failed.sum()) and fit.n == n
    assert np.log(durations[failed]).mean() < mu - 0.1  # the failures alone: biased short
    assert km_check(fit.survival, kaplan_meier(durations, failed)).passed


def test_lognormal_fit_without_suspensions_is_the_sample_moments_and_needs_two_failures():
    x = np.array([100.0, 150.0, 220.0, 400.0])
    fit = lognormal_fit(x, np.ones(4, bool))
    assert fit.mu == pytest.approx(np.log(x).mean()) and fit.sigma == pytest.approx(np.log(x).std())
    with pytest.raises(ValueError, match="at least 2 observed failures"):
        lognormal_fit([10, 20, 30], [True, False, False])


def test_kaplan_meier_bands_stay_in_unit_interval_and_check_tells_right_from_wrong():
    durations, failed = censored_fleet(seed=11)
    km = kaplan_meier(durations, failed)
    assert all(0.0 <= lo <= s <= up <= 1.0 for lo, s, up in zip(km.lower, km.survival, km.upper))
    assert all(a >= b for a, b in zip(km.survival, km.survival[1:]))
    good = km_check(weibull_fit(durations, failed), km)
    assert good.passed, good
    wrong = weibull_fit(durations, np.ones_like(failed))  # the biased model
    assert not km_check(wrong, km).passed


def test_kaplan_meier_without_censoring_is_the_empirical_survival():
    km = kaplan_meier([1, 2, 2, 3], [True, True, True, True])
    assert km.times == [1, 2, 3] and km.survival == pytest.approx([0.75, 0.25, 0.0])


def test_too_few_failures_and_bad_durations_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 observed failures"):
        weibull_fit([10, 20, 30], [True, False, False])
    with pytest.raises(ValueError, match="positive"):
        weibull_fit([10, 0, 30], [True, True, True])


def test_conditional_failure_probability():
    fit = weibull_fit(*censored_fleet())
    young, old = fit.conditional_failure(np.array([10.0, 250.0]), 20.0)
    assert 0.0 <= young < old <= 1.0  # wear-out: an old asset is likelier to fail in the next 20


def test_cmapss_fd001_lives_pass_the_km_check_with_a_failure_free_period():
    import pandas as pd

    from twinflow.data import cmapss_path

    frame = pd.read_csv(cmapss_path("train_FD001.txt.gz"), sep=r"\s+", header=None)
    lives = frame.groupby(0)[1].max().to_numpy(float)  # every training engine ran to failure
    failed = np.ones(len(lives), bool)
    km = kaplan_meier(lives, failed)
    three = weibull_fit(lives, failed, location=True)
    assert 0 < three.location < lives.min()
    assert km_check(three, km).passed
    # No engine fails before cycle 128: a two-parameter Weibull misses that and the check says so.
    assert not km_check(weibull_fit(lives, failed), km).passed
    assert three.loglik > weibull_fit(lives, failed).loglik
