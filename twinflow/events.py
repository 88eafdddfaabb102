"""twinflow's Prefect events: their names, resources, and one safe way to emit them.

- ``twinflow.stream.batch.committed`` on ``twinflow.dataset.<name>``: one per committed micro-batch;
  payload seq, version (Delta table version), rows, assets (asset -> rows), quarantined, redelivered.
- ``twinflow.stream.data.ready`` on ``twinflow.dataset.<name>``: >= M assets have >= N new cycles;
  payload dataset, version, assets (the ready ones -> new cycles), counts (all), min_cycles, min_assets.
- ``twinflow.model.promoted`` on ``twinflow.model.<registered name>``: a new champion; payload model,
  version, run_id, decision (mode, reason, RMSEs, previous champion).

- ``twinflow.asset.at_risk`` on ``twinflow.asset.<dataset>.<asset>``: an asset entered a risk band at or
  above the alert band (once per band rise, see :mod:`twinflow.tasks.health.alerts`); payload dataset,
  asset, band, p_failure, horizon, due_by, action, run_key.
- ``twinflow.model.drift`` on ``twinflow.model.<registered name>``: recent channel distributions of a
  dataset moved away from the champion's training data; payload dataset, version, model, model_version,
  channels (channel -> PSI/KS), threshold.

The bridge emits the first two (:mod:`twinflow.tasks.bridge.events`), the promotion gate the third
(:mod:`twinflow.tasks.registry`); :mod:`twinflow.deployments.triggers` turns the last two into runs.
Events are advisory: the lake commit or the registry write they announce has already happened, so
:func:`emit` never raises, and it does nothing without a configured ``PREFECT_API_URL`` (Prefect
would otherwise start an ephemeral API server in this process just to drop the event into it).
"""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("twinflow.events")

__all__ = ["ASSET_AT_RISK", "BATCH_COMMITTED", "DATA_READY", "MODEL_DRIFT", "MODEL_PROMOTED", "asset_resource", "dataset_resource", "emit", "emit_model_promoted", "event_id",
           "flush", "model_resource", "read_events"]

BATCH_COMMITTED = "twinflow.stream.batch.committed"
DATA_READY = "twinflow.stream.data.ready"
MODEL_PROMOTED = "twinflow.model.promoted"
ASSET_AT_RISK = "twinflow.asset.at_risk"
MODEL_DRIFT = "twinflow.model.drift"


def dataset_resource(dataset: str, **labels: str) -> dict[str, str]:
    """The event resource of a lake dataset (``twinflow.dataset.<name>``)."""
    return {"prefect.resource.id": f"twinflow.dataset.{dataset}", "prefect.resource.name": dataset, **labels}


def model_resource(name: str, **labels: str) -> dict[str, str]:
    """The event resource of a registered model (``twinflow.model.<name>``)."""
    return {"prefect.resource.id": f"twinflow.model.{name}", "prefect.resource.name": name, **labels}


def asset_resource(dataset: str, asset: str, **labels: str) -> dict[str, str]:
    """The event resource of one asset of a dataset (``twinflow.asset.<dataset>.<asset>``)."""
    return {"prefect.resource.id": f"twinflow.asset.{dataset}.{asset}", "prefect.resource.name": asset,
            "twinflow.dataset": dataset, **labels}


def _api_url() -> str | None:
    """The Prefect API of this context, else of the environment.

    A thread started outside Prefect's settings context sees the settings of Prefect's import time,
    which may predate ``PREFECT_API_URL`` (twinflow exports it when it starts or finds the server).
    """
    try:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL") or None
    except Exception:  # noqa: BLE001 - no Prefect settings: no API
        return None


def _api_configured() -> bool:
    return _api_url() is not None


@contextmanager
def _api_context() -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = _api_url()
    if url and PREFECT_API_URL.value() != url:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    else:
        yield


def event_id(*parts: Any) -> uuid.UUID:
    """A deterministic event id: the same announcement sent twice (a retry after a crash) is one event.

    The Prefect server stores an event once per id, and its triggers act on an id once.
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, "twinflow:" + "/".join(str(p) for p in parts))


def emit(event: str, resource: dict[str, str], payload: dict[str, Any] | None = None,
         related: list[dict[str, str]] | None = None, id: uuid.UUID | None = None) -> Any:
    """Emit a Prefect event; never raises.

    Inside a flow or task run Prefect adds the run (and its flow, deployment) as related resources.
    ``id``: see :func:`event_id` (default: a random one).

    Returns:
        The emitted ``prefect.events.Event``, or None (no ``PREFECT_API_URL``, or emitting failed:
        logged as a warning).
    """
    if not _api_configured():
        log.debug("no Prefect API configured: %s not emitted", event)
        return None
    try:
        from prefect.events import emit_event

        kwargs = {} if id is None else {"id": id}
        with _api_context():
            return emit_event(event=event, resource=resource, payload=payload, related=related, **kwargs)
    except Exception as exc:  # noqa: BLE001 - what the event announces is done; the event is advisory
        log.warning("could not emit %s: %s", event, exc)
        return None


def flush(timeout_s: float = 10.0) -> None:
    """Wait until the events emitted so far are sent (short-lived processes, tests)."""
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout_s, at_exit=False)
    except Exception as exc:  # noqa: BLE001 - nothing to flush, or the API is gone
        log.debug("flushing events: %s", exc)


def emit_model_promoted(name: str, version: str, run_id: str | None, decision: dict[str, Any]) -> Any:
    """Announce a new champion: ``twinflow.model.promoted`` on ``twinflow.model.<name>`` (never raises).

    Args:
        name: The registered model.
        version: The version that became champion.
        run_id: The MLflow run that trained it.
        decision: The gate's decision (mode, reason, RMSEs, the previous champion).
    """
    return emit(MODEL_PROMOTED, model_resource(name),
                {"model": name, "version": str(version), "run_id": run_id, "decision": decision},
                id=event_id(MODEL_PROMOTED, name, version))


def read_events(names: list[str], resource_prefix: str | None = None, limit: int = 200) -> list[Any]:
    """Events of these names (a trailing ``*``: a prefix) from the Prefect API, oldest first.

    Args:
        names: Event names, or prefixes (``["twinflow.stream.*"]``), not both.
        resource_prefix: Only events whose resource id starts with this (``twinflow.dataset.stream``).
        limit: Most events read (all pages).

    Raises:
        ServiceUnavailable: no Prefect API configured.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from twinflow.errors import ServiceUnavailable

    if not _api_configured():
        raise ServiceUnavailable("no Prefect API configured (PREFECT_API_URL) to read events from")
    exact = [n for n in names if not n.endswith("*")]
    prefixes = [n[:-1] for n in names if n.endswith("*")]
    if exact and prefixes:  # the API ANDs a name filter with a prefix filter
        raise ValueError("give event names or prefixes (trailing *), not both")
    filt = EventFilter(event=EventNameFilter(name=exact or None, prefix=prefixes or None),
                       resource=EventResourceFilter(id_prefix=[resource_prefix]) if resource_prefix else None)
    out: list[Any] = []
    with _api_context(), get_client(sync_client=True) as client:
        page = client.read_events(filter=filt, limit=min(limit, 50))  # the API pages by <= 50
        out.extend(page.events)
        while page.next_page and len(out) < limit:
            page = client.read_events_page(page.next_page)
            out.extend(page.events)
    return sorted(out[:limit], key=lambda e: e.occurred)
