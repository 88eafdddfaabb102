"""The data contract of the lake: canonical fleet-telemetry schema, units and valid ranges.

One wide row per (asset, time): ``asset_id``, ``cycle`` (or ``timestamp``), operating settings,
sensor channels, then lineage (``source_file``, ``batch_id``) and a ``quality`` bit mask.
The lake stores it hive-partitioned as ``<lake>/dataset=<name>/asset=<asset_id>/<file>.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

import pyarrow as pa

ASSET = "asset_id"
TIME = "cycle"
TIMESTAMP = "timestamp"
OP_SETTINGS = ["op_setting_1", "op_setting_2", "op_setting_3"]
SENSORS = [f"s{i}" for i in range(1, 22)]
CHANNELS = OP_SETTINGS + SENSORS
LINEAGE = ["source_file", "batch_id", "quality"]
# Column order of the C-MAPSS text files (whitespace separated, no header).
CMAPSS_COLUMNS = ["unit", TIME, *OP_SETTINGS, *SENSORS]


def telemetry_schema() -> pa.Schema:
    """The canonical Arrow schema of a lake file (partition columns excluded)."""
    return pa.schema(
        [
            pa.field(ASSET, pa.string(), nullable=False),
            pa.field(TIME, pa.int32(), nullable=False),
            pa.field(TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=True),
            *[pa.field(c, pa.float64()) for c in CHANNELS],
            pa.field("source_file", pa.string(), nullable=False),
            pa.field("batch_id", pa.string(), nullable=False),
            pa.field("quality", pa.int32(), nullable=False),
        ]
    )


# --- Channel declarations: units and valid ranges, in one place ---------------------------------

@dataclass(frozen=True)
class ChannelSpec:
    """Declaration of one telemetry channel.

    Attributes:
        name: Canonical column name.
        unit: Physical unit ("-" for dimensionless).
        low: Smallest physically valid value (inclusive).
        high: Largest physically valid value (inclusive).
        description: What the channel measures.
    """

    name: str
    unit: str
    low: float
    high: float
    description: str


# Ranges are physical plausibility bounds, wide enough for all four C-MAPSS sub-datasets (FD001-FD004,
# six operating regimes) with margin: a value outside is a broken reading, not a degraded engine.
# Units follow Saxena et al. (2008), "Damage propagation modeling for aircraft engine run-to-failure
# simulation" (°R Rankine, psia, rpm, pps/psi, lbm/s).
CHANNEL_SPECS: dict[str, ChannelSpec] = {
    s.name: s
    for s in [
        ChannelSpec("op_setting_1", "kft", -1.0, 50.0, "altitude (FD001/FD003: normalised near 0)"),
        ChannelSpec("op_setting_2", "Mach", -0.1, 1.0, "Mach number"),
        ChannelSpec("op_setting_3", "%", 0.0, 120.0, "throttle resolver angle (TRA)"),
        ChannelSpec("s1", "°R", 400.0, 600.0, "T2: total temperature at fan inlet"),
        ChannelSpec("s2", "°R", 450.0, 700.0, "T24: total temperature at LPC outlet"),
        ChannelSpec("s3", "°R", 1100.0, 1800.0, "T30: total temperature at HPC outlet"),
        ChannelSpec("s4", "°R", 900.0, 1600.0, "T50: total temperature at LPT outlet"),
        ChannelSpec("s5", "psia", 0.0, 20.0, "P2: pressure at fan inlet"),
        ChannelSpec("s6", "psia", 0.0, 30.0, "P15: total pressure in bypass duct"),
        ChannelSpec("s7", "psia", 50.0, 700.0, "P30: total pressure at HPC outlet"),
        ChannelSpec("s8", "rpm", 1500.0, 2500.0, "Nf: physical fan speed"),
        ChannelSpec("s9", "rpm", 7000.0, 10000.0, "Nc: physical core speed"),
        ChannelSpec("s10", "-", 0.5, 2.0, "epr: engine pressure ratio (P50/P2)"),
        ChannelSpec("s11", "psia", 20.0, 60.0, "Ps30: static pressure at HPC outlet"),
        ChannelSpec("s12", "pps/psi", 50.0, 600.0, "phi: ratio of fuel flow to Ps30"),
        ChannelSpec("s13", "rpm", 1500.0, 2500.0, "NRf: corrected fan speed"),
        ChannelSpec("s14", "rpm", 7000.0, 9000.0, "NRc: corrected core speed"),
        ChannelSpec("s15", "-", 5.0, 15.0, "BPR: bypass ratio"),
        ChannelSpec("s16", "-", 0.0, 0.1, "farB: burner fuel-air ratio"),
        ChannelSpec("s17", "-", 200.0, 500.0, "htBleed: bleed enthalpy"),
        ChannelSpec("s18", "rpm", 1500.0, 2500.0, "Nf_dmd: demanded fan speed"),
        ChannelSpec("s19", "%", 50.0, 120.0, "PCNfR_dmd: demanded corrected fan speed"),
        ChannelSpec("s20", "lbm/s", 0.0, 60.0, "W31: HPT coolant bleed"),
        ChannelSpec("s21", "lbm/s", 0.0, 40.0, "W32: LPT coolant bleed"),
    ]
}

# Values that loggers write for "no reading": stored as null and flagged, never as numbers.
SENTINELS: tuple[float, ...] = (-999.0, -9999.0, -99999.0, 99999.0, 999999.0)

# Cycle numbers are counts from 1 (C-MAPSS) or 0; negative cycles are broken keys.
CYCLE_RANGE = (0, 2**31 - 1)

# Asset ids become Hive-style partition folders ``asset_id=<quote(asset_id, safe='')>`` (how delta-rs and
# pyarrow encode partition values): an id whose percent-encoded form is longer than this is quarantined
# (``asset id too long: N characters percent-encoded (limit 200)``), which keeps every folder name well
# under the 255-byte limit of common file systems, whatever the characters (``é`` encodes as ``%C3%A9``).
ASSET_ID_MAX_ENCODED = 200

# Asset cells that mean "no value" (compared case-insensitively after stripping whitespace): such rows
# are quarantined as ``missing asset id`` instead of creating assets named "nan" or "inf".
MISSING_ASSET_TOKENS: frozenset[str] = frozenset({"", "nan", "-nan", "inf", "+inf", "-inf", "null", "none"})

# Column-name aliases accepted in headered CSV/Parquet sources (lower-cased) -> canonical name.
ALIASES: dict[str, str] = {
    "unit": ASSET, "unit_id": ASSET, "unit_number": ASSET, "asset": ASSET, "engine": ASSET,
    "engine_id": ASSET, "id": ASSET, "time": TIME, "time_cycles": TIME, "cycles": TIME,
    "op1": "op_setting_1", "op2": "op_setting_2", "op3": "op_setting_3",
    "setting_1": "op_setting_1", "setting_2": "op_setting_2", "setting_3": "op_setting_3",
    "setting1": "op_setting_1", "setting2": "op_setting_2", "setting3": "op_setting_3",
    **{f"sensor_{i}": f"s{i}" for i in range(1, 22)},
    **{f"sensor{i}": f"s{i}" for i in range(1, 22)},
}


class Quality(IntFlag):
    """Bits of the ``quality`` column: a row is kept and flagged, never silently altered.

    Rows that break the contract (bad keys, unparseable or out-of-range values, duplicate keys) are
    not flagged but quarantined; these bits mark rows that are valid but deserve caution.
    """

    OK = 0
    MISSING = 1  # a channel present in the source is null/NaN in this row
    SENTINEL = 2  # a channel held a sentinel (e.g. -999); stored as null
    OUT_OF_ORDER = 4  # the row's cycle went backwards within its source file (the lake is sorted)
    STUCK = 8  # a normally varying channel repeated the same value over the stuck window


def valid_range(channel: str) -> tuple[float, float]:
    """The inclusive valid range of a channel.

    Raises:
        KeyError: for a channel the contract does not declare.
    """
    spec = CHANNEL_SPECS[channel]
    return spec.low, spec.high


def canonical_name(column: str) -> str | None:
    """Map a source column name to its canonical name, or None when it is not part of the contract."""
    key = column.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    known = {ASSET, TIME, TIMESTAMP, *CHANNELS}
    return key if key in known else None


def quarantine_schema() -> pa.Schema:
    """Arrow schema of the quarantine dataset (one row per rejected source row)."""
    return pa.schema(
        [
            pa.field("source_file", pa.string(), nullable=False),
            pa.field("batch_id", pa.string(), nullable=False),
            pa.field("record", pa.int64()),  # 0-based record index in the file (null: unparseable)
            pa.field("reason", pa.string(), nullable=False),
            pa.field(ASSET, pa.string()),
            pa.field(TIME, pa.int64()),
            pa.field("raw", pa.string()),  # the original text or values of the row
        ]
    )
