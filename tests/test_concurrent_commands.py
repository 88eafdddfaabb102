"""Several twinflow commands on one home, as a plant runs them: hourly ingest beside manual runs.

Real ``twinflow`` processes against a fresh home: one local Prefect server shared by reference count,
one MLflow store created once, no orphan server after ``kill -9``.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from twinflow.data import cmapss_path

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROWS = 200  # FD001 unit 1 and part of unit 2: small real work


def _landing(folder: Path) -> Path:
    lines = [ln for ln in gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode().splitlines()
             if ln.strip()]
    folder.mkdir(parents=True)
    (folder / "train_FD001.txt").write_text("\n".join(lines[:ROWS]) + "\n")
    return folder


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWINFLOW_", "MLFLOW_TRACKING")) and k != "PREFECT_API_URL"}
    env.update({"TWINFLOW_HOME": str(home), "TWINFLOW_DASK__MODE": "local", "TWINFLOW_DASK__N_WORKERS": "1",
                "TWINFLOW_DASK__THREADS_PER_WORKER": "1", "TWINFLOW_DASK__MEMORY_LIMIT": "2GiB",
                "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    return env


def _ingest(home: Path, landing: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "twinflow.cli", "run", "ingest", "--landing", str(landing)],
                                env=_env(home), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _marked_servers(home: Path) -> list[int]:
    """Live processes marked as this home's local Prefect server (or forked by it)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("TWINFLOW_SERVER_HOME") == str(home / "prefect") and \
                    p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def _state(home: Path) -> dict | None:
    try:
        return json.loads((home / "prefect" / "server.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _lake_keys(home: Path) -> list[tuple[int, int]]:
    from twinflow.lake import latest_snapshot, read_lake

    snap = latest_snapshot(str(home / "lake"), "train_fd001")
    assert snap is not None, "nothing was ingested"
    table = read_lake(snap)
    return list(zip(table.column("asset_id").to_pylist(), table.column("cycle").to_pylist()))


def _cleanup(procs: list[subprocess.Popen], home: Path) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for pid in _marked_servers(home):  # never leak a server into the next test, even when failing
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_two_ingests_started_together_on_a_fresh_home_both_succeed(tmp_path):
    home, landing = tmp_path / "home", _landing(tmp_path / "landing")
    t0 = time.monotonic()
    procs = [_ingest(home, landing, tmp_path / f"ingest{i}.log") for i in (1, 2)]
    try:
        for p in procs:
            p.wait(timeout=500)
        elapsed = time.monotonic() - t0
        logs = [(tmp_path / f"ingest{i}.log").read_text(errors="replace") for i in (1, 2)]
        assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
        keys = _lake_keys(home)
        assert len(keys) == ROWS and len(set(keys)) == ROWS, (len(keys), len(set(keys)))
        assert _state(home) is None and _marked_servers(home) == []
        print(f"two concurrent ingests on a fresh home: both exit 0 in {elapsed:.1f}s, {len(keys)} rows, "
              f"{len(keys) - len(set(keys))} duplicate keys")
    finally:
        _cleanup(procs, home)


_STARTER = """
import sys, time
from pathlib import Path
from twinflow import runtime
from twinflow.settings import get_settings

settings = get_settings()
with runtime.start(settings, cluster=False, mlflow=False) as rt:
    print("server", rt.prefect.pid, rt.prefect.owned, flush=True)
    other_log = Path(sys.argv[1])
    deadline = time.monotonic() + 300
    # Until the other command has joined the server and started its cluster (it logs that line).
    while not other_log.exists() or "Dask cluster mode" not in other_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the second command never got going"
        time.sleep(0.1)
print("starter leaves", flush=True)
"""


def test_the_server_outlives_its_starter_while_another_command_uses_it(tmp_path):
    """A starts the home's server, B reuses it, A ends first: B still completes, then the server goes."""
    home, landing = tmp_path / "home", _landing(tmp_path / "landing")
    starter = subprocess.Popen([sys.executable, "-c", _STARTER, str(tmp_path / "b.log")], env=_env(home),
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    procs = [starter]
    try:
        first = starter.stdout.readline().split()
        assert first[:1] == ["server"], starter.stderr.read()[-3000:]
        server_pid, owned = int(first[1]), first[2] == "True"
        assert owned
        b = _ingest(home, landing, tmp_path / "b.log")
        procs.append(b)
        starter.wait(timeout=300)
        a_left = time.monotonic()
        assert starter.returncode == 0, starter.stderr.read()[-3000:]
        assert b.poll() is None, "B must still be running when A leaves (else the test shows nothing)"
        assert not _gone(server_pid), "A left the server running for B"
        state = _state(home)
        assert state["pid"] == server_pid and [u["pid"] for u in state.get("users", [])] == [b.pid]
        b.wait(timeout=400)
        log = (tmp_path / "b.log").read_text(errors="replace")
        assert b.returncode == 0, log[-3000:]
        assert "Connection refused" not in log
        assert len(set(_lake_keys(home))) == ROWS
        # B was the last user: it stopped the server it did not start.
        assert _gone(server_pid) and _state(home) is None and _marked_servers(home) == []
        print(f"B completed {time.monotonic() - a_left:.1f}s after its server's starter left")
    finally:
        _cleanup(procs, home)


def test_kill_9_then_rerun_leaves_no_orphan_server(tmp_path):
    home, landing = tmp_path / "home", _landing(tmp_path / "landing")
    a = _ingest(home, landing, tmp_path / "a.log")
    procs = [a]
    try:
        deadline = time.monotonic() + 300
        while (_state(home) or {}).get("status") != "running":
            assert a.poll() is None, (tmp_path / "a.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the local server did not start"
            time.sleep(0.05)
        server_pid = _state(home)["pid"]
        assert a.poll() is None, "A must be killed while it runs"
        a.send_signal(signal.SIGKILL)
        a.wait()
        time.sleep(1)
        assert not _gone(server_pid), "kill -9 leaves the server running: the orphan the next command must handle"
        assert server_pid in _marked_servers(home)

        b = _ingest(home, landing, tmp_path / "b.log")
        procs.append(b)
        b.wait(timeout=400)
        log = (tmp_path / "b.log").read_text(errors="replace")
        assert b.returncode == 0, log[-3000:]
        assert "adopting the local Prefect server" in log.replace("\n", " ")
        assert len(set(_lake_keys(home))) == ROWS
        assert _gone(server_pid), "the orphan server must be stopped"
        assert _state(home) is None and _marked_servers(home) == []
    finally:
        _cleanup(procs, home)
