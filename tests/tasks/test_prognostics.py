"""Prognostics metrics against small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from twinflow.tasks.prognostics import (
    at_lambda,
    conformal_half_width,
    error_asymmetry,
    in_alpha_cone,
    prediction_interval,
    prognostic_horizon,
    prognostics_report,
    relative_accuracy,
)


def test_alpha_cone_and_relative_accuracy():
    true = np.array([100.0, 50.0, 10.0, 0.0])
    pred = np.array([115.0, 61.0, 10.0, 2.0])
    # |err| <= 0.2 * true: 15 <= 20 yes, 11 <= 10 no, 0 <= 2 yes, 2 <= 0 no
    assert in_alpha_cone(true, pred, 0.2).tolist() == [True, False, True, False]
    # RA over true > 0: 1 - 15/100 = 0.85, 1 - 11/50 = 0.78, 1 - 0 = 1
    assert relative_accuracy(true, pred) == pytest.approx((0.85 + 0.78 + 1.0) / 3)
    assert relative_accuracy([0.0], [3.0]) is None


def test_early_late_asymmetry():
    a = error_asymmetry(true=[10, 10, 10, 10], pred=[16, 12, 7, 10])
    # errors +6, +2, -3, 0: late 8, early 3, |total| 11
    assert a["late_fraction"] == 0.5 and a["early_fraction"] == 0.25
    assert a["late_mean_error"] == pytest.approx(2.0) and a["early_mean_error"] == pytest.approx(0.75)
    assert a["asymmetry"] == pytest.approx((8 - 3) / 11)
    assert error_asymmetry([1.0, 2.0], [1.0, 2.0])["asymmetry"] == 0.0
    assert error_asymmetry([5.0], [1.0])["asymmetry"] == -1.0


def test_prognostic_horizon_is_the_true_rul_from_which_predictions_stay_in_band():
    cycles = np.arange(1, 6)
    true = np.array([40.0, 30.0, 20.0, 10.0, 0.0])
    pred = np.array([80.0, 31.0, 50.0, 12.0, 1.0])  # in band (±5) from the 4th row on, not before
    assert prognostic_horizon(cycles, true, pred, band=5.0) == 10.0
    assert prognostic_horizon(cycles, true, true, band=5.0) == 40.0  # always inside: the whole window
    assert prognostic_horizon(cycles, true, true + [0, 0, 0, 0, 9], band=5.0) == 0.0  # last one outside
    assert at_lambda(np.array([10.0, 20.0, 30.0, 40.0, 50.0]), 0.5) == 2


def test_conformal_quantile_is_the_ceil_n_plus_1_level_order_statistic():
    res = np.arange(1.0, 10.0)  # |residuals| 1..9, n = 9
    # ceil(10 * 0.8) = 8 -> the 8th smallest = 8
    assert conformal_half_width(np.zeros(9), res, 0.8) == 8.0
    assert math.isinf(conformal_half_width(np.zeros(9), res, 0.95))  # ceil(9.5) = 10 > n
    pi = prediction_interval(np.zeros(9), res, eval_true=[0, 0, 0, 0], eval_pred=[1, 8, 9, -7], level=0.8)
    assert pi.half_width == 8.0 and pi.coverage == 0.75 and pi.n_evaluated == 4 and pi.n_calibration == 9
    with pytest.raises(ValueError, match="level"):
        conformal_half_width([0.0], [1.0], 1.0)


def test_conformal_interval_covers_at_the_nominal_rate_on_exchangeable_data():
    rng = np.random.default_rng(0)
    cal, ev = rng.normal(0, 10, 2000), rng.normal(0, 10, 20000)
    pi = prediction_interval(np.zeros_like(cal), cal, np.zeros_like(ev), ev, level=0.9)
    assert 0.88 < pi.coverage < 0.92 and pi.half_width == pytest.approx(16.45, rel=0.06)


def test_report_point_and_trajectory_metrics():
    # Test protocol: one row per asset, no trajectories.
    point = prognostics_report([100.0, 50.0], [110.0, 70.0], ["u1", "u2"], [30, 40])
    assert point.alpha_accuracy == 0.5 and point.prognostic_horizon is None and point.alpha_lambda == {}
    assert point.late_fraction == 1.0 and point.asymmetry == 1.0
    m = point.metrics("eval")
    assert m["eval_alpha_accuracy"] == 0.5 and "eval_prognostic_horizon" not in m
    # Two assets of 5 cycles: the first exact, the second 50% late everywhere.
    true = np.array([40.0, 30, 20, 10, 0] * 2)
    pred = np.r_[true[:5], 1.5 * true[5:]]
    assets = ["a"] * 5 + ["b"] * 5
    rep = prognostics_report(true, pred, assets, list(range(1, 6)) * 2, alpha=0.2, ph_band=5.0)
    # λ = 0.5 -> cycle 3 (true 20): a exact (in cone), b 30 vs 20 (out).
    assert rep.alpha_lambda["0.5"] == 0.5
    assert rep.relative_accuracy_lambda["0.5"] == pytest.approx((1.0 + 0.5) / 2)
    # PH: a 40; b in ±5 only where 0.5 * true <= 5, i.e. true 10 and 0 -> 10. Mean 25.
    assert rep.prognostic_horizon == 25.0
    assert rep.metrics("val")["val_alpha_lambda_050"] == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        prognostics_report([1.0, 2.0], [1.0])


def test_the_figures_label_rul_in_the_clock_unit():
    from twinflow.tasks.prognostics import plot_alpha_lambda, plot_error_asymmetry, plot_prediction_intervals

    true = np.array([30.0, 20.0, 10.0, 0.0, 25.0, 15.0, 5.0, 0.0])
    pred = true + np.array([2.0, -1.0, 3.0, 1.0, -2.0, 0.0, 1.0, 2.0])
    assets = np.array(["a"] * 4 + ["b"] * 4)
    times = np.array([1.0, 11.0, 21.0, 31.0, 1.0, 11.0, 21.0, 26.0])
    interval = prediction_interval(true, pred, true, pred, 0.9)
    figs = [plot_alpha_lambda(true, pred, assets, times, time_unit="h"),
            plot_error_asymmetry(true, pred, time_unit="h"),
            plot_prediction_intervals(true, pred, interval, time_unit="h")]
    labels = [f.axes[0].get_xlabel() + " | " + f.axes[0].get_ylabel() for f in figs]
    assert all("(h)" in lab and "cycle" not in lab for lab in labels), labels
    assert "(cycles)" in plot_error_asymmetry(true, pred, time_unit="cycle").axes[0].get_xlabel()
