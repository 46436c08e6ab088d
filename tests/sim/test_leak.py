"""Nothing a simulated device knows leaves it: every byte the devices send during a simulation is
captured at the transport seam and on the wire, and searched for what the devices hold.

A generic CSV dataset is made of canaries: user ids ``canary-user-…``, track ids
``canary-track-…`` and artist ids ``canary-artist-…``. ``simulate`` runs it with real
``sottovoce aggregator serve`` processes on 127.0.0.1 (``server=True``); ``on_request`` records
method, URL, headers and body of every request the devices (and the operator's client) send,
and ``relay`` points the devices at a recording TCP relay that keeps every raw byte they write
to the aggregators. The capture, the base64 and hex runs found in it (decoded at every
alignment) and the sealed deltas decrypted with the aggregators' own keys must hold no canary,
no secret of any device store (device secret, salt, digest key, signing keys, the salted user
hashes), no event field name, timestamp or context value. The same search finds all of them in
the device stores' SQLite files (the positive control), and the capture is large enough that
the test cannot pass on an empty one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import random
import re
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sim_helpers import small_policy

from sottovoce.device import ITEM_DIM, PARAMETER_COUNT
from sottovoce.sim import SimulationConfig, simulate
from sottovoce.sync import SealedDelta
from sottovoce.sync._seal import SUITE, _info
from sottovoce.sync._wire import b64decode

pytest.importorskip("opacus")

USERS, TRACKS, ARTISTS = 16, 48, 12
CANARY = b"canary-"  # begins every user, track and artist id; nothing the protocol sends
# Names of the event schema (fields and event types) searched as substrings anywhere: random
# ciphertext cannot spell them by chance, having seven characters or more or an underscore
# (which standard base64 lacks) ...
EVENT_FIELDS = (
    "track_id", "artist_id", "user_id", "device_id", "event_id", "ms_played", "play_start",
    "play_end", "position_ms", "duration_ms", "context_type", "context_id", "device_type",
    "local_time", "schema_version", "from_ms", "context", "dislike", "navigate", "network",
)  # fmt: skip
# ... and words of events that are short or plain English ("startup complete" is in a server
# log), searched as whole values (JSON strings, header values, URL path segments), with the
# stores' context values.
EVENT_WORDS = frozenset(
    w.encode()
    for w in ("play", "skip", "like", "pause", "resume", "seek", "search", "complete", "wifi")
)
DELTA_FIELDS = set(SealedDelta.model_fields)
ENROLL_FIELDS = {"protocol", "device_key", "period"}
DELTA_BYTES = 4 * PARAMETER_COUNT  # a delta is the model's float32 values
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX_RUN = re.compile(rb"[0-9A-Fa-f]{16,}")
_TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[\d.]*(?:Z|[+-]\d\d:\d\d)?")


# -- the dataset -------------------------------------------------------------------------------


def _canary(kind: str, rng: random.Random) -> str:
    return f"canary-{kind}-{rng.getrandbits(48):012x}"


def write_canary_dataset(folder: Path, seed: int = 5) -> tuple[Path, Path]:
    """An interactions CSV (``event_type``, ISO timestamps) and an item-features CSV with
    artists; users like two artists' tracks and skip or dislike some others."""
    rng = random.Random(seed)
    artists = [_canary("artist", rng) for _ in range(ARTISTS)]
    tracks = [_canary("track", rng) for _ in range(TRACKS)]
    artist_of = {t: artists[n % ARTISTS] for n, t in enumerate(tracks)}
    centres = [[rng.gauss(0, 1) for _ in range(ITEM_DIM)] for _ in artists]
    features = ["item_id,artist_id," + ",".join(f"f{d}" for d in range(ITEM_DIM))]
    for n, track in enumerate(tracks):
        vector = [c + rng.gauss(0, 0.3) for c in centres[n % ARTISTS]]
        features.append(f"{track},{artist_of[track]}," + ",".join(f"{v:.5f}" for v in vector))
    rows = ["user_id,item_id,timestamp,event_type"]
    for _ in range(USERS):
        user = _canary("user", rng)
        liked = set(rng.sample(artists, 2))
        mine = [t for t in tracks if artist_of[t] in liked]
        others = [t for t in tracks if artist_of[t] not in liked]
        day = rng.randint(1, 9)
        for k in range(18):
            track, kind = rng.choice(mine), rng.choice(("play", "play", "complete", "like"))
            if k % 5 == 4:
                track, kind = rng.choice(others), rng.choice(("skip", "skip", "dislike"))
            rows.append(f"{user},{track},2026-08-{day + k // 3:02d}T{8 + k % 12:02d}:"
                        f"{rng.randint(0, 59):02d}:00Z,{kind}")  # fmt: skip
    interactions, item_features = folder / "canary.csv", folder / "canary-features.csv"
    interactions.write_text("\n".join(rows) + "\n")
    item_features.write_text("\n".join(features) + "\n")
    return interactions, item_features


# -- capture: the transport seam and the wire -------------------------------------------------


class RecordingRelay:
    """A TCP relay on 127.0.0.1 to ``upstream`` that forwards bytes unchanged both ways and
    keeps every byte its clients send, per connection."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None, upstream
        self._upstream = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._sent: list[bytearray] = []
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    @property
    def sent(self) -> list[bytes]:
        """What clients sent, one bytes object per connection."""
        with self._lock:
            return [bytes(b) for b in self._sent]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            upstream = socket.create_connection(self._upstream)
            record = bytearray()
            with self._lock:
                self._sent.append(record)
                self._sockets += [client, upstream]
            for source, sink, keep in ((client, upstream, record), (upstream, client, None)):
                thread = threading.Thread(target=_pump, args=(source, sink, keep, self._lock),
                                          daemon=True)  # fmt: skip
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        # shutdown() wakes a thread blocked in accept() or recv(); close() alone does not.
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
            assert not thread.is_alive(), "the relay did not stop"


def _pump(source: socket.socket, sink: socket.socket, keep: bytearray | None,
          lock: threading.Lock) -> None:  # fmt: skip
    try:
        while chunk := source.recv(65536):
            if keep is not None:
                with lock:
                    keep += chunk
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # either side closed: the other thread ends too


@dataclass(frozen=True)
class SeamRequest:
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def head(self) -> bytes:
        lines = [f"{self.method} {self.url}".encode()] + [k + b": " + v for k, v in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass
class Capture:
    results: dict[str, Any]
    workdir: Path
    seam: list[SeamRequest] = field(default_factory=list)
    wire: list[bytes] = field(default_factory=list)  # per connection, every byte sent


def run_captured(workdir: Path, csv: Path, features: Path) -> Capture:
    seam: list[SeamRequest] = []
    relays: list[RecordingRelay] = []

    def on_request(request: httpx.Request) -> None:
        seam.append(SeamRequest(request.method, str(request.url), list(request.headers.raw),
                                request.content))  # fmt: skip

    def relay(url: str) -> str:
        relays.append(RecordingRelay(url))
        return relays[-1].url

    config = SimulationConfig(workdir=workdir, csv=csv, item_features=features, users=USERS,
                              rounds=1, sampling_rate=1.0, local_steps=10, central_epochs=1,
                              examples=100, catalog_sample=30, workers=2, server=True,
                              on_request=on_request, relay=relay, seed=3,
                              policy=small_policy(6))  # fmt: skip
    try:
        results = simulate(config)
    finally:
        for proxy in relays:
            proxy.stop()
    assert len(relays) == 6  # two regions, three pipelines: every aggregator behind a relay
    return Capture(results, workdir, seam, [b for r in relays for b in r.sent])


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Capture:
    folder = tmp_path_factory.mktemp("leak")
    csv, features = write_canary_dataset(folder)
    return run_captured(folder / "sim", csv, features)


# -- the search --------------------------------------------------------------------------------


def _decode_runs(text: bytes) -> Iterator[bytes]:
    """Every base64 (standard or URL-safe) and hex run of ``text`` decoded, at every
    alignment, so that bytes encoded anywhere inside a longer run are found."""
    for match in _B64_RUN.finditer(text):
        run = match.group().rstrip(b"=").replace(b"-", b"+").replace(b"_", b"/")
        for start in range(4):
            part = run[start:]
            tail = len(part) % 4  # a last, partial quantum still holds one or two bytes
            part = part[: len(part) - 1] if tail == 1 else part + b"=" * (-tail % 4)
            if part:
                yield base64.b64decode(part)
    for match in _HEX_RUN.finditer(text):
        run = match.group()
        for start in range(2):
            part = run[start:]
            yield binascii.unhexlify(part[: len(part) - len(part) % 2])


def haystack(blobs: Iterable[bytes]) -> bytes:
    """The blobs as sent and everything encoded in them, one buffer to search."""
    parts: list[bytes] = []
    for blob in blobs:
        parts += [blob, *(_decode_runs(blob))]
    return b"\n\0\n".join(parts)


@dataclass(frozen=True)
class Canaries:
    """What the device stores hold beyond the canary ids and must keep."""

    secrets: frozenset[bytes]  # raw bytes of the stores' keys, secrets and salted hashes
    values: frozenset[bytes]  # short values (context): found only as whole values
    timestamps: frozenset[bytes]  # the events' times
    strings: frozenset[bytes] = frozenset()  # other ids (device ids): found anywhere


def _values(stack: bytes) -> set[bytes]:
    """Whole values as messages carry them: JSON strings, header values, URL path segments."""
    found = set(re.findall(rb'(?="([^"\\]{1,100})")', stack))  # overlapping: every pair
    found |= set(re.findall(rb"\n[A-Za-z0-9-]{1,64}: ([^\r\n]{1,200})\r", stack))
    for target in re.findall(rb"(?:GET|POST|PUT|DELETE) (\S+)", stack):
        found |= set(re.split(rb"[/?&=]", target))
    return found


def leaks(stack: bytes, canaries: Canaries) -> dict[str, list[str]]:
    """What the haystack holds of ``canaries``, any canary id and the event schema, by kind."""
    found: dict[str, list[str]] = {}
    lower = stack.lower()
    forms = [CANARY, CANARY.hex().encode(), CANARY.decode().encode("utf-16-le")]
    ids = [lower[max(at - 8, 0) : at + 32] for form in forms if (at := lower.find(form)) >= 0]
    if ids:
        found["ids"] = [i.decode("latin-1") for i in ids]
    names = [n for n in EVENT_FIELDS if n.encode() in stack]
    if names:
        found["event fields"] = names
    secrets = sorted(s.hex()[:16] for s in canaries.secrets if s in stack)
    if secrets:
        found["secrets"] = secrets
    strings = sorted(s.decode() for s in canaries.strings if s in stack)
    if strings:
        found["strings"] = strings
    values = _values(stack) & (canaries.values | EVENT_WORDS)
    if values:
        found["values"] = sorted(v.decode("latin-1") for v in values)
    stamps = set(_TIMESTAMP.findall(stack)) & canaries.timestamps
    if stamps:
        found["timestamps"] = sorted(s.decode() for s in stamps)
    return found


def store_canaries(workdir: Path) -> Canaries:
    """The secrets, event times, context values and device ids of every device store of the
    run."""
    secrets: set[bytes] = set()
    values: set[bytes] = set()
    stamps: set[bytes] = set()
    device_ids: set[bytes] = set()
    stores = sorted((workdir / "devices").glob("*/*/*.db"))
    assert len(stores) == 3 * USERS  # the ranker's two pipelines and the collaborative model
    for path in stores:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            hexes = [meta["device_secret"], meta["salt"], meta["digest_key"]]
            hexes += [k for (k,) in db.execute("SELECT signing_key FROM device_keys")]
            hexes += [h for row in db.execute("SELECT user_hash, subject FROM users")
                      for h in row if h]  # fmt: skip
            secrets |= {bytes.fromhex(h) for h in hexes}
            for (body,) in db.execute("SELECT body FROM events"):
                event = json.loads(body)
                stamps.add(event["ts"].encode())
                # The simulator's events carry no device id (sim/_evaluate.py device_events
                # sets one only when asked): any that a store holds is searched for.
                if event.get("device_id") is not None:
                    device_ids.add(event["device_id"].encode())
            for row in db.execute("SELECT device_type, network, local_time FROM context"):
                values |= {v.encode() for v in row if v}
    return Canaries(frozenset(secrets), frozenset(values), frozenset(stamps),
                    frozenset(device_ids))  # fmt: skip


# -- the tests ---------------------------------------------------------------------------------


def test_the_capture_is_every_request_and_is_not_empty(captured: Capture) -> None:
    def rounds(pipeline: str) -> list[dict[str, Any]]:
        return [r for record in captured.results["rounds"][pipeline]
                for r in (record["eu"], record["us"])]  # fmt: skip

    central, local = rounds("reranker_federated_dp"), rounds("reranker_federated_dp_local")
    collaborative = rounds("collaborative")
    assert all(r["state"] == "published" for r in central + local + collaborative)
    # central rounds count every device's delta (they close at the deadline); local rounds
    # close at the policy's minimum cohort of 6, and the region's other 2 devices come too late
    assert sum(r["uploaded"]["acknowledged"] for r in central) == 2 * USERS // 2
    assert sum(r["uploaded"]["acknowledged"] for r in local) == 2 * 6
    rounds_of_collaborative = captured.results["config"]["collaborative_rounds"]
    assert sum(r["uploaded"]["acknowledged"] for r in collaborative) == (
        rounds_of_collaborative * USERS
    )
    deltas = [r for r in captured.seam if r.method == "POST" and r.url.endswith("/deltas")]
    enrolls = [r for r in captured.seam if r.method == "POST" and r.url.endswith("/v1/enroll")]
    assert len(deltas) >= (2 + rounds_of_collaborative) * USERS  # every device, every pipeline
    assert len(enrolls) >= 3 * USERS
    wire = b"".join(captured.wire)
    assert len(wire) > 2 * USERS * DELTA_BYTES * 4 / 3  # the ranker's deltas alone, in base64
    # The two captures agree: each request seen at the seam went over a relay, byte for byte.
    for request in captured.seam:
        path = urlsplit(request.url).path.encode()
        assert request.method.encode() + b" " + path in wire, request.url
        assert request.body in wire, request.url
    on_wire = len(re.findall(rb"(?:GET|POST) /v1/", wire))
    assert on_wire == len(captured.seam)


def test_requests_are_protocol_messages_only(captured: Capture) -> None:
    paths = re.compile(r"^/v1/(round|enroll|model/release|rounds/[A-Za-z0-9._:-]+/deltas)$")
    for request in captured.seam:
        url = urlsplit(request.url)
        assert paths.match(url.path) and not url.query, request.url
        if request.method == "GET":
            assert request.body == b""
            continue
        body = json.loads(request.body)
        expected = ENROLL_FIELDS if url.path == "/v1/enroll" else DELTA_FIELDS
        assert set(body) == expected, (url.path, sorted(body))
        assert all(isinstance(v, str | int) for v in body.values())


def test_no_id_secret_or_event_field_leaves_a_device(captured: Capture) -> None:
    canaries = store_canaries(captured.workdir)
    assert len(canaries.secrets) >= 4 * 2 * USERS and canaries.timestamps and canaries.values
    # Bodies seen at the seam that are on the wire byte for byte are searched there, once.
    wire = b"".join(captured.wire)
    seam = [r.head() + (b"" if r.body in wire else r.body) for r in captured.seam]
    assert leaks(haystack(seam + captured.wire), canaries) == {}
    # What the aggregators decrypt: the delta's values and the device's attestation.
    plaintexts = _decrypted(captured)
    assert len(plaintexts) == sum(1 for r in captured.seam if r.url.endswith("/deltas"))
    sizes = (DELTA_BYTES, 4 * captured.results["collaborative"]["dim"])  # float32 values
    assert all(len(p) > min(sizes) for p in plaintexts)
    assert {max(s for s in sizes if len(p) > s) for p in plaintexts} == set(sizes)  # both kinds
    assert leaks(b"\n".join(plaintexts), canaries) == {}


def test_the_aggregators_keep_no_device_data(captured: Capture) -> None:
    canaries = store_canaries(captured.workdir)
    kept = [p.read_bytes() for p in (captured.workdir / "aggregators").glob("*/*")
            if p.is_file() and (".db" in p.name or p.name.endswith(".log"))]  # fmt: skip
    assert len(kept) >= 12  # six databases and six service logs at least
    assert leaks(haystack(kept), canaries) == {}


def test_the_search_finds_what_the_device_stores_hold(captured: Capture) -> None:
    canaries = store_canaries(captured.workdir)
    # one device of each pipeline and region (with its WAL file, if any) is enough
    devices = [sorted(d.glob("*.db"))[0] for d in (captured.workdir / "devices").glob("*/*")]
    assert len(devices) == 6
    stores = [p.read_bytes() for d in devices for p in d.parent.glob(d.name + "*")]
    found = leaks(haystack(stores), canaries)
    assert set(found) == {"ids", "event fields", "secrets", "values", "timestamps"}
    assert set(found["event fields"]) >= {"track_id", "artist_id", "ms_played", "play_start",
                                          "play_end", "position_ms", "duration_ms",
                                          "context_type", "context"}  # fmt: skip
    raw = b"".join(stores)
    for prefix in (b"canary-user-", b"canary-track-", b"canary-artist-"):
        assert prefix in raw


def test_the_search_sees_through_encodings() -> None:
    secret = bytes(range(32))
    canaries = Canaries(frozenset({secret}), frozenset({b"tablet"}), frozenset())
    user = b"canary-user-0123456789ab"
    for prefix in (b"", b"x", b"xy"):  # base64 at each alignment inside a longer field
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            body = b'{"a":"' + encode(prefix + user + b"padding") + b'"}'
            assert "ids" in leaks(haystack([body]), canaries), (prefix, encode)
            body = b'{"a":"' + encode(prefix + secret) + b'"}'
            assert "secrets" in leaks(haystack([body]), canaries), (prefix, encode)
    for text in (user.hex().encode(), user.upper(), user.decode().encode("utf-16-le"),
                 b"k=" + secret.hex().upper().encode()):  # fmt: skip
        assert leaks(haystack([text]), canaries), text
    assert leaks(haystack([b'{"device_type":"tablet"}']), canaries).keys() == {
        "event fields",
        "values",
    }
    assert leaks(haystack([b'{"round":"us-1","period":"2026-11-01"}']), canaries) == {}


def _decrypted(captured: Capture) -> list[bytes]:
    """Every captured sealed delta, opened with its aggregator's private key."""
    from cryptography.exceptions import InvalidTag

    from sottovoce.aggregator import load_keys

    keys = [load_keys(d).hpke for d in (captured.workdir / "keys").glob("*/*") if d.is_dir()]
    assert len(keys) == 6  # three pipelines, two regions
    out = []
    for request in captured.seam:
        if not request.url.endswith("/deltas"):
            continue
        sealed = SealedDelta.from_wire(request.body)
        envelope = sealed.model_dump(mode="json", exclude={"enc", "ciphertext"})
        data = b64decode(sealed.enc) + b64decode(sealed.ciphertext)
        for key in keys:
            try:
                out.append(SUITE.decrypt(data, key, info=_info(envelope)))
                break
            except InvalidTag:
                continue
    return out
