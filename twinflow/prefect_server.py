"""Start or reuse one local Prefect API server per twinflow home.

Every process of a twinflow command (the flow runner and every Dask worker) must report to the same
Prefect API; without ``PREFECT_API_URL`` each process would start its own ephemeral server and its
task runs would land in another database. So twinflow starts one real ``prefect server start``
process on loopback, with its SQLite database under the home, and exports its URL.

Several commands may run on one home at once (an hourly ingest beside a manual run), so that server
is shared and reference-counted: ``<prefect home>/server.json`` records the server and the commands
using it, every change to it is made under ``server.lock``, and the last command to leave stops
it. A command killed with ``kill -9`` cannot leave: the next command drops its entry (its pid is
gone) and adopts the server, or stops it when it no longer answers. A server whose starter died
before recording it is found by the ``TWINFLOW_SERVER_HOME`` mark in its environment and stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.locks import hold
from twinflow.settings import Settings

log = logging.getLogger("twinflow.runtime")

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "GIT_PYTHON_REFRESH": "quiet",
}

# Marks a local server process (and the processes it forks) with the Prefect home it serves.
SERVER_HOME_ENV = "TWINFLOW_SERVER_HOME"


def set_offline_env() -> None:
    """Turn off analytics and telemetry of Prefect and MLflow (no network here, and none wanted)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass
class PrefectServer:
    """A Prefect API this command uses.

    Attributes:
        url: The API URL.
        pid: The local server's pid; None for a configured API.
        owned: True when this process started the server (it may still outlive this command).
        token: This command's entry among the local server's users.
    """

    url: str
    pid: int | None
    owned: bool
    token: str | None = None


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
    """True when something listens on ``host:port`` (what would make the server's bind fail)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn binds: connections of a server that just stopped linger in TIME_WAIT for a
        # minute, which blocks a plain bind but not the server's.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def _pid_alive(pid: int) -> bool:
    # A zombie (dead, not yet reaped: e.g. an orphan whose new parent is slow to reap) is dead here.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _created(pid: int) -> float | None:
    """Start time of a live process, or None; with the pid it names one process (pids are reused)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def _is_running(pid: int, created: float | None) -> bool:
    """True when ``pid`` is alive and (when ``created`` is known) is still the process recorded then."""
    now = _created(pid)
    if now is None:
        return False
    return created is None or abs(now - created) < 0.05


def _state_file(settings: Settings) -> Path:
    return settings.prefect_home / "server.json"


def _lock_file(settings: Settings) -> Path:
    return settings.prefect_home / "server.lock"


def read_server_state(settings: Settings) -> dict | None:
    """Return the recorded local server of this home, if any.

    The record holds ``pid``, ``url``, ``created`` (the server process's start time), ``status``
    (``starting`` or ``running``) and ``users``: one entry (``pid``, ``created``, ``token``) per
    command that uses the server. It is written atomically, under the home's server lock.
    """
    try:
        state = json.loads(_state_file(settings).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and "pid" in state and "url" in state else None


def _write_state(settings: Settings, state: dict) -> None:
    path = _state_file(settings)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # a reader (doctor, a test) never sees half a record


def _new_user() -> dict:
    return {"pid": os.getpid(), "created": _created(os.getpid()), "token": uuid.uuid4().hex}


def _live_users(state: dict) -> list[dict]:
    """The recorded users whose process still runs (a ``kill -9``-ed command's entry is dropped)."""
    return [u for u in state.get("users", []) if _is_running(int(u["pid"]), u.get("created"))]


def server_env(settings: Settings) -> dict[str, str]:
    """Environment for the local server process: its home and SQLite DB under the twinflow home.

    It also carries ``TWINFLOW_SERVER_HOME=<prefect home>``, which marks the server (and the
    processes it forks) as this home's, so a server whose starter died before recording it can
    still be found and stopped (:func:`stop_unrecorded_servers`).
    """
    home = settings.prefect_home
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env[SERVER_HOME_ENV] = str(home)
    # The server must not try to talk to itself through a stale URL from the caller's env.
    env.pop("PREFECT_API_URL", None)
    return env


def home_server_pids(settings: Settings) -> list[int]:
    """Pids of every live process marked as this home's local Prefect server (or one of its children)."""
    home = str(settings.prefect_home)
    uid = os.getuid()
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "uids"]):
        try:
            if proc.pid == me or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if proc.environ().get(SERVER_HOME_ENV) == home and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def stop_unrecorded_servers(settings: Settings, keep: int | None = None) -> list[int]:
    """Stop this home's server processes that no record points at (``keep`` is the recorded one).

    A command killed between starting its server and recording it leaves such an orphan; it would
    hold the home's SQLite database and never be stopped. Call under the home's server lock.

    Returns:
        The pids that were stopped.
    """
    keep_group = None
    if keep is not None:
        try:
            keep_group = os.getpgid(keep)
        except ProcessLookupError:
            keep_group = None
    stray = []
    for pid in home_server_pids(settings):
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            continue
        if pid == keep or (keep_group is not None and group == keep_group):
            continue
        stray.append((pid, group))
    stopped = []
    for pid, group in stray:
        if not _pid_alive(pid):
            continue
        if group == pid:  # a group leader (servers are started in their own session): the whole group
            log.warning("stopping an unrecorded local Prefect server of this home (pid %s)", pid)
            terminate_group(pid)
        else:
            _terminate_one(pid)
        stopped.append(pid)
    return stopped


def _terminate_one(pid: int, timeout: float = 10.0) -> None:
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        try:
            proc.kill()
        except psutil.Error:
            pass
    except psutil.Error:
        pass


def _port_file(settings: Settings) -> Path:
    return settings.prefect_home / "port.json"


def home_port(settings: Settings) -> int | None:
    """The port recorded for this home's local Prefect server, if one was ever started with port 0."""
    try:
        rec = json.loads(_port_file(settings).read_text())
        return int(rec["port"]) if rec.get("host") == settings.prefect.host else None
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


#: How long a new server waits for the home's recorded port to be released before picking another.
RECORDED_PORT_WAIT_S = 20.0


def _choose_port(settings: Settings) -> int:
    """The port for a new local server: the configured one, else the home's recorded one.

    Prefect UI links written into MLflow runs (``prefect.flow_run_url``) name the server's port; a
    port picked afresh on every start made each link dead once its command ended. With port 0 the
    first start picks a free port and records it for the home, so every later start (a demo, a
    ``twinflow server``) serves the same URLs. Only when another program holds the recorded port is
    a new one picked and recorded. Called under the home's server lock.
    """
    host, port = settings.prefect.host, settings.prefect.port
    if port:
        if _port_in_use(host, port):
            raise ConfigError(
                f"port {port} on {host} is already in use; set TWINFLOW_PREFECT__PORT=0 to use this home's own port"
            )
        return port
    recorded = home_port(settings)
    if recorded:
        # The home's previous server may still be letting go of its port (its command just ended and
        # stops it, or it is being killed after its grace period): wait for it before moving on.
        deadline = time.monotonic() + RECORDED_PORT_WAIT_S
        while _port_in_use(host, recorded) and time.monotonic() < deadline:
            time.sleep(0.25)
        if not _port_in_use(host, recorded):
            return recorded
    port = _free_port(host)
    if recorded:
        log.warning("this home's Prefect port %s is taken by another program; using %s from now on "
                    "(Prefect links in older MLflow runs name the old port)", recorded, port)
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    path = _port_file(settings)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"host": host, "port": port}))
    os.replace(tmp, path)
    return port


# A Prefect server asked to stop finishes its background services first (~20 s); its state is in
# SQLite, whose journal makes a kill safe, so it gets this long before SIGKILL.
STOP_GRACE_S = 2.0


def _start(settings: Settings, user: dict) -> PrefectServer:
    host = settings.prefect.host
    port = _choose_port(settings)
    url = f"http://{host}:{port}/api"
    home = settings.prefect_home
    home.mkdir(parents=True, exist_ok=True)
    logfile = open(home / "server.log", "ab")
    # twinflow.prefect_server_main is ``prefect server start`` that retries SQLite-locked writes
    # inside the server instead of letting clients back off for seconds (see that module).
    cmd = [sys.executable, "-m", "twinflow.prefect_server_main", "server", "start", "--host", host,
           "--port", str(port), "--analytics-off", "--no-late-runs"]
    env = server_env(settings)
    # The UI's pages ask /ui-settings where the API is; its default is built from
    # PREFECT_SERVER_API_PORT (4200), not from --port, so a server on any other port served a UI that
    # could not reach its own API.
    env.update({"PREFECT_UI_API_URL": url, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port),
                # CORS only for the server's own UI (LocalOnly in prefect_server_main refuses other origins).
                "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": f"http://{host}:{port}"})
    nice = settings.prefect.server_nice
    lower_priority = (lambda: os.nice(nice)) if nice and hasattr(os, "nice") else None
    proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=lower_priority)
    logfile.close()
    try:
        # Recorded before it is healthy: if this command dies while the server starts, the next one
        # finds the server from this record (and from its TWINFLOW_SERVER_HOME mark if we die sooner).
        state = {"pid": proc.pid, "url": url, "created": _created(proc.pid), "status": "starting",
                 "users": [user]}
        _write_state(settings, state)
        deadline = time.monotonic() + settings.prefect.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (home / "server.log").read_text(errors="replace")[-800:]
                raise ServiceUnavailable(f"the local Prefect server exited with code {proc.returncode}: "
                                         f"{tail.strip().splitlines()[-1] if tail.strip() else 'no output'}"
                                         f" (log: {home / 'server.log'})")
            if api_healthy(url, timeout=1.0):
                state["status"] = "running"
                _write_state(settings, state)
                log.info("started local Prefect server at %s (pid %s)", url, proc.pid)
                return PrefectServer(url=url, pid=proc.pid, owned=True, token=user["token"])
            time.sleep(0.25)
        raise ServiceUnavailable(f"the local Prefect server did not become healthy within "
                                 f"{settings.prefect.start_timeout:.0f}s (log: {home / 'server.log'})")
    except BaseException:  # failed, or Ctrl-C/SIGTERM while it starts: no orphan server, no stale record
        terminate_group(proc.pid)
        state = read_server_state(settings)
        if state and int(state["pid"]) == proc.pid:
            _state_file(settings).unlink(missing_ok=True)
        raise


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
        except ChildProcessError:  # not our child (an adopted server): its own parent reaps it
            waited = pid if not _pid_alive(pid) else 0
        if waited == pid:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _server_lock(settings: Settings, timeout_s: float | None):
    return hold(_lock_file(settings), timeout_s=timeout_s,
                what="twinflow command (starting or stopping this home's local Prefect server)")


def _adopt_recorded(settings: Settings, user: dict) -> PrefectServer | None:
    """Join the recorded server if it runs and answers; otherwise stop it and drop its record."""
    state = read_server_state(settings)
    if state is None:
        return None
    pid, url = int(state["pid"]), state["url"]
    if _is_running(pid, state.get("created")):
        # A server recorded as starting lost its starter mid-start (we hold the lock, so nobody is
        # starting it now): give it the time a start may take. A running one should answer at once,
        # but a loaded machine can stall it for a few seconds.
        grace = settings.prefect.start_timeout if state.get("status") == "starting" else 15.0
        deadline = time.monotonic() + grace
        healthy = api_healthy(url)
        while not healthy and time.monotonic() < deadline and _is_running(pid, state.get("created")):
            time.sleep(0.5)
            healthy = api_healthy(url)
        if healthy:
            users = _live_users(state)
            if not users:
                log.info("adopting the local Prefect server at %s (pid %s), left behind by a command "
                         "that ended without stopping it", url, pid)
            else:
                log.info("reusing local Prefect server at %s (used by %d other command(s))", url, len(users))
            _write_state(settings, {**state, "status": "running", "users": [*users, user]})
            return PrefectServer(url=url, pid=pid, owned=False, token=user["token"])
        log.warning("the recorded local Prefect server (pid %s, %s) does not answer; stopping it", pid, url)
        terminate_group(pid)
    _state_file(settings).unlink(missing_ok=True)
    return None


def acquire_server(settings: Settings) -> PrefectServer:
    """Return the Prefect API to use: configured, reused, or freshly started on loopback.

    A local server is shared by every command of the home and reference-counted: this command is
    recorded as one of its users until :func:`release_server`, and whoever releases it last stops
    it. A server left behind by a killed command is adopted when it answers, stopped otherwise.

    Raises:
        ServiceUnavailable: a configured API does not answer, or the local one fails to start.
        AlreadyRunning: another command held the home's server lock for longer than a start takes.
    """
    configured = settings.prefect.api_url or os.environ.get("PREFECT_API_URL")
    if configured:
        if not api_healthy(configured, timeout=5.0):
            raise ServiceUnavailable(
                f"the Prefect API at {configured} does not answer; start it (`prefect server start`) "
                "or unset PREFECT_API_URL to let twinflow run a local one"
            )
        return PrefectServer(url=configured, pid=None, owned=False)
    # The lock makes "check, then join or start" atomic across the home's commands. It also makes
    # the server's SQLite database initialise once: only one server of a home ever runs, and it
    # runs its migrations while its starter holds this lock.
    user = _new_user()
    server = None
    try:
        with _server_lock(settings, timeout_s=settings.prefect.start_timeout + 60):
            server = _adopt_recorded(settings, user)
            if server is None:
                stop_unrecorded_servers(settings)
                server = _start(settings, user)
    except BaseException:
        if server is not None:  # interrupted while releasing the lock: the caller never gets it
            release_server(settings, server)
        raise
    return server


def _flush_prefect_logs() -> None:
    # Log records are shipped to the API in the background; send them before the API goes away.
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:  # pragma: no cover - nothing to flush / worker not started
        pass


def release_server(settings: Settings, server: PrefectServer) -> None:
    """Leave the local server; stop it when no other live command uses it.

    A configured (not local) API is left alone. The last user stops the server whether or not it
    started it, so a command that reused the server never loses it to the starter's exit.
    """
    if server.pid is None:
        return
    _flush_prefect_logs()
    # No timeout: leaving must be recorded, and a holder only keeps the lock for a bounded start/stop.
    with _server_lock(settings, timeout_s=None):
        state = read_server_state(settings)
        if state is None or int(state["pid"]) != server.pid:
            return  # already stopped and forgotten (found dead by another command)
        others = [u for u in _live_users(state) if u.get("token") != server.token]
        if others:
            _write_state(settings, {**state, "users": others})
            log.info("left the local Prefect server running for %d other command(s)", len(others))
            return
        if _is_running(server.pid, state.get("created")):
            terminate_group(server.pid, timeout=STOP_GRACE_S)
        stop_unrecorded_servers(settings)
        _state_file(settings).unlink(missing_ok=True)
    log.info("stopped local Prefect server (pid %s)", server.pid)
