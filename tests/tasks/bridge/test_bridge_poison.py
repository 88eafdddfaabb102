"""Poison messages: bounded decoding, per-row quarantine, crash isolation, conflicts, batch-independent flags."""

from __future__ import annotations

import base64
import json

import pytest

from twinflow import contracts as C
from twinflow import lake as lk
from twinflow.contract import load_contract
from twinflow.tasks.bridge.buffer import Message
from twinflow.tasks.bridge.commit import Committer
from twinflow.tasks.bridge.decode import DecodeError, DecodeLimits, Decoder
from twinflow.tasks.ingest.quarantine import read_quarantine

def _decoder(contract: str = "cmapss", **limits) -> Decoder:
    return Decoder(load_contract(contract), DecodeLimits(**limits))


def _msg(dec: Decoder, payload: bytes, acks: list, fmt: str = "json", topic: str = "t") -> Message:
    try:
        out = dec.decode(fmt, topic, payload)
        return Message(source="mqtt://test/t", raw=payload, rows=out.rows, row_errors=out.errors, checked=True,
                       ack=lambda: acks.append(payload))
    except DecodeError as exc:
        return Message(source="mqtt://test/t", raw=payload, error=str(exc), ack=lambda: acks.append(payload))


def _quarantine(tmp_path) -> dict[bytes, list[str]]:
    out: dict[bytes, list[str]] = {}
    for r in read_quarantine(str(tmp_path / "q"), "stream").to_pylist():
        out.setdefault(base64.b64decode(r["raw"].removeprefix("base64:")), []).append(r["reason"])
    return out


def _lake(tmp_path, columns=("asset_id", "cycle")) -> list[dict]:
    snap = lk.snapshot(str(tmp_path / "lake"), "stream")
    return [] if snap is None else lk.read_lake(snap, columns=list(columns)).to_pylist()


def test_each_poison_message_is_a_reason_not_an_exception(poison):
    for name, payload in poison.items():
        try:
            out = _decoder().decode("json", "t", payload)
        except DecodeError as exc:  # the whole message is quarantined with this reason
            assert str(exc), name
            continue
        assert not out.rows and out.errors, name  # or its one row is, with this reason


def test_poison_set_is_quarantined_with_raw_bytes_and_the_canary_lands(tmp_path, poison):
    POISON = poison
    dec, acks = _decoder(), []
    canary = json.dumps({"asset_id": "u9", "cycle": 1, "s2": 642.0}).encode()
    msgs = [_msg(dec, p, acks) for p in POISON.values()] + [_msg(dec, canary, acks)]
    c = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", decoder=dec)
    res = c.commit(msgs)
    assert (res.rows_written, res.rows_quarantined) == (1, len(POISON))
    assert len(acks) == len(msgs)
    q = _quarantine(tmp_path)
    assert set(q) == set(POISON.values())
    reasons = {name: q[p][0] for name, p in POISON.items()}
    assert "digits" in reasons["400-digit int"] and "digits" in reasons["5000-digit int"]
    assert "nested deeper" in reasons["100k nested brackets"]
    assert reasons["cycle >= 2^63"].startswith("cycle 9223372036854775808 outside")
    assert "not valid Unicode" in reasons["lone surrogate asset"]
    assert _lake(tmp_path) == [{"asset_id": "u9", "cycle": 1}]


def test_the_same_bad_bytes_in_two_quarantine_only_batches_are_quarantined_twice(tmp_path):
    # A batch with nothing for the lake does not move the commit sequence, so two such batches once
    # wrote the same quarantine file name and the second replaced the first: one of two rows lost.
    dec, acks = _decoder(), []
    bad = b'{"asset_id": "u1", "cycle": 1, "s2": 9999.0}'
    c = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", decoder=dec)
    for _ in range(2):
        assert c.commit([_msg(dec, bad, acks)]).rows_quarantined == 1
    again = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1",
                      decoder=dec)  # a restart: its own writes count from 1 again
    assert again.commit([_msg(dec, bad, acks)]).rows_quarantined == 1
    assert len(_quarantine(tmp_path)[bad]) == 3
    assert len(acks) == 3 and _lake(tmp_path) == []


def test_limits_are_configurable():
    big = json.dumps({"asset_id": "u" * 50, "cycle": 1, "s2": 642.0}).encode()
    assert _decoder().decode("json", "t", big).rows
    assert _decoder(max_string_length=20).decode("json", "t", big).errors[0][1] == \
        "asset id of 50 characters (limit 20)"
    with pytest.raises(DecodeError, match="exceeds the limit of 40"):
        _decoder(max_message_bytes=40).decode("json", "t", big)
    deep = json.dumps([{"asset_id": "u1", "cycle": 1, "s2": [[[642.0]]]}]).encode()
    with pytest.raises(DecodeError, match="nested deeper than 3"):
        _decoder(max_depth=3).decode("json", "t", deep)
    rows = json.dumps([{"asset_id": "u1", "cycle": i} for i in range(5)]).encode()
    with pytest.raises(DecodeError, match="5 rows in one message exceed the limit of 4"):
        _decoder(max_rows=4).decode("json", "t", rows)


def test_a_bad_row_quarantines_only_itself(tmp_path):
    dec, acks = _decoder(), []
    payload = json.dumps([{"asset_id": "u1", "cycle": 1, "s2": 642.0},
                          {"asset_id": {"a": 1}, "cycle": 2, "s2": 642.0},
                          {"asset_id": True, "cycle": 3},
                          {"asset_id": "u1", "cycle": 4, "s2": "hot"},
                          {"asset_id": "u1", "cycle": 5, "s2": 9999.0},
                          {"asset_id": "u1", "cycle": 6, "s2": 643.0}]).encode()
    c = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", decoder=dec)
    res = c.commit([_msg(dec, payload, acks)])
    assert (res.rows_written, res.rows_quarantined) == (2, 4)
    assert sorted(r["cycle"] for r in _lake(tmp_path)) == [1, 6]
    reasons = sorted(_quarantine(tmp_path)[payload])
    assert any("asset id is a dict" in r for r in reasons)
    assert any("asset id is a bool" in r for r in reasons)
    assert any(r.startswith("s2='hot' is not a number") for r in reasons)
    assert any(r.startswith("s2=9999 outside valid range [450, 700]") for r in reasons)


def test_numeric_asset_ids_only_where_the_contract_allows_them():
    assert _decoder().decode("json", "t", b'{"asset_id": 7, "cycle": 1}').rows[0]["asset_id"] == "7"
    strict = load_contract("cmapss").model_copy(update={"asset": load_contract("cmapss").asset.model_copy(
        update={"numeric_ok": False})})
    out = Decoder(strict).decode("json", "t", b'{"asset_id": 7, "cycle": 1}')
    assert not out.rows and "requires string ids" in out.errors[0][1]


def test_a_message_that_crashes_the_commit_is_isolated_by_bisection(tmp_path):
    """A row that slipped past decoding (checked=True, lone surrogate) must cost only its own message."""
    dec, acks = _decoder(), []
    good = [_msg(dec, json.dumps({"asset_id": f"u{i}", "cycle": 1, "s2": 642.0}).encode(), acks) for i in range(5)]
    evil = Message(source="x", raw=b"evil", rows=[{"asset_id": "\ud800", "cycle": 1, "s2": 642.0}], checked=True,
                   ack=lambda: acks.append(b"evil"))
    c = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", decoder=dec)
    res = c.commit(good[:2] + [evil] + good[2:])
    assert (res.rows_written, res.rows_quarantined, res.isolated) == (5, 1, 1)
    assert len(acks) == 6
    assert _quarantine(tmp_path)[b"evil"][0].startswith("could not be committed (UnicodeEncodeError")
    assert len(_lake(tmp_path)) == 5


def test_a_conflicting_late_row_is_quarantined_with_both_values(tmp_path):
    dec, acks = _decoder(), []
    c = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", decoder=dec)
    c.commit([_msg(dec, json.dumps({"asset_id": "u1", "cycle": 1, "s2": 642.0}).encode(), acks)])
    late = json.dumps({"asset_id": "u1", "cycle": 1, "s2": 650.5}).encode()
    again = json.dumps({"asset_id": "u1", "cycle": 1, "s2": 642.0}).encode()
    res = c.commit([_msg(dec, late, acks), _msg(dec, again, acks)])
    assert (res.rows_written, res.rows_quarantined, res.redelivered) == (0, 1, 1)
    why = _quarantine(tmp_path)[late][0]
    assert why.startswith("conflicts with committed row (asset_id=u1, cycle=1)")
    assert '"s2": 642.0' in why and '"s2": 650.5' in why
    assert _lake(tmp_path, ("asset_id", "cycle", "s2")) == [{"asset_id": "u1", "cycle": 1, "s2": 642.0}]


def test_quality_flags_do_not_depend_on_the_rest_of_the_batch(tmp_path):
    dec, acks = _decoder(), []
    row = {"asset_id": "u1", "cycle": 1, "s2": 642.0}
    other = {"asset_id": "u2", "cycle": 1, "s2": 642.0, "s3": None, "s4": -999.0}
    c1 = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "a", "b1", "twinflow-bridge-b1", decoder=dec)
    c2 = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "b", "b2", "twinflow-bridge-b2", decoder=dec)
    c1.commit([_msg(dec, json.dumps(row).encode(), acks)])
    c2.commit([_msg(dec, json.dumps(row).encode(), acks), _msg(dec, json.dumps(other).encode(), acks)])

    def quality(ds):
        t = lk.read_lake(lk.snapshot(str(tmp_path / "lake"), ds), columns=["asset_id", "quality", "s4"])
        return {r["asset_id"]: (r["quality"], r["s4"]) for r in t.to_pylist()}

    assert quality("a")["u1"] == quality("b")["u1"] == (0, None)
    q, s4 = quality("b")["u2"]
    assert q & C.Quality.MISSING and q & C.Quality.SENTINEL and s4 is None


def test_pumps_rows_map_aliases_and_key_by_timestamp(tmp_path):
    """A non-C-MAPSS fleet: the pumps contract's aliases, units and ranges, keyed by (asset, timestamp)."""
    dec, acks = _decoder("pumps"), []
    rows = [{"machine": "P-101", "ts": "2026-03-01T10:00:00Z", "casing_temp [degC]": 61.5, "flow": 250.0},
            {"pump": "P-101", "timestamp": "2026-03-01T10:10:00+00:00", "casing_temp_c": 62.0,
             "vib_rms": 75.0},  # vibration outside [0, 60] mm/s
            {"machine": "P-102", "ts": 1772359800, "speed [rpm]": 2950, "discharge_pressure [bar]": 12.5}]
    payload = json.dumps(rows).encode()
    c = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", decoder=dec)
    res = c.commit([_msg(dec, payload, acks)])
    assert (res.rows_written, res.rows_quarantined) == (2, 1)
    assert _quarantine(tmp_path)[payload] == ["vibration_mm_s=75 outside valid range [0, 60] mm/s"]
    got = _lake(tmp_path, ("asset_id", "timestamp", "casing_temp_c", "flow_m3h", "speed_rpm"))
    assert [(r["asset_id"], r["timestamp"].isoformat()) for r in got] == [
        ("P-101", "2026-03-01T10:00:00+00:00"), ("P-102", "2026-03-01T10:10:00+00:00")]
    assert got[0]["casing_temp_c"] == 61.5 and got[0]["flow_m3h"] == 250.0 and got[1]["speed_rpm"] == 2950.0
    assert lk.table_contract(str(tmp_path / "lake"), "stream").name == "pumps"
    # The same keys again: redeliveries; a C-MAPSS bridge on this table is refused.
    again = c.commit([_msg(dec, payload, acks)])
    assert (again.rows_written, again.redelivered) == (0, 2)
    from twinflow.errors import ConfigError

    with pytest.raises(ConfigError, match="fleet contract 'pumps'"):
        Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b2", "twinflow-bridge-b2",
                  decoder=_decoder("cmapss"))
