"""The local Prefect server's retry of SQLite-locked writes (``twinflow/prefect_server_main.py``)."""

from __future__ import annotations

import asyncio
import logging

from twinflow.prefect_server_main import RetryLockedWrites


class _Flaky:
    """An ASGI app answering 503 ``fails`` times (re-raising like Starlette's error middleware), then 201."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.calls: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.calls.append((scope["path"], body))
        scope["path"] = scope["path"].removeprefix("/api")  # routing rewrites the scope in place
        if len(self.calls) <= self.fails:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"locked"})
            raise RuntimeError("database is locked")
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})


def _call(app, method: str, chunks: list[bytes]):
    sent = []
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return pending.pop(0)

    async def send(msg):
        sent.append(msg)

    async def run():
        await app({"type": "http", "method": method, "path": "/api/flow_runs/"}, receive, send)

    try:
        asyncio.run(run())
        error = None
    except RuntimeError as exc:
        error = exc
    return sent, error


def test_a_locked_write_is_retried_with_the_same_body_and_path():
    inner = _Flaky(fails=2)
    app = RetryLockedWrites(inner, delays=(0.0, 0.0, 0.0))
    sent, error = _call(app, "POST", [b'{"name":', b' "x"}'])
    assert error is None
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [201]
    assert inner.calls == [("/api/flow_runs/", b'{"name": "x"}')] * 3
    assert app.retried == 2


def test_a_lock_that_outlasts_the_retries_reaches_the_client_as_503():
    inner = _Flaky(fails=10)
    app = RetryLockedWrites(inner, delays=(0.0, 0.0))
    sent, error = _call(app, "POST", [b"{}"])
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [503]
    assert isinstance(error, RuntimeError)  # still raised for the server's log
    assert len(inner.calls) == 3


def test_reads_are_not_retried_by_the_server():
    inner = _Flaky(fails=1)
    sent, _ = _call(RetryLockedWrites(inner, delays=(0.0,)), "GET", [b""])
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [503]
    assert len(inner.calls) == 1


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_flow_run_right_after_a_flow_of_task_runs_starts_without_client_back_off(tmp_path, monkeypatch):
    """Before the wrapper, Prefect's SQLite server answered this create_flow_run with 503 (locked by the
    task-run recorder) and the client slept ~2 s before retrying."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from twinflow import runtime as rt_mod
    from twinflow.settings import get_settings

    @task
    def noop(i: int) -> int:
        return i

    @flow(name="noops", task_runner=ThreadPoolTaskRunner())
    def noops(n: int) -> int:
        return sum(noop.submit(i).result() for i in range(n))

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    client_log = logging.getLogger("prefect.client")  # Prefect's loggers do not propagate to caplog
    collect, level = _Collect(), client_log.level
    client_log.addHandler(collect)
    client_log.setLevel(logging.DEBUG)
    try:
        with rt_mod.start(get_settings(home=tmp_path / "home"), cluster=False, mlflow=False):
            for _ in range(3):
                assert noops(20) == 190
                assert noops(0) == 0
    finally:
        client_log.removeHandler(collect)
        client_log.setLevel(level)
    assert [m for m in collect.messages if "retryable status code" in m] == []


def _request(app, method: str, headers: dict[str, str], scope_type: str = "http"):
    from twinflow.prefect_server_main import LocalOnly  # noqa: F401 - imported for the reader

    sent = []
    pending = [{"type": "http.request", "body": b"{}", "more_body": False}] if scope_type == "http" else \
        [{"type": "websocket.connect"}]

    async def receive():
        return pending.pop(0)

    async def send(msg):
        sent.append(msg)

    scope = {"type": scope_type, "method": method, "path": "/api/flows/",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    return sent


def _local_only(**env):
    from twinflow.prefect_server_main import LocalOnly

    inner = _Flaky(fails=0)
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return LocalOnly.from_env(inner, host="127.0.0.1", port=4321), inner
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _status(sent):
    return [m.get("status") for m in sent if m["type"] == "http.response.start"]


def test_foreign_host_or_origin_is_refused_before_the_api_sees_it():
    """DNS rebinding / cross-origin writes from a web page in a local browser (issue 25)."""
    app, inner = _local_only()
    assert _status(_request(app, "POST", {"host": "evil.example", "origin": "http://evil.example"})) == [403]
    assert _status(_request(app, "POST", {"host": "127.0.0.1:4321", "origin": "http://evil.example"})) == [403]
    assert _status(_request(app, "POST", {"host": "evil.example:4321"})) == [403]
    # another local web app (other port) is another origin
    assert _status(_request(app, "POST", {"host": "127.0.0.1:4321", "origin": "http://localhost:3000"})) == [403]
    assert inner.calls == [] and app.refused == 4
    ws = _request(app, "GET", {"host": "evil.example"}, scope_type="websocket")
    assert ws[0]["type"] == "websocket.close" and ws[0]["code"] == 1008


def test_the_servers_own_names_and_ui_origin_pass():
    app, inner = _local_only()
    for headers in ({"host": "127.0.0.1:4321"}, {"host": "localhost:4321", "origin": "http://localhost:4321"},
                    {"host": "[::1]:4321", "origin": "http://127.0.0.1:4321"}, {}):
        assert _status(_request(app, "POST", headers)) == [201], headers
    assert len(inner.calls) == 4


def test_prefects_own_in_process_clients_pass():
    """The server's trigger/action services call the API in-process under these Host names: refusing
    them stopped every automation from creating its flow run."""
    app, inner = _local_only()
    for host in ("prefect-in-memory", "ephemeral-prefect"):
        assert _status(_request(app, "POST", {"host": host})) == [201], host
    assert len(inner.calls) == 2


def test_extra_names_are_configurable():
    app, _ = _local_only(TWINFLOW_PREFECT_ALLOWED_HOSTS="prefect.lan",
                         TWINFLOW_PREFECT_ALLOWED_ORIGINS="https://ops.example")
    assert _status(_request(app, "POST", {"host": "prefect.lan:4321", "origin": "https://ops.example"})) == [201]
    assert _status(_request(app, "POST", {"host": "prefect.lan", "origin": "http://prefect.lan:4321"})) == [201]
    assert _status(_request(app, "POST", {"host": "other.lan"})) == [403]


def test_the_local_server_refuses_a_foreign_host_and_origin_write(prefect_api):
    """On the real server (issue 25: a POST with Host/Origin evil.example got 201)."""
    import httpx

    body = {"name": "dns-rebinding-probe"}
    evil = httpx.post(f"{prefect_api}/flows/", json=body,
                      headers={"Host": "evil.example", "Origin": "http://evil.example"}, timeout=30)
    assert evil.status_code == 403 and "not this server's" in evil.text
    cross = httpx.post(f"{prefect_api}/flows/", json=body, headers={"Origin": "http://evil.example"}, timeout=30)
    assert cross.status_code == 403
    own = httpx.post(f"{prefect_api}/flows/", json=body, timeout=30)
    assert own.status_code in (200, 201), own.text
