"""The bridge's configuration: where it reads from (MQTT, OPC UA), how sources map to assets and channels.

Loaded from a YAML or JSON file (``twinflow stream run --config bridge.yaml``). Broker credentials do
not belong in it: name a :class:`twinflow.blocks.BrokerCredentialsBlock` (``credentials_block``) or
set ``TWINFLOW_MQTT_PASSWORD``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from twinflow.errors import ConfigError
from twinflow.tasks.bridge.decode import DecodeLimits

if TYPE_CHECKING:
    from twinflow.contract.model import FleetContract

__all__ = ["BridgeConfig", "MqttSource", "OpcuaNode", "OpcuaSource", "load_config"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttSource(_Model):
    """An MQTT broker subscription.

    ``format``: ``json`` (a row object ``{"asset_id", "cycle", <channel>: value}`` or a list of them) or
    ``sparkplug`` (Sparkplug B ``DDATA``/``NDATA``: the device, else the edge node, is the asset; metric
    names are channels, the ``cycle`` metric is the key). Delivery is QoS 1 with a persistent session
    (``client_id`` fixed, clean start off, session kept ``session_expiry_s``), acknowledged only after
    the lake commit.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    topics: list[str] = Field(default_factory=lambda: ["twinflow/telemetry/#"])
    format: Literal["json", "sparkplug"] = "json"
    client_id: str | None = Field(None, description="Defaults to twinflow-bridge-<bridge_id>.")
    username: str | None = None
    password: SecretStr | None = None
    credentials_block: str | None = None
    tls: bool = Field(False, description="Connect over TLS (port usually 8883).")
    ca_file: str | None = Field(None, description="CA bundle that signed the broker's certificate (default: "
                                "the system's trust store).")
    cert_file: str | None = Field(None, description="Client certificate (PEM), for brokers that require one.")
    key_file: str | None = Field(None, description="Its private key (PEM).")
    key_password: SecretStr | None = None
    tls_verify_hostname: bool = Field(True, description="Check the broker's certificate names the host.")
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = Field(20000, ge=1, le=65535,
                                 description="Unacknowledged messages the broker may send (bounds the buffer).")
    keepalive_s: int = 30

    @model_validator(mode="after")
    def _tls(self) -> "MqttSource":
        for name in ("ca_file", "cert_file", "key_file"):
            v = getattr(self, name)
            if v is not None and not Path(v).expanduser().is_file():
                raise ValueError(f"mqtt.{name} {v!r} does not exist")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("mqtt.key_file needs mqtt.cert_file")
        if not self.tls and any(getattr(self, n) for n in ("ca_file", "cert_file", "key_file")):
            raise ValueError("mqtt.ca_file/cert_file/key_file need tls: true")
        return self


class OpcuaNode(_Model):
    """One OPC UA variable and the (asset, column) it feeds.

    ``column`` is a channel of the bridge's fleet contract (or one of its aliases) or its clock column
    (``cycle``: the row key of a cycle clock); checked against the contract by :class:`BridgeConfig`.
    """

    node_id: str
    asset: str = Field(min_length=1)
    column: str


class OpcuaSource(_Model):
    """An OPC UA server (client side): data changes of the mapped nodes, grouped into rows by source timestamp.

    Each asset needs one node with column ``cycle`` (the row key) and any channels; a node id appears
    once. On every (re)connect the source reads what it missed with HistoryRead, so the server must
    historize the mapped nodes (see :mod:`twinflow.tasks.bridge.opcua`).
    """

    endpoint: str = Field("opc.tcp://127.0.0.1:4840", pattern=r"^opc\.tcp://")
    nodes: list[OpcuaNode] = Field(min_length=1)
    sampling_interval_ms: float = Field(0.0, ge=0, description="0: every change (the server's fastest).")
    queue_size: int = Field(10000, ge=1, description="Server-side queue per monitored item.")
    publishing_interval_ms: float = Field(50.0, gt=0)
    request_timeout_s: float = Field(4.0, gt=0)
    health_interval_s: float = Field(1.0, gt=0, description="How often the server's clock is read (lost "
                                     "connection detection).")
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles per failure...")
    reconnect_max_s: float = Field(10.0, gt=0, description="...up to this.")
    security_policy: Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = Field(
        "None", description="OPC UA security policy of the secure channel (plants require one of the others).")
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: str | None = Field(None, description="This client's application instance certificate (DER/PEM).")
    private_key: str | None = Field(None, description="Its private key (PEM/DER).")
    private_key_password: SecretStr | None = None
    trusted_server_certificates: list[str] = Field(
        default_factory=list, description="The trust list: server certificates (or the CAs that issued them) "
        "this client accepts; any other server certificate is refused before credentials are sent.")
    application_uri: str = Field("urn:twinflow:bridge", description="Must match the URI in the certificate.")
    username: str | None = None
    password: SecretStr | None = None
    credentials_block: str | None = Field(None, description="A twinflow-broker-credentials block (user/password).")

    @model_validator(mode="after")
    def _map(self) -> "OpcuaSource":
        from asyncua import ua

        seen: dict[str, str] = {}
        cols: set[tuple[str, str]] = set()
        for n in self.nodes:
            try:
                nid = ua.NodeId.from_string(n.node_id).to_string()
            except Exception as exc:  # noqa: BLE001 - asyncua raises several types
                raise ValueError(f"node id {n.node_id!r} is not an OPC UA node id ({exc})") from exc
            if nid in seen:
                raise ValueError(f"node {n.node_id!r} is mapped twice")
            seen[nid] = n.asset
            if (n.asset, n.column) in cols:
                raise ValueError(f"asset {n.asset!r} has two nodes for column {n.column!r}")
            cols.add((n.asset, n.column))
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.security_policy != "None":
            if not (self.certificate and self.private_key):
                raise ValueError(f"security_policy {self.security_policy} needs certificate and private_key")
            if not self.trusted_server_certificates:
                raise ValueError(f"security_policy {self.security_policy} needs trusted_server_certificates (the "
                                 "server certificates or CAs to trust; a server is never trusted on first use)")
        for f in [self.certificate, self.private_key, *self.trusted_server_certificates]:
            if f is not None and not Path(f).expanduser().is_file():
                raise ValueError(f"opcua: file {f!r} does not exist")
        return self


class BridgeConfig(_Model):
    """One bridge: its sources, the dataset it feeds and its micro-batching."""

    bridge_id: str = Field("bridge", pattern=r"^[A-Za-z0-9_\-]+$")
    contract: str | None = Field(None, description="Fleet contract of the rows: a YAML path or a bundled name "
                                 "(cmapss, pumps). Default: the settings' contract.")
    limits: DecodeLimits = Field(default_factory=DecodeLimits, description="Decoding bounds per message.")
    source_failure: Literal["exit", "restart"] = Field(
        "exit", description="A source whose thread died: end the bridge with an error (exit) or start it "
        "again (restart, at most max_source_restarts times).")
    max_source_restarts: int = Field(5, ge=0)
    heartbeat_s: float = Field(30.0, gt=0, description="How often the bridge reports its state (event, status "
                               "file for `twinflow stream status`).")
    dataset: str = "stream"
    lake: str | None = Field(None, description="Default: the configured lake.")
    quarantine: str | None = Field(None, description="Default: the configured quarantine.")
    mqtt: MqttSource | None = None
    opcua: OpcuaSource | None = None
    batch_rows: int = Field(5000, ge=1, description="Commit when this many rows are buffered...")
    flush_interval_s: float = Field(1.0, gt=0, description="...or this long after the first buffered row.")
    max_buffer_rows: int = Field(50000, ge=1, description="Buffer bound: sources block beyond it (back-pressure).")
    compact_every: int = Field(200, ge=0, description="Compact small files every N commits (0: never)...")
    compact_files: int = Field(2000, ge=0, description="...or once this many files were added since the last "
                               "compaction (each commit adds one per asset in it; 0: no such bound).")
    emit_events: bool = True
    ready_min_cycles: int = Field(50, ge=1, description="twinflow.stream.data.ready: new cycles (N) an asset "
                                  "needs since the last such event...")
    ready_min_assets: int = Field(5, ge=1, description="...and how many assets (M) need them.")

    @model_validator(mode="after")
    def _sources(self) -> "BridgeConfig":
        if self.mqtt is None and self.opcua is None:
            raise ValueError("configure at least one source (mqtt or opcua)")
        if self.max_buffer_rows < self.batch_rows:
            raise ValueError("max_buffer_rows must be >= batch_rows")
        if self.opcua is not None:
            self._map_opcua(self.fleet_contract())
        return self

    def fleet_contract(self) -> "FleetContract":
        """The bridge's fleet contract (named here, else the settings' ``contract``)."""
        from twinflow.contract.store import resolve_contract

        return resolve_contract(self.contract)

    def _map_opcua(self, contract: "FleetContract") -> None:
        """Map each node's column to a contract column (aliases resolved); every asset needs a time node
        unless the clock is a timestamp (then the values' source timestamp is the row time)."""
        from twinflow import contracts as C

        key = contract.clock.key
        times: set[str] = set()
        assets: set[str] = set()
        for n in self.opcua.nodes:
            col = contract.canonical_name(n.column)
            if col is None or col == C.ASSET:
                raise ValueError(f"node {n.node_id!r}: column {n.column!r} is not a channel (or the clock) of "
                                 f"fleet contract {contract.name!r} (channels: {', '.join(contract.channel_names)})")
            n.column = col
            assets.add(n.asset)
            if col == key:
                times.add(n.asset)
        if key == C.TIME:
            missing = sorted(assets - times)
            if missing:
                raise ValueError(f"asset(s) {missing} have no {key!r} node (the row key)")

    @property
    def app_id(self) -> str:
        """The Delta application-transaction id of this bridge's commits."""
        return f"twinflow-bridge-{self.bridge_id}"


def load_config(path: str | Path) -> BridgeConfig:
    """Read a bridge configuration file (YAML or JSON).

    Raises:
        ConfigError: missing file or invalid content (the message names the field).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"bridge config {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        return BridgeConfig.model_validate(data or {})
    except Exception as exc:  # noqa: BLE001 - one readable line for the user
        raise ConfigError(f"bridge config {p}: {exc}") from exc
