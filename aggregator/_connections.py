"""The service's connections: read deadlines and a cap, on uvicorn's h11 protocol.

uvicorn closes a connection that stays idle after an answer (``timeout_keep_alive``) but has no
deadline for reading a request: a client that opens a connection and sends its headers, or its
body, one byte at a time ("slowloris") holds a socket, a file descriptor and a parser for as
long as it likes, and enough of them exhaust the process. :func:`guarded_protocol` makes the
HTTP protocol the service runs (uvicorn's h11 one) with three bounds of
:class:`ConnectionLimits`:

- ``header_seconds``: a request's headers must be in within this long of the connection
  opening, or of the request's first byte on a kept-alive connection;
- ``body_seconds``: its body within this long of its headers (this also bounds how long the
  rest of a body is drained after an early answer, such as a 401 or 413);
- ``max_connections``: open connections beyond this are answered 503 and closed at once, so
  descriptors stay bounded whatever the clients do.

A request past its deadline gets ``408`` with the service's ``{"code": "too_slow", ...}`` body
and the connection is closed (an answer already under way is left to finish). Each cut is one
JSON log line (``connection_cut``). :func:`uvicorn_config` is how ``sottovoce aggregator
serve`` (and the tests and benchmarks) run an app with these bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from sottovoce.aggregator._edge import MESSAGES

__all__ = ["ConnectionLimits", "guarded_protocol", "uvicorn_config"]

log = logging.getLogger("sottovoce.aggregator")

_REASONS: Final = {408: "Request Timeout", 503: "Service Unavailable"}
_CODES: Final = {408: "too_slow", 503: "busy"}


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a request may take to arrive, and how many connections may be open."""

    header_seconds: float = 10.0
    body_seconds: float = 30.0
    keep_alive_seconds: int = 5
    max_connections: int = 1000

    def __post_init__(self) -> None:
        if not (self.header_seconds > 0 and self.body_seconds > 0):
            raise ValueError("the header and body timeouts must be positive")
        if not (self.keep_alive_seconds >= 1 and self.max_connections >= 1):
            raise ValueError("keep-alive and the connection cap must be at least 1")


def _answer(status: int) -> bytes:
    """A complete response that closes the connection, in the service's problem shape."""
    code = _CODES[status]
    body = json.dumps({"code": code, "message": MESSAGES[code]}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a connection cap (``limits``)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers" or "body" while a deadline runs

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._cut(503, "connections")
            return
        self._arm("headers", self.limits.header_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Arm, move or clear the deadline for where the request being read now stands."""
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.limits.body_seconds)
        elif state is h11.IDLE:
            # Bytes of a next request's headers wait in the parser: they have a deadline.
            # Nothing pending: the connection is idle, which keep-alive bounds.
            if self.conn.trailing_data[0]:
                if self._phase != "headers":
                    self._arm("headers", self.limits.header_seconds)
            elif self.cycle is not None:  # before the first request, the deadline stands
                self._disarm()
        else:
            self._disarm()  # the request is in (or the connection is ending)

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, ""

    def _expired(self) -> None:
        phase = self._phase
        self._deadline, self._phase = None, ""
        if self.transport.is_closing():
            return
        if phase == "body" and self.cycle.response_started:
            # An answer is being written (e.g. a 401 while the body still trickles in):
            # let it finish, and close the connection after it instead of draining more.
            self.cycle.keep_alive = False
            if self.cycle.response_complete:
                self.transport.close()
            return
        self._cut(408, phase)

    def _cut(self, status: int, why: str) -> None:
        self._disarm()
        log.info("connection_cut", extra={"fields": {"status": status, "waiting_for": why}})
        self.transport.write(_answer(status))
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """The HTTP protocol class for uvicorn, with these ``limits``."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"limits": limits})


def uvicorn_config(
    app: Any,
    *,
    host: str,
    port: int,
    limits: ConnectionLimits,
    log_config: dict[str, Any] | None = None,
    log_level: str | None = None,
) -> uvicorn.Config:
    """uvicorn's config for serving ``app`` with ``limits`` (no access log: the service logs
    each request itself, without raw paths)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_seconds,
        log_config=log_config,
        log_level=log_level,
        access_log=False,
    )
