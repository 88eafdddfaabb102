"""The ``features`` stage flow: a lake snapshot in, a feature dataset reference out."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from twinflow import contracts
from twinflow import lake
from twinflow import runtime as rt_mod
from twinflow.contract.model import FleetContract
from twinflow.errors import ConfigError
from twinflow.flows.naming import run_name
from twinflow.refs import FeatureSetRef, LakeSnapshot
from twinflow.tasks import features as ft
from twinflow.tasks.features import FeatureParams

__all__ = ["features", "FeatureParams", "resolve_channels"]


def resolve_channels(available: list[str], params: FeatureParams, contract: FleetContract) -> list[str]:
    """The channels to use: the requested ones, or every sensor channel of the contract present.

    Raises:
        ConfigError: naming a requested channel the dataset does not have.
    """
    if params.channels is None:
        chosen = [c for c in contract.sensors if c in available]
        if not chosen:
            raise ConfigError(f"the dataset has none of the sensor channels of contract {contract.name!r} "
                              f"({', '.join(contract.sensors)}); name channels with channels=[...]")
        return chosen
    reserved = {contracts.ASSET, contracts.TIME, contracts.TIMESTAMP, *contracts.LINEAGE}
    usable = [c for c in available if c not in reserved]
    for ch in params.channels:
        if ch not in usable:
            raise ConfigError(f"unknown channel {ch!r}; available: {', '.join(usable)}")
    return list(params.channels)


def _contract_text(ref: FeatureSetRef) -> str:
    c = ref.contract
    return "unknown" if c is None else f"{c.name} v{c.version} ({c.digest})"


def _artifact_key(dataset: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"features-{dataset}".lower()).strip("-")


def _summary_markdown(ref: FeatureSetRef, summary: dict, fit: ft.FitStats, seconds: float) -> str:
    lines = [f"# Features `{ref.snapshot.dataset}` ({ref.params_digest})", "",
             f"- path: `{ref.path}`", f"- rows: {summary['rows']:,}; assets: {summary['assets']:,}; "
             f"files: {len(summary['files'])}", f"- feature columns: {len(ref.feature_columns)}; "
             f"label: {ref.label_column or 'none'}",
             f"- contract: {_contract_text(ref)}; time unit: {ref.time_unit}",
             f"- regimes: {fit.n_regimes}; kept channels: {', '.join(fit.kept)}",
             f"- dropped channels: {', '.join(f'{c} ({r})' for c, r in fit.dropped.items()) or 'none'}",
             f"- seconds: {seconds:.1f}", "", "| column | NaN count |", "|---|---:|"]
    lines += [f"| {c} | {n:,} |" for c, n in summary["nan_counts"].items()]
    return "\n".join(lines)


@flow(name="features", task_runner=ThreadPoolTaskRunner(), validate_parameters=True,
      flow_run_name=run_name("features", lambda p: p["snapshot"].dataset))
def features(snapshot: LakeSnapshot, params: FeatureParams | None = None,
             fit_from: FeatureSetRef | None = None) -> FeatureSetRef:
    """Compute per-asset window features of a lake dataset on the Dask cluster.

    Steps:
        1. Validate: parameters (pydantic, before anything else), the dataset's files and the
           requested channels against its schema.
        2. Cache check: the output folder is named by a digest of the snapshot, the lake file
           listing, the parameters, ``fit_from``, the fleet contract and the stage's code; an
           existing complete folder is returned without recomputing.
        3. Fit (task ``features-fit``, skipped with ``fit_from``): k-means regimes on a sample of
           the contract's setting channels, per-regime mean/std of each sensor channel, constant
           and all-NaN channels to drop.
        4. Transform (task ``features-transform``): per partition of whole assets on the Dask
           workers (NumPy, or CuPy on a cuda cluster): normalise, rolling mean/std/min/max/slope
           over row windows and (timestamp clocks) time windows, EWM means, time since start, the
           RUL label in the clock's unit; one Parquet file per partition keyed by
           (``asset_id``, the clock's key).

    The fleet contract is the snapshot's (or the table's): its ``sensor`` channels are the
    features' channels, its ``setting`` channels define the regimes, its clock the time axis.
        5. Publish: write ``_fit.json`` and ``_manifest.json``, rename the temporary folder into
           place (nothing partial is ever visible), and log the summary (columns, rows, NaN
           counts) as a Prefect artifact.

    Args:
        snapshot: The lake dataset at a table version (see ``twinflow/lake.py``).
        params: What to compute; defaults to :class:`FeatureParams`'s defaults.
        fit_from: A training feature set whose regimes, normalisation and dropped channels are
            reused (e.g. to transform test data with the training fit).

    Returns:
        A reference to ``<features_path>/<dataset>/<digest>/``.
    """
    params = params or FeatureParams()
    logger = get_run_logger()
    t0 = time.perf_counter()
    with rt_mod.ensure() as rt:
        settings = rt.settings
        storage = settings.lake.fsspec_options() or None  # secrets and the credentials block too
        contract = lake.snapshot_contract(snapshot, storage)
        clock = contract.clock
        if params.time_windows and clock.kind != "timestamp":
            raise ConfigError(f"time_windows {params.time_windows} need a timestamp clock; contract "
                              f"{contract.name!r} counts cycles: use windows (rows) instead")
        groups = ft.list_lake_files(snapshot, storage)
        available = ft.read_schema_columns(next(iter(groups.values()))[0][0], storage)
        fit = ft.load_fit(fit_from.path) if fit_from is not None else None
        if fit is not None:
            missing = [c for c in [*fit.kept, *(fit.op_columns if fit.n_regimes > 1 else [])]
                       if c not in available]
            if missing:
                raise ConfigError(f"fit_from {fit_from.path} uses channel(s) {', '.join(missing)} "
                                  f"that dataset {snapshot.dataset!r} lacks")
            channels = fit.kept
        else:
            channels = resolve_channels(available, params, contract)
        op_columns = [c for c in contract.settings if c in available]
        backend = ft.resolve_backend(params.backend, rt.cluster.mode if rt.cluster else None)
        ft.array_module(backend)  # fail fast when CuPy is requested but missing

        lives = None
        if params.label and snapshot.segments is not None:
            from twinflow.tasks.features.labels import lives_frame

            # Labels come from each row's own life: failure-ended lives only (see labels.py).
            lives = lives_frame(lake.read_table(snapshot.lake_path, lake.derived_name(snapshot.dataset, "segments"),
                                                version=snapshot.segments, storage_options=storage))
        source_digest = snapshot.digest if lives is None else f"{snapshot.digest}+segments@{snapshot.segments}"
        digest = ft.stage_digest(source_digest, ft.lake_fingerprint(groups, snapshot.dataset_path, storage),
                                 params, fit_from.params_digest if fit_from else None,
                                 ft.code_version(__file__), contract.digest)
        final = Path(settings.features_path) / snapshot.dataset / digest
        manifest_path = final / ft.MANIFEST_FILE
        if manifest_path.exists():
            logger.info("features unchanged (digest %s): reusing %s", digest, final)
            return FeatureSetRef.model_validate(json.loads(manifest_path.read_text())["ref"])

        workers = rt.cluster.n_workers if rt.cluster else 1
        parts = ft.plan_partitions(groups, params.partition_bytes, min_partitions=4 * max(1, workers))
        logger.info("features of %s (contract %s): %d asset(s) in %d partition(s), %d channel(s), backend %s",
                    snapshot.dataset, contract.summary(), len(groups), len(parts), len(channels), backend)
        # The Delta log's sizes: on an object store each file is then one GET, no HEAD first.
        sizes = {path: size for files in groups.values() for path, size in files}
        tmp = ft.new_temp_dir(final)
        try:
            # A fit reads every partition, then the transform again: within the memory budget each is
            # read once, held on the workers between the passes (with a fit_from there is one pass).
            # Only for CPU transforms: held frames sit in whichever worker read them, and on a mixed
            # cluster the CuPy transform runs on GPU workers, which read their partitions themselves.
            hold = settings.features.hold_bytes if fit is None and backend != "cupy" else 0
            with ft.hold_partitions(parts, [contracts.ASSET, clock.key, *op_columns, *channels], storage, sizes,
                                    hold) as held:
                if fit is None:
                    fit = ft.fit_task(parts, channels, op_columns, params, storage, sizes, held)
                summaries = ft.transform_task(parts, fit, params, backend, str(tmp), storage, clock, lives, sizes,
                                              held)
            names = ft.feature_names(fit, params, clock)
            keys = [contracts.ASSET, clock.key] + ([ft.LABEL] if params.label else [])
            summary = ft.summarise(summaries, names, keys)
            ref = FeatureSetRef(path=str(final), snapshot=snapshot, feature_columns=names,
                                label_column=ft.LABEL if params.label else None,
                                key_columns=[contracts.ASSET, clock.key], rows=summary["rows"],
                                params_digest=digest, contract=contract.ref, time_unit=clock.time_unit)
            (tmp / ft.FIT_FILE).write_text(fit.model_dump_json(indent=1))
            manifest = {"ref": ref.model_dump(mode="json"), "params": params.model_dump(mode="json"),
                        "backend": backend, "summary": summary,
                        "fit_from": fit_from.path if fit_from else None,
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            # The manifest is written last: a folder without one is never treated as complete.
            (tmp / ft.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            if not ft.publish(tmp, final):
                logger.info("another run published %s first; using it", final)
                return FeatureSetRef.model_validate(json.loads(manifest_path.read_text())["ref"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    seconds = time.perf_counter() - t0
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(_summary_markdown(ref, summary, fit, seconds), key=_artifact_key(snapshot.dataset),
                             description=f"features of {snapshot.dataset}: columns, rows, NaN counts")
    logger.info("features: %d rows, %d feature columns -> %s (%.1f s)", ref.rows, len(names), final, seconds)
    return ref
