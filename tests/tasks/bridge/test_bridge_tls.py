"""MQTT over TLS with a client certificate and a password, against mosquitto with generated certificates."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time

import pytest

from twinflow import lake as lk
from twinflow.errors import ServiceUnavailable
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.mqtt import MqttBridgeSource
from twinflow.tasks.bridge.buffer import Buffer
from twinflow.tasks.bridge.run import run_bridge


def _publish_tls(host, port, pki, user, pw, messages):
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, pw)
    c.tls_set(ca_certs=str(pki["ca_cert"]), certfile=str(pki["client_cert"]), keyfile=str(pki["client_key"]),
              cert_reqs=ssl.CERT_REQUIRED)
    c.connect(host, port)
    c.loop_start()
    try:
        for topic, payload in messages:
            c.publish(topic, payload, qos=1).wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def _mqtt(host, port, pki, user, pw, **extra):
    return {"host": host, "port": port, "topics": ["plant/#"], "tls": True, "ca_file": str(pki["ca_cert"]),
            "cert_file": str(pki["client_cert"]), "key_file": str(pki["client_key"]), "username": user,
            "password": pw, **extra}


def test_the_bridge_reads_over_tls_with_client_certificate_and_password(tls_mosquitto, tmp_path, caplog):
    host, port, pki, user, pw = tls_mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    cfg = BridgeConfig(bridge_id="tls", mqtt=_mqtt(host, port, pki, user, pw), flush_interval_s=0.1,
                       emit_events=False)
    assert pw not in repr(cfg) and pw not in cfg.model_dump_json()  # a SecretStr everywhere it is shown
    from twinflow.tasks.bridge.mqtt import create_session

    create_session(cfg.mqtt, "twinflow-bridge-tls")
    stop, out = threading.Event(), {}
    caplog.set_level(logging.DEBUG)
    th = threading.Thread(target=lambda: out.setdefault("stats", run_bridge(cfg, lake, quar, stop=stop,
                                                                            max_seconds=60)))
    th.start()
    try:
        _publish_tls(host, port, pki, user, pw,
                     [("plant/u1", json.dumps({"asset_id": "u1", "cycle": c, "s2": 642.0}).encode()) for c in (1, 2, 3)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (lk.snapshot(lake, "stream") is None or
                                               lk.read_lake(lk.snapshot(lake, "stream"), ["cycle"]).num_rows < 3):
            time.sleep(0.1)
    finally:
        stop.set()
        th.join(60)
    assert out["stats"].rows_written == 3
    status = (lk.meta_path(lake, "bridge-tls-status.json")).read_text()
    assert "mqtts://127.0.0.1" in status
    # the password appears in no log record, status file or lake/quarantine file
    assert pw not in caplog.text and pw not in status
    for f in (tmp_path / "lake").rglob("*"):
        if f.is_file():
            assert pw.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("case", ["wrong password", "no client certificate", "untrusted broker"])
def test_a_wrong_credential_is_refused_with_a_clear_error(tls_mosquitto, tmp_path, case, pki_factory):
    host, port, pki, user, pw = tls_mosquitto
    extra = {"wrong password": {"password": "not-" + pw},
             "no client certificate": {"cert_file": None, "key_file": None},
             "untrusted broker": {"ca_file": str(pki_factory(tmp_path / "other")["ca_cert"])}}[case]
    cfg = BridgeConfig(bridge_id="tls", mqtt=_mqtt(host, port, pki, user, pw, **extra))
    src = MqttBridgeSource(cfg.mqtt, Buffer(100), "twinflow-bridge-tls-refused")
    with pytest.raises(ServiceUnavailable) as err:
        src.start(timeout_s=5)
    msg = str(err.value)
    assert "mqtts://127.0.0.1" in msg and pw not in msg
    if case == "wrong password":
        assert "refused: Not authorized" in msg or "Bad user name or password" in msg
    elif case == "untrusted broker":
        assert "certificate verify failed" in msg
    else:
        assert "did not accept" in msg or "unreachable" in msg
