"""The parent flow: ingest → features → train → simulate, passing references only.

Each stage is its own flow (``twinflow.flows.<stage>``) and can run alone; this flow chains them,
hands each the previous stage's reference (lake snapshot, feature dataset path, MLflow model URI)
and opens the MLflow parent run under which every stage's run nests.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from twinflow import runtime
from twinflow.contract import resolve_contract
from twinflow.contract.model import unit_label
from twinflow.errors import ConfigError
from twinflow.flows.features import features
from twinflow.flows.health import HealthResult, health
from twinflow.flows.ingest import ingest
from twinflow.flows.naming import landing_name, run_name
from twinflow.flows.simulate import simulate
from twinflow.flows.train import train
from twinflow.refs import FeatureSetRef, LakeSnapshot, SimulationResult, TrainResult
from twinflow.settings import Settings
from twinflow.tasks.features import FeatureParams
from twinflow.tasks.health import HealthParams
from twinflow.tasks.ingest import IngestParams, IngestResult
from twinflow.tasks.train import TrainParams
from twinflow.tasks.twin import TwinParams
from twinflow.tasks.registry import CHAMPION
from twinflow.tracking import configure_mlflow, log_lake_input, retry_store, tracked_run

log = logging.getLogger("twinflow.pipeline")

Stage = Literal["ingest", "features", "train", "simulate"]
STAGES: tuple[Stage, ...] = ("ingest", "features", "train", "simulate")


class PipelineParams(BaseModel):
    """Parameters of the whole pipeline: one model per stage plus which datasets feed which stage.

    Attributes:
        ingest: Ingest parameters (the landing folder).
        train_dataset: Lake dataset of run-to-failure telemetry (features with labels, training,
            twin calibration). None: the one dataset of this run's landing whose lives are known to
            end (its contract rule says ``life_end: failure``, or an event log gave it life segments),
            else the landing's only dataset (see :func:`training_dataset`).
        test_dataset: Optional lake dataset evaluated with the C-MAPSS test protocol (features
            transformed with the training fit; needs ``train.true_rul_path``). None: no test set.
        features: Feature parameters (``label`` is forced off for the test dataset).
        train: Training parameters.
        simulate: Digital-twin policy study parameters.
        stages: Stages to run; each needs the ones before it (ingest is incremental, so re-running
            it over an unchanged landing folder reads nothing).
    """

    model_config = ConfigDict(extra="forbid")

    ingest: IngestParams
    # No default names a fleet: a plant's landing decides (training_dataset), the demos name theirs.
    train_dataset: str | None = None
    test_dataset: str | None = None
    features: FeatureParams = Field(default_factory=FeatureParams)
    # Window statistics (std, slope) are undefined on an asset's first cycle: drop those rows
    # from training rather than reject the whole dataset.
    train: TrainParams = Field(default_factory=lambda: TrainParams(nan_policy="drop"))
    simulate: TwinParams = Field(default_factory=TwinParams)
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES))
    health: HealthParams | None = Field(
        None, description="Score the running fleet (health.dataset) with the champion after train; None: skip.")
    train_version: int | None = Field(
        None, ge=0, description="Delta table version of train_dataset to use (e.g. the version a "
        "twinflow.stream.data.ready event names); None: the latest.")

    @model_validator(mode="after")
    def _prefix_closed(self) -> "PipelineParams":
        wanted = [s for s in STAGES if s in self.stages]
        if wanted != list(STAGES[: len(wanted)]):
            raise ValueError(f"stages must be a prefix of {list(STAGES)} (each needs the ones before it), "
                             f"got {self.stages}")
        return self


class PipelineResult(BaseModel):
    """References produced by one pipeline run."""

    mlflow_run_id: str
    ingest: IngestResult | None = None
    features: FeatureSetRef | None = None
    test_features: FeatureSetRef | None = None
    train: TrainResult | None = None
    simulate: SimulationResult | None = None
    health: HealthResult | None = None

    def summaries(self) -> dict[str, str]:
        """One line per stage that ran, for the CLI."""
        out: dict[str, str] = {}
        if self.ingest is not None:
            i = self.ingest
            out["ingest"] = (f"{i.rows_read:,} rows read, {i.rows_written:,} to the lake, "
                             f"{i.rows_quarantined:,} quarantined; {i.unchanged} file(s) unchanged; "
                             f"datasets: {', '.join(sorted(i.snapshots))}")
        if self.features is not None:
            f = self.features
            out["features"] = f"{f.rows:,} rows x {len(f.feature_columns)} features at {f.path}"
        if self.test_features is not None:
            out["features (test)"] = f"{self.test_features.rows:,} rows at {self.test_features.path}"
        if self.train is not None:
            t = self.train
            metrics = ", ".join(f"{k}={v:.2f}" for k, v in sorted(t.metrics.items()) if "rmse" in k or "score" in k)
            out["train"] = (f"{t.registered_model} v{t.version} aliases={t.aliases} {metrics} "
                            f"(MLflow run {t.run_id})")
        if self.health is not None:
            h = self.health
            out["health"] = (f"{h.assets} assets of {h.dataset}: " + ", ".join(f"{b} {n}" for b, n in h.bands.items())
                             + f"; {h.work_orders} work order(s) (MLflow run {h.mlflow_run_id})")
        if self.simulate is not None:
            s = self.simulate
            out["simulate"] = (f"recommended policy: {s.recommended_policy} "
                               f"(expected cost {s.expected_cost:,.0f}; MLflow run {s.run_id})")
        return out


def training_dataset(result: IngestResult) -> str:
    """The dataset a pipeline trains on when its params name none.

    The landing's only dataset; among several, the one whose lives are known to end: its files' contract
    rule says ``life_end: failure`` (C-MAPSS training files), or its event log gave it life segments.

    Raises:
        ConfigError: the ingest fed no dataset, or several that qualify equally (they are named).
    """
    names = sorted(result.snapshots)
    if len(names) == 1:
        return names[0]

    def lives_end(snap: LakeSnapshot) -> bool:
        if snap.segments is not None:
            return True
        contract = resolve_contract(snap.contract)
        rules = (contract.rule_for(Path(f.path).name) for f in snap.files)
        return any(r is not None and r.life_end == "failure" for r in rules)

    ended = [n for n in names if lives_end(result.snapshots[n])]
    if len(ended) == 1:
        return ended[0]
    among = ended or names
    held = f"the landing feeds {', '.join(among)}" if among else "the landing fed no dataset"
    raise ConfigError(f"the pipeline needs a training dataset: set train_dataset ({held})")


def resolve_snapshot(result: IngestResult, dataset: str, lake_path: str | None = None,
                     version: int | None = None) -> LakeSnapshot:
    """The snapshot a stage reads: the ingest's, else (``lake_path``) the lake's; pinned at ``version``.

    Raises:
        ConfigError: the dataset is in neither, or has no such table version.
    """
    snap = result.snapshots.get(dataset)
    if snap is None and lake_path is not None:
        # A dataset no landing file feeds (the stream bridge's): the lake's own snapshot of it.
        from twinflow.lake import latest_snapshot

        snap = latest_snapshot(lake_path, dataset)
    if snap is None:
        raise ConfigError(f"dataset {dataset!r} is not in the lake after ingest; available: "
                          f"{', '.join(sorted(result.snapshots)) or 'none'}")
    if version is not None and version != snap.version:
        snap = _at_version(snap, version)
    return snap


def _at_version(snap: LakeSnapshot, version: int) -> LakeSnapshot:
    """The snapshot's dataset pinned at an older table version (digest: that version's file list)."""
    import hashlib

    from twinflow.lake import open_table
    from twinflow.refs import FileRef

    try:
        dt = open_table(snap.lake_path, snap.dataset, version=version)
    except Exception as exc:  # noqa: BLE001 - delta-rs: no such version (vacuumed, or in the future)
        raise ConfigError(f"dataset {snap.dataset!r} has no table version {version}: {exc}") from None
    files = sorted(dt.file_uris())
    ref = FileRef(path=f"delta:{snap.dataset}@{version}", sha256=hashlib.sha256("\n".join(files).encode()).hexdigest(),
                  lake_file=None)
    return LakeSnapshot(lake_path=snap.lake_path, dataset=snap.dataset, batch_id=f"v{version}", files=[ref],
                        version=version)


@flow(name="pipeline", task_runner=ThreadPoolTaskRunner(), validate_parameters=True,
      flow_run_name=run_name("pipeline", lambda p: p["params"].train_dataset
                             or landing_name(p["params"].ingest.landing)))
def pipeline(params: PipelineParams) -> PipelineResult:
    """Run the predictive-maintenance pipeline end to end.

    Steps:
        1. ``ingest``: landing files → validated, partitioned Parquet lake (+ quarantine).
        2. ``features``: training dataset → window features with the RUL label; the test dataset
           (if any) is transformed with the training fit.
        3. ``train``: trials on the Dask cluster, tracked in MLflow; the model is registered and
           promoted to ``champion`` only if it beats the current one.
        4. ``simulate``: the fleet twin is calibrated on the training dataset and the maintenance
           policies are compared, using the champion's measured error.

    Args:
        params: One parameter model per stage.

    Returns:
        The references every stage produced and the MLflow parent run id.
    """
    import mlflow

    logger = get_run_logger()
    with runtime.ensure() as rt:
        configure_mlflow(rt.settings)
        with tracked_run("pipeline", stage="pipeline",
                         params={"stages": ",".join(params.stages)}) as run:
            result = PipelineResult(mlflow_run_id=run.info.run_id)
            # Ingest and features get nested MLflow runs with their datasets as inputs, so the
            # pipeline run shows lineage lake -> features -> model in the MLflow UI. Each stage's
            # upstream result goes in as an argument or ``wait_for`` (the returned object itself:
            # Prefect links a subflow to the flow run whose result it receives; a result taken out
            # of a ``return_state`` state is not linked), so the run graph draws the stage edges.
            with tracked_run(f"ingest-{landing_name(params.ingest.landing)}", stage="ingest", params=params.ingest):
                result.ingest = ingest(_with_recent_rows(params))
                own_flow_run(result.ingest)
                _log_ingest(result.ingest)
            if params.train_dataset is None:
                params = params.model_copy(update={"train_dataset": training_dataset(result.ingest)})
                logger.info("pipeline: training on %s (the landing's run-to-failure dataset)", params.train_dataset)
            retry_store(mlflow.log_params, {"train_dataset": params.train_dataset, "test_dataset": params.test_dataset})
            train_snap = resolve_snapshot(result.ingest, params.train_dataset, rt.settings.lake_path,
                                   params.train_version)
            if "features" in params.stages:
                with tracked_run(f"features-{train_snap.dataset}", stage="features", params=params.features):
                    log_lake_input(train_snap, context="source")
                    result.features = features(train_snap, params.features, wait_for=[result.ingest])
                    own_flow_run(result.features)
                    _log_features(result.features)
                if params.test_dataset:
                    test_snap = resolve_snapshot(result.ingest, params.test_dataset)
                    test_params = params.features.model_copy(update={"label": False})
                    with tracked_run(f"features-{test_snap.dataset}", stage="features", params=test_params):
                        log_lake_input(test_snap, context="source")
                        result.test_features = features(test_snap, test_params, fit_from=result.features,
                                                        wait_for=[result.ingest])
                        own_flow_run(result.test_features)
                        _log_features(result.test_features)
            if "train" in params.stages:
                result.train = train(result.features, params.train, test_features=result.test_features,
                                     wait_for=[result.ingest])
                if params.health is not None:
                    # The running fleet: the health params' dataset, else the test set, else the
                    # training dataset itself (a plant's fleet trains on its past lives and scores
                    # its running ones); its snapshot comes from this run's ingest, as every stage's.
                    running = params.health.dataset or params.test_dataset or params.train_dataset
                    health_snap = resolve_snapshot(result.ingest, running, rt.settings.lake_path)
                    result.health = health(params.health.model_copy(update={"dataset": None}),
                                           snapshot=health_snap, wait_for=[result.train])
            if "simulate" in params.stages:
                # Simulate reads the champion the train stage just gated: it waits for it.
                result.simulate = simulate(params.simulate, snapshot=train_snap,
                                           wait_for=[result.train] if result.train is not None else [result.ingest])
            _log_pipeline_inputs(result, train_snap)
            # A snapshot without a contract is read under the settings' contract (as the lake does).
            time_unit = resolve_contract(train_snap.contract).time_unit
            report = pipeline_report(result, run.info.run_id, params, time_unit=time_unit)
            _log_summary(result, report)
            _describe(result, params, run.info.experiment_id, run.info.run_id, time_unit)
            logger.info("pipeline finished:\n%s", "\n".join(f"  {k}: {v}" for k, v in result.summaries().items()))
            del rt
            return result


def pipeline_metrics(result: PipelineResult) -> dict[str, float]:
    """The pipeline run's summary metrics: what each stage produced, in numbers."""
    out: dict[str, float] = {}
    if result.ingest is not None:
        i = result.ingest
        out.update(rows_read=i.rows_read, rows_ingested=i.rows_written, rows_quarantined=i.rows_quarantined,
                   files_unchanged=i.unchanged)
    if result.features is not None:
        out.update(feature_rows=result.features.rows, feature_columns=len(result.features.feature_columns))
    if result.test_features is not None:
        out["test_feature_rows"] = result.test_features.rows
    if result.train is not None:
        t = result.train
        for key in ("eval_rmse", "eval_mae", "eval_score", "eval_pi_coverage", "baseline_eval_rmse", "best_val_rmse",
                    "val_rmse"):
            if key in t.metrics:
                out["best_val_rmse" if key == "val_rmse" else key] = t.metrics[key]
        out["promoted"] = 1.0 if CHAMPION in t.aliases else 0.0
        if t.version is not None:
            out["model_version"] = float(t.version)
    if result.simulate is not None:
        s = result.simulate
        row = next((r for r in s.policies if r.get("policy") == s.recommended_policy), {})
        out["policy_expected_cost"] = s.expected_cost
        out["recommended_expected_cost"] = s.expected_cost  # the simulate run's headline name
        for key in ("cost_ci_low", "cost_ci_high"):
            if key in row and row[key] is not None and math.isfinite(row[key]):
                out[f"policy_{key}"] = row[key]
        from twinflow.verdict import best_fixed_interval

        fixed = best_fixed_interval(s.policies)
        if fixed is not None:  # the simulate run's headline name, so one runs-table column shows both
            out["saving_vs_fixed_interval"] = fixed["expected_cost"] - s.expected_cost
    return {k: float(v) for k, v in out.items()}


def _route(run_id: str) -> str:
    """A link to a run in the MLflow UI (a fragment route: it works in the UI that renders the report)."""
    import mlflow

    from twinflow.verdict import mlflow_route

    try:
        eid = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a convenience
        return f"runs:/{run_id}"
    return mlflow_route(experiment_id=eid, run_id=run_id)


def pipeline_report(result: PipelineResult, run_id: str, params: PipelineParams | None = None, *,
                    time_unit: str) -> str:
    """A Markdown report of one pipeline run (the MLflow run's ``report/pipeline.md`` and a Prefect artifact).

    With ``params``, costs carry their currency and the fleet/horizon they are costs of. ``time_unit``
    is the clock unit of the snapshot's fleet contract: the unit of the errors and of the horizon.
    """
    u = unit_label(time_unit)
    lines = [f"# twinflow pipeline run `{run_id}`", ""]
    if result.ingest is not None:
        i = result.ingest
        lines += ["## Ingest", "", "| rows read | ingested | quarantined | files unchanged | datasets |",
                  "|---:|---:|---:|---:|---|",
                  f"| {i.rows_read:,} | {i.rows_written:,} | {i.rows_quarantined:,} | {i.unchanged} | "
                  f"{', '.join(sorted(i.snapshots))} |", ""]
    if result.features is not None:
        lines += ["## Features", ""]
        for what, ref in (("train", result.features), ("test", result.test_features)):
            if ref is not None:
                lines.append(f"- {what} `{ref.snapshot.dataset}`: {ref.rows:,} rows x {len(ref.feature_columns)} "
                             f"features (`{ref.params_digest}`)")
        lines.append("")
    if result.train is not None:
        t = result.train
        promoted = CHAMPION in t.aliases
        lines += ["## Model", "",
                  f"- registered: `{t.registered_model or '(registry off)'}` v{t.version} "
                  f"(aliases: {', '.join(t.aliases) or 'none'})",
                  f"- evaluation: RMSE {t.metrics.get('eval_rmse', float('nan')):.2f} {u}, "
                  f"MAE {t.metrics.get('eval_mae', float('nan')):.2f} {u}, "
                  f"PHM08 score {t.metrics.get('eval_score', float('nan')):.1f}",
                  f"- promotion: {'**promoted to champion**' if promoted else 'not promoted (champion kept)'}",
                  f"- MLflow run: [{t.run_id}]({_route(t.run_id)})", ""]
    if result.health is not None:
        h = result.health
        lines += ["## Fleet health", "", f"- `{h.dataset}`: {h.assets} assets; " + ", ".join(
            f"{b} {n}" for b, n in h.bands.items()) + f"; {h.work_orders} work order(s)",
                  f"- MLflow run: [{h.mlflow_run_id}]({_route(h.mlflow_run_id)})", ""]
    if result.simulate is not None:
        s = result.simulate
        row = next((r for r in s.policies if r.get("policy") == s.recommended_policy), {})
        lo, hi = row.get("cost_ci_low"), row.get("cost_ci_high")
        ci = f" (95% CI {lo:,.0f} to {hi:,.0f})" if lo is not None and hi is not None and math.isfinite(lo) else ""
        cur = "" if params is None else f" {params.simulate.costs.currency}"
        scale = "" if params is None else (f" for a fleet of {params.simulate.n_assets:,} assets over "
                                           f"{params.simulate.horizon:,} {u}")
        lines += ["## Maintenance policy", "",
                  f"- recommended: **{s.recommended_policy}**, expected cost {s.expected_cost:,.0f}{cur}{ci}{scale}",
                  f"- MLflow run: [{s.run_id}]({_route(s.run_id)})", ""]
    return "\n".join(lines)


def _describe(result: PipelineResult, params: PipelineParams, experiment_id: str, run_id: str,
              time_unit: str) -> None:
    """The pipeline run's description: the model verdict and the twin's recommendation, with links.

    ``time_unit`` is the clock unit of the snapshot's fleet contract: the unit of the model's errors
    and of the twin's horizon (the twin is calibrated on the same snapshot).
    """
    import mlflow

    from twinflow.verdict import mlflow_route, pipeline_description, plot_links, prefect_flow_run_url, \
        scale_line, set_description

    client = mlflow.MlflowClient()
    links: dict[str, str | None] = {"Prefect flow run": prefect_flow_run_url()}
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    for child in sorted(children, key=lambda r: r.info.start_time or 0):
        links[f"{child.data.tags.get('twinflow.stage', 'stage')} run ({child.info.run_name})"] = mlflow_route(
            experiment_id=experiment_id, run_id=child.info.run_id)
    promoted = reason = version = name = None
    metrics: dict[str, float] = {}
    eval_set = ""
    t = result.train
    if t is not None:
        tags = client.get_run(t.run_id).data.tags
        eval_set = tags.get("twinflow.eval_set", "")
        metrics = dict(t.metrics)
        if t.version is not None:
            promoted, name, version = CHAMPION in t.aliases, t.registered_model, t.version
            reason = tags.get("twinflow.promotion_reason", "")
            links[f"model version v{version}"] = mlflow_route(model=name, version=version)
        links.update(plot_links(experiment_id, t.run_id, ["plots/pred_vs_true.png"]))
    s = result.simulate
    if s is not None:
        links.update(plot_links(experiment_id, s.run_id, ["plots/cost_vs_threshold.png"]))
    links["report"] = mlflow_route(experiment_id=experiment_id, run_id=run_id, artifact="report/pipeline.md")
    sim = params.simulate
    set_description(pipeline_description(
        promoted=promoted, model_name=name, version=version, reason=reason or "", metrics=metrics, eval_set=eval_set,
        policy=None if s is None else s.recommended_policy, rows=[] if s is None else s.policies,
        currency=sim.costs.currency, scale=scale_line(sim.n_assets, sim.horizon, sim.n_scenarios, time_unit=time_unit),
        experiment_id=experiment_id, links=links, time_unit=time_unit))


def _copy_stage_artifacts() -> None:
    """Re-publish the stages' latest reviewer artifacts under the pipeline's flow run.

    Prefect shows a subflow's artifacts on the subflow run only; a reviewer opening the pipeline
    run should find the promotion decision and the policy study there too.
    """
    from prefect.artifacts import Artifact, create_markdown_artifact

    for key, new_key, what in (("train-promotion", "pipeline-promotion", "promotion gate decision"),
                               ("twin-policy-study", "pipeline-policy-study", "digital-twin policy study")):
        try:
            art = Artifact.get(key)
        except Exception as exc:  # noqa: BLE001 - a missing copy must not fail the pipeline
            log.warning("artifact %s not copied to the pipeline run: %s", key, exc)
            continue
        if art is not None and isinstance(art.data, str):
            create_markdown_artifact(markdown=art.data, key=new_key, description=f"{what} (copied from the stage run)")


def own_flow_run(stage_result: Any) -> None:
    """Point the active stage run at its own subflow run in Prefect, not at the pipeline's.

    The stage run is opened in the pipeline flow (so it nests under the pipeline run) and took the
    pipeline's flow-run tags; Prefect knows which subflow run returned ``stage_result``.
    """
    import mlflow
    from prefect.utilities.engine import get_state_for_result

    from twinflow.tracking import PREFECT_RUN_TAG, PREFECT_URL_TAG, prefect_tags

    found = get_state_for_result(stage_result)
    sub = None if found is None else found[0].state_details.flow_run_id
    if sub is None:
        return
    tags = {PREFECT_RUN_TAG: str(sub)}
    parent = prefect_tags()
    if parent.get(PREFECT_URL_TAG) and parent.get(PREFECT_RUN_TAG):
        tags[PREFECT_URL_TAG] = parent[PREFECT_URL_TAG].replace(parent[PREFECT_RUN_TAG], str(sub))
    mlflow.set_tags(tags)


def _log_pipeline_inputs(result: PipelineResult, train_snap: LakeSnapshot) -> None:
    """The pipeline run lists the datasets it read and produced (lake snapshot, feature sets)."""
    import mlflow

    from twinflow.tasks.train import dataset_for_mlflow

    log_lake_input(train_snap, context="source")
    for ref, context in ((result.features, "training"), (result.test_features, "evaluation")):
        if ref is not None:
            retry_store(mlflow.log_input, dataset_for_mlflow(ref, ref.params_digest), context=context)


def _log_summary(result: PipelineResult, report: str) -> None:
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    mlflow.log_metrics(pipeline_metrics(result))
    tags = {}
    if result.train is not None:
        tags["twinflow.promoted"] = str(CHAMPION in result.train.aliases).lower()
        tags["twinflow.model_version"] = str(result.train.version or "")
    if result.simulate is not None:
        tags["twinflow.recommended_policy"] = result.simulate.recommended_policy
    mlflow.set_tags(tags)
    mlflow.log_text(report, "report/pipeline.md")
    create_markdown_artifact(markdown=report, key="pipeline-summary", description="twinflow pipeline run summary")
    _copy_stage_artifacts()


def _with_recent_rows(params: PipelineParams) -> IngestParams:
    """The ingest parameters with ``recent_rows`` from this pipeline's own feature and health params
    (what its champion's live features will need), unless set explicitly."""
    if params.ingest.recent_rows is not None:
        return params.ingest
    from twinflow.tasks.health.score import recent_rows

    return params.ingest.model_copy(update={"recent_rows": recent_rows(params.features,
                                                                       params.health or HealthParams())})


def _log_ingest(result: IngestResult) -> None:
    import mlflow

    mlflow.log_metrics({"rows_read": result.rows_read, "rows_ingested": result.rows_written,
                        "rows_quarantined": result.rows_quarantined, "files_unchanged": result.unchanged,
                        "files_read": len(result.files)})
    for snap in result.snapshots.values():
        log_lake_input(snap, context="output")


def _log_features(ref: FeatureSetRef) -> None:
    import mlflow

    from twinflow.tasks.train import dataset_for_mlflow

    from twinflow.refs import contract_tags

    mlflow.log_metrics({"rows": ref.rows, "feature_columns": len(ref.feature_columns)})
    # One digest per feature set: the features stage's (its folder name, the report's).
    mlflow.set_tags({"twinflow.feature_path": ref.path, "twinflow.feature_digest": ref.params_digest,
                     "twinflow.time_unit": ref.time_unit, **contract_tags(ref.contract)})
    retry_store(mlflow.log_input, dataset_for_mlflow(ref, ref.params_digest), context="output")


DEMO_FLEETS = ("cmapss", "pumps")


def demo_params(settings: Settings, stages: list[str] | None = None, fleet: str = "cmapss") -> PipelineParams:
    """Pipeline parameters for ``twinflow demo``: a bundled example fleet as the landing folder.

    ``cmapss``: NASA's C-MAPSS FD001 files, copied into ``<home>/landing/cmapss`` (only when missing or
    different). ``pumps``: a generated centrifugal-pump fleet (``twinflow.fleets.pumps``: timestamped
    readings, plant units, a maintenance log with failures, replacements and running pumps) written
    into ``<home>/landing/pumps`` once. Either way the demo reads a landing folder exactly as a plant's
    would be, through the fleet's contract.
    """
    import shutil

    if fleet == "pumps":
        return _pumps_demo_params(settings, stages)
    if fleet != "cmapss":
        raise ConfigError(f"unknown demo fleet {fleet!r}; choose one of: {', '.join(DEMO_FLEETS)}")

    from twinflow.data import cmapss_path

    landing = Path(settings.landing_path) / "cmapss"
    landing.mkdir(parents=True, exist_ok=True)
    for name in ("train_FD001.txt.gz", "test_FD001.txt.gz"):
        src, dst = cmapss_path(name), landing / name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            tmp = dst.with_suffix(".tmp-copy")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)  # atomic: ingest never sees a half-copied file
    return PipelineParams(
        ingest=IngestParams(landing=str(landing)),
        train_dataset="train_fd001", test_dataset="test_fd001",
        train=TrainParams(true_rul_path=str(cmapss_path("RUL_FD001.txt.gz")), nan_policy="drop"),
        # The test units are the demo's running fleet; their truth file checks the health flags.
        health=HealthParams(true_rul_path=str(cmapss_path("RUL_FD001.txt.gz"))),
        stages=stages or list(STAGES),
    )


def _pumps_demo_params(settings: Settings, stages: list[str] | None) -> PipelineParams:
    """The pump fleet's demo: the same pipeline, configured by durations in hours (its clock's unit)."""
    from twinflow.fleets.pumps import PumpFleetParams, generate_pumps, write_pumps
    from twinflow.tasks.promotion import TwinGateParams
    from twinflow.tasks.twin.model import CostModel

    costs = CostModel(failure=40_000.0, planned=6_000.0, downtime_per_cycle=150.0, failure_downtime=48,
                      planned_downtime=8)

    landing = Path(settings.landing_path) / "pumps"
    if not any(landing.glob("pumps_*.csv")):  # deterministic: generated once, then ingested incrementally
        landing.mkdir(parents=True, exist_ok=True)
        write_pumps(generate_pumps(PumpFleetParams(n_pumps=30, days=120, seed=0)), landing)
    return PipelineParams(
        ingest=IngestParams(landing=str(landing), contract="pumps"),
        train_dataset="pumps", test_dataset=None,
        # Row windows over 10-minute readings plus time windows over the real timestamps (gaps stay gaps).
        features=FeatureParams(windows=[6, 36], time_windows=["1h", "6h"], ewm_spans=[36], rul_cap=240),
        # Missing readings stay NaN for the model (sensor dropouts are real); rows of censored or running
        # lives carry no label and are left out (see tasks/features/labels.py).
        # The twin gate studies the pump fleet's own twin, so its durations are hours too. No truth file
        # exists for a plant: a fifth of the pumps is held out and each of their failed lives cut at
        # random points (the C-MAPSS test protocol generalised; see tasks/train/data.py). rul_cap as the
        # features': the naive baseline and the promotion floor cap like the labels.
        train=TrainParams(nan_policy="keep", eval_protocol="truncated", eval_truncations=5, rul_cap=240,
                          twin_gate=TwinGateParams(horizon=2160, thresholds=[24.0, 48.0, 96.0, 168.0],
                                                   inspect_every=6, min_lifetime=24, costs=costs)),
        simulate=TwinParams(n_assets=30, n_scenarios=40, horizon=2160, intervals=[240, 480, 720, 960],
                            thresholds=[24.0, 48.0, 96.0, 168.0], inspect_every=6, min_lifetime=24, costs=costs),
        health=None,
        stages=stages or list(STAGES),
    )
