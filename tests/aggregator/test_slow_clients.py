"""Slow clients and too many connections, against the service as ``serve`` runs it: the app of
``build_app`` on a real uvicorn on 127.0.0.1 with the service's HTTP protocol
(``server_config``: uvicorn's h11 protocol with read deadlines and a connection cap).

Each client here is a raw socket. A slowloris client sends its headers, or its body, one byte
at a time; the service answers ``408 too_slow`` at the deadline and closes the connection, and
the process's open file descriptors come back to where they were before the attack (the
server runs in this process, so its sockets are this process's descriptors). Connections
beyond the cap are answered ``503 busy`` and closed at once. The deadlines are short here
(fractions of a second) so the tests are quick; deployments use seconds (``--header-timeout``,
``--body-timeout``, ``--max-connections``).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from service_helpers import TOKEN, Region

from sottovoce.aggregator._connections import ConnectionLimits
from sottovoce.aggregator._service import server_config

pytest.importorskip("opacus")

LIMITS = ConnectionLimits(header_seconds=0.6, body_seconds=1.2, keep_alive_seconds=1,
                          max_connections=20)  # fmt: skip
SLACK = 1.5  # seconds a busy shared machine may add to a deadline


@dataclass(frozen=True)
class Served:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=10)


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


@contextmanager
def _running(config: uvicorn.Config) -> Iterator[Served]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served("127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    region = Region(tmp_path_factory.mktemp("slow") / "aggregator.db")
    config = region.service_config(connections=LIMITS)
    with _running(server_config(config, host="127.0.0.1", port=0, log_level="warning")) as s:
        _settle(s)
        yield s


def _settle(served: Served) -> int:
    """One finished request (so lazily opened resources are open), then the idle fd count."""
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{served.url}/v1/health").status_code == 200
    return _idle_fds()


def _idle_fds(timeout: float = 5.0) -> int:
    """The fd count once it stops changing (closed sockets take a moment to go)."""
    last, deadline = _open_fds(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _open_fds()
        if now == last:
            return now
        last = now
    return last


def _back_to(baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while _open_fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return _open_fds()


@dataclass
class Cut:
    """How a slow client's connection ended: after ``seconds``, with ``status`` (or None)."""

    seconds: float
    status: int | None
    code: str | None


def _ending(sock: socket.socket, started: float) -> Cut:
    """Read what the server sends until it closes the connection."""
    sock.settimeout(5)
    data = b""
    try:
        while more := sock.recv(65536):
            data += more
    except (ConnectionResetError, TimeoutError):
        pass
    seconds = time.monotonic() - started
    if not data.startswith(b"HTTP/1.1 "):
        return Cut(seconds, None, None)
    _, _, body = data.partition(b"\r\n\r\n")
    return Cut(seconds, int(data.split(b" ", 2)[1]), json.loads(body)["code"])


def _answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer with a Content-Length (its head and body)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return data


def _trickle(socks: list[socket.socket], data: bytes, *, step: float = 0.1,
             most: float = 10.0, started: float | None = None) -> list[Cut]:  # fmt: skip
    """Send ``data`` on every socket one byte per ``step`` until the server ends each one;
    times are from ``started`` (default: now)."""
    started = time.monotonic() if started is None else started
    sent = dict.fromkeys(socks, 0)
    cuts: dict[socket.socket, Cut] = {}
    while len(cuts) < len(socks) and time.monotonic() - started < most:
        for sock in socks:
            if sock in cuts or sent[sock] >= len(data):
                continue
            try:
                sock.send(data[sent[sock] : sent[sock] + 1])
                sent[sock] += 1
            except OSError:  # closed by the server: read its answer below
                cuts[sock] = _ending(sock, started)
        waiting = [s for s in socks if s not in cuts]
        readable, _, _ = select.select(waiting, [], [], step) if waiting else ([], [], [])
        for sock in readable:
            cuts[sock] = _ending(sock, started)
    assert len(cuts) == len(socks), f"{len(socks) - len(cuts)} slow clients were never cut off"
    return [cuts[sock] for sock in socks]


SLOW_HEADERS = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 10_000


def test_slowloris_headers_are_cut_off_at_the_deadline_and_their_fds_released(
    served: Served,
) -> None:
    baseline = _idle_fds()
    opened = time.monotonic()  # the headers' deadline runs from the connection's opening
    socks = [served.connect() for _ in range(12)]
    try:
        # Meanwhile the service answers others (12 slow connections are below the cap).
        with httpx.Client(timeout=5) as client:
            assert client.get(f"{served.url}/v1/health").status_code == 200
        cuts = _trickle(socks, SLOW_HEADERS, started=opened)
    finally:
        for sock in socks:
            sock.close()
    assert {(cut.status, cut.code) for cut in cuts} == {(408, "too_slow")}
    for cut in cuts:
        assert LIMITS.header_seconds * 0.9 <= cut.seconds <= LIMITS.header_seconds + SLACK, cut
    assert _back_to(baseline) <= baseline  # none held (other tests may close their own meanwhile)


def test_a_slow_body_is_cut_off_at_the_body_deadline(served: Served) -> None:
    baseline = _idle_fds()
    head = b"\r\n".join([
        b"POST /v1/rounds/r/deltas HTTP/1.1", b"Host: 127.0.0.1", b"Content-Length: 4096",
        b"Content-Type: application/json", b"Idempotency-Key: " + b"k" * 20, b"", b"",
    ])  # fmt: skip
    socks = [served.connect() for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(head)  # the headers at once: the body deadline runs from here
        cuts = _trickle(socks, b"{" * 4096)
    finally:
        for sock in socks:
            sock.close()
    assert {(cut.status, cut.code) for cut in cuts} == {(408, "too_slow")}
    for cut in cuts:  # the body's deadline, not the headers'
        assert LIMITS.body_seconds * 0.9 <= cut.seconds <= LIMITS.body_seconds + SLACK, cut
    assert _back_to(baseline) <= baseline  # none held (other tests may close their own meanwhile)


def test_an_early_answer_does_not_keep_draining_a_trickling_body(served: Served) -> None:
    baseline = _idle_fds()
    with closing(served.connect()) as sock:
        sock.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n"
                     b"Content-Type: application/json\r\n\r\n{")  # fmt: skip
        started = time.monotonic()
        first = _answer(sock)
        assert first.startswith(b"HTTP/1.1 401 "), first  # at once: no token, nothing read
        assert time.monotonic() - started < LIMITS.body_seconds
        cut = _trickle([sock], b"x" * 1000)[0]
    assert cut.status is None  # the answer was given; then the connection is simply closed
    assert cut.seconds <= LIMITS.body_seconds + SLACK
    assert _back_to(baseline) <= baseline  # none held (other tests may close their own meanwhile)


def test_an_idle_connection_and_a_half_sent_next_request_are_closed(served: Served) -> None:
    baseline = _idle_fds()
    with closing(served.connect()) as idle:
        started = time.monotonic()
        cut = _ending(idle, started)  # nothing sent at all
    assert (cut.status, cut.code) == (408, "too_slow")
    assert cut.seconds <= LIMITS.header_seconds + SLACK
    with closing(served.connect()) as kept:
        kept.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = _answer(kept)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        cut = _trickle([kept], SLOW_HEADERS)[0]  # then a second request, one byte at a time
    assert (cut.status, cut.code) == (408, "too_slow")
    assert _back_to(baseline) <= baseline  # none held (other tests may close their own meanwhile)


def test_connections_beyond_the_cap_are_refused_and_descriptors_come_back(served: Served) -> None:
    baseline = _idle_fds()
    socks = [served.connect() for _ in range(LIMITS.max_connections)]
    extra = [served.connect() for _ in range(5)]
    try:
        started = time.monotonic()
        refused = [_ending(sock, started) for sock in extra]
        assert {(cut.status, cut.code) for cut in refused} == {(503, "busy")}
        assert max(cut.seconds for cut in refused) < LIMITS.header_seconds  # at once
        held = _trickle(socks, SLOW_HEADERS)
        assert {(cut.status, cut.code) for cut in held} == {(408, "too_slow")}
    finally:
        for sock in socks + extra:
            sock.close()
    assert _back_to(baseline) <= baseline  # none held (other tests may close their own meanwhile)
    with httpx.Client(timeout=5) as client:  # and the service answers again
        assert client.get(f"{served.url}/v1/health").status_code == 200


def test_serve_takes_the_connection_limits_and_refuses_bad_ones(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "sottovoce", "aggregator", "serve", "--help"]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True,
                           env=os.environ | {"COLUMNS": "200"})  # fmt: skip
    text = re.sub(r"\s+", " ", shown.stdout)
    for option in ("--header-timeout", "--body-timeout", "--max-connections", "--docs"):
        assert option in text, option
    bad = subprocess.run(
        [*command[:-1], "-r", "eu", "-p", str(tmp_path / "p.json"), "--keys", str(tmp_path),
         "--header-timeout", "0"],
        capture_output=True, text=True, timeout=60, check=False,
        env=os.environ | {"SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN},
    )  # fmt: skip
    assert bad.returncode == 2 and "timeouts must be positive" in bad.stderr
