"""Names derived from a source path: its lake dataset, its stable file id, and how to parse it.
"""

from __future__ import annotations
import hashlib
import re
from typing import Literal



# ``text``: header-less, whitespace-separated text whose columns the contract's dataset rule (or
# ``columns``) declares, like NASA's C-MAPSS files; ``cmapss`` is its older name, kept as an alias.
Format = Literal["auto", "csv", "parquet", "text", "cmapss"]


COMPRESSION_SUFFIXES = (".gz", ".gzip")


DATA_SUFFIXES = (".txt", ".csv", ".parquet", ".pq", ".dat", ".tsv")


DATASET_NAME_MAX = 100


def dataset_name(path: str) -> str:
    """Dataset name derived from a file name: lower-cased stem without data/compression suffixes.

    ``train_FD001.txt.gz`` -> ``train_fd001``; characters outside ``[a-z0-9_-]`` become ``_``. A stem
    longer than :data:`DATASET_NAME_MAX` characters is cut and ends with ``-`` and 12 hex of its SHA-1
    (distinct stems stay distinct datasets; the name stays a valid folder name).
    """
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffixes in (COMPRESSION_SUFFIXES, DATA_SUFFIXES):
        for s in suffixes:
            if name.endswith(s):
                name = name[: -len(s)]
                break
    name = re.sub(r"[^a-z0-9_\-]", "_", name).strip("_-") or "data"
    if len(name) > DATASET_NAME_MAX:  # a folder name (dataset=<name>) must fit in 255 bytes
        name = f"{name[:DATASET_NAME_MAX - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def file_id(source: str) -> str:
    """Stable id of a source path: the lake file name of its rows (so re-ingest replaces, never duplicates)."""
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def detect_format(name: str, head: bytes, declared: Format = "auto") -> str:
    """Decide how to parse a file: ``declared`` unless ``auto``, else by suffix, else by its first bytes.

    Returns ``csv``, ``parquet`` or ``text`` (``cmapss``, the older name of ``text``, is returned as ``text``).
    """
    if declared == "cmapss":
        return "text"
    if declared != "auto":
        return declared
    lower = name.lower()
    for s in COMPRESSION_SUFFIXES:
        lower = lower.removesuffix(s)
    if lower.endswith((".parquet", ".pq")) or head[:4] == b"PAR1":
        return "parquet"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".txt", ".dat")):
        return "text"
    first = head.split(b"\n", 1)[0]
    return "csv" if b"," in first or b";" in first else "text"
