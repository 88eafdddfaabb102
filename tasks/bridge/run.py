"""The bridge's main loop: start the sources, commit micro-batches, emit events, stop cleanly.

``twinflow stream run --config bridge.yaml`` runs :func:`run_bridge` until SIGTERM/SIGINT (it then
commits what is buffered and disconnects); :func:`twinflow.flows.stream.stream_bridge_flow` is the same
as a Prefect flow, served as a long-running deployment by ``twinflow stream serve``. One bridge id runs at a time per lake (a lock beside the
tables), since its commits' transaction sequence is its own.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from twinflow import lake as lk
from twinflow.locks import hold
from twinflow.tasks.bridge.buffer import Buffer
from twinflow.tasks.bridge.commit import BatchResult, Committer
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.events import ReadyTracker, emit_batch

log = logging.getLogger("twinflow.bridge")

__all__ = ["BridgeStats", "run_bridge"]


@dataclass
class BridgeStats:
    """Totals of one bridge run."""

    batches: int = 0
    messages: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    redelivered: int = 0
    backpressure_s: float = 0.0
    last: BatchResult | None = None
    ready: ReadyTracker | None = None  # the new-data counts (None with emit_events off)
    started: float = field(default_factory=time.time)


def _sources(cfg: BridgeConfig, buffer: Buffer, lake_path: str) -> list[Any]:
    out: list[Any] = []
    if cfg.mqtt is not None:
        from twinflow.tasks.bridge.mqtt import MqttBridgeSource, check_topics

        check_topics(cfg.mqtt.topics)
        out.append(MqttBridgeSource(cfg.mqtt, buffer, cfg.mqtt.client_id or f"twinflow-bridge-{cfg.bridge_id}"))
    if cfg.opcua is not None:
        from twinflow.tasks.bridge.opcua import OpcuaBridgeSource, committed_cycles

        # After a restart the OPC UA source reads the history from the lake's highest committed cycles on.
        out.append(OpcuaBridgeSource(cfg.opcua, buffer,
                                     committed=lambda assets: committed_cycles(lake_path, cfg.dataset, assets)))
    return out


def run_bridge(cfg: BridgeConfig, lake_path: str, quarantine_path: str, stop: threading.Event | None = None,
               on_batch: Callable[[BatchResult], None] | None = None, max_seconds: float | None = None) -> BridgeStats:
    """Run the bridge until ``stop`` is set (or ``max_seconds`` pass).

    Args:
        cfg: The bridge configuration.
        lake_path: Lake root (local).
        quarantine_path: Quarantine root.
        stop: Set it to stop; the buffered messages are committed first.
        on_batch: Called after each committed batch (tests, benchmark).
        max_seconds: Stop after this long (None: run until ``stop``).

    Returns:
        The run's totals.
    """
    stop = stop or threading.Event()
    lk.local_path(lake_path).mkdir(parents=True, exist_ok=True)
    stats = BridgeStats()
    with hold(lk.meta_path(lake_path, f"bridge-{cfg.bridge_id}.lock"), timeout_s=0,
              what=f"stream bridge {cfg.bridge_id!r} on this lake"):
        committer = Committer(lake_path, quarantine_path, cfg.dataset, cfg.bridge_id, cfg.app_id,
                              compact_every=cfg.compact_every, compact_files=cfg.compact_files)
        ready = ReadyTracker(lake_path, cfg.dataset, cfg.bridge_id, cfg.ready_min_cycles, cfg.ready_min_assets,
                             emit=True) if cfg.emit_events else None
        stats.ready = ready
        buffer = Buffer(cfg.max_buffer_rows)
        sources = _sources(cfg, buffer, lake_path)
        log.info("bridge %s: dataset %s, next batch %d", cfg.bridge_id, cfg.dataset, committer.seq)
        started = []
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            for s in sources:
                s.start()
                started.append(s)
            while True:
                done = stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
                batch = buffer.take(cfg.batch_rows, 0.0 if done else cfg.flush_interval_s)
                if batch:
                    res = committer.commit(batch)
                    stats.batches += 1
                    stats.messages += res.messages
                    stats.rows_written += res.rows_written
                    stats.rows_quarantined += res.rows_quarantined
                    stats.redelivered += res.redelivered
                    stats.last = res
                    if cfg.emit_events and res.rows_written:
                        emit_batch(res, cfg.dataset, cfg.bridge_id)
                    if ready is not None:
                        ready.add(res)
                    if on_batch is not None:
                        on_batch(res)
                elif done:
                    break
        finally:
            for s in started:
                s.stop()
            buffer.close()
        stats.backpressure_s = buffer.blocked_s
    return stats
