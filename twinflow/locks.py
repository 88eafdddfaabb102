"""Advisory file locks that say who holds them (for 'another twinflow demo is running')."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from twinflow.errors import AlreadyRunning


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``path`` for the block.

    Raises:
        AlreadyRunning: another process holds it (its pid is named when known).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise AlreadyRunning(
                f"another {what} is running (pid {holder}) for home {path.parent}; wait for it to "
                "finish or use another TWINFLOW_HOME"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()
