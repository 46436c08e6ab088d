"""Hostile requests against the aggregator service on a real uvicorn on 127.0.0.1.

What an outside test of the service found (issue 18), each held here through HTTP:

- a route checks credentials and caps its body before any work: enrollment answers a request
  without a token, or a streamed body past the limit, while the body is still arriving;
- a body must be declared ``application/json`` (415 ``unsupported_media_type`` otherwise);
- an idempotency key binds to the first content accepted under it, not to a garbage attempt;
- enrollment takes only keys a device could have made and the policy's budget periods around
  now, says nothing of which period a key has, and never quotes more than a short prefix;
- junk cannot grow the decision log by one entry per request: beyond a per-source budget,
  refusals are counted into one verifiable entry per reason;
- the OpenAPI document lists every status the service answers (no FastAPI 422 for
  validation), and ``/docs`` and ``/redoc`` are off unless the operator turns them on.

Slow clients and the connection cap are in ``test_slow_clients.py``.
"""

from __future__ import annotations

import base64
import json
import re
import select
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from service_helpers import TOKEN, Device, Region, serve, small

from sottovoce.aggregator import (
    RefusalLimit,
    RegionAggregator,
    ServiceConfig,
    build_app,
    create_app,
)
from sottovoce.policy import DecisionLog
from sottovoce.sync import SealedDelta, period_label
from sottovoce.sync._wire import b64encode

pytest.importorskip("opacus")

LIMIT = 1 << 20  # the service's default body limit
JSON_BODY = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"} | JSON_BODY


@dataclass
class Scene:
    region: Region
    url: str
    client: httpx.Client

    def enroll(self, device_key: str, period: str, **headers: str) -> httpx.Response:
        body = {"protocol": 1, "device_key": device_key, "period": period}
        return self.client.post(f"{self.url}/v1/enroll", content=json.dumps(body).encode(),
                                headers=AUTH | headers)  # fmt: skip

    def upload(self, body: bytes, key: str, **headers: str) -> httpx.Response:
        url = f"{self.url}/v1/rounds/{self.region.spec.round_id}/deltas"
        headers = JSON_BODY | {"Idempotency-Key": key} | headers
        return self.client.post(url, content=body, headers=headers)

    def device(self) -> Device:
        device = Device()
        device.enroll(self.client, self.url, self.region.spec)
        return device

    def sealed(self, seed: int) -> SealedDelta:
        return self.device().seal(self.region.spec, small(seed), self.region.keys.hpke.public_key())

    def log_size(self) -> int:
        with closing(sqlite3.connect(self.region.path)) as conn:
            return DecisionLog(conn).size


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    # A central round: it stays open whatever its count, and nothing sweeps here.
    region = Region(tmp_path_factory.mktemp("hostile") / "aggregator.db")
    with serve(region.app()) as url, httpx.Client(timeout=10) as client:
        yield Scene(region, url, client)


# -- raw HTTP, for bodies that never end ---------------------------------------------------------


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of one HTTP/1.1 answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"the connection closed before an answer: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return status, json.loads(body[:length])


def _stream_until_answered(url: str, head: bytes, *, most: int) -> tuple[int, dict[str, Any], int]:
    """Send ``head`` then a chunked body of ``{`` that never ends (up to ``most`` bytes), until
    the service answers; returns the answer and how many body bytes were sent by then."""
    with closing(_connect(url)) as sock:
        sock.sendall(head)
        chunk, sent = b"{" * 65536, 0
        while sent < most:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, body = _read_answer(sock)  # waits for it if all was sent
        return status, body, sent


def _chunked_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             "Transfer-Encoding: chunked", *headers]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- 1: credentials and the body limit before any work ------------------------------------------


def test_enrollment_refuses_a_tokenless_streamed_body_before_reading_it(scene: Scene) -> None:
    before = scene.region.enrolled()
    status, body, sent = _stream_until_answered(
        scene.url, _chunked_head("/v1/enroll"), most=8 * LIMIT
    )
    assert (status, body["code"]) == (401, "not_enrolled")
    assert sent < 8 * LIMIT  # answered while the body was still arriving
    status, body, sent = _stream_until_answered(
        scene.url, _chunked_head("/v1/enroll", "Authorization: Bearer stolen"), most=8 * LIMIT
    )
    assert (status, body["code"]) == (403, "not_enrolled") and sent < 8 * LIMIT
    assert scene.region.enrolled() == before


def test_a_streamed_body_past_the_limit_is_refused_on_every_body_route(scene: Scene) -> None:
    paths = ["/v1/enroll", f"/v1/rounds/{scene.region.spec.round_id}/deltas",
             "/v1/pseudonyms/p/erasure"]  # fmt: skip
    for path in paths:
        head = _chunked_head(path, f"Authorization: Bearer {TOKEN}", "Idempotency-Key: " + "k" * 20)
        status, body, sent = _stream_until_answered(scene.url, head, most=8 * LIMIT)
        assert (status, body["code"]) == (413, "too_large"), path
        assert sent < 8 * LIMIT, path


# -- 6: the declared content type --------------------------------------------------------------

WRONG_TYPES = [None, "text/plain", "application/x-www-form-urlencoded",
               "multipart/form-data; boundary=x", "application/json; charset=latin-1",
               "application/jsonp"]  # fmt: skip


def _typed(content_type: str | None) -> dict[str, str]:
    return {} if content_type is None else {"Content-Type": content_type}


@pytest.mark.parametrize("content_type", WRONG_TYPES)
def test_a_body_not_declared_json_is_refused_with_415_and_decides_nothing(
    scene: Scene, content_type: str | None
) -> None:
    region = scene.region
    sealed = scene.sealed(1000 + WRONG_TYPES.index(content_type))
    row, logged = region.round_row(), scene.log_size()
    url = f"{scene.url}/v1/rounds/{sealed.round_id}/deltas"
    answer = scene.client.post(url, content=sealed.to_wire(),
                               headers={"Idempotency-Key": sealed.idempotency_key}
                               | _typed(content_type))  # fmt: skip
    assert (answer.status_code, answer.json()["code"]) == (415, "unsupported_media_type")
    assert answer.json()["message"]
    key = b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    body = json.dumps({"protocol": 1, "device_key": key, "period": period_label(region.spec)})
    enrolled = region.enrolled()
    token = {"Authorization": f"Bearer {TOKEN}"}
    answer = scene.client.post(f"{scene.url}/v1/enroll", content=body,
                               headers=token | _typed(content_type))  # fmt: skip
    assert (answer.status_code, answer.json()["code"]) == (415, "unsupported_media_type")
    # Credentials come first: without a token the answer is 401, whatever the type.
    answer = scene.client.post(f"{scene.url}/v1/enroll", content=body,
                               headers=_typed(content_type))  # fmt: skip
    assert (answer.status_code, answer.json()["code"]) == (401, "not_enrolled")
    answer = scene.client.post(f"{scene.url}/v1/pseudonyms/{sealed.pseudonym}/erasure",
                               content=sealed.to_wire(), headers=_typed(content_type))  # fmt: skip
    assert (answer.status_code, answer.json()["code"]) == (415, "unsupported_media_type")
    assert region.round_row() == row and region.enrolled() == enrolled
    assert scene.log_size() == logged + 1  # the token refusal only
    # Declared as JSON (a charset of UTF-8 is fine), the same upload is accepted.
    answer = scene.upload(sealed.to_wire(), sealed.idempotency_key,
                          **{"Content-Type": "application/json; charset=UTF-8"})  # fmt: skip
    assert answer.json() == {"status": "accepted", "code": "within_policy"}


# -- 6: an idempotency key binds to accepted content ---------------------------------------------


def test_a_garbage_first_attempt_does_not_bind_the_idempotency_key(scene: Scene) -> None:
    sealed = scene.sealed(2000)
    key = sealed.idempotency_key
    garbage = scene.upload(b'{"protocol": 1, "region": "eu", "ciph', key)
    assert (garbage.status_code, garbage.json()["code"]) == (400, "malformed")
    cut = json.loads(sealed.to_wire()) | {"ciphertext": sealed.ciphertext[:24]}
    corrupted = scene.upload(json.dumps(cut).encode(), key)
    assert (corrupted.status_code, corrupted.json()["code"]) == (400, "undecryptable")
    again = scene.upload(json.dumps(cut).encode(), key)  # a replay: its answer, not a new one
    assert (again.status_code, again.json()["code"]) == (400, "undecryptable")
    row = scene.region.round_row()
    assert row is not None
    # The device's correct retry under the same key is decided on its merits: accepted.
    retry = scene.upload(sealed.to_wire(), key)
    assert retry.json() == {"status": "accepted", "code": "within_policy"}
    after = scene.region.round_row()
    assert after is not None and after.count == row.count + 1
    assert key in scene.region.accepted_keys()
    # Now the key is bound: the accepted body gets its answer, anything else a 409.
    assert scene.upload(sealed.to_wire(), key).status_code == 200
    late = scene.upload(b'{"protocol": 1}', key)
    assert (late.status_code, late.json()["code"]) == (409, "malformed")
    final = scene.region.round_row()
    assert final is not None and final.count == after.count


# -- 5: keys and periods at enrollment ------------------------------------------------------------

# Encodings of the eight points of small order (RFC 8032 encoding, y and the sign of x),
# non-canonical spellings, and points that are not on the curve.
SMALL_ORDER = {
    "all_zero": "00" * 32,  # y = 0: a point of order 4
    "identity": "01" + "00" * 31,
    "order_2": "ec" + "ff" * 30 + "7f",  # y = -1
    "order_4_negative": "00" * 31 + "80",
    "order_8_a": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "order_8_b": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "order_8_c": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "order_8_d": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "y_equal_to_p": "ed" + "ff" * 30 + "7f",  # y = p: a second spelling of y = 0
    "y_above_p": "ee" + "ff" * 30 + "7f",  # y = p + 1: a second spelling of the identity
    "minus_zero": "01" + "00" * 30 + "80",  # x = 0 with the sign bit set
}
P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P


def _not_on_curve() -> str:
    """The smallest y for which no x satisfies the curve equation (Euler's criterion)."""
    for y in range(2, 100):
        x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
        if pow(x2, (P - 1) // 2, P) == P - 1:
            return y.to_bytes(32, "little").hex()
    raise AssertionError("no such y below 100")


BAD_KEYS = {name: base64.b64encode(bytes.fromhex(raw)).decode()
            for name, raw in SMALL_ORDER.items() | {("not_on_curve", _not_on_curve())}}  # fmt: skip


def _honest_key() -> str:
    return b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw())


def _second_spelling(key: str) -> str:
    """The same 32 bytes in base64, with an unused low bit of the last character set (44
    characters carry 258 bits: the last two are zero in the one canonical spelling)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    spelled = key[:-2] + alphabet[alphabet.index(key[-2]) | 1] + "="
    assert spelled != key and base64.b64decode(spelled) == base64.b64decode(key)
    return spelled


@pytest.mark.parametrize("name", [*sorted(BAD_KEYS), "second_spelling"])
def test_enrollment_refuses_a_key_no_device_could_have_made(scene: Scene, name: str) -> None:
    key = _second_spelling(_honest_key()) if name == "second_spelling" else BAD_KEYS[name]
    before, logged = scene.region.enrolled(), scene.log_size()
    answer = scene.enroll(key, period_label(scene.region.spec))
    assert (answer.status_code, answer.json()["code"]) == (400, "malformed"), answer.text
    assert "device key" in answer.json()["message"]
    assert scene.region.enrolled() == before
    assert scene.log_size() == logged + 1  # the refusal is logged
    with closing(sqlite3.connect(scene.region.path)) as conn:
        (_, last), *_ = reversed(list(DecisionLog(conn).query(action="enroll_device")))
    assert (last.outcome.value, last.reason) == ("deny", "malformed")


def test_enrollment_takes_an_honest_key_for_the_budget_periods_around_now(scene: Scene) -> None:
    spec = scene.region.spec
    length = scene.region.policy.region("eu").privacy.period
    for start in (spec.period_start - length, spec.period_start, spec.period_start + length):
        label = period_label(spec.model_copy(update={"period_start": start}))
        answer = scene.enroll(_honest_key(), label)
        assert answer.json() == {"status": "enrolled"}, (label, answer.text)


BAD_PERIODS = {
    "x": "x",
    "far_future": "9999-12-31",
    "not_a_period_start": "2026-11-01",  # the example policy's periods are 30 days from 1970
    "empty": "",
    "with_a_nul": "2026-11-03\x00",
}


@pytest.mark.parametrize("name", [*sorted(BAD_PERIODS), "long_ago", "two_ahead", "huge"])
def test_enrollment_refuses_a_period_the_policy_does_not_open(scene: Scene, name: str) -> None:
    spec = scene.region.spec
    length = scene.region.policy.region("eu").privacy.period
    shifted = {"long_ago": -10, "two_ahead": 2}
    if name in shifted:
        start = spec.period_start + shifted[name] * length
        period = period_label(spec.model_copy(update={"period_start": start}))
    elif name == "huge":
        period = "2026-11-03" + "9" * (LIMIT - 1000)  # a body just under the limit
    else:
        period = BAD_PERIODS[name]
    before = scene.region.enrolled()
    answer = scene.enroll(_honest_key(), period)
    assert (answer.status_code, answer.json()["code"]) == (400, "malformed"), answer.text
    message = answer.json()["message"]
    assert "period" in message
    assert len(answer.content) < 512  # a short prefix of the field at most, never the field
    if len(period) > 24:
        assert period not in message and period[:40] not in message
    assert scene.region.enrolled() == before


HUGE = "z" * (LIMIT - 1000)
OVERSIZED_FIELDS = {  # a body of nearly 1 MiB, and what the refusal names
    "period": ({"protocol": 1, "device_key": "A" * 43 + "=", "period": HUGE}, "period"),
    "device_key": ({"protocol": 1, "device_key": HUGE, "period": "2026-11-03"}, "device_key"),
    "field_name": ({"protocol": 1, "device_key": "A" * 43 + "=", "period": "x", HUGE: 1},
                   "not permitted"),
    "protocol": ({"protocol": HUGE, "device_key": "A" * 43 + "=", "period": "x"}, "protocol"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OVERSIZED_FIELDS))
def test_an_error_quotes_at_most_a_short_prefix_of_what_was_sent(scene: Scene, name: str) -> None:
    fields, named = OVERSIZED_FIELDS[name]
    body = json.dumps(fields).encode()
    assert len(body) <= LIMIT
    answer = scene.client.post(f"{scene.url}/v1/enroll", content=body, headers=AUTH)
    assert (answer.status_code, answer.json()["code"]) == (400, "malformed"), answer.text[:200]
    assert len(answer.content) < 512 and "z" * 40 not in answer.text
    assert named in answer.json()["message"]


def test_a_refusal_does_not_say_which_period_a_key_is_enrolled_for(scene: Scene) -> None:
    spec = scene.region.spec
    length = scene.region.policy.region("eu").privacy.period
    key = _honest_key()
    now = period_label(spec)
    nxt = period_label(spec.model_copy(update={"period_start": spec.period_start + length}))
    assert scene.enroll(key, now).json() == {"status": "enrolled"}
    moved = scene.enroll(key, nxt)
    assert (moved.status_code, moved.json()["code"]) == (400, "malformed")
    message = moved.json()["message"]
    assert now not in message and nxt not in message
    assert not re.search(r"\d{4}-\d{2}-\d{2}", message), message
    assert scene.enroll(key, now).json() == {"status": "enrolled"}  # the same again: harmless


# -- 5: junk cannot grow the decision log without bound --------------------------------------------


def _service_config(region: Region, limit: RefusalLimit) -> ServiceConfig:
    return region.service_config(refusal_limit=limit)


def test_junk_grows_the_log_by_a_bounded_number_of_counted_entries(tmp_path: Path) -> None:
    region = Region(tmp_path / "aggregator.db")
    with closing(sqlite3.connect(region.path)) as conn:
        start = DecisionLog(conn).size
    junk: list[tuple[int, str]] = []
    # Ten refusals from one source are logged one by one, and no more (no refill here).
    limit = RefusalLimit(per_source=10, per_source_per_minute=0, total=1000)
    app = build_app(_service_config(region, limit))
    with serve(app) as url, httpx.Client(timeout=10) as client:
        path = f"{url}/v1/rounds/{region.spec.round_id}/deltas"
        for n in range(150):  # fresh keys: nothing is a replay
            key = f"junk-upload-{n:08d}"
            answer = client.post(path, content=b'{"protocol": 1, "n": %d}' % n,
                                 headers=JSON_BODY | {"Idempotency-Key": key})  # fmt: skip
            junk.append((answer.status_code, answer.json()["code"]))
        for n in range(100):
            answer = client.post(f"{url}/v1/enroll", json={"protocol": 1, "n": n},
                                 headers={"Authorization": f"Bearer guess-{n}"})  # fmt: skip
            junk.append((answer.status_code, answer.json()["code"]))
        for name in sorted(BAD_KEYS):
            answer = client.post(f"{url}/v1/enroll", headers=AUTH, json={
                "protocol": 1, "device_key": BAD_KEYS[name], "period": "2026-11-03"})  # fmt: skip
            junk.append((answer.status_code, answer.json()["code"]))
        # An honest device still enrolls and contributes, its decisions logged one by one.
        device = Device()
        device.enroll(client, url, region.spec)
        sealed = device.seal(region.spec, small(1), region.keys.hpke.public_key())
        headers = JSON_BODY | {"Idempotency-Key": sealed.idempotency_key}
        honest = client.post(path, content=sealed.to_wire(), headers=headers)
        assert honest.json() == {"status": "accepted", "code": "within_policy"}
    # Every junk request got its own answer, as it would have without the bound.
    assert set(junk[:150]) == {(400, "malformed")}
    assert set(junk[150:250]) == {(403, "not_enrolled")}
    assert set(junk[250:]) == {(400, "malformed")}
    with closing(sqlite3.connect(region.path)) as conn:
        log = DecisionLog(conn)
        added = [decision for _, decision in log.query()][start:]
        report = log.verify(verifier_key=log.verifier_key)
    assert report.ok, report.problems
    one_by_one = [d for d in added if d.outcome.value == "deny" and "refusals" not in d.metrics]
    counted = [d for d in added if "refusals" in d.metrics]
    assert len(one_by_one) == limit.per_source  # then only counted
    assert len(counted) <= 3  # one per (action, reason), flushed when the service stopped
    assert len(one_by_one) + sum(int(d.metrics["refusals"]) for d in counted) == len(junk)
    kinds = {(d.action.value, d.reason) for d in counted}
    assert kinds <= {("accept_delta", "malformed"), ("enroll_device", "not_enrolled"),
                     ("enroll_device", "malformed")}  # fmt: skip
    allowed = [(d.action.value, d.reason) for d in added if d.outcome.value == "allow"]
    assert allowed == [("enroll_device", "within_policy"), ("accept_delta", "within_policy")]


# -- 8: the OpenAPI document and the docs pages -------------------------------------------------


def _unused() -> RegionAggregator:
    raise AssertionError("the app is only asked for its OpenAPI document here")


def test_the_openapi_document_has_no_validation_422_and_lists_the_body_refusals() -> None:
    document = create_app(_unused, enrollment_tokens=set()).openapi()
    assert "HTTPValidationError" not in json.dumps(document)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert {"408", "413", "500", "503"} <= statuses, (method, path)
            if "requestBody" in operation:
                assert {"400", "415"} <= statuses, (method, path)
            if "422" in statuses:  # only the upload answers 422, for its own codes
                assert path == "/v1/rounds/{round_id}/deltas"
                assert "norm_exceeded" in operation["responses"]["422"]["description"]
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)


def _template(path: str, templates: list[str]) -> str:
    for template in templates:
        if re.fullmatch(re.sub(r"\{[a-z_]+\}", "[^/]+", template), path):
            return template
    raise AssertionError(f"no operation for {path}")


def test_every_answer_to_hostile_requests_is_in_the_openapi_document(scene: Scene) -> None:
    document = scene.client.get(f"{scene.url}/openapi.json").json()
    templates = list(document["paths"])
    sealed = scene.sealed(3000)
    wire, key, round_id = sealed.to_wire(), sealed.idempotency_key, sealed.round_id
    deltas = f"/v1/rounds/{round_id}/deltas"
    erasure = f"/v1/pseudonyms/{sealed.pseudonym}/erasure"
    requests: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("GET", "/v1/round", b"", {}),
        ("GET", "/v1/model/release", b"", {}),
        ("GET", "/v1/health", b"", {}),
        ("GET", "/v1/metrics", b"", {}),
        ("POST", "/v1/enroll", b"{}", JSON_BODY),
        ("POST", "/v1/enroll", b"{}", JSON_BODY | {"Authorization": "Bearer nope"}),
        ("POST", "/v1/enroll", b"{}", AUTH | {"Content-Type": "text/plain"}),
        ("POST", "/v1/enroll", b"[", AUTH),
        ("POST", "/v1/enroll", b'{"protocol": 2, "device_key": "", "period": ""}', AUTH),
        (
            "POST",
            "/v1/enroll",
            json.dumps({"protocol": 1, "device_key": _honest_key(), "period": "x"}).encode(),
            AUTH,
        ),
        ("POST", deltas, wire, {"Content-Type": "text/plain", "Idempotency-Key": key}),
        ("POST", deltas, b"{", JSON_BODY | {"Idempotency-Key": "q" * 20}),
        ("POST", deltas, wire, JSON_BODY),
        ("POST", deltas, wire, JSON_BODY | {"Idempotency-Key": key}),
        ("POST", deltas, wire, JSON_BODY | {"Idempotency-Key": key}),
        ("POST", deltas, b"{}", JSON_BODY | {"Idempotency-Key": key}),
        ("POST", erasure, b"{}", {}),
        ("POST", erasure, wire, JSON_BODY),
        ("POST", erasure, wire, JSON_BODY),
        ("POST", erasure, b"[", JSON_BODY),
    ]
    seen = set()
    for method, path, body, headers in requests:
        answer = scene.client.request(method, f"{scene.url}{path}", content=body, headers=headers)
        documented = document["paths"][_template(path, templates)][method.lower()]["responses"]
        assert str(answer.status_code) in documented, (method, path, answer.status_code)
        seen.add(answer.status_code)
    with closing(_connect(scene.url)) as sock:  # a declared size above the limit, unsent
        sock.sendall(f"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * LIMIT}\r\n"
                     "Content-Type: application/json\r\n\r\n".encode())  # fmt: skip
        status, _ = _read_answer(sock)
    assert status == 413
    assert "413" in document["paths"]["/v1/enroll"]["post"]["responses"]
    assert {200, 400, 401, 403, 404, 409, 415} <= seen, seen


def test_the_docs_pages_are_off_unless_the_operator_turns_them_on(scene: Scene) -> None:
    for page in ("/docs", "/redoc"):
        answer = scene.client.get(f"{scene.url}{page}")
        assert (answer.status_code, answer.json()["code"]) == (404, "not_found"), page
    assert scene.client.get(f"{scene.url}/openapi.json").status_code == 200
    with serve(scene.region.app(docs=True)) as url:
        for page in ("/docs", "/redoc"):
            answer = httpx.get(f"{url}{page}", timeout=10)
            assert answer.status_code == 200 and "text/html" in answer.headers["content-type"]
