"""The ``health`` stage flow: every running asset scored at a lake snapshot, ranked, acted on, announced."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from twinflow import contracts as C
from twinflow import runtime
from twinflow.errors import ConfigError
from twinflow.flows.naming import run_name
from twinflow.refs import LakeSnapshot
from twinflow.tasks.health import HealthParams
from twinflow.tasks.health.params import BANDS

log = logging.getLogger("twinflow.health")

__all__ = ["health", "HealthParams", "HealthResult", "FLEET_HEALTH", "HEALTH_READS"]

FLEET_HEALTH = "fleet_health"
# Commit metadata of each fleet_health write: JSON {table: version} of the lake tables the run read
# (its snapshot, life segments, recent rows): the lake upkeep keeps those versions readable.
HEALTH_READS = "twinflow.reads"


class HealthResult(BaseModel):
    """What one health run produced."""

    run_key: str
    dataset: str
    dataset_version: int | None = None
    table_version: int | None = Field(None, description="fleet_health table version written.")
    mlflow_run_id: str | None = None
    model: str | None = None
    assets: int = 0
    bands: dict[str, int] = Field(default_factory=dict)
    skipped: int = 0
    announced: list[str] = Field(default_factory=list)
    drifted: list[str] = Field(default_factory=list)
    work_orders: int = 0
    work_orders_json: str | None = None
    work_orders_csv: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


def running_fleets(lake_path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The lake's fleet datasets: its tables written under a fleet contract (derived tables such as
    ``<dataset>__events``, ``<dataset>__recent`` and ``fleet_health`` have none), on a local or an
    object-store lake (``storage_options``: the lake's, else the settings')."""
    from twinflow import lake

    return [d for d in lake.datasets(lake_path, storage_options)
            if lake.table_contract(lake_path, d, storage_options) is not None]


def only_fleet(lake_path: str, needed_by: str = "health",
               how: str = "set params.dataset (e.g. `twinflow health -d <dataset>`) or pass the lake "
                          "snapshot of the running fleet") -> str:
    """The lake's only fleet dataset (:func:`running_fleets`): what a stage reads when none is named.

    A plant's lake usually holds one fleet: the hourly health schedule, ``twinflow health`` and
    ``twinflow run features`` then need no dataset parameter.

    Args:
        lake_path: The lake root.
        needed_by: The stage asking, for the error message.
        how: How the user names a dataset for that stage, for the error message.

    Raises:
        ConfigError: the lake holds no fleet, or several (named, so the user can pick one).
    """
    fleets = running_fleets(lake_path)
    if len(fleets) != 1:
        held = f" (the lake holds {', '.join(fleets)})" if fleets else " (the lake holds no fleet yet)"
        raise ConfigError(f"{needed_by} needs a dataset: {how}{held}")
    log.info("%s: reading %s, the lake's only fleet dataset", needed_by, fleets[0])
    return fleets[0]


def _snapshot(settings: Any, params: HealthParams, given: LakeSnapshot | None = None) -> LakeSnapshot:
    from twinflow import lake

    if given is not None:
        if params.dataset is not None and params.dataset != given.dataset:
            raise ConfigError(f"health params name dataset {params.dataset!r} but the snapshot is of "
                              f"{given.dataset!r}; leave params.dataset unset to score the snapshot's")
        if params.version is not None and given.version is not None and params.version != given.version:
            raise ConfigError(f"health params pin version {params.version} but the snapshot is version {given.version}")
        snap = given if given.version is not None or params.version is None else \
            given.model_copy(update={"version": params.version, "batch_id": f"v{params.version}"})
        if snap.version is None:
            snap = snap.model_copy(update={"version": lake.version(snap.lake_path, snap.dataset)})
        return snap
    if params.dataset is None:
        params = params.model_copy(update={"dataset": only_fleet(settings.lake_path)})
    snap = lake.latest_snapshot(settings.lake_path, params.dataset)
    if snap is None:
        raise ConfigError(f"dataset {params.dataset!r} is not in the lake at {settings.lake_path}; "
                          "ingest it first")
    if params.version is not None and params.version != snap.version:
        if lake.open_table(settings.lake_path, params.dataset, version=params.version) is None:
            raise ConfigError(f"dataset {params.dataset!r} has no table version {params.version}")
        snap = snap.model_copy(update={"version": params.version, "batch_id": f"v{params.version}"})
    if snap.version is None:
        snap = snap.model_copy(update={"version": lake.version(settings.lake_path, params.dataset)})
    return snap


def _read(snap: LakeSnapshot, contract: Any, channels: list[str] | None = None) -> pd.DataFrame:
    from twinflow import lake

    cols = [C.ASSET, contract.key, *(channels or contract.channel_names)]
    schema = contract.lake_schema().names
    return lake.read_lake(snap, columns=[c for c in dict.fromkeys(cols) if c in schema]).to_pandas()


def _columns(contract: Any) -> list[str]:
    schema = contract.lake_schema().names
    return [c for c in dict.fromkeys([C.ASSET, contract.key, *contract.channel_names]) if c in schema]


def _scored_columns(contract: Any, champion: Any) -> list[str]:
    """The columns scoring reads: with a champion its fit's channels and, with regimes, its setting
    channels (what the live features, anomaly score and drift use); else every channel. No score uses
    the others: reading them only copied them into pandas."""
    if champion is None or champion.fit is None:
        return _columns(contract)
    fit = champion.fit
    want = {*fit.kept, *(fit.op_columns if fit.n_regimes > 1 else [])}
    return [c for c in _columns(contract) if c in want or c in (C.ASSET, contract.key)]


def _segments(snap: LakeSnapshot) -> pd.DataFrame | None:
    """The dataset's life segments at the snapshot's segments version (the latest when it names none)."""
    from twinflow import lake

    t = lake.read_table(snap.lake_path, lake.derived_name(snap.dataset, "segments"), version=snap.segments)
    return None if t is None or t.num_rows == 0 else t.to_pandas()


def read_fleet(snap: LakeSnapshot, contract: Any, params: HealthParams, champion: Any,
               whole: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The running fleet's rows to score and :func:`~twinflow.tasks.health.score.life_frame`.

    Only each asset's recent rows are read (:func:`~twinflow.tasks.health.score.recent_rows`: what the
    live features, the anomaly window and the drift sample see), unless ``whole`` (a label-free
    baseline from the fleet's own early lives, or a model that predicts from whole histories). They
    come from the recent-rows table ingest keeps (:func:`twinflow.lake.read_recent_table`: one table),
    or, when it is missing, stale or too short, from each asset's newest files
    (:func:`twinflow.lake.read_recent`), with the reason logged: both give the same rows.
    """
    from twinflow import lake
    from twinflow.tasks.health.score import life_frame, recent_rows

    segments = _segments(snap)
    if whole or (champion is not None and champion.needs_history):
        return _read(snap, contract), life_frame(None, contract, segments)
    rows = recent_rows(champion.feature_params if champion is not None else None, params)
    cols = _scored_columns(contract, champion)
    try:
        recent, extents = lake.read_recent_table(snap, rows, cols)
    except lake.RecentUnavailable as exc:
        log.warning("health: reading each asset's newest files instead of the recent-rows table: %s", exc)
        recent, extents = lake.read_recent(snap, rows, cols)
    return recent.to_pandas(), life_frame(extents.to_pandas(), contract, segments)


@task(name="health-score", cache_policy=NO_CACHE)
def score_task(params: HealthParams, snap: LakeSnapshot, settings: Any) -> tuple[Any, Any, Any, Any]:
    """Read the fleet, load the champion, score every asset; returns (FleetScore, champion, contract, frames)."""
    from twinflow import lake
    from twinflow.tasks.health.champion import load_champion
    from twinflow.tasks.health.score import score_fleet

    contract = lake.snapshot_contract(snap)
    champion = load_champion(settings, params.interval_level) if params.use_champion else None
    baseline = None
    if champion is not None:
        tsnap = champion.features.snapshot
        try:
            tcontract = lake.snapshot_contract(tsnap)
            if tcontract.digest == contract.digest or tcontract.name == contract.name:
                baseline = _read(tsnap, contract)
        except Exception as exc:  # noqa: BLE001 - the baseline falls back to the scored fleet, and says so
            log.warning("champion's training data %s not readable (%s): baseline from the scored fleet",
                        tsnap.dataset_path, exc)
    # Without the training data the healthy baseline is the scored fleet's own early lives: whole histories.
    frame, lives = read_fleet(snap, contract, params, champion, whole=baseline is None)
    scored = score_fleet(frame, contract, params, champion, baseline_frame=baseline,
                         scored_at=pd.Timestamp.now(tz="UTC").isoformat(), lives=lives)
    return scored, champion, contract, (frame, baseline)


def drift_table(frame: pd.DataFrame, baseline: pd.DataFrame | None, contract: Any, champion: Any,
                params: HealthParams) -> pd.DataFrame | None:
    """PSI/KS per channel (and regime) between each asset's last ``window`` readings and the training data."""
    from twinflow.tasks.health import drift as dr
    from twinflow.tasks.health.score import regimes, fleet_frame, standardised

    if baseline is None or champion is None:
        return None
    channels = [c for c in champion.fit.kept if c in frame.columns and c in baseline.columns]
    if not channels:
        return None
    ff, bf = fleet_frame(frame, contract), fleet_frame(baseline, contract)
    # Only each asset's last ``window`` readings are compared: standardise those, not the whole tail.
    recent = ff.tail(params.window)
    fr, br = regimes(ff, champion.fit, recent), regimes(bf, champion.fit)
    z, bz = standardised(ff, channels, champion.fit, fr, rows=recent), standardised(bf, channels, champion.fit, br)
    return dr.drift_table(bz, br, z, fr, channels)


def _history(settings: Any) -> pd.DataFrame | None:
    from twinflow import lake

    t = lake.read_results(settings.lake_path, FLEET_HEALTH,
                          columns=["asset_id", "dataset", "run_key", "scored_at", "announced_band", "health_index",
                                   "p_fail", "risk_band"])
    return None if t is None else t.to_pandas()


def _prefect_links() -> dict[str, str]:
    try:
        from prefect.runtime import flow_run

        url = flow_run.ui_url
        return {"prefect_flow_run": url} if url else {}
    except Exception:  # noqa: BLE001 - links are informative
        return {}


@flow(name="health", task_runner=ThreadPoolTaskRunner(), validate_parameters=True,
      flow_run_name=run_name("health", lambda p: (p.get("params") or HealthParams()).dataset
                             or (p.get("snapshot").dataset if p.get("snapshot") else None)))
def health(params: HealthParams | None = None, snapshot: LakeSnapshot | None = None) -> HealthResult:
    """Score every running asset of a lake dataset and tell people what to do, and by when.

    Steps:
        1. Resolve the snapshot (the dataset's latest table version, or ``params.version``) and
           load the champion with its training context (:mod:`twinflow.tasks.health.champion`).
        2. Score (task ``health-score``): live features with the training fit, the RUL estimate with
           its conformal interval, P(failure within H) from the lifetime model conditioned on age
           combined with the estimate and its error distribution, health index and anomaly score
           against the healthy baseline, risk band, action, due-by, cost, evidence; a reason row
           per asset that cannot be scored.
        3. Drift: PSI/KS per channel and regime against the champion's training data;
           ``twinflow.model.drift`` above ``params.drift_psi``.
        4. Alerts: ``twinflow.asset.at_risk`` per asset whose band rose to or above the alert band
           since it was last announced (state in the ``fleet_health`` table).
        5. Write the rows to the versioned ``fleet_health`` lake table (history kept; a re-run on the
           same snapshot and champion replaces its own rows), the work orders (CSV + JSON), the
           MLflow run (metrics, plots, tables) and the Prefect table and markdown artifacts.

    Args:
        params: What to score and how to decide; defaults to :class:`HealthParams`.
        snapshot: The running fleet's lake snapshot (the pipeline passes its own, as to the other
            stages); None: the latest snapshot of ``params.dataset``.

    Returns:
        A :class:`HealthResult` (counts, announced assets, drifted channels, file paths).
    """
    import shutil
    import tempfile

    import matplotlib.pyplot as plt
    import mlflow
    import pyarrow as pa
    import pyarrow.dataset as pds
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from twinflow import events, lake
    from twinflow.tasks.health import alerts, report, workorders
    from twinflow.tasks.health.drift import drifted
    from twinflow.tracking import configure_mlflow, tracked_run

    params = params or HealthParams()
    logger = get_run_logger()
    t0 = time.perf_counter()
    with runtime.ensure() as rt:
        settings = rt.settings
        configure_mlflow(settings)
        snap = _snapshot(settings, params, snapshot)
        params = params.model_copy(update={"dataset": snap.dataset})
        scored, champion, contract, (frame, baseline) = score_task(params, snap, settings)
        table = scored.table
        model = f"{champion.name} v{champion.version}" if champion is not None else None
        run_key = f"{params.dataset}@v{snap.version}:{model or 'no-model'}"
        table.insert(0, "dataset", params.dataset)
        table.insert(1, "dataset_version", int(snap.version) if snap.version is not None else -1)
        table.insert(2, "run_key", run_key)
        table["model"] = model or ""

        drift = drift_table(frame, baseline, contract, champion, params)
        bad = drifted(drift, params.drift_psi, params.drift_ks) if drift is not None else None

        history = _history(settings)
        # A re-run of the same snapshot and champion sees its own earlier rows as the state: it
        # announces nothing they announced (and its events would carry the same ids anyway).
        previous = alerts.latest_per_asset(history, params.dataset) if history is not None else None
        fire, stored = alerts.announce(table, previous, params.alert_band)
        table["announced_band"] = stored.astype("int64")
        table["announced"] = fire

        with tracked_run(f"health-{params.dataset}", stage="health", params=params,
                         tags={"twinflow.dataset": params.dataset, "twinflow.model_version": champion.version
                               if champion else "", "twinflow.run_key": run_key}) as run:
            run_id = run.info.run_id
            links = {"mlflow_run": f"{settings.mlflow_tracking_uri}#/runs/{run_id}", **_prefect_links(),
                     "fleet_health_table": lake.results_uri(settings.lake_path, FLEET_HEALTH)}
            table["mlflow_run_id"] = run_id
            version = lake.write_results(settings.lake_path, FLEET_HEALTH, pa.Table.from_pandas(table, preserve_index=False),
                                         key_column="run_key", key=run_key,
                                         metadata={"twinflow.dataset": params.dataset, "twinflow.mlflow_run": run_id,
                                                   HEALTH_READS: json.dumps(lake.snapshot_reads(snap))})
            metrics: dict[str, float] = {"assets": len(table), "skipped": float((table.status == "skipped").sum()),
                                         "partial": float((table.status == "partial").sum()),
                                         "announced": float(fire.sum()), "fleet_health_version": float(version),
                                         **{f"band_{b}": float((table.risk_band == b).sum()) for b in BANDS},
                                         "mean_p_fail": float(np.nanmean(table.p_fail)) if table.p_fail.notna().any() else -1.0}
            if drift is not None and len(drift):
                metrics["drift_max_psi"] = float(np.nanmax(drift.psi))
                metrics["drift_channels"] = float(len(set(bad.channel)))
            if params.true_rul_path:
                from twinflow.tasks.health.evaluate import evaluate_against_truth
                from twinflow.tasks.train.data import natural_key, read_true_rul

                if params.true_rul_path.endswith(".json"):
                    # A fleet generator's ground truth (every life, the running ones' hidden failure times).
                    from twinflow.tasks.health.evaluate import true_rul_from_lives

                    lives = json.loads(Path(params.true_rul_path).read_text())["lives"]
                    true = true_rul_from_lives(lives, contract.clock.unit_seconds / 3600
                                               if contract.clock.kind == "timestamp" else 1.0)
                else:
                    truth = read_true_rul(params.true_rul_path)
                    ids = sorted(table.asset_id, key=natural_key)
                    if len(ids) != len(truth):
                        raise ConfigError(f"{params.true_rul_path} has {len(truth)} values for {len(ids)} assets")
                    true = pd.Series(truth, index=ids)
                metrics.update(evaluate_against_truth(table, true, cap=champion.rul_cap if champion else None))
            finite = {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}
            mlflow.log_metrics(finite)
            mlflow.log_table(table.drop(columns=["p_fail_by_horizon"]), "health/fleet_health.json")
            if drift is not None:
                mlflow.log_table(drift, "health/drift.json")
            # Every other artifact is written into one folder and sent in one call: against a tracking
            # server each log_* call is its own upload.
            with tempfile.TemporaryDirectory(prefix="twinflow-health-") as staging:
                out = Path(staging)
                for sub in ("health", "plots", "work_orders", "report"):
                    (out / sub).mkdir()
                if scored.lifetime is not None:
                    (out / "health/lifetime_model.json").write_text(
                        json.dumps(scored.lifetime.model_dump(), indent=2, default=str))
                if scored.baseline is not None:
                    (out / "health/baseline.json").write_text(json.dumps(scored.baseline.to_dict(), indent=2, default=str))
                report.plot_risk_ranking(table).savefig(out / "plots/risk_ranking.png")
                if scored.posterior:
                    report.plot_rul_fans(scored.grid, scored.posterior, table).savefig(out / "plots/rul_fans.png")
                # The trends of the six riskiest assets: only their rows of the table's history are read.
                top = table.asset_id.head(6).astype(str).tolist()
                hist_all = lake.read_results(settings.lake_path, FLEET_HEALTH,
                                             columns=["asset_id", "dataset", "scored_at", "health_index", "p_fail"],
                                             filter=(pds.field("dataset") == params.dataset)
                                             & pds.field("asset_id").isin(top)).to_pandas()
                report.plot_health_trends(hist_all, top).savefig(out / "plots/health_trends.png")
                plt.close("all")

                orders = workorders.work_orders(table, dataset=params.dataset, run_key=run_key, links=links)
                folder = Path(params.export_dir or Path(settings.home) / "health" / params.dataset)
                jpath, cpath = workorders.export(orders, folder, meta={
                    "generated_at": table.scored_at.iat[0] if len(table) else "", "dataset": params.dataset,
                    "dataset_version": snap.version, "model": model, "run_key": run_key})
                for path in (jpath, cpath):
                    shutil.copy2(path, out / "work_orders" / Path(path).name)
                announced = table.asset_id[fire].astype(str).tolist()
                md = report.summary_markdown(table, dataset=params.dataset, version=snap.version, model=model or "none",
                                             run_id=run_id, drift=drift, announced=announced, notes=scored.notes,
                                             links={"work orders": str(jpath)})
                (out / "report/health.md").write_text(md, encoding="utf-8")
                mlflow.log_artifacts(staging)
        key = f"fleet-health-{params.dataset}".replace("_", "-").lower()
        create_table_artifact(report.artifact_rows(table), key=key,
                              description=f"fleet health of {params.dataset}, ranked by risk")
        create_markdown_artifact(md, key=f"{key}-summary", description=f"fleet health summary of {params.dataset}")

        # Events last: the table they describe is committed (an alert never points at nothing).
        for r in table[fire].itertuples(index=False):
            events.emit(events.ASSET_AT_RISK, events.asset_resource(params.dataset, str(r.asset_id)),
                        {"dataset": params.dataset, "asset": str(r.asset_id), "band": r.risk_band,
                         "p_failure": None if pd.isna(r.p_fail) else float(r.p_fail), "horizon": params.alert_horizon,
                         "due_by": r.due_by, "action": r.action, "run_key": run_key, "mlflow_run_id": run_id},
                        id=events.event_id(events.ASSET_AT_RISK, params.dataset, r.asset_id, r.risk_band, run_key))
        drifted_channels = sorted(set(bad.channel)) if bad is not None else []
        if drifted_channels and champion is not None:
            worst = bad.sort_values("psi", ascending=False).drop_duplicates("channel")
            events.emit(events.MODEL_DRIFT, events.model_resource(champion.name),
                        {"dataset": params.dataset, "version": snap.version, "model": champion.name,
                         "model_version": champion.version, "threshold": params.drift_psi,
                         "channels": {r.channel: {"psi": float(r.psi), "ks": float(r.ks), "regime": r.regime}
                                      for r in worst.itertuples(index=False)}},
                        id=events.event_id(events.MODEL_DRIFT, run_key))
        events.flush(5.0)
        result = HealthResult(run_key=run_key, dataset=params.dataset, dataset_version=snap.version,
                              table_version=version, mlflow_run_id=run_id, model=model, assets=len(table),
                              bands={b: int((table.risk_band == b).sum()) for b in BANDS},
                              skipped=int((table.status == "skipped").sum()), announced=announced,
                              drifted=drifted_channels, work_orders=len(orders), work_orders_json=str(jpath),
                              work_orders_csv=str(cpath), metrics=finite)
        logger.info("health of %s v%s: %d assets (%s), %d work order(s), announced %s, drift %s; %.1f s",
                    params.dataset, snap.version, len(table), ", ".join(f"{b} {n}" for b, n in result.bands.items()),
                    len(orders), announced or "none", drifted_channels or "none", time.perf_counter() - t0)
        return result
