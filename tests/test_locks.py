"""twinflow.locks.hold: the one lock helper, against a real second process or thread holding the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from twinflow.errors import AlreadyRunning
from twinflow.locks import exclusive, hold

_HOLDER = """
import sys, time
from pathlib import Path
from twinflow.locks import hold
with hold(Path(sys.argv[1]), timeout_s=None, what="test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(path: Path, seconds: float) -> subprocess.Popen:
    """A separate process holding ``path``'s lock for ``seconds`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_zero_timeout_fails_at_once_naming_what_the_path_and_the_holder(tmp_path):
    lock = tmp_path / "deep" / "er" / "x.lock"  # parents are created
    proc = _holder(lock, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(AlreadyRunning) as err:
            with hold(lock, timeout_s=0, what="twinflow thing"):
                pytest.fail("the lock is held by another process")
        assert time.monotonic() - t0 < 0.5
        msg = str(err.value)
        assert f"another twinflow thing is running (pid {proc.pid}) and holds {lock}" in msg
        assert "still held" not in msg  # nothing was waited for
        # exclusive() is the same thing.
        with pytest.raises(AlreadyRunning, match=f"pid {proc.pid}"):
            with exclusive(lock, "twinflow thing"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_positive_timeout_waits_that_long_then_fails(tmp_path):
    lock = tmp_path / "x.lock"
    proc = _holder(lock, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(AlreadyRunning, match=r"still held after 0\.6s") as err:
            with hold(lock, timeout_s=0.6, what="ingest"):
                pass
        waited = time.monotonic() - t0
        assert 0.6 <= waited < 1.5, waited
        assert f"pid {proc.pid}" in str(err.value) and str(lock) in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_positive_timeout_gets_the_lock_when_the_holder_ends_in_time(tmp_path):
    lock = tmp_path / "x.lock"
    proc = _holder(lock, 0.5)
    t0 = time.monotonic()
    with hold(lock, timeout_s=20, what="ingest"):
        waited = time.monotonic() - t0
        assert lock.read_text() == str(os.getpid())  # the holder's pid is recorded while held
    proc.wait()
    assert 0.2 <= waited < 10, waited
    assert lock.read_text() == ""  # and cleared on release


def test_none_waits_as_long_as_it_takes(tmp_path):
    lock = tmp_path / "x.lock"
    held, release = threading.Event(), threading.Event()

    def other_thread() -> None:  # flock is per open file: another thread's open conflicts too
        with hold(lock, timeout_s=0, what="thread"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=other_thread)
    t.start()
    assert held.wait(10)
    timer = threading.Timer(1.0, release.set)
    timer.start()
    t0 = time.monotonic()
    with hold(lock, timeout_s=None, what="waiter"):
        waited = time.monotonic() - t0
    t.join()
    assert waited >= 0.9, waited


def test_a_killed_holder_releases_the_lock(tmp_path):
    """kill -9 of the holder frees the lock at once: no stale lock to clean up by hand."""
    lock = tmp_path / "x.lock"
    proc = _holder(lock, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with hold(lock, timeout_s=0, what="next command"):
        assert lock.read_text() == str(os.getpid())


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    lock = tmp_path / "x.lock"
    with pytest.raises(KeyError):
        with hold(lock, timeout_s=0, what="a"):
            raise KeyError("boom")
    with hold(lock, timeout_s=0, what="b"):
        pass


def test_negative_timeout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="timeout_s"):
        with hold(tmp_path / "x.lock", timeout_s=-1, what="a"):
            pass
