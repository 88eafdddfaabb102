"""Fuzzing the bridge through a real mosquitto (hypothesis): every published row lands in the lake or the
quarantine, exactly once, whatever the payloads (JSON rows, Sparkplug B metrics, poison, garbage)."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinflow import lake as lk
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.decode import DecodeLimits
from twinflow.tasks.bridge.mqtt import create_session
from twinflow.tasks.bridge.run import run_bridge
from twinflow.tasks.bridge.simulate import publish_mqtt
from twinflow.tasks.bridge.sparkplug import encode_payload
from twinflow.tasks.ingest.quarantine import read_quarantine

pytestmark = pytest.mark.integration

_ids = itertools.count(1)

# A row is (fields, lands): what is published and whether the contract accepts it. The cycle is filled
# in per row (unique), so a lake row names the row it came from.
GOOD = st.fixed_dictionaries({"s2": st.floats(450, 700), "s3": st.floats(1100, 1800)},
                             optional={"s4": st.one_of(st.none(), st.floats(900, 1600)),
                                       "s9": st.just(-999.0)}).map(lambda d: (d, True))
BAD = st.one_of(
    st.fixed_dictionaries({"s2": st.floats(701, 1e300)}),                                  # out of range
    st.fixed_dictionaries({"s2": st.text(max_size=5)}),                                   # not a number
    st.fixed_dictionaries({"s3": st.booleans()}),                                         # a bool
    st.fixed_dictionaries({"asset_id": st.one_of(st.booleans(), st.dictionaries(
        st.text(max_size=3), st.integers(), max_size=2), st.lists(st.integers(), max_size=2))}),  # asset type
    st.fixed_dictionaries({"cycle": st.one_of(st.integers(2**31, 2**70), st.integers(max_value=-1),
                                              st.floats(0.1, 0.9), st.text(max_size=4), st.none())}),
    st.just({"asset_id": "\ud800"}),                                                      # lone surrogate
).map(lambda d: (d, False))
# Whole-message poison: one quarantine row for the message, however many rows it would have held.
POISON = st.sampled_from([
    b"[" * 20_000 + b"]" * 20_000, b'{"asset_id": "x", "cycle": ' + b"9" * 5000 + b"}", b"\xff\xfe{",
    b'{"asset_id": "x", "cycle": 1, "s2": ' + b"1" * 400 + b"}", b"[]", b"null", b'"just a string"',
])


def _longest_int(obj) -> int:
    """Digits of the longest integer anywhere in a decoded JSON value."""
    if isinstance(obj, bool):
        return 0
    if isinstance(obj, int):
        return len(str(abs(obj)))
    if isinstance(obj, dict):
        return max((_longest_int(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return max((_longest_int(v) for v in obj), default=0)
    return 0


def _message(rows: list[tuple[dict, bool]], asset: str) -> tuple[bytes, list[tuple[int, bool]], bool]:
    """(payload, [(cycle, lands)], whole message refused): an integer longer than the decoder's limit
    anywhere in a message refuses the whole message before any row is looked at (one quarantine row
    with its raw bytes, like the poison set), so none of its rows land."""
    out, expect = [], []
    for fields, lands in rows:
        cycle = next(_ids)
        row = {"asset_id": asset, "cycle": cycle, **fields}
        out.append(row)
        expect.append((cycle, lands))
    payload = json.dumps(out if len(out) != 1 else out[0]).encode()
    return payload, expect, _longest_int(out) > DecodeLimits().max_int_digits


@pytest.fixture
def bridge(mosquitto, tmp_path, request):
    """A bridge running for the whole test (all its hypothesis examples); ``request.param`` is the format."""
    fmt = getattr(request, "param", "json")
    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    cfg = BridgeConfig(bridge_id="fuzz", batch_rows=200, flush_interval_s=0.1, emit_events=False,
                       mqtt={"host": host, "port": port, "format": fmt,
                             "topics": ["spBv1.0/#"] if fmt == "sparkplug" else ["fuzz/#"]})
    create_session(cfg.mqtt, "twinflow-bridge-fuzz")
    stop, out = threading.Event(), {}

    def run():
        try:
            out["stats"] = run_bridge(cfg, lake, quar, stop=stop, max_seconds=900)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = repr(exc)
            raise

    th = threading.Thread(target=run)
    th.start()
    yield host, port, lake, quar, lambda: out if not th.is_alive() else None
    stop.set()
    th.join(60)
    assert "error" not in out, out


def _account(lake: str, quar: str, asset: str) -> tuple[Counter, Counter]:
    snap = lk.snapshot(lake, "stream")
    keys = Counter()
    if snap is not None:
        t = lk.read_lake(snap, columns=["asset_id", "cycle"])
        keys = Counter(c for a, c in zip(t.column("asset_id").to_pylist(), t.column("cycle").to_pylist()) if a == asset)
    raws = Counter()
    try:
        for r in read_quarantine(quar, "stream").to_pylist():
            raws[base64.b64decode(r["raw"].removeprefix("base64:"))] += 1
    except Exception:  # noqa: BLE001 - nothing quarantined yet
        pass
    return keys, raws


def _check(host, port, lake, quar, dead, asset, messages):
    """Publish (topic, payload, expected lake cycles, expected quarantine rows) and wait for the account."""
    _, before = _account(lake, quar, asset)  # earlier examples may have quarantined the same bytes
    assert publish_mqtt([(t, p) for t, p, _, _ in messages], host=host, port=port) == len(messages)
    want_lake = Counter(c for _, _, cycles, _ in messages for c in cycles)
    want_q = Counter()
    for _, p, _, nq in messages:
        want_q[p] += nq
    deadline = time.monotonic() + 45  # generous: a loaded 2-core machine commits slowly
    while True:
        keys, raws = _account(lake, quar, asset)
        got_q = Counter({p: raws[p] - before[p] for p in want_q})
        if (keys == want_lake and got_q == +want_q) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert dead() is None, f"the bridge stopped: {dead()}"
    assert keys == want_lake, "lake rows differ from the rows that should land (missing or duplicated)"
    assert got_q == +want_q, "quarantine rows differ from the rows that should be quarantined"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(st.one_of(st.lists(st.one_of(GOOD, BAD), min_size=1, max_size=4).map(lambda r: ("rows", r)),
                                POISON.map(lambda p: ("poison", p))), min_size=1, max_size=8))
def test_json_fuzz_every_row_in_the_lake_or_the_quarantine_exactly_once(bridge, batch):
    host, port, lake, quar, dead = bridge
    asset = f"fz{next(_ids)}"
    messages = []
    for kind, item in batch:
        if kind == "poison":
            payload, lands, nq = item, [], 1
        else:
            payload, expect, refused = _message(item, asset)
            lands = [] if refused else [c for c, ok in expect if ok]
            nq = 1 if refused else len(expect) - len(lands)
        messages.append((f"fuzz/{asset}", payload, lands, nq))
    _check(host, port, lake, quar, dead, asset, messages)


@pytest.mark.parametrize("bridge", ["sparkplug"], indirect=True)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(st.one_of(GOOD.map(lambda g: ("metrics", g)), BAD.filter(
    lambda b: "asset_id" not in b[0]).map(lambda b: ("metrics", b)),
    st.binary(min_size=1, max_size=64).map(lambda b: ("garbage", b))), min_size=1, max_size=8))
def test_sparkplug_fuzz_every_row_in_the_lake_or_the_quarantine_exactly_once(bridge, batch):
    host, port, lake, quar, dead = bridge
    asset = f"spfz{next(_ids)}"
    messages = []
    for kind, item in batch:
        topic = f"spBv1.0/plant/DDATA/gw1/{asset}"
        if kind == "garbage":
            # random bytes: one quarantine row (undecodable, or a row without a cycle)
            messages.append((topic, b"\x0a\xff" + item, [], 1))  # repeats count once each
            continue
        fields, lands = item
        cycle = next(_ids)
        metrics = {"cycle": cycle, **fields}
        if any(isinstance(v, str) and not v.isprintable() for v in metrics.values()):
            metrics = {k: (v.encode("ascii", "replace").decode() if isinstance(v, str) else v)
                       for k, v in metrics.items()}
        if isinstance(metrics.get("cycle"), int) and not 0 <= metrics["cycle"] < 2**64:
            metrics["cycle"] = 2**63  # Sparkplug carries 64-bit integers
        payload = encode_payload(metrics, int(time.time() * 1000), 0)
        messages.append((topic, payload, [cycle] if lands else [], 0 if lands else 1))
    _check(host, port, lake, quar, dead, asset, messages)
