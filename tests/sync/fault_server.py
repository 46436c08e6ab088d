"""A stand-in for a region's aggregator on a real HTTP server on 127.0.0.1, with injected faults.

It speaks the HTTP endpoints of docs/protocol.md ("HTTP") just enough for the transport tests:
it stores deltas by idempotency key (a replay with the same body gets the first answer, another
body with the same key is refused as ``malformed``), serves one signed release with an ETag, and
enrolls device keys for a token. Each request takes the next :class:`Fault` of ``plan`` (none
when the plan is empty); faults that "process" change the server's state before the response
is lost, as when an aggregator crashes or a network drops the answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sottovoce.sync import SealedDelta, SyncError


class Fault(Enum):
    NONE = "none"
    DROP = "drop"  # close the connection without processing or answering
    DELAY = "delay"  # answer (and process) only after the client has timed out
    ERROR_500 = "500"
    UNAVAILABLE_503 = "503"  # with a short Retry-After
    RATE_LIMITED = "429"  # with a short Retry-After
    RATE_LIMITED_LONG = "429-long"  # with a Retry-After too long to wait in a run
    TRUNCATED = "truncated"  # process, then send less body than Content-Length and close
    LOST_RESPONSE = "lost"  # process, then close without answering (the client resends)
    GARBAGE = "garbage"  # process, then answer 200 with a body that is not JSON


TRANSIENT = [f for f in Fault if f not in (Fault.NONE, Fault.RATE_LIMITED_LONG)]
SHORT_RETRY_AFTER = 1
LONG_RETRY_AFTER = 120


def random_plan(seed: int, length: int) -> list[Fault]:
    """A seeded plan: about half the requests meet a fault, long Retry-After now and then."""
    rng = random.Random(seed)
    plan = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.5:
            plan.append(Fault.NONE)
        elif roll < 0.55:
            plan.append(Fault.RATE_LIMITED_LONG)
        else:
            plan.append(rng.choice(TRANSIENT))
    return plan


class FaultServer:
    """The aggregator stand-in; ``start``/``stop`` keep its state (for offline tests)."""

    def __init__(
        self,
        *,
        release: bytes | None = None,
        tokens: Iterable[str] = (),
        closed_rounds: Iterable[str] = (),
        plan: Iterable[Fault] = (),
        delay: float = 0.5,
    ) -> None:
        self.release = release
        self.tokens = set(tokens)
        self.closed_rounds = set(closed_rounds)
        self.plan: deque[Fault] = deque(plan)
        self.delay = delay
        self.answers: dict[str, tuple[bytes, int, dict[str, Any]]] = {}  # key -> body, answer
        self.aggregated: Counter[str] = Counter()  # key -> times added to the round's sum
        self.enrolled: dict[str, str] = {}  # device key -> period
        self.requests: Counter[str] = Counter()  # path -> requests received
        self.lock = threading.Lock()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultServer:
        handler = type("Handler", (_Handler,), {"aggregator": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        serve = self._server.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def next_fault(self) -> Fault:
        with self.lock:
            return self.plan.popleft() if self.plan else Fault.NONE

    def accept_delta(self, round_id: str, key: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The aggregator's answer to an upload; a key's first answer is its answer for good."""
        with self.lock:
            if key in self.answers:
                first_body, status, answer = self.answers[key]
                if first_body == body:
                    return status, answer
                return 409, {"code": "malformed"}
            if round_id in self.closed_rounds:
                return 410, {"code": "round_closed"}
            try:
                delta = SealedDelta.from_wire(body)
            except SyncError as error:
                return 400, {"code": error.code}
            if delta.idempotency_key != key or delta.round_id != round_id:
                return 400, {"code": "malformed"}
            self.aggregated[key] += 1
            self.answers[key] = (body, 200, {"status": "accepted"})
            return 200, {"status": "accepted"}

    def enroll(self, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
        token = authorization.removeprefix("Bearer ")
        if not authorization.startswith("Bearer ") or token not in self.tokens:
            return 401, {"code": "not_enrolled"}
        try:
            data = json.loads(body)
            self.enrolled[data["device_key"]] = data["period"]
        except (ValueError, KeyError, TypeError):
            return 400, {"code": "malformed"}
        return 200, {"status": "enrolled"}


@contextmanager
def running(server: FaultServer) -> Iterator[FaultServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


_DELTAS = re.compile(r"^/v1/rounds/([^/]+)/deltas$")


class _Handler(BaseHTTPRequestHandler):
    aggregator: FaultServer  # set on the subclass made by FaultServer.start

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        agg = self.aggregator
        with agg.lock:
            agg.requests[self.path] += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        fault = agg.next_fault()
        if fault is Fault.DROP:
            self.close_connection = True
            return
        if fault in (Fault.ERROR_500, Fault.UNAVAILABLE_503, Fault.RATE_LIMITED,
                     Fault.RATE_LIMITED_LONG):  # fmt: skip
            status = {Fault.ERROR_500: 500, Fault.UNAVAILABLE_503: 503}.get(fault, 429)
            wait = LONG_RETRY_AFTER if fault is Fault.RATE_LIMITED_LONG else SHORT_RETRY_AFTER
            headers = {} if status == 500 else {"Retry-After": str(wait)}
            self._answer(status, {"code": "unavailable"}, headers)
            return
        if fault is Fault.DELAY:
            time.sleep(agg.delay)
        status, answer, headers = self._process(body)
        if fault is Fault.LOST_RESPONSE:
            self.close_connection = True
        elif fault is Fault.TRUNCATED:
            raw = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw) + 10))
            self.end_headers()
            self.wfile.write(raw[: len(raw) // 2])
            self.close_connection = True
        elif fault is Fault.GARBAGE:
            self._answer(status, None, headers, raw=b"<html>accepted</html>")
        else:
            self._answer(status, answer, headers)

    def _process(self, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        agg = self.aggregator
        if self.command == "POST" and (match := _DELTAS.match(self.path)):
            key = self.headers.get("Idempotency-Key", "")
            return (*agg.accept_delta(match.group(1), key, body), {})
        if self.command == "POST" and self.path == "/v1/enroll":
            return (*agg.enroll(self.headers.get("Authorization", ""), body), {})
        if self.command == "GET" and self.path == "/v1/model/release" and agg.release:
            etag = '"' + hashlib.sha256(agg.release).hexdigest()[:32] + '"'
            if self.headers.get("If-None-Match") == etag:
                return 304, {}, {"ETag": etag}
            return 200, json.loads(agg.release), {"ETag": etag}
        return 404, {"code": "not_found"}, {}

    def _answer(
        self,
        status: int,
        answer: dict[str, Any] | None,
        headers: dict[str, str],
        *,
        raw: bytes | None = None,
    ) -> None:
        payload = b"" if status == 304 else raw or json.dumps(answer).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status != 304:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the client gave up before the answer: expected
            super().handle()
