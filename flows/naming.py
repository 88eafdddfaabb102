"""Readable Prefect flow-run names built from a run's parameters (``features-train_fd001``).

Prefect names runs ``adjective-animal`` unless told otherwise, so the train and test features runs
of one pipeline look alike in the UI. Each flow passes one of these callables as ``flow_run_name``;
Prefect calls it inside the run's context, where the validated parameters are available. Task-run
names are built the same way by :mod:`twinflow.naming` (tasks do not import flows).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable


def _parameters() -> dict[str, Any]:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return dict(ctx.parameters or {}) if ctx is not None else {}


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def run_name(flow: str, describe: Callable[[dict[str, Any]], str | None]) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<flow>-<describe(parameters)>``, or ``<flow>`` when it says nothing.

    A parameter that cannot be described (missing, unexpected type) never fails the run: the name
    falls back to the flow's name.
    """

    def name() -> str:
        try:
            detail = describe(_parameters())
        except Exception:  # noqa: BLE001 - a name must never fail a run
            detail = None
        return f"{flow}-{_clean(str(detail))}" if detail else flow

    name.__name__ = f"{flow}_run_name"
    return name


def landing_name(landing: str) -> str:
    """The last folder of a landing path or URL (``/x/landing/cmapss`` -> ``cmapss``)."""
    return PurePosixPath(str(landing).rstrip("/")).name or str(landing)
