"""The process twinflow runs as its local Prefect server: ``prefect server start`` plus one ASGI wrapper.

Prefect's SQLite backend answers a write with 503 when the database is locked by one of the
server's own background services (the task-run recorder, the event persister), which happens
whenever a flow run starts right after another flow's task runs (PrefectHQ/prefect#18934; a
deferred transaction that read first cannot wait for the lock, it fails at once). The client then
backs off ``2 ** attempt`` seconds: measured here, every flow run that followed a flow of 20 task
runs waited ~2 s of a ~0.2 s start. Such a lock clears within milliseconds, so
:class:`RetryLockedWrites` re-runs a write that got a 503 inside the server after a short pause
(the failed attempt's transaction was rolled back, exactly as before the client's own retry), and
passes the 503 on only when the lock outlasts its ~5 s of retries (CI on 2 loaded cores saw one
outlast 1.5 s).

The server's API has no authentication, so :class:`LocalOnly` also refuses (403) any request whose
``Host`` header is not one of the server's own names and any request with an ``Origin`` other than the
server's own UI: a web page in a local browser can otherwise write to the API by DNS rebinding (its
requests carry ``Host: evil.example``) or by a cross-origin ``fetch``. Other names the server may be
reached by (a reverse proxy, a LAN name) are added with ``TWINFLOW_PREFECT_ALLOWED_HOSTS`` and
``TWINFLOW_PREFECT_ALLOWED_ORIGINS`` (comma-separated).

Run as ``python -m twinflow.prefect_server_main server start ...`` (the ``prefect`` CLI's arguments);
:func:`twinflow.prefect_server.acquire_server` does. Importing this module changes nothing.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Awaitable, Callable

__all__ = ["LocalOnly", "RetryLockedWrites", "RETRY_DELAYS_S", "main"]

#: Pauses before each server-side retry of a write answered 503 (about 5 s in all: still well under
#: the client's own back-off of 2, 4, 8 ... s, and long enough for a recorder batch on a loaded box).
RETRY_DELAYS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.2, 1.5)

_READS = {"GET", "HEAD", "OPTIONS"}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RetryLockedWrites:
    """ASGI wrapper: re-run a write request whose response is 503 (retryable), a few times, quickly.

    Reads and non-HTTP scopes (lifespan, websockets) pass straight through. A write's body is read
    once and replayed to each attempt; a 503 attempt's response is dropped, any other response (or
    the last attempt's 503) is sent as it comes.

    Args:
        app: The ASGI application (Prefect's API app).
        delays: Pauses before each retry.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], delays: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        self.app = app
        self.delays = delays
        self.retried = 0  # attempts re-run, for tests and curiosity

    def __getattr__(self, name: str) -> Any:  # FastAPI attributes (state, routes) for anything that asks
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method", "GET").upper() in _READS:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending its body
                # A fresh copy each time: routing rewrites the scope in place (a Mount strips "/api").
                await self.app(dict(scope), _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        for delay in (*self.delays, None):
            dropped = False

            async def send_or_drop(message: Message, last: bool = delay is None) -> None:
                nonlocal dropped
                if message["type"] == "http.response.start" and message["status"] == 503 and not last:
                    dropped = True
                if not dropped:
                    await send(message)

            try:
                # A fresh copy each time: routing rewrites the scope in place (a Mount strips "/api").
                await self.app(dict(scope), _replay([{"type": "http.request", "body": body, "more_body": False}]),
                               send_or_drop)
            except Exception:
                # Starlette re-raises the exception behind a 500/503 after sending it (for the server's
                # log); a dropped attempt's exception is the one being retried.
                if not dropped:
                    raise
            if not dropped:
                return
            self.retried += 1
            await asyncio.sleep(delay)


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The Host names of Prefect's own in-process clients (ASGI transport, never on a network): the server's
# trigger and action services create flow runs through them. A browser cannot send them for a page
# it loaded from elsewhere, so allowing them opens nothing to DNS rebinding.
_IN_PROCESS = ("prefect-in-memory", "ephemeral-prefect")


def _split_host(value: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) -> (lower-cased host, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    return host, int(port) if port.isdigit() else None


class LocalOnly:
    """ASGI wrapper: answer 403 to requests for a foreign ``Host`` or from a foreign ``Origin``.

    Args:
        app: The ASGI application.
        hosts: Host names (without port) the server answers to; loopback names always.
        origins: Allowed ``Origin`` values (``http://127.0.0.1:4200``): the server's own UI origins.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], hosts: set[str], origins: set[str]) -> None:
        self.app = app
        self.hosts = {h.lower().strip("[]") for h in hosts} | set(_LOOPBACK) | set(_IN_PROCESS)
        self.origins = {o.lower().rstrip("/") for o in origins}
        self.refused = 0

    @classmethod
    def from_env(cls, app: Callable[..., Awaitable[None]], host: str | None = None,
                 port: int | None = None) -> "LocalOnly":
        """The server's names from its bind address and port (and the ``TWINFLOW_PREFECT_ALLOWED_*`` lists)."""
        import os

        host = host or os.environ.get("PREFECT_SERVER_API_HOST") or "127.0.0.1"
        port = port or int(os.environ.get("PREFECT_SERVER_API_PORT") or 4200)
        hosts = set(_LOOPBACK)
        if host not in ("0.0.0.0", "::", ""):
            hosts.add(host.lower())
        hosts |= {h.strip().lower() for h in os.environ.get("TWINFLOW_PREFECT_ALLOWED_HOSTS", "").split(",") if h.strip()}
        origins = {f"{scheme}://{h if ':' not in h else f'[{h}]'}:{port}" for h in hosts for scheme in ("http", "https")}
        origins |= {o.strip() for o in os.environ.get("TWINFLOW_PREFECT_ALLOWED_ORIGINS", "").split(",") if o.strip()}
        return cls(app, hosts, origins)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    def _why(self, scope: Scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host")
        if host is not None and _split_host(host)[0] not in self.hosts:
            return f"host {host!r} is not this server's"
        origin = headers.get("origin")
        if origin is not None and origin.lower().rstrip("/") not in self.origins:
            return f"origin {origin!r} is not this server's UI"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        why = self._why(scope)
        if why is None:
            await self.app(scope, receive, send)
            return
        self.refused += 1
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
            return
        body = ('{"detail": "refused: ' + why.replace('"', "'") + '"}').encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message]) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        # After the body, an ASGI app that keeps listening only learns of a disconnect.
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}  # pragma: no cover - never reached

    return receive


def install() -> None:
    """Make Prefect's ``create_app`` return its app wrapped in :class:`LocalOnly` and :class:`RetryLockedWrites`."""
    import prefect.server.api.server as server

    if getattr(server.create_app, "_twinflow_wrapped", False):
        return
    original = server.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        return LocalOnly.from_env(RetryLockedWrites(original(*args, **kwargs)))

    create_app._twinflow_wrapped = True  # type: ignore[attr-defined]
    server.create_app = create_app


def main(argv: list[str] | None = None) -> None:
    """Run the ``prefect`` CLI (``server start ...``) with the wrapper installed."""
    install()
    from prefect.cli import app

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    app()  # reads sys.argv


if __name__ == "__main__":
    main()
