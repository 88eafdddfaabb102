"""Payload decoding: message bytes -> rows of the data contract, or a reason to quarantine them."""

from __future__ import annotations

import json
import math
from typing import Any

from twinflow import contracts as C
from twinflow.tasks.bridge.sparkplug import SparkplugError, decode_payload, parse_topic

__all__ = ["DecodeError", "decode_json", "decode_sparkplug", "decode_message"]

_COLUMNS = {C.ASSET, C.TIME, *C.CHANNELS}


class DecodeError(ValueError):
    """A message that carries no usable row; its text is the quarantine reason."""


def _row(obj: Any, default_asset: str | None = None) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DecodeError(f"row is a {type(obj).__name__}, not an object")
    row: dict[str, Any] = {}
    for k, v in obj.items():
        name = C.canonical_name(str(k)) if k not in _COLUMNS else k
        if name is None or name == C.TIMESTAMP:
            continue
        row[name] = v
    if default_asset is not None and C.ASSET not in row:
        row[C.ASSET] = default_asset
    if C.ASSET not in row or row[C.ASSET] is None:
        raise DecodeError("missing asset id")
    row[C.ASSET] = str(row[C.ASSET])
    c = row.get(C.TIME)
    if c is None:
        raise DecodeError("missing cycle")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not float(c).is_integer():
        raise DecodeError(f"cycle {c!r} is not an integer")
    row[C.TIME] = int(c)
    for ch in C.CHANNELS:
        v = row.get(ch)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise DecodeError(f"{ch}={v!r} is not a number")
        if v is not None:
            row[ch] = float(v)
    return row


def decode_json(data: bytes) -> list[dict[str, Any]]:
    """A JSON row object or list of row objects.

    Raises:
        DecodeError: not UTF-8 JSON, or a row without a valid key / with a non-numeric channel.
    """
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"invalid JSON: {exc}") from exc
    rows = obj if isinstance(obj, list) else [obj]
    if not rows:
        raise DecodeError("empty row list")
    return [_row(r) for r in rows]


def decode_sparkplug(topic: str, data: bytes) -> list[dict[str, Any]]:
    """A Sparkplug B ``DDATA``/``NDATA`` payload as one row (other message types: no rows).

    The device id (else the edge node id) is the asset; metric names are channel names (aliases
    without a name are not resolved: publish names); the ``cycle`` metric is the key.

    Raises:
        DecodeError: not a Sparkplug topic, malformed protobuf, or no ``cycle`` metric.
    """
    parsed = parse_topic(topic)
    if parsed is None:
        raise DecodeError(f"topic {topic!r} is not a Sparkplug B topic (spBv1.0/group/type/node[/device])")
    _, kind, node, device = parsed
    if kind not in ("DDATA", "NDATA"):
        return []  # births, deaths and commands carry no telemetry row
    try:
        p = decode_payload(data)
    except SparkplugError as exc:
        raise DecodeError(f"invalid Sparkplug B payload: {exc}") from exc
    values: dict[str, Any] = {}
    for m in p.metrics:
        if m.name is None:
            continue
        v = m.value
        if isinstance(v, float) and math.isnan(v):
            v = None
        values[m.name] = v
    return [_row(values, default_asset=device or node)]


def decode_message(fmt: str, topic: str, data: bytes) -> list[dict[str, Any]]:
    """Decode one message of a source format (``json`` or ``sparkplug``)."""
    if fmt == "sparkplug":
        return decode_sparkplug(topic, data)
    return decode_json(data)
