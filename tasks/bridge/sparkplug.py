"""Sparkplug B payloads: a small protobuf wire-format codec for the fields the bridge uses.

Sparkplug B (Eclipse Tahu ``sparkplug_b.proto``) encodes a ``Payload`` as protobuf: ``timestamp`` (1,
uint64 ms), ``metrics`` (2, repeated ``Metric``), ``seq`` (3, uint64). A ``Metric`` has ``name`` (1),
``alias`` (2), ``timestamp`` (3), ``datatype`` (4), ``is_null`` (7) and one value field: ``int_value``
(10, uint32), ``long_value`` (11, uint64), ``float_value`` (12, float), ``double_value`` (13, double),
``boolean_value`` (14), ``string_value`` (15). Other fields (metadata, properties, datasets,
templates) are skipped by wire type, as protobuf readers do. Hand-written instead of generated code
so that the bridge needs no protobuf runtime; tests check it against payloads encoded by the
``protobuf`` library from a descriptor with the official field numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Metric", "Payload", "SparkplugError", "decode_payload", "encode_payload", "parse_topic"]

# Sparkplug datatypes (Tahu DataType enum) the bridge maps to numbers.
INT_TYPES = {1, 2, 3, 4, 5, 6, 7, 8, 13}  # Int8..UInt64, DateTime
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12


class SparkplugError(ValueError):
    """A payload that is not a valid Sparkplug B protobuf message."""


@dataclass
class Metric:
    """One decoded metric: ``value`` is None when ``is_null`` or when it carries no value field."""

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    value: Any = None


@dataclass
class Payload:
    """A decoded Sparkplug B payload."""

    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise SparkplugError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise SparkplugError("varint too long")


def _fields(buf: bytes):
    """(field number, wire type, value) of each field of a message; length-delimited values as bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise SparkplugError("field number 0")
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            if i + 8 > n:
                raise SparkplugError("truncated fixed64")
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            if i + ln > n:
                raise SparkplugError("truncated length-delimited field")
            v, i = buf[i:i + ln], i + ln
        elif wt == 5:
            if i + 4 > n:
                raise SparkplugError("truncated fixed32")
            v, i = buf[i:i + 4], i + 4
        else:
            raise SparkplugError(f"unsupported wire type {wt}")
        yield num, wt, v


def _metric(buf: bytes) -> Metric:
    m = Metric()
    is_null = False
    for num, wt, v in _fields(buf):
        if num == 1 and wt == 2:
            try:
                m.name = v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SparkplugError("metric name is not UTF-8") from exc
        elif num == 2 and wt == 0:
            m.alias = v
        elif num == 3 and wt == 0:
            m.timestamp = v
        elif num == 4 and wt == 0:
            m.datatype = v
        elif num == 7 and wt == 0:
            is_null = bool(v)
        elif num == 10 and wt == 0:
            m.value = v & 0xFFFFFFFF
        elif num == 11 and wt == 0:
            m.value = v
        elif num == 12 and wt == 5:
            m.value = struct.unpack("<f", v)[0]
        elif num == 13 and wt == 1:
            m.value = struct.unpack("<d", v)[0]
        elif num == 14 and wt == 0:
            m.value = bool(v)
        elif num == 15 and wt == 2:
            m.value = v.decode("utf-8", "replace")
    if is_null:
        m.value = None
    # Signed Sparkplug ints travel as two's complement in uint32/uint64 fields.
    if isinstance(m.value, int) and not isinstance(m.value, bool) and m.datatype in (1, 2, 3):
        bits = {1: 8, 2: 16, 3: 32}[m.datatype]
        m.value = m.value & ((1 << bits) - 1)
        if m.value >= 1 << (bits - 1):
            m.value -= 1 << bits
    elif isinstance(m.value, int) and not isinstance(m.value, bool) and m.datatype == 4 and m.value >= 1 << 63:
        m.value -= 1 << 64
    return m


def decode_payload(data: bytes) -> Payload:
    """Decode a Sparkplug B ``Payload``.

    Raises:
        SparkplugError: the bytes are not a well-formed protobuf message.
    """
    p = Payload()
    for num, wt, v in _fields(bytes(data)):
        if num == 1 and wt == 0:
            p.timestamp = v
        elif num == 2 and wt == 2:
            p.metrics.append(_metric(v))
        elif num == 3 and wt == 0:
            p.seq = v
    return p


def _put_varint(out: bytearray, v: int) -> None:
    v &= (1 << 64) - 1
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _put_key(out: bytearray, num: int, wt: int) -> None:
    _put_varint(out, (num << 3) | wt)


def _put_bytes(out: bytearray, num: int, data: bytes) -> None:
    _put_key(out, num, 2)
    _put_varint(out, len(data))
    out += data


def encode_payload(metrics: dict[str, Any], timestamp: int | None = None, seq: int | None = None) -> bytes:
    """Encode ``{name: value}`` as a Sparkplug B payload (ints as Int64, floats as Double, None as null).

    Used by the simulator and the benchmark; any Sparkplug edge node's payloads decode the same way.
    """
    out = bytearray()
    if timestamp is not None:
        _put_key(out, 1, 0)
        _put_varint(out, timestamp)
    for name, value in metrics.items():
        m = bytearray()
        _put_bytes(m, 1, name.encode())
        if timestamp is not None:
            _put_key(m, 3, 0)
            _put_varint(m, timestamp)
        if value is None:
            _put_key(m, 4, 0)
            _put_varint(m, DOUBLE)
            _put_key(m, 7, 0)
            _put_varint(m, 1)
        elif isinstance(value, bool):
            _put_key(m, 4, 0)
            _put_varint(m, BOOLEAN)
            _put_key(m, 14, 0)
            _put_varint(m, int(value))
        elif isinstance(value, int):
            _put_key(m, 4, 0)
            _put_varint(m, 4)
            _put_key(m, 11, 0)
            _put_varint(m, value)
        elif isinstance(value, float):
            _put_key(m, 4, 0)
            _put_varint(m, DOUBLE)
            _put_key(m, 13, 1)
            m += struct.pack("<d", value)
        else:
            _put_key(m, 4, 0)
            _put_varint(m, STRING)
            _put_bytes(m, 15, str(value).encode())
        _put_bytes(out, 2, bytes(m))
    if seq is not None:
        _put_key(out, 3, 0)
        _put_varint(out, seq)
    return bytes(out)


def parse_topic(topic: str) -> tuple[str, str, str, str | None] | None:
    """``spBv1.0/<group>/<type>/<edge node>[/<device>]`` -> (group, type, edge node, device); None otherwise."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != "spBv1.0":
        return None
    return parts[1], parts[2], parts[3], parts[4] if len(parts) == 5 else None
