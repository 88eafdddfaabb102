"""What a reviewer sees: `twinflow server` over a pipeline's home, its pages loaded in headless Chromium (slow).

Two small pipeline runs (the demo's landing data, fewer trials and scenarios) fill a fresh home: first
a deliberately bad model (trained on labels capped at 5 cycles, so it can never predict a longer
life: worse than the naive fleet-mean-life baseline), which the gate must refuse although there is no
champion; then a sound one, promoted with the floor it met as the stated reason. Then
`twinflow server` serves it and a real browser renders the MLflow train run, the registered model
and the Prefect flow run that the MLflow run's ``prefect.flow_run_url`` tag links to. Screenshots
are kept under the test's tmp dir. The Debian ``chromium`` package is installed by ``make test``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from twinflow.tracking import HEADLINE_METRICS, HEADLINE_VIEW_ID

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

SMALL = [
    "features.windows=[10]", "features.ewm_spans=[10]", 'features.channels=["s2","s3","s4","s7","s11","s12"]',
    "train.n_trials=2", "train.max_iter=40",
    "simulate.n_scenarios=10", "simulate.n_assets=10", "simulate.horizon=400", "simulate.batch_scenarios=10",
    "simulate.intervals=[100,150]", "simulate.thresholds=[20.0,40.0]", "simulate.fan_units=40",
]


# Labels capped at 5 (train.rul_cap keeps the evaluation truth capped at 125): a model that never
# predicts more than ~5 cycles of life. Train only: the refusal is what this run is for.
BAD = ["features.rul_cap=5", 'stages=["ingest","features","train"]']


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update({"TWINFLOW_HOME": str(home), "CUDA_VISIBLE_DEVICES": ""})
    return env


def _browse(url: str, png: Path, budget_ms: int = 20000, width: int = 1400) -> str:
    """Render ``url`` in headless Chromium: save a screenshot to ``png``, return the rendered DOM.

    The runs table renders only the columns in view: ``width`` makes room for all of them.
    """
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--window-size={width},1000", f"--virtual-time-budget={budget_ms}",
            f"--user-data-dir={png.parent / ('chrome-' + png.stem)}"]
    subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180, check=False)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=False)
    return dom.stdout


def _number(cell: str) -> float:
    try:
        return float(cell.replace(",", "").strip())
    except ValueError:
        return float("nan")


def _visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.fixture(scope="module")
def served_home(tmp_path_factory):
    """A fresh home with a refused bad model's pipeline run, then a promoted one's, served by `twinflow server`."""
    root = tmp_path_factory.mktemp("reviewer")
    home = root / "home"
    for extra in (BAD, []):
        args = [a for p in (*SMALL, *extra) for a in ("--param", p)]
        run = subprocess.run([sys.executable, "-m", "twinflow.cli", "run", "pipeline", *args], capture_output=True,
                             text=True, env=_env(home), cwd=root, timeout=1500)
        assert run.returncode == 0, run.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "twinflow.cli", "server", "--mlflow-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home), cwd=root)
    urls: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 400
        while len(urls) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"(Prefect UI|MLflow UI|Runs):\s+(http://\S+)", line)
            if m:
                urls[m.group(1)] = m.group(2)
        assert set(urls) == {"Prefect UI", "MLflow UI", "Runs"}, \
            proc.stderr.read() if proc.poll() is not None else urls
        yield {"home": home, "root": root, "prefect": urls["Prefect UI"], "mlflow": urls["MLflow UI"],
               "experiment": urls["Runs"]}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # SIGINT is ignored where pytest was started in the background
            proc.terminate()
            proc.wait(60)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(2400)
@pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (make test installs it)")
def test_mlflow_and_prefect_pages_render_the_runs(served_home):
    import mlflow

    from twinflow.settings import get_settings

    shots = served_home["root"] / "screenshots"
    shots.mkdir()
    settings = get_settings(home=served_home["home"])
    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(settings.mlflow.experiment)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    oldest_first = ["attributes.start_time ASC"]
    bad_train, train = client.search_runs([exp.experiment_id], "tags.`twinflow.stage` = 'train'",
                                          order_by=oldest_first)
    bad_pipeline, pipeline_run = client.search_runs([exp.experiment_id], "tags.`twinflow.stage` = 'pipeline'",
                                                    order_by=oldest_first)
    assert bad_pipeline.data.metrics["rows_ingested"] > 0 and pipeline_run.data.metrics["promoted"] == 1.0

    # The stable link: the tag written during the run names the port `twinflow server` serves now.
    link = train.data.tags["prefect.flow_run_url"]
    assert urlparse(link).netloc == urlparse(served_home["prefect"]).netloc, (link, served_home["prefect"])

    # The experiment link `twinflow server` prints opens the classic runs table in a browser that has
    # never visited MLflow (a fresh profile: no stored view), not the GenAI overview MLflow 3.17
    # shows by default (checked: without the link's workflowType parameter this page is "Overview").
    assert served_home["experiment"].endswith(f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey="
                                              f"{HEADLINE_VIEW_ID}&workflowType=machine_learning")
    dom = _browse(served_home["experiment"], shots / "mlflow_experiment.png", width=2800)
    text = _visible_text(dom)
    assert text.lstrip().startswith("Runs - Experiment") and "Run Name" in text, text[:2000]
    assert "Token Usage" not in text and pipeline_run.info.run_name in text, text[:2000]
    # The runs table opens with the headline metric columns, no column picked by hand: a header cell
    # per headline metric the pipeline runs carry, and the pipeline run's values in them.
    shown = [m for m in HEADLINE_METRICS if m in pipeline_run.data.metrics]
    assert {"eval_rmse", "eval_score", "baseline_eval_rmse", "promoted", "recommended_expected_cost",
            "saving_vs_fixed_interval"} <= set(shown), pipeline_run.data.metrics
    for metric in shown:
        assert f'col-id="metrics.`{metric}`"' in dom and metric in text, (metric, text[:3000])
    for metric in ("eval_rmse", "baseline_eval_rmse", "recommended_expected_cost"):
        cells = re.findall(rf'id="cell-metrics\.`{metric}`-[^"]*" class="ag-cell-value">([^<]*)<', dom)
        want = pipeline_run.data.metrics[metric]
        assert any(abs(_number(c) - want) <= max(0.01 * abs(want), 0.05) for c in cells), (metric, want, cells)

    # The pipeline run's Overview: a description with the verdict and the rule, and links that work:
    # to the train run (a route inside this UI) and to the pipeline's own Prefect flow run.
    desc = pipeline_run.data.tags["mlflow.note.content"]
    assert re.search(r"\*\*(NOT )?PROMOTED\*\*", desc) and "Rule:" in desc, desc
    assert "fleet-mean-life" in desc and "EUR" in desc and "fixed-interval" in desc, desc
    ml = served_home["mlflow"]
    dom = _browse(f"{ml}/#/experiments/{exp.experiment_id}/runs/{pipeline_run.info.run_id}?workflowType=machine_learning",
                  shots / "mlflow_pipeline_run.png")
    text = _visible_text(dom)
    assert "PROMOTED" in text and "Rule:" in text, text[:3000]
    hrefs = re.findall(r'href="([^"]+)"', dom)
    to_train = [h for h in hrefs if f"/runs/{train.info.run_id}?" in h]  # the description's link (the UI's own
    assert to_train, hrefs                                               # child-run links carry no query)
    target = to_train[0] if to_train[0].startswith("http") else f"{ml}/{to_train[0].lstrip('/')}"
    text = _visible_text(_browse(target, shots / "mlflow_train_run_via_link.png"))
    assert train.info.run_name in text and "PROMOTED" in text, text[:3000]
    # The description's Prefect link is the pipeline's own flow run on the port `twinflow server` serves.
    to_prefect = re.findall(r"\[Prefect flow run\]\((http[^)]+)\)", desc)
    assert to_prefect == [pipeline_run.data.tags["prefect.flow_run_url"]], desc
    assert urlparse(to_prefect[0]).netloc == urlparse(served_home["prefect"]).netloc
    assert to_prefect[0].rstrip("/").endswith(pipeline_run.data.tags["prefect.flow_run_id"]), to_prefect
    text = _visible_text(_browse(to_prefect[0], shots / "prefect_pipeline_via_link.png"))
    assert "pipeline" in text, text[:2000]

    # The bad first model of this fresh home: refused although there was no champion, and its
    # pipeline and train runs' Overviews say so and why (the naive baseline it does not beat).
    assert bad_train.data.tags["twinflow.promotion"] == "kept"
    assert bad_train.data.metrics["eval_rmse"] > bad_train.data.metrics["baseline_eval_rmse"], bad_train.data.metrics
    for run, png in ((bad_pipeline, "mlflow_refused_pipeline_run.png"), (bad_train, "mlflow_refused_train_run.png")):
        desc = run.data.tags["mlflow.note.content"]
        assert desc.startswith("**NOT PROMOTED**") and "Absolute floor not met" in desc, desc
        text = _visible_text(_browse(f"{ml}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                                     "?workflowType=machine_learning", shots / png))
        assert "NOT PROMOTED" in text and "does not beat the fleet-mean-life baseline" in text, text[:3000]
    assert "stays challenger" in bad_pipeline.data.tags["mlflow.note.content"]
    # The sound one after it: promoted, the reason stated on its Overview.
    for run in (pipeline_run, train):
        desc = run.data.tags["mlflow.note.content"]
        assert desc.startswith("**PROMOTED**") and "No champion yet" in desc, desc
    text = _visible_text(_browse(f"{ml}/#/experiments/{exp.experiment_id}/runs/{train.info.run_id}"
                                 "?workflowType=machine_learning", shots / "mlflow_promoted_train_run.png"))
    assert "PROMOTED" in text and "NOT PROMOTED" not in text and "beats the fleet-mean-life baseline" in text, \
        text[:3000]

    # The simulate run lists its lake snapshot as a dataset input and the model version it used.
    sim = client.search_runs([exp.experiment_id], "tags.`twinflow.stage` = 'simulate'")[0]
    assert any(d.dataset.name.startswith("lake/") for d in sim.inputs.dataset_inputs), sim.inputs
    model = settings.mlflow.registered_model
    champion = client.get_model_version_by_alias(model, "champion")
    assert sim.data.tags["twinflow.model_version"] == f"{model} v{champion.version}"
    assert sim.data.tags["twinflow.model_uri"] == f"models:/{model}/{champion.version}"
    text = _visible_text(_browse(f"{ml}/#/experiments/{exp.experiment_id}/runs/{sim.info.run_id}"
                                 "?workflowType=machine_learning", shots / "mlflow_simulate_run.png"))
    assert "lake/train_fd001" in text and f"v{champion.version}" in text, text[:3000]
    # The first model of this fresh home was promoted by the absolute floor, which the reason states;
    # a deliberately bad first model refused on a fresh home: tests/tasks/test_promotion.py
    # (test_a_first_model_worse_than_the_naive_baseline_is_refused).
    assert "No champion yet" in train.data.tags["twinflow.promotion_reason"]
    assert "beats the fleet-mean-life baseline" in train.data.tags["twinflow.promotion_reason"]

    # Opening one plot selects it in the artifact tree, which expands its folder: every plot's name shows.
    run_url = f"{ml}/#/experiments/{exp.experiment_id}/runs/{train.info.run_id}/artifacts/plots/pred_vs_true.png"
    text = _visible_text(_browse(run_url, shots / "mlflow_train_run.png"))
    for name in ("pred_vs_true.png", "learning_curve.png", "feature_importance.png", "residuals_per_asset.png"):
        assert name in text, (name, text[:2000])

    text = _visible_text(_browse(f"{ml}/#/models/{model}", shots / "mlflow_registered_model.png"))
    assert model in text and "champion" in text, text[:2000]

    text = _visible_text(_browse(link, shots / "prefect_train_flow_run.png"))
    assert "train-gbm-train_fd001" in text, text[:2000]
    for png in shots.glob("*.png"):
        assert png.stat().st_size > 10_000, png  # a blank page is a few KB
    print(json.dumps({"screenshots": sorted(str(p) for p in shots.glob("*.png"))}))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(2400)
@pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (make test installs it)")
def test_the_health_artifact_and_the_mlflow_health_run_render(served_home):
    """`twinflow health` on the served home's running fleet: its Prefect table artifact (ranked by risk)
    and its MLflow run (metrics, plots) render in the browser."""
    import httpx
    import mlflow

    from twinflow.settings import get_settings

    shots = served_home["root"] / "screenshots-health"
    shots.mkdir()
    out = subprocess.run([sys.executable, "-m", "twinflow.cli", "health", "-d", "test_fd001", "--top", "5"],
                         capture_output=True, text=True, env=_env(served_home["home"]), cwd=served_home["root"],
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    settings = get_settings(home=served_home["home"])
    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(settings.mlflow.experiment)
    run = client.search_runs([exp.experiment_id], "tags.`twinflow.stage` = 'health'")[0]
    riskiest = json.loads(Path(client.download_artifacts(run.info.run_id, "health/fleet_health.json",
                                                         str(shots))).read_text())
    top_asset = str(riskiest["data"][0][riskiest["columns"].index("asset_id")])

    # The Prefect table artifact, ranked by risk: its riskiest asset and the action columns show.
    prefect = served_home["prefect"].rstrip("/")
    found = httpx.post(f"{prefect}/api/artifacts/filter",
                       json={"artifacts": {"key": {"any_": ["fleet-health-test-fd001"]}}, "limit": 1,
                             "sort": "CREATED_DESC"}, timeout=30).json()
    assert found, "no fleet-health artifact on the served Prefect"
    text = _visible_text(_browse(f"{prefect}/artifacts/artifact/{found[0]['id']}", shots / "prefect_health_artifact.png"))
    assert "risk_band" in text and "due_by" in text and top_asset in text, text[:3000]

    # The MLflow health run: its headline metrics and plots are listed.
    ml = served_home["mlflow"]
    text = _visible_text(_browse(f"{ml}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                                 "?workflowType=machine_learning", shots / "mlflow_health_run.png"))
    assert run.info.run_name in text and "band_critical" in text, text[:3000]
    text = _visible_text(_browse(f"{ml}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts/plots/"
                                 "risk_ranking.png", shots / "mlflow_health_plots.png"))
    for name in ("risk_ranking.png", "rul_fans.png", "health_trends.png"):
        assert name in text, (name, text[:2000])
    for png in shots.glob("*.png"):
        assert png.stat().st_size > 10_000, png  # a blank page is a few KB
