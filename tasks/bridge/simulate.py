"""A plant simulator for tests and the demo: C-MAPSS units replayed as live MQTT messages (and OPC UA
nodes, :func:`serve_opcua`), at a chosen rate.

Each C-MAPSS row (unit, cycle, 3 settings, 21 sensors) becomes one message: a JSON row on
``<prefix>/<asset>`` or a Sparkplug B ``DDATA`` on ``spBv1.0/<group>/DDATA/<edge>/<asset>``. Units are
interleaved cycle by cycle, as a fleet reports.
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

__all__ = ["cmapss_rows", "mqtt_messages", "publish_mqtt", "default_cmapss"]


def default_cmapss() -> Path:
    """The FD001 training file: the shared data folder's, else the bundled copy."""
    shared = Path("/work/shared/data/cmapss/train_FD001.txt")
    if shared.is_file():
        return shared
    from twinflow.data import cmapss_dir

    return cmapss_dir() / "train_FD001.txt.gz"


def cmapss_rows(path: str | Path | None = None, units: int | None = None, max_cycles: int | None = None,
                asset_prefix: str = "unit-") -> list[dict[str, Any]]:
    """C-MAPSS rows as contract rows, interleaved across units by cycle (``units``: the first N units)."""
    p = Path(path) if path else default_cmapss()
    opener = gzip.open if p.suffix == ".gz" else open
    by_unit: dict[int, list[dict[str, Any]]] = {}
    with opener(p, "rt") as fh:
        for line in fh:
            vals = line.split()
            if len(vals) < len(C.CMAPSS_COLUMNS):
                continue
            unit, cycle = int(vals[0]), int(vals[1])
            if units is not None and unit > units:
                continue
            if max_cycles is not None and cycle > max_cycles:
                continue
            row: dict[str, Any] = {C.ASSET: f"{asset_prefix}{unit}", C.TIME: cycle}
            row.update({c: float(v) for c, v in zip(C.CHANNELS, vals[2:2 + len(C.CHANNELS)])})
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
