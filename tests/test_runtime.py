"""The runtime against real services: a real Prefect server, real Dask clusters, real MLflow."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import psutil
import pytest
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from twinflow import runtime as rt_mod
from twinflow.cluster import dask_cluster, resolve_mode
from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.prefect_server import acquire_server, read_server_state, release_server
from twinflow.settings import Settings, get_settings


@task
def _where(i: int) -> tuple[int, int]:
    return i, os.getpid()


@flow(task_runner=rt_mod.TwinflowTaskRunner())
def _fan_out(n: int = 6) -> list[tuple[int, int]]:
    return [f.result() for f in [_where.submit(i) for i in range(n)]]


def _worker_view(i: int) -> tuple[int, int, str | None]:
    return i, os.getpid(), os.environ.get("PREFECT_API_URL")


@task(name="stage")
def _stage(n: int) -> dict:
    # What every twinflow stage task does: run here, send the fine work to Dask.
    with rt_mod.using_dask() as client:
        parts = client.gather(client.map(_worker_view, range(n), pure=False))
    one = rt_mod.run_on_cluster(_worker_view, -1, key="one-unit")
    return {"task_pid": os.getpid(), "parts": parts, "one": one}


@flow(task_runner=ThreadPoolTaskRunner())
def _staged(n: int = 6) -> dict:
    return _stage.submit(n).result()


def _no_prefect_env() -> None:
    os.environ.pop("PREFECT_API_URL", None)


def _prefect_servers_below(pid: int) -> set[int]:
    out = set()
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "prefect" in cmd and "server" in cmd and "start" in cmd:
            out.add(p.pid)
        elif "uvicorn" in cmd and "prefect" in cmd:
            out.add(p.pid)
    return out


@pytest.mark.integration
def test_worker_task_runs_land_in_the_flow_runs_api_and_one_server_is_started(tmp_path, monkeypatch):
    """Task runs on Dask worker processes are recorded in the flow run's API; one local server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # Servers of other tests (the session's) may already run below this process: count only new ones.
    before = _prefect_servers_below(os.getpid())
    settings = get_settings(home=tmp_path / "home", dask={"mode": "local", "n_workers": 2,
                                                          "threads_per_worker": 1})
    with rt_mod.start(settings) as rt:
        assert rt.prefect.owned and rt.prefect.url.startswith("http://127.0.0.1:")
        assert os.environ["PREFECT_API_URL"] == rt.prefect.url
        state = _fan_out(6, return_state=True)
        results = state.result()
        flow_run_id = state.state_details.flow_run_id
        worker_pids = set(rt.cluster.client.run(os.getpid).values())
        assert {pid for _, pid in results} <= worker_pids, "tasks must run on Dask worker processes"
        assert os.getpid() not in {pid for _, pid in results}
        started = _prefect_servers_below(os.getpid()) - before
        # One server: ours (its own helper processes aside); none started by the Dask workers.
        assert rt.prefect.pid in started
        assert started - {rt.prefect.pid} <= _prefect_servers_below(rt.prefect.pid), started
        with get_client(sync_client=True) as client:
            assert str(client.api_url).startswith(rt.prefect.url.removesuffix("/api"))
            # Worker task runs report their states as events; the server's task-run recorder persists them
            # a moment later, so the final states are awaited rather than read once.
            deadline = time.monotonic() + 60
            while True:
                runs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                if (len(runs) == 6 and all(r.state and r.state.is_completed() for r in runs)) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert len(runs) == 6
        assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
        assert read_server_state(settings)["url"] == rt.prefect.url
    # The command that started the server stopped it.
    assert read_server_state(settings) is None
    assert _prefect_servers_below(os.getpid()) - before == set()


@pytest.mark.integration
def test_stage_tasks_run_in_the_flow_process_and_workers_need_no_prefect_api(tmp_path, monkeypatch):
    """twinflow's pattern: Prefect task runs here, their fan-out on Dask workers that know no Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = get_settings(home=tmp_path / "home", dask={"mode": "local", "n_workers": 2,
                                                          "threads_per_worker": 1})
    with rt_mod.start(settings) as rt:
        rt.cluster.client.run(_no_prefect_env)  # the workers inherited it: take it away
        state = _staged(6, return_state=True)
        out = state.result()
        worker_pids = set(rt.cluster.client.run(os.getpid).values())
        assert out["task_pid"] == os.getpid()
        assert [i for i, _, _ in out["parts"]] == list(range(6))
        assert {pid for _, pid, _ in out["parts"]} <= worker_pids
        assert out["one"][1] in worker_pids
        assert all(url is None for _, _, url in [*out["parts"], out["one"]])
        with get_client(sync_client=True) as client:
            # Task-run states arrive as events and the server's recorder persists them a moment later.
            deadline = time.monotonic() + 60
            while True:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
                if (runs and all(r.state and r.state.is_completed() for r in runs)) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert [r.name.split("-")[0] for r in runs] == ["stage"]
        assert runs[0].state is not None and runs[0].state.is_completed(), runs[0].state
        assert rt_mod.gpu_resources(rt.cluster.client) is None  # CPU workers: no GPU requirement


def test_dask_client_outside_a_runtime_is_a_clear_error():
    import sys

    # A fresh process: this one may hold other tests' Dask clients.
    out = subprocess.run([sys.executable, "-c", "from twinflow import runtime; runtime.dask_client()"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ConfigError: no Dask cluster to send work to" in out.stderr, out.stderr[-2000:]


@pytest.mark.integration
def test_local_server_is_reused_for_the_same_home(prefect_server):
    settings = prefect_server.settings
    again = acquire_server(settings)
    assert again.url == prefect_server.url and not again.owned
    release_server(settings, again)  # not owned: must leave the server running
    from twinflow.prefect_server import api_healthy

    assert api_healthy(prefect_server.url)


def test_interrupt_while_the_local_server_starts_leaves_no_orphan(tmp_path, monkeypatch):
    from twinflow import prefect_server as ps

    started = []
    real_popen = ps.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupted(url, timeout=1.0):
        raise KeyboardInterrupt  # SIGTERM/Ctrl-C arriving while the server is still starting

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(ps.subprocess, "Popen", popen)
    monkeypatch.setattr(ps, "api_healthy", interrupted)
    settings = get_settings(home=tmp_path / "home", prefect={"port": 0})
    with pytest.raises(KeyboardInterrupt):
        acquire_server(settings)
    assert len(started) == 1 and started[0].poll() is not None  # the server process was stopped
    assert read_server_state(settings) is None


def test_configured_prefect_api_that_is_down_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with pytest.raises(ServiceUnavailable, match="does not answer"):
        acquire_server(get_settings(home=tmp_path / "h"))


def test_configured_port_in_use_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port}.*already in use"):
            acquire_server(get_settings(home=tmp_path / "h", prefect={"port": port}))


def test_unreachable_scheduler_address_is_a_clear_error(tmp_path):
    settings = get_settings(home=tmp_path / "h", dask={"mode": "address", "address": "tcp://127.0.0.1:9",
                                                       "connect_timeout": 2})
    with pytest.raises(ServiceUnavailable, match="cannot connect to the Dask scheduler at tcp://127.0.0.1:9"):
        with dask_cluster(settings):
            pass


def test_mode_resolution(tmp_path, monkeypatch):
    s = get_settings(home=tmp_path, dask={"mode": "auto"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_mode(s) == ("local", "no GPU found")
    assert resolve_mode(get_settings(home=tmp_path, dask={"address": "tcp://h:1"}))[0] == "address"
    with pytest.raises(ConfigError, match="TWINFLOW_DASK__ADDRESS"):
        resolve_mode(get_settings(home=tmp_path, dask={"mode": "address"}))


@pytest.mark.integration
def test_runtime_on_existing_scheduler_and_mlflow_runs_close_on_error(runtime):
    import mlflow

    from twinflow.tracking import tracked_run

    assert runtime.cluster.mode == "address" and not runtime.cluster.owned
    assert runtime.cluster.client.submit(lambda x: x + 1, 1).result() == 2
    with pytest.raises(ZeroDivisionError):
        with tracked_run("parent", stage="pipeline") as parent:
            with tracked_run("child", stage="ingest", params={"a": {"b": 1}}) as child:
                1 / 0
    client = mlflow.MlflowClient()
    assert client.get_run(child.info.run_id).info.status == "FAILED"
    assert client.get_run(child.info.run_id).data.params == {"a.b": "1"}
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_stage_error_is_not_masked_when_the_tracking_server_dies_mid_run(monkeypatch, caplog, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    from twinflow.tracking import tracked_run

    # This test's own experiment: an earlier test may have left another store's experiment id set.
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("dies", (tmp_path / "art").as_uri()))

    def server_gone(self, run_id, status=None, end_time=None):
        raise MlflowException("API request to http://mlflow:5000 failed: Connection refused")

    with pytest.raises(KeyError, match="sensor_7"):
        with tracked_run("stage", stage="train"):
            monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", server_gone)
            raise KeyError("sensor_7")
    assert mlflow.active_run() is None
    assert "could not mark MLflow run" in caplog.text and "Connection refused" in caplog.text


def test_unreachable_tracking_server_is_a_clear_error(tmp_path):
    from twinflow.tracking import configure_mlflow

    settings = get_settings(home=tmp_path, mlflow={"tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(ServiceUnavailable, match="MLflow tracking server at http://127.0.0.1:9"):
        configure_mlflow(settings)


@flow
def _heartbeat_setting() -> int | None:
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency


@flow
def _nested_runtime_heartbeat_setting(home: str) -> int | None:
    # A deployment's flow that starts a runtime: its subflows keep the runner's choice.
    with rt_mod.start(get_settings(home=home), cluster=False, mlflow=False):
        return _heartbeat_setting()


def test_in_process_flow_runs_skip_heartbeats_unless_asked(prefect_api, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    settings = get_settings(home=tmp_path / "home")
    default = _heartbeat_setting()
    assert default is not None  # Prefect's own default outside twinflow

    with rt_mod.start(settings, cluster=False, mlflow=False):
        assert _heartbeat_setting() is None
    assert _heartbeat_setting() == default  # restored on exit

    with rt_mod.start(settings, cluster=False, mlflow=False, heartbeats=True):
        assert _heartbeat_setting() == default
    on = get_settings(home=tmp_path / "home", prefect={"flow_heartbeats": "on"})
    with rt_mod.start(on, cluster=False, mlflow=False):
        assert _heartbeat_setting() == default
    off = get_settings(home=tmp_path / "home", prefect={"flow_heartbeats": "off"})
    with rt_mod.start(off, cluster=False, mlflow=False, heartbeats=None):
        assert _heartbeat_setting() is None

    assert _nested_runtime_heartbeat_setting(str(tmp_path / "home")) == default


def test_explicit_prefect_heartbeat_setting_is_honoured(prefect_api, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "45")
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45}):
        with rt_mod.start(get_settings(home=tmp_path / "home"), cluster=False, mlflow=False):
            assert _heartbeat_setting() == 45


def test_the_local_server_yields_cpu_and_its_clients_skip_csrf_tokens(prefect_server, monkeypatch):
    from prefect.settings import get_current_settings

    # Started with the default settings: niced, so its bookkeeping yields to Dask workers.
    assert psutil.Process(prefect_server.pid).nice() == min(19, os.nice(0) + Settings().prefect.server_nice)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", raising=False)

    @flow(name="csrf-off")
    def ping() -> int:
        return 7

    with rt_mod.start(prefect_server.settings, cluster=False, mlflow=False) as rt:
        assert rt.prefect.pid == prefect_server.pid  # the home's local server, reused
        assert get_current_settings().client.csrf_support_enabled is False
        assert os.environ["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "false"
        assert ping() == 7  # the local server accepts writes without a token
    assert "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED" not in os.environ


def test_loopback_api_clients_get_a_small_ca_file(prefect_api, tmp_path, monkeypatch):
    import ssl

    from prefect.settings import get_current_settings

    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    settings = get_settings(home=tmp_path / "home")
    with rt_mod.start(settings, cluster=False, mlflow=False):
        path = get_current_settings().api.ssl_cert_file
        assert path == str(settings.prefect_home / "loopback-ca.pem") == os.environ["PREFECT_API_SSL_CERT_FILE"]
        pem = open(path).read()
        assert pem.count("BEGIN CERTIFICATE") == 1
        ssl.create_default_context(cafile=path)  # a valid CA file: Prefect's clients load it
        assert _heartbeat_setting() is None  # and flows still run against the API
        # A configured API may protect against CSRF: its clients keep asking for tokens.
        assert get_current_settings().client.csrf_support_enabled is True
    assert "PREFECT_API_SSL_CERT_FILE" not in os.environ

    assert rt_mod._loopback_ca_file(settings, "https://prefect.plant.local/api") is None
    assert rt_mod._loopback_ca_file(settings, "http://10.0.0.5:4200/api") is None
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", "/etc/plant-ca.pem")
    assert rt_mod._loopback_ca_file(settings, "http://127.0.0.1:4200/api") is None


def _sleeper(env_home: str | None) -> subprocess.Popen:
    """A stand-in process in its own session, marked (or not) as a home's local server."""
    import sys

    env = dict(os.environ)
    if env_home is not None:
        env["TWINFLOW_SERVER_HOME"] = env_home
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env=env,
                            start_new_session=True)


def test_an_unrecorded_server_of_the_home_is_found_and_stopped(tmp_path):
    """A command killed after starting its server but before recording it leaves a marked orphan."""
    from twinflow.prefect_server import home_server_pids, stop_unrecorded_servers

    settings = get_settings(home=tmp_path / "home")
    other = get_settings(home=tmp_path / "other")
    orphan, foreign, unmarked = (_sleeper(str(settings.prefect_home)), _sleeper(str(other.prefect_home)),
                                 _sleeper(None))
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in home_server_pids(settings) and time.monotonic() < deadline:
            time.sleep(0.1)  # the child's environment is readable once it has exec'd
        assert home_server_pids(settings) == [orphan.pid]
        assert stop_unrecorded_servers(settings) == [orphan.pid]
        assert orphan.wait(5) is not None
        assert foreign.poll() is None and unmarked.poll() is None  # another home's, and unmarked: left alone
        assert home_server_pids(settings) == []
    finally:
        for p in (orphan, foreign, unmarked):
            p.kill()
            p.wait()


def test_users_whose_process_is_gone_or_reused_are_dropped(tmp_path):
    import subprocess
    import sys

    from twinflow.prefect_server import _created, _live_users

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = os.getpid()
    state = {"users": [{"pid": me, "created": _created(me), "token": "a"},
                       {"pid": dead.pid, "created": 1.0, "token": "b"},
                       {"pid": me, "created": _created(me) - 100, "token": "c"}]}  # pid reused since
    assert [u["token"] for u in _live_users(state)] == ["a"]


@pytest.mark.integration
def test_the_local_server_is_reference_counted_and_the_last_user_stops_it(tmp_path, monkeypatch):
    """The starter leaving first keeps the server for the other user; a stale record is replaced."""
    import json
    import subprocess
    import sys

    from twinflow.prefect_server import api_healthy, home_server_pids

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = get_settings(home=tmp_path / "home")
    settings.prefect_home.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # What a kill -9 leaves when the server died too: a record naming gone processes.
    (settings.prefect_home / "server.json").write_text(json.dumps(
        {"pid": dead.pid, "url": "http://127.0.0.1:9/api", "status": "running",
         "users": [{"pid": dead.pid, "created": 1.0, "token": "x"}]}))

    first = acquire_server(settings)
    assert first.owned and first.pid != dead.pid and api_healthy(first.url)
    second = acquire_server(settings)
    assert (second.url, second.pid, second.owned) == (first.url, first.pid, False)
    assert len(read_server_state(settings)["users"]) == 2

    release_server(settings, first)  # the starter ends first
    assert api_healthy(first.url), "the server must stay up while another command uses it"
    state = read_server_state(settings)
    assert [u["token"] for u in state["users"]] == [second.token]

    release_server(settings, second)  # the last user stops it, although it did not start it
    assert read_server_state(settings) is None
    assert not api_healthy(first.url, timeout=1.0)
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE
    assert home_server_pids(settings) == []


_CONFIGURE_MLFLOW = """
import sys, time
from pathlib import Path
import mlflow  # imported before the start line: the processes reach MLflow's first connect together
from twinflow.settings import Settings, get_settings
from twinflow.tracking import configure_mlflow
settings = get_settings(home=sys.argv[1])
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
print("experiment", configure_mlflow(settings), flush=True)
"""


@pytest.mark.integration
def test_commands_starting_together_on_a_fresh_home_create_the_mlflow_store_once(tmp_path):
    """Three processes connect to a fresh SQLite store at the same moment: all succeed, one schema."""
    import subprocess
    import sys

    import sqlalchemy

    home, go = tmp_path / "home", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWINFLOW_", "MLFLOW_TRACKING"))}
    procs = [subprocess.Popen([sys.executable, "-c", _CONFIGURE_MLFLOW, str(home), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(8)  # let all three import MLflow and wait at the start line
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    ids = {out.split()[-1] for out, _ in outs}
    assert len(ids) == 1, ids  # one experiment, whichever process created it
    engine = sqlalchemy.create_engine(f"sqlite:///{home / 'mlflow.db'}")
    with engine.connect() as conn:
        versions = conn.execute(sqlalchemy.text("select version_num from alembic_version")).fetchall()
    engine.dispose()
    assert len(versions) == 1, versions


def test_the_dask_dashboard_listens_on_loopback_by_default(tmp_path, monkeypatch):
    from urllib.parse import urlsplit

    from twinflow.cluster import _local_kwargs

    settings = get_settings(home=tmp_path, dask={"mode": "local", "n_workers": 1, "threads_per_worker": 1})
    assert settings.dask.dashboard_address == "127.0.0.1:0"
    with dask_cluster(settings) as handle:
        port = urlsplit(handle.dashboard_link).port
        listening = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
    assert urlsplit(handle.dashboard_link).hostname == "127.0.0.1"  # and the log says what it is

    monkeypatch.setenv("TWINFLOW_DASK__DASHBOARD_ADDRESS", "0.0.0.0:8787")  # settable, for a plant's LAN
    assert _local_kwargs(get_settings(home=tmp_path))["dashboard_address"] == "0.0.0.0:8787"


def _worker_name() -> str:
    from distributed import get_worker

    return get_worker().name


def test_gpu_work_lands_only_on_workers_that_advertise_a_gpu():
    """A mixed cluster (one CPU worker, one advertising ``GPU``): work asking for it goes to the GPU one."""
    from distributed import Client, Scheduler, SpecCluster, Worker

    spec = {"cpu": {"cls": Worker, "options": {"nthreads": 1}},
            "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    with SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        assert rt_mod.gpu_resources(client, wanted=False) is None
        resources = rt_mod.gpu_resources(client)
        assert resources == {"GPU": 1}
        names = client.gather([client.submit(_worker_name, pure=False, resources=resources) for _ in range(8)])
        assert set(names) == {"gpu"}
        free = client.gather([client.submit(_worker_name, pure=False) for _ in range(16)])
        assert set(free) <= {"cpu", "gpu"}


def test_a_port_left_in_time_wait_by_a_stopped_server_counts_as_free():
    """The home's recorded Prefect port stays the home's after its last server stopped (stable links)."""
    from twinflow.prefect_server import _port_in_use

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert _port_in_use("127.0.0.1", port)  # a listener: in use
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
    client.close()
    listener.close()
    assert not _port_in_use("127.0.0.1", port)
