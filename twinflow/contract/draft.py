"""``twinflow contract init``: a first draft of a fleet contract from sample files, for a person to review.

The draft is a guess from the data, and says so: :func:`draft_contract` detects

* the **asset column** (text or integer values, few distinct relative to the rows, a name such as
  ``machine``, ``asset``, ``unit``, ``id``),
* the **clock** (a column of parseable timestamps: a timestamp clock with the median sampling interval
  and a tolerance from the observed jitter; else an integer column that increases within each asset:
  a cycle clock),
* each remaining numeric column as a **channel**: a lower-case identifier (the original header kept as
  an alias), a unit from the header (``[degC]``, ``(rpm)``, ``_bar``, ``_pct``...), a robust valid
  range (the 0.1 %/99.9 % quantiles widened by a margin, never narrower than the plausible observed
  values), ``setting`` for step-like columns with few values, constant columns marked,
* **sentinels** (``-999`` and the like, far from the data),
* **dataset rules** from the file names (daily files become one dataset glob; an event log is routed
  as ``events`` and its vocabulary drafted).

:func:`draft_yaml` renders the draft with a header comment listing every guess to check.

It stays one module: the steps are one procedure read top to bottom (headers, samples, columns,
clock, channels, routing), and they share the sampled frame and the list of notes for the reviewer.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from twinflow.contract.model import (AssetKey, Channel, Clock, DatasetRule, EventsSpec, FleetContract,
                                     RESERVED)
from twinflow.errors import ConfigError

__all__ = ["Draft", "draft_contract", "draft_yaml", "sanitise_header"]

_ASSET_HINTS = ("machine", "asset", "unit", "equipment", "pump", "engine", "device", "serial", "tag", "id")
_TIME_HINTS = ("timestamp", "datetime", "ts", "time", "date")
_CYCLE_HINTS = ("cycle", "cycles", "time", "step", "count", "flight", "batch", "t")
_EVENT_FILE = re.compile(r"(event|maint|work_?order|alarm|log)", re.I)
_EVENT_TYPE_COLS = ("event", "event_type", "type", "kind", "category", "action", "activity")
_SENTINEL_CANDIDATES = (-999.0, -9999.0, 9999.0, -99999.0, 99999.0, -999.9, -32768.0, 32767.0, 65535.0)
# Nice sampling intervals (seconds), so 598.7 s of median spacing reads as 10min.
_NICE_S = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
# Units a header may carry in brackets, and as a name suffix; both map to (unit as declared, name suffix).
_UNIT_WORDS = {
    "degc": ("degC", "c"), "°c": ("degC", "c"), "c": ("degC", "c"), "celsius": ("degC", "c"),
    "degf": ("degF", "f"), "°f": ("degF", "f"), "f": ("degF", "f"),
    "k": ("K", "k"), "kelvin": ("K", "k"), "°r": ("°R", "r"), "degr": ("°R", "r"),
    "bar": ("bar", "bar"), "barg": ("bar", "barg"), "mbar": ("mbar", "mbar"), "psi": ("psi", "psi"),
    "psia": ("psia", "psia"), "psig": ("psig", "psig"), "kpa": ("kPa", "kpa"), "mpa": ("MPa", "mpa"),
    "pa": ("Pa", "pa"),
    "rpm": ("rpm", "rpm"), "hz": ("Hz", "hz"), "khz": ("kHz", "khz"),
    "%": ("%", "pct"), "pct": ("%", "pct"), "percent": ("%", "pct"),
    "m3/h": ("m3/h", "m3h"), "m³/h": ("m3/h", "m3h"), "m3h": ("m3/h", "m3h"), "l/min": ("l/min", "lpm"),
    "lpm": ("l/min", "lpm"), "l/s": ("l/s", "lps"), "gpm": ("gpm", "gpm"), "kg/s": ("kg/s", "kg_s"),
    "mm/s": ("mm/s", "mm_s"), "mm_s": ("mm/s", "mm_s"), "in/s": ("in/s", "in_s"), "um": ("µm", "um"),
    "µm": ("µm", "um"), "g": ("g", "g"), "m/s2": ("m/s2", "m_s2"),
    "a": ("A", "a"), "amp": ("A", "a"), "amps": ("A", "a"), "ma": ("mA", "ma"), "v": ("V", "v"),
    "kv": ("kV", "kv"), "w": ("W", "w"), "kw": ("kW", "kw"), "mw": ("MW", "mw"), "kwh": ("kWh", "kwh"),
    "nm": ("Nm", "nm"), "m": ("m", "m"), "mm": ("mm", "mm"), "s": ("s", "s"), "h": ("h", "h"),
}
# Suffixes that name a unit only in a longer name (``inlet_temp_c``, not a column called ``c``).
_SUFFIX_UNITS = {w: unit for w, (unit, _) in _UNIT_WORDS.items() if re.fullmatch(r"[a-z0-9_]+", w)}
_SUFFIX_UNITS.update({"m3_h": "m3/h", "kg_s": "kg/s", "deg_c": "degC", "deg_f": "degF"})
# Units whose quantities cannot be negative: a drafted range stops at 0.
_NON_NEGATIVE = {"rpm", "Hz", "kHz", "%", "m3/h", "l/min", "l/s", "gpm", "kg/s", "mm/s", "in/s", "µm", "A",
                 "mA", "V", "kV", "K", "°R", "psia", "bar", "mbar", "kPa", "MPa", "Pa", "W", "kW", "MW", "kWh"}


@dataclass
class Draft:
    """A drafted contract and the guesses a person should check.

    Attributes:
        contract: The draft, valid as a :class:`FleetContract`.
        notes: One line per guess or doubt (shown in the YAML's header comment).
        files: The sample files it was drafted from.
    """

    contract: FleetContract
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# --- headers ----------------------------------------------------------------------------------------

def _identifier(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not name:
        name = "channel"
    if not name[0].isalpha():
        name = f"c_{name}"
    return name[:63]


def sanitise_header(header: str) -> tuple[str, str | None]:
    """A header as a lake identifier plus the unit its header names, if any.

    ``"Casing Temp [degC]"`` -> ``("casing_temp_c", "degC")``; ``"speed (rpm)"`` ->
    ``("speed_rpm", "rpm")``; ``"inlet_temp_c"`` -> ``("inlet_temp_c", "degC")``;
    ``"Flow"`` -> ``("flow", None)``.
    """
    text = header.replace("\ufeff", "").strip()
    m = re.fullmatch(r"(.*?)[\s_]*[\[(]\s*([^\])]+?)\s*[\])]\s*", text)
    if m and m.group(1).strip():
        base, word = m.group(1), m.group(2).strip()
        hit = _UNIT_WORDS.get(word.lower()) or _UNIT_WORDS.get(word.lower().replace(" ", ""))
        if hit:
            unit, suffix = hit
            name = _identifier(base)
            if not name.endswith(f"_{suffix}"):
                name = f"{name}_{suffix}"
            return name[:63], unit
        return _identifier(f"{base}_{word}"), word
    name = _identifier(text)
    parts = name.split("_")
    for k in (2, 1):  # the longest suffix that names a unit: ``vibration_mm_s`` before ``_s``
        if len(parts) > k:
            suffix = "_".join(parts[-k:])
            if suffix in _SUFFIX_UNITS:
                return name, _SUFFIX_UNITS[suffix]
    return name, None


# --- reading samples -------------------------------------------------------------------------------

def _open_bytes(path: Path, limit: int) -> bytes:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read(limit)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _read_sample(path: Path, max_rows: int) -> tuple[pd.DataFrame, bool]:
    """A file's first ``max_rows`` rows as text columns, and whether it had a header."""
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        table = next(pf.iter_batches(batch_size=max_rows), None)
        df = table.to_pandas() if table is not None else pd.DataFrame(columns=pf.schema_arrow.names)
        return df, True
    raw = _open_bytes(path, 64 << 20)
    text = raw.decode("utf-8-sig", errors="replace").lstrip("\ufeff")
    lines = text.splitlines()
    if not lines:
        raise ConfigError(f"{path}: the file is empty")
    if len(raw) == 64 << 20:
        text = "\n".join(lines[:-1])  # the cut line would read as a short row
    first = lines[0]
    delim = max((",", ";", "\t", "|"), key=first.count)
    return _parse_text(text, first, delim, max_rows)


def _parse_text(text: str, first: str, delim: str, max_rows: int) -> tuple[pd.DataFrame, bool]:
    import csv

    if first.count(delim) == 0 and len(first.split()) > 1:
        df = pd.read_csv(io.StringIO(text), sep=r"\s+", header=None, nrows=max_rows, dtype=str,
                         keep_default_na=False, engine="c")
        df.columns = [f"field_{i + 1}" for i in range(df.shape[1])]
        return df, False
    fields = next(csv.reader([first], delimiter=delim))
    header = not all(_is_number(f) for f in fields if f.strip())
    df = pd.read_csv(io.StringIO(text), sep=delim, header=None, skiprows=1 if header else 0, nrows=max_rows,
                     dtype=str, keep_default_na=False)
    # The headers as written (pandas would rename a repeated one to "x.1"): duplicates stay visible.
    names = [f.replace("\ufeff", "").strip() for f in fields] if header else \
        [f"field_{i + 1}" for i in range(df.shape[1])]
    if len(names) != df.shape[1]:
        names = (names + [f"field_{i + 1}" for i in range(len(names), df.shape[1])])[:df.shape[1]]
    df.columns = names
    return df, header


# --- column analysis ---------------------------------------------------------------------------------

def _numeric(col: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(col):
        return col.astype("float64")
    return pd.to_numeric(col.astype(str).str.strip().replace({"": None}), errors="coerce")


def _hint(name: str, hints: tuple[str, ...]) -> int:
    """2 for a name that is a hint, 1 for one that has a hint as a word, else 0."""
    key = _identifier(name)
    if key in hints:
        return 2
    words = set(key.split("_"))
    return 1 if words & set(hints) else 0


def _timestamps(col: pd.Series) -> pd.Series | None:
    """The column as UTC timestamps when nearly all its values parse as dates, else None."""
    if pd.api.types.is_datetime64_any_dtype(col):
        s = col if getattr(col.dt, "tz", None) is not None else col.dt.tz_localize("UTC")
        return s.dt.tz_convert("UTC")
    if pd.api.types.is_numeric_dtype(col):
        return None
    text = col.astype(str).str.strip()
    text = text[text != ""]
    if text.empty or text.str.fullmatch(r"[-+]?\d+(\.\d*)?").mean() > 0.5:
        return None  # numbers are not timestamps here (epoch seconds would need a declared format)
    if not text.head(50).str.contains(r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}", regex=True).all():
        return None
    parsed = pd.to_datetime(col.astype(str).str.strip(), errors="coerce", utc=True, format="mixed")
    if parsed.notna().sum() < 0.95 * len(text):
        return None
    return parsed


def _nice_interval(seconds: float) -> tuple[str, float]:
    best = min(_NICE_S, key=lambda n: abs(n - seconds))
    s = float(best) if abs(best - seconds) <= 0.1 * seconds else float(round(seconds))
    return _duration_text(s), s


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(round(seconds))}s"


def _round_out(low: float, high: float) -> tuple[float, float]:
    """Bounds rounded outwards to two significant digits of their span (readable, never narrower)."""
    span = high - low
    if span <= 0 or not np.isfinite(span):
        return low, high
    step = 10 ** (np.floor(np.log10(span)) - 1)
    lo = round(float(np.floor(low / step) * step), 10)
    hi = round(float(np.ceil(high / step) * step), 10)
    return min(lo, low), max(hi, high)


@dataclass
class _Col:
    header: str
    values: pd.Series  # float64, sentinels already NaN
    name: str = ""
    unit: str | None = None


def _sentinels(x: pd.Series) -> set[float]:
    """Candidate sentinel values that sit far outside the bulk of the column."""
    v = x.dropna()
    cand = v[v.isin(_SENTINEL_CANDIDATES)]
    rest = v[~v.isin(_SENTINEL_CANDIDATES)]
    if cand.empty or rest.empty:
        return set()
    lo, hi = rest.quantile(0.001), rest.quantile(0.999)
    span = max(hi - lo, abs(hi), 1e-9)
    return {float(s) for s in cand.unique() if s < lo - 3 * span or s > hi + 3 * span}


def _channel(col: _Col, asset: pd.Series, margin: float, notes: list[str]) -> Channel:
    v = col.values
    ok = v.dropna()
    alias = col.header.replace("\ufeff", "").strip().lower()
    aliases = [alias] if alias != col.name else []
    unit = col.unit or "-"
    if ok.empty:
        notes.append(f"channel {col.name} ({col.header!r}): no numeric value in the samples; range left open")
        return Channel(name=col.name, unit=unit, aliases=aliases, stuck_check=False,
                       description="no values in the samples: review")
    q_lo, q_hi = float(ok.quantile(0.001)), float(ok.quantile(0.999))
    distinct = ok.unique()
    if len(distinct) == 1:
        c = float(distinct[0])
        pad = max(abs(c) * 0.1, 1.0)
        notes.append(f"channel {col.name}: constant ({c:g}) in the samples: stuck check off; drop it if unused")
        low, high = _round_out(c - pad, c + pad)
        return Channel(name=col.name, unit=unit, range=(low, high), aliases=aliases, stuck_check=False,
                       description=f"constant in the samples ({c:g}): review")
    span = max(q_hi - q_lo, abs(q_hi) * 0.05, 1e-6)
    # Plausible: not a wild spike. The range never cuts off a plausible observed value.
    plausible = ok[(ok >= q_lo - span) & (ok <= q_hi + span)]
    low = min(q_lo - margin * span, float(plausible.min()))
    high = max(q_hi + margin * span, float(plausible.max()))
    if q_lo >= 0 and low < 0 and (unit in _NON_NEGATIVE or unit == "-"):
        low = 0.0
    low, high = _round_out(low, high)
    spikes = int(((ok < low) | (ok > high)).sum())
    if spikes:
        notes.append(f"channel {col.name}: {spikes} sample value(s) outside the drafted range [{low:g}, {high:g}] "
                     "(spikes?)")
    # A setting holds a few values and changes in steps (a setpoint), where a sensor wanders.
    held = v.ffill()
    changes = (held != held.shift())[asset == asset.shift()]
    step_like = len(distinct) <= 12 and (changes.mean() if len(changes) else 1.0) < 0.05
    named = _hint(col.name, ("setting", "setpoint", "sp", "mode", "op")) > 0
    kind = "setting" if step_like or named else "sensor"
    return Channel(name=col.name, kind=kind, unit=unit, range=(low, high), aliases=aliases,
                   stuck_check=kind == "sensor")


# --- whole files -----------------------------------------------------------------------------------------

_DATA_SUFFIX = re.compile(r"(\.(csv|txt|tsv|dat|parquet|pq))?(\.(gz|gzip|bz2|zip|zst))?$", re.I)
_DATE_IN_NAME = re.compile(r"\d{4}-?\d{2}-?\d{2}(?:[T_ -]?\d{2}(?:[-:]?\d{2}){0,2})?")


def _expand(files: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for f in files:
        p = Path(f).expanduser()
        if p.is_dir():
            # A folder: its data files only (a landing folder also holds READMEs, JSON, manifests).
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith((".", "_"))
                              and _DATA_SUFFIX.search(q.name).group(1)))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"sample file {str(p)!r} does not exist")
    if not out:
        raise ConfigError("no sample files: name CSV/Parquet files (or a folder of them)")
    return out


def _is_event_log(path: Path, df: pd.DataFrame) -> bool:
    if _EVENT_FILE.search(path.name):
        return True
    keys = {_identifier(c) for c in df.columns}
    return bool(keys & set(_EVENT_TYPE_COLS)) and sum(
        _numeric(df[c]).notna().mean() > 0.9 for c in df.columns) <= 1


def _rules(paths: list[Path], kind: str) -> list[DatasetRule]:
    """File-name globs: dated files (``pumps_2026-01-01.csv``) become one dataset (``pumps``)."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        stem = _DATA_SUFFIX.sub("", p.name)
        suffix = p.name[len(stem):]
        base = suffix.lower().removesuffix(".gz")
        pattern = _DATE_IN_NAME.sub("*", stem, count=1)
        groups.setdefault(pattern + base, []).append(p)
    rules = []
    for pattern, members in groups.items():
        stem_glob = _DATA_SUFFIX.sub("", pattern)
        if "*" in stem_glob:
            dataset = _identifier(stem_glob.replace("*", " ")) if kind == "telemetry" else "{stem}"
            match = [pattern] + ([] if pattern.lower().endswith((".parquet", ".pq")) else [pattern + ".gz"])
        else:
            dataset = "{stem}"
            match = sorted({m.name for m in members})
        rules.append(DatasetRule(match=match, dataset=dataset, kind=kind))
    return rules


_FAILURE_WORDS = re.compile(r"fail|break|trip|seiz|fault|burst|crash|leak", re.I)
_RENEWAL_WORDS = re.compile(r"replac|overhaul|renew|rebuild|exchang|swap|refurb", re.I)
_NEUTRAL_WORDS = re.compile(r"inspect|lubric|grease|check|clean|calibrat|service|minor|adjust|test", re.I)


def _proposed_meaning(event_type: str) -> tuple[str, str]:
    """``(meaning, why)`` for one event type: a guess from its name, for a person to confirm."""
    if _FAILURE_WORDS.search(event_type):
        return "failure", "its name reads as a failure"
    if _RENEWAL_WORDS.search(event_type):
        return "renewal", "its name reads as a replacement or overhaul"
    if _NEUTRAL_WORDS.search(event_type):
        return "neutral", "its name reads as routine maintenance"
    return "neutral", "not recognised: CHECK whether it ends a life"


def _event_spec(df: pd.DataFrame, asset_header: str, notes: list[str], clock: Clock | None = None,
                source: str = "event log", required: bool = False) -> EventsSpec | None:
    """The events section drafted from one sample log: its columns and, per distinct event type, a
    proposed meaning (failure / renewal / neutral) with the reason, listed in ``notes`` for review.

    ``required`` (a log named with ``--events``): what cannot be drafted is an error, not a note.
    """
    def give_up(message: str) -> None:
        if required:
            raise ConfigError(f"{source}: {message}")
        notes.append(f"{source}: {message}; events section left out")

    cols = list(df.columns)
    keys = {_identifier(c): c for c in cols}
    asset = next((c for c in cols if c.strip().lower() == asset_header.strip().lower()), None) or next(
        (c for c in cols if _hint(c, _ASSET_HINTS)), None)
    time = next((c for c in cols if _timestamps(df[c]) is not None), None) or next(
        (c for c in cols if _hint(c, _TIME_HINTS + _CYCLE_HINTS)), None)
    etype = next((keys[k] for k in _EVENT_TYPE_COLS if k in keys), None)
    if not (asset and time and etype):
        give_up(f"could not tell its asset/time/event-type columns (found asset={asset}, time={time}, "
                f"type={etype}; it has {', '.join(map(str, cols[:12]))})")
        return None
    if clock is not None and clock.kind == "timestamp" and _timestamps(df[time]) is None:
        give_up(f"its time column {time!r} holds no timestamps, but the telemetry's clock is a timestamp")
        return None
    if clock is not None and clock.kind == "cycle" and _numeric(df[time]).notna().mean() < 0.95:
        give_up(f"its time column {time!r} is not numeric, but the telemetry's clock counts cycles")
        return None
    types = df[etype].map(lambda v: str(v).strip() if v is not None and not pd.isna(v) else "")
    counts = types[types != ""].value_counts()
    vocab = sorted(counts.index)
    proposed = {v: _proposed_meaning(v) for v in vocab}
    failure = [v for v in vocab if proposed[v][0] == "failure"]
    renewal = [v for v in vocab if proposed[v][0] == "renewal"]
    neutral = [v for v in vocab if proposed[v][0] == "neutral"]
    if not failure:
        give_up(f"none of its event types {vocab} reads as a failure: declare it by hand "
                "(events.failure names the types that end a life by failure)")
        return None
    optional = {}
    for field_name, hints in (("work_order", ("work_order", "workorder", "wo", "order", "wo_number", "order_id")),
                              ("text", ("text", "description", "comment", "comments", "remarks", "notes")),
                              ("mode", ("mode", "failure_mode", "cause", "failure_cause"))):
        hit = next((keys[h] for h in hints if h in keys and keys[h] not in (asset, time, etype)), None)
        if hit:
            optional[field_name] = hit
    notes.append(f"{source}: columns asset={asset!r}, time={time!r}, type={etype!r}"
                 + "".join(f", {k}={v!r}" for k, v in optional.items())
                 + f"; {len(vocab)} event types; failure={failure}, renewal={renewal}: check the split")
    for v in vocab:
        meaning, why = proposed[v]
        notes.append(f"event type {v!r} ({int(counts[v])} in the sample): {meaning} ({why})")
    return EventsSpec(asset=asset, time=time, type=etype, failure=failure, renewal=renewal, neutral=neutral,
                      **optional)


def draft_contract(files: list[str | Path], *, name: str | None = None, asset: str | None = None,
                   time: str | None = None, margin: float = 0.5, max_rows: int = 200_000,
                   max_files: int = 24, events: list[str | Path] | None = None) -> Draft:
    """Draft a fleet contract from sample files (CSV, gzip CSV, header-less text, Parquet).

    Args:
        files: Sample files or folders of them (telemetry and, optionally, an event log).
        name: Contract name; default from the telemetry file names.
        asset: The asset column's header, when the guess is wrong.
        time: The clock column's header, when the guess is wrong.
        margin: How far ranges reach beyond the 0.1 %/99.9 % quantiles, as a share of their span.
        max_rows: Rows read per file.
        max_files: Files read at most (an even spread); every file's name shapes the routing rules.
        events: Sample event logs (CMMS exports: asset, time, event type...), read as event logs
            whatever their names; the first drafts the ``events`` section, each distinct event type
            with a proposed meaning in the notes. Logs among ``files`` are recognised by name or shape.

    Raises:
        ConfigError: no readable sample, no telemetry, or no asset/clock column to be found.
    """
    notes: list[str] = []
    named_logs = _expand(events) if events else []
    paths = [p for p in _expand(files) if p not in named_logs] + named_logs
    telemetry, events = [], []
    # Many files (a year of daily exports): read an even spread of them; all of them shape the routing.
    logs = [p for p in paths if _EVENT_FILE.search(p.name) or p in named_logs]
    data_files = [p for p in paths if p not in logs]
    spread = set(np.linspace(0, len(data_files) - 1, min(len(data_files), max_files)).round().astype(int).tolist())
    unread = [p for i, p in enumerate(data_files) if i not in spread]
    if unread:
        notes.append(f"read {len(data_files) - len(unread)} of {len(data_files)} data files (evenly spread); "
                     "the rest only by name")
    for p in [p for p in paths if p not in unread]:
        try:
            df, header = _read_sample(p, max_rows)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's, said in one line
            raise ConfigError(f"{p}: could not read a sample ({exc.__class__.__name__}: {exc})") from None
        (events if p in named_logs or _is_event_log(p, df) else telemetry).append((p, df, header))
    if not telemetry:
        raise ConfigError("none of the sample files looks like telemetry (only event logs)")
    headerless = {h for _, _, h in telemetry} == {False}
    if len({h for _, _, h in telemetry}) > 1:
        raise ConfigError("some sample files have a header and some do not: draft them separately")

    # One frame: columns matched across files by their header (trimmed, case-insensitive); a header
    # repeated within a file stays a separate column.
    order: dict[str, str] = {}
    parts = []
    for _, df, _ in telemetry:
        seen: dict[str, int] = {}
        keys = []
        for h in df.columns:
            k = h.strip().lower()
            seen[k] = seen.get(k, 0) + 1
            key = k if seen[k] == 1 else f"{k}#{seen[k]}"
            if seen[k] == 2:
                first = next(c for c in df.columns if c.strip().lower() == k)
                same = "repeats" if first == h else "differs only in case from"
                notes.append(f"header {h!r} {same} {first!r}: drafted as separate channels, but headers match "
                             "case-insensitively, so ingest cannot tell them apart: rename them at the source")
            keys.append(key)
            order.setdefault(key, h)
        part = df.copy()
        part.columns = keys
        parts.append(part)
    data = pd.concat(parts, ignore_index=True, sort=False)
    if data.empty:
        raise ConfigError("the sample files hold a header but no rows")
    rows = len(data)
    numeric = {k: _numeric(data[k]) for k in data.columns}

    def key_of(header: str | None) -> str | None:
        if header is None:
            return None
        k = header.strip().lower()
        if k not in data.columns:
            raise ConfigError(f"no column {header!r} in the samples (columns: {', '.join(order.values())})")
        return k

    # --- clock: timestamps first (they are unambiguous) -------------------------------------------------
    stamps: dict[str, pd.Series] = {}
    for k in data.columns:
        if time is not None and k != key_of(time):
            continue
        ts = _timestamps(data[k])
        if ts is not None:
            stamps[k] = ts
    time_key = key_of(time)
    if time_key is None and stamps:
        time_key = max(stamps, key=lambda k: (_hint(order[k], _TIME_HINTS), -list(data.columns).index(k)))

    # --- asset -------------------------------------------------------------------------------------------
    asset_key = key_of(asset)
    if asset_key is None:
        scores = {}
        for pos, k in enumerate(data.columns):
            if k == time_key or k in stamps:
                continue
            num = numeric[k]
            text = data[k].astype(str).str.strip()
            nonempty = (text != "").mean()
            is_int = num.notna().mean() > 0.99 and bool((num.dropna() % 1 == 0).all())
            is_text = num.notna().sum() < 0.5 * max(1, (text != "").sum())
            if not (is_int or is_text) or nonempty < 0.99:
                continue
            nd = text.nunique()
            if nd > max(1, 0.2 * rows):
                continue
            blocks = (text != text.shift()).mean()
            scores[k] = (3 * _hint(order[k], _ASSET_HINTS) + 2 * is_text + (nd / rows < 0.05) + 0.5 * (pos < 3)
                         + (blocks < 0.05 and not time_key) - 2 * (nd == 1 and rows > 1))
        if not scores:
            raise ConfigError("found no asset-id column (text or integer ids with few distinct values); "
                              "name it with --asset")
        asset_key = max(scores, key=lambda k: (scores[k], -list(data.columns).index(k)))
    ids = data[asset_key].astype(str).str.strip()
    notes.append(f"asset column: {order[asset_key]!r} ({ids.nunique()} assets in the samples)")

    # --- clock: a cycle counter when there are no timestamps --------------------------------------------
    if time_key is None:
        same = ids == ids.shift()
        cands = {}
        for pos, k in enumerate(data.columns):
            if k == asset_key:
                continue
            num = numeric[k]
            if num.notna().mean() < 0.99 or not bool((num.dropna() % 1 == 0).all()):
                continue
            step = num.diff()[same]
            if step.empty or (step > 0).mean() < 0.99:
                continue
            cands[k] = (_hint(order[k], _CYCLE_HINTS), -pos)
        if not cands:
            raise ConfigError("found no clock: no column of timestamps and no integer counter that increases "
                              "within each asset; name it with --time")
        time_key = max(cands, key=cands.get)
        clock = Clock(kind="cycle", column=None if headerless else order[time_key])
        notes.append(f"clock: cycle counter {order[time_key]!r} (increases within each asset)")
    else:
        ts = stamps.get(time_key)
        if ts is None:
            raise ConfigError(f"column {order[time_key]!r} does not hold timestamps")
        frame = pd.DataFrame({"a": ids, "t": ts}).dropna().sort_values(["a", "t"])
        d = frame["t"].diff().dt.total_seconds()[frame["a"] == frame["a"].shift()]
        d = d[d > 0]
        if d.empty:
            raise ConfigError("the timestamps give no sampling interval (one reading per asset?)")
        interval_text, interval = _nice_interval(float(d.median()))
        near = (d - interval).abs()[d < 1.5 * interval]
        jitter = float(near.quantile(0.999)) if not near.empty else 0.0
        nice = sorted(set(_NICE_S) | {180, 240})
        tol = min([n for n in nice if n >= max(jitter, 0.1 * interval)] or [interval / 2])
        tol = min(tol, interval / 2)
        gaps = int((d > interval + tol).sum())
        raw = data[time_key].astype(str)
        offsets = raw.str.contains(r"(?:Z|[+-]\d{2}:?\d{2})\s*$", regex=True).mean() > 0.5
        clock = Clock(kind="timestamp", column=None if headerless else order[time_key], timezone="UTC",
                      interval=interval_text, tolerance=_duration_text(tol),
                      unit="d" if interval >= 86400 else "h")
        notes.append(f"clock: timestamps {order[time_key]!r}, median spacing {d.median():.0f} s -> interval "
                     f"{interval_text}, tolerance {_duration_text(tol)} (99.9 % of the jitter); {gaps} gap(s) "
                     "in the samples")
        notes.append("clock.timezone: " + ("the timestamps carry UTC offsets" if offsets else
                                           "the timestamps have no UTC offset; drafted as UTC: set the plant's "
                                           "zone (e.g. Europe/Berlin) if they are local time"))

    asset_spec = AssetKey(column="asset_id" if headerless else order[asset_key],
                          numeric_ok=True)

    # --- channels ------------------------------------------------------------------------------------------
    taken = {*asset_spec.names, *clock.names, *RESERVED}
    sentinels: set[float] = set()
    chan_keys = []
    for k in data.columns:
        if k in (asset_key, time_key):
            continue
        text = data[k].astype(str).str.strip()
        filled = text != ""
        if filled.any() and numeric[k][filled].notna().mean() < 0.9:
            notes.append(f"column {order[k]!r} is not numeric: not declared (undeclared columns are not stored)")
            continue
        chan_keys.append(k)
        sentinels |= _sentinels(numeric[k])
    if not chan_keys:
        raise ConfigError("the samples hold no numeric column besides the asset and the clock")
    if sentinels:
        notes.append(f"sentinels: {sorted(sentinels)} appear far outside the data: stored as null")
    channels = []
    aliases_used: set[str] = set(taken)
    for k in chan_keys:
        header = order[k].split("#")[0] if k.count("#") else order[k]
        nm, unit = sanitise_header(header)
        base, n = nm, 2
        while nm in taken:
            nm = f"{base}_{n}"[:63]
            n += 1
        taken.add(nm)
        values = numeric[k].where(~numeric[k].isin(sentinels))
        ch = _channel(_Col(header=header, values=values, name=nm, unit=unit), ids, margin, notes)
        keep = [a for a in ch.aliases if a not in aliases_used and a not in taken]
        if len(keep) != len(ch.aliases):
            notes.append(f"channel {nm}: header {header!r} is already claimed (case-insensitive duplicate); "
                         "not kept as an alias")
        aliases_used.update(keep)
        channels.append(ch.model_copy(update={"aliases": keep}))
    constant = [c.name for c in channels if c.description.startswith("constant")]
    settings = [c.name for c in channels if c.kind == "setting"]
    notes.append(f"{len(channels)} channels: settings (operating conditions) {settings or 'none'}; check the "
                 "kinds, units and ranges")
    if constant:
        notes.append(f"constant channels: {constant}")

    # --- files -----------------------------------------------------------------------------------------
    rules = _rules([p for p, _, _ in telemetry] + unread, "telemetry")
    if headerless:
        # Header-less files name their fields by position: asset, clock, then the channels.
        columns = ["_"] * data.shape[1]
        for pos, k in enumerate(data.columns):
            if k == asset_key:
                columns[pos] = "asset_id"
            elif k == time_key:
                columns[pos] = clock.key
            else:
                ch = next((c for c, kk in zip(channels, chan_keys) if kk == k), None)
                columns[pos] = ch.name if ch else "_"
        fmt = "text" if all(p.name.lower().removesuffix(".gz").endswith((".txt", ".dat")) for p, _, _ in telemetry) \
            else "csv"
        rules = [r.model_copy(update={"columns": columns, "format": fmt}) for r in rules]
        notes.append("header-less files: fields are named by position (field_N); rename the channels")
    events_spec = None
    if events:
        log_rules = _rules([p for p, _, _ in events], "events")
        # An event log describes a telemetry dataset's assets: route it to that dataset (its own name
        # would be a dataset without telemetry, which ingest refuses).
        datasets = {r.dataset for r in rules if r.kind == "telemetry"}
        if len(datasets) == 1 and "{" not in next(iter(datasets)):
            log_rules = [r.model_copy(update={"dataset": next(iter(datasets))}) for r in log_rules]
        else:
            notes.append("event log rule: set its dataset to the telemetry dataset whose assets it describes")
        rules = log_rules + rules
        first = next(((p, df) for p, df, _ in events if p in named_logs), (events[0][0], events[0][1]))
        events_spec = _event_spec(first[1], order[asset_key], notes, clock, source=f"event log {first[0].name}",
                                  required=first[0] in named_logs)

    if name is None:
        first = next((r.dataset for r in rules if r.kind == "telemetry" and "{" not in r.dataset), None)
        name = first or _identifier(_DATA_SUFFIX.sub("", telemetry[0][0].name))
    name = re.sub(r"[^a-z0-9_\-]", "_", name.lower()).strip("_-")[:63] or "fleet"
    stuck = 20
    if clock.kind == "timestamp" and clock.interval_s:
        stuck = max(2, int(round(4 * 3600 / clock.interval_s)))  # four hours of identical readings
    contract = FleetContract(
        name=name, version=1, asset=asset_spec, clock=clock, channels=channels, sentinels=sorted(sentinels),
        stuck_window=stuck, datasets=rules, events=events_spec,
        description=f"Drafted by `twinflow contract init` from {len(paths)} file(s); review before use.")
    return Draft(contract=contract, notes=notes, files=[str(p) for p in paths])


def draft_yaml(draft: Draft) -> str:
    """The draft as YAML, under a header comment that lists what to review."""
    from twinflow.contract.store import dump_contract

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    files = draft.files if len(draft.files) <= 5 else [*draft.files[:4], f"... ({len(draft.files) - 4} more)"]
    head = [
        "# DRAFT fleet contract, written by `twinflow contract init` on " + when + ".",
        "# It is a guess from sample data: REVIEW IT before any run uses it. In particular check",
        "# the asset and clock columns, each channel's unit, kind (setting = operating condition) and",
        "# valid range (a reading outside it is quarantined as broken), and the file routing rules.",
        "# Ranges come from the samples: a worn machine can read beyond them; widen each to its",
        "# physical limits (the sensor's span), or healthy-but-degraded readings will be quarantined.",
        "# Sample files: " + ", ".join(files),
        "#",
        "# What was guessed:",
        *[f"#  - {n}" for n in draft.notes],
        "",
    ]
    return "\n".join(head) + dump_contract(draft.contract)
