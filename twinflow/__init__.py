"""twinflow: Prefect flows over Dask clusters (CPU or GPU), tracked in MLflow, for industrial AI.

Public helpers are imported lazily so that ``import twinflow`` stays cheap and side-effect free.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Settings": "twinflow.settings",
    "get_settings": "twinflow.settings",
    "Runtime": "twinflow.runtime",
    "TwinflowTaskRunner": "twinflow.runtime",
    "dask_client": "twinflow.runtime",
    "dask_cluster": "twinflow.cluster",
    "configure_mlflow": "twinflow.tracking",
    "tracked_run": "twinflow.tracking",
    "TwinflowError": "twinflow.errors",
}

__all__ = ["__version__", "runtime", *_LAZY]


def __getattr__(name: str) -> Any:
    if name == "runtime":
        import importlib

        return importlib.import_module("twinflow.runtime")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'twinflow' has no attribute {name!r}")
