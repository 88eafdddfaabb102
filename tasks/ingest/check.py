"""``twinflow contract check``: a dry run of parsing and validation against a fleet contract.

Each file is routed, parsed and validated exactly as the ingest stage would (:func:`route_file`,
:func:`parse_bytes`, :func:`validate_table`), and nothing is written: no lake, no quarantine, no ledger.
What it cannot see is what needs the lake: duplicate keys *across* files or against rows already
ingested (the ingest commit quarantines those). Files are read whole, so check samples, not a year of
exports at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twinflow.contract import FleetContract
from twinflow.tasks.ingest.landing import list_landing, read_file_bytes
from twinflow.tasks.ingest.params import IngestParams
from twinflow.tasks.ingest.parse import parse_bytes
from twinflow.tasks.ingest.quarantine import reason_kind, reason_kinds
from twinflow.tasks.ingest.route import route_file
from twinflow.tasks.ingest.validate import validate_table


@dataclass
class FileCheck:
    """What ingesting one file would do.

    Attributes:
        path: The file.
        kind: ``telemetry``, or why it would not be ingested (``events``, ``labels``, ``ignore``,
            ``unmatched``, ``excluded``; ``note`` says more).
        dataset: The dataset it would feed.
        rows_read: Rows the file holds (as far as it could be read).
        rows_ok: Rows that would reach the lake.
        rows_quarantined: Rows that would be quarantined (all of them for an unusable file).
        reasons: Quarantined rows per reason kind (values left out).
        file_error: Why the whole file is unusable, if it is.
        flagged: Quality flags of the rows that would be kept.
        notes: Parser notes (ignored columns, channels missing and stored as null).
        note: Why a non-telemetry file is skipped.
    """

    path: str
    kind: str
    dataset: str = ""
    rows_read: int = 0
    rows_ok: int = 0
    rows_quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    file_error: str | None = None
    flagged: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def nothing_kept(self) -> bool:
        """A telemetry file of which no row would reach the lake."""
        return self.kind == "telemetry" and self.rows_ok == 0


def check_files(paths: list[str | Path], contract: FleetContract, **overrides) -> list[FileCheck]:
    """Dry-run ingest of ``paths`` (files, or folders listed as the ingest stage lists a landing folder).

    Args:
        paths: Files or folders.
        contract: The fleet contract to check against.
        **overrides: :class:`IngestParams` fields that override the contract's rules (``dataset``,
            ``format``, ``columns``, ``delimiter``, ``allow_missing_channels``, ``include``...).

    Raises:
        ConfigError: a path does not exist, or an override is invalid.
    """
    out: list[FileCheck] = []
    for root in paths:
        params = IngestParams(landing=str(root), **overrides)
        params._fleet = contract
        for src in list_landing(str(root), None, ["*"], [], params.follow_external_links):
            out.append(_check_one(src.path, params, contract))
    return out


def _check_one(path: str, params: IngestParams, contract: FleetContract) -> FileCheck:
    route = route_file(path, params, contract)
    if not route.telemetry:
        return FileCheck(path=path, kind=route.kind, note=route.note)
    data = read_file_bytes(path, params.storage_options)
    base = path.rstrip("/").rsplit("/", 1)[-1]
    parsed = parse_bytes(data, base, route.format, list(route.columns) if route.columns else None,
                         route.delimiter, params.allow_missing_channels, contract)
    check = FileCheck(path=path, kind="telemetry", dataset=route.dataset, rows_read=parsed.rows_read,
                      notes=list(parsed.notes))
    if parsed.file_error:
        check.file_error = parsed.file_error + (f"; {parsed.rows_note}" if parsed.rows_note else "")
        check.rows_quarantined = parsed.rows_read
        check.reasons = {f"unusable file: {reason_kind(parsed.file_error)}": parsed.rows_read}
        return check
    lake, quar, flagged = validate_table(parsed.table, parsed.reasons, path, "check", params.window(), contract)
    reasons = quar.column("reason").to_pylist() + [r for r, _ in parsed.bad_rows]
    check.rows_ok = lake.num_rows
    check.rows_quarantined = len(reasons)
    check.reasons = reason_kinds(reasons, {})
    check.flagged = {k: v for k, v in flagged.items() if v}
    return check


def reason_totals(checks: list[FileCheck]) -> dict[str, int]:
    """Quarantined rows per reason kind over all files, most frequent first."""
    totals: dict[str, int] = {}
    for c in checks:
        for k, v in c.reasons.items():
            totals[k] = totals.get(k, 0) + v
    return dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))
