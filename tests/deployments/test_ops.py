"""Operations pieces against the real Prefect server: failure summaries, notifications, retries, the cluster slot."""

from __future__ import annotations

import contextvars
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from prefect import flow, task
from pydantic import BaseModel, SecretStr

from twinflow.deployments.ops import (
    IO_TASK_OPTIONS,
    NOTIFY_VARIABLE,
    cluster_slot,
    exclusive,
    is_transient,
    stage_timeout,
    with_ops,
)
from twinflow.errors import ConfigError, ServiceUnavailable

TOKEN = "tok-3e8a1f-secret"


class SiteParams(BaseModel):
    site: str = "plant-7"
    api_token: SecretStr = SecretStr(TOKEN)
    options: dict[str, str] = {"password": "pw-in-a-dict", "region": "eu"}


@flow(name="ops-failing")
def failing(params: SiteParams) -> None:
    raise OSError("landing share unreachable")


def _failures(home: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((home / "failures").glob("*.json"))]


def test_failure_hook_writes_a_redacted_summary(prefect_api, tmp_path):
    guarded = with_ops(failing, "ingest")
    assert guarded.timeout_seconds == stage_timeout("ingest")
    with pytest.raises(OSError, match="landing share unreachable"):
        guarded(SiteParams())
    (summary,) = _failures(Path(os.environ["TWINFLOW_HOME"]))
    assert summary["flow"] == "ops-failing" and summary["state_name"] == "Failed"
    assert summary["error"] == "OSError: landing share unreachable"
    assert summary["parameters"]["params"]["site"] == "plant-7"
    assert summary["parameters"]["params"]["options"] == {"password": "**********", "region": "eu"}
    md = next((Path(os.environ["TWINFLOW_HOME"]) / "failures").glob("*.md")).read_text()
    for text in (json.dumps(summary), md):
        assert TOKEN not in text and "pw-in-a-dict" not in text
    assert summary["flow_run_id"] in md


class _Hook(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self):  # noqa: N802 - http.server API
        self.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_failure_notification_through_a_prefect_block(prefect_api):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.variables import Variable

    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    name = f"ops-alerts-{os.urandom(3).hex()}"
    try:
        CustomWebhookNotificationBlock(
            name="twinflow-alerts", url=f"http://127.0.0.1:{server.server_port}/hook",
            json_data={"subject": "{{subject}}", "text": "{{body}}"}).save(name)
        Variable.set(NOTIFY_VARIABLE, f"custom-webhook/{name}", overwrite=True)
        with pytest.raises(OSError):
            with_ops(failing, "ingest")(SiteParams(site="plant-9"))
    finally:
        Variable.unset(NOTIFY_VARIABLE)
        server.shutdown()
    (payload,) = [json.loads(b) for b in _Hook.received]
    assert "ops-failing" in payload["subject"] and "Failed" in payload["subject"]
    assert "OSError: landing share unreachable" in payload["text"] and "plant-9" in payload["text"]
    assert TOKEN not in payload["text"]


def test_transient_errors_are_classified():
    from distributed.scheduler import KilledWorker

    assert is_transient(ConnectionError("reset")) and is_transient(TimeoutError())
    assert is_transient(ServiceUnavailable("mlflow restarting"))
    assert is_transient(KilledWorker("key", "worker", 3))
    assert not is_transient(ConfigError("bad landing"))
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(ValueError("bad value")) and not is_transient(None)
    with pytest.raises(ConfigError, match="no timeout"):
        stage_timeout("nightly")


def test_io_tasks_retry_transient_errors_only(prefect_api):
    attempts: list[str] = []

    @task(**{**IO_TASK_OPTIONS, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def read_share(kind: str) -> str:
        attempts.append(kind)
        if kind == "flaky" and attempts.count(kind) < 3:
            raise ConnectionError("share reset")
        if kind == "bad":
            raise ConfigError("landing path does not exist")
        return "ok"

    @flow(name="ops-io")
    def io(kind: str) -> str:
        return read_share(kind)

    assert io("flaky") == "ok" and attempts.count("flaky") == 3
    with pytest.raises(ConfigError):
        io("bad")
    assert attempts.count("bad") == 1


@flow(name="ops-heavy")
def heavy(tag: str, log: str) -> str:
    import time

    with open(log, "a") as fh:
        fh.write(f"start {tag}\n")
    time.sleep(1.0)
    with open(log, "a") as fh:
        fh.write(f"end {tag}\n")
    return tag


def test_exclusive_runs_hold_the_cluster_slot_one_at_a_time(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    limit = f"test-cluster-{os.urandom(3).hex()}"
    guarded = exclusive(heavy, name=limit)
    assert guarded.name == heavy.name and guarded.parameters == heavy.parameters
    log = tmp_path / "log.txt"
    results: list[str] = []
    # Each thread runs in a copy of this context, so it sees the test's Prefect API settings.
    threads = [threading.Thread(target=contextvars.copy_context().run,
                                args=(lambda t=t: results.append(guarded(t, str(log))),)) for t in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert sorted(results) == ["a", "b", "c"]
    lines = log.read_text().split()
    # Never two starts in a row: each run ended before the next began.
    events = lines[0::2]
    tags = lines[1::2]
    assert events == ["start", "end"] * 3
    assert tags[0::2] == tags[1::2]
    with get_client(sync_client=True) as client:
        gcl = client.read_global_concurrency_limit_by_name(limit)
    assert gcl.limit == 1 and gcl.active_slots == 0

    # The slot is released when the body raises.
    with pytest.raises(RuntimeError):
        with cluster_slot(limit):
            raise RuntimeError("stage failed")
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
