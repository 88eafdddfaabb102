"""The twin on a fleet that is not C-MAPSS: a timestamped pump fleet in the bundled ``pumps`` contract.

Calibration measures lifetimes in the contract's clock unit (hours) from irregular timestamps with
gaps and missing readings, the policy study runs in hours, generated fleets have the pump contract's
shape, and data that cannot determine a twin is a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest

from twin_fixtures import constant_pump_fleet, pump_fleet
from twinflow import lake
from twinflow.contract import load_contract
from twinflow.errors import ConfigError
from twinflow.tasks import twin
from twinflow.tasks.twin.report import policy_markdown
from twinflow.tasks.twin.tasks import calibrate_twin

PUMPS = load_contract("pumps")
SENSORS_DEGRADING = {"vibration_mm_s": 1, "bearing_temp_c": 1, "flow_m3h": -1, "outlet_temp_c": 1}


@pytest.fixture(scope="module")
def pumps(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lake"))
    table, lives = pump_fleet(n_pumps=20, seed=0)
    snap = lake.write_lake_table(table, root, "pumps", "b1", contract=PUMPS)
    model, report = calibrate_twin.fn(twin.TwinParams(seed=1), snap)
    return {"root": root, "snapshot": snap, "lives": lives, "model": model, "report": report, "table": table}


def test_calibration_measures_lifetimes_in_hours_from_timestamps(pumps):
    model, report = pumps["model"], pumps["report"]
    assert report.time_unit == model.time_unit == "h"
    assert report.contract == PUMPS.ref and model.contract == PUMPS
    assert report.n_assets == 20 and report.n_rows == pumps["table"].num_rows
    # Irregular readings, drops and outages do not bend the clock: each life is its hours to failure.
    assert np.allclose(np.sort(report.observed_lifetimes), np.sort(pumps["lives"]), atol=0.1)
    assert 200 < np.median(report.simulated_lifetimes) < 1000  # hours, not 10-minute readings
    assert report.ks_statistic <= 0.3


def test_calibration_uses_the_contracts_channels_and_tolerates_missing_readings(pumps):
    model, report = pumps["model"], pumps["report"]
    assert model.settings == ["speed_rpm", "load_pct"]
    # casing_temp_c has no reading at all: not modelled, and said so.
    assert model.sensors == [c for c in PUMPS.sensors if c != "casing_temp_c"]
    assert any("casing_temp_c" in n for n in report.notes)
    # Two set points make two operating regimes, found from the contract's setting channels.
    assert model.n_regimes == 2
    assert sorted(round(r[0], -1) for r in model.regime_op) == [1480.0, 2960.0]
    gains = dict(zip(model.sensors, model.sensor_gain))
    for name, sign in SENSORS_DEGRADING.items():
        assert np.sign(gains[name]) == sign, name
    # motor current is read on 16 of 20 pumps (and 3% of readings are missing everywhere): still fitted.
    assert gains["motor_current_a"] > 0 and report.sensor_r2["motor_current_a"] > 0.1
    assert report.sensor_r2["vibration_mm_s"] > 0.5
    assert all(np.isfinite(v).all() for v in (model.sensor_base, model.sensor_gain, model.sensor_noise))
    assert abs(model.b_mean - 2.0) <= 0.5  # the fleet's wear grows with the square of age


def test_policy_study_runs_in_the_clock_unit(pumps):
    model, report = pumps["model"], pumps["report"]
    params = twin.TwinParams(n_scenarios=6, batch_scenarios=3, n_assets=10, horizon=3000, intervals=[150, 300],
                             thresholds=[24.0, 72.0], inspect_every=6, backend="numpy",
                             costs=twin.CostModel(failure_downtime=48, planned_downtime=8))
    pols = twin.build_policies(params.intervals, params.thresholds)
    err = twin.RulErrorModel.gaussian(24.0)
    parts = [twin.run_batch(model, pols, params, n, ss, err)
             for n, ss in twin.plan_batches(params.n_scenarios, params.batch_scenarios, params.seed)]
    res = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
    rows, best = twin.summarize(pols, res, params.n_assets, params.horizon)
    by = {r["policy"]: r for r in rows}
    # Run to failure over 3000 h with ~500 h lives and 48 h repairs: about 5.5 failures per pump.
    mean_life = float(np.mean(report.observed_lifetimes))
    expected = params.n_assets * params.horizon / (mean_life + 48)
    assert 0.6 * expected <= by["run_to_failure"]["failures"] <= 1.5 * expected
    assert by["fixed_k150"]["failures"] < by["run_to_failure"]["failures"]
    assert by["fixed_k150"]["planned"] > by["fixed_k300"]["planned"] > 0
    md = policy_markdown(rows, best, params, report, err)
    assert "3000 h" in md and "(+48 h down)" in md and "every 6 h" in md and "/asset-h" in md
    assert "cycle" not in md
    assert "fleet contract pumps v1" in md


def test_generated_fleet_has_the_pump_contracts_shape_and_recalibrates(pumps, tmp_path):
    model = pumps["model"]
    fleet = twin.generate_fleet(40, seed=3, model=model, batch_id="gen")
    assert fleet.schema.equals(PUMPS.lake_schema())
    assert "cycle" not in fleet.column_names and fleet.column("timestamp").null_count == 0
    assert fleet.column("casing_temp_c").null_count == fleet.num_rows  # not modelled: null
    assert fleet.column("vibration_mm_s").null_count == 0
    df = fleet.to_pandas()
    steps = df.groupby("asset_id")["timestamp"].diff().dropna().unique()
    assert list(steps) == [np.timedelta64(3600, "s")]  # one row per clock unit (h)
    snap = lake.write_lake_table(fleet, str(tmp_path), "pumps_twin", "gen", contract=model.contract)
    assert lake.table_contract(str(tmp_path), "pumps_twin") == PUMPS
    refit, report = calibrate_twin.fn(twin.TwinParams(seed=2), snap)
    assert report.time_unit == "h" and report.n_assets == 40
    lives = twin.sample_lifetimes(model, 40, seed=3)
    assert np.allclose(np.sort(report.observed_lifetimes), np.sort(lives))
    assert abs(refit.b_mean - model.b_mean) <= 0.3
    assert report.ks_statistic <= 0.25
    # A twin does not write rows of another fleet's shape.
    with pytest.raises(ConfigError, match="does not fit contract 'cmapss'"):
        twin.generate_fleet(2, model=model, contract=load_contract("cmapss"))


def test_short_lives_are_measured_in_hours_and_the_cmapss_default_cannot_stand_in(pumps, tmp_path):
    table, _ = pump_fleet(n_pumps=3, seed=9)
    snap = lake.write_lake_table(table, str(tmp_path), "pumps", "b1", contract=PUMPS)
    # Every pump lives far less than 10,000 h: none is calibrated on.
    params = twin.TwinParams(min_lifetime=10_000)
    with pytest.raises(twin.NoRunToFailureData, match="shorter than 10000 h"):
        calibrate_twin.fn(params, snap)
    with pytest.raises(twin.NoRunToFailureData, match="cannot stand in for 'pumps'"):
        calibrate_twin.fn(params.model_copy(update={"on_no_run_to_failure": "defaults"}), snap)


@pytest.mark.parametrize("all_nan, match", [
    (False, r"no sensor channel .* varies \(constant: inlet_temp_c, "),
    (True, r"none of the sensor channels .* has a reading"),
])
def test_degenerate_pump_data_is_a_clear_error(tmp_path, all_nan, match):
    snap = lake.write_lake_table(constant_pump_fleet(all_nan=all_nan), str(tmp_path), "pumps", "b1", contract=PUMPS)
    with pytest.raises(twin.DegenerateCalibration, match=match):
        calibrate_twin.fn(twin.TwinParams(), snap)


def test_sensors_that_do_not_trend_with_wear_are_a_clear_error(tmp_path):
    table, _ = pump_fleet(n_pumps=6, seed=2, wear=0.0)  # sensors follow the regimes and scatter, no more
    snap = lake.write_lake_table(table, str(tmp_path), "pumps", "b1", contract=PUMPS)
    with pytest.raises(twin.DegenerateCalibration, match="trends with wear"):
        calibrate_twin.fn(twin.TwinParams(), snap)
