"""The stream bridge as a Prefect flow, and serving it as a long-running deployment.

:func:`stream_bridge_flow` runs :func:`twinflow.tasks.bridge.run.run_bridge` from a bridge config file
and logs each committed batch to the flow run; its events (``twinflow.stream.batch.committed``,
``twinflow.stream.data.ready``) carry the flow run as a related resource. ``twinflow stream serve
--config bridge.yaml`` (:func:`serve_bridge`) registers it as deployment ``stream-bridge/<bridge id>``,
starts one run and serves it: the run lasts until it is cancelled (or ``max_seconds``), the serving
process until Ctrl-C. Cancelling or killing the run loses nothing: messages are acknowledged to the
broker only after their lake commit, so the next run gets the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

log = logging.getLogger("twinflow.bridge")

__all__ = ["DEPLOYMENT_FLOW", "bridge_deployment", "serve_bridge", "stream_bridge_flow"]

DEPLOYMENT_FLOW = "stream-bridge"


@flow(name=DEPLOYMENT_FLOW, validate_parameters=True, log_prints=False)
def stream_bridge_flow(config_path: str, max_seconds: float | None = None) -> dict[str, Any]:
    """Run the stream bridge of a config file until cancelled (or for ``max_seconds``).

    Args:
        config_path: Bridge config (YAML or JSON, :class:`twinflow.tasks.bridge.config.BridgeConfig`).
        max_seconds: Stop after this long (buffered rows are committed first); None: until cancelled.

    Returns:
        The run's totals (batches, messages, rows written/quarantined, redelivered, data-ready events).
    """
    from twinflow.settings import get_settings
    from twinflow.tasks.bridge.config import load_config
    from twinflow.tasks.bridge.run import run_bridge

    logger = get_run_logger()
    cfg = load_config(config_path)
    s = get_settings()
    lake, quarantine = cfg.lake or s.lake_path, cfg.quarantine or s.quarantine_path
    logger.info("bridge %s: %s -> lake %s dataset %s", cfg.bridge_id, config_path, lake, cfg.dataset)

    def on_batch(res: Any) -> None:
        logger.info("batch %d: %d message(s), %d row(s) to %s v%s, %d quarantined, %d redelivered; assets %s",
                    res.seq, res.messages, res.rows_written, cfg.dataset, res.version, res.rows_quarantined,
                    res.redelivered, res.assets)

    stats = run_bridge(cfg, lake, quarantine, on_batch=on_batch, max_seconds=max_seconds)
    out = {"bridge_id": cfg.bridge_id, "dataset": cfg.dataset, "batches": stats.batches,
           "messages": stats.messages, "rows_written": stats.rows_written,
           "rows_quarantined": stats.rows_quarantined, "redelivered": stats.redelivered,
           "version": None if stats.last is None else stats.last.version,
           "data_ready_events": 0 if stats.ready is None else len(stats.ready.events)}
    logger.info("bridge %s stopped: %s", cfg.bridge_id, out)
    return out


def bridge_deployment(config_path: str | Path, max_seconds: float | None = None) -> Any:
    """The bridge's deployment (``stream-bridge/<bridge id>``) for ``serve``; the config is read first.

    Raises:
        ConfigError: the config file is missing or invalid.
    """
    from prefect.deployments.runner import EntrypointType

    from twinflow.tasks.bridge.config import load_config

    path = Path(config_path).resolve()
    cfg = load_config(path)
    return stream_bridge_flow.to_deployment(
        name=cfg.bridge_id,
        description=f"Stream bridge {cfg.bridge_id!r}: MQTT/OPC UA -> lake dataset {cfg.dataset!r} (long-running).",
        parameters={"config_path": str(path), "max_seconds": max_seconds},
        tags=["twinflow", "stream", "io"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_bridge(config_path: str | Path, *, start: bool = True, max_seconds: float | None = None,
                 settings: Any = None) -> None:
    """Serve the bridge's deployment from this process until interrupted (blocks).

    Args:
        config_path: Bridge config file.
        start: Create a run at once (otherwise it waits for one from the UI/API).
        max_seconds: Each run's ``max_seconds`` (None: until cancelled).
        settings: twinflow settings (default: from the environment).
    """
    from prefect import serve
    from prefect.client.orchestration import get_client

    from twinflow import runtime

    dep = bridge_deployment(config_path, max_seconds)
    with runtime.start(settings, cluster=False, mlflow=False, heartbeats=True):
        dep_id = dep.apply()
        if start:
            with get_client(sync_client=True) as client:
                run = client.create_flow_run_from_deployment(dep_id)
            log.info("bridge run %s created", run.name)
        serve(dep, print_starting_message=True)
