"""Start or reuse one local Prefect API server per twinflow home.

Every process of a twinflow command (the flow runner and every Dask worker) must report to the same
Prefect API; without ``PREFECT_API_URL`` each process would start its own ephemeral server and its
task runs would land in another database. So twinflow starts one real ``prefect server start``
process on loopback, with its SQLite database under the home, and exports its URL.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.settings import Settings

log = logging.getLogger("twinflow.runtime")

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "GIT_PYTHON_REFRESH": "quiet",
}


def set_offline_env() -> None:
    """Turn off analytics and telemetry of Prefect and MLflow (no network here, and none wanted)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass
class PrefectServer:
    """A Prefect API this command uses. ``owned`` is True when this process started it."""

    url: str
    pid: int | None
    owned: bool


def api_healthy(url: str, timeout: float = 2.0) -> bool:
    """Return True when ``<url>/health`` answers 200."""
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state_file(settings: Settings) -> Path:
    return settings.prefect_home / "server.json"


def read_server_state(settings: Settings) -> dict | None:
    """Return the recorded local server (``pid``, ``url``) for this home, if any."""
    try:
        return json.loads(_state_file(settings).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def server_env(settings: Settings) -> dict[str, str]:
    """Environment for the local server process: its home and SQLite DB under the twinflow home."""
    home = settings.prefect_home
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    # The server must not try to talk to itself through a stale URL from the caller's env.
    env.pop("PREFECT_API_URL", None)
    return env


def _start(settings: Settings) -> PrefectServer:
    host = settings.prefect.host
    port = settings.prefect.port
    if port and _port_in_use(host, port):
        raise ConfigError(
            f"port {port} on {host} is already in use; set TWINFLOW_PREFECT__PORT=0 to pick a free one"
        )
    port = port or _free_port(host)
    url = f"http://{host}:{port}/api"
    home = settings.prefect_home
    home.mkdir(parents=True, exist_ok=True)
    logfile = open(home / "server.log", "ab")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
           "--analytics-off", "--no-late-runs"]
    proc = subprocess.Popen(cmd, env=server_env(settings), stdout=logfile, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    logfile.close()
    deadline = time.monotonic() + settings.prefect.start_timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (home / "server.log").read_text(errors="replace")[-800:]
                raise ServiceUnavailable(f"the local Prefect server exited with code {proc.returncode}: "
                                         f"{tail.strip().splitlines()[-1] if tail.strip() else 'no output'}"
                                         f" (log: {home / 'server.log'})")
            if api_healthy(url, timeout=1.0):
                _state_file(settings).write_text(json.dumps({"pid": proc.pid, "url": url}))
                log.info("started local Prefect server at %s (pid %s)", url, proc.pid)
                return PrefectServer(url=url, pid=proc.pid, owned=True)
            time.sleep(0.25)
    except BaseException:  # Ctrl-C/SIGTERM while it starts: no orphan server, no stale state file
        terminate_group(proc.pid)
        state = read_server_state(settings)
        if state and int(state["pid"]) == proc.pid:
            _state_file(settings).unlink(missing_ok=True)
        raise
    terminate_group(proc.pid)
    raise ServiceUnavailable(f"the local Prefect server did not become healthy within "
                             f"{settings.prefect.start_timeout:.0f}s (log: {home / 'server.log'})")


def terminate_group(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group led by ``pid`` (a child started with its own session), wait for the
    leader, SIGKILL the group after ``timeout`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited = pid if not _pid_alive(pid) else 0
        if waited == pid:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def acquire_server(settings: Settings) -> PrefectServer:
    """Return the Prefect API to use: configured, reused, or freshly started on loopback.

    Raises:
        ServiceUnavailable: a configured API does not answer, or the local one fails to start.
    """
    configured = settings.prefect.api_url or os.environ.get("PREFECT_API_URL")
    if configured:
        if not api_healthy(configured, timeout=5.0):
            raise ServiceUnavailable(
                f"the Prefect API at {configured} does not answer; start it (`prefect server start`) "
                "or unset PREFECT_API_URL to let twinflow run a local one"
            )
        return PrefectServer(url=configured, pid=None, owned=False)
    # The lock makes "check then start" atomic across concurrent twinflow commands on one home.
    started = None
    try:
        with _lock(settings.prefect_home / "server.lock"):
            state = read_server_state(settings)
            if state and _pid_alive(int(state["pid"])) and api_healthy(state["url"]):
                log.info("reusing local Prefect server at %s", state["url"])
                return PrefectServer(url=state["url"], pid=int(state["pid"]), owned=False)
            started = _start(settings)
    except BaseException:
        if started is not None:  # interrupted while releasing the lock: the caller never gets it
            release_server(settings, started)
        raise
    return started


def _flush_prefect_logs() -> None:
    # Log records are shipped to the API in the background; send them before the API goes away.
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:  # pragma: no cover - nothing to flush / worker not started
        pass


def release_server(settings: Settings, server: PrefectServer) -> None:
    """Stop the server if this process started it; otherwise leave it to its owner."""
    if not server.owned or server.pid is None:
        return
    _flush_prefect_logs()
    with _lock(settings.prefect_home / "server.lock"):
        terminate_group(server.pid)
        state = read_server_state(settings)
        if state and int(state["pid"]) == server.pid:
            _state_file(settings).unlink(missing_ok=True)
    log.info("stopped local Prefect server (pid %s)", server.pid)
