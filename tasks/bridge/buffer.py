"""The bridge's buffer: decoded messages waiting for the next micro-batch, bounded for back-pressure.

Sources :meth:`Buffer.put` from their own threads; when the buffer holds ``max_rows`` rows the call
blocks until the committer takes a batch, so a slow lake slows the sources (MQTT: the client stops
reading its socket and the broker, bounded by the receive maximum, stops sending) instead of growing
memory without bound.
"""

from __future__ import annotations

import threading
from collections import deque
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Buffer", "Message"]


@dataclass
class Message:
    """One received message: its decoded rows (or the reason it has none), raw bytes and ack."""

    source: str  # e.g. "mqtt://host:port/topic", "opc.tcp://host:port"
    raw: bytes
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    ack: Callable[[], None] | None = None
    received: float = field(default_factory=time.time)
    # Rows of the message that could not be used, as (raw row text, reason): quarantined on their own.
    row_errors: list[tuple[str, str]] = field(default_factory=list)
    # True when ``rows`` came from the bridge's :class:`~twinflow.tasks.bridge.decode.Decoder` (already
    # checked against the contract); rows built elsewhere are checked by the committer.
    checked: bool = False

    @property
    def size(self) -> int:
        return max(1, len(self.rows) + len(self.row_errors))


class Buffer:
    """A bounded, thread-safe FIFO of messages, counted in rows."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._items: deque[Message] = deque()
        self._rows = 0
        self._cond = threading.Condition()
        self.blocked_s = 0.0  # time sources spent waiting for room (back-pressure applied)
        self._closed = False

    def put(self, msg: Message) -> None:
        """Add a message, waiting while the buffer is full (returns at once after :meth:`close`)."""
        with self._cond:
            if self._rows + msg.size > self.max_rows and self._items and not self._closed:
                t0 = time.monotonic()
                while self._rows + msg.size > self.max_rows and self._items and not self._closed:
                    self._cond.wait(0.5)
                self.blocked_s += time.monotonic() - t0
            if self._closed:
                return
            self._items.append(msg)
            self._rows += msg.size
            self._cond.notify_all()

    def take(self, batch_rows: int, wait_s: float) -> list[Message]:
        """Up to ``batch_rows`` rows of messages, in arrival order: as soon as that many are buffered, or
        ``wait_s`` after the first one arrived (empty when nothing arrived and the wait ran out)."""
        deadline = None
        with self._cond:
            while True:
                if self._rows >= batch_rows or self._closed:
                    break
                now = time.monotonic()
                if self._items and deadline is None:
                    deadline = now + wait_s
                if deadline is None:
                    self._cond.wait(wait_s)
                    if not self._items:
                        return []
                    continue
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            out, n = [], 0
            while self._items and (n < batch_rows or not out):
                m = self._items.popleft()
                out.append(m)
                n += m.size
            self._rows -= n
            self._cond.notify_all()
            return out

    def __len__(self) -> int:
        with self._cond:
            return self._rows

    def close(self) -> None:
        """Wake everyone: blocked sources drop what they hold (unacked, so it is redelivered)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
