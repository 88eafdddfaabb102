"""The C-MAPSS names the tests use, read from the bundled ``cmapss`` fleet contract (the only place
that declares them): channel lists, the header-less text column order, sentinels, ranges."""

from __future__ import annotations

import pyarrow as pa

from twinflow.contract import load_contract

CMAPSS = load_contract("cmapss")
OP_SETTINGS = CMAPSS.settings
SENSORS = CMAPSS.sensors
CHANNELS = CMAPSS.channel_names
CMAPSS_COLUMNS = list(CMAPSS.rule_for("train_FD001.txt").columns)
SENTINELS = tuple(CMAPSS.sentinels)


def telemetry_schema() -> pa.Schema:
    """The lake schema of a C-MAPSS table."""
    return CMAPSS.lake_schema()


def valid_range(channel: str) -> tuple[float, float]:
    ch = CMAPSS.channel(channel)
    return ch.low, ch.high


def unit(channel: str) -> str:
    return CMAPSS.channel(channel).unit
