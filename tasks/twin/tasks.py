"""The twin's Prefect tasks: thin wrappers over the pure functions of :mod:`twinflow.tasks.twin`.

They add what the pure functions leave out: lake and MLflow reads, the Dask client, logging and
warnings. The ``simulate`` and ``generate`` flows in ``twinflow.flows.simulate`` call them.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from twinflow import runtime
from twinflow.contract.model import FleetContract
from twinflow.contracts import ASSET
from twinflow.errors import ConfigError
from twinflow.naming import task_name
from twinflow.refs import FileRef, LakeSnapshot
from twinflow.tasks.twin.calibration import (
    BUNDLED_CONTRACT,
    CalibrationReport,
    bundled_fd001_model,
    calibrate,
    default_model,
    read_cmapss_frame,
    select_run_to_failure,
)
from twinflow.tasks.twin.lives import life_check, life_sample, select_failure_lives
from twinflow.tasks.twin.fleet import fleet_contract, generate_fleet
from twinflow.tasks.twin.model import GenerateParams, NoRunToFailureData, TwinModel, TwinParams, unit_label
from twinflow.tasks.twin.policies import build_policies
from twinflow.tasks.twin.rul_error import RulErrorModel, error_model_from_champion
from twinflow.tasks.twin.study import run_batches

log = logging.getLogger("twinflow.simulate")


def run_logger():
    """The Prefect run logger inside a flow or task run, else the module's logger."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run context
        return log


def _client():
    """The Dask client for fine-grained work, whether we run on a worker or in the flow process."""
    return runtime.using_dask()



def _lives_note(report: CalibrationReport) -> str:
    lives = report.lives
    if lives is None:
        return ""
    out = f"; {lives.failures} failures, {lives.suspensions} suspensions"
    if lives.unobserved_start:
        out += f" ({lives.unobserved_start} lives of unobserved start left out)"
    if lives.weibull is not None:
        out += (f"; Weibull with suspensions: shape {lives.weibull.shape:.2f}, scale {lives.weibull.scale:.1f}, "
                f"failure-free {lives.weibull.location:.1f}")
    if lives.twin_km is not None:
        out += (f"; twin lifetimes inside the Kaplan-Meier band at {lives.twin_km.inside_share:.0%} of "
                f"failure times ({'passed' if lives.twin_km.passed else 'FAILED'})")
    for mode, m in lives.by_mode.items():
        out += f"; {mode}: {m.failures} failures ({m.share:.0%})"
        if m.weibull is not None:
            out += f", Weibull shape {m.weibull.shape:.2f} scale {m.weibull.scale:.1f} with the other modes as suspensions"
    return out


@task(name="calibrate-twin", task_run_name=task_name(
    "calibrate-twin", lambda p: p["snapshot"].dataset if p.get("snapshot") is not None else "bundled_fd001"))
def calibrate_twin(params: TwinParams, snapshot: LakeSnapshot | None) -> tuple[TwinModel, CalibrationReport]:
    """Fit the twin to the snapshot's run-to-failure assets (the bundled FD001 without a snapshot).

    The snapshot's fleet contract says which columns are settings and sensors and what the clock is.
    """
    from twinflow.contract.store import load_contract

    logger = run_logger()
    segments = None
    if snapshot is None:
        contract = load_contract(BUNDLED_CONTRACT)
        frame, where = read_cmapss_frame(), "bundled train_FD001"
    else:
        from twinflow.lake import derived_name, read_lake, read_table, snapshot_contract

        contract = snapshot_contract(snapshot)
        cols = [ASSET, contract.key, *contract.channel_names, "source_file"]
        frame, where = read_lake(snapshot, columns=cols).to_pandas(), f"lake dataset {snapshot.dataset!r}"
        if snapshot.segments is not None:
            segments = read_table(snapshot.lake_path, derived_name(snapshot.dataset, "segments"),
                                  version=snapshot.segments)
    lives = None
    if segments is not None:
        # Lives from the event log / the dataset rules: failures show whole degradation paths; censored
        # and running lives still count in the lifetimes the twin is matched to and in the check below.
        kept, excluded = select_failure_lives(frame, segments, contract, params.min_lifetime, snapshot.dataset)
        durations, failed, _ = life_sample(segments, contract, snapshot.dataset)
        lives = (durations, failed)
    else:
        kept, excluded = select_run_to_failure(frame, params.truncated_sources, params.min_lifetime, contract)
    if kept[ASSET].nunique() >= 2:
        model, report = calibrate(kept, contract=contract, process_noise=params.process_noise, seed=params.seed,
                                  lives=lives)
        report.excluded_assets = excluded
        if segments is not None:
            report.lives = life_check(segments, report.simulated_lifetimes, contract, snapshot.dataset)
        logger.info("twin calibrated on %d run-to-failure lives of %s (contract %s v%d, lifetimes in %s; "
                    "KS %.3f, b=%.2f%s)", report.n_assets, where, contract.name, contract.version,
                    unit_label(contract.time_unit), report.ks_statistic, report.b, _lives_note(report))
        return model, report
    msg = (f"{where} has no run-to-failure assets to calibrate the twin on ({excluded} truncated or "
           f"shorter than {params.min_lifetime} {unit_label(contract.time_unit)})")
    if params.on_no_run_to_failure == "error":
        raise NoRunToFailureData(msg + "; ingest a run-to-failure dataset (e.g. train_FD001) or set "
                                 "on_no_run_to_failure=defaults")
    model = default_model(params.process_noise)
    if model.contract is not None and model.contract.name != contract.name:
        raise NoRunToFailureData(msg + f"; the default parameters are a twin of fleet contract "
                                 f"{model.contract.name!r}, which cannot stand in for {contract.name!r}: "
                                 "ingest run-to-failure data of this fleet")
    note = msg + "; using the default parameters (calibrated on the bundled FD001 training set)"
    warnings.warn(note, stacklevel=2)
    logger.warning(note)
    _, bundled = bundled_fd001_model(params.process_noise)
    report = bundled.model_copy(update={"fallback": True, "excluded_assets": excluded, "notes": [note]})
    return model, report


@task(name="load-rul-error-model", task_run_name=task_name("load-rul-error-model"))
def load_error_model(params: TwinParams, settings: Any) -> RulErrorModel:
    """The champion model's RUL error distribution from MLflow, else the stated Gaussian fallback."""
    logger = run_logger()
    champion = None
    try:
        from twinflow.tasks.registry import champion_error_model
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


@task(name="simulate-policies", task_run_name=task_name(
    "simulate-policies", lambda p: f"{p['params'].n_scenarios}x{p['params'].n_assets}x{p['params'].horizon}"))
def run_policy_study(model: TwinModel, params: TwinParams, error_model: RulErrorModel) -> dict[str, np.ndarray]:
    """All policies' Monte-Carlo: fixed scenario batches as Dask work (one per worker-sized chunk)."""
    policies = build_policies(params.intervals, params.thresholds)
    with _client() as client:
        return run_batches(client, model, policies, params, error_model)


def _landing_rule(contract: FleetContract) -> tuple[str, list[str] | None]:
    """The landing file name pattern and (header-less text) field order generated files follow.

    A telemetry rule with a plain ``*.txt`` or ``*.csv`` glob, so that the ingest stage routes the
    files to telemetry (never to events or labels); one whose histories end in failure
    (``life_end: failure``) first, because a generated fleet is run to failure.

    Returns:
        ``(glob, columns)``: ``columns`` lists the text fields of a ``format: text`` rule, None for CSV.
    """
    rules = [r for r in contract.datasets if r.kind == "telemetry"]
    for rule in sorted(rules, key=lambda r: r.life_end != "failure"):
        for glob in rule.match:
            if glob.count("*") != 1 or any(ch in glob for ch in "?["):
                continue
            if rule.format == "text" and rule.columns and glob.lower().endswith(".txt"):
                return glob, list(rule.columns)
            if rule.format in ("auto", "csv") and glob.lower().endswith(".csv"):
                return glob, None
    raise ConfigError(f"contract {contract.name!r} v{contract.version} has no telemetry rule with a plain "
                      "'*.csv' or '*.txt' glob to name generated landing files by; generate to the lake instead")


def _landing_table(table, contract: FleetContract, columns: list[str] | None):
    """Generated rows as a landing file's fields: the text rule's field order, or a CSV header of the
    contract's source column names (timestamps in ISO 8601, UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    # Asset ids as the source writes them: numbers from 1 where the contract accepts numeric ids (the
    # table's ids are then bare indices).
    if contract.asset.numeric_ok:
        asset = pa.array(np.asarray(table.column(ASSET).to_numpy(zero_copy_only=False), dtype=np.int64) + 1)
    else:
        asset = table.column(ASSET)
    key = contract.key
    time = table.column(key)
    if contract.clock.kind == "timestamp":
        # Whole seconds (generated times are whole clock units): Arrow's %S would print microseconds.
        time = pc.strftime(time.cast(pa.timestamp("s", tz="UTC")), format="%Y-%m-%dT%H:%M:%SZ")

    def field(lake_name: str):
        if lake_name == ASSET:
            return asset
        if lake_name == key:
            return time
        col = table.column(lake_name)
        return col.fill_null(float("nan")) if columns is not None else col

    if columns is not None:
        cols = [pa.array(np.zeros(n)) if c == "_" else field(contract.canonical_name(c)) for c in columns]
        return pa.Table.from_arrays(cols, names=[f"f{i}" for i in range(len(cols))])
    names = [contract.asset.column, contract.clock.column or key, *contract.channel_names]
    return pa.Table.from_arrays([field(ASSET), field(key), *[field(c) for c in contract.channel_names]],
                                names=names)


def _write_chunk(index: int, n_assets: int, asset_offset: int, seed, model: TwinModel, params: GenerateParams,
                 root: str, batch_id: str) -> FileRef:
    """Generate one chunk of the fleet and write it (lake: a staged part of the one commit
    :func:`write_fleet` makes; landing: one file the twin's contract routes to telemetry)."""
    import hashlib
    import os
    import uuid

    contract = fleet_contract(model)
    if params.target == "lake":
        table = generate_fleet(n_assets, seed, model, asset_offset=asset_offset, asset_prefix=params.asset_prefix,
                               batch_id=batch_id, source_file=f"generated:{params.dataset}/{batch_id}",
                               contract=contract)
        from twinflow import lake

        part = lake.staged_path(root, f"generate-{batch_id}", f"chunk-{index:05d}")
        digest = lake.write_staged(table, part, batch_id, f"generated:{params.dataset}/{batch_id}", contract=contract)
        return FileRef(path=f"generated:{params.dataset}/{batch_id}/chunk-{index:05d}", sha256=digest,
                       rows_read=table.num_rows, rows_written=table.num_rows, lake_file=str(part))
    import pyarrow.csv as pacsv

    glob, columns = _landing_rule(contract)
    prefix = "" if contract.asset.numeric_ok else params.asset_prefix
    table = generate_fleet(n_assets, seed, model, asset_offset=asset_offset, asset_prefix=prefix,
                           batch_id=batch_id, contract=contract)
    out = _landing_table(table, contract, columns)
    folder = Path(root) / params.dataset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / glob.replace("*", f"{params.dataset}_{batch_id}_{index:05d}")
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    options = (pacsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none") if columns is not None
               else pacsv.WriteOptions(include_header=True))
    try:
        pacsv.write_csv(out, tmp, options)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return FileRef(path=str(path), sha256=digest, rows_read=out.num_rows, rows_written=out.num_rows,
                   status="generated")


@task(name="write-fleet", task_run_name=task_name("write-fleet", lambda p: p["batch_id"]))
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
        refs = client.gather(futures)
    if params.target == "lake":
        from twinflow import lake

        # One transaction for the whole fleet: readers see all of it or none, and writing the same
        # batch again replaces it.
        lake.commit_files(root, params.dataset, [r.lake_file for r in refs], replace={"batch_id": [batch_id]},
                          metadata={"twinflow.operation": "generate", "twinflow.batch_id": batch_id},
                          contract=fleet_contract(model))
        refs = [r.model_copy(update={"lake_file": batch_id}) for r in refs]
    return refs
