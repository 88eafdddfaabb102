"""The data contract of the lake: canonical fleet-telemetry schema, units and valid ranges.

One wide row per (asset, time): ``asset_id``, ``cycle`` (or ``timestamp``), operating settings,
sensor channels, then lineage (``source_file``, ``batch_id``) and a ``quality`` bit mask.
The lake stores it hive-partitioned as ``<lake>/dataset=<name>/asset=<asset_id>/<file>.parquet``.
"""

from __future__ import annotations

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
