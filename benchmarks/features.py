"""Benchmark of the features stage against pandas ``groupby(asset).rolling`` and polars.

Run: ``python -m benchmarks.features [--quick] [--fleet cmapss|timestamp] [--rows N | --years Y] [--assets A]
[--channels C] [--interval MIN] [--compression C] [--segments]``.

A fleet is generated with NumPy (degrading sensors, three operating regimes) and written as a
lake through ``twinflow.lake`` (a Delta table, one commit per 100 assets), under its fleet contract:

- ``--fleet cmapss`` (default): a cycle clock, the bundled C-MAPSS contract (three ``op_setting``
  settings, ``s1..`` sensors); windows of 10 and 30 rows.
- ``--fleet timestamp``: a timestamp clock (a contract declared here: two settings, ``ch_1..``
  sensors), a reading every 10 minutes (``--interval``) with +-20% of jitter, two gaps of 2-12 hours
  per asset and 1% missing readings; time windows of 1 and 6 hours, computed over the actual
  timestamps by every candidate (pandas ``rolling("1h", on=...)``, polars ``rolling_*_by``).
  ``--years Y`` sets the rows per asset to Y years of readings at that interval.

The same features are computed by every candidate: for each channel and window, rolling
mean/std/min/max and the least-squares slope, plus an EWM mean:

- ``pandas groupby.rolling`` (baseline): the straightforward pandas code, one chunk of 100
  assets at a time (the whole fleet's features would not fit in memory), in memory, 1 core.
- ``polars over(asset) rolling``: polars expressions ``rolling_*().over("asset_id")``, the same
  chunks, in memory, all cores.
- ``twinflow kernels (compiled, 1 process)``: :func:`compute_features` on the same chunks in
  memory, one core, with the numba CPU kernels it uses by default: the window kernels alone
  against the baselines;
- ``twinflow kernels (numpy arrays, 1 process)``: the same with ``engine="array"``, the array-module
  kernels that are also the GPU path, run on NumPy (what the stage used before the compiled ones).
- ``twinflow stage (Dask, Parquet->Parquet)``: the stage's work as the flow runs it (fit
  passes + transform + Parquet writes) on a 2-worker LocalCluster, at half and full size; the
  Prefect bookkeeping around it (~1 s) is left out. Its peak RSS (this process plus the workers)
  at the two sizes shows whether memory grows with the input. Within ``features.hold_bytes`` (the
  default 2 GiB of Parquet holds 10M rows of 14 channels) each partition is read once and held
  between the passes; ``twinflow stage, a lake read per pass`` is the same work as a fleet over that
  budget runs it (each of the regime sample, the moments and the transform reads the lake).
- ``twinflow features flow (Prefect + Dask)`` with ``--flow``: the real ``features`` flow over the
  same lake, as a command runs it: ``runtime.start`` (a Prefect server, a fresh 2-worker cluster),
  the flow run and its tasks.
- ``twinflow kernels (cupy)`` when CuPy and a GPU are present.

- with ``--segments`` (issue 26: segments and labels must stay a small share of the stage): an
  event log for the fleet (per asset 0-4 failures or preventive replacements at random times,
  written as ``fleet__events``), then ``segments: rebuild_segments`` (read the telemetry's extents
  and the events from the lake, cut the lives, write ``fleet__segments``: what the ingest flow does
  after new data) and ``labels: segment_labels`` (the segments read as ``lives_frame``, then every
  partition's keys labelled from their own life, as the stage's transform does; the keys are read
  beforehand, since the stage reads them anyway). The stage then labels from those segments, as the
  flow runs it. The JSON's ``segments_share`` is (segments + labels) / stage on the same data, with
  the fleet's scale (assets, rows, readings' interval). Recorded (2-core VM under load 5-15, so
  every figure moved between runs): 44 % at 5,000 assets x 438 hourly rows before the labels' single
  binary search (``results/2026-12-06-features-segments-extents-5000.json``, idle machine), then
  9.9 % there, 5.7 % and 7.0 % (the latter with hash-aggregated ``lake.time_extents``) at 1,000
  assets x a year of hourly rows (``results/2026-12-06-features-h33-*.json``). 10,000 assets x 10
  years (876 M rows) does not fit this machine; segments cost per asset and file, labels and the
  stage per row, so the share falls as histories grow.

- ``lake read: twinflow.lake (Delta)`` against ``lake read: hive Parquet reader (twinflow 0.1)``:
  every partition read through the lake API (the files of the snapshot's table version, the asset
  from the partition folder) against the 0.1 reader over a hive copy of the same fleet.

``--lake s3`` runs only the read comparison on object storage: the same lake copied to a SeaweedFS S3
gateway this run starts on loopback, every partition read through the lake API from the local lake
(baseline) and from the ``s3://`` lake, round-robin (goal >= 0.7x). ``--s3-stage`` adds the whole
stage (each partition read once, held, fit, transform, feature files written locally) on both lakes.

Ratios are baseline time / candidate time (> 1: faster than pandas), always measured side by side in
one run: pandas, polars, the compiled kernels and the full-size stage round-robin (one call of each per
round, ``--repeat`` rounds, at least 2), so that a shared machine's load falls on all of them alike. Recorded runs (machine, date, commit, figures): ``benchmarks/results/``
(``--json benchmarks/results/<date>-features.json``); the figures of runs 1-8 (2026-11/12, stage
2.2-3.4x pandas and 1.2-2.0x polars at 10M rows on the 2-core VM) are in this file's git history.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._harness import Bench, arg_parser
from twinflow.tasks import features as ft

WINDOWS = [10, 30]
TIME_WINDOWS = ["1h", "6h"]
SPANS = [10]
CHUNK_ASSETS = 100
KERNELS = "twinflow kernels (compiled, 1 process)"
STAGE_REREAD = "twinflow stage, a lake read per pass (over hold_bytes)"


def fleet_asset(rng: np.random.Generator, asset: int, rows: int, channels: int) -> pd.DataFrame:
    """One asset's run to failure: a degradation trend on every channel, noise, regime shifts."""
    cycle = np.arange(1, rows + 1, dtype=np.int32)
    regime = rng.integers(0, 3, size=rows)
    ops = np.array([[0.0, 0.0, 100.0], [20.0, 0.7, 100.0], [42.0, 0.84, 60.0]])[regime]
    ops += rng.normal(scale=1e-3, size=ops.shape)
    health = (cycle / rows) ** 2
    base = 100.0 + 10.0 * np.arange(channels)
    sens = (base + 5.0 * regime[:, None] + health[:, None] * rng.normal(1, 0.2, size=channels)
            + rng.normal(scale=0.5, size=(rows, channels)))
    frame = pd.DataFrame(sens, columns=[f"s{i + 1}" for i in range(channels)])
    frame.insert(0, "op_setting_3", ops[:, 2])
    frame.insert(0, "op_setting_2", ops[:, 1])
    frame.insert(0, "op_setting_1", ops[:, 0])
    frame.insert(0, "cycle", cycle)
    frame.insert(0, "asset_id", f"{asset:06d}")
    return frame


def timestamp_contract(channels: int, interval_min: int = 10):
    """The timestamped fleet's contract: two settings, ``channels`` sensors, a clock in hours, an event log."""
    from twinflow.contract.model import Channel, Clock, EventsSpec, FleetContract

    return FleetContract(name="bench-timestamp", clock=Clock(kind="timestamp", column="ts", unit="h",
                                                             interval=f"{interval_min}min",
                                                             tolerance=f"{max(1, interval_min * 3 // 10)}min"),
                         channels=[Channel(name="speed", kind="setting"), Channel(name="load", kind="setting"),
                                   *[Channel(name=f"ch_{i + 1}") for i in range(channels)]],
                         events=EventsSpec(failure=["failure"], renewal=["replacement"], neutral=["inspection"]))


def timestamp_asset(rng: np.random.Generator, asset: int, rows: int, channels: int,
                    interval_min: int = 10) -> pd.DataFrame:
    """One asset's readings on a timestamp clock: the interval +- 20%, two gaps of 2-12 h, 1% missing."""
    step = 60 * interval_min
    steps = step + rng.integers(-step // 5, step // 5 + 1, size=rows)
    steps[0] = 0
    steps[rng.choice(np.arange(1, rows), size=min(2, rows - 1), replace=False)] = rng.integers(2, 13, size=min(2, rows - 1)) * 3600
    start = np.datetime64("2026-01-01T00:00:00", "us") + np.timedelta64(int(rng.integers(0, 86400)), "s")
    ts = start + np.cumsum(steps).astype("timedelta64[s]")
    regime = rng.integers(0, 3, size=rows)
    ops = np.array([[1450.0, 60.0], [2900.0, 80.0], [2900.0, 100.0]])[regime] + rng.normal(scale=1e-3, size=(rows, 2))
    health = (np.arange(1, rows + 1) / rows) ** 2
    base = 100.0 + 10.0 * np.arange(channels)
    sens = (base + 5.0 * regime[:, None] + health[:, None] * rng.normal(1, 0.2, size=channels)
            + rng.normal(scale=0.5, size=(rows, channels)))
    sens[rng.random(sens.shape) < 0.01] = np.nan
    frame = pd.DataFrame(sens, columns=[f"ch_{i + 1}" for i in range(channels)])
    frame.insert(0, "load", ops[:, 1])
    frame.insert(0, "speed", ops[:, 0])
    frame.insert(0, "timestamp", pd.DatetimeIndex(ts).tz_localize("UTC"))
    frame.insert(0, "asset_id", f"{asset:06d}")
    return frame


def write_fleet(root: Path, assets: int, rows: int, channels: int, seed: int = 0, hive: bool = False,
                fleet: str = "cmapss", interval_min: int = 10):
    """Write the fleet into a lake at ``root`` through the lake API (one Delta commit per 100 assets).

    Returns the snapshot of the written table. With ``hive``, also write the twinflow 0.1 layout
    (``root/dataset=fleet/asset=<id>/part.parquet``, the asset column inside the files) under
    ``root/_hive`` so that the old reader can be timed against the lake API's in the same run.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twinflow import lake

    rng = np.random.default_rng(seed)
    contract = timestamp_contract(channels, interval_min) if fleet == "timestamp" else None
    batch: list[pd.DataFrame] = []
    for a in range(assets):
        frame = (timestamp_asset(rng, a, rows, channels, interval_min) if fleet == "timestamp"
                 else fleet_asset(rng, a, rows, channels))
        if hive:
            out = root / "_hive" / "dataset=fleet" / f"asset={a:06d}"
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), out / "part.parquet")
        batch.append(frame)
        if len(batch) == 100 or a == assets - 1:
            table = lake.conform(pa.Table.from_pandas(pd.concat(batch), preserve_index=False), "bench", "bench",
                                 contract=contract)
            lake.commit(str(root), "fleet", table, contract=contract)
            batch = []
    return lake.snapshot(str(root), "fleet")


def hive_groups(root: Path) -> dict[str, list[tuple[str, int]]]:
    """The twinflow 0.1 listing of the hive copy: ``{asset: [(path, bytes)]}``."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for p in sorted((root / "_hive" / "dataset=fleet").glob("asset=*/*.parquet")):
        groups.setdefault(p.parent.name.split("=", 1)[1], []).append((str(p), p.stat().st_size))
    return groups


def hive_read_partition(files, columns) -> pd.DataFrame:
    """twinflow 0.1's partition reader (asset column inside the files), kept as the reader baseline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.ParquetFile(p, pre_buffer=False).read(columns=list(columns), use_threads=False) for p in files]
    frame = (pa.concat_tables(tables) if len(tables) > 1 else tables[0]).to_pandas()
    frame["asset_id"] = frame["asset_id"].astype(str)
    return frame


def read_all(groups: dict, columns: list[str], reader, sized: bool = False) -> int:
    """Read every partition of 100 assets with ``reader``; returns the rows read.

    ``sized``: pass the files' sizes from the listing too (``sizes=``), as the features flow does.
    """
    assets = sorted(groups)
    total = 0
    for i in range(0, len(assets), CHUNK_ASSETS):
        files = [f for a in assets[i:i + CHUNK_ASSETS] for f in groups[a]]
        extra = {"sizes": [b for _, b in files]} if sized else {}
        total += len(reader([p for p, _ in files], columns, **extra))
    return total


def load_chunks(dataset: str, groups: dict, channels: list[str], key: str = "cycle") -> list[pd.DataFrame]:
    assets = sorted(groups)
    cols = ["asset_id", key, *channels]
    return [ft.read_partition([p for a in assets[i:i + CHUNK_ASSETS] for p, _ in groups[a]], cols)
            for i in range(0, len(assets), CHUNK_ASSETS)]


def pandas_features(frame: pd.DataFrame, channels: list[str], key: str = "cycle") -> int:
    """The straightforward pandas version of the same features; returns the cells computed.

    With a timestamp ``key``: time windows over the timestamps (``rolling("1h", on=key)``), time
    in hours.
    """
    frame = frame.sort_values(["asset_id", key])
    if key == "cycle":
        t = frame.groupby("asset_id").cycle.transform(lambda c: c - c.iloc[0]).astype(float)
        windows: list = WINDOWS
    else:
        t = (frame[key] - frame.groupby("asset_id")[key].transform("min")).dt.total_seconds() / 3600.0
        windows = TIME_WINDOWS
    y = frame[channels]
    ty = y.mul(t, axis=0).add_suffix("_t")
    work = pd.concat([frame[["asset_id"]], y, ty], axis=1).assign(t=t, tt=t * t)
    if key != "cycle":
        work[key] = frame[key]
    g = work.groupby("asset_id", sort=False)
    cells = 0
    for w in windows:
        on = {} if key == "cycle" else {"on": key}
        r = g[[*channels, *on.values()]].rolling(w, min_periods=1, **on)[channels]
        parts = [r.mean(), r.std(), r.min(), r.max()]
        m = g[[*ty.columns, "t", "tt", *on.values()]].rolling(w, min_periods=1, **on)[[*ty.columns, "t", "tt"]].mean()
        mean_y = parts[0].to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):  # a window of one row: 0/0
            slope = ((m[list(ty.columns)].to_numpy() - m[["t"]].to_numpy() * mean_y)
                     / (m[["tt"]].to_numpy() - m[["t"]].to_numpy() ** 2))
        cells += sum(p.size for p in parts) + slope.size
    for s in SPANS:
        cells += g[channels].ewm(span=s).mean().size
    return cells


def polars_features(frame, channels: list[str], key: str = "cycle") -> int:
    """The same features with polars group-wise rolling expressions; returns the cells computed.

    With a timestamp ``key``: ``rolling_*_by(key, "1h")`` over the timestamps, time in hours.
    """
    import polars as pl

    if key == "cycle":
        t = (pl.col("cycle") - pl.col("cycle").first().over("asset_id")).cast(pl.Float64)
        windows: list = WINDOWS
    else:
        t = (pl.col(key) - pl.col(key).first().over("asset_id")).dt.total_microseconds().cast(pl.Float64) / 3.6e9
        windows = TIME_WINDOWS
    df = frame.sort(["asset_id", key]).with_columns(t.alias("t"))
    exprs = []
    for c in channels:
        y = pl.col(c)
        for w in windows:
            if key == "cycle":
                def roll(e, w=w, how="mean"):
                    return getattr(e, f"rolling_{how}")(w, min_samples=1).over("asset_id")
            else:
                def roll(e, w=w, how="mean"):
                    return getattr(e, f"rolling_{how}_by")(key, window_size=w, min_samples=1).over("asset_id")
            exprs += [roll(y).alias(f"{c}_mean_{w}"),
                      roll(y, how="std").alias(f"{c}_std_{w}"),
                      roll(y, how="min").alias(f"{c}_min_{w}"),
                      roll(y, how="max").alias(f"{c}_max_{w}"),
                      ((roll(y * pl.col("t")) - roll(pl.col("t")) * roll(y))
                       / (roll(pl.col("t") ** 2) - roll(pl.col("t")) ** 2)).alias(f"{c}_slope_{w}")]
        for s in SPANS:
            exprs.append(y.ewm_mean(span=s).over("asset_id").alias(f"{c}_ewm_{s}"))
    out = df.with_columns(exprs)
    return out.height * len(exprs)


def twinflow_kernels(frame: pd.DataFrame, fit: ft.FitStats, params: ft.FeatureParams, xp=np,
                     engine: str = "auto", clock=None) -> int:
    _, feats = ft.compute_features(frame, fit, params, xp, engine=engine, clock=clock)
    return feats.size


def _warm_kernels() -> None:
    kernels = ft.compiled_kernels()
    if kernels is not None:
        kernels.warm_up()  # numba compiles once (then loads from its cache): not part of a run


def write_event_log(lake_path: str, dataset: str, contract, seed: int = 0) -> int:
    """An event log for the written fleet, as ``<dataset>__events``; returns its rows.

    Per asset 0-4 events at random times within its telemetry: 70% failures, 30% preventive
    replacements (a censored life each), so that lives end in failures, censorings and running.
    """
    import pyarrow as pa

    from twinflow import lake
    from twinflow.tasks.ingest.events import events_schema, telemetry_extents

    extents, _ = telemetry_extents(lake_path, dataset, contract)
    rng = np.random.default_rng(seed)
    assets, times = [], []
    for asset in sorted(extents):
        first, last = extents[asset]
        k = int(rng.integers(0, 5))
        if k and last > first + 1:
            picked = np.unique(rng.integers(first + 1, last, size=k))
            assets += [asset] * len(picked)
            times += picked.tolist()
    n = len(assets)
    failed = rng.random(n) < 0.7
    schema = events_schema(contract)
    table = pa.table({
        "asset_id": pa.array(assets, pa.string()),
        contract.key: pa.array(times, pa.int64()).cast(schema.field(contract.key).type),
        "event": pa.array(np.where(failed, "failure", "replacement").tolist(), pa.string()),
        "meaning": pa.array(np.where(failed, "failure", "renewal").tolist(), pa.string()),
        "failure_mode": pa.nulls(n, pa.string()), "work_order": pa.nulls(n, pa.string()),
        "text": pa.nulls(n, pa.string()), "source_file": pa.array(["bench-events.csv"] * n, pa.string()),
        "record": pa.array(np.arange(n), pa.int64()),
    }, schema=schema)
    lake.write_table(lake_path, lake.derived_name(dataset, "events"), table, overwrite=True)
    return n


def build_segments_from_lake(lake_path: str, dataset: str, contract) -> int:
    """``rebuild_segments`` from scratch (its table removed first: it skips a rebuild of unchanged inputs)."""
    from twinflow import lake
    from twinflow.tasks.ingest.events import rebuild_segments

    shutil.rmtree(lake.local_path(lake.table_uri(lake_path, lake.derived_name(dataset, "segments"))),
                  ignore_errors=True)
    return rebuild_segments(lake_path, dataset, contract)


def read_lives(lake_path: str, dataset: str):
    """The segments as the features flow reads them (``lives_frame`` of ``<dataset>__segments``)."""
    from twinflow import lake
    from twinflow.tasks.features.labels import lives_frame

    return lives_frame(lake.read_table(lake_path, lake.derived_name(dataset, "segments")))


def label_partitions(lake_path: str, dataset: str, keys: list[pd.DataFrame], clock, rul_cap) -> int:
    """The segments read, then every partition's keys labelled from their own life; returns labelled rows."""
    from twinflow.tasks.features.labels import segment_labels

    lives = read_lives(lake_path, dataset)
    return sum(int((~np.isnan(segment_labels(k, lives, clock, rul_cap))).sum()) for k in keys)


def twinflow_stage(parts, channels, params, out_root: Path, contract, lives=None, sizes=None,
                   storage_options=None) -> int:
    """The work of the features flow (fit passes, transform, writes) on the default Dask client.

    ``lives``: the dataset's segments (``lives_frame``): labels from each row's own life, as the
    flow does when its snapshot names segments. ``sizes``: the files' bytes from the Delta log; with
    them the partitions are read once and held between the passes when they fit the default
    ``features.hold_bytes``, as the flow does.
    """
    from twinflow.settings import FeaturesSettings

    out = Path(tempfile.mkdtemp(dir=out_root))
    t0 = time.perf_counter()
    ops, clock = list(contract.settings), contract.clock
    so = storage_options
    with ft.hold_partitions(parts, ["asset_id", clock.key, *ops, *channels], so, sizes,
                            FeaturesSettings().hold_bytes) as held:
        fit = ft.fit_statistics(parts, channels, ops, params, so, file_sizes=sizes, held=held)
        t1 = time.perf_counter()
        summaries = ft.transform_and_write(parts, fit, params, "numpy", str(out), so, clock=clock, lives=lives,
                                           file_sizes=sizes, held=held)
    print(f"  stage: {len(parts)} partitions{' (held)' if held is not None else ''}, {fit.n_regimes} regime(s); "
          f"fit {t1 - t0:.1f} s, transform+write {time.perf_counter() - t1:.1f} s")
    shutil.rmtree(out)
    return sum(s["rows"] for s in summaries)


def twinflow_flow(snapshot, params: ft.FeatureParams, home: Path) -> int:
    """The real ``features`` flow: a Prefect server, a 2-worker LocalCluster, the flow run, its tasks."""
    from twinflow import runtime
    from twinflow.flows.features import features
    from twinflow.settings import get_settings

    settings = get_settings(home=home, dask={"mode": "local", "n_workers": 2, "threads_per_worker": 1})
    with runtime.start(settings, mlflow=False):
        ref = features(snapshot, params)
    return ref.rows


def s3_reads(args, work: Path, snap, groups: dict, cols: list[str], total: int) -> dict:
    """Every partition read through the lake API from the local lake and from a copy of it on S3."""
    from functools import partial

    from benchmarks._harness import start_s3

    store = start_s3(work / "seaweedfs")
    try:
        so = store.options()
        from object_store import s3_filesystem  # importable once start_s3 has run

        t0 = time.perf_counter()
        # A Delta table names its files relative to its root: the copied folder is the same table.
        s3_filesystem(store).put(snap.dataset_path, f"{store.bucket}/lake/{snap.dataset}", recursive=True)
        print(f"lake copied to S3 in {time.perf_counter() - t0:.1f} s")
        remote = snap.model_copy(update={"lake_path": store.url("lake")})
        remote_groups = ft.list_lake_files(remote, so)
        assert sorted(remote_groups) == sorted(groups)
        bench = Bench("features lake reads, S3 vs local", baseline="lake read: local lake (Delta)", units=total)
        # Both readers get the listing's sizes, as the features flow passes them (the S3 reader then
        # fetches each file with one GET; the local one ignores them).
        reads = bench.measure_rounds({
            "lake read: local lake (Delta)": lambda: read_all(groups, cols, ft.read_partition, sized=True),
            "lake read: S3 lake, SeaweedFS loopback": lambda: read_all(
                remote_groups, cols, partial(ft.read_partition, storage_options=so), sized=True),
        }, repeat=max(3, args.repeat), warmup=1)
        assert set(reads.values()) == {total}, reads  # both read every row
        if args.s3_stage:
            stage_on_s3(args, bench, work, snap, groups, remote, remote_groups, so, cols[2:])
        summary = bench.report(None)
        summary["scale"] = {"fleet": args.fleet, "assets": len(groups), "rows": total, "channels": len(cols) - 2}
        reads = (bench.results["lake read: local lake (Delta)"], bench.results["lake read: S3 lake, SeaweedFS loopback"])
        summary["s3_vs_local_reads"] = {"best": reads[0].best / reads[1].best, "median": reads[0].median / reads[1].median}
        if args.s3_stage:
            st = bench.results[LOCAL_STAGE], bench.results[S3_STAGE]
            summary["s3_vs_local_stage"] = {"best": st[0].best / st[1].best, "median": st[0].median / st[1].median}
        if args.json:
            from benchmarks._harness import write_json

            write_json(args.json, summary)
        print(f"S3 / local lake read throughput: {bench.ratio('lake read: S3 lake, SeaweedFS loopback'):.2f}x "
              "(goal >= 0.7x)")
        if args.s3_stage:
            print(f"features stage, S3 / local lake: {bench.ratio(S3_STAGE, LOCAL_STAGE):.2f}x")
        return summary
    finally:
        store.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


LOCAL_STAGE = "twinflow stage on the local lake"
S3_STAGE = "twinflow stage on the S3 lake"


def stage_on_s3(args, bench: Bench, work: Path, snap, groups: dict, remote, remote_groups: dict, so: dict,
                channels: list[str]) -> None:
    """The features stage (fit + transform + writes, as :func:`twinflow_stage`) on the local lake and on
    its S3 copy, round-robin on one 2-worker cluster; feature files are written locally in both."""
    from distributed import Client, LocalCluster

    from twinflow import lake

    contract = lake.snapshot_contract(snap)
    timestamped = contract.clock.kind == "timestamp"
    windows = {"windows": [], "time_windows": TIME_WINDOWS} if timestamped else {"windows": WINDOWS}
    params = ft.FeatureParams(**windows, ewm_spans=SPANS, compression=args.compression)
    runs = {}
    for label, g, opts in ((LOCAL_STAGE, groups, None), (S3_STAGE, remote_groups, so)):
        parts = ft.plan_partitions(g, params.partition_bytes, min_partitions=8)
        sizes = {p: b for files in g.values() for p, b in files}
        runs[label] = (lambda parts=parts, sizes=sizes, opts=opts:
                       twinflow_stage(parts, channels, params, work, contract, sizes=sizes, storage_options=opts))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="6GiB") as cluster, Client(cluster) as client:
        client.run(_warm_kernels)
        rows = bench.measure_rounds(runs, repeat=max(2, args.repeat), warmup=1)
    assert len(set(rows.values())) == 1, rows


def main() -> dict:
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--assets", type=int, default=None)
    p.add_argument("--rows", type=int, default=None, help="rows per asset")
    p.add_argument("--years", type=float, default=None,
                   help="rows per asset as this many years of readings at --interval (timestamp fleet)")
    p.add_argument("--interval", type=int, default=10, help="minutes between readings (timestamp fleet)")
    p.add_argument("--segments", action="store_true",
                   help="also time building the life segments and the labels from them, against the stage")
    p.add_argument("--channels", type=int, default=14)
    p.add_argument("--workdir", default=None)
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--compression", default="snappy", choices=["snappy", "lz4", "zstd", "none"],
                   help="Parquet codec of the stage's feature files (FeatureParams.compression)")
    p.add_argument("--fleet", default="cmapss", choices=["cmapss", "timestamp"],
                   help="cycle-clock C-MAPSS-shaped fleet, or a timestamp-clock fleet with time windows")
    p.add_argument("--lake", default="local", choices=["local", "s3"],
                   help="s3: only the lake reads, local lake against the same lake on S3 (SeaweedFS on loopback)")
    p.add_argument("--s3-stage", action="store_true",
                   help="with --lake s3: also time the whole features stage on the local and the S3 lake")
    p.add_argument("--flow", action="store_true",
                   help="also run the real features flow (Prefect server + its own cluster) at full size")
    args = p.parse_args()
    assets = args.assets or 1000
    timestamped = args.fleet == "timestamp"
    if args.years is not None and not timestamped:
        p.error("--years needs --fleet timestamp (a cycle clock has no calendar)")
    rows = (round(args.years * 365 * 24 * 60 / args.interval) if args.years is not None
            else args.rows or (1000 if args.quick else 10_000))
    prefix = "ch_" if timestamped else "s"
    channels = [f"{prefix}{i + 1}" for i in range(args.channels)]
    key = "timestamp" if timestamped else "cycle"
    total = assets * rows
    work = Path(args.workdir or tempfile.mkdtemp(prefix="twinflow-bench-features-"))
    print(f"fleet ({args.fleet}): {assets} assets x {rows} rows = {total:,} rows, {len(channels)} channels; in {work}")
    t0 = time.perf_counter()
    snap = write_fleet(work / "lake", assets, rows, len(channels), hive=not args.skip_baselines, fleet=args.fleet,
                       interval_min=args.interval)
    print(f"lake written in {time.perf_counter() - t0:.1f} s")
    from twinflow import lake

    contract = lake.snapshot_contract(snap)
    clock = contract.clock
    groups = ft.list_lake_files(snap)
    sizes = {path: size for files in groups.values() for path, size in files}  # the Delta log's, as the flow
    if args.lake == "s3":
        return s3_reads(args, work, snap, groups, ["asset_id", key, *channels], total)
    dataset = snap.dataset_path
    windows = {"windows": [], "time_windows": TIME_WINDOWS} if timestamped else {"windows": WINDOWS}
    params = ft.FeatureParams(**windows, ewm_spans=SPANS, regimes=1, normalise=False, drop_constant=False)
    fit = ft.identity_fit(channels)
    bench = Bench("features" if not timestamped else "features-timestamp", baseline="pandas groupby.rolling",
                  units=total)
    repeat = max(1, args.repeat if args.quick else 1)

    if not args.skip_baselines:
        cols = ["asset_id", key, *channels]
        old = hive_groups(work / "lake")
        # Interleaved rounds (and a warm-up of each): the two readers differ by a few %, less than
        # a shared machine's drift between two back-to-back blocks of runs.
        reads = bench.measure_rounds({
            "lake read: hive Parquet reader (twinflow 0.1)": lambda: read_all(old, cols, hive_read_partition),
            "lake read: twinflow.lake (Delta)": lambda: read_all(groups, cols, ft.read_partition),
        }, repeat=max(7, repeat), warmup=1)
        assert len(set(reads.values())) == 1, reads  # both read every row
        shutil.rmtree(work / "lake" / "_hive", ignore_errors=True)
        chunks = load_chunks(dataset, groups, channels, key)
        import polars as pl

        pchunks = [pl.from_pandas(c) for c in chunks]
        _warm_kernels()
        # The numpy kernels are the slow reference of the compiled ones, timed once here; pandas,
        # polars, the compiled kernels and the stage are timed round-robin below (interleaved).
        bench.measure("twinflow kernels (numpy arrays, 1 process)",
                      lambda: sum(twinflow_kernels(c, fit, params, engine="array", clock=clock) for c in chunks),
                      repeat=repeat)
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount():
                gchunks = chunks
                bench.measure("twinflow kernels (cupy)",
                              lambda: sum(twinflow_kernels(c, fit, params, cupy, clock=clock) for c in gchunks),
                              repeat=repeat, warmup=1)
        except Exception as exc:  # noqa: BLE001 - no GPU here is the normal case
            print(f"(no CuPy/GPU candidate: {exc.__class__.__name__})")

    # Full normalisation as in production for the stage: regimes auto, per-regime z-scores.
    stage_params = ft.FeatureParams(**windows, ewm_spans=SPANS, compression=args.compression)
    lives = None
    if args.segments:
        lake_path = str(work / "lake")
        events = write_event_log(lake_path, "fleet", contract)
        parts_full = ft.plan_partitions(groups, stage_params.partition_bytes, min_partitions=8)
        keys = [ft.read_partition(p, ["asset_id", key]) for p in parts_full]
        bench.measure("segments: rebuild_segments",
                      lambda: build_segments_from_lake(lake_path, "fleet", contract), repeat=max(3, repeat), units=total)
        labelled = bench.measure("labels: segment_labels",
                                 lambda: label_partitions(lake_path, "fleet", keys, clock, stage_params.rul_cap),
                                 repeat=max(3, repeat), units=total)
        del keys
        lives = read_lives(lake_path, "fleet")
        failed = int((lives["end_reason"] == "failure").sum())
        print(f"  segments: {len(lives):,} lives of {assets:,} assets from {events:,} events "
              f"({failed:,} ended in failure); {labelled:,} of {total:,} rows labelled")

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="6GiB") as cluster, Client(cluster) as client:
        # Warm-up on two assets: worker imports and first-call costs stay out of the timings.
        client.run(_warm_kernels)
        twinflow_stage(ft.plan_partitions(dict(list(sorted(groups.items()))[:2]), stage_params.partition_bytes),
                       channels, stage_params, work, contract, sizes=sizes)
        half = dict(list(sorted(groups.items()))[: assets // 2])
        full_parts = ft.plan_partitions(groups, stage_params.partition_bytes, min_partitions=8)
        stage_full = "twinflow stage (Dask, Parquet->Parquet)"
        if not args.skip_baselines:
            # Round-robin (a call of each per round): on a shared machine the load then falls on the
            # baselines and the stage alike, and the ratios compare like with like. The cluster's
            # idle workers cost the in-process candidates nothing.
            bench.measure_rounds({
                "pandas groupby.rolling": lambda: sum(pandas_features(c, channels, key) for c in chunks),
                "polars over(asset) rolling": lambda: sum(polars_features(c, channels, key) for c in pchunks),
                KERNELS: lambda: sum(twinflow_kernels(c, fit, params, clock=clock) for c in chunks),
                stage_full: lambda: twinflow_stage(full_parts, channels, stage_params, work, contract, lives, sizes),
                # No sizes, no holding: each pass reads the lake, as a fleet over features.hold_bytes does.
                STAGE_REREAD: lambda: twinflow_stage(full_parts, channels, stage_params, work, contract, lives),
            }, repeat=max(2, args.repeat))
            bench.results[stage_full].extra["units"] = total
            del chunks, pchunks
        for label, subset, n in (("twinflow stage (Dask, Parquet->Parquet) 1/2", half, (assets // 2) * rows),
                                 (stage_full, groups, total)):
            if label in bench.results:
                continue
            parts = ft.plan_partitions(subset, stage_params.partition_bytes, min_partitions=8)
            bench.measure(label, lambda parts=parts: twinflow_stage(parts, channels, stage_params, work, contract,
                                                                    lives, sizes),
                          repeat=repeat, units=n)
    if args.flow:
        bench.measure("twinflow features flow (Prefect + Dask)",
                      lambda: twinflow_flow(snap, stage_params, Path(tempfile.mkdtemp(dir=work))),
                      repeat=1, units=total)
    res = bench.results
    stage = "twinflow stage (Dask, Parquet->Parquet)"
    # Printed first, so that the memory figures survive whatever happens to the table below.
    for label in (stage + " 1/2", stage):
        r = res[label]
        print(f"{label}: {r.extra['units'] / r.best:,.0f} rows/s, peak RSS {r.peak_rss_mb:,.0f} MB")
    if args.skip_baselines:
        bench.baseline = stage + " 1/2"
    summary = bench.report(None)
    if "polars over(asset) rolling" in res:
        # Medians as well as the table's best-of ratios: on a shared machine one quiet repeat can
        # flatter a candidate, the median of interleaved-in-time repeats less so.
        summary["median_ratios"] = {
            f"{a} vs {b}": res[b].median / res[a].median
            for a in (stage, KERNELS) for b in ("pandas groupby.rolling", "polars over(asset) rolling")}
        summary["median_ratios"][f"{stage} vs {STAGE_REREAD}"] = res[STAGE_REREAD].median / res[stage].median
        for k, v in summary["median_ratios"].items():
            print(f"median ratio {k}: {v:.2f}x")
    if "lake read: twinflow.lake (Delta)" in res:
        new, old_r = res["lake read: twinflow.lake (Delta)"], res["lake read: hive Parquet reader (twinflow 0.1)"]
        summary["lake_api_vs_hive_reader"] = {"best": old_r.best / new.best, "median": old_r.median / new.median,
                                              "rounds": len(new.seconds)}
        print(f"lake API reader vs the 0.1 hive reader (interleaved): best {old_r.best / new.best:.2f}x, "
              f"median {old_r.median / new.median:.2f}x (> 1: the lake API is faster)")
    summary["scale"] = {"fleet": args.fleet, "assets": assets, "rows_per_asset": rows, "rows": total,
                        "channels": len(channels),
                        **({"interval_min": args.interval, "years": round(rows * args.interval / (365 * 24 * 60), 3)}
                           if timestamped else {})}
    if args.segments:
        seg, lab = res["segments: rebuild_segments"], res["labels: segment_labels"]
        st = res[stage]
        summary["segments_share"] = {
            "segments_median_s": seg.median, "labels_median_s": lab.median, "stage_s": st.median,
            "share": (seg.median + lab.median) / st.median, "segments_share": seg.median / st.median,
            "labels_share": lab.median / st.median,
            "note": "(segments + labels) / features stage on the same fleet; the stage labels from the segments"}
        print(f"segments + labels vs the features stage at {assets:,} assets x {rows:,} rows: "
              f"{seg.median:.2f} s + {lab.median:.2f} s = {100 * (seg.median + lab.median) / st.median:.1f}% "
              f"of the stage's {st.median:.1f} s")
    if args.json:
        from benchmarks._harness import write_json

        write_json(args.json, summary)
    if "polars over(asset) rolling" in res:
        print(f"\ntwinflow stage vs polars: {bench.ratio(stage, 'polars over(asset) rolling'):.2f}x; "
              f"kernels vs polars: {bench.ratio(KERNELS, 'polars over(asset) rolling'):.2f}x")
    print(f"peak RSS of the stage (process + workers): half size {res[stage + ' 1/2'].peak_rss_mb:,.0f} MB, "
          f"full size {res[stage].peak_rss_mb:,.0f} MB")
    shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
