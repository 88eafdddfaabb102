"""The runtime: one Prefect API, one Dask cluster and one MLflow backend for a twinflow command.

Use it as a context manager around flow calls::

    from twinflow import runtime

    with runtime.start() as rt:
        pipeline(PipelineParams())

Inside, :class:`TwinflowTaskRunner` (the task runner of every twinflow flow) sends Prefect tasks to
the runtime's Dask cluster, and the runtime's Prefect API URL is exported so that Dask workers
report their task runs to the same API as the flow run. Flows called without a runtime (e.g. by a
deployment) start one themselves through :func:`ensure`.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from prefect_dask import DaskTaskRunner

from twinflow.cluster import ClusterHandle, dask_cluster, gpu_count, has_dask_cuda, resolve_mode
from twinflow.prefect_server import PrefectServer, acquire_server, release_server, set_offline_env
from twinflow.settings import Settings, get_settings
from twinflow.tracking import configure_mlflow

if TYPE_CHECKING:  # annotations only
    import distributed

log = logging.getLogger("twinflow.runtime")

__all__ = [
    "Runtime",
    "TwinflowTaskRunner",
    "current",
    "ensure",
    "start",
    "dask_client",
    "using_dask",
    "gpu_count",
    "has_dask_cuda",
    "resolve_mode",
]


@dataclass
class Runtime:
    """What a running twinflow command is connected to."""

    settings: Settings
    prefect: PrefectServer | None = None
    cluster: ClusterHandle | None = None
    experiment_id: str | None = None
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def prefect_url(self) -> str | None:
        return self.prefect.url if self.prefect else None

    @property
    def prefect_ui_url(self) -> str | None:
        return self.prefect.url.removesuffix("/api") if self.prefect else None

    def task_runner(self) -> "TwinflowTaskRunner":
        """A Prefect task runner bound to this runtime's Dask cluster."""
        return TwinflowTaskRunner(address=self.cluster.address if self.cluster else None)


_CURRENT: list[Runtime] = []


def current() -> Runtime | None:
    """The innermost active runtime of this process, or None."""
    return _CURRENT[-1] if _CURRENT else None


def _prepare_home(settings: Settings) -> None:
    for path in (settings.home, settings.prefect_home):
        path.mkdir(parents=True, exist_ok=True)


@contextmanager
def start(
    settings: Settings | None = None,
    *,
    prefect: bool = True,
    cluster: bool = True,
    mlflow: bool = True,
    heartbeats: bool | None = None,
) -> Iterator[Runtime]:
    """Start (or connect to) the Prefect API, the Dask cluster and MLflow for one command.

    Order matters: the Prefect URL is exported before the cluster starts, so that worker processes
    inherit it. Everything this call started is stopped on exit, in reverse order.

    Args:
        settings: Settings to use; read from the environment when omitted.
        prefect: Start/reuse the Prefect API.
        cluster: Start/connect the Dask cluster.
        mlflow: Configure MLflow tracking and the experiment.
        heartbeats: Keep Prefect's flow-run heartbeats for flows run inside the block (True) or turn
            them off (False); None decides by ``settings.prefect.flow_heartbeats``.
    """
    settings = settings or get_settings()
    set_offline_env()
    _prepare_home(settings)
    rt = Runtime(settings=settings)
    with rt._stack as stack:
        if prefect:
            server = acquire_server(settings)
            stack.callback(release_server, settings, server)
            rt.prefect = server
            _export_prefect(stack, settings, server.url)
        if not _keep_heartbeats(settings, heartbeats):
            stack.enter_context(_no_flow_heartbeats())
        if mlflow:
            rt.experiment_id = configure_mlflow(settings)
        if cluster:
            rt.cluster = stack.enter_context(dask_cluster(settings))
            if rt.cluster.mode == "address" and rt.prefect:
                _push_env_to_workers(rt.cluster, {"PREFECT_API_URL": rt.prefect.url})
        _CURRENT.append(rt)
        stack.callback(_CURRENT.remove, rt)
        yield rt


@contextmanager
def ensure(settings: Settings | None = None) -> Iterator[Runtime]:
    """Yield the active runtime, or start one for the duration of the block."""
    rt = current()
    if rt is not None:
        yield rt
        return
    with start(settings) as rt:
        yield rt


def _export_prefect(stack: ExitStack, settings: Settings, url: str) -> None:
    from prefect.settings import (
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_URL,
        PREFECT_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    storage = str(settings.prefect_home / "storage")
    exported = {"PREFECT_API_URL": url, "PREFECT_LOCAL_STORAGE_PATH": storage}
    updates = {PREFECT_API_URL: url, PREFECT_LOCAL_STORAGE_PATH: storage}
    ca_file = _loopback_ca_file(settings, url)
    if ca_file:
        exported["PREFECT_API_SSL_CERT_FILE"] = ca_file
        updates[PREFECT_API_SSL_CERT_FILE] = ca_file
    previous = {k: os.environ.get(k) for k in exported}
    # The environment reaches worker processes spawned later; the settings context reaches this
    # process (Prefect read its settings when it was imported).
    os.environ.update(exported)

    def restore() -> None:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    stack.callback(restore)
    stack.enter_context(temporary_settings(updates=updates))


def _loopback_ca_file(settings: Settings, url: str) -> str | None:
    """A one-certificate CA file for Prefect clients of a plain-HTTP loopback API, or None.

    Every Prefect client builds an ``ssl.SSLContext`` from ``PREFECT_API_SSL_CERT_FILE`` (default:
    the system's whole CA bundle, ~40-50 ms to parse) even when the API is ``http://``, and a task
    run on a Dask worker builds two: ~130 of its ~365 ms. On a loopback ``http://`` API no
    certificate is ever checked, so any valid one will do and parses in ~1 ms. Left alone when the
    user set the variable or the API is not plain HTTP on this machine.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if os.environ.get("PREFECT_API_SSL_CERT_FILE") or parts.scheme != "http" or \
            parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    path = settings.prefect_home / "loopback-ca.pem"
    if not path.exists():
        import re

        import certifi

        bundle = Path(certifi.where()).read_text()
        first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", bundle, re.S)
        if first is None:  # pragma: no cover - certifi always ships certificates
            return None
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(first.group(0))
        os.replace(tmp, path)  # atomic: a concurrent command never reads half a file
    return str(path)


_HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def _keep_heartbeats(settings: Settings, explicit: bool | None) -> bool:
    if explicit is not None:
        return explicit
    mode = settings.prefect.flow_heartbeats
    if mode != "auto":
        return mode == "on"
    if any(os.environ.get(k) for k in _HEARTBEAT_ENV):
        return True
    from prefect.context import FlowRunContext

    # Inside a flow run (a deployment's flow calling ensure()) the runner or worker chose the
    # heartbeat setting and its subflows should follow it.
    return FlowRunContext.get() is not None


@contextmanager
def _no_flow_heartbeats() -> Iterator[None]:
    # Heartbeats only feed a server-side "run vanished" automation, which watches runs a runner or
    # worker owns. A flow run in this process ends with its command, and the engine joins the
    # heartbeat thread at exit, which sleeps in 1 s steps: that join was most of a no-op ingest re-run.
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _set_env(values: dict[str, str]) -> None:
    os.environ.update(values)


def _push_env_to_workers(handle: ClusterHandle, values: dict[str, str]) -> None:
    # Workers started by someone else may not know our Prefect API; settings also travel with each
    # task's serialized context, this covers code that reads the environment directly.
    try:
        handle.client.run(_set_env, values)
    except Exception as exc:  # pragma: no cover - best effort on foreign clusters
        log.warning("could not export settings to Dask workers: %s", exc)


class TwinflowTaskRunner(DaskTaskRunner):
    """DaskTaskRunner that finds its cluster at run time: the active runtime's, else a new one.

    Flows are decorated with it once; which cluster they use is decided by settings when they run.
    """

    def __init__(self, address: str | None = None, **kwargs):
        super().__init__(address=address, **kwargs)

    def duplicate(self) -> "TwinflowTaskRunner":
        return type(self)(address=self.address, client_kwargs=self.client_kwargs)

    @property
    def client(self):  # type: ignore[override]
        if self._client is None and self.address is None and self._cluster is None:
            rt = current()
            if rt is not None and rt.cluster is not None:
                self.address = rt.cluster.address
            else:
                handle = self._exit_stack.enter_context(dask_cluster(get_settings()))
                self.address = handle.address
        return super().client


def dask_client():
    """The Dask client to submit fine-grained work to, from inside a twinflow task or flow.

    On a Dask worker (a task run by :class:`TwinflowTaskRunner`) this is the worker's client;
    in the flow process it is the runtime's client.
    """
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:
        rt = current()
        if rt is not None and rt.cluster is not None:
            return rt.cluster.client
        from distributed import get_client

        return get_client()
    from distributed import worker_client

    # worker_client secedes from the worker's thread pool while we wait on sub-tasks.
    return worker_client()


@contextmanager
def using_dask() -> Iterator["distributed.Client"]:
    """Context-manager form of :func:`dask_client`, the same code in the flow process and on a worker.

    On a worker it enters ``worker_client()`` (seceding while sub-tasks run); elsewhere it yields
    the runtime's client and leaves it open (it belongs to the runtime).
    """
    from distributed import Client

    client = dask_client()
    if isinstance(client, Client):
        yield client
    else:
        with client as c:
            yield c
