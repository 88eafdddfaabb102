"""One factory for the Dask cluster of every mode: ``local``, ``cuda``, ``address`` (or ``auto``)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.settings import Settings

if TYPE_CHECKING:  # annotations only
    import distributed

log = logging.getLogger("twinflow.runtime")


@dataclass
class ClusterHandle:
    """A connected Dask client and what it is connected to."""

    client: "distributed.Client"
    mode: str
    address: str
    dashboard_link: str | None
    reason: str = ""
    owned: bool = True
    n_workers: int = field(default=0)


def gpu_count() -> int:
    """Number of visible CUDA GPUs (0 when there is no driver), without initialising CUDA here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    if visible:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def has_dask_cuda() -> bool:
    """True when dask-cuda and CuPy can be imported."""
    return importlib.util.find_spec("dask_cuda") is not None and importlib.util.find_spec("cupy") is not None


def resolve_mode(settings: Settings) -> tuple[str, str]:
    """Return ``(mode, reason)`` for the configured mode, resolving ``auto``."""
    mode = settings.dask.mode
    if mode == "address" or (mode == "auto" and settings.dask.address):
        if not settings.dask.address:
            raise ConfigError("dask mode 'address' needs TWINFLOW_DASK__ADDRESS (e.g. tcp://host:8786)")
        return "address", f"scheduler address {settings.dask.address} configured"
    if mode == "cuda":
        if not has_dask_cuda():
            raise ConfigError("dask mode 'cuda' needs dask-cuda and cupy: pip install 'twinflow[gpu]'")
        return "cuda", "mode cuda configured"
    if mode == "local":
        return "local", "mode local configured"
    n = gpu_count()
    if n and has_dask_cuda():
        return "cuda", f"{n} GPU(s) and dask-cuda found"
    if n:
        return "local", f"{n} GPU(s) found but dask-cuda/cupy not installed (pip install 'twinflow[gpu]')"
    return "local", "no GPU found"


def _local_kwargs(settings: Settings) -> dict:
    d = settings.dask
    kwargs: dict = {"processes": True, "dashboard_address": d.dashboard_address, "memory_limit": d.memory_limit}
    if d.n_workers:
        kwargs["n_workers"] = d.n_workers
    if d.threads_per_worker:
        kwargs["threads_per_worker"] = d.threads_per_worker
    return kwargs


@contextmanager
def dask_cluster(settings: Settings) -> Iterator[ClusterHandle]:
    """Start (or connect to) the configured Dask cluster and yield a connected client.

    Clusters this function starts are closed on exit; an ``address`` cluster is left running.

    Raises:
        ServiceUnavailable: the scheduler address refuses connections.
        ConfigError: the mode cannot work on this machine.
    """
    from distributed import Client, LocalCluster

    mode, reason = resolve_mode(settings)
    with ExitStack() as stack:
        if mode == "address":
            try:
                client = Client(settings.dask.address, timeout=settings.dask.connect_timeout)
            except (OSError, TimeoutError) as exc:
                raise ServiceUnavailable(
                    f"cannot connect to the Dask scheduler at {settings.dask.address}: {exc}; "
                    "check `dask scheduler` is running or unset TWINFLOW_DASK__ADDRESS"
                ) from None
            stack.callback(client.close)
            owned = False
        else:
            if mode == "cuda":
                from dask_cuda import LocalCUDACluster

                # One worker per GPU, each advertising the GPU resource that GPU work asks for
                # (twinflow.runtime.gpu_resources): a plain keyword of every Dask worker.
                kwargs = {"dashboard_address": settings.dask.dashboard_address, "resources": {"GPU": 1}}
                if settings.dask.threads_per_worker:
                    kwargs["threads_per_worker"] = settings.dask.threads_per_worker
                cluster = stack.enter_context(LocalCUDACluster(**kwargs))
            else:
                cluster = stack.enter_context(LocalCluster(**_local_kwargs(settings)))
            client = stack.enter_context(Client(cluster))
            owned = True
        n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        log.info("Dask cluster mode: %s (%s), %d worker(s); dashboard: %s", mode, reason, n,
                 client.dashboard_link)
        yield ClusterHandle(client=client, mode=mode, address=client.scheduler.address,
                            dashboard_link=client.dashboard_link, reason=reason, owned=owned,
                            n_workers=n)
