"""MLflow UI links: every link twinflow writes opens the classic model-training view."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from twinflow.tasks.registry import run_link
from twinflow.tracking import ui_link


def _route_and_query(url: str) -> tuple[str, dict[str, list[str]]]:
    # The UI routes inside the fragment; its router reads the query string after the route.
    route, _, query = urlparse(url).fragment.partition("?")
    return route, parse_qs(query)


def test_links_name_the_route_and_the_classic_view():
    cases = {
        ui_link("http://h:5000/", experiment_id="3"): "/experiments/3",
        ui_link("http://h:5000", experiment_id="3", run_id="abc"): "/experiments/3/runs/abc",
        ui_link("http://h:5000", model="twinflow rul"): "/models/twinflow%20rul",
        ui_link("http://h:5000", model="m", version=2): "/models/m/versions/2",
        ui_link("http://h:5000"): "/experiments",
    }
    for url, route in cases.items():
        assert url.startswith("http://h:5000/#/"), url
        assert _route_and_query(url) == (route, {"workflowType": ["machine_learning"]}), url


def test_run_links_in_registry_descriptions_use_the_ui_link_on_a_server_and_a_runs_uri_otherwise():
    assert run_link("http://127.0.0.1:5000", "1", "r1") == ui_link("http://127.0.0.1:5000", experiment_id="1",
                                                                   run_id="r1")
    local = run_link("sqlite:///x/mlflow.db", "1", "r1")
    assert local.startswith("runs:/r1") and "twinflow server" in local
