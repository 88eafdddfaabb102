"""Maintenance and failure event logs: parse and validate them through the fleet contract, and cut each
asset's history into life segments.

An event log (a CMMS export: asset, time, event type, optionally failure mode, work order, text) says
what the telemetry cannot: which histories ended in a failure, which were cut short by a preventive
replacement, which assets are still running. The contract's ``events`` section names the columns and
the vocabulary (which types are failures, renewals or neutral).

* :func:`parse_events`: a raw table of strings -> typed events plus quarantined rows with reasons
  (missing or undeclared asset, unknown event type, unparseable time, duplicates, time outside the
  asset's telemetry). Every input row ends in exactly one of the two.
* :func:`build_segments`: telemetry extents + events -> life segments. Each segment ends in an observed
  ``failure``, is ``censored`` (a renewal without failure) or is ``running`` (still in service at its
  last reading); run-to-failure records (a dataset rule's ``life_end: failure``, like C-MAPSS training
  files) end in a failure at their last reading.

Durations are in the contract clock's unit (cycles, or hours/days for timestamp clocks). For a cycle
clock an asset's first life is counted from cycle ``first - 1``, so an engine whose readings are cycles
1..192 lived 192 cycles, as C-MAPSS counts them; a life after an event is counted from the event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from twinflow import contracts as C
from twinflow.contract.model import FleetContract
from twinflow.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["EventLogOutcome", "SEGMENT_END", "build_segments", "events_schema", "ingest_event_log",
           "life_positions", "parse_events", "rebuild_segments", "rows_in_lives", "segments_schema",
           "telemetry_extents", "time_ticks"]

SEGMENT_END = ("failure", "censored", "running")


def _time_type(contract: FleetContract) -> pa.DataType:
    return pa.int64() if contract.clock.kind == "cycle" else pa.timestamp("us", tz="UTC")


def events_schema(contract: FleetContract) -> pa.Schema:
    """The events table: one row per accepted event, keyed like the telemetry (asset, time key)."""
    return pa.schema([
        pa.field(C.ASSET, pa.string(), nullable=False),
        pa.field(contract.key, _time_type(contract), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("meaning", pa.string(), nullable=False),
        pa.field("failure_mode", pa.string()),
        pa.field("work_order", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record", pa.int64(), nullable=False),
    ])


def segments_schema(contract: FleetContract) -> pa.Schema:
    """The life-segments table (see the module docstring)."""
    t = _time_type(contract)
    return pa.schema([
        pa.field(C.ASSET, pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("origin", t, nullable=False),
        pa.field("start", t, nullable=False),
        pa.field("end", t, nullable=False),
        pa.field("end_reason", pa.string(), nullable=False),
        pa.field("failure_mode", pa.string()),
        pa.field("duration", pa.float64(), nullable=False),
    ])


def _column(table: pa.Table, wanted: str | None, what: str, required: bool) -> pa.Array | None:
    if wanted is None:
        return None
    names = {n.strip().lower(): n for n in table.column_names}
    name = names.get(wanted.strip().lower())
    if name is None:
        if required:
            raise ConfigError(f"event log lacks the {what} column {wanted!r} declared by the contract "
                              f"(it has {', '.join(table.column_names[:12])})")
        return None
    col = table.column(name).combine_chunks()
    return col.cast(pa.string()) if not pa.types.is_string(col.type) else col


def _parse_times(raw: list[str | None], contract: FleetContract) -> tuple[np.ndarray, np.ndarray]:
    """Times as int64 (cycles, or µs since the epoch in UTC) and a mask of the unparseable ones."""
    import pandas as pd

    s = pd.Series(raw, dtype=object).map(lambda v: v.strip() if isinstance(v, str) else v)
    blank = s.isna() | (s == "")
    if contract.clock.kind == "cycle":
        num = pd.to_numeric(s.where(~blank, None), errors="coerce")
        lo, hi = contract.time_range
        ok = num.notna() & (num == np.floor(num.fillna(0))) & (num >= lo) & (num <= hi)
        return np.where(ok, num.fillna(0), 0).astype(np.int64), ~ok.to_numpy()
    # Event logs are small (one row per work order): parse value by value, so that one log may mix
    # ISO forms with and without offsets, and naive times take the contract's timezone.
    from datetime import datetime

    fmt, tz = contract.clock.format, contract.clock.timezone
    us = np.zeros(len(s), np.int64)
    bad = np.ones(len(s), bool)
    for i, v in enumerate(s):
        if not isinstance(v, str) or not v:
            continue
        try:
            t = pd.Timestamp(datetime.strptime(v, fmt)) if fmt else pd.Timestamp(v)
            if t is pd.NaT:
                continue
            t = t.tz_localize(tz) if t.tzinfo is None else t
            us[i] = t.tz_convert("UTC").value // 1000
            bad[i] = False
        except (ValueError, TypeError, OverflowError):
            continue
    return us, bad


def parse_events(raw: pa.Table, contract: FleetContract, source_file: str,
                 extents: Mapping[str, tuple[int, int]] | None = None) -> tuple[pa.Table, pa.Table]:
    """Type and validate an event log against the contract.

    Args:
        raw: The log as read (any column types; headers matched case-insensitively).
        contract: The fleet contract; its ``events`` section names columns and vocabulary.
        source_file: Lineage of the rows.
        extents: Per asset, the first and last time key of its telemetry (int64: cycles or µs UTC).
            When given, an event of an asset without telemetry, or before its first reading, or more
            than one sampling step after its last reading, is quarantined.

    Returns:
        ``(events, quarantined)``: the accepted events (:func:`events_schema`) and the rejected rows
        (:func:`twinflow.contracts.quarantine_schema`, reason and the row's raw text). Every input row
        is in exactly one of them.

    Raises:
        ConfigError: when the contract declares no events or the log lacks a declared column.
    """
    spec = contract.events
    if spec is None:
        raise ConfigError(f"contract {contract.name!r} declares no event log (add an `events:` section)")
    n = raw.num_rows
    asset = _column(raw, spec.asset, "asset", True)
    time = _column(raw, spec.time, "time", True)
    etype = _column(raw, spec.type, "event type", True)
    mode = _column(raw, spec.mode, "failure mode", False)
    work = _column(raw, spec.work_order, "work order", False)
    text = _column(raw, spec.text, "text", False)

    assets = [a.strip() if isinstance(a, str) else None for a in asset.to_pylist()]
    types = [t.strip() if isinstance(t, str) else None for t in etype.to_pylist()]
    ticks, bad_time = _parse_times(time.to_pylist(), contract)
    modes = mode.to_pylist() if mode is not None else [None] * n
    reasons: list[str | None] = [None] * n
    meanings: list[str | None] = [None] * n
    seen: set[tuple[str, int, str]] = set()
    step = 1 if contract.clock.kind == "cycle" else int(
        ((contract.clock.interval_s or 0.0) + contract.clock.tolerance_s) * 1e6)
    for i in range(n):
        a, t = assets[i], types[i]
        if not a or a.lower() in C.MISSING_ASSET_TOKENS:
            reasons[i] = "missing asset id"
        elif bad_time[i]:
            reasons[i] = f"unparseable event time {time[i].as_py()!r}"
        elif not t:
            reasons[i] = "missing event type"
        elif spec.meaning(t) is None:
            declared = ", ".join([*spec.failure, *spec.renewal, *spec.neutral])
            reasons[i] = f"unknown event type {t!r} (the contract declares {declared})"
        elif extents is not None and a not in extents:
            reasons[i] = f"unknown asset {a!r}: no telemetry of it"
        elif extents is not None and not extents[a][0] <= ticks[i] <= extents[a][1] + step:
            reasons[i] = "event time outside the asset's telemetry"
        elif (a, int(ticks[i]), t) in seen:
            reasons[i] = "duplicate event"
        else:
            seen.add((a, int(ticks[i]), t))
            meanings[i] = spec.meaning(t)
    keep = np.array([r is None for r in reasons], bool)
    idx = pa.array(np.flatnonzero(keep))
    tt = _time_type(contract)
    failure_mode = [(m if m not in (None, "") else types[i]) if meanings[i] == "failure" else None
                    for i, m in enumerate(modes)]
    events = pa.table({
        C.ASSET: pa.array(assets, pa.string()).take(idx),
        contract.key: pa.array(ticks, pa.int64()).take(idx).cast(tt),
        "event": pa.array(types, pa.string()).take(idx),
        "meaning": pa.array(meanings, pa.string()).take(idx),
        "failure_mode": pa.array(failure_mode, pa.string()).take(idx),
        "work_order": (work if work is not None else pa.nulls(n, pa.string())).take(idx),
        "text": (text if text is not None else pa.nulls(n, pa.string())).take(idx),
        "source_file": pa.repeat(pa.scalar(source_file), len(idx)),
        "record": pa.array(np.flatnonzero(keep), pa.int64()),
    }, schema=events_schema(contract))
    bad = np.flatnonzero(~keep)
    raw_text = [",".join("" if v is None else str(v) for v in row.values())
                for row in raw.take(pa.array(bad)).to_pylist()] if len(bad) else []
    quarantined = pa.table({
        "source_file": pa.repeat(pa.scalar(source_file), len(bad)),
        "batch_id": pa.repeat(pa.scalar(""), len(bad)),
        "record": pa.array(bad, pa.int64()),
        "reason": pa.array([reasons[i] for i in bad], pa.string()),
        C.ASSET: pa.array([assets[i] for i in bad], pa.string()),
        C.TIME: pa.array([int(ticks[i]) if contract.clock.kind == "cycle" and not bad_time[i] else None
                          for i in bad], pa.int64()),
        "raw": pa.array(raw_text, pa.string()),
    }, schema=C.quarantine_schema())
    return events, quarantined


def time_ticks(values) -> np.ndarray:
    """A time key column as int64 ticks: cycles as they are, timestamps as µs since the epoch (UTC).

    The one conversion every life computation shares, so that telemetry rows, events and segment
    bounds compare on the same integer axis whatever the clock.

    Args:
        values: An Arrow array/chunked array or a pandas Series (or array) of cycles or timestamps;
            naive timestamps are read as UTC (the lake stores UTC).

    Returns:
        int64 ticks, one per value.
    """
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_timestamp(values.type):
            values = pc.cast(values, pa.timestamp("us", tz="UTC")).cast(pa.int64())
        return np.asarray(values.to_numpy(zero_copy_only=False), np.int64)
    import pandas as pd

    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=np.int64)
    return np.asarray(pd.to_datetime(s, utc=True).astype("datetime64[us, UTC]").array.asi8, np.int64)


def rows_in_lives(keys, segments, clock) -> "pd.DataFrame":
    """Which life segment each row belongs to.

    A row belongs to the segment of its asset whose ``start`` is the latest at or before the row's
    time, provided the row is not after that segment's ``end`` (rows between a life's end and the
    next life's start, or before the first one, belong to none). Labels, the twin's choice of
    failure lives and health's segment ages all need exactly this assignment.

    Args:
        keys: pandas DataFrame with ``asset_id`` and the clock's key column (``clock.key``), any order.
        segments: The segments (:func:`segments_schema`, an Arrow table as read from the lake) or a
            pandas frame with ``asset_id``, ``segment``, ``start``, ``end`` (int64 ticks or
            timestamps) and ``end_reason``.
        clock: The data's clock (``twinflow.contract.model.Clock``).

    Returns:
        A frame aligned with ``keys`` (same length and order, a fresh RangeIndex): ``t`` (the row's
        ticks), ``segment`` (int64, -1 outside every life), ``start``, ``end`` (int64 ticks, -1
        outside) and ``end_reason`` (``failure``/``censored``/``running``, None outside).
    """
    import pandas as pd

    t, lives, pos = life_positions(keys, segments, clock)
    n, rows = len(t), np.flatnonzero(pos >= 0)
    segment, start, end = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    reason = np.full(n, None, dtype=object)
    if rows.size:
        life = pos[rows]
        segment[rows] = lives["segment"].to_numpy(np.int64)[life]
        start[rows] = lives["start"].to_numpy(np.int64)[life]
        end[rows] = lives["end"].to_numpy(np.int64)[life]
        reason[rows] = lives["end_reason"].to_numpy(object)[life]
    return pd.DataFrame({"t": t, "segment": segment, "start": start, "end": end,
                         "end_reason": pd.Series(reason, dtype=object)})


def life_positions(keys, segments, clock) -> tuple[np.ndarray, "pd.DataFrame", np.ndarray]:
    """:func:`rows_in_lives` as positions: each row's ticks, the lives and each row's life in them.

    For callers that need a column or two of each row's life (labels need its end and whether it
    ended in a failure) without a per-row frame of all of them.

    Returns:
        ``(t, lives, pos)``: the rows' int64 ticks; the segments as a frame with int64 tick bounds
        (``asset_id``, ``segment``, ``start``, ``end``, ``end_reason``), sorted by asset and start, on
        a fresh RangeIndex; and each row's position in it (-1 outside every life).
    """
    n = len(keys)
    t = time_ticks(keys[clock.key]) if n else np.zeros(0, np.int64)
    lives = _lives_ticks(segments).sort_values([C.ASSET, "start"], kind="stable").reset_index(drop=True)
    if n == 0 or lives.empty:
        return t, lives, np.full(n, -1, np.int64)
    l_end = lives["end"].to_numpy(np.int64)
    names, first = np.unique(lives[C.ASSET].to_numpy(object).astype(str), return_index=True)
    pos = _latest_start(_asset_codes(keys[C.ASSET], names), t, lives["start"].to_numpy(np.int64), first, len(lives))
    hit = pos >= 0
    hit[hit] = t[hit] <= l_end[pos[hit]]  # after its life's end: between lives, outside every one
    return t, lives, np.where(hit, pos, -1)


def _asset_codes(assets, names: np.ndarray) -> np.ndarray:
    """Each row's index into ``names`` (sorted asset ids), -1 for an asset not among them.

    Arrow's dictionary encoding hashes the ids without a Python string per row; only the distinct
    ids (one per asset, not per reading) are looked up.
    """
    import pandas as pd

    arr = pa.array(assets.to_numpy(object) if assets.dtype == object else assets, from_pandas=True)
    if isinstance(arr, pa.ChunkedArray):  # an Arrow-backed column read from several record batches
        arr = arr.combine_chunks()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())  # numeric ids compare as their text, as the lake stores them
    enc = arr.dictionary_encode()
    lookup = pd.Index(names).get_indexer(pd.Index(enc.dictionary.to_numpy(zero_copy_only=False).astype(object)))
    idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(idx >= 0, lookup[np.maximum(idx, 0)], -1)


# Largest (asset, time) search key: asset codes times the time span must stay inside int64.
_KEY_LIMIT = 2**62


def _latest_start(code: np.ndarray, t: np.ndarray, starts: np.ndarray, first: np.ndarray, n_lives: int
                  ) -> np.ndarray:
    """Index of the life of each row's asset (``code``: index into the assets, -1 for none) with the
    latest start at or before the row's time, -1 where none; lives sorted by (asset, start), asset
    ``i``'s lives from ``first[i]``.

    One binary search over (asset, time) keys: the asset code in the high digits, the time since the
    earliest tick in the low ones (with a per-asset loop where the product would not fit in int64).
    """
    out = np.full(len(t), -1, np.int64)
    known = code >= 0
    if not known.any():
        return out
    life_code = np.repeat(np.arange(len(first)), np.diff(np.r_[first, n_lives]))
    lo = min(int(t[known].min()), int(starts.min()))
    span = max(int(t[known].max()), int(starts.max())) - lo + 1
    c, tk = code[known], t[known]
    if span * (len(first) + 1) < _KEY_LIMIT:
        pos = np.searchsorted(life_code * span + (starts - lo), c * span + (tk - lo), side="right") - 1
    else:  # ticks spanning centuries over many assets
        pos = np.empty(len(c), np.int64)
        order = np.argsort(c, kind="stable")
        bounds = np.searchsorted(c[order], np.arange(len(first) + 1))
        for i in range(len(first)):
            rows = order[bounds[i]:bounds[i + 1]]
            block = starts[first[i]:first[i] + np.count_nonzero(life_code == i)]
            pos[rows] = first[i] + np.searchsorted(block, tk[rows], side="right") - 1
    # A position before the asset's first life falls into the previous asset's block.
    pos = np.where((pos >= 0) & (life_code[np.maximum(pos, 0)] == c), pos, -1)
    out[known] = pos
    return out


def _lives_ticks(segments) -> "pd.DataFrame":
    """Segments as a pandas frame with int64 tick bounds (``_start`` keeps the start after the join)."""
    import pandas as pd

    if isinstance(segments, pa.Table):
        frame = pd.DataFrame({
            C.ASSET: segments.column(C.ASSET).to_pylist(),
            "segment": segments.column("segment").to_numpy(zero_copy_only=False).astype(np.int64),
            "start": time_ticks(segments.column("start")), "end": time_ticks(segments.column("end")),
            "end_reason": segments.column("end_reason").to_pylist()})
    else:
        frame = pd.DataFrame({
            C.ASSET: segments[C.ASSET].to_numpy(),
            "segment": (segments["segment"] if "segment" in segments else pd.Series(np.arange(len(segments)))
                        ).to_numpy(np.int64),
            "start": time_ticks(segments["start"]), "end": time_ticks(segments["end"]),
            "end_reason": (segments["end_reason"].to_numpy(object) if "end_reason" in segments else
                           np.where(segments["failed"].to_numpy(bool), "failure", "censored").astype(object))})
    frame[C.ASSET] = frame[C.ASSET].astype(str)
    frame["_start"] = frame["start"]
    return frame


def build_segments(extents: Mapping[str, tuple[int, int]], events: pa.Table | None, contract: FleetContract,
                   life_end: Mapping[str, Literal["running", "failure"]] | None = None) -> pa.Table:
    """Cut each asset's history into life segments.

    Args:
        extents: Per asset, first and last time key of its telemetry (int64: cycles or µs UTC).
        events: Accepted events (:func:`parse_events`), or None for a fleet without an event log.
        contract: The fleet contract (clock and its unit).
        life_end: Per asset, how its history ends where no event says (``failure`` for run-to-failure
            records); default ``running``.

    Returns:
        The segments (:func:`segments_schema`), sorted by asset and segment.
    """
    per_asset: dict[str, list[tuple[int, str, str | None]]] = {}
    if events is not None and events.num_rows:
        ends = events.filter(pc.is_in(events.column("meaning"), pa.array(["failure", "renewal"])))
        for a, t, m, fm in zip(ends.column(C.ASSET).to_pylist(), time_ticks(ends.column(contract.key)),
                               ends.column("meaning").to_pylist(), ends.column("failure_mode").to_pylist()):
            per_asset.setdefault(a, []).append((int(t), m, fm))
    cycle = contract.clock.kind == "cycle"
    unit = 1.0 if cycle else contract.clock.unit_seconds * 1e6
    rows: dict[str, list] = {k: [] for k in segments_schema(contract).names}

    def add(asset: str, k: int, origin: int, start: int, end: int, reason: str, mode: str | None) -> None:
        rows[C.ASSET].append(asset)
        rows["segment"].append(k)
        rows["origin"].append(origin)
        rows["start"].append(start)
        rows["end"].append(end)
        rows["end_reason"].append(reason)
        rows["failure_mode"].append(mode)
        rows["duration"].append((end - origin) / unit)

    for asset in sorted(extents):
        first, last = extents[asset]
        origin = first - 1 if cycle else first
        start, k = first, 0
        for t, meaning, mode in sorted(per_asset.get(asset, [])):
            if t <= origin:
                continue  # an event at the very start renews nothing that was observed
            add(asset, k, origin, start, t, "failure" if meaning == "failure" else "censored", mode)
            k += 1
            origin, start = t, t + 1  # the next life starts one tick (cycle or µs) after the event
        if k == 0 or (last > origin and last >= start):
            ends_in_failure = (life_end or {}).get(asset, "running") == "failure"
            add(asset, k, origin, start, last, "failure" if ends_in_failure else "running", None)
    tt = _time_type(contract)
    return pa.table({
        C.ASSET: pa.array(rows[C.ASSET], pa.string()),
        "segment": pa.array(rows["segment"], pa.int32()),
        "origin": pa.array(rows["origin"], pa.int64()).cast(tt),
        "start": pa.array(rows["start"], pa.int64()).cast(tt),
        "end": pa.array(rows["end"], pa.int64()).cast(tt),
        "end_reason": pa.array(rows["end_reason"], pa.string()),
        "failure_mode": pa.array(rows["failure_mode"], pa.string()),
        "duration": pa.array(rows["duration"], pa.float64()),
    }, schema=segments_schema(contract))


# --- I/O edge: event-log files into the lake, segments rebuilt ---------------------------------------


class EventLogOutcome(BaseModel):
    """What one event-log file became: every row accepted or quarantined."""

    source: str
    dataset: str
    rows_read: int = 0
    rows_accepted: int = 0
    rows_quarantined: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)
    error: str = ""


def telemetry_extents(lake_path: str, dataset: str, contract: FleetContract,
                      storage_options: dict[str, Any] | None = None) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Per asset of a telemetry dataset: (first, last) time key as int64, and the source file of its
    last reading (which decides how its history ends: see ``DatasetRule.life_end``)."""
    from twinflow import lake

    snap = lake.snapshot(lake_path, dataset, storage_options)
    if snap is None:
        return {}, {}
    snap = snap.model_copy(update={"contract": snap.contract or contract})
    t = lake.time_extents(snap, storage_options)
    if t.num_rows == 0:
        return {}, {}
    assets = t.column(C.ASSET).to_pylist()
    first, last = time_ticks(t.column("first")), time_ticks(t.column("last"))
    extents = {str(a): (int(f), int(l)) for a, f, l in zip(assets, first, last)}
    last_source = dict(zip(map(str, assets), map(str, t.column("last_source").to_pylist())))
    return extents, last_source


def ingest_event_log(path: str, dataset: str, contract: FleetContract, lake_path: str, quarantine_path: str,
                     storage_options: dict[str, Any] | None = None) -> EventLogOutcome:
    """Read an event-log CSV, validate it against ``dataset``'s telemetry and write both outcomes.

    The accepted events replace this file's earlier rows in ``<dataset>__events``; the rejected rows
    replace its earlier quarantine file (``<quarantine>/rows/dataset=<dataset>__events/<file id>.parquet``),
    so a log read again is never counted twice. Logs are re-validated on every run (they are small),
    because an event recorded before its telemetry arrived becomes valid once it has.
    """
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from twinflow import lake
    from twinflow.tasks.ingest.landing import read_file_bytes
    from twinflow.tasks.ingest.names import file_id
    from twinflow.tasks.ingest.parse import decompress, strip_bom
    from twinflow.tasks.ingest.stage import atomic_write_bytes

    out = EventLogOutcome(source=path, dataset=dataset)
    extents, _ = telemetry_extents(lake_path, dataset, contract, storage_options)
    if not extents:
        out.error = (f"event log {path} describes dataset {dataset!r}, which has no telemetry in the lake: "
                     "ingest its telemetry first, or set the events rule's dataset")
        return out
    data = strip_bom(decompress(read_file_bytes(path, storage_options or {}), path))
    try:
        raw = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
            column_types={}, strings_can_be_null=True, auto_dict_encode=False),
            read_options=pacsv.ReadOptions(autogenerate_column_names=False))
        raw = raw.cast(pa.schema([pa.field(n, pa.string()) for n in raw.column_names]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        out.error = f"event log {path} is not a readable CSV: {str(exc).splitlines()[0][:200]}"
        return out
    events, quarantined = parse_events(raw, contract, path, extents)
    out.rows_read = raw.num_rows
    out.rows_accepted, out.rows_quarantined = events.num_rows, quarantined.num_rows
    for r in quarantined.column("reason").to_pylist():
        key = r.split(" (", 1)[0] if r.startswith("unknown event type") else r
        key = key.split(":", 1)[0] if key.startswith("unknown asset") else key
        out.reasons[key] = out.reasons.get(key, 0) + 1
    from twinflow.tasks.ingest.quarantine import quarantine_rows_name

    rel = quarantine_rows_name(lake.derived_name(dataset, "events"), file_id(path))
    data = None
    if quarantined.num_rows:
        sink = pa.BufferOutputStream()
        pq.write_table(quarantined, sink)
        data = sink.getvalue().to_pybytes()
    if lake.is_local(quarantine_path):
        qpath = lake.local_path(quarantine_path) / rel
        if data is not None:
            atomic_write_bytes(data, qpath)
        else:
            qpath.unlink(missing_ok=True)
    else:  # an object-store lake's quarantine: one PUT (or delete) of the object
        quri = f"{quarantine_path.rstrip('/')}/{rel}"
        if data is not None:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory(prefix="twinflow-events-") as tmp:
                (Path(tmp) / "q.parquet").write_bytes(data)
                lake.put_object(Path(tmp) / "q.parquet", quri, storage_options)
        else:
            lake.remove_tree(quri, storage_options)
    import pyarrow.dataset as ds

    name = lake.derived_name(dataset, "events")
    before = lake.read_table(lake_path, name, filter=ds.field("source_file") == path, storage_options=storage_options)
    if before is not None and before.select(events.column_names).sort_by("record").equals(events):
        return out  # the same accepted events: no new version, so the segments need no rebuild
    lake.write_table(lake_path, name, events, replace={"source_file": [path]},
                     metadata={"twinflow.operation": "ingest_event_log"}, storage_options=storage_options)
    return out


def rebuild_segments(lake_path: str, dataset: str, contract: FleetContract,
                     storage_options: dict[str, Any] | None = None) -> int | None:
    """Recompute ``<dataset>__segments`` from the telemetry and the events, as one new table version.

    Returns:
        The segments table's version, or None when the dataset has no telemetry.
    """
    from twinflow import lake

    name = lake.derived_name(dataset, "segments")
    inputs = {"twinflow.telemetry_version": str(lake.version(lake_path, dataset, storage_options)),
              "twinflow.events_version": str(lake.version(lake_path, lake.derived_name(dataset, "events"),
                                                          storage_options)),
              "twinflow.contract_digest": contract.digest}
    last = lake.history(lake_path, name, limit=1, storage_options=storage_options)
    if last and all(last[0].get(k) == v for k, v in inputs.items()):
        return lake.version(lake_path, name, storage_options)  # built from exactly these inputs already
    extents, last_source = telemetry_extents(lake_path, dataset, contract, storage_options)
    if not extents:
        return None
    events = lake.read_table(lake_path, lake.derived_name(dataset, "events"), storage_options=storage_options)
    life_end: dict[str, Literal["running", "failure"]] = {}
    for asset, source in last_source.items():
        rule = contract.rule_for(source.rstrip("/").rsplit("/", 1)[-1])
        life_end[asset] = rule.life_end if rule is not None else "running"
    segments = build_segments(extents, events, contract, life_end)
    # A full rebuild replaces every row: one version = one consistent cut of the whole fleet.
    return lake.write_table(lake_path, name, segments, overwrite=True,
                            metadata={"twinflow.operation": "rebuild_segments", **inputs},
                            storage_options=storage_options)
