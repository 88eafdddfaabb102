"""The twin gate: promotion on the maintenance cost a model leads to, with real MLflow (SQLite) and Prefect."""

from __future__ import annotations

import json
import logging
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from train_fixtures import cmapss_frame, write_features
from twin_fixtures import pump_fleet
from twinflow import lake
from twinflow.contract import load_contract
from twinflow.tasks.promotion import (
    PromotionFloor,
    TwinCost,
    TwinGateParams,
    check_floor,
    compare_twin_costs,
    error_model_of,
    fleet_mean_life_predictions,
    policy_costs,
)
from twinflow.tasks.registry import (
    CHALLENGER,
    CHAMPION,
    Decision,
    decide_gate,
    decide_promotion,
    gate_twin,
    promotion_gate,
    twin_comparison,
)
from twinflow.tasks.train.eval import regression_metrics
from twinflow.tasks.train import TrainParams
from twinflow.tracking import configure_mlflow, tracked_run

GATE = TwinGateParams(n_scenarios=30, n_assets=15, horizon=400)


def _predictions():
    """True RUL and two models: an early-biased champion and a lower-RMSE challenger that is late on 15%."""
    rng = np.random.default_rng(7)
    true = np.minimum(rng.uniform(0, 160, 200), 125.0)
    champion = true - 12 + rng.normal(0, 5, true.size)
    challenger = true + rng.normal(0, 3, true.size) + np.where(rng.random(true.size) < 0.15, 28.0, 0.0)
    return true, challenger, champion


def _rmse(p, t):
    return float(np.sqrt(np.mean((p - t) ** 2)))


def _cost(m, lo, hi, costs=(1.0, 2.0)):
    return TwinCost(source="x", best_policy="p", expected_cost=m, cost_ci_low=lo, cost_ci_high=hi, p_best=1.0,
                    scenario_costs=list(costs))


def test_twin_rule_ci_and_margin():
    assert compare_twin_costs(_cost(90, 85, 95), _cost(110, 100, 120)).promote
    assert not compare_twin_costs(_cost(95, 85, 101), _cost(110, 100, 120)).promote  # CIs overlap
    assert compare_twin_costs(_cost(95, 85, 101), _cost(110, 100, 120), "margin", 0.1).promote  # 15 >= 11
    assert not compare_twin_costs(_cost(105, 85, 101), _cost(110, 100, 120), "margin", 0.1).promote  # 5 < 11
    paired = compare_twin_costs(_cost(1, 0, 2, costs=(1, 2, 3)), _cost(3, 2, 4, costs=(3, 4, 5)))
    assert paired.paired_saving == pytest.approx(2.0) and paired.paired_saving_ci == pytest.approx((2.0, 2.0))


def test_modes_combine_the_rmse_rule_and_the_twin():
    rmse_yes = decide_promotion(10.0, 12.0, 0.0, challenger_version="2", champion_version="1", time_unit="cycle")
    twin_no = compare_twin_costs(_cost(120, 110, 130), _cost(100, 95, 105))
    twin_yes = compare_twin_costs(_cost(80, 75, 85), _cost(100, 95, 105))
    assert decide_gate("rmse", rmse_yes, twin_no).promote
    assert not decide_gate("twin", rmse_yes, twin_no).promote
    assert not decide_gate("both", rmse_yes, twin_no).promote
    assert decide_gate("both", rmse_yes, twin_yes).promote
    rmse_no = decide_promotion(13.0, 12.0, 0.0, challenger_version="2", champion_version="1", time_unit="cycle")
    assert decide_gate("twin", rmse_no, twin_yes).promote and not decide_gate("both", rmse_no, twin_yes).promote
    # No evidence from the twin: the champion stays; no champion at all: the first model is promoted.
    unavailable = twin_comparison(None, None, GATE)
    assert unavailable.promote is None and not decide_gate("twin", rmse_yes, unavailable).promote
    assert decide_gate("both", decide_promotion(10.0, None, 0.0, challenger_version="1",
                                                time_unit="cycle"), unavailable).promote
    with pytest.raises(ValueError, match="promotion mode"):
        decide_gate("cost", rmse_yes, twin_yes)
    table = decide_gate("both", rmse_yes, twin_no).table().set_index("role")
    assert table.loc[CHALLENGER, "twin_expected_cost"] == 120 and table.loc[CHAMPION, "twin_expected_cost"] == 100


def test_twin_study_is_paired_and_reproducible():
    true, challenger, _ = _predictions()
    err = error_model_of(true, challenger, "c")
    a, b = policy_costs(err, GATE), policy_costs(err, GATE)
    assert a.scenario_costs == b.scenario_costs and len(a.scenario_costs) == GATE.n_scenarios
    assert a.cost_ci_low < a.expected_cost < a.cost_ci_high and 0 < a.p_best <= 1
    assert {r["policy"] for r in a.policies} == {"run_to_failure", *(f"predictive_rul{x:g}" for x in GATE.thresholds)}


@pytest.fixture
def registry(tmp_path):
    """A real SQLite registry with a champion v1 and a second logged model to gate."""
    from sklearn.dummy import DummyRegressor

    from twinflow.settings import get_settings

    settings = get_settings()
    configure_mlflow(settings)
    client = mlflow.MlflowClient()
    name = settings.mlflow.registered_model
    est = DummyRegressor().fit(np.zeros((4, 1)), np.arange(4.0))
    uris = []
    for i in range(2):
        with tracked_run(f"model-{i}", stage="train"):
            uris.append(mlflow.sklearn.log_model(est, name="model").model_uri)
    v1 = mlflow.register_model(uris[0], name)
    client.set_registered_model_alias(name, CHAMPION, v1.version)
    feats = write_features(cmapss_frame("train", [1, 2]), tmp_path / "features")
    return settings, client, name, uris[1], feats


def _naive(true):
    """A naive predictor's metrics on ``true``: the constant mean (what the floor's baseline stands for)."""
    return regression_metrics(np.full_like(true, true.mean()), true)


def _gate(registry, mode: str, caplog, *, challenger=None, floor: PromotionFloor | None = None):
    from prefect import flow

    settings, client, name, uri, feats = registry
    true, default_challenger, champion = _predictions()
    challenger = default_challenger if challenger is None else challenger
    champ_eval = {"rmse": _rmse(champion, true), "score": 1.0, "true_rul": true.tolist(),
                  "pred_rul": champion.tolist()}

    @flow(name="gate-test")
    def one_gate():
        with tracked_run(f"train-{mode}", stage="train") as run:
            out = promotion_gate(client, name, uri, _rmse(challenger, true), "test-set", feats,
                                 TrainParams(promotion_mode=mode, twin_gate=GATE,
                                             promotion_floor=floor or PromotionFloor()), None,
                                 settings.mlflow_tracking_uri, challenger_true=true, challenger_pred=challenger,
                                 challenger_metrics={"eval_rmse": _rmse(challenger, true), "eval_score": 2.0},
                                 champion_scorer=lambda model_uri: champ_eval, baseline_metrics=_naive(true))
            return out, run.info.run_id

    # The run logger's records reach Prefect's API handler, not the root logger: listen to it directly.
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
            return one_gate()
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.integration
def test_lower_rmse_challenger_with_late_errors_is_refused_by_the_twin_gate(prefect_api, registry, caplog):
    true, challenger, champion = _predictions()
    assert _rmse(challenger, true) < _rmse(champion, true)  # the RMSE rule alone would promote it
    ch, cp = (np.mean(p > true) for p in (challenger, champion))
    assert ch > cp  # ... but it is late more often
    settings, client, name, _, _ = registry

    for mode, version in (("both", "2"), ("twin", "3")):
        gate, run_id = _gate(registry, mode, caplog)
        assert not gate.decision.promote and gate.version == version and gate.aliases == [CHALLENGER]
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
        twin = gate.decision.twin
        assert twin.challenger.expected_cost > twin.champion.expected_cost
        assert twin.challenger.cost_ci_low >= twin.champion.cost_ci_high or twin.promote is False
        # Both costs, their CIs, the RMSEs and scores are in the decision the run logged.
        table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/promotion/decision.json"))
        df = pd.DataFrame(table["data"], columns=table["columns"]).set_index("role")
        assert set(df["decision"]) == {"keep champion"} and set(df["mode"]) == {mode}
        for role in (CHALLENGER, CHAMPION):
            assert np.isfinite(df.loc[role, ["eval_rmse", "eval_score", "twin_expected_cost", "twin_cost_ci_low",
                                             "twin_cost_ci_high"]].astype(float)).all()
        metrics = client.get_run(run_id).data.metrics
        assert metrics["gate_challenger_cost"] == pytest.approx(twin.challenger.expected_cost)
        assert metrics["gate_champion_cost"] == pytest.approx(twin.champion.expected_cost)
        assert client.get_run(run_id).data.tags["twinflow.promotion"] == "kept"
        desc = client.get_model_version(name, version).description
        assert "not promoted" in desc and "Twin" in desc and run_id in desc
        assert "cmapss" in desc  # the data it was trained on
    assert "v1" in client.get_registered_model(name).description
    assert any(f"promotion gate (twin): kept {name} v1" in r.getMessage() for r in caplog.records)

    # The RMSE rule alone promotes the same challenger.
    gate, _ = _gate(registry, "rmse", caplog)
    assert gate.decision.promote and gate.decision.twin is None and gate.aliases == [CHAMPION]
    assert "v4" in client.get_registered_model(name).description

    # The same challenger under an absolute RMSE threshold it misses: refused whatever the relative rule says.
    gate, _ = _gate(registry, "rmse", caplog, floor=PromotionFloor(max_rmse=1.0))
    assert not gate.decision.promote and gate.aliases == [CHALLENGER]
    assert "Absolute floor not met" in gate.decision.reason and "RMSE" in gate.decision.reason


def test_the_floor_checks_the_baseline_and_each_configured_threshold():
    true = np.linspace(0, 125, 50)
    good = {"eval_rmse": 10.0, "eval_score": 100.0, "eval_pi_coverage": 0.9}
    base = {"rmse": 40.0, "score": 5000.0}
    ok = check_floor(good, base, PromotionFloor(max_rmse=20, max_score=500, min_coverage=0.8), time_unit="cycle")
    assert ok.passed and len(ok.met) == 4 and "beats" in ok.reason
    bad = check_floor({**good, "eval_rmse": 45.0}, base, PromotionFloor(), time_unit="cycle")
    assert not bad.passed and "does not beat" in bad.reason and "40.0" in bad.reason
    assert not check_floor(good, base, PromotionFloor(baseline_margin=0.8),
                           time_unit="cycle").passed  # 10 is not < 0.2 * 40
    assert not check_floor(good, base, PromotionFloor(min_coverage=0.95), time_unit="cycle").passed
    assert not check_floor({"eval_rmse": 10.0}, base, PromotionFloor(max_score=500),
                           time_unit="cycle").passed  # no evidence
    assert not check_floor(good, None, PromotionFloor(), time_unit="cycle").passed  # the baseline could not be scored
    assert check_floor(good, None, PromotionFloor(beat_baseline=False), time_unit="cycle").passed
    # The baseline: mean life minus the cycle reached, never negative, capped like the labels.
    assert fleet_mean_life_predictions(200.0, [10, 150, 250], 125.0).tolist() == [125.0, 50.0, 0.0]
    assert fleet_mean_life_predictions(200.0, true).min() >= 0


@pytest.fixture
def fresh_registry(tmp_path):
    """A real SQLite registry with no model yet, and one logged model to gate."""
    from sklearn.dummy import DummyRegressor

    from twinflow.settings import get_settings

    settings = get_settings()
    configure_mlflow(settings)
    est = DummyRegressor().fit(np.zeros((4, 1)), np.arange(4.0))
    with tracked_run("model-0", stage="train"):
        uri = mlflow.sklearn.log_model(est, name="model").model_uri
    feats = write_features(cmapss_frame("train", [1, 2]), tmp_path / "features")
    return settings, mlflow.MlflowClient(), settings.mlflow.registered_model, uri, feats


@pytest.mark.integration
def test_a_first_model_worse_than_the_naive_baseline_is_refused(prefect_api, fresh_registry, caplog):
    settings, client, name, _, _ = fresh_registry
    true, _, _ = _predictions()
    rng = np.random.default_rng(3)
    bad = np.clip(true[::-1] + rng.normal(0, 30, true.size), 0, None)  # unrelated to the truth
    assert _rmse(bad, true) > _naive(true)["rmse"]
    gate, run_id = _gate(fresh_registry, "both", caplog, challenger=bad)
    assert not gate.decision.promote and gate.aliases == [CHALLENGER]
    assert "does not beat the fleet-mean-life baseline" in gate.decision.reason
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, CHAMPION)
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/promotion/decision.json"))
    df = pd.DataFrame(table["data"], columns=table["columns"])
    assert CHAMPION not in set(df["role"]) and set(df["role"]) == {CHALLENGER, "baseline"}
    assert not df.drop(columns=[c for c in df if c.startswith("twin_")]).isna().all(axis=1).any()
    assert client.get_run(run_id).data.tags["twinflow.promotion"] == "kept"
    assert "NOT PROMOTED" in client.get_model_version(name, gate.version).description

    # A good model on the same fresh home: promoted, with the floor it met as the stated reason.
    gate, run_id = _gate(fresh_registry, "both", caplog)
    assert gate.decision.promote and gate.aliases == [CHAMPION] and gate.version == "2"
    assert gate.decision.reason.startswith("No champion yet") and "beats the fleet-mean-life" in gate.decision.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"


@pytest.mark.integration
def test_the_twin_gate_promotes_when_the_challenger_is_cheaper(prefect_api, registry, caplog):
    """Roles swapped: the early-biased model is now the challenger (higher RMSE): the twin promotes it."""
    settings, client, name, uri, feats = registry
    true, late, early = _predictions()
    twin = twin_comparison((true, early), (true, late), GATE)
    assert twin.promote and twin.paired_saving > 0
    rmse = decide_promotion(_rmse(early, true), _rmse(late, true), 0.0, challenger_version="2", champion_version="1",
                            time_unit="cycle")
    assert not rmse.promote and decide_gate("twin", rmse, twin).promote
    assert isinstance(decide_gate("both", rmse, twin), Decision) and not decide_gate("both", rmse, twin).promote


def test_the_twin_gate_studies_the_fleets_own_twin(tmp_path):
    """An hour-clock pump fleet's models are costed on the pump twin (hours), not the FD001 default."""
    pumps = load_contract("pumps")
    table, lives = pump_fleet(n_pumps=12, seed=0)
    snap = lake.write_lake_table(table, str(tmp_path / "lake"), "pumps", "b1", contract=pumps)
    gate = TwinGateParams(n_scenarios=6, n_assets=8, horizon=2000, thresholds=[24.0, 96.0], inspect_every=6,
                          min_lifetime=24)
    twin, why = gate_twin(gate, snap)
    assert why is None and twin.contract == pumps and twin.time_unit == "h"
    true = np.concatenate([np.linspace(float(life), 0.0, 20) for life in lives[:6]])
    pred = true + np.random.default_rng(0).normal(0.0, 24.0, true.size)
    out = twin_comparison((true, pred), None, gate, model=twin)
    assert out.challenger is not None and out.challenger.time_unit == "h" and out.promote is None
    # The same error on the FD001 twin (lives of ~200 cycles, not ~500 h) is a different study.
    fd001 = twin_comparison((true, pred), None, gate)
    assert fd001.challenger.time_unit == "cycle" and fd001.challenger.expected_cost != out.challenger.expected_cost
    # A fleet snapshot that cannot determine a twin: no twin evidence, said so, no stand-in from another fleet.
    none, why = gate_twin(gate.model_copy(update={"min_lifetime": 100_000}), snap)
    assert none is None and "pumps" in why and "run-to-failure" in why


def test_probability_best_is_the_share_of_paired_scenarios_where_a_policy_is_cheapest():
    from twinflow.tasks.twin import prob_best, summarize
    from twinflow.tasks.twin.policies import Policy

    cost = np.array([[1.0, 5.0, 2.0, 3.0],
                     [2.0, 1.0, 2.0, 4.0],
                     [3.0, 6.0, 9.0, 3.0]])
    # scenario 1: policy 0; 2: policy 1; 3: tie 0/1; 4: tie 0/2
    assert prob_best(cost).tolist() == pytest.approx([(1 + 0.5 + 0.5) / 4, (1 + 0.5) / 4, 0.5 / 4])
    pols = [Policy("a", "predictive", 1.0), Policy("b", "predictive", 2.0), Policy("c", "predictive", 3.0)]
    zeros = np.zeros_like(cost)
    rows, best = summarize(pols, {"cost": cost, "downtime": zeros, "failures": zeros, "planned": zeros}, 1, 10)
    assert best == "b" and rows[1]["p_best"] == pytest.approx(0.375) and rows[1]["cost_ci_low"] < 3.0


@pytest.mark.integration
def test_a_new_champion_is_announced_on_the_prefect_server(prefect_api, registry, caplog):
    from twinflow import events as ev

    settings, client, name, _, _ = registry
    kept, _ = _gate(registry, "twin", caplog)  # refused by the twin gate: no event
    gate, run_id = _gate(registry, "rmse", caplog)
    assert gate.decision.promote and not kept.decision.promote
    ev.flush()
    version_run = client.get_model_version(name, gate.version).run_id

    def ours():
        found = [e for e in ev.read_events([ev.MODEL_PROMOTED], resource_prefix=f"twinflow.model.{name}")
                 if e.payload.get("run_id") == version_run]  # both gated versions come from this run
        return found or None

    deadline = time.monotonic() + 60
    found = ours()
    while found is None and time.monotonic() < deadline:
        time.sleep(1.0)
        found = ours()
    assert found is not None and len(found) == 1
    e = found[0]
    assert e.resource.id == f"twinflow.model.{name}"
    assert e.payload["version"] == gate.version and e.payload["model"] == name
    assert e.payload["decision"]["promote"] is True and e.payload["decision"]["mode"] == "rmse"
    assert e.payload["decision"]["champion_version"] == "1"
