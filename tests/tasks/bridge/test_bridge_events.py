"""Bridge events: the exact "enough new data" rule across restarts and crashes, and the events a real
Prefect server receives from a bridge fed by a real mosquitto."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from service_procs import wait_for
from twinflow import events as ev
from twinflow import lake as lk
from twinflow.tasks.bridge.buffer import Message
from twinflow.tasks.bridge.commit import Committer
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.events import ReadyTracker, ready_state_path
from twinflow.tasks.bridge.run import run_bridge
from twinflow.tasks.bridge.simulate import cmapss_rows, mqtt_messages, publish_mqtt


def _batch(rows: list[tuple[str, int]]) -> list[Message]:
    out = []
    for asset, cycle in rows:
        raw = json.dumps({"asset_id": asset, "cycle": cycle, "s2": 642.0, "s3": 1590.0}).encode()
        out.append(Message(source="test", raw=raw, rows=[json.loads(raw)]))
    return out


def _cycles(asset: str, first: int, n: int) -> list[tuple[str, int]]:
    return [(asset, c) for c in range(first, first + n)]


def test_ready_rule_is_exact_and_its_counts_survive_restarts_and_crashes(tmp_path):
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    committer = Committer(lake, quar, "stream", "b1", "twinflow-bridge-b1")

    def tracker():  # N = 3 new cycles, M = 2 assets; emit off: no API here, the payloads are kept
        return ReadyTracker(lake, "stream", "b1", min_cycles=3, min_assets=2, emit=False)

    t = tracker()
    assert t.add(committer.commit(_batch(_cycles("u1", 1, 2) + _cycles("u2", 1, 1)))) is None
    # u1 reaches 3, but only one asset is ready: not yet.
    assert t.add(committer.commit(_batch(_cycles("u1", 3, 1) + _cycles("u2", 2, 1)))) is None
    assert t.counts == {"u1": 3, "u2": 2}

    t = tracker()  # a restart remembers the counts
    assert t.counts == {"u1": 3, "u2": 2}
    # Redelivered rows are not new cycles: u2's cycle 2 again counts nothing, cycle 3 counts one.
    res = committer.commit(_batch([("u2", 2), ("u2", 3), ("u3", 1)]))
    assert res.redelivered == 1
    payload = t.add(res)
    assert payload is not None and payload["version"] == res.version == lk.version(lake, "stream")
    assert payload["assets"] == {"u1": 3, "u2": 3} and payload["counts"] == {"u1": 3, "u2": 3, "u3": 1}
    assert t.counts == {}  # counting starts again after the event

    # A crash after a commit, before its counts were saved: the restart adds it from the table history,
    # and a compaction commit in between counts nothing.
    committer.commit(_batch(_cycles("u1", 4, 3) + _cycles("u3", 2, 2)))
    committer.compact()
    t = tracker()
    assert t.counts == {"u1": 3, "u3": 2} and t.events == []  # only one asset is ready: no event
    state = json.loads(ready_state_path(lake, "b1").read_text())
    assert state["version"] == lk.version(lake, "stream") and state["counts"] == {"u1": 3, "u3": 2}


def test_crashed_batch_is_counted_after_restart(tmp_path):
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    committer = Committer(lake, quar, "stream", "b1", "twinflow-bridge-b1")
    t = ReadyTracker(lake, "stream", "b1", min_cycles=3, min_assets=2, emit=False)
    t.add(committer.commit(_batch(_cycles("u1", 1, 1))))
    # Two commits the tracker never saw (the bridge died after each commit, before saving)...
    committer.commit(_batch(_cycles("u1", 2, 1) + _cycles("u2", 1, 2)))
    committer.compact()
    last = committer.commit(_batch(_cycles("u1", 3, 1)))
    # ...and a commit by another bridge on the same dataset, which is not this bridge's data.
    Committer(lake, quar, "stream", "b2", "twinflow-bridge-b2").commit(_batch(_cycles("u9", 1, 5)))
    t = ReadyTracker(lake, "stream", "b1", min_cycles=2, min_assets=2, emit=False)
    # u1 1 + 1 + 1 = 3 (>= 2), u2 2 (>= 2): the rule held at the last missed batch -> its event now.
    assert len(t.events) == 1 and t.events[0]["assets"] == {"u1": 3, "u2": 2}
    assert t.events[0]["version"] == last.version and t.counts == {}


@pytest.mark.integration
def test_the_prefect_server_receives_one_event_per_batch_and_the_ready_events(prefect_api, mosquitto, tmp_path):
    host, port = mosquitto
    dataset = f"stream_{uuid.uuid4().hex[:8]}"  # the session's server keeps other tests' events
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    cfg = BridgeConfig(bridge_id="ev", dataset=dataset, batch_rows=40, flush_interval_s=0.2,
                       mqtt={"host": host, "port": port, "topics": ["twinflow/telemetry/#"]},
                       ready_min_cycles=12, ready_min_assets=2)
    rows = cmapss_rows(units=3, max_cycles=30)
    batches = []
    stop = threading.Event()

    def on_batch(res):
        batches.append(res)
        if sum(b.rows_written for b in batches) >= len(rows):
            stop.set()

    out = {}
    th = threading.Thread(target=lambda: out.setdefault(
        "stats", run_bridge(cfg, lake, quar, stop=stop, on_batch=on_batch, max_seconds=90)))
    th.start()
    assert wait_for(lambda: lk.meta_path(lake, "bridge-ev.lock").exists(), 30, 0.05)
    time.sleep(1.5)  # subscribed (the bridge subscribes right after taking its lock)
    assert publish_mqtt(list(mqtt_messages(rows)), host=host, port=port, rate=300) == len(rows)
    th.join(120)
    assert not th.is_alive()
    stats = out["stats"]
    ev.flush()

    committed = [b for b in batches if b.rows_written]
    want = len(committed) + len(stats.ready.events)
    got = wait_for(lambda: (lambda es: es if len(es) >= want else None)(
        ev.read_events(["twinflow.stream.*"], resource_prefix=f"twinflow.dataset.{dataset}")), 60)
    assert got, "the events did not reach the server"
    batch_events = [e for e in got if e.event == ev.BATCH_COMMITTED]
    ready_events = [e for e in got if e.event == ev.DATA_READY]
    assert len(batch_events) == len(committed) >= 2
    assert {e.resource.id for e in got} == {f"twinflow.dataset.{dataset}"}
    # One event per batch, each with that batch's version; together they hold exactly the lake's rows.
    by_seq = {e.payload["seq"]: e.payload for e in batch_events}
    assert sorted(by_seq) == [b.seq for b in committed]
    for b in committed:
        assert by_seq[b.seq]["version"] == b.version and by_seq[b.seq]["assets"] == b.assets
    table = lk.read_lake(lk.snapshot(lake, dataset), columns=["asset_id"]).column("asset_id").to_pylist()
    per_asset: dict[str, int] = {}
    for p in by_seq.values():
        for a, n in p["assets"].items():
            per_asset[a] = per_asset.get(a, 0) + n
    assert per_asset == {a: table.count(a) for a in set(table)} and sum(per_asset.values()) == len(rows)
    assert max(p["version"] for p in by_seq.values()) == lk.version(lake, dataset)
    # Ready events: each met the rule, and with what is still counted they add up to every new cycle.
    assert ready_events, "3 assets x 30 cycles with N=12, M=2 must make data ready"
    assert [e.payload for e in ready_events] == stats.ready.events
    counted = dict(stats.ready.counts)
    for e in ready_events:
        assert len(e.payload["assets"]) >= 2 and min(e.payload["assets"].values()) >= 12
        assert e.payload["version"] in {b.version for b in committed}
        for a, n in e.payload["counts"].items():
            counted[a] = counted.get(a, 0) + n
    assert counted == per_asset
