"""Attacks on the aggregator service over a real uvicorn on 127.0.0.1, with real sealed deltas.

Every refused upload must come back as its 4xx with the machine-readable code, leave exactly one
matching decision in the aggregator's decision log (``accept_delta``, ``deny``, the code as
reason, the digest of this upload's key and body), and count nothing: the round's count and
running sum are unchanged, and when the round ends at its deadline the release is the base plus
the noised sum of exactly the accepted deltas over the round's fixed expected cohort.

Content ``seal_delta`` would never produce (NaN, norms above the bound, forged signatures,
wrong layouts) is built here by :func:`craft` from the primitives ``docs/protocol.md`` names
(RFC 8785 JSON, Ed25519, HPKE, the plaintext layout), independently of ``sottovoce.sync``'s
sealing code; an honest crafted delta is accepted, which shows the crafting is faithful.
The device side is here too: tampered, replayed and downgraded releases are refused by
``fetch_release`` with typed errors (served at the transport seam).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import rfc8785
from aggregator_helpers import DIM, T0
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from service_helpers import (
    FAST_RETRY,
    MODEL_ID,
    SWEEP_SECONDS,
    TOKEN,
    Device,
    MemoryOutbox,
    Region,
    RoundRow,
    serve,
    small,
)

from sottovoce.sync import (
    AggregatorUnavailable,
    BadSignature,
    DeltaState,
    EnrollmentRefused,
    ModelRelease,
    NonFinite,
    RoundSpec,
    SealedDelta,
    SyncError,
    UnsupportedProtocol,
    WrongModel,
    WrongModelVersion,
    idempotency_key,
    period_label,
    pseudonym,
    sign_release,
    verify_release,
)
from sottovoce.sync.transport import Uploader, enroll, fetch_release

pytest.importorskip("opacus")

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
MAGIC = b"SVD\x01"
LIMIT = 1 << 20  # the service's default body limit


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def region_hpke(region: Region, name: str) -> X25519PublicKey:
    """A region's published HPKE key, as a device reads it from its policy."""
    key = next(k for k in region.policy.region(name).aggregator.public_keys if k.use == "hpke")
    return X25519PublicKey.from_public_bytes(base64.b64decode(key.key))


# -- crafting sealed deltas from the protocol's primitives -----------------------------------


def craft(
    device: Device,
    spec: RoundSpec,
    values: npt.ArrayLike,
    hpke: X25519PublicKey,
    *,
    clipping_norm: float | None = None,
    noise_std: float = 0.0,
    signer: Ed25519PrivateKey | None = None,
    flip_signature: bool = False,
    key: str | None = None,
) -> SealedDelta:
    """A sealed delta with exactly these values and attestations, signed and encrypted as
    docs/protocol.md ("Sealed delta") says, without any of the device's own checks."""
    period = period_label(spec)
    envelope: dict[str, Any] = {
        "protocol": 1,
        "region": spec.region,
        "round_id": spec.round_id,
        "model_version": spec.model_version,
        "pseudonym": pseudonym(device.secret, period),
        "period": period,
        "device_key": device.public_b64,
        "idempotency_key": key or idempotency_key(device.secret, spec=spec, period=period),
    }
    body = np.asarray(values, dtype="<f4").tobytes()
    norm = spec.clipping_norm if clipping_norm is None else clipping_norm
    signed = ("region", "round_id", "model_version", "pseudonym", "period", "idempotency_key")
    statement: dict[str, Any] = {k: envelope[k] for k in signed}
    statement |= {"delta_sha256": hashlib.sha256(body).hexdigest(), "clipping_norm": norm,
                  "noise_std": noise_std}  # fmt: skip
    signature = (signer or device.key).sign(
        b"sottovoce/delta-statement/v1\x00" + rfc8785.dumps(statement)
    )
    if flip_signature:
        signature = bytes([signature[0] ^ 0x01]) + signature[1:]
    plaintext = struct.pack("<4sIdd", MAGIC, len(body) // 4, norm, noise_std) + signature + body
    info = b"sottovoce/sealed-delta/v1\x00" + rfc8785.dumps(envelope)
    sealed = SUITE.encrypt(plaintext, hpke, info=info)
    return SealedDelta.model_validate(envelope | {"enc": b64(sealed[:32]),
                                                  "ciphertext": b64(sealed[32:])})  # fmt: skip


def edit(sealed: SealedDelta, **fields: Any) -> bytes:
    """The wire JSON of ``sealed`` with ``fields`` changed (or added) after sealing."""
    return json.dumps(json.loads(sealed.to_wire()) | fields).encode()


def flip_byte(text: str, index: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index] ^= 0x01
    return b64(bytes(raw))


# -- the service under attack ----------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    body: bytes
    key: str | None  # the Idempotency-Key header (None: not sent)
    round_id: str  # the path's round


def upload_of(sealed: SealedDelta) -> Upload:
    return Upload(sealed.to_wire(), sealed.idempotency_key, sealed.round_id)


class Scene:
    """A region's service with an open round, and what an attacker can do to it over HTTP."""

    def __init__(self, region: Region, url: str, client: httpx.Client) -> None:
        self.region, self.url, self.client = region, url, client
        self.spec = region.spec
        self.hpke = region.keys.hpke.public_key()

    def device(self) -> Device:
        """A device enrolled for the round's period over HTTP (it has not uploaded yet)."""
        device = Device()
        device.enroll(self.client, self.url, self.spec)
        return device

    def honest(self, seed: int, device: Device | None = None) -> SealedDelta:
        return craft(device or self.device(), self.spec, small(seed), self.hpke)

    def post(self, upload: Upload, *, chunked: bool = False) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if upload.key is not None:
            headers["Idempotency-Key"] = upload.key
        body, step = upload.body, 65536
        # An iterator is sent chunked, without a Content-Length: the size is not declared.
        content = iter([body[i : i + step] for i in range(0, len(body), step)]) if chunked else body
        return self.client.post(
            f"{self.url}/v1/rounds/{upload.round_id}/deltas", content=content, headers=headers
        )

    def metrics(self) -> dict[str, float]:
        text = self.client.get(f"{self.url}/v1/metrics").text
        pairs = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        return {name: float(value) for name, value in pairs}


@contextmanager
def scene_of(path: Path, *, sweep_seconds: float | None = None, **options: Any) -> Iterator[Scene]:
    """A region's service; with ``sweep_seconds`` its schedule ends a round past its deadline."""
    region = Region(path, **options)
    with (
        serve(region.app(sweep_seconds=sweep_seconds)) as url,
        httpx.Client(timeout=10) as client,
    ):
        yield Scene(region, url, client)


@dataclass
class Contributed:
    """A scene whose round holds one accepted delta, and the device that sent it."""

    scene: Scene
    device: Device
    first: SealedDelta


@pytest.fixture(scope="module")
def contributed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contributed]:
    # A central round stays open until its deadline, whatever its count, and the clock never
    # gets there: a delta wrongly accepted shows in the count, and the round stays open for
    # the next case.
    path = tmp_path_factory.mktemp("attacks") / "aggregator.db"
    with scene_of(path) as scene:
        device = scene.device()
        first = scene.honest(0, device)
        answer = scene.post(upload_of(first))
        assert answer.status_code == 200, answer.text  # the crafting is faithful
        yield Contributed(scene, device, first)


def expect_refusal(
    scene: Scene, upload: Upload, status: int, code: str, *, bound: bool = True, **post: Any
) -> None:
    """``upload`` is refused with ``status`` and ``code``, decided once in the log, not counted."""
    region = scene.region
    row, log, metrics = region.round_row(), region.decisions(None), scene.metrics()
    answer = scene.post(upload, **post)
    assert answer.status_code == status, answer.text
    problem = answer.json()
    assert set(problem) == {"code", "message"} and problem["message"], problem
    assert problem["code"] == code, problem
    assert region.round_row() == row  # neither the count nor the running sum moved
    new = region.decisions(None)[len(log) :]
    verdicts = [(d.action.value, d.outcome.value, d.reason) for d in new]
    assert verdicts == [("accept_delta", "deny", code)], verdicts
    if bound:  # the entry is about this upload: its key and body
        assert new[0].inputs_digest == region.upload_digest(upload.key or "", upload.body)
    after = scene.metrics()
    refused = f'sottovoce_deltas_refused_total{{code="{code}"}}'
    assert after.get(refused, 0) == metrics.get(refused, 0) + 1
    accepted = "sottovoce_deltas_accepted_total"
    assert after[accepted] == metrics[accepted]


# -- the attacks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    build: Callable[[Contributed], Upload]
    status: int
    code: str
    bound: bool = True  # whether the decision's digest must be that of the upload's key and body


def _spec(c: Contributed, **fields: Any) -> RoundSpec:
    return c.scene.spec.model_copy(update=fields)


def _crafted(c: Contributed, seed: int, **kw: Any) -> Upload:
    scene = c.scene
    return upload_of(craft(scene.device(), scene.spec, small(seed), scene.hpke, **kw))


def _values(seed: int, index: int, value: float) -> npt.NDArray[np.float32]:
    values = small(seed)
    values[index] = value
    return values


def _edited(c: Contributed, seed: int, **fields: Any) -> Upload:
    sealed = c.scene.honest(seed)
    return Upload(edit(sealed, **fields), sealed.idempotency_key, sealed.round_id)


def _wrong_region(c: Contributed) -> Upload:
    # A US device's delta for a US round, sealed to the US key, sent to the EU service.
    us = _spec(c, region="us", round_id="us-20261103T090000Z-1")
    return upload_of(craft(Device(), us, small(1), region_hpke(c.scene.region, "us")))


def _relabelled(c: Contributed) -> Upload:
    scene = c.scene
    return upload_of(craft(scene.device(), _spec(c, region="us"), small(2), scene.hpke))


def _other_period(c: Contributed) -> Upload:
    scene, device = c.scene, Device()
    # The budget period before the round's: a key may be enrolled for it, not used in this round.
    length = scene.region.policy.region("eu").privacy.period
    before = period_label(_spec(c, period_start=scene.spec.period_start - length))
    enroll(scene.client, base_url=scene.url, token=TOKEN, retry=FAST_RETRY,
           device_public_key=device.key.public_key(), period=before)  # fmt: skip
    return upload_of(craft(device, scene.spec, small(4), scene.hpke))


def _other_hpke_key(c: Contributed) -> Upload:
    scene, stranger = c.scene, X25519PrivateKey.generate().public_key()
    return upload_of(craft(scene.device(), scene.spec, small(8), stranger))


def _tampered_ciphertext(c: Contributed) -> Upload:
    sealed = c.scene.honest(7)
    return Upload(edit(sealed, ciphertext=flip_byte(sealed.ciphertext, 40)),
                  sealed.idempotency_key, sealed.round_id)  # fmt: skip


def _cut_ciphertext(c: Contributed) -> Upload:
    sealed = c.scene.honest(9)
    cut = b64(base64.b64decode(sealed.ciphertext)[:16])
    return Upload(edit(sealed, ciphertext=cut), sealed.idempotency_key, sealed.round_id)


def _in_round(c: Contributed, spec: RoundSpec, seed: int) -> Upload:
    scene = c.scene
    return upload_of(craft(scene.device(), spec, small(seed), scene.hpke))


def _above_bound(c: Contributed) -> Upload:
    bound = c.scene.spec.clipping_norm
    return _crafted_values(c, np.full(DIM, 2 * bound / np.sqrt(DIM)))


def _hair_above_bound(c: Contributed) -> Upload:
    bound = c.scene.spec.clipping_norm
    unit = small(13) / np.linalg.norm(small(13).astype(np.float64))
    return _crafted_values(c, unit * bound * (1 + 1e-4))


def _crafted_values(c: Contributed, values: npt.ArrayLike, **kw: Any) -> Upload:
    scene = c.scene
    return upload_of(craft(scene.device(), scene.spec, values, scene.hpke, **kw))


def _second_contribution(c: Contributed) -> Upload:
    scene = c.scene
    return upload_of(craft(c.device, scene.spec, small(15), scene.hpke,
                           key="second-upload-of-device"))  # fmt: skip


def _same_key_other_body(c: Contributed) -> Upload:
    scene = c.scene
    other = craft(c.device, scene.spec, small(16), scene.hpke)
    assert other.idempotency_key == c.first.idempotency_key
    return upload_of(other)


def _other_path(c: Contributed) -> Upload:
    sealed = c.scene.honest(17)
    return Upload(sealed.to_wire(), sealed.idempotency_key, "eu-20261103T090000Z-7")


def _no_key(c: Contributed) -> Upload:
    sealed = c.scene.honest(18)
    return Upload(sealed.to_wire(), None, sealed.round_id)


def _other_key(c: Contributed) -> Upload:
    sealed = c.scene.honest(19)
    return Upload(sealed.to_wire(), "h" * 24, sealed.round_id)


def _raw(body: bytes) -> Callable[[Contributed], Upload]:
    return lambda c: Upload(body, "r" * 20 + hashlib.sha256(body).hexdigest()[:8],
                            c.scene.spec.round_id)  # fmt: skip


ATTACKS = [
    Attack("wrong_region", _wrong_region, 403, "wrong_region"),
    Attack("relabelled_region", _relabelled, 403, "wrong_region"),
    Attack("not_enrolled", lambda c: upload_of(craft(Device(), c.scene.spec, small(3),
                                                     c.scene.hpke)), 403, "not_enrolled"),
    Attack("enrolled_for_another_period", _other_period, 403, "not_enrolled"),
    Attack("forged_signature", lambda c: _crafted(c, 5, signer=Ed25519PrivateKey.generate()),
           400, "bad_signature"),
    Attack("flipped_signature", lambda c: _crafted(c, 6, flip_signature=True),
           400, "bad_signature"),
    Attack("tampered_ciphertext", _tampered_ciphertext, 400, "undecryptable"),
    Attack("cut_ciphertext", _cut_ciphertext, 400, "undecryptable"),
    Attack("sealed_to_another_key", _other_hpke_key, 400, "undecryptable"),
    Attack("zero_encapsulated_key", lambda c: _edited(c, 10, enc=b64(bytes(32))),
           400, "undecryptable"),
    Attack("envelope_edited", lambda c: _edited(c, 11, pseudonym="0" * 64), 400, "undecryptable"),
    Attack("unknown_round", lambda c: _in_round(c, _spec(c, round_id="eu-20261103T090000Z-99"),
                                                12), 410, "round_closed"),
    Attack("wrong_model_version", lambda c: _in_round(
        c, _spec(c, model_version=c.scene.spec.model_version + 1), 13), 422,
        "wrong_model_version"),
    Attack("nan", lambda c: _crafted_values(c, _values(20, 3, np.nan)), 422, "non_finite"),
    Attack("infinity", lambda c: _crafted_values(c, _values(21, 0, -np.inf)), 422, "non_finite"),
    Attack("norm_above_bound", _above_bound, 422, "norm_exceeded"),
    Attack("norm_a_hair_above_bound", _hair_above_bound, 422, "norm_exceeded"),
    Attack("attested_norm_above_bound", lambda c: _crafted_values(
        c, small(22), clipping_norm=10 * c.scene.spec.clipping_norm), 422, "norm_exceeded"),
    Attack("wrong_dimension", lambda c: _crafted_values(c, np.append(small(23), 0.1)),
           400, "malformed"),
    Attack("attested_noise_not_the_rounds", lambda c: _crafted_values(c, small(24),
                                                                       noise_std=0.5),
           400, "malformed"),
    Attack("second_contribution", _second_contribution, 409, "duplicate_contribution"),
    Attack("same_key_other_body", _same_key_other_body, 409, "malformed"),
    # Refused before the aggregator decides: what its decision would bind is the fix's choice.
    Attack("path_round_differs", _other_path, 400, "malformed", bound=False),
    Attack("missing_idempotency_key", _no_key, 400, "malformed"),
    Attack("idempotency_key_differs", _other_key, 400, "malformed"),
    Attack("unknown_field", lambda c: _edited(c, 25, user_id="user-1"), 400, "malformed"),
    Attack("unsupported_protocol", lambda c: _edited(c, 26, protocol=2), 400,
           "unsupported_protocol"),
    Attack("malformed_json", _raw(b'{"protocol": 1, "region": "eu", '), 400, "malformed"),
    Attack("not_an_object", _raw(b"[1, 2, 3]"), 400, "malformed"),
    Attack("invalid_utf8", _raw(b'{"protocol": 1, "region": "\xff\xfe"}'), 400, "malformed"),
    Attack("deeply_nested_json", _raw(b"[" * 100_000 + b"]" * 100_000), 400, "malformed"),
]  # fmt: skip


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_a_refused_upload_is_coded_logged_and_counts_nothing(
    contributed: Contributed, attack: Attack
) -> None:
    scene = contributed.scene
    upload = attack.build(contributed)
    expect_refusal(scene, upload, attack.status, attack.code, bound=attack.bound)
    # Sent again: the same answer, and still nothing counted.
    row = scene.region.round_row()
    again = scene.post(upload)
    assert (again.status_code, again.json()["code"]) == (attack.status, attack.code)
    assert scene.region.round_row() == row


def test_a_replayed_upload_gets_its_first_answer_and_counts_once(
    contributed: Contributed,
) -> None:
    scene = contributed.scene
    row, log = scene.region.round_row(), scene.region.decisions(None)
    assert row is not None and row.count == 1
    for _ in range(3):
        answer = scene.post(upload_of(contributed.first))
        assert answer.status_code == 200
        assert answer.json() == {"status": "accepted", "code": "within_policy"}
    assert scene.region.round_row() == row
    assert scene.region.decisions(None) == log  # the first answer, not a new decision


AUTHORIZATIONS = [
    (None, 401),
    ("Bearer not-the-token", 403),
    (f"Bearer {TOKEN}-and-more", 403),
    (f"Bearer {TOKEN[:-1]}", 403),
    ("Bearer", 401),
    (f"Basic {b64(TOKEN.encode())}", 401),
    (TOKEN, 401),
]


@pytest.mark.parametrize(("authorization", "status"), AUTHORIZATIONS)
def test_enrollment_without_a_valid_token_enrolls_nothing(
    contributed: Contributed, authorization: str | None, status: int
) -> None:
    scene, device = contributed.scene, Device()
    before = scene.region.enrolled()
    body = rfc8785.dumps({"protocol": 1, "device_key": device.public_b64,
                          "period": period_label(scene.spec)})  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    answer = scene.client.post(f"{scene.url}/v1/enroll", content=body, headers=headers)
    assert (answer.status_code, answer.json()["code"]) == (status, "not_enrolled")
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert scene.region.enrolled() == before
    # The device's delta is then refused like any unenrolled device's.
    sealed = craft(device, scene.spec, small(30), scene.hpke)
    expect_refusal(scene, upload_of(sealed), 403, "not_enrolled")


def test_the_device_transport_reports_a_refused_enrollment(contributed: Contributed) -> None:
    scene = contributed.scene
    with pytest.raises(EnrollmentRefused) as refused:
        Device().enroll(scene.client, scene.url, scene.spec, token="not-the-token")
    assert refused.value.code == "not_enrolled" and refused.value.reason == "not_enrolled"


# -- size --------------------------------------------------------------------------------------


def _padded(c: Contributed, size: int) -> Upload:
    """An honest device's sealed delta whose ciphertext is padded to a body of about ``size``."""
    sealed = c.scene.honest(40)
    overhead = len(edit(sealed, ciphertext=""))
    raw = np.random.default_rng(0).bytes((size - overhead) * 3 // 4)
    return Upload(edit(sealed, ciphertext=b64(raw)), sealed.idempotency_key, sealed.round_id)


def test_an_oversized_upload_is_refused_unread(contributed: Contributed) -> None:
    """Bodies above the service's limit (1 MiB by default) are refused with 413 ``too_large``,
    whether the size is declared (Content-Length) or not (chunked)."""
    scene = contributed.scene
    big = _padded(contributed, LIMIT + 64 * 1024)
    assert len(big.body) > LIMIT
    expect_refusal(scene, big, 413, "too_large", bound=False)
    bigger = _padded(contributed, 3 * LIMIT)
    expect_refusal(scene, bigger, 413, "too_large", bound=False, chunked=True)
    # Just under the limit the body is read and decided on its content.
    under = _padded(contributed, LIMIT - 1024)
    assert len(under.body) <= LIMIT
    expect_refusal(scene, under, 400, "undecryptable")


# -- a whole round under attack ----------------------------------------------------------------


def test_under_attack_the_release_is_the_noised_sum_of_exactly_the_accepted_deltas(
    tmp_path: Path,
) -> None:
    with scene_of(tmp_path / "aggregator.db", sweep_seconds=SWEEP_SECONDS) as scene:
        assert scene.spec.min_cohort == 3
        device = scene.device()
        accepted = [small(100)]
        first = craft(device, scene.spec, accepted[0], scene.hpke)
        assert scene.post(upload_of(first)).status_code == 200
        c = Contributed(scene, device, first)
        for attack in ATTACKS:
            # Each attack's code and log entry are the test above's; here only that it is
            # refused and leaves the round as it was.
            answer = scene.post(attack.build(c))
            assert answer.status_code != 200 and "accepted" not in answer.text, attack.name
            row = scene.region.round_row()
            assert row is not None and (row.state, row.count) == ("open", 1), attack.name
        # The rest of the cohort, and one more, seal with the device's real code.
        for seed in (101, 102, 103):
            accepted.append(small(seed))
            sealed = scene.device().seal(scene.spec, accepted[-1], scene.hpke)
            answer = scene.post(upload_of(sealed))
            assert answer.json() == {"status": "accepted", "code": "within_policy"}
        row = scene.region.round_row()
        assert row is not None and (row.state, row.count) == ("open", 4)  # until the deadline
        assert scene.region.end_round() == RoundRow("published", 4, None)
        release = scene.region.latest_release()
        assert release is not None and release.version == 1
        weights = verify_release(release, scene.region.keys.signing.public_key())
        np.testing.assert_allclose(
            weights, scene.region.expected_release(accepted), rtol=0, atol=1e-6
        )
        reasons = [d.reason for d in scene.region.decisions()]
        assert reasons.count("within_policy") == len(accepted)
        published = [d.reason for d in scene.region.decisions("publish_release")]
        assert published == ["deadline_reached"]
        report = scene.region.verify_log()
        assert report.ok, report.problems


def _publish(scene: Scene) -> list[SealedDelta]:
    """The minimum cohort's deltas, then the deadline: the service's schedule publishes."""
    sent = []
    for seed in range(scene.spec.min_cohort):
        sent.append(scene.honest(200 + seed))
        assert scene.post(upload_of(sent[-1])).status_code == 200
    row = scene.region.end_round()
    assert (row.state, row.count) == ("published", len(sent))
    return sent


def test_a_published_round_takes_nothing_more(tmp_path: Path) -> None:
    with scene_of(tmp_path / "aggregator.db", sweep_seconds=SWEEP_SECONDS) as scene:
        sent = _publish(scene)
        release = scene.region.latest_release()
        assert release is not None
        np.testing.assert_allclose(
            release.weights_array(),
            scene.region.expected_release([small(200 + i) for i in range(len(sent))]),
            rtol=0,
            atol=1e-6,
        )
        late = scene.honest(300)
        expect_refusal(scene, upload_of(late), 410, "round_closed")
        # Through the device's own uploader (whose clock says there is time left), the delta
        # is dropped with the aggregator's reason.
        later = scene.honest(301)
        outbox = MemoryOutbox()
        outbox.add(later, scene.spec.deadline)
        Uploader(scene.client, base_url=scene.url, outbox=outbox, retry=FAST_RETRY,
                 clock=lambda: scene.spec.deadline - timedelta(hours=1)).run_once()  # fmt: skip
        assert outbox.states == {later.idempotency_key: (DeltaState.DROPPED, "round_closed")}
        # An accepted delta replayed after publication: its first answer, counted once.
        log = scene.region.decisions(None)
        answer = scene.post(upload_of(sent[0]))
        assert answer.json() == {"status": "accepted", "code": "within_policy"}
        assert scene.region.decisions(None) == log
        row = scene.region.round_row()
        assert row is not None and (row.state, row.count) == ("published", len(sent))
        assert scene.region.latest_release() == release
        # A device pinned to another region's key refuses the real release.
        us_key = next(k.key for k in scene.region.policy.region("us").aggregator.public_keys
                      if k.use == "signing")  # fmt: skip
        with pytest.raises(BadSignature):
            fetch_release(scene.client, base_url=scene.url, verify_key=us_key,
                          model_id=MODEL_ID, current_version=0, retry=FAST_RETRY)  # fmt: skip


def test_a_round_past_its_deadline_takes_nothing(tmp_path: Path) -> None:
    with scene_of(tmp_path / "aggregator.db") as scene:  # no schedule: nothing sweeps
        sealed = scene.honest(400)
        scene.region.clock.now = scene.spec.deadline  # the service's aggregator reads this clock
        expect_refusal(scene, upload_of(sealed), 410, "round_closed")
        assert scene.region.latest_release() is None
        # The operator's sweep then publishes the round without it: noise alone, whatever the
        # count (here none), over the same fixed divisor.
        assert scene.region.sweep() == [scene.spec.round_id]
        row = scene.region.round_row()
        assert row is not None and (row.state, row.count, row.partial) == ("published", 0, None)
        release = scene.region.latest_release()
        assert release is not None and release.version == 1
        np.testing.assert_allclose(release.weights_array(), scene.region.expected_release([]),
                                   rtol=0, atol=1e-6)  # fmt: skip


# -- releases, on the device -------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _release(key: Ed25519PrivateKey, *, version: int = 2, model_id: str = MODEL_ID) -> ModelRelease:
    return sign_release(model_id=model_id, version=version, weights=small(500),
                        created=T0, signing_key=key, kid="eu-sign-2026-11")  # fmt: skip


def _resigned(release: ModelRelease, key: Ed25519PrivateKey, **fields: Any) -> bytes:
    """``release`` with ``fields`` changed and signed again by ``key``, as docs/protocol.md
    ("Model release") says: Ed25519 over the tag and the JCS of every other field."""
    data = json.loads(release.to_wire()) | fields
    data.pop("signature")
    data["signature"] = b64(key.sign(b"sottovoce/model-release/v1\x00" + rfc8785.dumps(data)))
    return json.dumps(data).encode()


def _edited_release(release: ModelRelease, **fields: Any) -> bytes:
    return json.dumps(json.loads(release.to_wire()) | fields).encode()


NAN_WEIGHTS = b64(np.full(DIM, np.nan, dtype="<f4").tobytes())


@dataclass(frozen=True)
class BadRelease:
    name: str
    body: Callable[[Ed25519PrivateKey], bytes]  # what the aggregator's address serves
    current: int  # the version the device runs
    error: type[SyncError]


BAD_RELEASES = [
    BadRelease("weights_changed", lambda k: _edited_release(
        _release(k), weights=b64(bytes(4 * DIM))), 1, BadSignature),
    BadRelease("signature_flipped", lambda k: _edited_release(
        _release(k), signature=flip_byte(_release(k).signature, 0)), 1, BadSignature),
    BadRelease("signed_by_another_key",
               lambda k: _release(Ed25519PrivateKey.generate()).to_wire(), 1, BadSignature),
    BadRelease("version_bumped_unsigned",
               lambda k: _edited_release(_release(k), version=9), 1, BadSignature),
    BadRelease("older_version", lambda k: _release(k, version=1).to_wire(), 2, WrongModelVersion),
    BadRelease("replayed_version", lambda k: _release(k, version=2).to_wire(), 2,
               WrongModelVersion),
    BadRelease("other_model", lambda k: _release(k, model_id="ef" * 32).to_wire(), 1, WrongModel),
    BadRelease("non_finite_weights", lambda k: _resigned(_release(k), k, weights=NAN_WEIGHTS),
               1, NonFinite),
    BadRelease("other_protocol", lambda k: _resigned(_release(k), k, protocol=2), 1,
               UnsupportedProtocol),
    # Not a JSON object, so no answer (docs/protocol.md, "HTTP"): never a crash of the device.
    BadRelease("deeply_nested_json", lambda k: b"[" * 5000 + b"]" * 5000, 1,
               AggregatorUnavailable),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_RELEASES, ids=lambda b: b.name)
def test_the_device_refuses_a_bad_release(signing_key: Ed25519PrivateKey, bad: BadRelease) -> None:
    body = bad.body(signing_key)
    served: list[str] = []

    def aggregator(request: httpx.Request) -> httpx.Response:
        served.append(request.url.path)
        headers = {"ETag": '"r"', "Content-Type": "application/json"}
        return httpx.Response(200, content=body, headers=headers)

    client = httpx.Client(transport=httpx.MockTransport(aggregator))
    with client, pytest.raises(bad.error) as refused:
        fetch_release(client, base_url="http://eu.test", verify_key=signing_key.public_key(),
                      model_id=MODEL_ID, current_version=bad.current, retry=FAST_RETRY)  # fmt: skip
    assert type(refused.value) is bad.error and refused.value.code == bad.error.code
    assert served and set(served) == {"/v1/model/release"}
    if bad.error is BadSignature:
        with pytest.raises(BadSignature):
            verify_release(ModelRelease.from_wire(body), signing_key.public_key())
    # The same key's honest, newer release is taken: the refusal was about the tampering.
    honest = _release(signing_key, version=bad.current + 1).to_wire()
    served.clear()
    body = honest
    with httpx.Client(transport=httpx.MockTransport(aggregator)) as client:
        fetched = fetch_release(client, base_url="http://eu.test", retry=FAST_RETRY,
                                verify_key=signing_key.public_key(), model_id=MODEL_ID,
                                current_version=bad.current)  # fmt: skip
    assert fetched is not None and fetched.release.version == bad.current + 1


def test_a_hostile_answer_to_an_upload_leaves_the_delta_pending() -> None:
    """An answer that is not a JSON object counts as no answer: the delta stays in the outbox
    to be sent again later, and the uploader does not crash."""
    device = Device()
    region_spec = RoundSpec.model_validate({
        "round_id": "eu-20261103T090000Z-1", "region": "eu", "model_id": MODEL_ID,
        "model_version": 0, "mode": "central", "clipping_norm": 1.0, "noise_multiplier": 1.0,
        "sampling_rate": 0.01, "min_cohort": 3, "expected_cohort": 5.0,
        "deadline": T0 + timedelta(hours=6),
        "epsilon_spent": 0.0, "epsilon_after": 1.0, "delta": 1e-6,
        "period_start": T0 - timedelta(days=2),
    })  # fmt: skip
    sealed = device.seal(region_spec, small(600), X25519PrivateKey.generate().public_key())
    answers = [b"<html>accepted</html>", b"[" * 5000 + b"]" * 5000, b'"accepted"']
    for answer in answers:
        outbox = MemoryOutbox()
        outbox.add(sealed, region_spec.deadline)
        transport = httpx.MockTransport(lambda _, body=answer: httpx.Response(200, content=body))
        with httpx.Client(transport=transport) as client:
            report = Uploader(client, base_url="http://eu.test", outbox=outbox,
                              clock=lambda: T0, retry=FAST_RETRY).run_once()  # fmt: skip
        assert (report.acknowledged, report.retried) == (0, 1), answer[:20]
        assert outbox.pending() == [sealed.idempotency_key]
