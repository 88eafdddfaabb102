"""The lake: the one module that knows where and how stage data is stored.

Every stage reads and writes the lake through these functions; no other module builds lake paths.
(Transitional: the implementations still live in ``twinflow.tasks.ingest`` and are being moved here.)
"""

from __future__ import annotations

from twinflow.tasks.ingest import (  # noqa: F401  (re-exported: the lake API)
    conform,
    latest_snapshot,
    read_lake,
    read_quarantine,
    write_lake_table,
)

__all__ = ["conform", "latest_snapshot", "read_lake", "read_quarantine", "write_lake_table"]
