"""A plant simulator for tests and the demo: C-MAPSS units replayed as live MQTT messages (and OPC UA
nodes, :func:`serve_opcua`), at a chosen rate.

Each C-MAPSS row (unit, cycle, 3 settings, 21 sensors) becomes one message: a JSON row on
``<prefix>/<asset>`` or a Sparkplug B ``DDATA`` on ``spBv1.0/<group>/DDATA/<edge>/<asset>``. Units are
interleaved cycle by cycle, as a fleet reports.

Over OPC UA (:class:`OpcuaPlant`) each unit is an object ``<asset>`` with one variable per column
(node ids ``ns=<idx>;s=<asset>.<column>``: ``cycle`` Int64, channels Double); a row is written to all of
its asset's variables with one source timestamp, and every sample goes into the server's history (the
bridge's catch-up after a restart reads it). :meth:`OpcuaPlant.bridge_config` is the node map the
bridge needs.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from twinflow import contracts as C
from twinflow.tasks.bridge.sparkplug import encode_payload

__all__ = ["OpcuaPlant", "cmapss_rows", "mqtt_messages", "publish_mqtt", "default_cmapss", "serve_opcua"]


def default_cmapss() -> Path:
    """The FD001 training file: the shared data folder's, else the bundled copy."""
    shared = Path("/work/shared/data/cmapss/train_FD001.txt")
    if shared.is_file():
        return shared
    from twinflow.data import cmapss_dir

    return cmapss_dir() / "train_FD001.txt.gz"


def cmapss_rows(path: str | Path | None = None, units: int | None = None, max_cycles: int | None = None,
                asset_prefix: str = "unit-", contract: str = "cmapss") -> list[dict[str, Any]]:
    """C-MAPSS rows as contract rows, interleaved across units by cycle (``units``: the first N units).

    The column order of the header-less text comes from the contract's dataset rule for the file.
    """
    from twinflow.contract import load_contract

    p = Path(path) if path else default_cmapss()
    fleet = load_contract(contract)
    rule = fleet.rule_for(p.name)
    if rule is None or not rule.columns:
        raise ValueError(f"contract {fleet.name!r} declares no header-less column order for {p.name}")
    names = [None if c == "_" else fleet.canonical_name(c) for c in rule.columns]
    asset_at, time_at = names.index(C.ASSET), names.index(fleet.clock.key)
    chans = [(i, n) for i, n in enumerate(names) if n in set(fleet.channel_names)]
    opener = gzip.open if p.suffix == ".gz" else open
    by_unit: dict[int, list[dict[str, Any]]] = {}
    with opener(p, "rt") as fh:
        for line in fh:
            vals = line.split()
            if len(vals) < len(names):
                continue
            unit, cycle = int(vals[asset_at]), int(vals[time_at])
            if units is not None and unit > units:
                continue
            if max_cycles is not None and cycle > max_cycles:
                continue
            row: dict[str, Any] = {C.ASSET: f"{asset_prefix}{unit}", C.TIME: cycle}
            row.update({n: float(vals[i]) for i, n in chans})
            by_unit.setdefault(unit, []).append(row)
    out: list[dict[str, Any]] = []
    longest = max((len(v) for v in by_unit.values()), default=0)
    for i in range(longest):
        for u in sorted(by_unit):
            if i < len(by_unit[u]):
                out.append(by_unit[u][i])
    return out


def mqtt_messages(rows: list[dict[str, Any]], fmt: str = "json", prefix: str = "twinflow/telemetry",
                  group: str = "plant", edge: str = "gw1") -> Iterator[tuple[str, bytes]]:
    """(topic, payload) per row, in the given format."""
    for seq, r in enumerate(rows):
        asset = r[C.ASSET]
        if fmt == "sparkplug":
            metrics = {k: v for k, v in r.items() if k != C.ASSET}
            yield f"spBv1.0/{group}/DDATA/{edge}/{asset}", encode_payload(metrics, int(time.time() * 1000), seq % 256)
        else:
            yield f"{prefix}/{asset}", json.dumps(r).encode()


def publish_mqtt(messages: Iterator[tuple[str, bytes]] | list[tuple[str, bytes]], host: str = "127.0.0.1",
                 port: int = 1883, rate: float | None = None, qos: int = 1, client_id: str | None = None,
                 stop: threading.Event | None = None, on_sent: Any = None) -> int:
    """Publish messages (QoS 1 by default, waiting for every PUBACK) at up to ``rate`` messages/s.

    Returns:
        The number of messages the broker acknowledged.
    """
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    sent = 0
    infos = []
    t0 = time.monotonic()
    try:
        for topic, payload in messages:
            if stop is not None and stop.is_set():
                break
            infos.append(c.publish(topic, payload, qos=qos))
            sent += 1
            if on_sent is not None:
                on_sent(sent, topic, payload)
            if rate:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            if len(infos) >= 2000:
                for i in infos:
                    i.wait_for_publish(60)
                infos.clear()
        for i in infos:
            i.wait_for_publish(60)
    finally:
        c.disconnect()
        c.loop_stop()
    return sent


_OPCUA_NS = "urn:twinflow:plant-simulator"


class _Users:
    """asyncua user manager: the configured username/password pairs, nobody else."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = dict(users)

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:  # noqa: ARG002 - asyncua API
        import hmac

        from asyncua.crypto.permission_rules import User, UserRole

        if username in self.users and password is not None and \
                hmac.compare_digest(str(self.users[username]), str(password)):
            return User(role=UserRole.User, name=username)
        return None


async def _secure_server(server: Any, sec: dict[str, Any]) -> None:
    from asyncua import ua
    from asyncua.crypto.truststore import TrustStore
    from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    await server.load_certificate(str(sec["certificate"]))
    await server.load_private_key(str(sec["private_key"]))
    server.set_identity_tokens([ua.UserNameIdentityToken])
    server.iserver.set_user_manager(_Users(sec.get("users", {})))
    store = TrustStore([Path(p) for p in sec.get("trusted_clients", [])], [])
    await store.load()
    opts = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
    server.set_certificate_validator(CertificateValidator(opts, store))


class OpcuaPlant:
    """An asyncua server with C-MAPSS units as live, historized nodes; runs its own event loop in a thread.

    Args:
        endpoint: ``opc.tcp://host:port/path`` to listen on.
        assets: The assets (objects) to create.
        channels: Channels per asset (default all of the contract's).
        untyped: Columns whose variables accept any type (DataType BaseDataType; tests write wrong types).
    """

    def __init__(self, endpoint: str, assets: list[str], channels: list[str] | None = None,
                 untyped: tuple[str, ...] = (), security: dict[str, Any] | None = None) -> None:
        # security: {"certificate", "private_key", "trusted_clients": [paths], "users": {name: password}}:
        # Basic256Sha256 SignAndEncrypt only, username login only, client certificates from the trust list.
        self.security = security
        self.endpoint, self.assets, self.untyped = endpoint, list(assets), set(untyped)
        if channels is None:
            from twinflow.contract import load_contract

            channels = load_contract("cmapss").channel_names  # the simulator replays C-MAPSS units
        self.channels = list(channels)
        self.nodes: dict[tuple[str, str], Any] = {}  # (asset, column) -> asyncua NodeId
        self.published = 0
        self._last_ts: dict[str, Any] = {}
        self._loop = None
        self._thread: threading.Thread | None = None
        self._server = None

    # --- the server's loop ----------------------------------------------------------------------

    async def _start(self) -> None:
        from asyncua import Server, ua

        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("twinflow plant simulator")
        if self.security:
            await _secure_server(server, self.security)
        idx = await server.register_namespace(_OPCUA_NS)
        storage = server.iserver.history_manager.storage
        waiting = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData))
        for asset in self.assets:
            obj = await server.nodes.objects.add_object(ua.NodeId(asset, idx), asset)
            for col in [C.TIME, *self.channels]:
                vt = ua.VariantType.Int64 if col == C.TIME else ua.VariantType.Double
                node = await obj.add_variable(ua.NodeId(f"{asset}.{col}", idx), col, ua.Variant(0, vt)
                                              if col == C.TIME else ua.Variant(0.0, vt),
                                              datatype=ua.ObjectIds.BaseDataType if col in self.untyped else None)
                await node.write_attribute(ua.AttributeIds.Historizing, ua.DataValue(ua.Variant(True)))
                await node.set_attr_bit(ua.AttributeIds.AccessLevel, ua.AccessLevel.HistoryRead)
                await node.set_attr_bit(ua.AttributeIds.UserAccessLevel, ua.AccessLevel.HistoryRead)
                # No value until the first sample: a subscriber's initial notification is not a reading.
                await server.write_attribute_value(node.nodeid, waiting)
                # Every sample into the history (historize_node_data_change would sample by value change,
                # missing repeated values and collapsing fast writes).
                await storage.new_historized_node(node.nodeid, None, 0)
                self.nodes[(asset, col)] = node.nodeid
        await server.start()
        self._server = server

    async def _write(self, asset: str, values: dict[str, Any], ts: Any) -> None:
        from asyncua import ua

        storage = self._server.iserver.history_manager.storage
        for col, variant in values.items():
            if not isinstance(variant, ua.Variant):
                variant = ua.Variant(int(variant), ua.VariantType.Int64) if col == C.TIME else \
                    ua.Variant(float(variant), ua.VariantType.Double)
            dv = ua.DataValue(variant, SourceTimestamp=ts, ServerTimestamp=ts)
            nid = self.nodes[(asset, col)]
            if col in self.untyped:
                # asyncua refuses a write whose variant type differs from the current value's unless the
                # value is null: clear it (server internals; only test plants have untyped columns)
                self._server.iserver.aspace._nodes[nid].attributes[ua.AttributeIds.Value].value = None
            status = await self._server.iserver.aspace.write_attribute_value(nid, ua.AttributeIds.Value, dv)
            if not status.is_good():
                raise ValueError(f"{nid.to_string()}: write refused ({status.name})")
            await storage.save_node_value(nid, dv)

    def _next_ts(self, asset: str) -> Any:
        from datetime import datetime, timedelta, timezone

        ts = datetime.now(timezone.utc)
        last = self._last_ts.get(asset)
        if last is not None and ts <= last:
            ts = last + timedelta(microseconds=1)
        self._last_ts[asset] = ts
        return ts

    @staticmethod
    async def _cancel_rest() -> None:
        import asyncio

        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    # --- the caller's side ----------------------------------------------------------------------

    def _call(self, coro: Any, timeout: float = 60.0) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> "OpcuaPlant":
        """Start the server (returns once it listens)."""
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua-plant", daemon=True)
        self._thread.start()
        self._call(self._start())
        return self

    def write(self, asset: str, values: dict[str, Any]) -> None:
        """Write values (plain numbers, or ``asyncua.ua.Variant`` as they are) with one new source timestamp."""
        self._call(self._write(asset, values, self._next_ts(asset)))

    def publish(self, row: dict[str, Any]) -> None:
        """One contract row as a sample of its asset (the channels this plant has)."""
        asset = row[C.ASSET]
        self.write(asset, {c: row[c] for c in [C.TIME, *self.channels] if row.get(c) is not None})
        self.published += 1

    def publish_rows(self, rows: list[dict[str, Any]], rate: float | None = None,
                     stop: threading.Event | None = None) -> int:
        """Publish rows at up to ``rate`` rows/s; returns how many were published."""
        t0, n = time.monotonic(), 0
        for r in rows:
            if stop is not None and stop.is_set():
                break
            self.publish(r)
            n += 1
            if rate:
                ahead = n / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        return n

    def bridge_config(self, **extra: Any) -> dict[str, Any]:
        """The bridge config's ``opcua`` section for this plant (``extra``: more fields of it)."""
        return {"endpoint": self.endpoint, **extra,
                "nodes": [{"node_id": nid.to_string(), "asset": a, "column": c} for (a, c), nid in self.nodes.items()]}

    def stop(self) -> None:
        """Stop the server and its loop."""
        if self._loop is None:
            return
        if self._server is not None:
            try:
                self._call(self._server.stop(), 10)
            finally:
                self._server = None
        self._call(self._cancel_rest(), 10)  # no "task destroyed but pending" warnings at exit
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None


def serve_opcua(rows: list[dict[str, Any]], endpoint: str, rate: float | None = None,
                channels: list[str] | None = None, stop: threading.Event | None = None,
                on_ready: Any = None, linger: bool = True) -> int:
    """Serve C-MAPSS rows as live OPC UA nodes: publish them at ``rate`` rows/s, then (``linger``) keep
    serving (the history stays readable) until ``stop``.

    Args:
        on_ready: Called with the :class:`OpcuaPlant` once it listens, before publishing (write the config).

    Returns:
        The number of rows published.
    """
    assets = sorted({r[C.ASSET] for r in rows}, key=lambda a: (len(a), a))
    plant = OpcuaPlant(endpoint, assets, channels).start()
    try:
        if on_ready is not None:
            on_ready(plant)
        n = plant.publish_rows(rows, rate, stop)
        while linger and stop is not None and not stop.is_set():
            stop.wait(0.5)
        return n
    finally:
        plant.stop()
