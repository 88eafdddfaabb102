"""The OPC UA source: data-change subscription on mapped nodes, rows by source timestamp, history catch-up.

The config maps node ids to (asset, column); columns are the fleet contract's channels and clock. With
a cycle clock the ``cycle`` node is the asset's row key; with a timestamp clock the values' source
timestamp is (unless a ``timestamp`` node is mapped). Rows are the MQTT JSON rows (``{"asset_id",
<time>, <channel>: value}``), so both sources share the buffer, the contract checks, the quarantine
and the (asset, time) dedupe of :mod:`.commit`.

**Rows.** A plant writes one sample of an asset to all of its nodes with one source timestamp (the
simulator does; an OPC UA server's nodes of one device usually share it). :class:`RowAssembler`
groups values by (asset, source timestamp); the row is complete when every mapped column of the asset
has a value at that timestamp. Each monitored item's notifications arrive in time order, so once a
row at time T is complete no value older than T is still coming: pending rows older than T are then
emitted with what they have (missing channels are null; without a cycle value they are quarantined).
The subscription uses the ``StatusValueTimestamp`` trigger: a sensor that reads the same value two
samples in a row still reports, so the row is not left waiting for it.

**Bad values** (a bad status, a non-numeric channel, a non-integer cycle, NaN or infinity, a node not
in the map) make their row a quarantined message: the reason names the node, the raw bytes are the
row's values as JSON (``repr`` of each variant, its type and status).

**At-least-once.** On every (re)connect the source subscribes first, then reads what it missed with
HistoryRead (raw, by source timestamp) and feeds it through the same assembler; live notifications
that arrive meanwhile wait until the catch-up is done, then values at or before the last emitted
timestamp of their asset are dropped (they came from the history). After a restart the watermark is
the lake's highest committed cycle per asset (rows not yet committed when the bridge died are read
again); within one process it is the last emitted source timestamp. Redelivered rows are dropped by
the committer's (asset, cycle) dedupe, so a restart neither loses nor duplicates. This needs the
server to historize the mapped nodes for at least the downtime (every sample: asyncua's
``historize_node_data_change`` samples by value change and misses repeats; the simulator writes each
sample into the history storage itself) and cycles that increase per asset. Incomplete rows pending
at a stop are not emitted; the next start reads them from the history.

**Reconnect.** When the server goes away (a failed read of its clock, every second) the client is
dropped and the source reconnects with exponential back-off (``reconnect_min_s`` .. ``reconnect_max_s``).

Back-pressure stops at the process: the asyncio thread never blocks on a full buffer (that would stall
the session's keep-alives); assembled rows wait in memory for the forwarder thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from twinflow import contracts as C
from twinflow.errors import ServiceUnavailable
from twinflow.tasks.bridge.buffer import Buffer, Message
from twinflow.tasks.bridge.config import OpcuaNode, OpcuaSource

log = logging.getLogger("twinflow.bridge")

__all__ = ["OpcuaBridgeSource", "RowAssembler", "committed_cycles", "normalize_node_id"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_WAITING = 0x80320000  # StatusCodes.BadWaitingForInitialData


def normalize_node_id(node_id: str) -> str:
    """A node id in asyncua's canonical string form (``ns=2;i=5``), so config and server ids compare."""
    from asyncua import ua

    return ua.NodeId.from_string(node_id).to_string()


def committed_cycles(lake_path: str, dataset: str, assets: Iterable[str], key: str = C.TIME) -> dict[str, Any]:
    """The highest committed time (``key``: cycle, or timestamp) per asset in the dataset's latest version
    (assets without rows: absent)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from twinflow import lake as lk

    snap = lk.snapshot(lake_path, dataset)
    assets = sorted(set(assets))
    if snap is None or not assets:
        return {}
    t = lk.read_lake(snap, columns=[C.ASSET, key], filter=ds.field(C.ASSET).isin(assets))
    if t.num_rows == 0:
        return {}
    g = t.group_by(C.ASSET).aggregate([(key, "max")])
    top = g.column(f"{key}_max")
    return dict(zip(g.column(C.ASSET).to_pylist(),
                    (pc.cast(top, "int64") if key == C.TIME else top).to_pylist()))


def _aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)


def _check(column: str, value: Any) -> tuple[Any, str | None]:
    """(the contract value, None) or (None, why it is bad); the committer checks the contract's ranges."""
    if column == C.TIMESTAMP:
        if isinstance(value, datetime):
            return _aware(value), None
        return None, f"timestamp {value!r} is not a DateTime"
    if column == C.TIME:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            return None, f"cycle {value!r} is not an integer"
        return int(value), None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{column}={value!r} is not a number"
    if not math.isfinite(float(value)):
        return None, f"{column}={value!r} is not a finite number"
    return float(value), None


def opcua_credentials(cfg: OpcuaSource) -> tuple[str | None, str | None]:
    """(username, password) from the config or its credentials block (never logged)."""
    user = cfg.username
    pw = cfg.password.get_secret_value() if cfg.password else None
    if cfg.credentials_block:
        from twinflow.blocks.broker import BrokerCredentialsBlock

        blk = BrokerCredentialsBlock.load(cfg.credentials_block)
        user, pw = blk.username, blk.password.get_secret_value() if blk.password else None
    return user, pw


def _describe(exc: BaseException) -> str:
    """One line for a failed session: the OPC UA status name and meaning where there is one."""
    from asyncua import ua

    code = getattr(exc, "code", None)
    if isinstance(exc, ua.UaStatusCodeError) and code is not None:
        status = ua.StatusCode(code)
        hint = {"BadUserAccessDenied": " (wrong username or password)",
                "BadIdentityTokenInvalid": " (wrong username or password)",
                "BadIdentityTokenRejected": " (wrong username or password)",
                "BadCertificateUntrusted": " (the server does not trust this client's certificate: add it to the "
                                           "server's trust list)",
                "BadSecurityChecksFailed": " (the server does not trust this client's certificate, or the "
                                           "security settings do not match)"}.get(status.name, "")
        return f"{status.name}{hint}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


class _TrustList:
    """``Client.certificate_validator``: the server's certificate must be in the trust list or issued by one."""

    def __init__(self, paths: list[str]) -> None:
        from cryptography import x509

        self.refused: str | None = None  # the last server certificate this list refused
        self.trusted = []
        for p in paths:
            data = Path(p).expanduser().read_bytes()
            self.trusted.append(x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                                else x509.load_der_x509_certificate(data))

    async def __call__(self, cert: Any, app_description: Any) -> None:  # noqa: ARG002 - asyncua API
        from asyncua import ua
        from asyncua.common.utils import ServiceError

        for t in self.trusted:
            if cert == t:
                return
            try:
                cert.verify_directly_issued_by(t)
                return
            except Exception:  # noqa: BLE001 - not issued by this one
                continue
        self.refused = cert.subject.rfc4514_string()
        raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)


class RowAssembler:
    """Groups node values into rows per (asset, source timestamp); pure (no I/O), see the module docstring.

    Args:
        nodes: The node map.
        emit: Called with each finished :class:`Message` (a row, or a quarantine reason), in order per asset.
        source: The messages' source name.
    """

    def __init__(self, nodes: list[OpcuaNode], emit: Callable[[Message], None], source: str,
                 key: str = C.TIME) -> None:
        # A timestamp clock without a node of its own takes the values' source timestamp as the row time.
        self.key = key
        self.by_id = {normalize_node_id(n.node_id): n for n in nodes}
        self.columns: dict[str, set[str]] = {}
        for n in nodes:
            self.columns.setdefault(n.asset, set()).add(n.column)
        self.emit, self.source = emit, source
        self.pending: dict[str, dict[datetime, dict[str, tuple[str, Any]]]] = {a: {} for a in self.columns}
        self.last: dict[str, datetime] = {}  # asset -> source timestamp of the last emitted row
        self.max_pending = 1000  # incomplete rows kept per asset; beyond, the oldest goes out as it is

    def add(self, node_id: str, dv: Any) -> None:
        """One value (an asyncua ``DataValue``) of a node."""
        if dv.StatusCode is not None and dv.StatusCode.value == _WAITING:
            return  # a node that has no value yet (a subscription's initial notification): not a reading
        node = self.by_id.get(node_id)
        ts = _aware(dv.SourceTimestamp) or _aware(dv.ServerTimestamp)
        if node is None:
            self.emit(self._bad(None, ts, {node_id: dv}, f"node {node_id} is not in the bridge's node map"))
            return
        if ts is None:
            self.emit(self._bad(node.asset, None, {node_id: dv}, f"{node_id} ({node.asset}.{node.column}): "
                                "value without a timestamp"))
            return
        last = self.last.get(node.asset)
        if last is not None and ts <= last:
            return  # delivered already (history catch-up and live overlap)
        rows = self.pending[node.asset]
        rows.setdefault(ts, {})[node.column] = (node_id, dv)
        if len(rows[ts]) >= len(self.columns[node.asset]):
            self._flush(node.asset, ts)
        elif len(rows) > self.max_pending:  # a column that stopped reporting must not hold the asset forever
            self._flush(node.asset, min(rows))

    def _flush(self, asset: str, ts: datetime) -> None:
        rows = self.pending[asset]
        for t in sorted(t for t in rows if t <= ts):  # older ones cannot get more values: emit as they are
            self._finish(asset, t, rows.pop(t))
        self.last[asset] = ts

    def drop_column(self, node_id: str) -> None:
        """Stop waiting for a node (it cannot be monitored): its asset's rows complete without it."""
        node = self.by_id.get(node_id)
        if node is not None and node.column != self.key:
            self.columns[node.asset].discard(node.column)

    def _finish(self, asset: str, ts: datetime, values: dict[str, tuple[str, Any]]) -> None:
        row: dict[str, Any] = {C.ASSET: asset}
        errors = []
        for column, (node_id, dv) in sorted(values.items()):
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                errors.append(f"{node_id} ({asset}.{column}): status {dv.StatusCode.name}")
                continue
            v, why = _check(column, dv.Value.Value if dv.Value is not None else None)
            if why is not None:
                errors.append(f"{node_id} ({asset}): {why}")
            else:
                row[column] = v
        if not errors and self.key not in row:
            if self.key == C.TIMESTAMP:
                row[C.TIMESTAMP] = ts
            else:
                errors.append(f"{asset}: no cycle value at source timestamp {ts.isoformat()}")
        if errors:
            self.emit(self._bad(asset, ts, {nid: dv for nid, dv in values.values()}, "; ".join(errors)))
        else:
            self.emit(Message(source=self.source, raw=json.dumps(row, default=str).encode(), rows=[row]))

    def _bad(self, asset: str | None, ts: datetime | None, values: dict[str, Any], why: str) -> Message:
        raw = {"asset": asset, "source_timestamp": None if ts is None else ts.isoformat(), "values": {
            nid: {"column": getattr(self.by_id.get(nid), "column", None),
                  "value": repr(dv.Value.Value) if dv.Value is not None else None,
                  "type": dv.Value.VariantType.name if dv.Value is not None else None,
                  "status": dv.StatusCode.name if dv.StatusCode is not None else None}
            for nid, dv in values.items()}}
        return Message(source=self.source, raw=json.dumps(raw, sort_keys=True).encode(), error=why)


class _Handler:
    def __init__(self, owner: "OpcuaBridgeSource") -> None:
        self.owner = owner

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:  # noqa: ARG002 - asyncua API
        self.owner._on_value(node.nodeid.to_string(), data.monitored_item.Value)

    def status_change_notification(self, status: Any) -> None:
        log.warning("OPC UA subscription status: %s", status)


class OpcuaBridgeSource:
    """Subscribes the mapped nodes of one server and puts assembled rows into the buffer.

    Args:
        cfg: The ``opcua`` section.
        buffer: The bridge's buffer.
        committed: Returns the lake's highest committed cycle per asset (the watermark after a restart).
    """

    def __init__(self, cfg: OpcuaSource, buffer: Buffer,
                 committed: Callable[[list[str]], dict[str, Any]] | None = None, key: str = C.TIME) -> None:
        self.cfg, self.buffer = cfg, buffer
        self.committed = committed or (lambda assets: {})
        self.source = cfg.endpoint
        self.key = key
        self._out: queue.Queue[Message | None] = queue.Queue()
        self.assembler = RowAssembler(cfg.nodes, self._out.put, cfg.endpoint, key=key)
        self.connected = threading.Event()
        self.connects = 0
        self.caught_up = 0  # values read from the history
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._held: list[tuple[str, Any]] | None = None  # live values during a catch-up
        self._first = True
        self.last_error: str | None = None  # why the last session attempt failed (for a clear start error)
        self._trust: _TrustList | None = None

    # --- asyncio side ---------------------------------------------------------------------------

    def _on_value(self, node_id: str, dv: Any) -> None:
        if self._held is not None:
            self._held.append((node_id, dv))
        else:
            self.assembler.add(node_id, dv)

    async def _catch_up(self, client: Any) -> None:
        """Read each asset's values after its watermark from the history, through the assembler."""
        from asyncua import ua

        now = datetime.now(timezone.utc) + timedelta(days=1)
        nodes_of: dict[str, dict[str, str]] = {}
        for nid, n in self.assembler.by_id.items():
            nodes_of.setdefault(n.asset, {})[n.column] = nid
        cycles = self.committed(sorted(nodes_of)) if self._first else {}
        for asset, cols in sorted(nodes_of.items()):
            since = self.assembler.last.get(asset)
            start = (since + timedelta(microseconds=1)) if since is not None else _EPOCH
            # The node whose history says which rows were missed: the clock's, else (a timestamp clock
            # keyed by source timestamps) the asset's first node.
            lead = self.key if self.key in cols else (sorted(cols)[0] if self.key == C.TIMESTAMP else None)
            if lead is None:
                continue
            try:
                hist = await client.get_node(cols[lead]).read_raw_history(start, now)
            except ua.UaStatusCodeError as exc:  # the server keeps no history: go on live, say what is lost
                log.error("OPC UA %s: no history for %s (%s): samples missed while disconnected are lost",
                          self.source, cols[lead], exc)
                continue
            if since is None and asset in cycles:  # after a restart: what the lake does not hold yet
                if lead == C.TIME:
                    hist = [dv for dv in hist if isinstance(dv.Value.Value, (int, float))
                            and dv.Value.Value > cycles[asset]]
                elif lead == C.TIMESTAMP:
                    hist = [dv for dv in hist if isinstance(dv.Value.Value, datetime)
                            and _aware(dv.Value.Value) > _aware(cycles[asset])]
                else:
                    hist = [dv for dv in hist if _aware(dv.SourceTimestamp) > _aware(cycles[asset])]
            if not hist:
                continue
            first = min(_aware(dv.SourceTimestamp) for dv in hist)
            end = max(_aware(dv.SourceTimestamp) for dv in hist)
            values = [(cols[lead], dv) for dv in hist]
            for col, nid in cols.items():
                if col != lead:
                    try:
                        values += [(nid, dv) for dv in await client.get_node(nid).read_raw_history(first, end)]
                    except ua.UaStatusCodeError as exc:
                        log.error("OPC UA %s: no history for %s (%s)", self.source, nid, exc)
            values.sort(key=lambda v: _aware(v[1].SourceTimestamp))
            for nid, dv in values:
                self.assembler.add(nid, dv)
            self.caught_up += len(values)
            log.info("OPC UA %s: caught up %d value(s) of %s from the history", self.source, len(values), asset)
        self._first = False

    async def _secure(self, client: Any) -> None:
        """Security policy, certificates, trust list and user login of a new client, per the config."""
        from asyncua import ua

        cfg = self.cfg
        client.application_uri = cfg.application_uri
        if cfg.security_policy != "None":
            from asyncua.crypto import security_policies as sp

            policy = {"Basic256Sha256": sp.SecurityPolicyBasic256Sha256,
                      "Aes128Sha256RsaOaep": sp.SecurityPolicyAes128Sha256RsaOaep,
                      "Aes256Sha256RsaPss": sp.SecurityPolicyAes256Sha256RsaPss}[cfg.security_policy]
            mode = ua.MessageSecurityMode.SignAndEncrypt if cfg.security_mode == "SignAndEncrypt" \
                else ua.MessageSecurityMode.Sign
            await client.set_security(policy, certificate=str(Path(cfg.certificate).expanduser()),
                                      private_key=str(Path(cfg.private_key).expanduser()),
                                      private_key_password=cfg.private_key_password.get_secret_value()
                                      if cfg.private_key_password else None, mode=mode)
            self._trust = client.certificate_validator = _TrustList(cfg.trusted_server_certificates)
        user, pw = opcua_credentials(cfg)
        if user:
            # asyncua's client logs every request it sends at DEBUG, ActivateSession's password included:
            # never at DEBUG while it holds a credential of ours.
            wire = logging.getLogger("asyncua.client.ua_client")
            if wire.getEffectiveLevel() < logging.INFO:
                wire.setLevel(logging.INFO)
            client.set_user(user)
            if pw is not None:
                client.set_password(pw)

    async def _session(self) -> None:
        from asyncua import Client, ua

        client = Client(self.cfg.endpoint, timeout=self.cfg.request_timeout_s)
        await self._secure(client)
        await client.connect()
        try:
            sub = await client.create_subscription(self.cfg.publishing_interval_ms, _Handler(self))
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValueTimestamp  # repeats of a value still report
            self._held = []
            nodes = [client.get_node(nid) for nid in self.assembler.by_id]
            # Subscription._subscribe is the one call that takes a filter (subscribe_data_change has none).
            handles = await sub._subscribe(nodes, ua.AttributeIds.Value, flt, self.cfg.queue_size,
                                           sampling_interval=self.cfg.sampling_interval_ms)
            for nid, h in zip(self.assembler.by_id, handles):
                if isinstance(h, ua.StatusCode):
                    log.error("OPC UA %s: cannot monitor %s (%s); its asset's rows go without it", self.source,
                              nid, h.name)
                    self.assembler.drop_column(nid)
            await self._catch_up(client)
            held, self._held = self._held, None
            for nid, dv in held:
                self.assembler.add(nid, dv)
            self.connects += 1
            self.connected.set()
            clock = client.get_node(ua.ObjectIds.Server_ServerStatus_CurrentTime)
            while not self._stop.is_set():
                await asyncio.sleep(self.cfg.health_interval_s)
                await asyncio.wait_for(clock.read_value(), self.cfg.request_timeout_s)
        finally:
            self._held = None
            self.connected.clear()
            try:
                await asyncio.wait_for(client.disconnect(), 2.0)
            except Exception:  # noqa: BLE001 - the server is gone; drop the client
                pass

    async def _main(self) -> None:
        delay = self.cfg.reconnect_min_s
        while not self._stop.is_set():
            try:
                await self._session()
                delay = self.cfg.reconnect_min_s
            except Exception as exc:  # noqa: BLE001 - any failure of a session: reconnect
                trust, self._trust = self._trust, None
                if trust is not None and trust.refused:
                    self.last_error = (f"BadCertificateUntrusted (the server's certificate {trust.refused!r} is not in "
                                       "trusted_server_certificates)")
                else:
                    self.last_error = _describe(exc)
                log.warning("OPC UA %s: %s; reconnecting in %.1fs", self.source, self.last_error, delay)
                t_end = asyncio.get_running_loop().time() + delay
                while not self._stop.is_set() and asyncio.get_running_loop().time() < t_end:
                    await asyncio.sleep(0.05)
                delay = min(delay * 2, self.cfg.reconnect_max_s)

    # --- threads --------------------------------------------------------------------------------

    def _forward(self) -> None:
        while True:
            m = self._out.get()
            if m is None:
                return
            self.buffer.put(m)  # may block (buffer full): only this thread waits

    def start(self, timeout_s: float = 30.0) -> None:
        """Connect, subscribe and catch up from the history, then keep the session (reconnecting) in a thread.

        Raises:
            ServiceUnavailable: no session within ``timeout_s``.
        """
        self._stop.clear()
        self._threads = [threading.Thread(target=lambda: asyncio.run(self._main()), name="opcua-source", daemon=True),
                         threading.Thread(target=self._forward, name="opcua-forward", daemon=True)]
        for t in self._threads:
            t.start()
        if not self.connected.wait(timeout_s):
            self.stop()
            why = f": {self.last_error}" if self.last_error else ""
            raise ServiceUnavailable(f"OPC UA server {self.source} did not accept a session in {timeout_s:g}s{why}")

    def alive(self) -> str | None:
        """None while the session and forwarder threads run; else why the source is dead."""
        if not self._threads or not all(t.is_alive() for t in self._threads):
            return f"OPC UA source {self.source}: its thread stopped"
        return None

    def state(self) -> dict[str, Any]:
        """Per-source state for the heartbeat and ``twinflow stream status``."""
        return {"source": self.source, "connected": self.connected.is_set(), "connects": self.connects,
                "caught_up": self.caught_up, "pending_rows": self._out.qsize()}

    def stop(self) -> None:
        """End the session; rows already assembled reach the buffer, pending ones are read again next start."""
        self._stop.set()
        if self._threads:
            self._threads[0].join(10)
            self._out.put(None)
            self._threads[1].join(10)
        self._threads = []
