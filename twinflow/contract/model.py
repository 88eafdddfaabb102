"""The fleet contract: a declared, versioned description of one fleet's telemetry.

A contract says what a plant's data *is*, so that no stage has to know: which source column holds the
asset id, what the clock is (a cycle counter or a timestamp with a sampling interval), which channels
exist with their units, valid ranges and aliases, which values loggers write for "no reading", and how
the files of a landing folder map to datasets (telemetry, event logs, labels, files to ignore).

It is data: written in YAML (:func:`twinflow.contract.load_contract`), carried with every
:class:`~twinflow.refs.LakeSnapshot`, stored with each lake table, and digested into feature sets and
MLflow runs, so every result says which contract produced it.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import re
from datetime import timedelta
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinflow import contracts as C

__all__ = [
    "AssetKey", "Channel", "Clock", "ContractRef", "DatasetRule", "EventsSpec", "FleetContract",
    "parse_duration",
]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|sec|min|m|h|d|w)\s*$", re.I)
_DURATION_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0,
               "d": 86400.0, "w": 604800.0}
# Column names the lake itself uses: a channel cannot take one.
RESERVED = frozenset({C.ASSET, C.TIME, C.TIMESTAMP, *C.LINEAGE, "record", "dataset", "rul", "label"})


_UNIT_LABELS = {"cycle": "cycles"}


def unit_label(time_unit: str) -> str:
    """How reports write a duration unit: ``cycles`` for cycle clocks, else the unit (``h``, ``min``).

    Every duration a person reads (RMSE, horizons, thresholds, plot axes) is in the fleet contract's
    clock unit (:attr:`Clock.time_unit`); this is its written form.
    """
    return _UNIT_LABELS.get(time_unit, time_unit)


def parse_duration(text: str | float | int) -> timedelta:
    """A duration from ``"10min"``, ``"1h"``, ``"500ms"``, ``"2d"`` or a number of seconds.

    Raises:
        ValueError: for anything else (the message shows the accepted forms).
    """
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"duration {text!r} must not be negative")
        return timedelta(seconds=float(text))
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"duration {text!r} not understood: use a number and a unit, e.g. '10min', "
                         "'1h', '30s', '2d'")
    return timedelta(seconds=float(m.group(1)) * _DURATION_S[m.group(2).lower()])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _aliases(v: list[str]) -> list[str]:
    out = []
    for a in v:
        key = a.strip().lower()
        if not key:
            raise ValueError("an alias must not be empty")
        if key not in out:
            out.append(key)
    return out


class AssetKey(_Model):
    """Which source column holds the asset id.

    Attributes:
        column: The source column's name (matched case-insensitively); stored as ``asset_id``.
        aliases: Other header spellings of the same column.
        numeric_ok: Whether numeric ids (``7``, ``7.0``) are accepted; they are stored as strings
            (``"7"``).
    """

    column: str = Field(C.ASSET, min_length=1)
    aliases: list[str] = Field(default_factory=list)
    numeric_ok: bool = True

    @field_validator("aliases")
    @classmethod
    def _norm(cls, v: list[str]) -> list[str]:
        return _aliases(v)

    @property
    def names(self) -> list[str]:
        """Every accepted header spelling, lower-cased, the declared column first."""
        return _aliases([self.column, C.ASSET, *self.aliases])


class Clock(_Model):
    """The time axis of the telemetry: a cycle counter or a timestamp.

    Attributes:
        kind: ``cycle`` (an integer count per asset: operating cycles, flights, batches) or
            ``timestamp`` (wall-clock times).
        column: The source column's name; stored as ``cycle`` or ``timestamp``.
        aliases: Other header spellings.
        unit: The unit durations (RUL, lifetimes, intervals) are expressed in: ``cycle`` for a cycle
            clock; ``s``, ``min``, ``h`` or ``d`` for a timestamp clock.
        timezone: Timezone of timestamps written without an offset (IANA name, e.g. ``Europe/Berlin``);
            stored as UTC.
        format: ``strptime`` format of the timestamps; None accepts ISO 8601 and common variants.
        interval: Expected sampling interval (timestamp clocks): ``"10min"``.
        tolerance: How far a reading may stray from the interval before it counts as jitter; a gap of
            more than ``interval + tolerance`` is a gap, never filled in.
        duplicates: A second row with the same (asset, time): ``quarantine`` it (default) or ``keep_last``.
        out_of_order: Rows whose time goes backwards within a file: ``flag`` (kept, sorted, quality bit)
            or ``quarantine``.
    """

    kind: Literal["cycle", "timestamp"] = "cycle"
    column: str | None = None
    aliases: list[str] = Field(default_factory=list)
    unit: Literal["cycle", "s", "min", "h", "d"] | None = None
    timezone: str = "UTC"
    format: str | None = None
    interval: str | None = None
    tolerance: str | None = None
    duplicates: Literal["quarantine", "keep_last"] = "quarantine"
    out_of_order: Literal["flag", "quarantine"] = "flag"

    @field_validator("aliases")
    @classmethod
    def _norm(cls, v: list[str]) -> list[str]:
        return _aliases(v)

    @model_validator(mode="after")
    def _consistent(self) -> "Clock":
        if self.kind == "cycle":
            if self.unit not in (None, "cycle"):
                raise ValueError(f"clock.unit {self.unit!r}: a cycle clock counts in 'cycle'")
            if self.interval or self.tolerance:
                raise ValueError("clock.interval/tolerance apply to timestamp clocks only")
        else:
            if self.unit == "cycle":
                raise ValueError("clock.unit 'cycle' needs kind: cycle; a timestamp clock uses s, min, h or d")
            for name in ("interval", "tolerance"):
                if getattr(self, name) is not None:
                    parse_duration(getattr(self, name))
            if self.interval and parse_duration(self.interval).total_seconds() <= 0:
                raise ValueError("clock.interval must be positive")
            try:
                from zoneinfo import ZoneInfo

                ZoneInfo(self.timezone)
            except Exception as exc:
                raise ValueError(f"clock.timezone {self.timezone!r} is not a known IANA timezone "
                                 "(e.g. 'UTC', 'Europe/Berlin')") from exc
        return self

    @property
    def key(self) -> str:
        """The lake column that orders an asset's rows: ``cycle`` or ``timestamp``."""
        return C.TIME if self.kind == "cycle" else C.TIMESTAMP

    @property
    def time_unit(self) -> str:
        """The unit durations are expressed in (``cycle``, or ``h`` by default for timestamps)."""
        return self.unit or ("cycle" if self.kind == "cycle" else "h")

    @property
    def unit_seconds(self) -> float:
        """Seconds per duration unit (timestamp clocks); 1.0 for cycle clocks."""
        return 1.0 if self.kind == "cycle" else _DURATION_S[self.time_unit]

    @property
    def interval_s(self) -> float | None:
        return parse_duration(self.interval).total_seconds() if self.interval else None

    @property
    def tolerance_s(self) -> float:
        if self.tolerance:
            return parse_duration(self.tolerance).total_seconds()
        return 0.5 * (self.interval_s or 0.0)

    @property
    def names(self) -> list[str]:
        """Every accepted header spelling of the clock column, lower-cased."""
        return _aliases([*([self.column] if self.column else []), self.key, *self.aliases])


class Channel(_Model):
    """One measured or set quantity.

    Attributes:
        name: The lake column name (lower-case letters, digits, ``_``).
        kind: ``sensor`` (a measurement) or ``setting`` (an operating condition: speed setpoint,
            load, altitude); settings define operating regimes in the features stage.
        unit: Physical unit as written in reports (``degC``, ``bar``, ``rpm``, ``-``).
        range: Inclusive physically valid ``[low, high]``: outside it a reading is broken, not degraded.
        aliases: Other header spellings (``casing_temp [degC]``, ``sensor_2``).
        description: What it measures.
        stuck_check: Whether long runs of identical values flag the channel as stuck.
    """

    name: str
    kind: Literal["sensor", "setting"] = "sensor"
    unit: str = "-"
    range: tuple[float, float] | None = None
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    stuck_check: bool = True

    @field_validator("aliases")
    @classmethod
    def _norm(cls, v: list[str]) -> list[str]:
        return _aliases(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(f"channel name {v!r} must be lower-case letters, digits and '_' starting with a "
                             "letter (declare the source spelling under aliases)")
        if v in RESERVED:
            raise ValueError(f"channel name {v!r} is reserved by the lake")
        return v

    @field_validator("range")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] <= v[1]:
            raise ValueError(f"range {list(v)} must be [low, high] with low <= high")
        return v

    @property
    def low(self) -> float:
        return float("-inf") if self.range is None else float(self.range[0])

    @property
    def high(self) -> float:
        return float("inf") if self.range is None else float(self.range[1])

    def range_text(self) -> str:
        """``[450, 700] °R``: how quarantine reasons name the valid range."""
        def num(x: float) -> str:
            return f"{x:g}"
        unit = "" if self.unit in ("", "-") else f" {self.unit}"
        return f"[{num(self.low)}, {num(self.high)}]{unit}"


DatasetKind = Literal["telemetry", "events", "labels", "ignore"]


class DatasetRule(_Model):
    """How landing files whose names match ``match`` become a dataset.

    Attributes:
        match: File-name globs (case-insensitive; compression suffixes included, e.g. ``pump_*.csv*``).
        dataset: Dataset name, or a template over the file name: ``{stem}`` is the lower-cased name
            without data/compression suffixes (``train_FD001.txt.gz`` -> ``train_fd001``). For an
            ``events`` rule: the telemetry dataset whose assets the log describes.
        kind: ``telemetry`` (ingested into the lake), ``events`` (a maintenance/failure log: never
            parsed as telemetry), ``labels`` (read by the train stage, e.g. C-MAPSS ``RUL_*``) or
            ``ignore``.
        format: ``auto`` (from the suffix and first bytes), ``csv``, ``parquet`` or ``text``
            (header-less, whitespace separated, like C-MAPSS).
        columns: For header-less files: the source column of each field, in order (asset, clock and
            channel names or aliases; ``_`` skips a field).
        delimiter: CSV field delimiter.
        life_end: How an asset's history in these files ends where no event log says otherwise:
            ``running`` (still in service: the last reading censors its life) or ``failure``
            (run-to-failure records, like C-MAPSS training files: the last reading is the failure).
        life_start: How an asset's history in these files starts: ``new`` (its first reading is the
            start of its first life, as in run-to-failure records) or ``unknown`` (the asset was already
            in service when the records begin: its first life's start, so its length and the start of
            its degradation path, was not observed). Lives with an unknown start are left out of the
            lifetime fit, the Kaplan-Meier check and the twin's degradation calibration: counted from
            the first reading they are too short (left truncation with an unknown entry age).
    """

    match: list[str] = Field(min_length=1)
    dataset: str = "{stem}"
    kind: DatasetKind = "telemetry"
    format: Literal["auto", "csv", "parquet", "text"] = "auto"
    columns: list[str] | None = None
    delimiter: str = ","
    life_end: Literal["running", "failure"] = "running"
    life_start: Literal["new", "unknown"] = "new"

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9_\-{}]{1,100}", v) or v.replace("{stem}", "x").count("{"):
            raise ValueError(f"dataset {v!r}: lower-case letters, digits, '_', '-', optionally '{{stem}}'")
        return v

    def matches(self, filename: str) -> bool:
        name = filename.lower()
        return any(fnmatch.fnmatchcase(name, g.lower()) for g in self.match)

    def dataset_for(self, stem: str) -> str:
        name = self.dataset.replace("{stem}", stem)
        return re.sub(r"[^a-z0-9_\-]", "_", name.lower())[:100]


class EventsSpec(_Model):
    """The maintenance/failure event log's columns and vocabulary.

    Attributes:
        asset: Source column of the asset id.
        time: Source column of the event time (same clock kind as the telemetry).
        type: Source column of the event type.
        mode: Optional source column of the failure mode (else a failure's mode is its type).
        work_order: Optional source column of the work-order id.
        text: Optional source column of free text.
        failure: Event types that end a life by failure (the asset is then restored: a new life starts).
        renewal: Event types that renew an asset without a failure (replacement, overhaul): they end a
            life censored.
        neutral: Event types that neither end nor renew a life (inspection, minor repair).
    """

    asset: str = "asset_id"
    time: str = "time"
    type: str = "event"
    mode: str | None = None
    work_order: str | None = None
    text: str | None = None
    failure: list[str] = Field(default_factory=list)
    renewal: list[str] = Field(default_factory=list)
    neutral: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _vocabulary(self) -> "EventsSpec":
        seen: dict[str, str] = {}
        for meaning in ("failure", "renewal", "neutral"):
            for t in getattr(self, meaning):
                if t in seen:
                    raise ValueError(f"event type {t!r} is declared both {seen[t]} and {meaning}")
                seen[t] = meaning
        if not self.failure:
            raise ValueError("events.failure must name at least one event type that ends a life by failure")
        return self

    def meaning(self, event_type: str) -> str | None:
        """``failure``, ``renewal``, ``neutral``, or None for a type the vocabulary does not declare."""
        for meaning in ("failure", "renewal", "neutral"):
            if event_type in getattr(self, meaning):
                return meaning
        return None


class ContractRef(_Model):
    """Which contract produced a result: name, version and content digest."""

    name: str
    version: int
    digest: str


class FleetContract(_Model):
    """A fleet's telemetry contract (see the module docstring).

    Attributes:
        name: Contract name (``pumps-plant-a``); a lake table holds the data of one contract name.
        version: Version number; raise it when the contract changes meaning.
        description: For people.
        asset: The asset-id column.
        clock: The time axis.
        channels: The channels, in lake column order.
        sentinels: Values loggers write for "no reading": stored as null and flagged.
        stuck_window: Consecutive identical values after which a varying channel is flagged stuck.
        time_range: Valid clock values for cycle clocks (inclusive).
        datasets: Landing file routing, first match wins; files no rule matches are not ingested.
        events: The event log's columns and vocabulary, if the fleet has one.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$")
    version: int = Field(1, ge=1)
    description: str = ""
    asset: AssetKey = Field(default_factory=AssetKey)
    clock: Clock = Field(default_factory=Clock)
    channels: list[Channel] = Field(min_length=1)
    sentinels: list[float] = Field(default_factory=list)
    stuck_window: int = Field(20, ge=2)
    time_range: tuple[int, int] = (0, 2**31 - 1)
    datasets: list[DatasetRule] = Field(default_factory=lambda: [DatasetRule(match=["*"])])
    events: EventsSpec | None = None

    @model_validator(mode="after")
    def _unique(self) -> "FleetContract":
        seen: dict[str, str] = {}
        owners = [("asset", self.asset.names), ("clock", self.clock.names),
                  *[(f"channel {c.name}", [c.name, *c.aliases]) for c in self.channels]]
        for owner, names in owners:
            for n in names:
                if n in seen and seen[n] != owner:
                    raise ValueError(f"header name {n!r} is claimed by both {seen[n]} and {owner}")
                seen[n] = owner
        for rule in self.datasets:
            if rule.columns:
                unknown = [c for c in rule.columns if c != "_" and c.strip().lower() not in seen]
                if unknown:
                    raise ValueError(f"datasets[match={rule.match}].columns names {unknown}, which are "
                                     "neither the asset, the clock nor a channel (or alias) of this contract")
        return self

    # --- identity ----------------------------------------------------------------------------------

    @property
    def digest(self) -> str:
        """Content digest of everything that changes what the data means (descriptions excluded)."""
        data = self.model_dump(mode="json", exclude={"description"})
        for ch in data["channels"]:
            ch.pop("description", None)
        for rule in data.get("datasets", []):
            if rule.get("life_start") == "new":
                rule.pop("life_start")  # the default, added later: contracts that omit it keep their digest
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def ref(self) -> ContractRef:
        return ContractRef(name=self.name, version=self.version, digest=self.digest)

    def validation_digest(self, channels: list[str] | None = None) -> str:
        """Digest of what validating rows of ``channels`` depends on (all channels when None).

        A file is validated again when this changes for the channels it holds, so widening one
        channel's range re-reads only the files that carry that channel.
        """
        chans = [c.model_dump(mode="json", exclude={"description"}) for c in self.channels
                 if channels is None or c.name in channels]
        data = [self.asset.model_dump(mode="json"), self.clock.model_dump(mode="json"), chans,
                self.sentinels, self.stuck_window, list(self.time_range)]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # --- channels ----------------------------------------------------------------------------------

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @property
    def settings(self) -> list[str]:
        """Operating-condition channels (they define regimes)."""
        return [c.name for c in self.channels if c.kind == "setting"]

    @property
    def sensors(self) -> list[str]:
        return [c.name for c in self.channels if c.kind == "sensor"]

    def channel(self, name: str) -> Channel:
        """The declared channel ``name``.

        Raises:
            KeyError: naming the contract, when it declares no such channel.
        """
        for c in self.channels:
            if c.name == name:
                return c
        raise KeyError(f"channel {name!r} is not declared by contract {self.name!r} v{self.version}")

    @property
    def key(self) -> str:
        """The lake's time-key column (``cycle`` or ``timestamp``)."""
        return self.clock.key

    @property
    def time_unit(self) -> str:
        return self.clock.time_unit

    def canonical_name(self, column: str) -> str | None:
        """The lake column a source header names (asset, clock or channel), or None if undeclared."""
        m = self._header_map()
        return m.get(_header_key(column)) or m.get(column.strip().lower())

    def _header_map(self) -> dict[str, str]:
        # Every parsed file looks up each of its headers: build the map once per set of declared names.
        return _header_map(tuple(self.asset.names), self.clock.key, tuple(self.clock.names),
                           tuple((c.name, tuple(c.aliases)) for c in self.channels))

    # --- files --------------------------------------------------------------------------------------

    def first_life_observed(self, dataset: str) -> bool:
        """False when a telemetry rule of ``dataset`` declares ``life_start: unknown`` (see DatasetRule)."""
        return not any(r.kind == "telemetry" and r.life_start == "unknown" and r.dataset in (dataset, "{stem}")
                       for r in self.datasets)

    def rule_for(self, filename: str) -> DatasetRule | None:
        """The first dataset rule matching a landing file's name, or None (the file is not ingested)."""
        for rule in self.datasets:
            if rule.matches(filename):
                return rule
        return None

    # --- schema ---------------------------------------------------------------------------------------

    def lake_schema(self) -> pa.Schema:
        """The Arrow schema of a lake table of this contract (partition column included).

        Cycle clocks keep ``cycle`` (int32) as the key and a nullable ``timestamp``; timestamp clocks key
        on ``timestamp`` (UTC, µs) and have no cycle column.
        """
        if self.clock.kind == "cycle":
            time_fields = [pa.field(C.TIME, pa.int32(), nullable=False),
                           pa.field(C.TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=True)]
        else:
            time_fields = [pa.field(C.TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=False)]
        return pa.schema([
            pa.field(C.ASSET, pa.string(), nullable=False),
            *time_fields,
            *[pa.field(c.name, pa.float64()) for c in self.channels],
            pa.field("source_file", pa.string(), nullable=False),
            pa.field("batch_id", pa.string(), nullable=False),
            pa.field("quality", pa.int32(), nullable=False),
        ])

    def summary(self) -> str:
        """One line for logs: ``pumps v1 (a1b2c3d4e5f60718): 9 channels, timestamp clock every 10min``."""
        clock = (f"{self.clock.kind} clock" + (f" every {self.clock.interval}" if self.clock.interval else ""))
        return f"{self.name} v{self.version} ({self.digest}): {len(self.channels)} channels, {clock}"


@functools.lru_cache(maxsize=64)
def _header_map(asset: tuple[str, ...], key: str, clock: tuple[str, ...],
                channels: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, str]:
    m = {n: C.ASSET for n in asset}
    m.update({n: key for n in clock})
    for name, aliases in channels:
        for n in (name, *aliases):
            m[n] = name
    return {**{_header_key(k): v for k, v in m.items()}, **m}


@functools.lru_cache(maxsize=4096)
def _header_key(name: str) -> str:
    """A header reduced to its words: ``"Casing Temp [degC]"`` -> ``casing_temp_degc``."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
