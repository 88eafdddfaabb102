"""The landing folder: list the files to ingest (fsspec, any URL), stat and read them, and plan which to read.
"""

from __future__ import annotations
import fnmatch
import logging
import os
from pathlib import Path
from typing import Any, Iterator
from twinflow.errors import ConfigError

from twinflow.tasks.ingest.params import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, IngestParams, SourceFile

# Names a writer uses while a file is in flight, and bookkeeping files: never ingested.
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~", ".lock")


log = logging.getLogger("twinflow.ingest")

# Why a file is left for the next run (the whole-file and streamed readers say the same).
DISAPPEARED = "file disappeared before it was read"


CHANGED = "file changed while it was read (still being written?)"


def open_fs(url: str, storage_options: dict[str, Any]):
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options)


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return int(v.timestamp() * 1e9)
        try:
            return int(float(v) * 1e9)
        except (TypeError, ValueError):
            continue
    return 0


def _ignored(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith((".", "_")) or base.lower().endswith(_IGNORED_SUFFIXES) or \
        base.endswith(".reason.txt")


def _selected(path: str, include: list[str] | tuple[str, ...], exclude: list[str] | tuple[str, ...]) -> bool:
    base = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatchcase(base, g.lower()) for g in include) and \
        not any(fnmatch.fnmatchcase(base, g.lower()) for g in exclude)


def _walk_local(root: Path, follow_external_links: bool) -> Iterator[tuple[str, Path]]:
    """(path relative to ``root``, resolved path) of the files under a local landing folder.

    Symbolic links (to files or folders) are followed only when their target lies inside the landing
    folder, unless ``follow_external_links``; the others are skipped with a WARNING naming them. Each
    folder is entered once (no link cycles) and each file listed once under its resolved path. Names that
    are not valid UTF-8 cannot be recorded in the ledger: skipped with a WARNING (rename them).
    """
    top = root.resolve()
    seen_dirs = {top}
    seen_files: set[Path] = set()
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("landing folder %s cannot be listed (%s): skipped", folder, exc)
            continue
        for e in entries:
            r = f"{rel}{e.name}"
            try:
                r.encode("utf-8")
            except UnicodeEncodeError:
                log.warning("landing file name %r is not valid UTF-8: skipped (rename it)", r)
                continue
            if _ignored(e.name):
                continue
            target = Path(e.path).resolve()
            if e.is_symlink() and not follow_external_links and not target.is_relative_to(top):
                log.warning("landing entry %s is a link to %s, outside the landing folder: skipped (set "
                            "follow_external_links=True to ingest it)", e.path, target)
                continue
            if e.is_dir():  # follows links
                if target not in seen_dirs:
                    seen_dirs.add(target)
                    stack.append((Path(e.path), r + "/"))
            elif e.is_file() and target not in seen_files:
                seen_files.add(target)
                yield r, target


def list_landing(landing: str, storage_options: dict[str, Any] | None = None,
                 include: list[str] | tuple[str, ...] = DEFAULT_INCLUDE,
                 exclude: list[str] | tuple[str, ...] = DEFAULT_EXCLUDE,
                 follow_external_links: bool = False) -> list[SourceFile]:
    """List the files of a landing folder (recursively) or a single landing file, sorted by path.

    Hidden files, ``_``-prefixed files and names writers use while a file is in flight (``.tmp``,
    ``.part``...) are skipped, as are files that ``include``/``exclude`` (file-name globs) rule out.
    A single landing file is always listed. In a local folder, links whose target is outside it are
    skipped with a WARNING unless ``follow_external_links`` (see :func:`_walk_local`).

    Raises:
        ConfigError: the landing path does not exist.
    """
    fs, root = open_fs(landing, storage_options or {})
    if not fs.exists(root):
        raise ConfigError(f"landing path {landing!r} does not exist; create it or pass --landing PATH")
    local = "://" not in landing or landing.startswith("file://")

    def name_of(p: str) -> str:
        return str(Path(p).resolve()) if local else fs.unstrip_protocol(p)

    if fs.isfile(root):
        info = fs.info(root)
        return [SourceFile(path=name_of(root), size=int(info.get("size") or 0), mtime_ns=_mtime_ns(info))]
    out = []
    if local:
        for rel, target in _walk_local(Path(root), follow_external_links):
            if not _selected(rel, include, exclude):
                continue
            try:
                info = fs.info(str(target))
            except OSError:  # vanished since it was listed
                continue
            out.append(SourceFile(path=str(target), size=int(info.get("size") or 0), mtime_ns=_mtime_ns(info)))
        return sorted(out, key=lambda f: f.path)
    for p, info in fs.find(root, detail=True).items():
        rel = p[len(root.rstrip("/")) + 1:] if p.startswith(root.rstrip("/")) else p
        if info.get("type") == "directory" or any(_ignored(part) for part in rel.split("/")) \
                or not _selected(p, include, exclude):
            continue
        out.append(SourceFile(path=name_of(p), size=int(info.get("size") or 0), mtime_ns=_mtime_ns(info)))
    return sorted(out, key=lambda f: f.path)


def stat_file(path: str, storage_options: dict[str, Any]) -> tuple[int, int] | None:
    fs, p = open_fs(path, storage_options)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return None
    return int(info.get("size") or 0), _mtime_ns(info)


def read_file_bytes(path: str, storage_options: dict[str, Any]) -> bytes:
    fs, p = open_fs(path, storage_options)
    return fs.cat_file(p)


def plan_files(files: list[SourceFile], known: dict[str, dict[str, Any]],
               params: IngestParams, routes: dict[str, Any] | None = None) -> tuple[list[SourceFile], int]:
    """Files to read: new, with another size/mtime than the ledger recorded (the hash decides later),
    ingested under other parsing parameters or another validation of the channels they hold (the
    ledger keeps which), or recorded as a duplicate of a file that is read again (its rows were its
    twin's, which may now change) or is no longer ingested.

    Args:
        files: The telemetry files listed.
        known: The ledger's records by source.
        params: The ingest parameters.
        routes: Each file's :class:`~twinflow.tasks.ingest.route.Route` (computed when absent).

    Returns:
        (files to read, number of files skipped as unchanged).
    """
    import json

    from twinflow.tasks.ingest.route import route_file

    def same(f: SourceFile) -> bool:
        k = known.get(f.path)
        if k is None or (k["size"], k["mtime_ns"]) != (f.size, f.mtime_ns):
            return False
        route = (routes or {}).get(f.path) or route_file(f.path, params)
        channels = json.loads(k["channels"]) if k.get("channels") else None
        return k["params_digest"] == route.digest(params, channels)

    todo = [f for f in files if not same(f)]
    reading = {f.path for f in todo}

    def twin_changes(f: SourceFile) -> bool:
        k = known.get(f.path)
        if f.path in reading or not k or k["status"] != "duplicate":
            return False
        twin = duplicate_of(k["reason"] or "")
        return twin in reading or known.get(twin, {}).get("status") != "ingested"

    todo += [f for f in files if twin_changes(f)]
    todo.sort(key=lambda f: f.path)
    return todo, len(files) - len(todo)


DUPLICATE_REASON = "same content as "


def duplicate_of(reason: str) -> str:
    """The twin a ``duplicate`` outcome's reason names (see :data:`DUPLICATE_REASON`)."""
    return reason[len(DUPLICATE_REASON):] if reason.startswith(DUPLICATE_REASON) else ""
