"""Generic names of the lake that hold for every fleet: key, lineage and quality columns, quarantine schema.

What a fleet's data *is* (its asset column, clock, channels, units and valid ranges, sentinels, file
routing) is not here: it is declared in a fleet contract (``twinflow/contract/``; the bundled ones are
``twinflow/contract/bundled/*.yaml``). A lake row is one (asset, time) of a fleet: ``asset_id``, the
clock's key (``cycle`` or ``timestamp``), the contract's channels, then lineage (``source_file``,
``batch_id``) and a ``quality`` bit mask. The lake stores one Delta table per dataset, partitioned by
``asset_id`` (``twinflow/lake.py``).
"""

from __future__ import annotations

from enum import IntFlag

import pyarrow as pa

ASSET = "asset_id"
TIME = "cycle"
TIMESTAMP = "timestamp"
LINEAGE = ["source_file", "batch_id", "quality"]

# Asset ids become Hive-style partition folders ``asset_id=<quote(asset_id, safe='')>`` (how delta-rs and
# pyarrow encode partition values): an id whose percent-encoded form is longer than this is quarantined
# (``asset id too long: N characters percent-encoded (limit 200)``), which keeps every folder name well
# under the 255-byte limit of common file systems, whatever the characters (``é`` encodes as ``%C3%A9``).
ASSET_ID_MAX_ENCODED = 200

# Asset cells that mean "no value" (compared case-insensitively after stripping whitespace): such rows
# are quarantined as ``missing asset id`` instead of creating assets named "nan" or "inf".
MISSING_ASSET_TOKENS: frozenset[str] = frozenset({"", "nan", "-nan", "inf", "+inf", "-inf", "null", "none"})

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
