"""Point the pipeline at an existing Dask scheduler: the path for when one machine is outgrown.

In production the scheduler and workers run on other machines (`dask scheduler` on one host,
`dask worker tcp://host:8786` on each GPU/CPU box, with twinflow installed and the lake reachable;
they need no Prefect or MLflow settings, since stage tasks run in this process). Here the example
starts a real `dask scheduler` and two `dask worker` processes on loopback when no address is
given, then runs the pipeline against them purely through settings:
``TWINFLOW_DASK__MODE=address`` and ``TWINFLOW_DASK__ADDRESS``.

Run: ``python examples/existing_scheduler.py [--address tcp://host:8786] [--stages ingest features]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator


@contextmanager
def local_scheduler(n_workers: int = 2) -> Iterator[str]:
    """Start `dask scheduler` + `n_workers` `dask worker` processes; yield the scheduler address."""
    bindir = os.path.dirname(sys.executable)
    dask = os.path.join(bindir, "dask")
    with ExitStack() as stack:
        sched = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--dashboard-address", ":0"], stderr=subprocess.PIPE, text=True)
        stack.callback(_stop, sched)
        address = None
        deadline = time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            line = sched.stderr.readline()
            if not line and sched.poll() is not None:
                raise RuntimeError("dask scheduler exited before it was ready")
            m = re.search(r"Scheduler at:\s+(tcp://\S+)", line)
            if m:
                address = m.group(1)
        if address is None:
            raise RuntimeError("dask scheduler did not report its address")
        # Keep draining its log so the pipe never fills.
        import threading

        threading.Thread(target=lambda: [None for _ in sched.stderr], daemon=True).start()
        for _ in range(n_workers):
            w = subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                  "--dashboard-address", ":0", "--memory-limit", "4GiB"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(_stop, w)
        yield address


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="existing scheduler; started locally if omitted")
    parser.add_argument("--stages", nargs="+", default=["ingest", "features"],
                        help="pipeline stages to run (default: ingest features)")
    args = parser.parse_args()

    from twinflow import runtime
    from twinflow.flows.pipeline import demo_params, pipeline
    from twinflow.settings import get_settings

    with ExitStack() as stack:
        # The workers are started before twinflow's Prefect API and never learn its URL: they run
        # plain Dask tasks only.
        address = args.address or stack.enter_context(local_scheduler())
        os.environ["TWINFLOW_DASK__MODE"] = "address"
        os.environ["TWINFLOW_DASK__ADDRESS"] = address
        settings = get_settings()
        with runtime.start(settings) as rt:
            print(f"connected to {rt.cluster.address} ({rt.cluster.n_workers} workers, mode {rt.cluster.mode})")
            result = pipeline(demo_params(settings, stages=args.stages))
        for stage, summary in result.summaries().items():
            print(f"{stage}: {summary}")


if __name__ == "__main__":
    main()
