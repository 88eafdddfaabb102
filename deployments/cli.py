"""CLI commands for deployments and blocks: ``serve``, ``backfill`` and ``blocks register|list``.

:func:`register_commands` adds them to twinflow's Typer app; ``python -m twinflow.deployments``
runs them standalone (same commands, same errors).
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer

__all__ = ["register_commands", "main"]


def _pairs(items: List[str], what: str) -> dict[str, str]:
    from twinflow.errors import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _json_values(pairs: dict[str, str]) -> dict:
    out: dict = {}
    for key, raw in pairs.items():
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _settings(config_block: Optional[str]):
    from twinflow.settings import get_settings

    if config_block:
        from twinflow.blocks import settings_from_block

        return settings_from_block(config_block)
    return get_settings()


def register_commands(app: typer.Typer) -> None:
    """Add ``serve``, ``backfill`` and the ``blocks`` group to ``app``."""

    @app.command()
    def serve(
        only: List[str] = typer.Option([], "--only", help="Serve only this deployment (repeatable)."),
        timezone: str = typer.Option("UTC", "--timezone", help="IANA timezone of all schedules."),
        cron: List[str] = typer.Option([], "--cron", help="Override a schedule: NAME='CRON' (repeatable)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Most runs this process executes at once."),
        paused: bool = typer.Option(False, "--paused", help="Register schedules paused (trigger runs by hand)."),
        config_block: Optional[str] = typer.Option(None, "--config-block",
                                                   help="Use a saved twinflow-config block instead of env settings."),
    ) -> None:
        """Serve the standard deployments from this process until Ctrl-C (no work pool needed).

        ingest hourly, retrain nightly, simulate weekly; pipeline and healthcheck on demand.
        """
        from twinflow.deployments.serve import serve_deployments

        serve_deployments(_settings(config_block), only=only or None, timezone=timezone,
                          crons=_pairs(cron, "--cron"), limit=limit, paused=paused)

    @app.command()
    def backfill(
        deployment: str = typer.Argument(..., help="Deployment: NAME (e.g. ingest-hourly) or FLOW/NAME."),
        start: str = typer.Option(..., "--start", help="First slot, ISO 8601 (naive = schedule timezone)."),
        end: str = typer.Option(..., "--end", help="Last slot, inclusive; future slots are skipped."),
        param: List[str] = typer.Option([], "--param", "-p", help="Parameter override key=value (dots nest)."),
        max_runs: int = typer.Option(1000, "--max-runs", help="Refuse to create more runs than this."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Only list the slots."),
    ) -> None:
        """Create flow runs for the past schedule slots of a deployment (idempotent)."""
        from twinflow.deployments.backfill import backfill as do_backfill

        runs = do_backfill(deployment, start, end, parameters=_json_values(_pairs(param, "--param")) or None,
                           max_runs=max_runs, dry_run=dry_run)
        for r in runs:
            status = "planned" if dry_run else ("created" if r.created else "exists")
            typer.echo(f"{r.slot.isoformat()}  {status:8s} {r.flow_run_name} {r.flow_run_id}")
        typer.echo(f"{len(runs)} slot(s); {sum(r.created for r in runs)} new run(s)")

    blocks = typer.Typer(help="twinflow's Prefect blocks (Dask cluster, MLflow tracking, lake, config, fleet contract).",
                         no_args_is_help=True)

    @blocks.command("register")
    def blocks_register() -> None:
        """Register twinflow's block types on the Prefect server (idempotent)."""
        from twinflow.blocks import register_block_types

        for slug in register_block_types():
            typer.echo(f"registered block type {slug}")

    @blocks.command("list")
    def blocks_list() -> None:
        """List saved twinflow blocks (secrets are shown masked)."""
        from prefect.client.orchestration import get_client

        from twinflow.blocks import BLOCK_TYPES
        from twinflow.blocks.config import check_api

        check_api()
        with get_client(sync_client=True) as client:
            for block_type in BLOCK_TYPES:
                slug = block_type.get_block_type_slug()
                try:
                    docs = client.read_block_documents_by_type(slug)
                except Exception:
                    docs = []
                for doc in docs:
                    if doc.name:
                        typer.echo(f"{slug}/{doc.name}")

    app.add_typer(blocks, name="blocks")

    notify = typer.Typer(help="Notifications the Prefect server sends on twinflow's events.", no_args_is_help=True)

    @notify.command("at-risk")
    def notify_at_risk(
        webhook: Optional[str] = typer.Option(None, "--webhook", help="POST {subject, text} JSON to this URL."),
        block: Optional[str] = typer.Option(None, "--block", help="An existing notification block: SLUG/NAME."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Only this dataset's assets (default: all)."),
    ) -> None:
        """Notify through a block on each twinflow.asset.at_risk event (a server-side automation)."""
        from twinflow.blocks.config import check_api
        from twinflow.deployments.notify import register_at_risk_notification, webhook_block
        from twinflow.errors import ConfigError

        if bool(webhook) == bool(block):
            raise ConfigError("give exactly one of --webhook URL or --block SLUG/NAME")
        check_api()
        ref = webhook_block(webhook) if webhook else block
        auto = register_at_risk_notification(ref, dataset=dataset)
        typer.echo(f"automation notify-asset-at-risk ({auto}) sends through {ref}")

    app.add_typer(notify, name="notify")


def main() -> None:
    """Run the commands standalone: ``python -m twinflow.deployments serve|backfill|blocks``."""
    import logging
    import sys

    from twinflow.errors import TwinflowError

    app = typer.Typer(name="twinflow", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    register_commands(app)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "distributed", "mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except TwinflowError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
