"""The process guard: a guarded command (and its children) does not outlive its parent, kill -9 included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

# The guarded command forks a child of its own (like a web server's workers) and records both pids.
_CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(sys.argv[1], "w") as fh:
        fh.write(f"{os.getpid()} {worker.pid}")
    time.sleep(300)
""")

_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from twinflow.procguard import guarded
    p = subprocess.Popen(guarded([sys.executable, "-c", sys.argv[1], sys.argv[2]]), start_new_session=True)
    print(p.pid, flush=True)
    time.sleep(300)
""")


def _wait_pids(path, timeout=30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return [int(x) for x in path.read_text().split()]
        time.sleep(0.1)
    raise AssertionError("the guarded command did not start")


def _gone(pids, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_a_guarded_command_and_its_workers_die_with_a_sigkilled_parent(tmp_path):
    pidfile = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, str(pidfile)], stdout=subprocess.PIPE)
    guard = int(parent.stdout.readline())
    pids = _wait_pids(pidfile)
    assert all(psutil.pid_exists(p) for p in pids)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    assert _gone([guard, *pids]), "the guarded command outlived its SIGKILLed parent"


def test_a_sigterm_to_the_group_stops_the_command_and_the_guard_reports_its_code(tmp_path):
    from twinflow.procguard import guarded

    pidfile = tmp_path / "pids"
    p = subprocess.Popen(guarded([sys.executable, "-c", _CHILD, str(pidfile)]), start_new_session=True)
    pids = _wait_pids(pidfile)
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(20) != 0
    assert _gone(pids)
