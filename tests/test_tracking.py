"""MLflow UI links: every link twinflow writes opens the classic model-training view."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from twinflow.tasks.registry import run_link
from twinflow.tracking import HEADLINE_METRICS, HEADLINE_VIEW_ID, HEADLINE_VIEW_TAG, configure_mlflow, ui_link
from twinflow.verdict import metrics_line, mlflow_route, policy_verdict, trial_run_name


def _route_and_query(url: str) -> tuple[str, dict[str, list[str]]]:
    # The UI routes inside the fragment; its router reads the query string after the route.
    route, _, query = urlparse(url).fragment.partition("?")
    return route, parse_qs(query)


def test_links_name_the_route_and_the_classic_view():
    cases = {
        ui_link("http://h:5000/", experiment_id="3", view=None): "/experiments/3/runs",
        ui_link("http://h:5000", experiment_id="3", run_id="abc"): "/experiments/3/runs/abc",
        ui_link("http://h:5000", model="twinflow rul"): "/models/twinflow%20rul",
        ui_link("http://h:5000", model="m", version=2): "/models/m/versions/2",
        ui_link("http://h:5000"): "/experiments",
    }
    for url, route in cases.items():
        assert url.startswith("http://h:5000/#/"), url
        assert _route_and_query(url) == (route, {"workflowType": ["machine_learning"]}), url
    # The runs table opens with the headline-metrics view: its key on the runs tab's own route (the
    # experiment route redirects there and drops the query).
    assert _route_and_query(ui_link("http://h:5000", experiment_id="3")) == \
        ("/experiments/3/runs", {"viewStateShareKey": [HEADLINE_VIEW_ID], "workflowType": ["machine_learning"]})


def test_the_experiment_carries_the_headline_view_as_a_saved_view():
    import json

    import mlflow

    from twinflow.settings import get_settings

    exp_id = configure_mlflow(get_settings())
    client = mlflow.MlflowClient()
    value = client.get_experiment(exp_id).tags[HEADLINE_VIEW_TAG]
    envelope = json.loads(value)  # the UI lists it under Views by name and applies its state
    assert envelope["name"] and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert [f"metrics.`{m}`" for m in HEADLINE_METRICS] == \
        [c for c in state["selectedColumns"] if c.startswith("metrics.")]
    assert {"eval_rmse", "eval_score", "promoted", "recommended_expected_cost"} <= set(HEADLINE_METRICS)
    # Written once: configuring again keeps the tag (and its creation time) as it is.
    assert configure_mlflow(get_settings()) == exp_id
    assert client.get_experiment(exp_id).tags[HEADLINE_VIEW_TAG] == value


def test_descriptions_round_with_units_and_link_in_the_classic_view():
    assert metrics_line({"eval_rmse": 12.814599194242499, "eval_score": 411.62, "eval_pi_coverage": 0.8812,
                         "other": 1.0}, time_unit="cycle") == "RMSE 12.8 cycles, PHM08 score 412, interval coverage 88%"
    assert mlflow_route(experiment_id="1", run_id="r", artifact="plots/a.png") == \
        "#/experiments/1/runs/r/artifacts/plots/a.png?workflowType=machine_learning"
    rows = [{"policy": "run_to_failure", "kind": "run_to_failure", "expected_cost": 3e6},
            {"policy": "fixed_k100", "kind": "fixed_interval", "expected_cost": 2e6},
            {"policy": "fixed_k150", "kind": "fixed_interval", "expected_cost": 2.5e6},
            {"policy": "predictive_rul20", "kind": "predictive", "expected_cost": 1.5e6}]
    text = policy_verdict(rows, "predictive_rul20", "EUR")
    assert "1,500,000 EUR" in text and "500,000 EUR (25%) cheaper" in text and "`fixed_k100`" in text
    assert trial_run_name(3, {"learning_rate": 0.05, "max_depth": 6}, 18.4231) == "val 18.42 · t03 · lr=0.05 md=6"
    # Initials that would name two hyperparameters are spelled out.
    assert trial_run_name(1, {"learning_rate": 0.03, "l2_regularization": 0.0, "max_leaf_nodes": 15}, 28.77) == \
        "val 28.77 · t01 · l2_regularization=0 learning_rate=0.03 mln=15"


def test_run_links_in_registry_descriptions_use_the_ui_link_on_a_server_and_a_runs_uri_otherwise():
    assert run_link("http://127.0.0.1:5000", "1", "r1") == ui_link("http://127.0.0.1:5000", experiment_id="1",
                                                                   run_id="r1")
    local = run_link("sqlite:///x/mlflow.db", "1", "r1")
    assert local.startswith("runs:/r1") and "twinflow server" in local
