"""Separately started service processes (as an operator runs them) for the integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BINDIR = Path(sys.executable).parent


def wait_for(predicate, timeout: float = 60.0, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy or ``timeout`` s pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


def small_pipeline_script(inside_runtime: str = "") -> str:
    """Python source that runs the demo pipeline on the bundled FD001 data, sized down to about two
    minutes, when run as a script (``python -c``), and prints ``RESULT <json of the result>``.

    Args:
        inside_runtime: One statement run inside ``runtime.start`` before the pipeline (``rt`` is the
            runtime), e.g. an assertion on which services it found.
    """
    return rf"""
from twinflow import runtime
from twinflow.settings import get_settings
from twinflow.flows.pipeline import demo_params, pipeline

settings = get_settings()
params = demo_params(settings)
data = params.model_dump()
data["train"].update(n_trials=1, max_iter=40)
data["features"].update(windows=[5, 10])
data["simulate"].update(n_scenarios=20, n_assets=20, horizon=400, batch_scenarios=10)
params = type(params).model_validate(data)
with runtime.start(settings) as rt:
    {inside_runtime or "pass"}
    result = pipeline(params)
print("RESULT " + result.model_dump_json())
"""


class Procs:
    """Processes a test starts (each in its own session, logging to ``<logdir>/<name>.log``), stopped at the end."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start_dask(procs: Procs, scheduler_file: Path, scheduler_env: dict[str, str], worker_env: dict[str, str],
               names: tuple[str, ...] = ("w1", "w2")) -> tuple[str, dict[str, subprocess.Popen]]:
    """``dask scheduler`` plus one single-threaded ``dask worker`` per name; returns the address and the workers.

    The workers are started, not waited for: ``Client.wait_for_workers`` does that.
    """
    sched, log = procs.spawn("dask-scheduler", [str(BINDIR / "dask"), "scheduler", "--host", "127.0.0.1",
                                                "--port", "0", "--no-dashboard", "--scheduler-file",
                                                str(scheduler_file)], scheduler_env)
    deadline = time.monotonic() + 60
    while not scheduler_file.exists():
        assert sched.poll() is None, log.read_text()[-1500:]
        assert time.monotonic() < deadline, "dask scheduler wrote no scheduler file"
        time.sleep(0.2)
    workers = {name: procs.spawn(f"dask-worker-{name}",
                                 [str(BINDIR / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                                  "--name", name, "--nthreads", "1", "--nworkers", "1", "--memory-limit", "3GiB",
                                  "--no-dashboard"], worker_env)[0]
               for name in names}
    return json.loads(scheduler_file.read_text())["address"], workers
