"""Prefect events of the bridge: one ``twinflow.stream.batch.committed`` per committed micro-batch, and
``twinflow.stream.data.ready`` when enough new data arrived to retrain.

The events' resource is the dataset (``twinflow.dataset.<name>``). The batch event's payload says
which assets got how many rows and the table version readers can pin.

"Enough new data" is ">= N new cycles for each of >= M assets" (``BridgeConfig.ready_min_cycles`` /
``ready_min_assets``). A Prefect trigger counts events, not cycles per asset, so the bridge counts:
:class:`ReadyTracker` keeps each asset's new cycles since the last ``data.ready`` event (every row the
committer writes is a new (asset, cycle) key: redeliveries are dropped before the commit), and emits
the event, with the counts and the table version, when the rule holds; then the counts start again
from zero. ``deployments/triggers.py`` turns that event into a features+train run.

The counts are kept in ``<lake>/_bridge-<id>-ready.json`` (a file beside a local lake's tables, an
object under an ``s3://`` lake's prefix, where a bridge restarted on another host finds them) together
with the table version they include. Each commit also records its per-asset rows in the Delta commit metadata
(``twinflow.assets``), so a bridge that crashed after a commit but before saving its counts adds the
commits it missed from the table history when it starts again: the counts are exact across restarts.
A crash between emitting ``data.ready`` and saving the reset counts emits the event again after the
restart, with the same event id (derived from dataset, bridge and version), which Prefect drops.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from twinflow import events as ev
from twinflow import lake as lk
from twinflow.errors import TwinflowError
from twinflow.tasks.bridge.commit import BatchResult

log = logging.getLogger("twinflow.bridge")

__all__ = ["BATCH_EVENT", "HEARTBEAT_EVENT", "READY_EVENT", "ReadyTracker", "batch_event", "emit_batch",
           "emit_heartbeat", "read_status", "ready_state_path", "status_path", "write_status"]

BATCH_EVENT = ev.BATCH_COMMITTED
READY_EVENT = ev.DATA_READY
HEARTBEAT_EVENT = "twinflow.stream.heartbeat"
ASSETS_METADATA = "twinflow.assets"  # commit metadata key: JSON {asset: rows written}


def batch_event(res: BatchResult, dataset: str, bridge_id: str) -> dict[str, Any]:
    """The event (:func:`twinflow.events.emit` keyword arguments) announcing a committed batch."""
    return dict(
        event=BATCH_EVENT,
        resource=ev.dataset_resource(dataset, **{"twinflow.bridge": bridge_id}),
        payload={"seq": res.seq, "version": res.version, "rows": res.rows_written,
                 "quarantined": res.rows_quarantined, "redelivered": res.redelivered,
                 "assets": res.assets, "max_cycle": res.max_cycle},
        id=ev.event_id(BATCH_EVENT, dataset, bridge_id, res.seq),
    )


def emit_batch(res: BatchResult, dataset: str, bridge_id: str) -> Any:
    """Emit the batch event (a no-op without a Prefect API); never fails the bridge."""
    return ev.emit(**batch_event(res, dataset, bridge_id))


def _status_name(bridge_id: str) -> str:
    return f"bridge-{bridge_id}-status.json"


def _ready_name(bridge_id: str) -> str:
    return f"bridge-{bridge_id}-ready.json"


def status_path(lake_path: str, bridge_id: str) -> Path:
    """Where a running bridge writes its state every heartbeat on a local lake (read by ``twinflow stream
    status``); on an object store it is the object of the same name under the lake's prefix."""
    return lk.meta_path(lake_path, _status_name(bridge_id))


def write_status(lake_path: str, bridge_id: str, status: dict[str, Any],
                 storage_options: dict[str, Any] | None = None) -> None:
    """Replace the bridge's status atomically (a reader never sees half of it), beside the lake's tables:
    every host that can reach the lake reads it."""
    try:
        lk.write_meta_object(lake_path, _status_name(bridge_id), json.dumps(status, default=str, indent=1).encode(),
                             storage_options)
    except (OSError, TwinflowError) as exc:  # the status is for people; it must not stop the stream
        log.warning("bridge %s: status not written (%s)", bridge_id, exc)


def read_status(lake_path: str, bridge_id: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The bridge's last status (None: it never ran on this lake)."""
    data = lk.read_meta_object(lake_path, _status_name(bridge_id), storage_options)
    return None if data is None else json.loads(data)


def emit_heartbeat(status: dict[str, Any]) -> Any:
    """Emit ``twinflow.stream.heartbeat`` with the bridge's state (a no-op without a Prefect API)."""
    return ev.emit(event=HEARTBEAT_EVENT,
                   resource=ev.dataset_resource(status["dataset"], **{"twinflow.bridge": status["bridge_id"]}),
                   payload=status)


def ready_state_path(lake_path: str, bridge_id: str) -> Path:
    """Where a bridge keeps its new-cycle counts beside a local lake's tables (on an object store: the
    object of the same name under the lake's prefix)."""
    return lk.meta_path(lake_path, _ready_name(bridge_id))


class ReadyTracker:
    """Counts new cycles per asset and emits ``twinflow.stream.data.ready`` when the rule holds.

    Args:
        lake_path: The lake the bridge commits to.
        dataset: Its dataset.
        bridge_id: The bridge (its commits carry batch ids ``<bridge_id>-<seq>``).
        min_cycles: N: new cycles an asset needs to count as ready.
        min_assets: M: ready assets needed for the event.
        emit: Emit events (off: only count, e.g. ``emit_events: false``).
        storage_options: The lake's object-store options (None: the settings').
    """

    def __init__(self, lake_path: str, dataset: str, bridge_id: str, min_cycles: int, min_assets: int,
                 emit: bool = True, storage_options: dict[str, Any] | None = None) -> None:
        self.lake_path, self.dataset, self.bridge_id = lake_path, dataset, bridge_id
        self.min_cycles, self.min_assets, self.emit = min_cycles, min_assets, emit
        self.storage_options = storage_options
        self.counts: dict[str, int] = {}
        self.version: int | None = None  # the newest table version the counts include
        self.events: list[dict[str, Any]] = []  # payloads emitted by this tracker (tests, logs)
        self._load()
        self._catch_up()

    def _load(self) -> None:
        data = lk.read_meta_object(self.lake_path, _ready_name(self.bridge_id), self.storage_options)
        if data is None:
            # First start: count from the table as it is now (older rows are not "new").
            self.version = lk.version(self.lake_path, self.dataset, self.storage_options)
            return
        state = json.loads(data)
        if state.get("dataset") != self.dataset:
            log.warning("bridge %s: ready counts of dataset %r ignored (now %r)", self.bridge_id,
                        state.get("dataset"), self.dataset)
            self.version = lk.version(self.lake_path, self.dataset, self.storage_options)
            return
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self.version = state.get("version")

    def _catch_up(self) -> None:
        """Add this bridge's commits newer than the saved counts (a crash before they were saved)."""
        latest = lk.version(self.lake_path, self.dataset, self.storage_options)
        if latest is None or (self.version is not None and latest <= self.version):
            return
        missed = latest - (self.version if self.version is not None else -1)
        added, last = 0, None
        for c in lk.history(self.lake_path, self.dataset, limit=missed, storage_options=self.storage_options):
            v = c.get("version")
            if v is None or (self.version is not None and v <= self.version):
                continue
            if c.get("twinflow.operation") != "stream" or \
                    not str(c.get("twinflow.batch_id", "")).startswith(f"{self.bridge_id}-"):
                continue
            for asset, n in json.loads(c.get(ASSETS_METADATA) or "{}").items():
                self.counts[asset] = self.counts.get(asset, 0) + int(n)
                added += int(n)
            last = v if last is None else max(last, v)
        log.info("bridge %s: %d new cycle(s) from commits after version %s added to the ready counts",
                 self.bridge_id, added, self.version)
        self.version = latest
        if last is not None:
            self._check(last)  # the rule may hold already (the crash came before its event)
        else:
            self._save()

    def _save(self) -> None:
        # A crash leaves the old counts or the new ones, never half.
        lk.write_meta_object(self.lake_path, _ready_name(self.bridge_id), json.dumps(
            {"dataset": self.dataset, "version": self.version, "counts": self.counts,
             "min_cycles": self.min_cycles, "min_assets": self.min_assets}).encode(), self.storage_options)

    def ready(self) -> dict[str, int]:
        """The assets with at least N new cycles, and their counts."""
        return {a: n for a, n in self.counts.items() if n >= self.min_cycles}

    def add(self, res: BatchResult) -> dict[str, Any] | None:
        """Count a committed batch; emit ``data.ready`` (and start counting again) when the rule holds.

        Returns:
            The event's payload when the rule held, else None.
        """
        if not res.rows_written or res.version is None:
            return None
        for asset, n in res.assets.items():
            self.counts[asset] = self.counts.get(asset, 0) + int(n)
        self.version = res.version
        return self._check(res.version)

    def _check(self, version: int) -> dict[str, Any] | None:
        """Emit the event if the rule holds at ``version`` (then reset); save the counts either way."""
        ready = self.ready()
        payload = None
        if len(ready) >= self.min_assets:
            payload = {"dataset": self.dataset, "version": version, "assets": dict(sorted(ready.items())),
                       "counts": dict(sorted(self.counts.items())), "min_cycles": self.min_cycles,
                       "min_assets": self.min_assets, "bridge": self.bridge_id}
            if self.emit:
                # Emitted before the reset is saved: a crash in between re-emits it after the restart
                # (same version, same id), so it is never lost.
                ev.emit(READY_EVENT, ev.dataset_resource(self.dataset, **{"twinflow.bridge": self.bridge_id}),
                        payload, id=ev.event_id(READY_EVENT, self.dataset, self.bridge_id, version))
            log.info("bridge %s: %d asset(s) with >= %d new cycles at version %d: data ready", self.bridge_id,
                     len(ready), self.min_cycles, version)
            self.events.append(payload)
            self.counts = {}
        self._save()
        return payload
