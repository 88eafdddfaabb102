"""Readable Prefect task-run names built from a task's parameters (``features-fit-train_fd001``).

Without a ``task_run_name`` Prefect names a task run ``<task>-<3 random characters>``
(``calibrate-twin-a24``), which says nothing about what the run worked on. Each twinflow task passes
one of these callables; Prefect calls it inside the task run's context, where the bound parameters
are available. Flow-run names are built the same way by :mod:`twinflow.flows.naming`.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable, Sequence

__all__ = ["task_name", "dataset_of_parts", "model_version_of"]


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _task_parameters() -> dict[str, Any]:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return dict(ctx.parameters or {}) if ctx is not None else {}


def task_name(task: str, describe: Callable[[dict[str, Any]], str | None] | None = None) -> Callable[[], str]:
    """A ``task_run_name`` callable: ``<task>-<describe(parameters)>``, or ``<task>`` when it says nothing.

    A parameter that cannot be described never fails the task run: the name falls back to ``task``.

    Args:
        task: The task's name.
        describe: Maps the task run's parameters to the detail that tells its runs apart.
    """

    def name() -> str:
        try:
            detail = describe(_task_parameters()) if describe is not None else None
        except Exception:  # noqa: BLE001 - a name must never fail a run
            detail = None
        detail = _clean(str(detail)) if detail else ""
        return f"{task}-{detail}" if detail else task

    name.__name__ = f"{task.replace('-', '_')}_task_run_name"
    return name


def dataset_of_parts(parts: Sequence[Sequence[str]]) -> str | None:
    """The lake dataset of partition file lists (``<lake>/<dataset>/asset_id=<id>/part-*.parquet``)."""
    for files in parts:
        for path in files:
            p = PurePosixPath(str(path).replace("\\", "/"))
            return p.parent.parent.name if p.parent.name.startswith("asset_id=") else None
    return None


def model_version_of(model_uri: str) -> str | None:
    """``v3`` for ``models:/<name>/3``, the alias for ``models:/<name>@champion``, else None."""
    m = re.fullmatch(r"models:/[^@]+?(?:/(\d+)|@([\w-]+))", model_uri or "")
    if not m:
        return None
    return f"v{m.group(1)}" if m.group(1) else m.group(2)
