"""Payload decoding: message bytes -> rows of the fleet contract, or reasons to quarantine them.

Decoding is bounded (:class:`DecodeLimits`: message size, nesting depth, integer digits, string length,
rows per message), so no payload can exhaust the bridge: a 5,000-digit integer, 100k nested brackets or
a multi-megabyte string is a quarantine reason like any other. A message's rows are judged one by one:
a bad row quarantines itself, the message's valid rows still land.

Names map through the contract (:meth:`twinflow.contract.FleetContract.canonical_name`): JSON keys and
Sparkplug B metric names may be channel names or any declared alias (``"casing_temp [degC]"``). Keys the
contract does not declare are ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from twinflow import contracts as C
from twinflow.contract.model import FleetContract
from twinflow.tasks.bridge.sparkplug import SparkplugError, decode_payload, parse_topic

__all__ = ["DecodeError", "DecodeLimits", "Decoded", "Decoder", "decode_json", "decode_message",
           "decode_sparkplug", "normalize_row"]


class DecodeError(ValueError):
    """A message (or row) that carries no usable row; its text is the quarantine reason."""


class DecodeLimits(BaseModel):
    """Bounds on what one message may make the bridge do (``limits:`` in the bridge config).

    Attributes:
        max_message_bytes: Larger payloads are quarantined unread.
        max_depth: Deepest nesting of JSON arrays/objects (a row list of row objects is depth 2).
        max_int_digits: Longest integer literal (digits); longer ones are not converted at all.
        max_string_length: Longest asset id or timestamp string, in characters (a longer key is not a
            name of the contract; other strings are bounded by the message size).
        max_rows: Most rows one message may carry.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_message_bytes: int = Field(1_000_000, ge=16)
    max_depth: int = Field(8, ge=2)
    max_int_digits: int = Field(30, ge=1, le=4000)
    max_string_length: int = Field(1024, ge=1)
    max_rows: int = Field(10_000, ge=1)


@dataclass
class Decoded:
    """One message's rows and the rows (raw text, reason) that could not be used."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def _depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings ignored)."""
    d = best = 0
    for m in _BRACKETS.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            d += 1
            best = max(best, d)
        elif c in (b"]", b"}"):
            d -= 1
    return best


def _valid_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800") are not Unicode text
        return False
    return True


def _short(v: Any, n: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


def _timestamp(v: Any, tz: Any) -> datetime:
    """A UTC datetime from an ISO 8601 string (offset-less: the contract's timezone) or epoch seconds."""
    if isinstance(v, bool) or v is None:
        raise DecodeError(f"timestamp {v!r} is not a time")
    if isinstance(v, (int, float)):
        if not math.isfinite(v) or not -62_135_596_800 <= v <= 253_402_300_799:
            raise DecodeError(f"timestamp {_short(v)} is outside years 1-9999 (epoch seconds)")
        return datetime.fromtimestamp(float(v), timezone.utc)
    if isinstance(v, str):
        try:
            t = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            raise DecodeError(f"timestamp {_short(v)} is not ISO 8601") from None
        return (t.replace(tzinfo=tz) if t.tzinfo is None else t).astimezone(timezone.utc)
    if isinstance(v, datetime):
        return (v.replace(tzinfo=tz) if v.tzinfo is None else v).astimezone(timezone.utc)
    raise DecodeError(f"timestamp is a {type(v).__name__}, not a time")


class Decoder:
    """Decodes messages of one bridge into rows of its fleet contract, within its limits.

    Args:
        contract: The fleet contract the rows belong to.
        limits: Decoding bounds.
    """

    def __init__(self, contract: FleetContract, limits: DecodeLimits | None = None) -> None:
        from zoneinfo import ZoneInfo

        self.contract, self.limits = contract, limits or DecodeLimits()
        self.key = contract.clock.key
        self.tz = ZoneInfo(contract.clock.timezone)
        self._names: dict[str, str | None] = {}
        self.channels = frozenset(contract.channel_names)
        self._tmin, self._tmax = contract.time_range

    # --- names -----------------------------------------------------------------------------------

    def name(self, key: str) -> str | None:
        """The contract column a source key names (cached: the same few keys arrive millions of times)."""
        try:
            return self._names[key]
        except KeyError:
            pass
        out = self.contract.canonical_name(key) if len(key) <= self.limits.max_string_length else None
        if len(self._names) < 10_000:  # a stream of random keys must not grow the cache without bound
            self._names[key] = out
        return out

    # --- rows ------------------------------------------------------------------------------------

    def row(self, obj: Any, default_asset: str | None = None) -> dict[str, Any]:
        """One source object as a contract row (asset, time key, float channels).

        Raises:
            DecodeError: the row's reason to be quarantined.
        """
        if not isinstance(obj, dict):
            raise DecodeError(f"row is a {type(obj).__name__}, not an object")
        row: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                continue
            name = self.name(k)
            if name is None or name in row:
                continue
            row[name] = v
        asset = row.get(C.ASSET, default_asset)
        row[C.ASSET] = self.asset(asset)
        row[self.key] = self.time(row.get(self.key))
        for ch in [c for c in row if c in self.channels]:
            v = row[ch]
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DecodeError(f"{ch}={_short(v)} is not a number")
            try:
                x = float(v)
            except OverflowError:
                raise DecodeError(f"{ch}: integer of {len(str(v))} digits is not a finite number") from None
            if not math.isfinite(x):
                if math.isnan(x):
                    row[ch] = None  # a NaN is "no reading" (Sparkplug null-ish floats), flagged missing
                    continue
                raise DecodeError(f"{ch}={x!r} is not a finite number")
            row[ch] = x
        return row

    def asset(self, a: Any) -> str:
        """The asset id as a string: text (valid Unicode) or, where the contract allows, an integer."""
        if a is None:
            raise DecodeError("missing asset id")
        if isinstance(a, str):
            if not _valid_text(a):
                raise DecodeError(f"asset id {ascii(a)[:80]} is not valid Unicode text")
            if len(a) > self.limits.max_string_length:
                raise DecodeError(f"asset id of {len(a)} characters (limit {self.limits.max_string_length})")
            s = a.strip()
            if s.lower() in C.MISSING_ASSET_TOKENS:
                raise DecodeError("missing asset id")
            return s
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise DecodeError(f"asset id is a {type(a).__name__} ({_short(a)}), not a string")
        if not self.contract.asset.numeric_ok:
            raise DecodeError(f"asset id {_short(a)} is a number; contract {self.contract.name!r} "
                              "requires string ids")
        if isinstance(a, float):
            if not (math.isfinite(a) and a.is_integer()):
                raise DecodeError(f"asset id {_short(a)} is not an integer")
            a = int(a)
        return str(a)

    def time(self, t: Any) -> Any:
        """The row's time key: an int cycle within the contract's range, or a UTC timestamp."""
        if self.key == C.TIME:
            if t is None:
                raise DecodeError("missing cycle")
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise DecodeError(f"cycle {_short(t)} is not an integer")
            if isinstance(t, float):
                if not (math.isfinite(t) and t.is_integer()):
                    raise DecodeError(f"cycle {_short(t)} is not an integer")
                t = int(t)
            if not self._tmin <= t <= self._tmax:
                raise DecodeError(f"cycle {_short(t)} outside [{self._tmin}, {self._tmax}]")
            return t
        if t is None:
            raise DecodeError("missing timestamp")
        if isinstance(t, str) and len(t) > 64:
            raise DecodeError(f"timestamp of {len(t)} characters is not a time")
        return _timestamp(t, self.tz)

    # --- messages --------------------------------------------------------------------------------

    def _rows(self, objs: list[Any], default_asset: str | None = None) -> Decoded:
        out = Decoded()
        for obj in objs:
            try:
                out.rows.append(self.row(obj, default_asset))
            except DecodeError as exc:
                out.errors.append((_raw_row(obj), str(exc)))
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # anything else a value does
                out.errors.append((_raw_row(obj), f"undecodable row ({type(exc).__name__}: {exc})"[:500]))
        return out

    def _json(self, data: bytes) -> Any:
        lim = self.limits
        if len(data) > lim.max_message_bytes:
            raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {lim.max_message_bytes}")
        # Counting brackets is C-speed; only a message with more brackets than the depth limit is scanned.
        if data.count(b"[") + data.count(b"{") > lim.max_depth and _depth(data) > lim.max_depth:
            raise DecodeError(f"JSON nested deeper than {lim.max_depth} levels")

        def parse_int(s: str) -> int:
            if len(s.lstrip("-")) > lim.max_int_digits:
                raise DecodeError(f"integer of {len(s.lstrip('-'))} digits exceeds the limit of "
                                  f"{lim.max_int_digits}")
            return int(s)

        try:
            # Only integers get a hook (the digit bound: int() of a long literal is quadratic); a hook per
            # float or per object would triple the cost of a row of floats.
            return json.loads(data, parse_int=parse_int)
        except DecodeError:
            raise
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"invalid JSON: {exc}") from exc
        except (ValueError, RecursionError, OverflowError, TypeError) as exc:
            raise DecodeError(f"invalid JSON ({type(exc).__name__}: {str(exc)[:200]})") from exc

    def decode_json(self, data: bytes) -> Decoded:
        """A JSON row object or list of row objects.

        Raises:
            DecodeError: the message as a whole is unusable (not bounded UTF-8 JSON, no rows).
        """
        obj = self._json(bytes(data))
        objs = obj if isinstance(obj, list) else [obj]
        if not objs:
            raise DecodeError("empty row list")
        if len(objs) > self.limits.max_rows:
            raise DecodeError(f"{len(objs)} rows in one message exceed the limit of {self.limits.max_rows}")
        return self._rows(objs)

    def decode_sparkplug(self, topic: str, data: bytes) -> Decoded:
        """A Sparkplug B ``DDATA``/``NDATA`` payload as one row (other message types: no rows).

        The device id (else the edge node id) is the asset; metric names map to contract channels; the
        clock metric (``cycle``, or the timestamp column) is the key, and for a timestamp clock without
        one the payload's timestamp (ms since the epoch) is.

        Raises:
            DecodeError: not a Sparkplug topic, oversized or malformed protobuf.
        """
        parsed = parse_topic(topic)
        if parsed is None:
            raise DecodeError(f"topic {topic[:200]!r} is not a Sparkplug B topic (spBv1.0/group/type/node[/device])")
        _, kind, node, device = parsed
        if kind not in ("DDATA", "NDATA"):
            return Decoded()  # births, deaths and commands carry no telemetry row
        if len(data) > self.limits.max_message_bytes:
            raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {self.limits.max_message_bytes}")
        try:
            p = decode_payload(bytes(data))
        except SparkplugError as exc:
            raise DecodeError(f"invalid Sparkplug B payload: {exc}") from exc
        except (ValueError, IndexError, OverflowError, RecursionError, UnicodeDecodeError) as exc:
            raise DecodeError(f"invalid Sparkplug B payload ({type(exc).__name__}: {str(exc)[:200]})") from exc
        values: dict[str, Any] = {}
        for m in p.metrics:
            if m.name is None:
                continue
            values[m.name] = m.value
        if self.key == C.TIMESTAMP and p.timestamp is not None and \
                not any(self.name(k) == C.TIMESTAMP for k in values):
            values[C.TIMESTAMP] = p.timestamp / 1000.0
        return self._rows([values], default_asset=device or node)

    def decode(self, fmt: str, topic: str, data: bytes) -> Decoded:
        """Decode one message of a source format (``json`` or ``sparkplug``).

        Raises:
            DecodeError: the message as a whole is unusable.
        """
        if fmt == "sparkplug":
            return self.decode_sparkplug(topic, data)
        return self.decode_json(data)


def _raw_row(obj: Any) -> str:
    try:
        return json.dumps(obj, default=repr, ensure_ascii=True)[:100_000]
    except (ValueError, TypeError, RecursionError):
        return repr(obj)[:100_000]


_DEFAULT: dict[str | None, Decoder] = {}


def _default() -> Decoder:
    """The decoder of the settings' contract, built once per process (per ``TWINFLOW_CONTRACT`` value):
    reading the settings and the contract's YAML per message made decoding ~100x slower."""
    import os

    from twinflow.contract.store import resolve_contract

    key = os.environ.get("TWINFLOW_CONTRACT")
    d = _DEFAULT.get(key)
    if d is None:
        d = _DEFAULT[key] = Decoder(resolve_contract(None))
    return d


def _strict(d: Decoded) -> list[dict[str, Any]]:
    if d.errors:
        raise DecodeError(d.errors[0][1])
    return d.rows


def normalize_row(contract: FleetContract, row: dict[str, Any]) -> dict[str, Any]:
    """A row built elsewhere (OPC UA, tests) checked like a decoded one (see :meth:`Decoder.row`)."""
    return Decoder(contract).row(row)


def decode_json(data: bytes, decoder: Decoder | None = None) -> list[dict[str, Any]]:
    """All rows of a JSON message, or :class:`DecodeError` for the first bad one (all or nothing).

    The bridge itself uses :meth:`Decoder.decode`, which keeps the good rows of a message.
    """
    return _strict((decoder or _default()).decode_json(data))


def decode_sparkplug(topic: str, data: bytes, decoder: Decoder | None = None) -> list[dict[str, Any]]:
    """:func:`decode_json` for a Sparkplug B message."""
    return _strict((decoder or _default()).decode_sparkplug(topic, data))


def decode_message(fmt: str, topic: str, data: bytes, decoder: Decoder | None = None) -> list[dict[str, Any]]:
    """Decode one message of a source format (``json`` or ``sparkplug``), all or nothing."""
    return _strict((decoder or _default()).decode(fmt, topic, data))
