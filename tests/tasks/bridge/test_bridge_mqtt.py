"""The MQTT bridge against a real mosquitto on loopback: delivery, Sparkplug B, and kill -9 mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from twinflow import lake as lk
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.mqtt import create_session
from twinflow.tasks.bridge.run import run_bridge
from twinflow.tasks.bridge.simulate import cmapss_rows, mqtt_messages, publish_mqtt
from twinflow.tasks.ingest.quarantine import read_quarantine


def _keys(lake: str, dataset: str = "stream") -> list[tuple[str, int]]:
    snap = lk.snapshot(lake, dataset)
    if snap is None:
        return []
    t = lk.read_lake(snap, columns=["asset_id", "cycle"])
    return list(zip(t.column("asset_id").to_pylist(), t.column("cycle").to_pylist()))


def _run_until(cfg: BridgeConfig, lake: str, quar: str, want_rows: int, timeout: float = 60):
    stop = threading.Event()
    seen = {"rows": 0}

    def on_batch(res):
        seen["rows"] += res.rows_written + res.rows_quarantined
        if seen["rows"] >= want_rows:
            stop.set()

    out = {}
    th = threading.Thread(target=lambda: out.setdefault("stats", run_bridge(cfg, lake, quar, stop=stop,
                                                                            on_batch=on_batch, max_seconds=timeout)))
    th.start()
    return th, stop, out


@pytest.mark.parametrize("fmt", ["json", "sparkplug"])
def test_messages_reach_the_lake_and_bad_ones_the_quarantine(mosquitto, tmp_path, fmt):
    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    topics = ["spBv1.0/#"] if fmt == "sparkplug" else ["twinflow/telemetry/#"]
    cfg = BridgeConfig(bridge_id=f"t-{fmt}", mqtt={"host": host, "port": port, "topics": topics, "format": fmt},
                       batch_rows=50, flush_interval_s=0.2, emit_events=False)
    rows = cmapss_rows(units=3, max_cycles=40)
    msgs = list(mqtt_messages(rows, fmt))
    bad_topic = "spBv1.0/plant/DDATA/gw1/unit-1" if fmt == "sparkplug" else "twinflow/telemetry/unit-1"
    msgs.append((bad_topic, b"\x00garbage\xff"))
    th, stop, out = _run_until(cfg, lake, quar, want_rows=len(msgs))
    deadline = time.monotonic() + 30  # run_bridge holds its lock, then subscribes before committing anything
    while not lk.meta_path(lake, f"bridge-t-{fmt}.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    assert publish_mqtt(msgs, host=host, port=port) == len(msgs)
    th.join(90)
    assert not th.is_alive()
    assert sorted(_keys(lake)) == sorted((r["asset_id"], r["cycle"]) for r in rows)
    q = read_quarantine(quar, "stream").to_pylist()
    assert len(q) == 1 and q[0]["raw"].startswith("base64:")
    t = lk.read_lake(lk.snapshot(lake, "stream"), columns=["asset_id", "cycle", "s2"])
    first = next(r for r in rows if (r["asset_id"], r["cycle"]) == ("unit-1", 1))
    assert t.filter(__import__("pyarrow.compute").compute.equal(t["cycle"], 1)).column("s2").to_pylist()[0] == \
        pytest.approx(first["s2"])


def _bridge_proc(config: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "twinflow.cli", "stream", "run", "--config", config],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_kill_mid_stream_and_restart_loses_and_duplicates_nothing(mosquitto, tmp_path):
    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    config = tmp_path / "bridge.json"
    config.write_text(json.dumps({"bridge_id": "kill", "lake": lake, "quarantine": quar, "emit_events": False,
                                  "batch_rows": 200, "flush_interval_s": 0.3, "compact_every": 5,
                                  "mqtt": {"host": host, "port": port, "topics": ["twinflow/telemetry/#"]}}))
    env = {**os.environ, "PREFECT_API_URL": ""}
    rows = cmapss_rows(units=10, max_cycles=150)  # 1500 messages
    msgs = list(mqtt_messages(rows))
    # The session must exist on the broker before publishing (it then queues for the bridge): a
    # bridge that had not yet subscribed when the publisher started lost the first messages once.
    create_session(BridgeConfig.model_validate_json(config.read_text()).mqtt, "twinflow-bridge-kill")
    proc = _bridge_proc(str(config), env)
    deadline = time.monotonic() + 60
    done = threading.Event()
    sent = {"n": 0}

    def publisher():
        sent["n"] = publish_mqtt(msgs, host=host, port=port, rate=400)
        done.set()

    started = False
    while time.monotonic() < deadline and not started:
        time.sleep(0.2)
        started = (lk.meta_path(lake, "bridge-kill.lock")).exists()
    assert started, proc.stdout.read().decode()[-2000:] if proc.poll() is not None else "bridge did not start"
    time.sleep(1.0)
    th = threading.Thread(target=publisher)
    th.start()
    # kill -9 once part of the stream is in the lake, while messages are still flowing
    while time.monotonic() < deadline and len(_keys(lake)) < 300:
        time.sleep(0.1)
    assert not done.is_set(), "the stream ended before the kill; slow the publisher down"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    killed_at = len(_keys(lake))
    assert 0 < killed_at < len(msgs)
    th.join(120)
    assert sent["n"] == len(msgs)
    proc = _bridge_proc(str(config), env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_keys(lake)) < len(msgs):
        time.sleep(0.3)
    time.sleep(2.0)  # anything extra (a duplicate) would land now
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    keys = _keys(lake)
    assert len(keys) == len(set(keys)), "duplicate rows in the lake"
    assert sorted(keys) == sorted((r["asset_id"], r["cycle"]) for r in rows)
    assert read_quarantine(quar, "stream").num_rows == 0
