"""Descriptions and reasons write every duration in the fleet contract's clock unit, never a fixed word."""

from __future__ import annotations

import re

import pytest

from twinflow.contract import load_contract, unit_label
from twinflow.tasks.promotion import PromotionFloor, check_floor
from twinflow.tasks.registry import apply_floor, decide_promotion, version_description
from twinflow.verdict import metrics_line, pipeline_description, scale_line, train_description

METRICS = {"eval_rmse": 28.04, "eval_mae": 21.5, "eval_bias": -3.2, "eval_score": 411.6, "eval_pi_coverage": 0.88}
ROWS = [{"policy": "fixed_k100", "kind": "fixed_interval", "expected_cost": 2e6},
        {"policy": "predictive_rul20", "kind": "predictive", "expected_cost": 1.5e6}]


def _first_model_decision(time_unit: str, baseline_rmse: float = 40.0):
    decision = decide_promotion(METRICS["eval_rmse"], None, 0.0, challenger_version="1", eval_set="val",
                                time_unit=time_unit)
    base = {"rmse": baseline_rmse, "score": 9000.0}
    return apply_floor(decision, check_floor(METRICS, base, PromotionFloor(max_rmse=35.0), time_unit=time_unit),
                       base)


def _no_cycles(text: str) -> None:
    assert not re.search(r"\bcycles?\b", text), text


@pytest.fixture(scope="module")
def hours() -> str:
    contract = load_contract("pumps")
    assert contract.clock.kind == "timestamp"  # the bundled hour-clock fleet
    return contract.clock.time_unit


def test_the_unit_is_the_contracts_clock_unit(hours):
    assert hours == "h" and unit_label(hours) == "h"
    assert unit_label(load_contract("cmapss").clock.time_unit) == "cycles"
    assert metrics_line(METRICS, time_unit=hours) == \
        "RMSE 28.0 h, MAE 21.5 h, PHM08 score (errors in h) 412, bias -3.2 h, interval coverage 88%"
    assert scale_line(10, 400, 100, time_unit=hours).startswith("expected cost of a fleet of 10 assets over 400 h ")


def test_train_and_pipeline_descriptions_on_an_hour_clock_fleet_say_hours(hours):
    decision = _first_model_decision(hours)
    assert decision.promote and "RMSE 28.0 h beats the fleet-mean-life baseline's 40.0 h" in decision.reason
    assert "≤ 35.0 h" in decision.reason
    train = train_description(model_name="m", version="1", decision=decision, metrics=METRICS, eval_set="val",
                              experiment_id="1", run_id="r", plots=["plots/pred_vs_true.png"], currency="EUR",
                              time_unit=hours,
                              gate_scale=scale_line(20, 500, 40, time_unit=hours))
    assert "RMSE 28.0 h" in train and "baseline on the same rows: RMSE 40.0 h" in train
    pipeline = pipeline_description(promoted=True, model_name="m", version="1", reason=decision.reason,
                                    metrics=METRICS, eval_set="val", policy="predictive_rul20", rows=ROWS,
                                    currency="EUR", scale=scale_line(10, 400, 100, time_unit=hours),
                                    experiment_id="1", links={}, time_unit=hours)
    assert "**PROMOTED**" in pipeline and "RMSE 28.0 h" in pipeline and "over 400 h" in pipeline
    version = version_description(decision, run_link_text="run", data="features", metrics=METRICS)
    assert "Naive fleet-mean-life baseline: RMSE 40.0 h" in version
    for text in (decision.reason, train, pipeline, version, decision.markdown("m"), decision.summary("m")):
        _no_cycles(text)


def test_a_refusal_and_the_relative_rule_state_the_unit(hours):
    refused = _first_model_decision(hours, baseline_rmse=20.0)
    assert not refused.promote and "RMSE 28.0 h does not beat the fleet-mean-life baseline's 20.0 h" in refused.reason
    kept = decide_promotion(19.5, 20.0, 1.0, challenger_version="2", champion_version="1", time_unit=hours)
    assert "0.500 h of RMSE < 1 h" in kept.reason and "1 h of RMSE" in kept.markdown("m")
    _no_cycles(kept.reason + kept.markdown("m"))
    # The C-MAPSS clock counts cycles: the same rule says so.
    assert "RMSE 28.0 cycles" in _first_model_decision("cycle").reason
