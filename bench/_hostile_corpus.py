"""The hostile corpus of ``bench/hostile.py``: raw-socket clients (slow, oversized, endless)
and the fixed list of hostile requests, built around one honest device's accepted upload.

``bench/hostile.py``'s docstring lists what each kind of request is; here is how each is made.
A request is a function that sends it and returns the status of the answer (``None``: none).
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sottovoce.device import Ranker
from sottovoce.policy import Policy
from sottovoce.sync import SealedDelta, SignedRoundSpec, period_label, seal_delta, verify_round_spec
from sottovoce.sync._wire import b64decode, b64encode

REGION = "eu"
TOKEN = "bench-enrollment-token"
MIB = 1 << 20
JSON_TYPE = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"} | JSON_TYPE

# -- raw HTTP ------------------------------------------------------------------------------


def _status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data.split(b" ", 2)[1])


def _read_answer(sock: socket.socket, timeout: float = 30) -> int | None:
    """The status of the answer on ``sock`` (``None`` if it closed without one)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except OSError:
        pass
    return _status(data)


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def declared_too_large(port: int, path: str, headers: dict[str, str]) -> int | None:
    with closing(socket.create_connection(("127.0.0.1", port), timeout=30)) as sock:
        sock.sendall(_head("POST", path, headers | {"Content-Length": str(64 * MIB)}))
        with suppress(OSError):
            sock.sendall(b"{" * 65536)
        return _read_answer(sock)


def streamed_forever(port: int, path: str, headers: dict[str, str]) -> int | None:
    """A chunked body that does not end (up to 64 MiB) until the service answers."""
    with closing(socket.create_connection(("127.0.0.1", port), timeout=30)) as sock:
        sock.sendall(_head("POST", path, headers | {"Transfer-Encoding": "chunked"}))
        chunk = b"%x\r\n%s\r\n" % (65536, b"{" * 65536)
        for _ in range(64 * MIB // 65536):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except OSError:
                break
        return _read_answer(sock)


@dataclass
class SlowClients:
    """Slow connections held open on a thread of their own until the server cuts them."""

    port: int
    headers: int
    bodies: int
    idle: int
    check_at: float  # seconds after the start: the server's fds are counted then
    count_fds: Callable[[], int]
    step: float = 0.5
    statuses: list[int | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    fds_at_check: int | None = None

    def run(self, give_up: float) -> None:
        started = time.monotonic()
        slow_head = b"GET /v1/round HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100_000
        body_head = _head("POST", "/v1/enroll", AUTH | {"Content-Length": "100000"})
        plan = ([slow_head] * self.headers + [body_head + b"{" * 100_000] * self.bodies
                + [b""] * self.idle)  # fmt: skip
        socks = [socket.create_connection(("127.0.0.1", self.port), timeout=30) for _ in plan]
        sent = [len(body_head) if data.startswith(body_head) else 0 for data in plan]
        for sock, data, n in zip(socks, plan, sent, strict=True):
            if n:
                sock.sendall(data[:n])  # complete headers at once, then the body slowly
        open_ = set(range(len(socks)))
        while (open_ or self.fds_at_check is None) and time.monotonic() - started < give_up:
            if self.fds_at_check is None and time.monotonic() - started >= self.check_at:
                self.fds_at_check = self.count_fds()  # every slow client still held, or not
            for i in list(open_):
                if sent[i] < len(plan[i]):
                    try:
                        socks[i].send(plan[i][sent[i] : sent[i] + 1])
                        sent[i] += 1
                    except OSError:
                        self._ended(socks[i], started, open_, i)
            waiting = [socks[i] for i in open_]
            readable, _, _ = select.select(waiting, [], [], self.step) if waiting else ([], [], [])
            if not waiting:
                time.sleep(self.step)
            for sock in readable:
                self._ended(sock, started, open_, socks.index(sock))
        never = len(open_)  # never cut: counted as no answer
        self.statuses += [None] * never
        self.seconds += [time.monotonic() - started] * never
        for sock in socks:
            sock.close()

    def _ended(self, sock: socket.socket, started: float, open_: set[int], i: int) -> None:
        open_.discard(i)
        self.statuses.append(_read_answer(sock, timeout=5))
        self.seconds.append(time.monotonic() - started)


# -- the corpus ------------------------------------------------------------------------------

SMALL_ORDER = [
    "00" * 32, "01" + "00" * 31, "ec" + "ff" * 30 + "7f", "00" * 31 + "80",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "ed" + "ff" * 30 + "7f", "ee" + "ff" * 30 + "7f", "01" + "00" * 30 + "80",
    "02" + "00" * 31,  # y = 2: no x satisfies the curve equation
]  # fmt: skip


def bad_keys() -> list[str]:
    keys = [base64.b64encode(bytes.fromhex(raw)).decode() for raw in SMALL_ORDER]
    honest = b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    keys.append(honest[:-2] + alphabet[alphabet.index(honest[-2]) | 1] + "=")  # 2nd spelling
    keys += [b64encode(bytes(n)) for n in (16, 31, 33, 64)] + ["!!!!", "A" * 64]
    return keys


def bad_periods(policy: Policy, current: str) -> list[str]:
    """Periods the policy does not open for enrollment now (``current`` is the round's)."""
    length = policy.region(REGION).privacy.period
    now = datetime.fromisoformat(current if "T" in current else current + "T00:00:00+00:00")
    starts = [now + k * length for k in (-10, 2, 7)]
    spelled = [t.date().isoformat() if t.hour == 0 else f"{t:%Y-%m-%dT%H:%M:%SZ}" for t in starts]
    not_a_start = (now + length / 3).date().isoformat()
    return ["x", "9999-12-31", "", "2026-13-45", current + "\x00", not_a_start, *spelled,
            "9" * 1000, current + "9" * (MIB - 1000)]  # fmt: skip


MALFORMED = [
    b'{"protocol": 1, "region": "eu", ', b"[1, 2, 3]", b"null", b'"text"', b"{}",
    b'{"protocol": "1"}', b'{"protocol": 1e999}', b"[" * 50_000 + b"]" * 50_000,
    b'{"protocol": 1, "region": "eu", "ciphertext": "%%%"}', b"\xff\xfe\x00garbage",
    json.dumps({f"field_{i}": i for i in range(5000)}).encode(),
    json.dumps({"protocol": 1, "region": "eu", "round_id": "x" * 100_000}).encode(),
]  # fmt: skip
WRONG_TYPES = [None, "text/plain", "application/x-www-form-urlencoded",
               "multipart/form-data; boundary=x", "application/json; charset=latin-1",
               "application/jsonp", "application/xml"]  # fmt: skip


@dataclass
class Honest:
    """One honest device's accepted upload (what ``replayed`` sends again)."""

    sealed: SealedDelta
    period: str


def honest_device(client: httpx.Client, base: str, policy: Policy) -> Honest:
    """One device enrolls and uploads a real sealed delta (the shipped ranker's size)."""
    region = policy.region(REGION)
    answer = client.get(f"{base}/v1/round")
    spec = verify_round_spec(SignedRoundSpec.from_wire(answer.content), region.key("signing").key)
    key = Ed25519PrivateKey.generate()
    period = period_label(spec)
    body = {"protocol": 1, "device_key": b64encode(key.public_key().public_bytes_raw()),
            "period": period}  # fmt: skip
    enrolled = client.post(f"{base}/v1/enroll", json=body, headers=AUTH)
    assert enrolled.status_code == 200, enrolled.text
    dim = Ranker.load().get_weights().shape[0]
    rng = np.random.default_rng(0)
    values = rng.normal(size=dim)
    delta = (values * (0.5 * spec.clipping_norm / np.linalg.norm(values))).astype(np.float32)
    sealed = seal_delta(delta=delta, spec=spec, device_secret=os.urandom(32),
                        signing_key=key, aggregator_hpke_key=b64decode(region.key("hpke").key),
                        rng=rng)  # fmt: skip
    headers = JSON_TYPE | {"Idempotency-Key": sealed.idempotency_key}
    url = f"{base}/v1/rounds/{sealed.round_id}/deltas"
    accepted = client.post(url, content=sealed.to_wire(), headers=headers)
    assert accepted.status_code == 200, accepted.text
    return Honest(sealed, period)


Request = Callable[[], int | None]


def corpus(base: str, port: int, policy: Policy, honest: Honest, client: httpx.Client, *,
           malformed: int) -> Iterator[tuple[str, Request]]:  # fmt: skip
    """Every hostile request but the slow clients, as (kind, request) pairs."""
    sealed = honest.sealed
    deltas = f"/v1/rounds/{sealed.round_id}/deltas"
    erasure = f"/v1/pseudonyms/{sealed.pseudonym}/erasure"
    body_routes = [("/v1/enroll", AUTH), (deltas, JSON_TYPE | {"Idempotency-Key": "o" * 24}),
                   (erasure, JSON_TYPE)]  # fmt: skip

    def post(path: str, body: bytes, headers: dict[str, str]) -> Request:
        return lambda: client.post(base + path, content=body, headers=headers).status_code

    enroll_variants = [{}, {"Authorization": "Bearer guess"}, {"Authorization": f"Bearer {TOKEN}"}]
    for _ in range(10):
        for path, headers in [*body_routes, ("/v1/enroll", JSON_TYPE)]:
            yield "oversized", partial(declared_too_large, port, path, headers)
    for _ in range(8):
        for extra in enroll_variants:
            yield "streamed", partial(streamed_forever, port, "/v1/enroll", JSON_TYPE | extra)
        yield "streamed", partial(streamed_forever, port, deltas, body_routes[1][1])
        yield "streamed", partial(streamed_forever, port, erasure, JSON_TYPE)
    for n in range(malformed):
        headers = JSON_TYPE | {"Idempotency-Key": f"malformed-upload-{n:08d}"}
        yield "malformed", post(deltas, MALFORMED[n % len(MALFORMED)], headers)
    keyed = JSON_TYPE | {"Idempotency-Key": sealed.idempotency_key}
    wire = sealed.to_wire()
    for n in range(50):
        yield "replayed", post(deltas, wire, keyed)
        other = json.dumps(json.loads(wire) | {"ciphertext": sealed.ciphertext[: 8 + n]})
        yield "replayed", post(deltas, other.encode(), keyed)
    for _ in range(10):
        yield "replayed", post(f"/v1/rounds/{sealed.round_id}-other/deltas", wire, keyed)
        yield "replayed", post(deltas, wire, JSON_TYPE)
    for _ in range(3):
        for key in bad_keys():
            body = json.dumps({"protocol": 1, "device_key": key, "period": honest.period})
            yield "bad_keys", post("/v1/enroll", body.encode(), AUTH)
        for period in bad_periods(policy, honest.period):
            fresh = b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
            body = json.dumps({"protocol": 1, "device_key": fresh, "period": period})
            yield "bad_periods", post("/v1/enroll", body.encode(), AUTH)
        for content_type in WRONG_TYPES:
            for path, headers in body_routes:
                typed = {k: v for k, v in headers.items() if k != "Content-Type"}
                if content_type is not None:
                    typed["Content-Type"] = content_type
                yield "wrong_types", post(path, wire, typed)
    for n in range(100):
        headers = [{}, {"Authorization": f"Bearer guess-{n}"},
                   {"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"},
                   {"Authorization": TOKEN}][n % 4]  # fmt: skip
        body = json.dumps({"protocol": 1, "device_key": "A" * 43 + "=", "period": honest.period})
        yield "bad_tokens", post("/v1/enroll", body.encode(), JSON_TYPE | headers)
