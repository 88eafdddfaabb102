"""Routing: which landing files are telemetry, which dataset each feeds and how to read it.

The fleet contract's ``datasets`` rules decide (first matching glob wins); the ingest parameters that
repeat a rule's fields (``dataset``, ``format``, ``columns``, ``delimiter``) override it, and
``include``/``exclude`` narrow or widen the selection. Files of kind ``events``, ``labels`` or ``ignore``
are never parsed as telemetry, whatever the parameters say.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from twinflow.contract import FleetContract
from twinflow.tasks.ingest.names import dataset_name
from twinflow.tasks.ingest.params import IngestParams


@dataclass(frozen=True)
class Route:
    """How one landing file is ingested, or why it is not.

    Attributes:
        kind: ``telemetry`` (ingested) or the reason class of a skipped file (``events``, ``labels``,
            ``ignore``, ``unmatched``, ``excluded``).
        dataset: The lake dataset a telemetry file feeds.
        format: ``auto``, ``csv``, ``parquet`` or ``text``.
        columns: Column names of a header-less file, or None (the file has a header).
        delimiter: CSV field delimiter.
        note: Why a file is skipped (empty for telemetry).
    """

    kind: str
    dataset: str = ""
    format: str = "auto"
    columns: tuple[str, ...] | None = None
    delimiter: str = ","
    note: str = ""

    @property
    def telemetry(self) -> bool:
        return self.kind == "telemetry"

    def digest(self, params: IngestParams, channels: list[str] | None = None) -> str:
        """:meth:`IngestParams.digest` of a file read along this route."""
        return params.digest(self.dataset, self.format, list(self.columns) if self.columns else None,
                             self.delimiter, channels)


def _matches(name: str, globs: list[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, g.lower()) for g in globs)


def route_file(path: str, params: IngestParams, contract: FleetContract | None = None) -> Route:
    """The route of the landing file ``path`` under ``params`` and its contract (see the module docstring)."""
    contract = contract or params.fleet()
    base = path.rstrip("/").rsplit("/", 1)[-1]
    who = f"contract {contract.name!r} v{contract.version}"
    if params.exclude and _matches(base, params.exclude):
        return Route("excluded", note=f"excluded by exclude={params.exclude}")
    rule = contract.rule_for(base)
    if rule is not None and rule.kind != "telemetry":
        return Route(rule.kind, note=f"{rule.kind} file per {who}: not telemetry, never parsed as such")
    if params.include is not None and not _matches(base, params.include):
        return Route("excluded", note=f"not selected by include={params.include}")
    if rule is None and params.include is None:
        return Route("unmatched", note=f"no datasets rule of {who} matches {base!r}: not ingested (add a rule "
                                       "under the contract's datasets:, or pass include=[...])")
    stem = dataset_name(path)
    dataset = params.dataset or (rule.dataset_for(stem) if rule is not None else stem)
    fmt = params.format if params.format != "auto" else (rule.format if rule is not None else "auto")
    if fmt == "cmapss":
        fmt = "text"
    columns = params.columns if params.columns is not None else (rule.columns if rule is not None else None)
    delimiter = params.delimiter or (rule.delimiter if rule is not None else ",")
    return Route("telemetry", dataset=dataset, format=fmt, columns=tuple(columns) if columns else None,
                 delimiter=delimiter)
