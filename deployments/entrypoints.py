"""Deployment entrypoints: each stage flow with twinflow's operations applied.

``twinflow.deployments.entrypoints.<stage>`` is the flow a deployment runs (``twinflow serve`` and
``prefect.yaml`` both point here, as module paths): the stage flow from ``twinflow.flows`` plus its
stage timeout, the :func:`~twinflow.deployments.ops.on_failure` hook, and, for GPU-heavy stages
(train, simulate, pipeline), the cluster slot of :func:`~twinflow.deployments.ops.exclusive`.
Flow names and parameters are the stage's own, so runs look the same in the UI as direct calls.

Stages are imported on first access (module ``__getattr__``): this module imports even when a stage
is not installed, and :func:`available` says which are.
"""

from __future__ import annotations

import importlib
from typing import Any

from twinflow.errors import ConfigError

__all__ = ["STAGES", "HEAVY", "available", "load", "raw_flow"]

#: stage -> (module, flow attribute)
STAGES: dict[str, tuple[str, str]] = {
    "healthcheck": ("twinflow.deployments.healthcheck", "healthcheck"),
    "ingest": ("twinflow.flows.ingest", "ingest"),
    "features": ("twinflow.flows.features", "features"),
    "train": ("twinflow.flows.train", "train"),
    "simulate": ("twinflow.flows.simulate", "simulate"),
    "pipeline": ("twinflow.flows.pipeline", "pipeline"),
    "upkeep": ("twinflow.deployments.upkeep", "upkeep"),
    "health": ("twinflow.flows.health", "health"),
}
#: Stages that use the cluster heavily (GPU when there is one): one run at a time.
HEAVY = frozenset({"train", "simulate", "pipeline"})

_CACHE: dict[str, Any] = {}


def raw_flow(stage: str) -> Any:
    """The stage's flow object as its module defines it.

    Raises:
        ConfigError: unknown stage, or the stage's module is not importable.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    module_name, attr = STAGES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"stage {stage!r} is not available ({module_name} is not installed)") from None
        raise
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"stage {stage!r}: {module_name} has no flow {attr!r}") from None


def load(stage: str) -> Any:
    """The stage's flow with operations applied (cached per process)."""
    if stage not in _CACHE:
        from twinflow.deployments.ops import with_ops

        _CACHE[stage] = with_ops(raw_flow(stage), stage, heavy=stage in HEAVY)
    return _CACHE[stage]


def available() -> list[str]:
    """Stages whose flow can be imported in this environment."""
    out = []
    for stage in STAGES:
        try:
            raw_flow(stage)
        except ConfigError:
            continue
        out.append(stage)
    return out


def __getattr__(name: str) -> Any:
    if name in STAGES:
        try:
            return load(name)
        except ConfigError as exc:
            raise AttributeError(str(exc)) from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
