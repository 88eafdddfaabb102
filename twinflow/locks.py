"""twinflow's one advisory file lock: ``flock`` on a file that names its holder.

Every cross-process lock (one demo per home, the home's local Prefect server, the MLflow store's first
initialisation, the lake's ingest lock) goes through :func:`hold`, so they all wait, time out and
report the same way.

The lock is an ``flock`` on an open file: the kernel drops it when the holder's process dies
(even by ``kill -9``), so a crashed command never leaves a stale lock behind. The holder's pid is
written into the file while it is held, only to say who is waiting on whom.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from twinflow.errors import AlreadyRunning

# Polling steps while waiting for a lock with a deadline: short first (most holds are brief), then
# capped so a long wait costs little CPU on a small machine.
_FIRST_POLL_S = 0.02
_MAX_POLL_S = 0.25


def _holder(fh) -> str:
    try:
        fh.seek(0)
        return fh.read().strip() or "unknown"
    except OSError:  # pragma: no cover - the file is ours and open
        return "unknown"


@contextmanager
def hold(path: Path, *, timeout_s: float | None, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, waiting for it as ``timeout_s`` says.

    Args:
        path: The lock file; it and its parent folders are created when missing.
        timeout_s: ``None`` waits as long as it takes; ``0`` does not wait (fails at once when
            another process holds the lock); ``> 0`` waits up to that many seconds.
        what: What holds this lock, for the error (e.g. ``"twinflow demo"``).

    Raises:
        AlreadyRunning: the lock was still held when ``timeout_s`` ran out, naming ``what``, the
            lock file and the holder's pid.
        ValueError: ``timeout_s`` is negative.
    """
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s must be None or >= 0, got {timeout_s}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": never truncates on open (that would erase the holder's pid); reading is still allowed.
    fh = open(path, "a+")
    try:
        if timeout_s is None:
            # Blocks in the kernel; Ctrl-C/SIGTERM (which twinflow turns into KeyboardInterrupt)
            # still interrupt the wait.
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            step = _FIRST_POLL_S
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        waited = f" (still held after {timeout_s:g}s)" if timeout_s else ""
                        raise AlreadyRunning(
                            f"another {what} is running (pid {_holder(fh)}) and holds {path}{waited}; "
                            "wait for it to finish or use another TWINFLOW_HOME"
                        ) from None
                    time.sleep(min(step, left))
                    step = min(step * 2, _MAX_POLL_S)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold ``path``'s lock for the block, failing at once if another process holds it.

    Same as ``hold(path, timeout_s=0, what=what)``.

    Raises:
        AlreadyRunning: another process holds it (its pid is named when known).
    """
    with hold(path, timeout_s=0, what=what):
        yield
