"""``twinflow stream``: ``run`` the bridge from a config file, ``simulate`` a plant (MQTT and/or OPC UA),
``serve`` the bridge as a Prefect deployment."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register_commands", "stream_app"]

stream_app = typer.Typer(help="Plant data in real time: MQTT (JSON, Sparkplug B) and OPC UA into the lake.",
                         no_args_is_help=True)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@stream_app.command("bridge", help="The same as `run`.")
@stream_app.command("run")
def run_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Bridge config (YAML or JSON)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop after this long."),
) -> None:
    """Run the bridge until SIGTERM/Ctrl-C (buffered rows are committed first)."""
    from twinflow.settings import get_settings
    from twinflow.tasks.bridge.config import load_config
    from twinflow.tasks.bridge.run import run_bridge

    cfg = load_config(config)
    s = get_settings()
    stop = _stop_on_signals()
    stats = run_bridge(cfg, cfg.lake or s.lake_path, cfg.quarantine or s.quarantine_path, stop=stop,
                       max_seconds=max_seconds)
    typer.echo(json.dumps({"batches": stats.batches, "messages": stats.messages, "rows_written": stats.rows_written,
                           "rows_quarantined": stats.rows_quarantined, "redelivered": stats.redelivered}))


@stream_app.command("status")
def status_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Bridge config (YAML or JSON)."),
    stale_s: Optional[float] = typer.Option(None, "--stale", help="Seconds without a heartbeat after which a "
                                            "running bridge counts as dead (default 3 heartbeats)."),
) -> None:
    """Show the bridge's last heartbeat: state, per-source state, lag and last commit (JSON).

    Exits 1 when the bridge failed or its heartbeat is stale, 0 otherwise.
    """
    import time

    from twinflow.errors import ConfigError
    from twinflow.settings import get_settings
    from twinflow.tasks.bridge.config import load_config
    from twinflow.tasks.bridge.events import read_status

    cfg = load_config(config)
    lake = cfg.lake or get_settings().lake_path
    status = read_status(lake, cfg.bridge_id)
    if status is None:
        raise ConfigError(f"bridge {cfg.bridge_id!r} has never run on the lake {lake}")
    now = time.time()
    status["heartbeat_age_s"] = round(now - status["time"], 1)
    last = status.get("last_commit") or {}
    status["since_last_commit_s"] = None if not last.get("time") else round(now - last["time"], 1)
    for src in status.get("sources", []):
        lm = src.get("last_message")
        src["lag_s"] = None if lm is None or not last.get("time") else round(max(0.0, lm - last["time"]), 1)
    limit = stale_s if stale_s is not None else 3 * cfg.heartbeat_s
    if status["state"] == "running" and status["heartbeat_age_s"] > limit:
        status["state"] = "stale"
        status["reason"] = f"no heartbeat for {status['heartbeat_age_s']:g}s (process gone or hung)"
    typer.echo(json.dumps(status, indent=1, default=str))
    if status["state"] in ("failed", "stale"):
        # SystemExit, not typer.Exit: twinflow's main runs click without standalone mode, which turns
        # typer.Exit into a return value.
        raise SystemExit(1)


@stream_app.command("simulate")
def simulate_cmd(
    mqtt: Optional[str] = typer.Option(None, "--mqtt", help="Broker host:port to publish to."),
    fmt: str = typer.Option("json", "--format", help="json or sparkplug."),
    opcua: Optional[str] = typer.Option(None, "--opcua", help="Serve OPC UA nodes at this endpoint "
                                                             "(opc.tcp://127.0.0.1:4840)."),
    units: int = typer.Option(5, "--units", help="C-MAPSS units to replay."),
    max_cycles: Optional[int] = typer.Option(None, "--max-cycles", help="Cycles per unit (default all)."),
    rate: float = typer.Option(100.0, "--rate", help="Messages (rows) per second."),
    data: Optional[Path] = typer.Option(None, "--data", help="C-MAPSS file (default FD001 train)."),
    config_out: Optional[Path] = typer.Option(None, "--write-config", help="With --opcua: write the node "
                                                                         "mapping as a bridge config here."),
    channels: Optional[str] = typer.Option(None, "--channels", help="With --opcua: comma-separated channels "
                                                                   "to serve (default all)."),
    linger: bool = typer.Option(True, "--linger/--no-linger", help="With --opcua: keep serving (and the "
                                                                  "history) after the last row, until SIGTERM."),
) -> None:
    """Replay C-MAPSS units as live MQTT messages or serve them as historized OPC UA nodes."""
    from twinflow.errors import ConfigError
    from twinflow.tasks.bridge.simulate import cmapss_rows, mqtt_messages, publish_mqtt

    if not mqtt and not opcua:
        raise ConfigError("give --mqtt host:port and/or --opcua endpoint")
    rows = cmapss_rows(data, units=units, max_cycles=max_cycles)
    stop = _stop_on_signals()
    if opcua and mqtt:
        raise ConfigError("give --mqtt or --opcua, not both (run two simulators)")
    if opcua:
        from twinflow.tasks.bridge.simulate import serve_opcua

        def ready(plant) -> None:
            section = plant.bridge_config()
            if config_out is not None:
                config_out.write_text(json.dumps({"bridge_id": "opcua", "opcua": section}, indent=2))
            # The node map first, one line, so a script can read it before the rows flow.
            typer.echo(json.dumps({"endpoint": opcua, "nodes": section["nodes"]}), nl=True)

        chans = [c.strip() for c in channels.split(",") if c.strip()] if channels else None
        from twinflow.contract import load_contract

        unknown = sorted(set(chans or []) - set(load_contract("cmapss").channel_names))
        if unknown:
            raise ConfigError(f"--channels: {unknown} are not channels of the data contract")
        n = serve_opcua(rows, opcua, rate=rate, channels=chans, stop=stop, on_ready=ready, linger=linger)
        typer.echo(json.dumps({"published": n}))
        return
    host, _, port = mqtt.partition(":")
    n = publish_mqtt(mqtt_messages(rows, fmt), host=host, port=int(port or 1883), rate=rate, stop=stop)
    typer.echo(json.dumps({"published": n}))


@stream_app.command("serve")
def serve_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Bridge config (YAML or JSON)."),
    start: bool = typer.Option(True, "--start/--no-start", help="Start a bridge run at once."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Each run stops after this long."),
) -> None:
    """Serve the bridge as a long-running Prefect deployment (stream-bridge/<bridge id>) until Ctrl-C."""
    from twinflow.flows.stream import serve_bridge

    serve_bridge(config, start=start, max_seconds=max_seconds)


def register_commands(app: typer.Typer) -> None:
    """Add ``twinflow stream`` to the main app."""
    app.add_typer(stream_app, name="stream")
