"""Hostile-input benchmark: a fixed corpus of hostile requests against one region's aggregator
service on 127.0.0.1, and what they cost it.

Prints one JSON object on stdout (progress on stderr). The server is what an operator runs, in
its own process: ``sottovoce aggregator keygen`` (the example policy's EU region) and
``sottovoce aggregator serve``, whose schedule opens a round at start, here with short read
deadlines (``--header-timeout``, ``--body-timeout``) so that its slow clients are cut within
the run, and its default connection cap and refusal budget. Before the corpus, one honest
device enrolls and uploads a real sealed delta (the shipped ranker's size), which the corpus
then replays.

The corpus is the same every run (``corpus`` gives the count of each kind):

- ``slow``: slowloris clients sending their headers one byte every half second, clients that
  send complete headers and then a body one byte every half second, and clients that connect
  and send nothing; all are opened first and held while the rest runs;
- ``oversized``: bodies declaring 64 MiB (Content-Length) on every body route, 64 KiB sent;
- ``streamed``: chunked bodies that never end (up to 64 MiB sent each, 8 at a time) to
  enrollment without a token, with a wrong one, with the right one, to uploads and erasure;
- ``malformed``: uploads that are not sealed deltas (broken JSON, deep nesting, wrong types,
  garbage fields), each under a fresh idempotency key;
- ``replayed``: the honest upload sent again (answered 200, counted once), other bodies under its
  key (409), the same body for another round's path or without a key (400);
- ``bad_keys``: enrollment with small-order and malformed Ed25519 keys, non-canonical base64;
- ``bad_periods``: enrollment for periods the policy does not open (``x``, ``9999-12-31``,
  not a period start, long past, two ahead, a field of nearly 1 MiB);
- ``wrong_types``: bodies declared as anything but ``application/json``, on every body route;
- ``bad_tokens``: enrollment without a token, with wrong ones, with another scheme.

Measured: ``requests`` (hostile requests and connections), ``answers`` by status (and by kind
of request; ``None``: no answer), ``five_xx`` (must be 0; the corpus never opens more
connections than the cap, so even a 503 is a failure), the server's resident memory from
``/proc/PID/status``: ``idle_rss_mb`` after the honest device, ``peak_rss_mb`` during the corpus
(VmRSS sampled every 20 ms, and VmHWM after resetting it through ``/proc/PID/clear_refs``;
``peak_over_idle`` must be at most 1.5), its open file descriptors idle, when the slowest
client's deadline has passed (``fds_at_slow_deadline``: every slow client cut by then) and
after the corpus (``fds_after``: back to idle), and its decision log, read after the server
stopped (refusals beyond the per-source budget are counted into one entry per reason at the
schedule's tick and at stop): ``log_entries_added`` (``one_by_one`` and ``counted``, with the
refusals the counted ones hold), ``refused`` (4xx answers) and ``log_entries_per_refusal``.
``checks`` says whether each bound held; junk must never be accepted (a 2xx only for the
replays of the honest upload).

Usage: ``python bench/hostile.py [--header-timeout S] [--body-timeout S] [--malformed N]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import select
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sottovoce.aggregator import RefusalLimit
from sottovoce.device import Ranker
from sottovoce.policy import DecisionLog, Policy, load_policy
from sottovoce.policy._decision import Metric
from sottovoce.sync import SealedDelta, SignedRoundSpec, period_label, seal_delta, verify_round_spec
from sottovoce.sync._wire import b64decode, b64encode

REGION = "eu"
TOKEN = "bench-enrollment-token"
MIB = 1 << 20
JSON_TYPE = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"} | JSON_TYPE


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the server and what /proc says about it ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """``sottovoce aggregator serve`` for the EU region, in its own process."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    policy: Policy

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, workdir: Path, *, header_timeout: float, body_timeout: float) -> Server:
        cli = [sys.executable, "-m", "sottovoce", "aggregator"]
        keys = workdir / "keys"
        subprocess.run([*cli, "keygen", "--region", REGION, "--out", str(keys)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        port = _free_port()
        command = [*cli, "serve", "--region", REGION, "--policy", str(keys / "policy.json"),
                   "--keys", str(keys), "--db", str(workdir / "aggregator.db"),
                   "--port", str(port), "--sweep-seconds", "5", "--log-level", "warning",
                   "--header-timeout", str(header_timeout),
                   "--body-timeout", str(body_timeout)]  # fmt: skip
        env = os.environ | {"SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN}
        with (workdir / "server.log").open("wb") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = cls(process, port, workdir, load_policy(keys / "policy.json"))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{server.base}/v1/round", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError("the aggregator did not come up:\n" + server.tail())

    def tail(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")[-3000:]

    def rss_mb(self) -> float:
        return self._status("VmRSS") / 1024

    def hwm_mb(self) -> float:
        return self._status("VmHWM") / 1024

    def reset_hwm(self) -> bool:
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def fds(self) -> int:
        return sum(1 for _ in Path(f"/proc/{self.process.pid}/fd").iterdir())

    def _status(self, name: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {name} in /proc status")

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: the app writes its counted refusals, then ends
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RssSampler(threading.Thread):
    """The server's highest VmRSS, sampled every 20 ms until stopped."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.peak_mb, self.done = server, server.rss_mb(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak_mb = max(self.peak_mb, self.server.rss_mb())


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


def honest_device(client: httpx.Client, server: Server) -> Honest:
    region = server.policy.region(REGION)
    answer = client.get(f"{server.base}/v1/round")
    spec = verify_round_spec(SignedRoundSpec.from_wire(answer.content), region.key("signing").key)
    key = Ed25519PrivateKey.generate()
    period = period_label(spec)
    body = {"protocol": 1, "device_key": b64encode(key.public_key().public_bytes_raw()),
            "period": period}  # fmt: skip
    enrolled = client.post(f"{server.base}/v1/enroll", json=body, headers=AUTH)
    assert enrolled.status_code == 200, enrolled.text
    dim = Ranker.load().get_weights().shape[0]
    rng = np.random.default_rng(0)
    values = rng.normal(size=dim)
    delta = (values * (0.5 * spec.clipping_norm / np.linalg.norm(values))).astype(np.float32)
    sealed = seal_delta(delta=delta, spec=spec, device_secret=os.urandom(32),
                        signing_key=key, aggregator_hpke_key=b64decode(region.key("hpke").key),
                        rng=rng)  # fmt: skip
    headers = JSON_TYPE | {"Idempotency-Key": sealed.idempotency_key}
    url = f"{server.base}/v1/rounds/{sealed.round_id}/deltas"
    accepted = client.post(url, content=sealed.to_wire(), headers=headers)
    assert accepted.status_code == 200, accepted.text
    return Honest(sealed, period)


Request = Callable[[], int | None]


def corpus(server: Server, honest: Honest, client: httpx.Client,
           malformed: int) -> Iterator[tuple[str, Request]]:  # fmt: skip
    base, port, sealed = server.base, server.port, honest.sealed
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
        for period in bad_periods(server.policy, honest.period):
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


# -- the run ---------------------------------------------------------------------------------


def _answered(request: Request) -> int | None:
    try:
        return request()
    except httpx.TransportError:
        return None  # no answer: counted under "None"


def log_size(db: Path) -> tuple[int, list[dict[str, Metric]]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        log = DecisionLog(conn)
        counted = [d.metrics for _, d in log.query() if "refusals" in d.metrics]
        return log.size, counted


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    progress("starting the aggregator (keygen, serve)...")
    server = Server.start(workdir, header_timeout=args.header_timeout,
                          body_timeout=args.body_timeout)  # fmt: skip
    db = workdir / "aggregator.db"
    deadline_s = args.header_timeout + args.body_timeout + 2
    try:
        with httpx.Client(timeout=60) as client:
            honest = honest_device(client, server)
            for path in ("/v1/round", "/v1/health", "/v1/metrics", "/v1/model/release"):
                client.get(server.base + path)
        time.sleep(1.0)
        idle_rss, fds_idle = server.rss_mb(), server.fds()
        entries_before, _ = log_size(db)
        hwm_reset = server.reset_hwm()
        sampler = RssSampler(server)
        sampler.start()
        progress(f"idle: {idle_rss:.0f} MB, {fds_idle} fds; running the corpus...")
        slow = SlowClients(server.port, headers=100, bodies=20, idle=20, check_at=deadline_s,
                           count_fds=server.fds)  # fmt: skip
        slow_thread = threading.Thread(target=slow.run, args=(deadline_s + 60,), daemon=True)
        slow_thread.start()
        by_kind: dict[str, Counter[int | None]] = {}
        started = time.monotonic()
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(max_workers=8) as pool:
            work = list(corpus(server, honest, client, args.malformed))
            for (kind, _), status in zip(work, pool.map(lambda w: _answered(w[1]), work),
                                         strict=True):  # fmt: skip
                by_kind.setdefault(kind, Counter())[status] += 1
        slow_thread.join()
        by_kind["slow"] = Counter(slow.statuses)
        corpus_s = time.monotonic() - started
        sampler.done.set()
        sampler.join()
        peak = max(sampler.peak_mb, server.hwm_mb() if hwm_reset else 0.0)
        settle = time.monotonic() + 30
        while server.fds() > fds_idle and time.monotonic() < settle:
            time.sleep(0.2)
        fds_after = server.fds()
        alive = server.process.poll() is None
    finally:
        server.stop()
    entries_after, counted = log_size(db)
    answers: Counter[int | None] = sum(by_kind.values(), Counter())
    refused = sum(n for status, n in answers.items() if status is not None and 400 <= status < 500)
    five_xx = sum(n for status, n in answers.items() if status is not None and status >= 500)
    added = entries_after - entries_before
    one_by_one = added - len(counted)
    limit = RefusalLimit()  # serve's default; the whole corpus comes from one address
    budget = limit.per_source + math.ceil(limit.per_source_per_minute * corpus_s / 60)
    accepted = {kind: sum(n for st, n in c.items() if st is not None and 200 <= st < 300)
                for kind, c in by_kind.items()}  # fmt: skip
    return {
        "requests": sum(sum(c.values()) for c in by_kind.values()),
        "corpus": {kind: sum(c.values()) for kind, c in sorted(by_kind.items())},
        "answers": _statuses(answers),
        "answers_by_kind": {kind: _statuses(c) for kind, c in sorted(by_kind.items())},
        "five_xx": five_xx,
        "unanswered": answers[None],
        "slow_clients": {
            "cut_with_408": slow.statuses.count(408),
            "of": len(slow.statuses),
            "last_cut_s": round(max(slow.seconds), 2),
        },
        "idle_rss_mb": round(idle_rss, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_over_idle": round(peak / idle_rss, 3),
        "fds_idle": fds_idle,
        "fds_at_slow_deadline": slow.fds_at_check,
        "fds_after": fds_after,
        "refused": refused,
        "log_entries_added": added,
        "log_entries_one_by_one": one_by_one,
        "log_entries_counted": len(counted),
        "refusals_in_counted_entries": sum(int(str(m["refusals"])) for m in counted),
        "log_entries_per_refusal": round(added / max(refused, 1), 4),
        "corpus_s": round(corpus_s, 1),
        "server_alive_after": alive,
        "settings": {
            "header_timeout_s": args.header_timeout,
            "body_timeout_s": args.body_timeout,
            "max_connections": 1000,
            "refusals_logged_one_by_one_per_source": limit.per_source,
        },
        "checks": {
            "no_5xx": five_xx == 0,
            "every_request_answered": answers[None] == 0,
            "junk_never_accepted": all(
                n == 0 for kind, n in accepted.items() if kind != "replayed"
            ),
            "peak_rss_within_1_5x_idle": peak <= 1.5 * idle_rss,
            "slow_clients_cut_by_the_deadline": (slow.fds_at_check or 0) <= fds_idle + 8,
            "fds_back_to_idle": fds_after <= fds_idle,
            "log_one_by_one_within_budget": one_by_one <= budget,
        },
    }


def _statuses(counts: Counter[int | None]) -> dict[str, int]:
    return {str(status): n for status, n in sorted(counts.items(), key=lambda kv: str(kv[0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    parser.add_argument("--body-timeout", type=float, default=4.0)
    parser.add_argument("--malformed", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sottovoce-hostile-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
