"""Prefect events of the bridge: one ``twinflow.stream.batch.committed`` per committed micro-batch.

The event's resource is the dataset (``twinflow.dataset.<name>``), so a deployment trigger can
count batches per dataset (see ``deployments/triggers.py``); the payload says which assets got how
many rows and the table version readers can pin.
"""

from __future__ import annotations

import logging
from typing import Any

from twinflow.tasks.bridge.commit import BatchResult

log = logging.getLogger("twinflow.bridge")

__all__ = ["BATCH_EVENT", "batch_event", "emit_batch"]

BATCH_EVENT = "twinflow.stream.batch.committed"


def batch_event(res: BatchResult, dataset: str, bridge_id: str) -> dict[str, Any]:
    """The event (``emit_event`` keyword arguments) announcing a committed batch."""
    return dict(
        event=BATCH_EVENT,
        resource={"prefect.resource.id": f"twinflow.dataset.{dataset}", "prefect.resource.name": dataset,
                  "twinflow.bridge": bridge_id},
        payload={"seq": res.seq, "version": res.version, "rows": res.rows_written,
                 "quarantined": res.rows_quarantined, "redelivered": res.redelivered,
                 "assets": res.assets, "max_cycle": res.max_cycle},
    )


def emit_batch(res: BatchResult, dataset: str, bridge_id: str) -> Any:
    """Emit the batch event (a no-op without a Prefect API); never fails the bridge."""
    try:
        from prefect.events import emit_event

        return emit_event(**batch_event(res, dataset, bridge_id))
    except Exception as exc:  # noqa: BLE001 - the lake commit is what matters; events are advisory
        log.warning("could not emit %s: %s", BATCH_EVENT, exc)
        return None
