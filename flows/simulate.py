"""Digital-twin stage: calibrate the fleet twin on the lake, compare maintenance policies, recommend one.

Also the ``generate`` flow: a synthetic run-to-failure fleet of any size, written to the lake (or as
C-MAPSS text files to a landing folder) for the ingest/features stages and the benchmarks.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task

from twinflow import runtime
from twinflow.contracts import ASSET, CHANNELS, CMAPSS_COLUMNS, TIME
from twinflow.errors import ConfigError
from twinflow.refs import FileRef, LakeSnapshot, SimulationResult
from twinflow.runtime import TwinflowTaskRunner
from twinflow.tasks.twin import (
    CalibrationReport,
    CostModel,
    GenerateParams,
    NoRunToFailureData,
    RulErrorModel,
    TwinModel,
    TwinParams,
    build_policies,
    bundled_fd001_model,
    calibrate,
    default_model,
    error_model_from_champion,
    generate_fleet,
    health_fan,
    read_cmapss_frame,
    run_batches,
    select_run_to_failure,
    summarize,
)

__all__ = ["simulate", "generate", "TwinParams", "GenerateParams", "CostModel"]

log = logging.getLogger("twinflow.simulate")
ARTIFACT_KEY = "twin-policy-study"


def _logger():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run context
        return log


def _settings():
    from twinflow.settings import get_settings

    rt = runtime.current()
    return rt.settings if rt is not None else get_settings()


def _client():
    """The Dask client for fine-grained work, whether we run on a worker or in the flow process."""
    return runtime.using_dask()


# --------------------------------------------------------------------------------------------
# Tasks: thin wrappers over twinflow.tasks.twin
# --------------------------------------------------------------------------------------------


@task(name="calibrate-twin")
def calibrate_twin(params: TwinParams, snapshot: LakeSnapshot | None) -> tuple[TwinModel, CalibrationReport]:
    """Fit the twin to the snapshot's run-to-failure assets (the bundled FD001 without a snapshot)."""
    logger = _logger()
    if snapshot is None:
        frame, where = read_cmapss_frame(), "bundled train_FD001"
    else:
        from twinflow.tasks.ingest import read_lake

        cols = [ASSET, TIME, *CHANNELS, "source_file"]
        frame, where = read_lake(snapshot, columns=cols).to_pandas(), f"lake dataset {snapshot.dataset!r}"
    kept, excluded = select_run_to_failure(frame, params.truncated_sources, params.min_lifetime)
    if kept[ASSET].nunique() >= 2:
        model, report = calibrate(kept, process_noise=params.process_noise, seed=params.seed)
        report.excluded_assets = excluded
        logger.info("twin calibrated on %d run-to-failure assets of %s (KS %.3f, b=%.2f)",
                    report.n_assets, where, report.ks_statistic, report.b)
        return model, report
    msg = (f"{where} has no run-to-failure assets to calibrate the twin on ({excluded} truncated or "
           f"shorter than {params.min_lifetime} cycles)")
    if params.on_no_run_to_failure == "error":
        raise NoRunToFailureData(msg + "; ingest a run-to-failure dataset (e.g. train_FD001) or set "
                                 "on_no_run_to_failure=defaults")
    note = msg + "; using the default parameters (calibrated on the bundled FD001 training set)"
    warnings.warn(note, stacklevel=2)
    logger.warning(note)
    model = default_model(params.process_noise)
    _, bundled = bundled_fd001_model(params.process_noise)
    report = bundled.model_copy(update={"fallback": True, "excluded_assets": excluded, "notes": [note]})
    return model, report


@task(name="load-rul-error-model")
def load_error_model(params: TwinParams, settings: Any) -> RulErrorModel:
    """The champion model's RUL error distribution from MLflow, else the stated Gaussian fallback."""
    logger = _logger()
    champion = None
    try:
        from twinflow.tasks.train import champion_error_model
    except ImportError:
        champion_error_model = None
    if champion_error_model is not None:
        try:
            champion = champion_error_model(settings)
        except Exception as exc:  # noqa: BLE001 - a missing champion must not stop the study
            logger.warning("could not read the champion's error distribution: %s", exc)
    model, note = error_model_from_champion(champion, params.rul_error_sd)
    if note:
        warnings.warn(note, stacklevel=2)
        logger.warning(note)
    return model


@task(name="simulate-policies")
def run_policy_study(model: TwinModel, params: TwinParams, error_model: RulErrorModel) -> dict[str, np.ndarray]:
    """All policies' Monte-Carlo: fixed scenario batches as Dask work (one per worker-sized chunk)."""
    policies = build_policies(params.intervals, params.thresholds)
    with _client() as client:
        return run_batches(client, model, policies, params, error_model)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _figures(model: TwinModel, report: CalibrationReport, rows: list[dict], params: TwinParams) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figs = {}
    # Calibration: lifetime distributions, observed vs simulated.
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    obs, sim = np.sort(report.observed_lifetimes), np.sort(report.simulated_lifetimes)
    bins = np.linspace(min(obs.min(), sim.min()), max(obs.max(), sim.max()), 30)
    ax[0].hist(obs, bins=bins, density=True, alpha=0.6, label=f"observed (n={len(obs)})")
    ax[0].hist(sim, bins=bins, density=True, alpha=0.6, label=f"simulated (n={len(sim)})")
    ax[0].set_xlabel("lifetime (cycles)")
    ax[0].legend()
    ax[1].step(obs, np.arange(1, len(obs) + 1) / len(obs), where="post", label="observed")
    ax[1].step(sim, np.arange(1, len(sim) + 1) / len(sim), where="post", label="simulated")
    ax[1].set_xlabel("lifetime (cycles)")
    ax[1].set_ylabel("ECDF")
    ax[1].set_title(f"two-sample KS = {report.ks_statistic:.3f}")
    ax[1].legend()
    fig.tight_layout()
    figs["plots/calibration_lifetimes.png"] = fig

    # Cost vs policy parameter, with 95% CIs.
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    rtf = next(r for r in rows if r["kind"] == "run_to_failure")
    for a, kind, xlabel in ((ax[0], "predictive", "RUL threshold (cycles)"),
                            (ax[1], "fixed_interval", "maintenance interval k (cycles)")):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            x = [r["value"] for r in sel]
            y = np.array([r["expected_cost"] for r in sel])
            err = np.array([[r["expected_cost"] - r["cost_ci_low"] for r in sel],
                            [r["cost_ci_high"] - r["expected_cost"] for r in sel]])
            a.errorbar(x, y, yerr=err, marker="o", capsize=3, label=kind)
        a.axhline(rtf["expected_cost"], color="grey", ls="--", label="run to failure")
        a.set_xlabel(xlabel)
        a.legend()
    ax[0].set_ylabel(f"expected fleet cost over {params.horizon} cycles")
    fig.tight_layout()
    figs["plots/cost_vs_threshold.png"] = fig

    # Fan chart of simulated health trajectories.
    fan = health_fan(model, params.fan_units, seed=params.seed)
    fig, ax = plt.subplots(figsize=(7, 4))
    q, c = fan["q"], fan["cycle"]
    ax.fill_between(c, q[0], q[-1], alpha=0.25, label="5-95%")
    ax.fill_between(c, q[1], q[-2], alpha=0.4, label="25-75%")
    ax.plot(c, q[2], label="median")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("cycle since installation")
    ax.set_ylabel("health h")
    ax.set_title(f"simulated health of {params.fan_units} units (run to failure)")
    ax.legend()
    fig.tight_layout()
    figs["plots/health_fan.png"] = fig
    return figs


def _fmt_ci(m: float, lo: float, hi: float, digits: int = 0) -> str:
    if not math.isfinite(lo):
        return f"{m:,.{digits}f}"
    return f"{m:,.{digits}f} [{lo:,.{digits}f}, {hi:,.{digits}f}]"


def policy_markdown(rows: list[dict], best: str, params: TwinParams, report: CalibrationReport,
                    error_model: RulErrorModel) -> str:
    """The policy table and the recommendation as Markdown."""
    lines = [
        "# Digital twin: maintenance policy study",
        "",
        f"**Recommended policy: `{best}`** (least expected cost). {params.n_scenarios} scenarios x "
        f"{params.n_assets} assets x {params.horizon} cycles; 95% confidence intervals.",
        "",
        "| policy | expected cost | availability | failures | planned stops |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " **(recommended)**" if r["policy"] == best else ""
        lines.append(
            f"| {r['policy']}{mark} | {_fmt_ci(r['expected_cost'], r['cost_ci_low'], r['cost_ci_high'])} | "
            f"{_fmt_ci(100 * r['availability'], 100 * r['availability_ci_low'], 100 * r['availability_ci_high'], 2)} % | "
            f"{_fmt_ci(r['failures'], r['failures_ci_low'], r['failures_ci_high'], 1)} | {r['planned']:,.1f} |")
    c = params.costs
    lines += [
        "",
        f"Costs: failure {c.failure:,.0f} (+{c.failure_downtime} cycles down), planned {c.planned:,.0f} "
        f"(+{c.planned_downtime} cycles down), downtime {c.downtime_per_cycle:,.0f}/asset-cycle.",
        f"Calibration: {report.n_assets} run-to-failure assets, lifetime KS statistic "
        f"{report.ks_statistic:.3f}{' (fallback parameters)' if report.fallback else ''}.",
        f"RUL estimate error: {error_model.kind} ({error_model.source}), inspections every "
        f"{params.inspect_every} cycles.",
    ]
    return "\n".join(lines)


def _log_mlflow(params: TwinParams, model: TwinModel, report: CalibrationReport, error_model: RulErrorModel,
                rows: list[dict], best: str, markdown: str, snapshot: LakeSnapshot | None) -> str:
    import matplotlib.pyplot as plt
    import mlflow

    from twinflow.tracking import tracked_run

    tags = {"twinflow.recommended_policy": best, "twinflow.twin_source": model.source,
            "twinflow.rul_error_model": f"{error_model.kind}: {error_model.source}"[:250]}
    if snapshot is not None:
        tags["twinflow.snapshot"] = f"{snapshot.dataset}@{snapshot.digest}"
    with tracked_run("simulate", stage="simulate", params=params, tags=tags) as run:
        metrics = {"calibration_ks": report.ks_statistic, "calibration_assets": report.n_assets,
                   "twin_b": report.b, "recommended_expected_cost": next(
                       r["expected_cost"] for r in rows if r["policy"] == best)}
        for r in rows:
            for key in ("expected_cost", "cost_ci_low", "cost_ci_high", "availability", "failures",
                        "failures_ci_low", "failures_ci_high", "planned"):
                metrics[f"{key}.{r['policy']}"] = r[key]
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
        mlflow.log_dict(model.model_dump(), "twin/model.json")
        mlflow.log_dict(report.model_dump(), "twin/calibration.json")
        mlflow.log_dict({"recommended": best, "policies": rows}, "twin/policies.json")
        mlflow.log_text(markdown, "twin/policy_study.md")
        for name, fig in _figures(model, report, rows, params).items():
            mlflow.log_figure(fig, name)
            plt.close(fig)
        return run.info.run_id


# --------------------------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------------------------


@flow(name="simulate", task_runner=TwinflowTaskRunner(), validate_parameters=True)
def simulate(params: TwinParams | None = None, snapshot: LakeSnapshot | None = None) -> SimulationResult:
    """Calibrate the fleet twin and find the maintenance policy with the least expected cost.

    Steps:
        1. Validate ``params`` (Pydantic, before any cluster work) and that the snapshot exists.
        2. ``calibrate-twin``: fit the degradation/sensor model to the snapshot's run-to-failure
           assets (the bundled FD001 training set without a snapshot); KS fit statistic.
        3. ``load-rul-error-model``: the champion model's residuals from MLflow, or the stated
           Gaussian fallback (with a warning).
        4. ``simulate-policies``: scenario batches (fixed split, seeds spawned from ``params.seed``)
           on the Dask cluster, every policy per batch (a GPU kernel on GPU workers).
        5. Report: MLflow run (params, per-policy metrics, calibration plot, cost-vs-threshold
           curve, health fan chart) and a Prefect markdown artifact with the recommendation.

    Args:
        params: Study parameters (defaults: ``TwinParams()``).
        snapshot: Lake dataset of run-to-failure telemetry to calibrate on.

    Returns:
        The MLflow run id, the recommended policy, its expected cost and every policy's figures.
    """
    from prefect.artifacts import create_markdown_artifact

    params = params or TwinParams()
    if snapshot is not None and not Path(snapshot.dataset_path).exists():
        raise ConfigError(f"lake dataset {snapshot.dataset_path} does not exist; run ingest first")
    settings = _settings()
    if runtime.current() is None:
        from twinflow.tracking import configure_mlflow

        configure_mlflow(settings)
    logger = _logger()
    model_fut = calibrate_twin.submit(params, snapshot)
    err_fut = load_error_model.submit(params, settings)
    model, report = model_fut.result()
    error_model = err_fut.result()
    results = run_policy_study.submit(model, params, error_model).result()
    policies = build_policies(params.intervals, params.thresholds)
    rows, best = summarize(policies, results, params.n_assets, params.horizon)
    markdown = policy_markdown(rows, best, params, report, error_model)
    run_id = _log_mlflow(params, model, report, error_model, rows, best, markdown, snapshot)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="Digital-twin policy study")
    best_row = next(r for r in rows if r["policy"] == best)
    logger.info("recommended policy: %s (expected cost %.0f)", best, best_row["expected_cost"])
    return SimulationResult(run_id=run_id, recommended_policy=best, expected_cost=best_row["expected_cost"],
                            policies=rows)


def _write_chunk(index: int, n_assets: int, asset_offset: int, seed, model: TwinModel, params: GenerateParams,
                 root: str, batch_id: str) -> FileRef:
    """Generate one chunk of the fleet and write it (lake: one atomic file per asset; landing: one
    C-MAPSS text file)."""
    import hashlib
    import os
    import uuid

    if params.target == "lake":
        table = generate_fleet(n_assets, seed, model, asset_offset=asset_offset, asset_prefix=params.asset_prefix,
                               batch_id=batch_id, source_file=f"generated:{params.dataset}/{batch_id}")
        from twinflow.tasks.ingest import write_lake_table

        snap = write_lake_table(table, root, params.dataset, batch_id)
        ref = snap.files[0]
        return ref.model_copy(update={"path": f"{ref.path}/chunk-{index:05d}"})
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = generate_fleet(n_assets, seed, model, asset_offset=asset_offset, asset_prefix="", batch_id=batch_id)
    unit = pa.array(np.asarray(table.column(ASSET).to_numpy(zero_copy_only=False), dtype=np.int64) + 1)
    cols = [unit, table.column(TIME), *[table.column(c) for c in CHANNELS]]
    out = pa.Table.from_arrays(cols, names=CMAPSS_COLUMNS)
    folder = Path(root) / params.dataset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{params.dataset}_{batch_id}_{index:05d}.txt"
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pacsv.write_csv(out, tmp, pacsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none"))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return FileRef(path=str(path), sha256=digest, rows_read=out.num_rows, rows_written=out.num_rows,
                   status="generated")


@task(name="write-fleet")
def write_fleet(params: GenerateParams, model: TwinModel, root: str, batch_id: str) -> list[FileRef]:
    """Generate and write the fleet in fixed chunks of assets, one Dask task per chunk."""
    n_chunks = math.ceil(params.n_assets / params.chunk_assets)
    seeds = np.random.SeedSequence(params.seed).spawn(n_chunks)
    with _client() as client:
        model_f = client.scatter(model, broadcast=True, hash=False)
        futures = []
        for i in range(n_chunks):
            lo = i * params.chunk_assets
            n = min(params.chunk_assets, params.n_assets - lo)
            futures.append(client.submit(_write_chunk, i, n, lo, seeds[i], model_f, params, root, batch_id,
                                         pure=False))
        return client.gather(futures)


@flow(name="generate", task_runner=TwinflowTaskRunner(), validate_parameters=True)
def generate(params: GenerateParams | None = None, model: TwinModel | None = None) -> LakeSnapshot | list[FileRef]:
    """Generate a synthetic run-to-failure fleet from the twin.

    Steps:
        1. Validate ``params`` (Pydantic, before any cluster work).
        2. Twin parameters: ``model`` or the default (calibrated on the bundled FD001 training set).
        3. ``write-fleet``: chunks of ``chunk_assets`` assets generated on the Dask workers with
           seeds spawned from ``params.seed`` (same data for any number of workers) and written
           atomically: to the lake (``dataset=<name>/asset=<id>/<batch_id>.parquet``) or as
           C-MAPSS text files to ``<landing>/<dataset>/`` for the ingest stage.

    Returns:
        ``target="lake"``: a ``LakeSnapshot`` of the dataset (one ``FileRef`` per chunk);
        ``target="landing"``: the written landing files.
    """
    params = params or GenerateParams()
    settings = _settings()
    model = model or default_model()
    batch_id = params.batch_id or f"gen-s{params.seed}-n{params.n_assets}"
    root = settings.lake_path if params.target == "lake" else settings.landing_path
    refs = write_fleet.submit(params, model, root, batch_id).result()
    _logger().info("generated %d assets, %d rows -> %s", params.n_assets, sum(r.rows_written for r in refs), root)
    if params.target == "landing":
        return refs
    return LakeSnapshot(lake_path=root, dataset=params.dataset, batch_id=batch_id, files=refs,
                        rows=sum(r.rows_written for r in refs))
