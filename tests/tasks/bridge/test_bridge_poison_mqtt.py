"""Through a real mosquitto: the poison set with canaries, a non-C-MAPSS fleet (pumps), liveness and status."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import pytest

from twinflow import lake as lk
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.events import read_status
from twinflow.tasks.bridge.mqtt import create_session
from twinflow.tasks.bridge.run import SourceDied, run_bridge
from twinflow.tasks.bridge.simulate import publish_mqtt
from twinflow.tasks.bridge.sparkplug import encode_payload
from twinflow.tasks.ingest.quarantine import read_quarantine


def _rows(lake: str, columns: list[str]) -> list[dict]:
    snap = lk.snapshot(lake, "stream")
    return [] if snap is None else lk.read_lake(snap, columns=columns).to_pylist()


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def _start(cfg: BridgeConfig, lake: str, quar: str, **kw) -> tuple[threading.Thread, threading.Event, dict]:
    create_session(cfg.mqtt, cfg.mqtt.client_id or f"twinflow-bridge-{cfg.bridge_id}")
    stop, out = threading.Event(), {}

    def run():
        try:
            out["stats"] = run_bridge(cfg, lake, quar, stop=stop, max_seconds=120, **kw)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            out["error"] = exc

    th = threading.Thread(target=run)
    th.start()
    return th, stop, out


def test_after_every_poison_message_the_canary_lands(mosquitto, tmp_path, poison):
    POISON = poison
    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    cfg = BridgeConfig(bridge_id="poison", mqtt={"host": host, "port": port, "topics": ["plant/#"]},
                       batch_rows=100, flush_interval_s=0.1, emit_events=False)
    th, stop, out = _start(cfg, lake, quar)
    try:
        for i, (name, payload) in enumerate(sorted(POISON.items())):
            canary = json.dumps({"asset_id": "canary", "cycle": i + 1, "s2": 642.0}).encode()
            assert publish_mqtt([("plant/poison", payload), ("plant/canary", canary)], host=host, port=port) == 2
            assert _wait(lambda: len(_rows(lake, ["cycle"])) == i + 1, 15), f"no canary after {name}: {out}"
    finally:
        stop.set()
        th.join(60)
    assert "error" not in out and out["stats"].rows_quarantined == len(POISON)
    q = read_quarantine(quar, "stream")
    assert q.num_rows == len(POISON)
    assert sorted(r["cycle"] for r in _rows(lake, ["cycle"])) == list(range(1, len(POISON) + 1))


@pytest.mark.parametrize("fmt", ["json", "sparkplug"])
def test_a_pumps_fleet_maps_its_own_channels_through_mosquitto(mosquitto, tmp_path, fmt):
    """Issue 24: metric names / JSON keys are the pumps contract's channels and aliases, keyed by timestamp."""
    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    topics = ["spBv1.0/#"] if fmt == "sparkplug" else ["pumps/#"]
    cfg = BridgeConfig(bridge_id=f"pumps-{fmt}", contract="pumps", batch_rows=50, flush_interval_s=0.2,
                       emit_events=False, mqtt={"host": host, "port": port, "topics": topics, "format": fmt})
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp()
    msgs, want = [], set()
    for k in range(20):
        for pump in ("P-101", "P-102"):
            ts = t0 + 600 * k
            values = {"casing_temp [degC]": 60.0 + k * 0.1, "flow": 240.0 + k, "vib_rms": 2.5,
                      "speed [rpm]": 2950, "discharge_pressure_bar": 12.0}
            if fmt == "sparkplug":
                msgs.append((f"spBv1.0/plant/DDATA/gw1/{pump}", encode_payload(values, int(ts * 1000), k % 256)))
            else:
                msgs.append((f"pumps/{pump}", json.dumps({"machine": pump, "ts": datetime.fromtimestamp(
                    ts, timezone.utc).isoformat(), **values}).encode()))
            want.add((pump, int(ts)))
    bad_values = {"casing_temp [degC]": 400.0, "flow": 240.0}  # casing temperature outside [-20, 160] degC
    if fmt == "sparkplug":
        msgs.append(("spBv1.0/plant/DDATA/gw1/P-101", encode_payload(bad_values, int((t0 + 99_999) * 1000), 1)))
    else:
        msgs.append(("pumps/P-101", json.dumps({"machine": "P-101", "ts": t0 + 99_999, **bad_values}).encode()))
    th, stop, out = _start(cfg, lake, quar)
    try:
        assert publish_mqtt(msgs, host=host, port=port) == len(msgs)
        assert _wait(lambda: len(_rows(lake, ["asset_id"])) == len(want) and
                     read_quarantine(quar, "stream").num_rows == 1, 30)
    finally:
        stop.set()
        th.join(60)
    rows = _rows(lake, ["asset_id", "timestamp", "casing_temp_c", "flow_m3h", "vibration_mm_s", "speed_rpm"])
    assert {(r["asset_id"], int(r["timestamp"].timestamp())) for r in rows} == want
    first = next(r for r in rows if r["asset_id"] == "P-101" and r["timestamp"].timestamp() == t0)
    assert (first["casing_temp_c"], first["flow_m3h"], first["vibration_mm_s"], first["speed_rpm"]) == \
        (60.0, 240.0, 2.5, 2950.0)
    q = read_quarantine(quar, "stream").to_pylist()
    assert q[0]["reason"] == "casing_temp_c=400 outside valid range [-20, 160] degC"
    assert lk.table_contract(lake, "stream").name == "pumps"


def test_a_dead_source_ends_the_bridge_with_its_reason(mosquitto, tmp_path):
    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    cfg = BridgeConfig(bridge_id="dies", mqtt={"host": host, "port": port, "topics": ["plant/#"]},
                       flush_interval_s=0.1, emit_events=False)
    th, stop, out = _start(cfg, lake, quar, on_start=lambda sources: sources[0].client.loop_stop())
    th.join(60)
    assert not th.is_alive()
    stop.set()
    assert isinstance(out.get("error"), SourceDied)
    assert "MQTT source mqtt://127.0.0.1" in str(out["error"]) and "network thread stopped" in str(out["error"])
    status = read_status(lake, "dies")
    assert status["state"] == "failed" and "network thread stopped" in status["reason"]
    # `twinflow stream status` shows it and exits 1
    import subprocess
    import sys

    config = tmp_path / "bridge.json"
    config.write_text(json.dumps({"bridge_id": "dies", "lake": lake, "mqtt": {"host": host, "port": port}}))
    proc = subprocess.run([sys.executable, "-m", "twinflow.cli", "stream", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["state"] == "failed" and shown["sources"][0]["kind"] == "mqtt" and not shown["sources"][0]["alive"]


def test_a_dead_source_is_restarted_when_configured_and_status_shows_it(mosquitto, tmp_path):
    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    cfg = BridgeConfig(bridge_id="again", mqtt={"host": host, "port": port, "topics": ["plant/#"]},
                       flush_interval_s=0.1, emit_events=False, source_failure="restart", heartbeat_s=0.2)
    th, stop, out = _start(cfg, lake, quar, on_start=lambda sources: sources[0].client.loop_stop())
    try:
        assert _wait(lambda: (read_status(lake, "again") or {}).get("source_restarts") == 1, 20)
        assert publish_mqtt([("plant/u1", json.dumps({"asset_id": "u1", "cycle": 1}).encode())],
                            host=host, port=port) == 1
        assert _wait(lambda: len(_rows(lake, ["cycle"])) == 1, 15)
        assert _wait(lambda: (read_status(lake, "again") or {}).get("last_commit") is not None, 5)
        st = read_status(lake, "again")
        assert st["state"] == "running" and st["sources"][0]["alive"] and st["sources"][0]["connected"]
    finally:
        stop.set()
        th.join(60)
    assert "error" not in out
    assert read_status(lake, "again")["state"] == "stopped"


@pytest.mark.slow
def test_sigkill_with_poison_in_flight_then_restart_does_not_crash_loop(mosquitto, tmp_path, poison):
    import os
    import signal
    import subprocess
    import sys

    from twinflow.tasks.bridge.simulate import cmapss_rows, mqtt_messages

    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    config = tmp_path / "bridge.json"
    config.write_text(json.dumps({"bridge_id": "pk", "lake": lake, "quarantine": quar, "emit_events": False,
                                  "batch_rows": 100, "flush_interval_s": 0.2,
                                  "mqtt": {"host": host, "port": port, "topics": ["twinflow/telemetry/#"]}}))
    env = {**os.environ, "PREFECT_API_URL": ""}
    rows = cmapss_rows(units=4, max_cycles=100)
    msgs = list(mqtt_messages(rows))
    bad = [("twinflow/telemetry/poison", p) for p in poison.values()]
    for i, m in enumerate(bad):  # poison spread through the stream, so some is in flight at the kill
        msgs.insert(40 + i * 70, m)
    create_session(BridgeConfig.model_validate_json(config.read_text()).mqtt, "twinflow-bridge-pk")

    def start():
        return subprocess.Popen([sys.executable, "-m", "twinflow.cli", "stream", "run", "--config", str(config)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    proc = start()
    assert _wait(lambda: lk.meta_path(lake, "bridge-pk.lock").exists(), 60)
    done = threading.Event()
    th = threading.Thread(target=lambda: (publish_mqtt(msgs, host=host, port=port, rate=300), done.set()))
    th.start()
    assert _wait(lambda: len(_rows(lake, ["cycle"])) >= 100, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    th.join(120)
    assert done.is_set()
    proc = start()  # twice in a row: a crash loop would end it with an error here
    try:
        assert _wait(lambda: len(_rows(lake, ["cycle"])) >= len(rows) or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    keys = [(r["asset_id"], r["cycle"]) for r in _rows(lake, ["asset_id", "cycle"])]
    assert sorted(keys) == sorted((r["asset_id"], r["cycle"]) for r in rows)
    import base64

    q = {base64.b64decode(r["raw"].removeprefix("base64:")) for r in read_quarantine(quar, "stream").to_pylist()}
    assert q == set(poison.values())  # each poison quarantined (at least once), nothing else
