"""Digital-twin stage: calibrate the fleet twin on the lake, compare maintenance policies, recommend one.

Also the ``generate`` flow: a synthetic run-to-failure fleet of any size, written to the lake (or as
C-MAPSS text files to a landing folder) for the ingest/features stages and the benchmarks.

The flows only string steps together: the Prefect tasks are in :mod:`twinflow.tasks.twin.tasks`,
the report in :mod:`twinflow.tasks.twin.report`, the twin itself in :mod:`twinflow.tasks.twin`.
"""

from __future__ import annotations

import logging

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from twinflow import lake, runtime
from twinflow.errors import ConfigError
from twinflow.flows.naming import run_name
from twinflow.refs import FileRef, LakeSnapshot, SimulationResult
from twinflow.settings import Settings
from twinflow.tasks.twin import (
    CostModel,
    GenerateParams,
    TwinModel,
    TwinParams,
    build_policies,
    default_model,
    fleet_contract,
    summarize,
)
from twinflow.tasks.twin.report import log_study_run, policy_markdown
from twinflow.tasks.twin.tasks import (
    calibrate_twin,
    load_error_model,
    run_logger,
    run_policy_study,
    write_fleet,
)

# The tasks and the report were defined here before they moved beside the twin; they stay
# importable from this module for existing callers.
__all__ = ["simulate", "generate", "TwinParams", "GenerateParams", "CostModel", "calibrate_twin",
           "load_error_model", "run_policy_study", "write_fleet", "policy_markdown"]

log = logging.getLogger("twinflow.simulate")
ARTIFACT_KEY = "twin-policy-study"


def _settings() -> Settings:
    from twinflow.settings import get_settings

    rt = runtime.current()
    return rt.settings if rt is not None else get_settings()


@flow(name="simulate", task_runner=ThreadPoolTaskRunner(), validate_parameters=True,
      flow_run_name=run_name("simulate", lambda p: p["snapshot"].dataset if p.get("snapshot") else "bundled_fd001"))
def simulate(params: TwinParams | None = None, snapshot: LakeSnapshot | None = None) -> SimulationResult:
    """Calibrate the fleet twin and find the maintenance policy with the least expected cost.

    Steps:
        1. Validate ``params`` (Pydantic, before any cluster work) and that the snapshot exists.
        2. ``calibrate-twin``: fit the degradation/sensor model to the snapshot's run-to-failure
           assets (the bundled FD001 training set without a snapshot) by the snapshot's fleet
           contract: its setting and sensor channels, ages in its clock's unit; KS fit statistic.
        3. ``load-rul-error-model``: the champion model's residuals from MLflow, or the stated
           Gaussian fallback (with a warning).
        4. ``simulate-policies``: scenario batches (fixed split, seeds spawned from ``params.seed``)
           on the Dask cluster, every policy per batch (a GPU kernel on GPU workers).
        5. Report: MLflow run (params, per-policy metrics, calibration plot, cost-vs-threshold
           curve, health fan chart) and a Prefect markdown artifact with the recommendation.

    Args:
        params: Study parameters (defaults: ``TwinParams()``); durations in the contract clock's unit.
        snapshot: Lake dataset of run-to-failure telemetry to calibrate on.

    Returns:
        The MLflow run id, the recommended policy, its expected cost and every policy's figures.
    """
    params = params or TwinParams()
    if snapshot is not None and lake.open_table(snapshot.lake_path, snapshot.dataset) is None:
        raise ConfigError(f"lake dataset {snapshot.dataset_path} does not exist; run ingest first")
    with runtime.ensure(_settings()) as rt:
        return _simulate(params, snapshot, rt.settings)


def _simulate(params: TwinParams, snapshot: LakeSnapshot | None, settings: Settings) -> SimulationResult:
    # The study's tasks run in this process and send their batches to the runtime's cluster.
    from prefect.artifacts import create_markdown_artifact

    logger = run_logger()
    model_fut = calibrate_twin.submit(params, snapshot)
    err_fut = load_error_model.submit(params, settings)
    model, report = model_fut.result()
    error_model = err_fut.result()
    costs, cost_note = params.costs.priced_by_mode(report.lives.mode_shares if report.lives is not None else {})
    if cost_note:
        logger.info("costs: %s", cost_note)
        params = params.model_copy(update={"costs": costs})
    results = run_policy_study.submit(model, params, error_model).result()
    policies = build_policies(params.intervals, params.thresholds)
    rows, best = summarize(policies, results, params.n_assets, params.horizon)
    markdown = policy_markdown(rows, best, params, report, error_model, cost_note)
    run_id = log_study_run(params, model, report, error_model, rows, best, markdown, snapshot)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="Digital-twin policy study")
    best_row = next(r for r in rows if r["policy"] == best)
    logger.info("recommended policy: %s (expected cost %.0f, 95%% CI [%.0f, %.0f], probability best %.0f%%)",
                best, best_row["expected_cost"], best_row["cost_ci_low"], best_row["cost_ci_high"],
                100 * best_row["p_best"])
    return SimulationResult(run_id=run_id, recommended_policy=best, expected_cost=best_row["expected_cost"],
                            policies=rows)


@flow(name="generate", task_runner=ThreadPoolTaskRunner(), validate_parameters=True,
      flow_run_name=run_name("generate", lambda p: p["params"] and f"{p['params'].dataset}-n{p['params'].n_assets}"))
def generate(params: GenerateParams | None = None, model: TwinModel | None = None) -> LakeSnapshot | list[FileRef]:
    """Generate a synthetic run-to-failure fleet from the twin.

    Steps:
        1. Validate ``params`` (Pydantic, before any cluster work).
        2. Twin parameters: ``model`` or the default (calibrated on the bundled FD001 training set).
           Rows have the shape of the twin's fleet contract (its channels and clock).
        3. ``write-fleet``: chunks of ``chunk_assets`` assets generated on the Dask workers with
           seeds spawned from ``params.seed`` (same data for any number of workers) and written
           atomically: to the lake (staged parts, then one Delta commit of the whole fleet, under the
           twin's contract) or as landing files the contract routes to telemetry (C-MAPSS text for
           the bundled twin) in ``<landing>/<dataset>/`` for the ingest stage.

    Returns:
        ``target="lake"``: a ``LakeSnapshot`` of the dataset (one ``FileRef`` per chunk);
        ``target="landing"``: the written landing files.
    """
    params = params or GenerateParams()
    model = model or default_model()
    contract = fleet_contract(model)
    batch_id = params.batch_id or f"gen-s{params.seed}-n{params.n_assets}"
    with runtime.ensure(_settings()) as rt:
        settings = rt.settings
        root = settings.lake_path if params.target == "lake" else settings.landing_path
        refs = write_fleet.submit(params, model, root, batch_id).result()
    run_logger().info("generated %d assets, %d rows -> %s", params.n_assets, sum(r.rows_written for r in refs), root)
    if params.target == "landing":
        return refs
    return LakeSnapshot(lake_path=root, dataset=params.dataset, batch_id=batch_id, files=refs,
                        rows=sum(r.rows_written for r in refs), version=lake.version(root, params.dataset),
                        contract=contract)
