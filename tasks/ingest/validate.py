"""Validation against the fleet contract (:mod:`twinflow.contract`): keys, ranges, duplicates, quality flags.

The contract declares the asset key, the clock (a cycle counter or UTC timestamps, with its duplicate
and out-of-order rules), each channel's valid range and unit, the sentinels and the stuck-sensor window.
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
from twinflow.contract import FleetContract, resolve_contract

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


def asset_checks(asset: pa.Array, valid: np.ndarray, numeric_ok: bool = True,
                 enc: pa.DictionaryArray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: whether the (trimmed) asset id is too long for a partition folder, and its encoded length.

    Also clears ``valid`` (in place) where the cell is a "no value" token (``nan``, ``inf``, ``null``...,
    :data:`twinflow.contracts.MISSING_ASSET_TOKENS`), and returns which ids are numbers (refused when the
    contract's ``asset.numeric_ok`` is false). Computed once per distinct asset id, so it costs nothing
    per row; the whole-file and the streamed reader share it.

    ``enc`` is ``asset`` dictionary-encoded, when the caller has it already.

    Returns:
        (too long, encoded length, numeric id refused) per row.
    """
    n = len(asset)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, bool)
    enc = pc.dictionary_encode(asset) if enc is None else enc
    names = enc.dictionary.to_pylist()
    missing = np.array([a.lower() in C.MISSING_ASSET_TOKENS for a in names], bool)
    lengths = np.array([len(quote(a, safe="")) for a in names], np.int64)
    idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    has = np.asarray(pc.is_valid(enc.indices).to_numpy(zero_copy_only=False), bool)
    if len(names):
        valid &= ~(missing[idx] & has)
        long_ = (lengths[idx] > C.ASSET_ID_MAX_ENCODED) & has
        numeric = np.zeros(len(names), bool) if numeric_ok else \
            np.array([_is_number(a) for a in names], bool)
        return long_, np.where(has, lengths[idx], 0), numeric[idx] & has
    return np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, bool)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return text.strip().lower() not in C.MISSING_ASSET_TOKENS
    except ValueError:
        return False


class FileState:
    """What validating one file in batches carries from batch to batch (see :func:`validate_batch`).

    Per asset (indexed in order of first appearance): the largest time kept so far (out-of-order check),
    and, per channel, the last value in time order plus counts of steps, unchanged steps and changes
    (which say after the last batch whether a stuck run is possible at all). The keys kept so far are
    two int64 arrays sorted by (asset index, time) — a cycle, or a timestamp in µs — with the record of
    each: 24 bytes per kept row, the only state that grows with the file.
    """

    def __init__(self) -> None:
        self.asset_ix: dict[str, int] = {}
        self.kcodes = np.zeros(0, np.int64)
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
            self.maxc = np.r_[self.maxc, np.full(grow, np.iinfo(np.int64).min, np.int64)]
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

    def find(self, codes: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where (asset code, time) keys sorted by that pair are, or would go, among the kept keys:
        (global insert positions, whether the key is kept already)."""
        pos = np.zeros(len(codes), np.int64)
        hit = np.zeros(len(codes), bool)
        if not len(codes):
            return pos, hit
        lo = np.searchsorted(self.kcodes, codes, "left")
        hi = np.searchsorted(self.kcodes, codes, "right")
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        for s, e in zip(starts, np.r_[starts[1:], len(codes)]):  # one search per asset of the batch
            a, b = lo[s], hi[s]
            seg = self.keys[a:b]
            p = np.searchsorted(seg, times[s:e])
            pos[s:e] = a + p
            if len(seg):
                hit[s:e] = seg[np.minimum(p, len(seg) - 1)] == times[s:e]
        return pos, hit

    def keep(self, pos: np.ndarray, codes: np.ndarray, times: np.ndarray, recs: np.ndarray) -> None:
        """Add new keys at the positions :meth:`find` gave (one linear merge per batch)."""
        self.kcodes = np.insert(self.kcodes, pos, codes)
        self.keys = np.insert(self.keys, pos, times)
        self.recs = np.insert(self.recs, pos, recs)


def validate_table(table: pa.Table, reasons: dict[int, str] | None, source: str, batch_id: str,
                   stuck_window: int | None = None, contract: FleetContract | None = None
                   ) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Apply the fleet contract to a parsed table.

    Quarantines rows with a missing/invalid key (asset id; cycle outside ``time_range`` or an
    unparseable timestamp), an unparseable value (``reasons``), a value outside its channel's valid
    range (the reason names the declared unit), or a duplicate (asset, time) key: the first occurrence
    is kept, or the last with the clock's ``duplicates: keep_last``. Flags, in ``quality``, rows with
    missing or sentinel values (stored as null), rows whose time went backwards within the file (or
    quarantines them, with the clock's ``out_of_order: quarantine``), and stuck sensors. Gaps in time
    are not filled.

    Args:
        table: Output of :func:`parse_bytes` (canonical columns present in the source plus ``record``).
        reasons: Row -> reason from parsing (cells that did not convert), or None.
        source: Source file (lineage column).
        batch_id: Ingest batch (lineage column).
        stuck_window: Identical consecutive values that make a varying channel "stuck" (None: the
            contract's).
        contract: The fleet contract (default: the settings').

    Returns:
        (lake table in the contract's lake schema sorted by asset and time, quarantine table, flag counts).
    """
    return validate_batch(table, reasons, source, batch_id, stuck_window, None, contract)


def validate_batch(table: pa.Table, reasons: dict[int, str] | None, source: str, batch_id: str,
                    stuck_window: int | None, state: FileState | None, contract: FleetContract | None = None
                    ) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """:func:`validate_table` of one batch of a file's rows (``record`` numbers rows across the file).

    With ``state`` None the table is the whole file. Otherwise keys, times and channel statistics of
    earlier batches come from ``state`` (and this batch's are added): duplicate keys and out-of-order
    times are judged against the whole file so far, and stuck sensors are NOT flagged here (a later batch
    can extend a run or change whether a channel varies); :func:`stuck_quality` flags them over each
    asset that :meth:`FileState.suspects` names once the last batch is in. With ``keep_last`` a key kept
    by an earlier batch stays and the later row is quarantined (streamed files only: an earlier batch's
    rows are already staged).
    """
    contract = contract or resolve_contract(None)
    clock = contract.clock
    key = contract.key
    stuck_window = stuck_window or contract.stuck_window
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
    enc = pc.dictionary_encode(asset) if n else None
    too_long, encoded_len, numeric = asset_checks(asset, asset_valid, contract.asset.numeric_ok, enc)
    reject(~asset_valid, "missing asset id")
    reject(too_long, lambda i: f"asset id too long: {encoded_len[i]} characters percent-encoded "
                               f"(limit {C.ASSET_ID_MAX_ENCODED})")
    if numeric.any():
        reject(numeric, lambda i: f"numeric asset id: {asset[i].as_py()!r} (contract {contract.name!r} sets "
                                  "asset.numeric_ok: false)")
    t_arr = table.column(key).combine_chunks()
    t_null = np.asarray(pc.is_null(t_arr).to_numpy(zero_copy_only=False), bool)
    if key == C.TIME:
        times = t_arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        reject(t_null, "missing cycle")
        lo, hi = contract.time_range
        reject((times < lo) | (times > hi), lambda i: f"cycle {times[i]} outside [{lo}, {hi}]")
    else:
        times = t_arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        reject(t_null, "missing timestamp")

    def when(i: int) -> str:
        if key == C.TIME:
            return str(times[i])
        return t_arr[i].as_py().isoformat().replace("+00:00", "Z")

    quality = np.zeros(n, np.int32)
    values: dict[str, np.ndarray] = {}
    missing: dict[str, np.ndarray] = {}  # NaN masks of the channels that have any
    sentinels = np.asarray(contract.sentinels, np.float64)
    for spec in contract.channels:
        ch = spec.name
        if ch not in table.column_names:
            continue
        # Zero-copy where the column has no nulls; copied only when a sentinel must become NaN.
        x = np.asarray(table.column(ch).to_numpy(zero_copy_only=False), np.float64)
        if len(sentinels):
            sentinel = np.isin(x, sentinels)
            if sentinel.any():
                x = x.copy()
                x[sentinel] = np.nan
                quality[sentinel] |= C.Quality.SENTINEL
        nan = np.isnan(x)
        if nan.any():
            quality[nan] |= C.Quality.MISSING
            missing[ch] = nan
        if spec.range is not None:
            with np.errstate(invalid="ignore"):
                bad = (x < spec.low) | (x > spec.high)
            if bad.any():
                reject(bad, lambda i, ch=ch, x=x, spec=spec:
                       f"{ch}={x[i]:g} outside valid range {spec.range_text()}")
        values[ch] = x

    # Asset codes in order of first appearance in the file (a fresh state: in this table).
    if n:
        local = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        names = enc.dictionary.to_pylist()
        codes = st.index(names)[local] if names else np.zeros(n, np.int64)
    else:
        codes = np.zeros(0, np.int64)

    # Duplicate keys among rows not already rejected: keep the first occurrence in file order (a key an
    # earlier batch kept was first seen there), or the last with keep_last.
    keep_last = clock.duplicates == "keep_last"
    idx = np.flatnonzero(~rejected)
    # The usual file is already in (asset, time) order with one row per key and records rising: then
    # every sort below is the identity and the batch holds no duplicate and no time going backwards,
    # so the sorts (most of this function's time) are skipped. Any subset of such rows keeps the order.
    in_order = _strictly_sorted(codes, times, record) if len(idx) == n else \
        _strictly_sorted(codes[idx], times[idx], record[idx])
    if in_order:
        order = idx
    else:
        rec_order = -record[idx] if keep_last else record[idx]
        order = idx[np.lexsort((rec_order, times[idx], codes[idx]))]
    if len(order):
        oc, ot = codes[order], times[order]
        if in_order:
            dup = np.zeros(len(order), bool)
            kept_rec = record[order]
        else:
            dup = np.r_[False, (oc[1:] == oc[:-1]) & (ot[1:] == ot[:-1])]
            kept_rec = record[order[np.maximum.accumulate(np.where(~dup, np.arange(len(order)), 0))]]
        earlier = np.zeros(len(order), bool)
        if len(st.keys):
            pos, hit = st.find(oc, ot)
            if hit.any():
                earlier = hit
                kept_rec = np.where(hit, st.recs[np.minimum(pos, len(st.recs) - 1)], kept_rec)
                dup |= hit
        if state is not None:  # keep the new keys (sorted, unique)
            new = ~dup
            pos, _ = st.find(oc[new], ot[new])
            st.keep(pos, oc[new], ot[new], record[order[new]])
        assets_py = asset.to_pylist() if dup.any() else None
        for pos_ in np.flatnonzero(dup):
            i = int(order[pos_])
            seen = "first seen at" if not keep_last or earlier[pos_] else "superseded by"
            reason[i] = (f"duplicate key ({C.ASSET}={assets_py[i]}, {key}={when(i)}): "
                         f"{seen} record {kept_rec[pos_]}")
            rejected[i] = True
    ok = ~rejected

    # Out-of-order: a time below the running maximum of its asset, in file order (earlier batches
    # included). Times are ranked so that one running maximum over (asset, rank) serves every asset.
    idx = np.flatnonzero(ok)
    by_asset = idx if in_order else idx[np.lexsort((record[idx], codes[idx]))]
    if len(by_asset):
        bc, bt = codes[by_asset], times[by_asset]
        if in_order:  # times rise within each asset: only earlier batches can be later
            within = np.zeros(len(by_asset), bool)
        else:
            uniq, rank = np.unique(bt, return_inverse=True)
            width = len(uniq) + 1
            packed = bc * width + rank.reshape(-1)
            runmax = np.maximum.accumulate(packed)
            prevmax = np.r_[np.iinfo(np.int64).min, runmax[:-1]]
            within = packed < prevmax  # a running maximum below a row's is always of the same asset
        back = within | (bt < st.maxc[bc])
        if back.any():
            if clock.out_of_order == "quarantine":
                latest = st.maxc[bc] if in_order else np.maximum(
                    np.where(within, uniq[np.clip(prevmax % width, 0, len(uniq) - 1)], np.iinfo(np.int64).min),
                    st.maxc[bc])
                for j in np.flatnonzero(back):
                    i = int(by_asset[j])
                    later = str(latest[j]) if key == C.TIME else pa.scalar(
                        int(latest[j]), pa.timestamp("us", tz="UTC")).as_py().isoformat().replace("+00:00", "Z")
                    reason[i] = f"out of order: {key}={when(i)} after {later} of the same asset in this file"
                    rejected[i] = True
                ok = ~rejected
                idx = np.flatnonzero(ok)
            else:
                quality[by_asset[back]] |= C.Quality.OUT_OF_ORDER

    # Lake order: (asset, time); stuck sensors are judged along time.
    good = idx if in_order else idx[np.lexsort((times[idx], codes[idx]))]
    whole = len(good) == n and in_order  # good is 0..n-1: columns are used as they are, without a take
    gcodes = codes[good]
    same = np.r_[False, gcodes[1:] == gcodes[:-1]] if len(good) else np.zeros(0, bool)
    starts = group_starts(gcodes)
    judged = {c.name for c in contract.channels if c.stuck_check}
    if state is None:
        for ch, x in values.items():
            if len(good) and ch in judged:
                stuck = _stuck_mask(x if whole else x[good], same, starts, stuck_window)
                quality[good[stuck]] |= C.Quality.STUCK
    elif len(good):
        _carry_stats(st, {ch: x for ch, x in values.items() if ch in judged}, good, gcodes, same, starts, times)

    schema = contract.lake_schema()
    take = pa.array(good)
    kept_quality = quality if whole else quality[good]

    def kept(arr: pa.Array) -> pa.Array:
        return arr if whole else arr.take(take)

    cols = []
    for field in schema:
        if field.name == C.ASSET:
            cols.append(kept(asset))
        elif field.name == key:
            cols.append(kept(t_arr).cast(field.type))
        elif field.name == C.TIMESTAMP:
            cols.append(kept(table.column(C.TIMESTAMP).combine_chunks()).cast(field.type)
                        if C.TIMESTAMP in table.column_names else pa.nulls(len(good), field.type))
        elif field.name in values:
            x = values[field.name]
            nan = missing.get(field.name)
            # NaN is stored as null; a channel without any is wrapped as it is (no scan, no copy).
            cols.append(pa.array(x if whole else x[good], pa.float64(),
                                 mask=None if nan is None else (nan if whole else nan[good])))
        elif field.name == "source_file":
            cols.append(pa.repeat(pa.scalar(source, pa.string()), len(good)))
        elif field.name == "batch_id":
            cols.append(pa.repeat(pa.scalar(batch_id, pa.string()), len(good)))
        elif field.name == "quality":
            cols.append(pa.array(kept_quality, pa.int32()))
        else:  # a declared channel the file does not carry
            cols.append(pa.nulls(len(good), field.type))
    lake = pa.Table.from_arrays(cols, schema=schema)

    flagged = {q.name.lower(): int(np.count_nonzero(kept_quality & q)) if kept_quality.any() else 0
               for q in C.Quality if q}
    bad = np.flatnonzero(~ok)
    quarantine = quarantine_rows(table.take(pa.array(bad)), [reason[i] for i in bad], source, batch_id)
    return lake, quarantine, flagged


def _strictly_sorted(codes: np.ndarray, times: np.ndarray, record: np.ndarray) -> bool:
    """Whether rows are in strictly rising (asset code, time) order with rising records."""
    if len(codes) < 2:
        return True
    same = codes[1:] == codes[:-1]
    return bool(np.all(codes[1:] >= codes[:-1]) and np.all(times[1:][same] > times[:-1][same])
                and np.all(record[1:] > record[:-1]))


def _carry_stats(st: FileState, values: dict[str, np.ndarray], good: np.ndarray, gcodes: np.ndarray,
                 same: np.ndarray, starts: np.ndarray, cycle: np.ndarray) -> None:
    """Add one batch's kept rows (``good``, in (asset, time) order) to the per-asset channel statistics."""
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


def stuck_quality(rows: pa.Table, window: int, contract: FleetContract | None = None) -> tuple[pa.Table, int]:
    """Flag stuck sensors over all lake rows of one asset, in time order; return them and the count."""
    contract = contract or resolve_contract(None)
    n = rows.num_rows
    quality = rows.column("quality").to_numpy().astype(np.int32, copy=True)
    same = np.r_[False, np.ones(max(n - 1, 0), bool)][:n]
    starts = np.zeros(1 if n else 0, np.int64)
    for ch in [c.name for c in contract.channels if c.stuck_check]:
        if ch not in rows.column_names:
            continue
        col = rows.column(ch)
        if col.null_count == n:
            continue
        x = col.to_numpy().astype(np.float64) if col.null_count == 0 else \
            col.combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
        quality[_stuck_mask(x, same, starts, window)] |= C.Quality.STUCK
    i = rows.schema.get_field_index("quality")
    out = rows.set_column(i, rows.schema.field(i), pa.array(quality, pa.int32()))
    return out, int(((quality & C.Quality.STUCK) != 0).sum())
