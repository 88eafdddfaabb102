"""The bridge's main loop: start the sources, commit micro-batches, emit events, stop cleanly.

``twinflow stream run --config bridge.yaml`` runs :func:`run_bridge` until SIGTERM/SIGINT (it then
commits what is buffered and disconnects); :func:`twinflow.flows.stream.stream_bridge_flow` is the same
as a Prefect flow, served as a long-running deployment by ``twinflow stream serve``. One bridge id runs
at a time per lake, since its commits' transaction sequence is its own: a lock file beside a local
lake's tables, or on an ``s3://`` lake the same writer lease as ingest's (:func:`twinflow.lake.writer_lease`:
generation objects under ``<lake>/_bridge-<id>.lock/``, taken by a conditional put), so two bridges on
two hosts see each other. The status and the ready counts live beside the tables in the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from twinflow import lake as lk
from twinflow.errors import TwinflowError
from twinflow.tasks.bridge.buffer import Buffer
from twinflow.tasks.bridge.commit import BatchResult, Committer
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.decode import Decoder
from twinflow.tasks.bridge.events import ReadyTracker, emit_batch, emit_heartbeat, write_status

log = logging.getLogger("twinflow.bridge")

__all__ = ["BridgeStats", "SourceDied", "run_bridge"]


class SourceDied(TwinflowError):
    """A source's thread ended while the bridge was running (and restarting it was not allowed or failed)."""


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
    last_commit_at: float | None = None


def _source(kind: str, cfg: BridgeConfig, buffer: Buffer, lake_path: str, decoder: Decoder) -> Any:
    if kind == "mqtt":
        from twinflow.tasks.bridge.mqtt import MqttBridgeSource, check_topics

        check_topics(cfg.mqtt.topics)
        return MqttBridgeSource(cfg.mqtt, buffer, cfg.mqtt.client_id or f"twinflow-bridge-{cfg.bridge_id}",
                                decoder=decoder)
    from twinflow.tasks.bridge.opcua import OpcuaBridgeSource, committed_cycles

    key = decoder.contract.clock.key
    # After a restart the OPC UA source reads the history from the lake's highest committed times on.
    return OpcuaBridgeSource(cfg.opcua, buffer, key=key,
                             committed=lambda assets: committed_cycles(lake_path, cfg.dataset, assets, key=key))


def _sources(cfg: BridgeConfig, buffer: Buffer, lake_path: str, decoder: Decoder) -> list[tuple[str, Any]]:
    kinds = [k for k in ("mqtt", "opcua") if getattr(cfg, k) is not None]
    return [(k, _source(k, cfg, buffer, lake_path, decoder)) for k in kinds]


def _dead(source: Any) -> str | None:
    alive = getattr(source, "alive", None)
    return alive() if alive is not None else None


def run_bridge(cfg: BridgeConfig, lake_path: str, quarantine_path: str, stop: threading.Event | None = None,
               on_batch: Callable[[BatchResult], None] | None = None, max_seconds: float | None = None,
               on_start: Callable[[list[Any]], None] | None = None,
               storage_options: dict[str, Any] | None = None) -> BridgeStats:
    """Run the bridge until ``stop`` is set (or ``max_seconds`` pass).

    Args:
        cfg: The bridge configuration.
        lake_path: Lake root (a local folder or an object-store URL).
        quarantine_path: Quarantine root.
        stop: Set it to stop; the buffered messages are committed first.
        on_batch: Called after each committed batch (tests, benchmark).
        max_seconds: Stop after this long (None: run until ``stop``).
        on_start: Called with the started sources (tests).
        storage_options: The lake's object-store options (None: the settings').

    Returns:
        The run's totals.

    Raises:
        SourceDied: a source's thread ended (with ``source_failure: exit``, or after the restarts).
        AlreadyRunning: a bridge with this id runs on this lake already (on any host, for an object store).
        LeaseLost: on an object store, another bridge took the lease over (this one was stalled past
            its expiry); nothing more is committed.
    """
    so = storage_options
    stop = stop or threading.Event()
    if lk.is_local(lake_path):
        lk.local_path(lake_path).mkdir(parents=True, exist_ok=True)
    stats = BridgeStats()
    contract = cfg.fleet_contract()
    decoder = Decoder(contract, cfg.limits)
    with lk.writer_lease(lake_path, f"bridge-{cfg.bridge_id}.lock", timeout_s=0, storage_options=so,
                         what=f"stream bridge {cfg.bridge_id!r} on the lake {lake_path}") as lease:
        committer = Committer(lake_path, quarantine_path, cfg.dataset, cfg.bridge_id, cfg.app_id,
                              compact_every=cfg.compact_every, compact_files=cfg.compact_files, decoder=decoder,
                              storage_options=so)
        ready = ReadyTracker(lake_path, cfg.dataset, cfg.bridge_id, cfg.ready_min_cycles, cfg.ready_min_assets,
                             emit=True, storage_options=so) if cfg.emit_events else None
        stats.ready = ready
        buffer = Buffer(cfg.max_buffer_rows)
        sources = _sources(cfg, buffer, lake_path, decoder)
        log.info("bridge %s: dataset %s (contract %s), next batch %d", cfg.bridge_id, cfg.dataset,
                 contract.summary(), committer.seq)
        started: list[Any] = []
        restarts = 0
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        next_beat = time.monotonic() + cfg.heartbeat_s

        def beat(state: str, reason: str | None = None) -> None:
            status = {"bridge_id": cfg.bridge_id, "dataset": cfg.dataset, "state": state, "reason": reason,
                      "pid": os.getpid(), "time": time.time(), "started": stats.started,
                      "contract": contract.ref.model_dump(), "batches": stats.batches,
                      "messages": stats.messages, "rows_written": stats.rows_written,
                      "rows_quarantined": stats.rows_quarantined, "redelivered": stats.redelivered,
                      "buffered_rows": len(buffer), "source_restarts": restarts,
                      "last_commit": None if stats.last is None else {
                          "seq": stats.last.seq, "version": stats.last.version, "time": stats.last_commit_at},
                      "sources": [_state(k, s) for k, s in sources]}
            if lease is not None and lease.lost is not None:
                # The status object is the lease holder's now: a bridge that lost the lease says why in
                # its log and exit, not over its successor's status.
                log.error("bridge %s: %s; status left to the bridge that holds the lease", cfg.bridge_id, lease.lost)
            else:
                write_status(lake_path, cfg.bridge_id, status, so)
            if cfg.emit_events:
                emit_heartbeat(status)

        try:
            for _, s in sources:
                s.start()
                started.append(s)
            beat("running")
            if on_start is not None:
                on_start([s for _, s in sources])
            while True:
                done = stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
                if not done:
                    for i, (kind, s) in enumerate(sources):
                        why = _dead(s)
                        if why is None:
                            continue
                        if cfg.source_failure == "restart" and restarts < cfg.max_source_restarts:
                            restarts += 1
                            log.error("bridge %s: %s; restarting it (%d/%d)", cfg.bridge_id, why, restarts,
                                      cfg.max_source_restarts)
                            try:
                                s.stop()
                            except Exception:  # noqa: BLE001 - a dead source may not stop cleanly
                                pass
                            started.remove(s)
                            fresh = _source(kind, cfg, buffer, lake_path, decoder)
                            sources[i] = (kind, fresh)
                            fresh.start()
                            started.append(fresh)
                            continue
                        beat("failed", why)
                        raise SourceDied(f"stream bridge {cfg.bridge_id!r} stopped: {why}")
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + cfg.heartbeat_s
                    beat("running")
                batch = buffer.take(cfg.batch_rows, 0.0 if done else min(cfg.flush_interval_s, cfg.heartbeat_s))
                if batch:
                    if lease is not None:
                        lease.check()  # a bridge that lost its lease must not commit beside its successor
                    res = committer.commit(batch)
                    stats.batches += 1
                    stats.messages += res.messages
                    stats.rows_written += res.rows_written
                    stats.rows_quarantined += res.rows_quarantined
                    stats.redelivered += res.redelivered
                    stats.last = res
                    stats.last_commit_at = time.time()
                    if cfg.emit_events and res.rows_written:
                        emit_batch(res, cfg.dataset, cfg.bridge_id)
                    if ready is not None:
                        ready.add(res)
                    if on_batch is not None:
                        on_batch(res)
                elif done:
                    break
        except SourceDied:
            raise
        except BaseException as exc:
            beat("failed", f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            for s in started:
                try:
                    s.stop()
                except Exception as exc:  # noqa: BLE001 - stopping the others matters more
                    log.warning("bridge %s: stopping a source failed: %s", cfg.bridge_id, exc)
            buffer.close()
        stats.backpressure_s = buffer.blocked_s
        beat("stopped")
    return stats


def _state(kind: str, source: Any) -> dict[str, Any]:
    state = getattr(source, "state", None)
    out = state() if state is not None else {"source": getattr(source, "source", kind)}
    out["kind"] = kind
    out["alive"] = _dead(source) is None
    return out
