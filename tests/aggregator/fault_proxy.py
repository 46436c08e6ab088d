"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between devices and a real aggregator.

The network tests put it between sync's real :class:`~sottovoce.sync.transport.Uploader` and the
aggregator on uvicorn. It reads each request whole (``Content-Length`` framing, as httpx sends
bytes), then either forwards it on a fresh upstream connection and relays the answer, or meets
it with one :class:`Fault`. Faults are drawn from a seeded RNG keyed by the request's
``Idempotency-Key`` (else method, path and a hash of the body) and how many times that key was
seen, so the plan does not depend on the order in which concurrent devices arrive. ``counts``
says how often each fault fired.

Some faults lose the request (drop, reset, 5xx, truncated request); others lose only the answer
after the aggregator has acted on it (truncated response, a stall past the client's timeout), or
make it act twice (duplicate): the device must resend and still be counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit


class Fault(StrEnum):
    NONE = "none"
    DROP = "drop"  # read the request, close the connection without forwarding it
    DELAY = "delay"  # forward after a short delay (within the client's timeout)
    STALL = "stall"  # forward only after ``stall`` seconds: the client has given up by then
    RESET = "reset"  # read the request, then RST the connection (SO_LINGER 0)
    ERROR_5XX = "5xx"  # answer 500, 502 (an HTML page) or 503 without forwarding
    TRUNCATED_REQUEST = "truncated_request"  # forward half of the body, then close both sides
    TRUNCATED_RESPONSE = "truncated_response"  # forward; relay half of the answer's body, close
    DUPLICATE = "duplicate"  # forward the request twice at once; relay the second answer


FAULTS: tuple[Fault, ...] = tuple(f for f in Fault if f is not Fault.NONE)


@dataclass(frozen=True)
class _Request:
    head: bytes  # request line and headers, up to and including the blank line
    body: bytes
    key: str  # what the fault is drawn for


class FaultProxy:
    """Forwards to ``upstream`` (``http://127.0.0.1:PORT``), meeting a ``rate`` of requests
    with a fault from ``faults``; ``first_only`` limits faults to the first request of a key."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int,
        rate: float = 0.3,
        faults: Sequence[Fault] = FAULTS,
        first_only: bool = False,
        delay: float = 0.05,
        stall: float = 1.5,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"the upstream must be http://host:port, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self.seed, self.rate, self.faults = seed, rate, tuple(faults)
        self.first_only, self.delay, self.stall = first_only, delay, stall
        self._seen: Counter[str] = Counter()
        self._counts: Counter[Fault] = Counter()
        self._forwarded: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def counts(self) -> Counter[Fault]:
        """How many requests met each fault (``Fault.NONE``: passed through)."""
        with self._lock:
            return Counter(self._counts)

    def requests(self, key: str) -> int:
        """How many requests for ``key`` (an idempotency key, or method and path) arrived."""
        with self._lock:
            return self._seen[key]

    def forwarded(self, key: str) -> int:
        """How many of them the aggregator received whole (a duplicate counts twice)."""
        with self._lock:
            return self._forwarded[key]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, daemon=True, name="fault-proxy")
        self._thread.start()
        serving = asyncio.start_server(self._connection, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(serving, loop).result(timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return

        async def shutdown() -> None:
            server.close()
            # A stalled request still on its way to the aggregator is let through, not cut.
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=self.stall + 2)
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=self.stall + 5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=5)
        loop.close()
        self._loop = self._server = self._thread = None

    # -- the plan --------------------------------------------------------------------------------

    def _draw(self, key: str) -> tuple[Fault, random.Random]:
        with self._lock:
            nth = self._seen[key]
            self._seen[key] += 1
        rng = random.Random(f"{self.seed}/{key}/{nth}")
        fault = Fault.NONE
        if rng.random() < self.rate and not (self.first_only and nth > 0):
            fault = rng.choice(self.faults)
        with self._lock:
            self._counts[fault] += 1
        return fault, rng

    # -- serving ---------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            while (request := await _read_request(reader)) is not None:
                if not await self._handle(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away or sent what this proxy does not speak: close
        except asyncio.CancelledError:
            pass  # stopped: end quietly (the server's callback would report a cancelled task)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Meet one request with its fault; returns whether the connection stays open."""
        fault, rng = self._draw(request.key)
        if fault is Fault.DROP:
            return False
        if fault is Fault.RESET:
            _reset(writer)
            return False
        if fault is Fault.ERROR_5XX:
            writer.write(_server_error(rng.choice((500, 502, 503))))
            await writer.drain()
            return True
        if fault is Fault.TRUNCATED_REQUEST:
            await self._forward_half(request)
            return False
        if fault in (Fault.DELAY, Fault.STALL):
            await asyncio.sleep(self.delay if fault is Fault.DELAY else self.stall)
        if fault is Fault.DUPLICATE:
            answer = (await asyncio.gather(self._forward(request), self._forward(request)))[1]
        else:
            answer = await self._forward(request)
        if not answer:  # the aggregator closed without answering: so does the proxy
            return False
        if fault is Fault.TRUNCATED_RESPONSE:
            head, _, body = answer.partition(b"\r\n\r\n")
            writer.write(head + b"\r\n\r\n" + body[: len(body) // 2])
            await writer.drain()
            return False
        writer.write(answer)
        await writer.drain()
        return True

    async def _forward(self, request: _Request) -> bytes:
        """One exchange with the aggregator on its own connection; the answer as relayed."""
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            writer.write(_with_connection(request.head, b"close") + request.body)
            await writer.drain()
            answer = await reader.read()  # to EOF: the aggregator closes after one answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        with self._lock:
            self._forwarded[request.key] += 1
        if not answer:
            return b""
        # The device's connection to the proxy stays usable for its next request.
        return _with_connection(answer, b"keep-alive")

    async def _forward_half(self, request: _Request) -> None:
        _, writer = await asyncio.open_connection(*self._upstream)
        try:
            writer.write(request.head + request.body[: len(request.body) // 2])
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextmanager
def running(proxy: FaultProxy) -> Iterator[FaultProxy]:
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on the connection, or ``None`` when the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None
    request_line, *lines = head[:-4].split(b"\r\n")
    method, target, _ = request_line.split(b" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        raise ValueError("chunked request bodies are not supported by this proxy")
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    key = headers.get(b"idempotency-key", b"").decode("latin-1")
    if not key:
        key = f"{method.decode()} {target.decode()} {hashlib.sha256(body).hexdigest()[:16]}"
    return _Request(head, body, key)


def _with_connection(message: bytes, value: bytes) -> bytes:
    """``message`` (request or answer) with its ``Connection`` header set to ``value``."""
    head, _, body = message.partition(b"\r\n\r\n")
    first, *lines = head.split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([first, *kept, b"Connection: " + value]) + b"\r\n\r\n" + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN: linger on, timeout zero."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _server_error(status: int) -> bytes:
    if status == 502:  # what a load balancer says: not JSON, so no answer of the aggregator's
        body, kind = b"<html><body>502 Bad Gateway</body></html>", b"text/html"
    else:
        body = json.dumps({"code": "unavailable", "message": "Try again."}).encode()
        kind = b"application/json"
    reason = {500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable"}
    head = [
        b"HTTP/1.1 %d %s" % (status, reason[status]),
        b"Content-Type: " + kind,
        b"Content-Length: %d" % len(body),
    ]
    if status == 503:
        head.append(b"Retry-After: 0")
    return b"\r\n".join(head) + b"\r\n\r\n" + body
