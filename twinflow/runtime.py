"""The runtime: one Prefect API, one Dask cluster and one MLflow backend for a twinflow command.

Use it as a context manager around flow calls::

    from twinflow import runtime

    with runtime.start() as rt:
        pipeline(PipelineParams())

Prefect orchestrates, Dask computes: every twinflow flow runs its stage tasks in the flow's own
process (Prefect's thread-pool task runner, ~10 ms per task run), and each stage task sends its
partitions, trials and batches to the runtime's Dask cluster as plain Dask tasks through
:func:`dask_client` / :func:`using_dask` / :func:`run_on_cluster`. Dask workers therefore never talk
to the Prefect API: they only need twinflow installed and the lake's storage reachable. Work that
needs a GPU asks for the ``GPU`` resource (:func:`gpu_resources`), so it is placed on GPU workers.

:class:`TwinflowTaskRunner` is still there for users who want whole Prefect task runs on the
workers (each then costs ~150 ms of Prefect start-up on the worker). Flows called without a runtime
(e.g. by a deployment) start one themselves through :func:`ensure`.
"""

from __future__ import annotations

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

__all__ = [
    "Runtime",
    "TwinflowTaskRunner",
    "current",
    "ensure",
    "start",
    "dask_client",
    "using_dask",
    "run_on_cluster",
    "gpu_resources",
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
            _export_prefect(stack, settings, server.url, local=server.pid is not None)
        if not _keep_heartbeats(settings, heartbeats):
            stack.enter_context(_no_flow_heartbeats())
        if mlflow:
            rt.experiment_id = configure_mlflow(settings)
        if cluster:
            # Workers need no Prefect settings: stage tasks run here and send them plain Dask tasks.
            # (Prefect tasks run on workers by TwinflowTaskRunner carry their settings with them.)
            rt.cluster = stack.enter_context(dask_cluster(settings))
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


def _export_prefect(stack: ExitStack, settings: Settings, url: str, local: bool = False) -> None:
    from prefect.settings import (
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_URL,
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
        PREFECT_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    storage = str(settings.prefect_home / "storage")
    exported = {"PREFECT_API_URL": url, "PREFECT_LOCAL_STORAGE_PATH": storage}
    updates = {PREFECT_API_URL: url, PREFECT_LOCAL_STORAGE_PATH: storage}
    server_csrf = os.environ.get("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "").lower() in ("1", "true")
    if local and not server_csrf and "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED" not in os.environ:
        # twinflow's own loopback server runs without CSRF protection (Prefect's default), so each
        # new client's token request (one per flow run) would buy nothing.
        exported["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] = "false"
        updates[PREFECT_CLIENT_CSRF_SUPPORT_ENABLED] = False
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


class TwinflowTaskRunner(DaskTaskRunner):
    """DaskTaskRunner that finds its cluster at run time: the active runtime's, else a new one.

    Not what twinflow's own flows use (they run stage tasks in the flow process and send the fine
    work to Dask): use it for a flow of your own whose Prefect tasks should each run on a Dask
    worker, e.g. ``@flow(task_runner=TwinflowTaskRunner())``. Each task run then pays Prefect's
    start-up on the worker (~150 ms) and the workers report to the runtime's Prefect API. Which
    cluster it uses is decided by settings when the flow runs.
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

    In the flow process (where twinflow's stage tasks run) this is the runtime's client; on a Dask
    worker (a task run by :class:`TwinflowTaskRunner`) it is the worker's client.

    Raises:
        ConfigError: no runtime with a cluster is active and no Dask client exists in this process.
    """
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:
        rt = current()
        if rt is not None and rt.cluster is not None:
            return rt.cluster.client
        from distributed import get_client

        try:
            return get_client()
        except ValueError:
            from twinflow.errors import ConfigError

            raise ConfigError("no Dask cluster to send work to: call the flow inside "
                              "`with twinflow.runtime.start():` (twinflow's flows do this themselves) "
                              "or create a distributed.Client first") from None
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


def gpu_resources(client: "distributed.Client", wanted: bool = True) -> dict[str, float] | None:
    """The Dask resources a GPU task should ask for on ``client``'s cluster, or None.

    ``{"GPU": 1}`` when ``wanted`` and some worker advertises a ``GPU`` resource (twinflow's cuda
    clusters do; start your own ``dask cuda worker`` with ``--resources GPU=1``), so GPU work lands
    on GPU workers of a mixed cluster. None otherwise: a requirement that no worker can meet would
    leave the task waiting forever.
    """
    if not wanted:
        return None
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        return {"GPU": 1}
    return None


def run_on_cluster(fn, /, *args, key: str | None = None, retries: int = 0,
                   resources: dict[str, float] | None = None, **kwargs):
    """Run ``fn(*args, **kwargs)`` as one Dask task on the runtime's cluster and return its result.

    What a coarse stage task in the flow process calls for a unit of work that should not run in
    the flow process (CPU-bound parsing, training). A worker lost mid-task is replaced by Dask
    recomputing it elsewhere; ``retries`` adds Dask-level retries for exceptions.

    Args:
        fn: A picklable function (module-level, importable on the workers).
        key: Readable prefix of the Dask key (shown on the dashboard); made unique here.
        retries: Dask retries on exceptions.
        resources: Dask resources the task needs (see :func:`gpu_resources`).
    """
    import uuid

    with using_dask() as client:
        name = f"{key or getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex[:12]}"
        fut = client.submit(fn, *args, key=name, pure=False, retries=retries, resources=resources, **kwargs)
        return fut.result()
