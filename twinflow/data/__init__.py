"""Bundled real data: NASA C-MAPSS FD001 (public domain), the demo's default input.

See ``CMAPSS_README.md`` beside this file for attribution and format.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CMAPSS_FILES = ("train_FD001.txt.gz", "test_FD001.txt.gz", "RUL_FD001.txt.gz")


def cmapss_dir() -> Path:
    """Return the directory holding the bundled C-MAPSS FD001 files (gzip-compressed)."""
    return Path(str(files(__name__)))


def cmapss_path(name: str) -> Path:
    """Return the path of one bundled file, e.g. ``cmapss_path("train_FD001.txt.gz")``."""
    if name not in CMAPSS_FILES:
        raise KeyError(f"unknown bundled file {name!r}; available: {', '.join(CMAPSS_FILES)}")
    return cmapss_dir() / name
