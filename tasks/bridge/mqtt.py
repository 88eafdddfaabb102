"""The MQTT source: QoS 1 subscription on a persistent session, acknowledged after the lake commit.

paho-mqtt with ``manual_ack``: a message's PUBACK is sent only by its :class:`Message`'s ``ack``, which
the committer calls after the Delta commit. The session is persistent (fixed client id, MQTT 5 clean
start off, session expiry), so after a crash or restart the broker redelivers every message that was
not acknowledged and queues those published meanwhile. The broker must keep enough queued messages
for the downtime (mosquitto: ``max_queued_messages``, default 1000, drops beyond it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.tasks.bridge.buffer import Buffer, Message
from twinflow.tasks.bridge.config import MqttSource
from twinflow.tasks.bridge.decode import DecodeError, Decoder

log = logging.getLogger("twinflow.bridge")

__all__ = ["MqttBridgeSource", "apply_tls", "create_session", "mqtt_password"]


def apply_tls(client: Any, cfg: MqttSource) -> None:
    """Configure TLS on a paho client from the source config (CA, client certificate, hostname check)."""
    if not cfg.tls:
        return
    import ssl
    from pathlib import Path

    def path(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser())

    try:
        client.tls_set(ca_certs=path(cfg.ca_file), certfile=path(cfg.cert_file), keyfile=path(cfg.key_file),
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
                       keyfile_password=cfg.key_password.get_secret_value() if cfg.key_password else None)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"MQTT TLS setup failed (ca_file={cfg.ca_file}, cert_file={cfg.cert_file}, "
                          f"key_file={cfg.key_file}): {exc}") from exc
    client.tls_insecure_set(not cfg.tls_verify_hostname)


def mqtt_password(cfg: MqttSource) -> tuple[str | None, str | None]:
    """(username, password) from the config, its credentials block, or ``TWINFLOW_MQTT_PASSWORD``."""
    import os

    user = cfg.username
    pw = cfg.password.get_secret_value() if cfg.password else None
    if cfg.credentials_block:
        from twinflow.blocks.broker import BrokerCredentialsBlock

        blk = BrokerCredentialsBlock.load(cfg.credentials_block)
        user, pw = blk.username, blk.password.get_secret_value() if blk.password else None
    return user, pw or os.environ.get("TWINFLOW_MQTT_PASSWORD")


class MqttBridgeSource:
    """Subscribes ``cfg.topics`` and puts each decoded message into the buffer."""

    def __init__(self, cfg: MqttSource, buffer: Buffer, client_id: str, decoder: Decoder | None = None) -> None:
        import paho.mqtt.client as mqtt

        from twinflow.contract.store import resolve_contract

        self.cfg, self.buffer = cfg, buffer
        self.decoder = decoder or Decoder(resolve_contract(None))
        self._mqtt = mqtt
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=True)
        user, pw = mqtt_password(cfg)
        if user:
            self.client.username_pw_set(user, pw)
        apply_tls(self.client, cfg)
        self.refused: str | None = None  # the broker's reason when it refused the connection
        self.last_message: float | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.connected = threading.Event()
        self.received = 0
        self.source = f"{'mqtts' if cfg.tls else 'mqtt'}://{cfg.host}:{cfg.port}"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            log.error("MQTT connect refused: %s", reason_code)
            return
        self.refused = None
        # Subscribing again on a resumed session keeps its queued messages (same filter, same QoS).
        client.subscribe([(t, 1) for t in self.cfg.topics])
        log.info("MQTT connected to %s (session present: %s)", self.source, flags.session_present)

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reason_codes: Any, properties: Any) -> None:
        # Started means subscribed: messages published before a new session's SUBACK are not queued for it.
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("MQTT disconnected (%s); paho reconnects", reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        data = bytes(msg.payload)
        topic = msg.topic
        rows: list = []
        row_errors: list = []
        error = None
        try:
            out = self.decoder.decode(self.cfg.format, topic, data)
            rows, row_errors = out.rows, out.errors
        except DecodeError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever a payload does, it must not end the paho thread
            error = f"undecodable message ({type(exc).__name__}: {str(exc)[:300]})"
        mid, qos = msg.mid, msg.qos
        ack = (lambda: client.ack(mid, qos)) if qos > 0 else None
        self.received += 1
        self.last_message = time.time()
        # Blocks while the buffer is full: the paho thread stops reading, the broker stops sending.
        self.buffer.put(Message(source=f"{self.source}/{topic[:200]}", raw=data, rows=rows, error=error, ack=ack,
                                row_errors=row_errors, checked=True))

    def alive(self) -> str | None:
        """None while the network thread runs; else why the source is dead."""
        th = getattr(self.client, "_thread", None)
        if th is None or not th.is_alive():
            return f"MQTT source {self.source}: its network thread stopped"
        return None

    def state(self) -> dict[str, Any]:
        """Per-source state for the heartbeat and ``twinflow stream status``."""
        return {"source": self.source, "connected": self.connected.is_set(), "received": self.received,
                "last_message": self.last_message, "refused": self.refused}

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect (persistent session) and start the network thread.

        Raises:
            ServiceUnavailable: the broker did not accept the connection within ``timeout_s``.
        """
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        try:
            self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, clean_start=False,
                                properties=props)
        except OSError as exc:
            raise ServiceUnavailable(f"MQTT broker {self.source} unreachable: {exc}") from exc
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            self.client.loop_stop()
            why = f" (it refused: {self.refused})" if self.refused else ""
            raise ServiceUnavailable(f"MQTT broker {self.source} did not accept the connection in {timeout_s:g}s{why}")

    def stop(self) -> None:
        """Disconnect; unacknowledged messages stay with the broker's session."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def check_topics(topics: list[str]) -> None:
    """Reject empty topic filters early (paho would fail later, less clearly)."""
    if not topics or any(not t for t in topics):
        raise ConfigError("mqtt.topics needs at least one non-empty topic filter")


def create_session(cfg: MqttSource, client_id: str, timeout_s: float = 10.0) -> None:
    """Create the bridge's persistent session on the broker (subscribed, then offline) and return.

    A QoS 1 message published while no session holds a matching subscription is dropped, so a
    publisher that may start before the bridge has subscribed (tests, benchmarks, a plant that comes up
    first) calls this: the broker then queues everything for the bridge until it connects.

    Raises:
        ServiceUnavailable: the broker did not accept the connection or the subscription in ``timeout_s``.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    user, pw = mqtt_password(cfg)
    if user:
        c.username_pw_set(user, pw)
    apply_tls(c, cfg)
    c.on_connect = lambda client, *a: client.subscribe([(t, 1) for t in cfg.topics])
    c.on_subscribe = lambda *a: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry_s
    try:
        c.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False, properties=props)
    except OSError as exc:
        raise ServiceUnavailable(f"MQTT broker {cfg.host}:{cfg.port} unreachable: {exc}") from exc
    c.loop_start()
    try:
        if not subscribed.wait(timeout_s):
            raise ServiceUnavailable(f"MQTT broker {cfg.host}:{cfg.port} did not acknowledge the subscription "
                                     f"in {timeout_s:g}s")
    finally:
        c.disconnect()
        c.loop_stop()
