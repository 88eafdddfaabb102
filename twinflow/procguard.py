"""Run a command that must not outlive the process that started it (``kill -9`` included).

``python -m twinflow.procguard <parent pid> -- <command...>`` runs the command in the guard's own process
group and watches the parent: once the parent is gone (the guard is re-parented), the whole group (the
command and anything it forked, e.g. web-server workers) gets SIGTERM, then SIGKILL after a grace
period. A SIGTERM to the group (how a parent stops it normally) reaches the command directly; the guard
then exits with the command's code. ``twinflow server`` starts the MLflow UI this way: a SIGKILLed
``twinflow server`` can run no cleanup of its own, and the UI would otherwise keep its port forever.

Linux additionally gets ``PR_SET_PDEATHSIG`` on the guard, so it learns of the death at once instead of
at its next poll.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["guarded", "main"]

POLL_S = 0.5
GRACE_S = 10.0


def guarded(cmd: list[str], parent: int | None = None) -> list[str]:
    """``cmd`` wrapped in the guard for ``parent`` (default: this process)."""
    return [sys.executable, "-m", "twinflow.procguard", str(parent or os.getpid()), "--", *cmd]


def _pdeathsig(sig: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the poll alone notices
        pass


def _stop_group(child: subprocess.Popen) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the guard stays to finish the job
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return child.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(os.getpgrp(), signal.SIGKILL)  # ends the guard too
        return -9


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m twinflow.procguard <parent pid> -- <command...>", file=sys.stderr)
        return 2
    parent, cmd = int(argv[0]), argv[2:]
    died = {"flag": False}

    def on_parent_death(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        died["flag"] = True

    signal.signal(signal.SIGUSR1, on_parent_death)
    _pdeathsig(signal.SIGUSR1)
    if os.getppid() != parent:  # the parent died before the guard could watch it
        return 1
    child = subprocess.Popen(cmd)  # same process group as the guard
    # A SIGTERM for the group reaches the child directly; the guard just waits for it to end.
    signal.signal(signal.SIGTERM, lambda s, f: None)
    while True:
        code = child.poll()
        if code is not None:
            return code
        if died["flag"] or os.getppid() != parent:
            return _stop_group(child)
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
