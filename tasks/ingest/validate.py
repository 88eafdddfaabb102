"""Validation against the data contract (``twinflow/contracts.py``): keys, ranges, duplicates, quality flags.

The duplicate-key, out-of-order and stuck-sensor state is carried across batches (:class:`FileState`),
so a file validated batch by batch gives exactly the result of validating it whole.
"""

from __future__ import annotations
from typing import Any
from urllib.parse import quote
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from twinflow import contracts as C

from twinflow.tasks.ingest.quarantine import quarantine_rows
from twinflow.tasks.ingest.stage import group_starts

def _stuck_mask(x: np.ndarray, same: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Rows in runs of >= ``window`` identical values of a channel that normally changes step to step.

    ``x`` is sorted by (asset, cycle); ``same[i]`` says row i belongs to the asset of row i-1. Channels that
    are constant or quantised by design (changing in fewer than half of the steps of an asset) are not
    judged, so C-MAPSS's fixed setpoints are not reported as stuck sensors.
    """
    n = len(x)
    eq = np.zeros(n, bool)
    eq[1:] = (x[1:] == x[:-1]) & same[1:]
    if eq.sum() < window - 1:  # no run long enough anywhere: the usual case for live sensor data
        return np.zeros(n, bool)
    steps = np.add.reduceat(same.astype(np.int64), starts) if n else np.zeros(0, np.int64)
    changes = np.add.reduceat((same & ~eq).astype(np.int64), starts) if n else np.zeros(0, np.int64)
    varying = changes >= 0.5 * np.maximum(steps, 1)
    lengths = np.diff(np.r_[starts, n])
    judged = np.repeat(varying, lengths)
    run_id = np.cumsum(~eq)
    run_len = np.bincount(run_id)[run_id]
    return judged & (run_len >= window) & ~np.isnan(x)


def asset_checks(asset: pa.Array, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether the (trimmed) asset id is too long for a partition folder, and its encoded length.

    Also clears ``valid`` (in place) where the cell is a "no value" token (``nan``, ``inf``, ``null``...,
    :data:`twinflow.contracts.MISSING_ASSET_TOKENS`). Computed once per distinct asset id, so it costs
    nothing per row; the whole-file and the streamed reader share it.
    """
    n = len(asset)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    enc = pc.dictionary_encode(asset)
    names = enc.dictionary.to_pylist()
    missing = np.array([a.lower() in C.MISSING_ASSET_TOKENS for a in names], bool)
    lengths = np.array([len(quote(a, safe="")) for a in names], np.int64)
    idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    has = np.asarray(pc.is_valid(enc.indices).to_numpy(zero_copy_only=False), bool)
    if len(names):
        valid &= ~(missing[idx] & has)
        long_ = (lengths[idx] > C.ASSET_ID_MAX_ENCODED) & has
        return long_, np.where(has, lengths[idx], 0)
    return np.zeros(n, bool), np.zeros(n, np.int64)


class FileState:
    """What validating one file in batches carries from batch to batch (see :func:`validate_batch`).

    Per asset (indexed in order of first appearance): the largest cycle kept so far (out-of-order check),
    and, per channel, the last value in cycle order plus counts of steps, unchanged steps and changes
    (which say after the last batch whether a stuck run is possible at all). The keys kept so far are one
    sorted int64 array (asset index << 32 | cycle) with the record of each: 16 bytes per kept row, the
    only state that grows with the file.
    """

    def __init__(self) -> None:
        self.asset_ix: dict[str, int] = {}
        self.keys = np.zeros(0, np.int64)
        self.recs = np.zeros(0, np.int64)
        self.maxc = np.zeros(0, np.int64)
        self.rows = np.zeros(0, np.int64)
        self.disorder = np.zeros(0, bool)
        self.channels: list[str] | None = None
        self.last = self.eq = self.changes = self.steps = None

    def index(self, names: list[Any]) -> np.ndarray:
        out = np.empty(len(names), np.int64)
        for i, a in enumerate(names):
            out[i] = self.asset_ix.setdefault(a, len(self.asset_ix))
        grow = len(self.asset_ix) - len(self.maxc)
        if grow > 0:
            self.maxc = np.r_[self.maxc, np.full(grow, -1, np.int64)]
            self.rows = np.r_[self.rows, np.zeros(grow, np.int64)]
            self.disorder = np.r_[self.disorder, np.zeros(grow, bool)]
            if self.channels is not None:
                k = len(self.channels)
                self.last = np.r_[self.last, np.full((grow, k), np.nan)]
                self.eq = np.r_[self.eq, np.zeros((grow, k), np.int64)]
                self.changes = np.r_[self.changes, np.zeros((grow, k), np.int64)]
                self.steps = np.r_[self.steps, np.zeros(grow, np.int64)]
        return out

    def suspects(self, window: int) -> set[str]:
        """Assets that may hold a stuck run: cycles out of order across batches, or a varying channel with
        enough unchanged steps. Any other asset has none (exactly as :func:`_stuck_mask` would judge)."""
        sus = self.disorder.copy()
        if self.channels:
            varying = self.changes >= 0.5 * np.maximum(self.steps, 1)[:, None]
            sus |= (varying & (self.eq >= window - 1)).any(axis=1)
        names = list(self.asset_ix)
        return {names[i] for i in np.flatnonzero(sus)}


def validate_table(table: pa.Table, reasons: dict[int, str] | None, source: str, batch_id: str,
                   stuck_window: int = 20) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Apply the data contract to a parsed table.

    Quarantines rows with a missing/invalid key, an unparseable value (``reasons``), a value out of its
    valid range, or a duplicate (asset, cycle) key (the first occurrence is kept). Flags, in ``quality``,
    rows with missing or sentinel values (stored as null), rows whose cycle went backwards within the file,
    and stuck sensors.

    Args:
        table: Output of :func:`parse_bytes` (canonical columns present in the source plus ``record``).
        reasons: Row -> reason from parsing (cells that did not convert), or None.
        source: Source file (lineage column).
        batch_id: Ingest batch (lineage column).
        stuck_window: Identical consecutive values that make a varying channel "stuck".

    Returns:
        (lake table in the canonical schema sorted by asset and cycle, quarantine table, flag counts).
    """
    return validate_batch(table, reasons, source, batch_id, stuck_window, None)


def validate_batch(table: pa.Table, reasons: dict[int, str] | None, source: str, batch_id: str,
                    stuck_window: int, state: FileState | None) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """:func:`validate_table` of one batch of a file's rows (``record`` numbers rows across the file).

    With ``state`` None the table is the whole file. Otherwise keys, cycles and channel statistics of
    earlier batches come from ``state`` (and this batch's are added): duplicate keys and out-of-order
    cycles are judged against the whole file so far, and stuck sensors are NOT flagged here (a later batch
    can extend a run or change whether a channel varies); :func:`stuck_quality` flags them over each
    asset that :meth:`FileState.suspects` names once the last batch is in.
    """
    n = table.num_rows
    st = state if state is not None else FileState()
    # Rejections are rare: a boolean mask for the vectorised checks, reason strings only for rejects.
    reason: dict[int, str] = dict(reasons or {})
    rejected = np.zeros(n, bool)
    if reason:
        rejected[list(reason)] = True

    def reject(mask: np.ndarray, why) -> None:
        for i in np.flatnonzero(mask & ~rejected):
            reason[int(i)] = why(int(i)) if callable(why) else why
        rejected[mask] = True

    record = table.column("record").to_numpy()
    asset = pc.utf8_trim_whitespace(table.column(C.ASSET)).combine_chunks() if n else pa.array([], pa.string())
    asset_valid = pc.and_(pc.is_valid(asset), pc.not_equal(asset, "")).to_numpy(zero_copy_only=False) \
        if n else np.zeros(0, bool)
    asset_valid = np.asarray(asset_valid, bool) & ~np.asarray(pc.is_null(asset).to_numpy(zero_copy_only=False), bool)
    too_long, encoded_len = asset_checks(asset, asset_valid)
    cyc_arr = table.column(C.TIME).combine_chunks()
    cyc_null = np.asarray(pc.is_null(cyc_arr).to_numpy(zero_copy_only=False), bool)
    cycle = cyc_arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    reject(~asset_valid, "missing asset id")
    reject(too_long, lambda i: f"asset id too long: {encoded_len[i]} characters percent-encoded "
                               f"(limit {C.ASSET_ID_MAX_ENCODED})")
    reject(cyc_null, "missing cycle")
    lo, hi = C.CYCLE_RANGE
    reject((cycle < lo) | (cycle > hi), lambda i: f"cycle {cycle[i]} outside [{lo}, {hi}]")

    quality = np.zeros(n, np.int32)
    values: dict[str, np.ndarray] = {}
    for ch in C.CHANNELS:
        if ch not in table.column_names:
            continue
        x = table.column(ch).combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
        sentinel = np.isin(x, C.SENTINELS)
        x[sentinel] = np.nan
        quality[sentinel] |= C.Quality.SENTINEL
        quality[np.isnan(x)] |= C.Quality.MISSING
        low, high = C.valid_range(ch)
        with np.errstate(invalid="ignore"):
            bad = (x < low) | (x > high)
        if bad.any():
            reject(bad, lambda i, ch=ch, x=x, low=low, high=high:
                   f"{ch}={x[i]:g} outside valid range [{low:g}, {high:g}] {C.CHANNEL_SPECS[ch].unit}")
        values[ch] = x

    # Asset codes in order of first appearance in the file (a fresh state: in this table).
    if n:
        enc = pc.dictionary_encode(asset)
        local = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        names = enc.dictionary.to_pylist()
        codes = st.index(names)[local] if names else np.zeros(n, np.int64)
    else:
        codes = np.zeros(0, np.int64)

    # Duplicate keys among rows not already rejected: keep the first occurrence in file order (a key an
    # earlier batch kept was first seen there).
    idx = np.flatnonzero(~rejected)
    order = idx[np.lexsort((record[idx], cycle[idx], codes[idx]))]
    if len(order):
        dup = np.r_[False, (codes[order][1:] == codes[order][:-1]) & (cycle[order][1:] == cycle[order][:-1])]
        first_rec = record[order[np.maximum.accumulate(np.where(~dup, np.arange(len(order)), 0))]]
        keys = (codes[order] << 32) | cycle[order]
        if len(st.keys):
            pos = np.minimum(np.searchsorted(st.keys, keys), len(st.keys) - 1)
            hit = st.keys[pos] == keys
            if hit.any():
                dup |= hit
                first_rec = np.where(hit, st.recs[pos], first_rec)
        if state is not None:  # keep the new keys (sorted, unique): one linear merge per batch
            new = ~dup
            at = np.searchsorted(st.keys, keys[new])
            st.keys, st.recs = np.insert(st.keys, at, keys[new]), np.insert(st.recs, at, record[order[new]])
        assets_py = asset.to_pylist() if dup.any() else None
        for pos_ in np.flatnonzero(dup):
            i = int(order[pos_])
            reason[i] = (f"duplicate key ({C.ASSET}={assets_py[i]}, {C.TIME}={cycle[i]}): "
                         f"first seen at record {first_rec[pos_]}")
            rejected[i] = True
    ok = ~rejected

    # Out-of-order: a cycle below the running maximum of its asset, in file order (earlier batches
    # included).
    idx = np.flatnonzero(ok)
    by_asset = idx[np.lexsort((record[idx], codes[idx]))]
    if len(by_asset):
        key = codes[by_asset] * (1 << 32) + cycle[by_asset]
        runmax = np.maximum.accumulate(key)
        before = codes[by_asset] * (1 << 32) + st.maxc[codes[by_asset]]
        back = key < np.maximum(np.r_[np.iinfo(np.int64).min, runmax[:-1]], before)
        quality[by_asset[back]] |= C.Quality.OUT_OF_ORDER

    # Lake order: (asset, cycle); stuck sensors are judged along time.
    good = idx[np.lexsort((cycle[idx], codes[idx]))]
    gcodes = codes[good]
    same = np.r_[False, gcodes[1:] == gcodes[:-1]] if len(good) else np.zeros(0, bool)
    starts = group_starts(gcodes)
    if state is None:
        for ch, x in values.items():
            if len(good):
                stuck = _stuck_mask(x[good], same, starts, stuck_window)
                quality[good[stuck]] |= C.Quality.STUCK
    elif len(good):
        _carry_stats(st, values, good, gcodes, same, starts, cycle)

    schema = C.telemetry_schema()
    cols = []
    for field in schema:
        if field.name == C.ASSET:
            cols.append(asset.take(pa.array(good)))
        elif field.name == C.TIME:
            cols.append(pa.array(cycle[good].astype(np.int32)))
        elif field.name == C.TIMESTAMP:
            cols.append(table.column(C.TIMESTAMP).combine_chunks().take(pa.array(good))
                        if C.TIMESTAMP in table.column_names else pa.nulls(len(good), field.type))
        elif field.name in values:
            cols.append(pa.array(values[field.name][good], pa.float64(), from_pandas=True))
        elif field.name in C.CHANNELS:
            cols.append(pa.nulls(len(good), pa.float64()))
        elif field.name == "source_file":
            cols.append(pa.repeat(pa.scalar(source, pa.string()), len(good)))
        elif field.name == "batch_id":
            cols.append(pa.repeat(pa.scalar(batch_id, pa.string()), len(good)))
        elif field.name == "quality":
            cols.append(pa.array(quality[good], pa.int32()))
    lake = pa.Table.from_arrays(cols, schema=schema)

    flagged = {q.name.lower(): int(((quality[good] & q) != 0).sum()) for q in C.Quality if q}
    bad = np.flatnonzero(~ok)
    quarantine = quarantine_rows(table.take(pa.array(bad)), [reason[i] for i in bad], source, batch_id)
    return lake, quarantine, flagged


def _carry_stats(st: FileState, values: dict[str, np.ndarray], good: np.ndarray, gcodes: np.ndarray,
                 same: np.ndarray, starts: np.ndarray, cycle: np.ndarray) -> None:
    """Add one batch's kept rows (``good``, in (asset, cycle) order) to the per-asset channel statistics."""
    if st.channels is None:
        st.channels = list(values)
        a, k = len(st.maxc), len(st.channels)
        st.last, st.eq = np.full((a, k), np.nan), np.zeros((a, k), np.int64)
        st.changes, st.steps = np.zeros((a, k), np.int64), np.zeros(a, np.int64)
    ga = gcodes[starts]
    ends = np.r_[starts[1:], len(good)] - 1
    seen = st.rows[ga] > 0
    # Cycles of an asset that go below what earlier batches kept: the file's (asset, cycle) order is not
    # the order of the batches, so only the whole asset can say which runs there are.
    st.disorder[ga] |= seen & (cycle[good[starts]] < st.maxc[ga])
    st.steps[ga] += np.add.reduceat(same.astype(np.int64), starts) + seen
    if st.channels:
        x = np.column_stack([values[ch][good] for ch in st.channels])
        eq = np.zeros(x.shape, bool)
        eq[1:] = (x[1:] == x[:-1]) & same[1:, None]
        beq = (x[starts] == st.last[ga]) & seen[:, None]
        st.eq[ga] += np.add.reduceat(eq.astype(np.int64), starts, axis=0) + beq
        st.changes[ga] += np.add.reduceat((same[:, None] & ~eq).astype(np.int64), starts, axis=0) \
            + (seen[:, None] & ~beq)
        st.last[ga] = x[ends]
    st.maxc[ga] = np.maximum(st.maxc[ga], np.maximum.reduceat(cycle[good], starts))
    st.rows[ga] += np.diff(np.r_[starts, len(good)])


def stuck_quality(rows: pa.Table, window: int) -> tuple[pa.Table, int]:
    """Flag stuck sensors over all lake rows of one asset, in cycle order; return them and the count."""
    n = rows.num_rows
    quality = rows.column("quality").to_numpy().astype(np.int32, copy=True)
    same = np.r_[False, np.ones(max(n - 1, 0), bool)][:n]
    starts = np.zeros(1 if n else 0, np.int64)
    for ch in C.CHANNELS:
        col = rows.column(ch)
        if col.null_count == n:
            continue
        x = col.to_numpy().astype(np.float64) if col.null_count == 0 else \
            col.combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
        quality[_stuck_mask(x, same, starts, window)] |= C.Quality.STUCK
    i = rows.schema.get_field_index("quality")
    out = rows.set_column(i, rows.schema.field(i), pa.array(quality, pa.int32()))
    return out, int(((quality & C.Quality.STUCK) != 0).sum())
