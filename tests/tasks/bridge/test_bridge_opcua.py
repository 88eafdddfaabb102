"""The OPC UA bridge: config validation, row assembly, and a real asyncua server on loopback (delivery,
quarantine of bad values, reconnect after the server went away, kill -9 of the bridge mid-stream)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from twinflow import lake as lk
from twinflow.errors import ConfigError
from twinflow.tasks.bridge.config import BridgeConfig, load_config
from twinflow.tasks.bridge.opcua import RowAssembler
from twinflow.tasks.bridge.run import run_bridge
from twinflow.tasks.bridge.simulate import OpcuaPlant, cmapss_rows
from twinflow.tasks.ingest.quarantine import read_quarantine




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHANNELS = ["s2", "s3", "s4", "s7"]
ASSETS = ["unit-1", "unit-2", "unit-3"]


def _nodes(asset: str = "u1", cols=("cycle", "s2", "s3")) -> list[dict]:
    return [{"node_id": f"ns=2;s={asset}.{c}", "asset": asset, "column": c} for c in cols]


# --- config ---------------------------------------------------------------------------------------

def test_opcua_config_is_validated(tmp_path):
    cfg = BridgeConfig(opcua={"endpoint": "opc.tcp://127.0.0.1:4841/x", "nodes": _nodes() + _nodes("u2")})
    assert len(cfg.opcua.nodes) == 6 and cfg.mqtt is None
    bad = {
        "no cycle node": ({"nodes": [n for n in _nodes() if n["column"] != "cycle"]}, "no 'cycle' node"),
        "node twice": ({"nodes": _nodes() + [{"node_id": "ns=2;s=u1.s2", "asset": "u9", "column": "s2"}]},
                       "mapped twice"),
        "same id, other spelling": ({"nodes": _nodes("u1", ("cycle",)) + [
            {"node_id": "ns=2;i=7", "asset": "u1", "column": "s2"},
            {"node_id": "ns=2;i=0007", "asset": "u1", "column": "s3"}]}, "mapped twice"),
        "column twice": ({"nodes": _nodes() + [{"node_id": "ns=2;s=other", "asset": "u1", "column": "s2"}]},
                         "two nodes for column 's2'"),
        "unknown column": ({"nodes": _nodes("u1", ("cycle", "rpm"))}, "not a channel"),
        "bad node id": ({"nodes": _nodes() + [{"node_id": "nonsense;;", "asset": "u1", "column": "s4"}]},
                        "not an OPC UA node id"),
        "no nodes": ({"nodes": []}, "at least 1"),
        "not opc.tcp": ({"endpoint": "http://x", "nodes": _nodes()}, "opc"),
    }
    for name, (section, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            BridgeConfig(opcua=section)
        p = tmp_path / f"{name.replace(' ', '_')}.json"
        p.write_text(json.dumps({"opcua": section}))
        with pytest.raises(ConfigError, match="opcua"):
            load_config(p)
    p = tmp_path / "ok.yaml"
    p.write_text("bridge_id: plant\nopcua:\n  endpoint: opc.tcp://h:4840\n  nodes:\n"
                 + "".join(f"  - {{node_id: '{n['node_id']}', asset: {n['asset']}, column: {n['column']}}}\n"
                           for n in _nodes()))
    assert [n.column for n in load_config(p).opcua.nodes] == ["cycle", "s2", "s3"]


# --- row assembly (pure, real asyncua DataValues) ------------------------------------------------

def _dv(value, ts, vt=None, status=None):
    from asyncua import ua

    if vt is None:
        vt = ua.VariantType.Int64 if isinstance(value, int) else ua.VariantType.Double
    dv = ua.DataValue(ua.Variant(value, getattr(ua.VariantType, vt) if isinstance(vt, str) else vt),
                      SourceTimestamp=ts)
    if status is not None:
        dv.StatusCode = ua.StatusCode(status)
    return dv


def test_assembler_builds_rows_flushes_stale_partials_and_quarantines_bad_values():
    from asyncua import ua

    out = []
    a = RowAssembler(BridgeConfig(opcua={"nodes": _nodes()}).opcua.nodes, out.append, "opc.tcp://t")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ts = [t0 + timedelta(seconds=i) for i in range(6)]
    a.add("ns=2;s=u1.s2", _dv(0.0, ts[0], status=ua.StatusCodes.BadWaitingForInitialData))  # no value yet
    # row 1 complete, whatever the order of its values
    a.add("ns=2;s=u1.s3", _dv(1590.5, ts[1]))
    a.add("ns=2;s=u1.s2", _dv(642.5, ts[1]))
    assert out == []
    a.add("ns=2;s=u1.cycle", _dv(1, ts[1]))
    assert [m.rows for m in out] == [[{"asset_id": "u1", "cycle": 1, "s2": 642.5, "s3": 1590.5}]]
    # row 2 lacks s3; row 3 completes: row 2 cannot get more values and goes out as it is, first
    a.add("ns=2;s=u1.cycle", _dv(2, ts[2]))
    a.add("ns=2;s=u1.s2", _dv(642.6, ts[2]))
    for c, v in (("cycle", 3), ("s2", 642.7), ("s3", 1591.0)):
        a.add(f"ns=2;s=u1.{c}", _dv(v, ts[3]))
    assert [m.rows for m in out[1:]] == [[{"asset_id": "u1", "cycle": 2, "s2": 642.6}],
                                         [{"asset_id": "u1", "cycle": 3, "s2": 642.7, "s3": 1591.0}]]
    # a value at or before the last emitted row (a history/live overlap) is dropped
    a.add("ns=2;s=u1.s2", _dv(1.0, ts[3]))
    a.add("ns=2;s=u1.cycle", _dv(1, ts[1]))
    assert len(out) == 3 and not a.pending["u1"]
    # NaN, a string in a channel, a bad status, a fractional cycle: the row is quarantined with reasons
    for c, v, vt in (("cycle", 4.5, "Double"), ("s2", float("nan"), "Double"), ("s3", "hot", "String")):
        a.add(f"ns=2;s=u1.{c}", _dv(v, ts[4], vt))
    bad = out[3]
    assert bad.rows == [] and "cycle 4.5 is not an integer" in bad.error and "s2=nan is not a finite number" in \
        bad.error and "s3='hot' is not a number" in bad.error
    raw = json.loads(bad.raw)
    assert raw["values"]["ns=2;s=u1.s3"] == {"column": "s3", "value": "'hot'", "type": "String", "status": "Good"}
    for c, v in (("cycle", 5), ("s2", 642.0)):
        a.add(f"ns=2;s=u1.{c}", _dv(v, ts[5]))
    a.add("ns=2;s=u1.s3", _dv(1.0, ts[5], status=ua.StatusCodes.BadSensorFailure))
    assert "status BadSensorFailure" in out[4].error
    a.add("ns=2;s=elsewhere", _dv(1.0, ts[5]))
    assert "not in the bridge's node map" in out[5].error


def test_assembler_does_not_wait_forever_for_a_silent_or_unmonitorable_column():
    out = []
    a = RowAssembler(BridgeConfig(opcua={"nodes": _nodes()}).opcua.nodes, out.append, "opc.tcp://t")
    a.max_pending = 2
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(1, 4):  # s3 never reports
        a.add("ns=2;s=u1.cycle", _dv(i, t0 + timedelta(seconds=i)))
        a.add("ns=2;s=u1.s2", _dv(640.0 + i, t0 + timedelta(seconds=i)))
    assert [m.rows for m in out] == [[{"asset_id": "u1", "cycle": 1, "s2": 641.0}]]
    a.drop_column("ns=2;s=u1.s3")  # e.g. the server refused to monitor it
    a.drop_column("ns=2;s=u1.cycle")  # the key is never dropped
    a.add("ns=2;s=u1.cycle", _dv(4, t0 + timedelta(seconds=4)))  # 3 pending > 2: the oldest goes out
    assert [m.rows[0]["cycle"] for m in out] == [1, 2]
    a.add("ns=2;s=u1.s2", _dv(644.0, t0 + timedelta(seconds=4)))
    assert [m.rows[0]["cycle"] for m in out] == [1, 2, 3, 4] and out[-1].rows[0]["s2"] == 644.0


# --- a real server --------------------------------------------------------------------------------

def _lake_rows(lake: str) -> dict[tuple[str, int], dict]:
    snap = lk.snapshot(lake, "stream")
    if snap is None:
        return {}
    t = lk.read_lake(snap, columns=["asset_id", "cycle", *CHANNELS]).to_pylist()
    return {(r["asset_id"], r["cycle"]): r for r in t}


def _keys(lake: str) -> list[tuple[str, int]]:
    snap = lk.snapshot(lake, "stream")
    if snap is None:
        return []
    t = lk.read_lake(snap, columns=["asset_id", "cycle"])
    return list(zip(t.column("asset_id").to_pylist(), t.column("cycle").to_pylist()))


def _expected(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["asset_id"], r["cycle"]): {k: r[k] for k in ["asset_id", "cycle", *CHANNELS]} for r in rows}


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def plant():
    """An asyncua server (3 units x cycle + 4 channels) on a free loopback port."""
    p = OpcuaPlant(f"opc.tcp://127.0.0.1:{free_port()}/twinflow/sim", ASSETS, CHANNELS).start()
    yield p
    p.stop()


def _bridge_thread(cfg: BridgeConfig, lake: str, quar: str):
    stop = threading.Event()
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("stats", run_bridge(cfg, lake, quar, stop=stop,
                                                                            max_seconds=120)))
    th.start()
    return th, stop, out


@pytest.mark.integration
def test_rows_reach_the_lake_exactly_and_bad_values_the_quarantine(tmp_path):
    from asyncua import ua

    # s3 nodes accept any type, as on a server that does not type-check: a string reaches the bridge
    plant = OpcuaPlant(f"opc.tcp://127.0.0.1:{free_port()}/twinflow/sim", ASSETS, CHANNELS, untyped=("s3",)).start()
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    rows = cmapss_rows(units=3, max_cycles=30)
    plant.publish_rows(rows[:30])  # before the bridge starts: it reads these from the history
    cfg = BridgeConfig(bridge_id="opc", opcua=plant.bridge_config(publishing_interval_ms=20),
                       batch_rows=25, flush_interval_s=0.2, emit_events=False)
    th, stop, out = _bridge_thread(cfg, lake, quar)
    try:
        _wait(lambda: len(_keys(lake)) >= 30, 60, "the history catch-up")
        plant.publish_rows(rows[30:60], rate=100)
        # bad samples: NaN in a channel, a string in a channel node
        plant.write("unit-1", {"cycle": 1000, "s2": float("nan"), "s3": 1590.0, "s4": 1400.0, "s7": 550.0})
        plant.write("unit-2", {"cycle": 1000, "s2": 642.0, "s3": ua.Variant("hot", ua.VariantType.String),
                               "s4": 1400.0, "s7": 550.0})
        plant.publish_rows(rows[60:], rate=100)
        _wait(lambda: len(_keys(lake)) >= len(rows), 60, "all rows in the lake")
        _wait(lambda: (read_quarantine(quar, "stream").num_rows if (tmp_path / "q").exists() else 0) >= 2, 30,
              "the quarantine")
    finally:
        stop.set()
        th.join(60)
        plant.stop()
    assert not th.is_alive()
    keys = _keys(lake)
    assert len(keys) == len(set(keys)) == len(rows)
    assert _lake_rows(lake) == _expected(rows)  # values exactly: doubles travel unchanged
    q = {r["reason"]: json.loads(base64.b64decode(r["raw"].removeprefix("base64:"))) for r in
         read_quarantine(quar, "stream").to_pylist()}
    assert len(q) == 2
    nan_reason = next(k for k in q if "s2=nan is not a finite number" in k)
    assert "unit-1.s2" in nan_reason and q[nan_reason]["asset"] == "unit-1"
    str_reason = next(k for k in q if "s3='hot' is not a number" in k)
    assert q[str_reason]["values"][plant.nodes[("unit-2", "s3")].to_string()]["type"] == "String"
    assert out["stats"].rows_written == len(rows)


@pytest.mark.integration
def test_bridge_reconnects_when_the_server_comes_back(tmp_path):
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/twinflow/sim"
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    rows = cmapss_rows(units=3, max_cycles=20)
    first = OpcuaPlant(endpoint, ASSETS, CHANNELS).start()
    cfg = BridgeConfig(bridge_id="reco", opcua=first.bridge_config(health_interval_s=0.2, reconnect_min_s=0.2,
                                                                   reconnect_max_s=1.0, request_timeout_s=1.0),
                       batch_rows=10, flush_interval_s=0.2, emit_events=False)
    th, stop, _ = _bridge_thread(cfg, lake, quar)
    second = None
    try:
        first.publish_rows(rows[:30], rate=100)
        _wait(lambda: len(_keys(lake)) >= 30, 60, "the first rows")
        first.stop()
        time.sleep(2.0)  # the bridge notices and backs off while nothing listens
        second = OpcuaPlant(endpoint, ASSETS, CHANNELS).start()  # the same node ids, a fresh history
        second.publish_rows(rows[30:], rate=100)
        _wait(lambda: len(_keys(lake)) >= len(rows), 60, "the rows after the reconnect")
    finally:
        stop.set()
        th.join(60)
        first.stop()
        if second is not None:
            second.stop()
    keys = _keys(lake)
    assert sorted(keys) == sorted((r["asset_id"], r["cycle"]) for r in rows)


def _bridge_proc(config: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "twinflow.cli", "stream", "bridge", "--config", config],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.integration
def test_kill_bridge_mid_stream_and_restart_loses_and_duplicates_nothing(plant, tmp_path):
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    config = tmp_path / "bridge.json"
    config.write_text(json.dumps({"bridge_id": "kill", "lake": lake, "quarantine": quar, "emit_events": False,
                                  "batch_rows": 30, "flush_interval_s": 0.2, "compact_every": 5,
                                  "opcua": plant.bridge_config(publishing_interval_ms=20)}))
    env = {**os.environ, "PREFECT_API_URL": ""}
    rows = cmapss_rows(units=3, max_cycles=150)  # 450 rows
    proc = _bridge_proc(str(config), env)
    done = threading.Event()
    sent = {"n": 0}

    def publisher():
        try:
            sent["n"] = plant.publish_rows(rows, rate=40)
        finally:
            done.set()

    try:
        _wait(lambda: lk.meta_path(lake, "bridge-kill.lock").exists() or proc.poll() is not None, 60,
              "the bridge to start")
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        th = threading.Thread(target=publisher)
        th.start()
        _wait(lambda: len(_keys(lake)) >= 100, 60, "part of the stream in the lake")
        assert not done.is_set(), "the stream ended before the kill; slow the publisher down"
        os.kill(proc.pid, signal.SIGKILL)  # the server keeps publishing
        proc.wait(10)
        killed_at = len(_keys(lake))
        assert 0 < killed_at < len(rows)
        time.sleep(1.0)
        assert not done.is_set(), "the stream ended while the bridge was down; slow the publisher down"
        proc = _bridge_proc(str(config), env)  # restarted mid-stream: history catch-up, then live
        th.join(120)
        assert sent["n"] == len(rows)
        _wait(lambda: len(_keys(lake)) >= len(rows), 120, "all rows after the restart")
        time.sleep(2.0)  # anything extra (a duplicate) would land now
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    keys = _keys(lake)
    assert len(keys) == len(set(keys)), "duplicate rows in the lake"
    assert _lake_rows(lake) == _expected(rows)
    assert not (tmp_path / "q").exists() or read_quarantine(quar, "stream").num_rows == 0


@pytest.mark.integration
def test_simulate_cli_serves_nodes_and_writes_the_bridge_config(tmp_path):
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/twinflow/sim"
    cfg_path = tmp_path / "bridge.json"
    proc = subprocess.Popen([sys.executable, "-m", "twinflow.cli", "stream", "simulate", "--opcua", endpoint,
                             "--units", "2", "--max-cycles", "15", "--rate", "200", "--channels", "s2,s3",
                             "--write-config", str(cfg_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PREFECT_API_URL": ""})
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    try:
        _wait(lambda: cfg_path.exists() or proc.poll() is not None, 60, "the simulator")
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        cfg = load_config(cfg_path)
        assert {(n.asset, n.column) for n in cfg.opcua.nodes} == {(f"unit-{u}", c) for u in (1, 2)
                                                                  for c in ("cycle", "s2", "s3")}
        cfg = cfg.model_copy(update={"batch_rows": 10, "flush_interval_s": 0.2, "emit_events": False})
        th, stop, _ = _bridge_thread(cfg, lake, quar)
        try:
            _wait(lambda: len(_keys(lake)) >= 30, 60, "the simulated rows")
        finally:
            stop.set()
            th.join(60)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"published": 30}
    rows = cmapss_rows(units=2, max_cycles=15)
    snap = lk.read_lake(lk.snapshot(lake, "stream"), columns=["asset_id", "cycle", "s2", "s3"]).to_pylist()
    assert {(r["asset_id"], r["cycle"]): (r["s2"], r["s3"]) for r in snap} == \
        {(r["asset_id"], r["cycle"]): (r["s2"], r["s3"]) for r in rows}


@pytest.mark.integration
def test_one_bridge_runs_mqtt_and_opcua_sources_together(plant, mosquitto, tmp_path):
    from twinflow.tasks.bridge.simulate import mqtt_messages, publish_mqtt

    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    opc_rows = cmapss_rows(units=3, max_cycles=10)
    mqtt_rows = cmapss_rows(units=2, max_cycles=10, asset_prefix="mqtt-unit-")
    cfg = BridgeConfig(bridge_id="both", opcua=plant.bridge_config(), batch_rows=20, flush_interval_s=0.2,
                       mqtt={"host": host, "port": port, "topics": ["twinflow/telemetry/#"]}, emit_events=False)
    th, stop, _ = _bridge_thread(cfg, lake, quar)
    try:
        _wait(lambda: lk.meta_path(lake, "bridge-both.lock").exists(), 30, "the bridge")
        time.sleep(1.5)  # the MQTT session subscribes before anything is published
        plant.publish_rows(opc_rows)
        assert publish_mqtt(list(mqtt_messages(mqtt_rows)), host=host, port=port) == len(mqtt_rows)
        _wait(lambda: len(_keys(lake)) >= len(opc_rows) + len(mqtt_rows), 60, "both sources' rows")
    finally:
        stop.set()
        th.join(60)
    assert sorted(_keys(lake)) == sorted((r["asset_id"], r["cycle"]) for r in opc_rows + mqtt_rows)


def test_a_pumps_fleet_maps_node_columns_through_its_contract_and_keys_rows_by_source_timestamp(tmp_path):
    """Issue 24: OPC UA node columns are contract channels (aliases allowed); a timestamp clock needs no
    time node, the values' source timestamp is the row's time, and the rows commit under the contract."""
    from twinflow.tasks.bridge.commit import Committer
    from twinflow.tasks.bridge.decode import Decoder

    nodes = [{"node_id": "ns=2;s=P-101.casing", "asset": "P-101", "column": "casing_temp [degC]"},
             {"node_id": "ns=2;s=P-101.flow", "asset": "P-101", "column": "flow"}]
    cfg = BridgeConfig(contract="pumps", opcua={"nodes": nodes})
    assert [n.column for n in cfg.opcua.nodes] == ["casing_temp_c", "flow_m3h"]
    with pytest.raises(ValueError, match="is not a channel \\(or the clock\\) of fleet contract 'pumps'"):
        BridgeConfig(contract="pumps", opcua={"nodes": [{"node_id": "ns=2;s=x", "asset": "P-1", "column": "s2"}]})
    out = []
    a = RowAssembler(cfg.opcua.nodes, out.append, "opc.tcp://t", key="timestamp")
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    a.add("ns=2;s=P-101.casing", _dv(61.5, t0))
    a.add("ns=2;s=P-101.flow", _dv(250.0, t0))
    a.add("ns=2;s=P-101.casing", _dv(400.0, t0 + timedelta(minutes=10)))  # outside [-20, 160] degC
    a.add("ns=2;s=P-101.flow", _dv(251.0, t0 + timedelta(minutes=10)))
    assert [m.rows for m in out] == [[{"asset_id": "P-101", "casing_temp_c": 61.5, "flow_m3h": 250.0,
                                       "timestamp": t0}],
                                     [{"asset_id": "P-101", "casing_temp_c": 400.0, "flow_m3h": 251.0,
                                       "timestamp": t0 + timedelta(minutes=10)}]]
    c = Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "o", "twinflow-bridge-o",
                  decoder=Decoder(cfg.fleet_contract()))
    res = c.commit(out)
    assert (res.rows_written, res.rows_quarantined) == (1, 1)
    got = lk.read_lake(lk.snapshot(str(tmp_path / "lake"), "stream"),
                       columns=["asset_id", "timestamp", "casing_temp_c"]).to_pylist()
    assert got == [{"asset_id": "P-101", "timestamp": t0, "casing_temp_c": 61.5}]
    assert read_quarantine(str(tmp_path / "q"), "stream").column("reason").to_pylist() == [
        "casing_temp_c=400 outside valid range [-20, 160] degC"]
