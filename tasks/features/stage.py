"""Feature engineering: per-asset window features, regime normalisation and the RUL label.

Pure functions over pandas frames and an *array module* ``xp`` (``numpy`` on CPU, ``cupy`` on
GPU workers), so one code path serves both. Every window kernel is vectorised over all rows and
channels of a partition at once; Python loops run only over windows, doubling levels (log2 of the
window) or EWM scan steps (log2 of the EWM horizon), never over rows or assets.

A partition holds whole assets sorted by ``(asset_id, cycle)``; windows are clipped at the
asset's first row, so they never cross assets. The stage is three passes over the partitions, each
a map on the Dask cluster whose results are small (a sample, moments, a summary):

1. sample the operating settings and cluster them into regimes (k-means; ``auto`` picks k);
2. per-regime moments of every channel -> per-regime mean/std and constant/all-NaN channels;
3. normalise, compute window features and the label, write one Parquet file per partition.

Within a memory budget (:func:`hold_partitions`) each partition is read from the lake once and
held on the workers for the three passes; a larger fleet is read by each pass (pass 1 from a
seeded subset of its files), so the workers' memory does not grow with the fleet.

I/O sits at the edges (:func:`plan_partitions`, :func:`read_partition`, :func:`write_partition`);
the thin Prefect ``@task`` wrappers at the bottom add logging and retries.

Where the parts live (the package :mod:`twinflow.tasks.features` re-exports them all): the
parameters and fitted statistics in :mod:`.params`, passes 1-2 (regimes, normalisation moments) in
:mod:`.fit`, the window kernels in :mod:`.kernels` (array module) and :mod:`.cpu` (numba). pass 3,
the per-partition transform, in :mod:`.transform`. This module keeps the I/O edges, the partition
jobs, their Dask drivers and the Prefect tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from twinflow import contracts
from twinflow.contract.model import Clock
from twinflow.errors import ConfigError
from twinflow.naming import dataset_of_parts, task_name
from twinflow.refs import LakeSnapshot
from twinflow.tasks.features.fit import (
    combine_moments,
    compiled_kernels,
    finalize_fit,
    fit_regimes,
    identity_fit,
    partition_moments,
    sample_operating_settings,
)
from twinflow.tasks.features.kernels import array_module
from twinflow.tasks.features.params import FIT_FILE, LABEL, LOWER, MANIFEST_FILE, FeatureParams, FitStats
from twinflow.tasks.features.transform import compute_features, feature_names

log = logging.getLogger("twinflow.features")


# ----------------------------------------------------------------------------------------------
# I/O edges
# ----------------------------------------------------------------------------------------------


def _fs(path: str, storage_options: dict | None = None):
    import fsspec

    from twinflow.storage import fsspec_options

    # The lake's options are in delta-rs' keys (AWS_ENDPOINT_URL ...): s3fs needs its own words.
    return fsspec.core.url_to_fs(path, **fsspec_options(storage_options))


def list_lake_files(snapshot: LakeSnapshot, storage_options: dict | None = None
                    ) -> dict[str, list[tuple[str, int]]]:
    """Data files of the snapshot's table version grouped by asset: ``{asset: [(path, bytes)]}``.

    Exactly the files of that version (``twinflow.lake.list_files``), so a stage re-run on an older
    snapshot reads the older rows.

    Raises:
        ConfigError: when the dataset has no table or no rows.
    """
    from twinflow import lake

    return lake.list_files(snapshot, storage_options)


def lake_fingerprint(groups: dict[str, list[tuple[str, int]]], dataset_path: str,
                     storage_options: dict | None = None) -> str:
    """Digest of the dataset's file listing (paths, sizes, modification times).

    Part of the cache key, so that a lake rewritten under an unchanged snapshot still recomputes.
    """
    fs, root = _fs(dataset_path, storage_options)
    listed: dict[str, dict] | None = None
    if "://" in dataset_path and not dataset_path.startswith("file://"):
        # One listing of the table (a request per 1,000 objects), not a HEAD per data file.
        listed = {fs._strip_protocol(p): info for p, info in fs.find(root, detail=True).items()}
    h = hashlib.sha256()
    for asset in sorted(groups):
        for path, size in groups[asset]:
            try:
                info = fs.info(path) if listed is None else listed[fs._strip_protocol(path)]
                mtime = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
            except (OSError, KeyError):  # a file vanishing between listing and here changes the digest too
                mtime = "?"
            h.update(f"{path}|{size}|{mtime}\n".encode())
    return h.hexdigest()[:16]


def plan_partitions(groups: dict[str, list[tuple[str, int]]], target_bytes: int,
                    min_partitions: int = 1) -> list[list[str]]:
    """Pack whole assets into partitions of about ``target_bytes`` of Parquet each.

    Args:
        groups: :func:`list_lake_files`'s listing.
        target_bytes: Upper target per partition (bounds a worker's memory).
        min_partitions: Make at least this many partitions when there are enough assets (so
            every worker gets several and the last ones do not run alone).
    """
    total = sum(b for files in groups.values() for _, b in files)
    target_bytes = max(1, min(target_bytes, -(-total // max(1, min_partitions))))
    parts: list[list[str]] = []
    current: list[str] = []
    size = 0
    for asset in sorted(groups):
        files = groups[asset]
        asset_bytes = sum(b for _, b in files)
        if current and size + asset_bytes > target_bytes:
            parts.append(current)
            current, size = [], 0
        current.extend(p for p, _ in files)
        size += asset_bytes
    if current:
        parts.append(current)
    return parts


def read_schema_columns(path: str, storage_options: dict | None = None) -> list[str]:
    """Column names of one lake file."""
    import pyarrow.parquet as pq

    fs, p = _fs(path, storage_options)
    with fs.open(p, "rb") as fh:
        return list(pq.read_schema(fh).names)


def read_partition(files: Sequence[str], columns: Sequence[str],
                   storage_options: dict | None = None, sizes: Sequence[int] | None = None) -> pd.DataFrame:
    """Read the given lake files (whole assets) into one frame with ``columns``.

    ``sizes``: the files' bytes from the listing; on an object store they save a request per file.
    """
    from twinflow import lake

    return _frame(lake.read_files(files, columns, storage_options, sizes=sizes))


def read_partition_counted(files: Sequence[str], columns: Sequence[str], storage_options: dict | None = None,
                           sizes: Sequence[int] | None = None) -> tuple[pd.DataFrame, list[int]]:
    """:func:`read_partition`, and the rows each file contributed (its rows are the files' in order)."""
    from twinflow import lake

    table, rows = lake.read_files_counted(files, columns, storage_options, sizes=sizes)
    return _frame(table), rows


def _frame(table) -> pd.DataFrame:
    frame = table.to_pandas()
    if contracts.ASSET in frame.columns:
        frame[contracts.ASSET] = frame[contracts.ASSET].astype(str)
    return frame


def write_partition(keys: pd.DataFrame, features: np.ndarray, names: Sequence[str], path: str,
                    compression: str = "snappy") -> None:
    """Write one partition's keys and feature matrix (feature-major) as a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key_table = pa.Table.from_pandas(keys, preserve_index=False)
    arrays = [*key_table.columns, *(pa.array(features[i]) for i in range(len(names)))]
    table = pa.Table.from_arrays(arrays, names=[*keys.columns, *names])
    # Dictionary encoding of float features costs ~10x the write time and saves nothing; min/max
    # statistics of 170 float columns cost ~25% of it and serve no reader (they filter on the keys).
    pq.write_table(table, path, use_dictionary=[contracts.ASSET], write_statistics=list(keys.columns),
                   compression=compression)


def nan_counts(keys: pd.DataFrame, features: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """NaN count per output column."""
    counts = {c: int(keys[c].isna().sum()) for c in keys.columns}
    compiled = compiled_kernels()
    if not features.size:
        per_feature = np.zeros(len(names), int)
    elif compiled is not None and isinstance(features, np.ndarray) and features.dtype == np.float32:
        per_feature = compiled.nan_counts_rows(features)  # no (features, rows) boolean temporary
    else:
        per_feature = np.isnan(features).sum(axis=1)
    counts.update({name: int(v) for name, v in zip(names, per_feature)})
    return counts


# ----------------------------------------------------------------------------------------------
# Partition jobs (run on Dask workers) and their drivers
# ----------------------------------------------------------------------------------------------


def sample_job(frame: pd.DataFrame, op_columns: Sequence[str], n: int, seed: int) -> np.ndarray:
    """One partition's share of the operating-settings sample (pass 1)."""
    return sample_operating_settings(frame, op_columns, n, seed)


_BUFFERS = threading.local()


def _feature_buffer(frame: pd.DataFrame, fit: FitStats, params: FeatureParams) -> np.ndarray:
    # A worker's partitions are of similar size: one output buffer per thread, grown when needed,
    # instead of a fresh ~100 MB array per partition that the worker (which trims freed memory
    # back to the OS) page-faults in again every time.
    size = len(feature_names(fit, params)) * len(frame)
    buf = getattr(_BUFFERS, "features", None)
    if buf is None or buf.size < size:
        buf = _BUFFERS.features = np.empty(int(size * 1.25) + 1, dtype=np.float32)
    return buf


def transform_job(frame: pd.DataFrame, fit: FitStats, params: FeatureParams, backend: str,
                  out_dir: str, index: int, clock: Clock | None = None,
                  lives: pd.DataFrame | None = None) -> dict[str, Any]:
    """Compute one partition's features and write them; return its summary (rows, NaN counts).

    ``lives``: the dataset's life segments (:func:`~twinflow.tasks.features.labels.lives_frame`): the
    label then comes from each row's own life, NaN where that life did not end in a failure.
    """
    xp = array_module(backend)
    keys, feats = compute_features(frame, fit, params, xp, buffer=_feature_buffer(frame, fit, params), clock=clock)
    unlabelled = 0
    if lives is not None and params.label and len(keys):
        from twinflow.tasks.features.labels import segment_targets

        rul, lower = segment_targets(keys, lives, clock or Clock(), params.rul_cap)
        unlabelled = int(np.isnan(rul).sum())
        # Run-to-failure data keeps its integer cycles; censored rows need NaN, hence float.
        keys[LABEL] = rul.astype(np.int32) if unlabelled == 0 and keys[LABEL].dtype == np.int32 else rul
        # Written in every partition (not only those with censored rows): one schema for the dataset.
        keys[LOWER] = lower
    names = feature_names(fit, params, clock)
    name = f"part-{index:05d}.parquet"
    if len(keys):
        write_partition(keys, feats, names, os.path.join(out_dir, name), params.compression)
    return {"file": name if len(keys) else None, "rows": len(keys),
            "assets": int(keys[contracts.ASSET].nunique()) if len(keys) else 0,
            "nan": nan_counts(keys, feats, names), "unlabelled": unlabelled}


def stage_digest(snapshot_digest: str, lake_fp: str, params: FeatureParams,
                 fit_from_digest: str | None, code: str, contract_digest: str | None = None) -> str:
    """Cache key of a feature set: input snapshot, lake listing, parameters, fit source, code and the
    fleet contract the data is read with (its channels, kinds and clock shape the features)."""
    payload = {"snapshot": snapshot_digest, "lake": lake_fp, "params": params.digest_payload(),
               "fit_from": fit_from_digest, "code": code}
    if contract_digest is not None:
        payload["contract"] = contract_digest
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def code_version(*modules: Any) -> str:
    """Digest of the source files of the given modules (the stage's own modules always included).

    The stage's own modules: every ``.py`` file of this package (the transform, its parameters, the
    regime fit and both kernel modules), so an edit to any code that shapes the output invalidates
    cached feature sets, and a module added to the package is covered without a list to keep.
    """
    h = hashlib.sha256()
    own = [str(p) for p in Path(__file__).parent.glob("*.py")]
    for path in sorted({*own, *(getattr(m, "__file__", m) for m in modules)}):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def load_fit(feature_set_path: str) -> FitStats:
    """The fit stored beside a feature set.

    Raises:
        ConfigError: when the feature set has no ``_fit.json``.
    """
    path = Path(feature_set_path) / FIT_FILE
    if not path.exists():
        raise ConfigError(f"{feature_set_path} has no {FIT_FILE}; pass a feature set written by the "
                          "features stage as fit_from")
    return FitStats.model_validate_json(path.read_text())


def summarise(parts: Sequence[dict[str, Any]], names: Sequence[str], key_columns: Sequence[str]
              ) -> dict[str, Any]:
    """Combine partition summaries: rows, assets, files and NaN count per column."""
    rows = sum(p["rows"] for p in parts)
    nan: dict[str, int] = {c: 0 for c in [*key_columns, *names]}
    for p in parts:
        for c, v in p["nan"].items():
            nan[c] = nan.get(c, 0) + v
    return {"rows": rows, "assets": sum(p["assets"] for p in parts),
            "files": [p["file"] for p in parts if p["file"]], "nan_counts": nan,
            "columns": [*key_columns, *names]}


def new_temp_dir(final: Path) -> Path:
    """A hidden sibling of ``final`` to write into before the atomic rename."""
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> bool:
    """Rename ``tmp`` to ``final`` atomically; False (and ``tmp`` removed) if another run won."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if (final / MANIFEST_FILE).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


# ----------------------------------------------------------------------------------------------
# Drivers: run the partition jobs on the Dask cluster, collect only small results
# ----------------------------------------------------------------------------------------------


def _dask():
    from twinflow import runtime

    return runtime.using_dask()


def _read_sized(files: Sequence[str], sizes: Sequence[int] | None, columns: Sequence[str],
                storage_options: dict | None = None) -> pd.DataFrame:
    return read_partition(files, columns, storage_options, sizes=sizes)


def lake_frame(parts: Sequence[Sequence[str]], columns: Sequence[str], storage_options: dict | None = None,
               file_sizes: dict[str, int] | None = None):
    """A dask DataFrame over the lake, one partition per group of whole assets.

    ``file_sizes``: bytes per file (from :func:`list_lake_files`); each partition's task carries only
    its own files' sizes.
    """
    import dask.dataframe as dd

    dtypes = {contracts.ASSET: object, contracts.TIME: "int32", contracts.TIMESTAMP: "datetime64[us, UTC]"}
    meta = pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "float64")) for c in columns})
    sizes = [None if file_sizes is None or any(f not in file_sizes for f in p) else [file_sizes[f] for f in p]
             for p in parts]
    return dd.from_map(_read_sized, [list(p) for p in parts], sizes, columns=list(columns),
                       storage_options=storage_options, meta=meta, label="read-lake",
                       enforce_metadata=False)


def _run_per_partition(ddf, fn, *args: Any) -> list[Any]:
    """``fn(partition, *args)`` for every partition on the cluster; gathers only the results."""
    import dask

    jobs = [dask.delayed(fn, pure=False)(part, *args) for part in ddf.to_delayed()]
    with _dask() as client:
        return client.gather(client.compute(jobs))


def sample_partitions(parts: Sequence[Sequence[str]], n_files: int, seed: int) -> list[list[str]]:
    """A random subset of ``n_files`` files of ``parts`` (all when fewer), grouped as they were."""
    return [[parts[p][j] for j in files] for p, files in _sample_indices(parts, n_files, seed)]


def _sample_indices(parts: Sequence[Sequence[str]], n_files: int, seed: int) -> list[tuple[int, list[int]]]:
    """:func:`sample_partitions` as ``(partition index, [file index in it])``, partitions without a
    chosen file left out."""
    total = sum(len(p) for p in parts)
    if total <= n_files:
        return [(p, list(range(len(part)))) for p, part in enumerate(parts)]
    keep = set(np.random.default_rng(seed).choice(total, size=n_files, replace=False).tolist())
    out, i = [], 0
    for p, part in enumerate(parts):
        chosen = [j - i for j in range(i, i + len(part)) if j in keep]
        i += len(part)
        if chosen:
            out.append((p, chosen))
    return out


# ----------------------------------------------------------------------------------------------
# Partitions read once and held in the workers' memory between the passes
# ----------------------------------------------------------------------------------------------


class HeldPartitions:
    """The lake's partitions read once, with every column the stage's passes need, and held in the
    Dask workers' memory (one future of ``(frame, rows per file)`` each) until :meth:`release`.

    A pass given one takes its partitions from it instead of reading the lake again (the regime
    sample takes its files' rows back out of the held frames); a pass whose partitions or columns
    it does not cover, or that runs after the release, reads the lake as without one.
    """

    def __init__(self, parts: Sequence[Sequence[str]], columns: Sequence[str], futures: Sequence[Any]):
        self.parts = [list(p) for p in parts]
        self.columns = list(columns)
        self._futures = list(futures)

    def covers(self, parts: Sequence[Sequence[str]], columns: Sequence[str]) -> bool:
        """Whether every partition of ``parts`` is held with ``columns`` (and not yet released)."""
        return bool(self._futures) and set(columns) <= set(self.columns) and [list(p) for p in parts] == self.parts

    @property
    def futures(self) -> list[Any]:
        return list(self._futures)

    def release(self) -> None:
        """Let the workers drop the held partitions (once the tasks already given them are done)."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.release()


def held_bytes(parts: Sequence[Sequence[str]], file_sizes: dict[str, int] | None) -> int | None:
    """The Parquet bytes of ``parts`` (from the Delta log's sizes), None when a size is unknown."""
    if file_sizes is None or any(f not in file_sizes for p in parts for f in p):
        return None
    return sum(file_sizes[f] for p in parts for f in p)


@contextmanager
def hold_partitions(parts: Sequence[Sequence[str]], columns: Sequence[str], storage_options: dict | None = None,
                    file_sizes: dict[str, int] | None = None, budget_bytes: int = 0
                    ) -> Iterator[HeldPartitions | None]:
    """Read every partition once on the cluster and hold it there while the block runs.

    Yields None (each pass then reads the lake itself) when the partitions' Parquet bytes exceed
    ``budget_bytes`` (the ``features.hold_bytes`` setting) or are unknown: a fleet larger than the
    budget is read again per pass, so the workers' memory does not grow with it. The reads start
    at once; the held frames are released when the block ends, and earlier partition by partition
    when :func:`transform_and_write` has taken them.
    """
    size = held_bytes(parts, file_sizes)
    if not budget_bytes or size is None or size > budget_bytes:
        yield None
        return
    with _dask() as client:
        futures = [client.submit(read_partition_counted, list(p), list(columns), storage_options,
                                 [file_sizes[f] for f in p], key=f"read-lake-held-{uuid.uuid4().hex[:12]}")
                   for p in parts]
        held = HeldPartitions(parts, columns, futures)
        try:
            yield held
        finally:
            held.release()


def _on_frame(fn, held: tuple[pd.DataFrame, list[int]], *args: Any) -> Any:
    """``fn(frame, *args)`` on a held partition's frame."""
    return fn(held[0], *args)


def _sample_held(held: tuple[pd.DataFrame, list[int]], files: Sequence[int], op_columns: Sequence[str],
                 n: int, seed: int) -> np.ndarray:
    """:func:`sample_job` on the rows of the held partition's ``files`` (indices in the partition):
    the rows, in the order, a read of those files alone gives."""
    frame, rows = held
    ops = frame[list(op_columns)]
    if len(files) < len(rows):
        bounds = np.concatenate([[0], np.cumsum(rows)])
        ops = ops.iloc[np.concatenate([np.arange(bounds[j], bounds[j + 1]) for j in files])]
    return sample_job(ops, op_columns, n, seed)


def fit_statistics(parts: Sequence[Sequence[str]], channels: Sequence[str], op_columns: Sequence[str],
                   params: FeatureParams, storage_options: dict | None = None,
                   file_sizes: dict[str, int] | None = None, held: HeldPartitions | None = None) -> FitStats:
    """Passes 1-2 on the cluster: regimes from a sample of operating settings (read from a random
    subset of files, see ``sample_files``), then moments over every row.

    ``file_sizes``: bytes per file, as :func:`lake_frame` takes them. ``held``: the partitions held
    by :func:`hold_partitions`; both passes then use them instead of reading the lake (same rows,
    same sample, same statistics).
    """
    if not params.normalise and not params.drop_constant and params.regimes == 1:
        return identity_fit(channels)
    op_columns = list(op_columns)
    op_mean, op_scale, centroids = np.zeros(0), np.ones(0), np.empty((0, 0))
    if params.regimes != 1 and op_columns:
        chosen = _sample_indices(parts, params.sample_files, params.seed)
        per_part = max(1, -(-params.sample_rows // len(chosen)))
        with _dask() as client:
            if held is not None and held.covers(parts, op_columns):
                futures = held.futures
                jobs = [client.submit(_sample_held, futures[p], files, op_columns, per_part, params.seed + i,
                                      pure=False) for i, (p, files) in enumerate(chosen)]
                samples = client.gather(jobs)
            else:
                import dask

                sample_parts = [[parts[p][j] for j in files] for p, files in chosen]
                ddf = lake_frame(sample_parts, op_columns, storage_options, file_sizes)  # no keys: none needed
                jobs = [dask.delayed(sample_job, pure=False)(p, op_columns, per_part, params.seed + i)
                        for i, p in enumerate(ddf.to_delayed())]
                samples = client.gather(client.compute(jobs))
        sample = np.concatenate([s for s in samples if len(s)] or [np.empty((0, len(op_columns)))])
        op_columns, op_mean, op_scale, centroids = fit_regimes(sample, op_columns, params)
    if len(centroids) == 0:
        op_columns, op_mean, op_scale = [], np.zeros(0), np.ones(0)
    args = (list(channels), op_columns, op_mean, op_scale, centroids)
    if held is not None and held.covers(parts, [*op_columns, *channels]):
        with _dask() as client:
            moments = client.gather([client.submit(_on_frame, partition_moments, f, *args, pure=False)
                                     for f in held.futures])
    else:
        # Moments need no keys: decoding the asset strings and cycles would be ~20% of this pass.
        moments = _run_per_partition(lake_frame(parts, [*op_columns, *channels], storage_options, file_sizes),
                                     partition_moments, *args)
    return finalize_fit(combine_moments(moments), list(channels), op_columns, op_mean, op_scale,
                        centroids, params)


def transform_and_write(parts: Sequence[Sequence[str]], fit: FitStats, params: FeatureParams,
                        backend: str, out_dir: str, storage_options: dict | None = None,
                        clock: Clock | None = None, lives: pd.DataFrame | None = None,
                        file_sizes: dict[str, int] | None = None,
                        held: HeldPartitions | None = None) -> list[dict[str, Any]]:
    """Pass 3 on the cluster: features of every partition written under ``out_dir``.

    ``clock``: the data's clock (the fleet contract's); default a cycle clock. ``file_sizes``:
    bytes per file, as :func:`lake_frame` takes them. ``held``: the partitions held by
    :func:`hold_partitions`, used instead of reading the lake and released here (the last pass),
    so each partition's frame leaves the worker's memory once its features are written.
    """
    import dask

    clock = clock or Clock()
    op_columns = fit.op_columns if fit.n_regimes > 1 else []
    columns = [contracts.ASSET, clock.key, *op_columns, *fit.kept]
    with _dask() as client:
        from twinflow.runtime import gpu_resources

        # CuPy partitions must land on GPU workers of a mixed cluster.
        resources = gpu_resources(client, backend == "cupy")
        if held is not None and held.covers(parts, columns):
            jobs = [client.submit(_on_frame, transform_job, f, fit, params, backend, out_dir, i, clock, lives,
                                  pure=False, resources=resources) for i, f in enumerate(held.futures)]
            held.release()
            return client.gather(jobs)
        ddf = lake_frame(parts, columns, storage_options, file_sizes)
        jobs = [dask.delayed(transform_job, pure=False)(p, fit, params, backend, out_dir, i, clock, lives)
                for i, p in enumerate(ddf.to_delayed())]
        return client.gather(client.compute(jobs, resources=resources))


# ----------------------------------------------------------------------------------------------
# Prefect tasks: coarse (one per pass), the fine-grained work is Dask tasks inside them
# ----------------------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="features-fit", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      task_run_name=task_name("features-fit", lambda p: dataset_of_parts(p["parts"])))
def fit_task(parts: list[list[str]], channels: list[str], op_columns: list[str], params: FeatureParams,
             storage_options: dict | None = None, file_sizes: dict[str, int] | None = None,
             held: HeldPartitions | None = None) -> FitStats:
    """Fit regimes and normalisation statistics over the lake partitions (passes 1-2)."""
    from prefect import get_run_logger

    fit = fit_statistics(parts, channels, op_columns, params, storage_options, file_sizes, held)
    get_run_logger().info("fit: %d regime(s), kept %d channel(s), dropped %s", fit.n_regimes,
                          len(fit.kept), fit.dropped or "none")
    return fit


@task(name="features-transform", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      task_run_name=task_name("features-transform", lambda p: dataset_of_parts(p["parts"])))
def transform_task(parts: list[list[str]], fit: FitStats, params: FeatureParams, backend: str,
                   out_dir: str, storage_options: dict | None = None,
                   clock: Clock | None = None, lives: pd.DataFrame | None = None,
                   file_sizes: dict[str, int] | None = None,
                   held: HeldPartitions | None = None) -> list[dict[str, Any]]:
    """Compute and write the features of every partition into ``out_dir`` (pass 3)."""
    from prefect import get_run_logger

    # A retry starts from an empty directory: no file of a failed attempt survives.
    for leftover in Path(out_dir).glob("part-*.parquet"):
        leftover.unlink()
    summaries = transform_and_write(parts, fit, params, backend, out_dir, storage_options, clock, lives, file_sizes,
                                    held)
    unlabelled = sum(s.get("unlabelled", 0) for s in summaries)
    get_run_logger().info("features: %d rows in %d partition(s) on %s%s", sum(s["rows"] for s in summaries),
                          len(summaries), backend,
                          f"; {unlabelled} rows of censored or running lives carry no RUL label" if unlabelled else "")
    return summaries
