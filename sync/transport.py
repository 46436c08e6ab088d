"""HTTP transport of sync: the one module of sottovoce that does network I/O (with httpx).

Data flow position: :func:`fetch_round` polls the region's open round and checks its signed
spec; :func:`enroll` registers the device's per-period key; the device's outbox
(:mod:`._outbox`) holds sealed deltas, and an :class:`Uploader` posts what is due to the region's
aggregator and records each outcome the pure :func:`~._outbox.decide` picks; :func:`fetch_release`
downloads a signed model release conditionally (ETag) and checks it. ``docs/protocol.md``
("HTTP") documents the endpoints, ``docs/device.md`` the device's side end to end.

Every call takes ``base_url``: the region's ``aggregator.endpoint`` from the policy, which is the
service's root URL (``https://eu.example.org``, or a path prefix behind a proxy). The API's
paths, ``/v1/...``, are added here, by :func:`api_url`; a base URL that already ends in ``/v1``
is refused with :class:`BadEndpoint` rather than turned into ``/v1/v1/...``.

Within one call, transient failures (no connection, timeouts, dropped or truncated responses,
bodies that are not JSON, 5xx, 429) are retried a few times with exponential backoff and full
jitter (tenacity), waiting as long as a short ``Retry-After`` asks. What is still failing after
that is left to the outbox, which tries again later: nothing here waits for long.

What an answer means, the URLs and the retry loop are pure code in :mod:`._exchange`; this
module only sends. The errors met here (defined in :mod:`._errors`)::

    SyncError
    ├── WrongModel              wrong_model             a release for another model file
    ├── EnrollmentRefused       not_enrolled            the aggregator refused the enrollment
    ├── AggregatorUnavailable   aggregator_unavailable  no usable answer after the retries
    └── BadEndpoint             bad_endpoint            a base URL that is not a service's root
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from sottovoce._clock import Clock, system_clock
from sottovoce.policy._canonical import canonical_json
from sottovoce.sync._errors import (
    AggregatorUnavailable,
    BadEndpoint,
    EnrollmentRefused,
    WrongModel,
    WrongModelVersion,
)
from sottovoce.sync._exchange import (
    DEFAULT_RETRY,
    Reply,
    RetryPolicy,
    Sleep,
    api_url,
    reply_of,
    unavailable,
    with_retries,
)
from sottovoce.sync._outbox import Acknowledged, Drop, Outbox, OutboxItem, RetryAt, decide
from sottovoce.sync._sign import (
    SigningPublicKey,
    signing_public_key,
    verify_release,
    verify_round_spec,
)
from sottovoce.sync._wire import (
    PROTOCOL_VERSION,
    ModelRelease,
    RoundSpec,
    SealedDelta,
    SignedRoundSpec,
    b64encode,
)

__all__ = [
    "BadEndpoint",
    "Fetched",
    "RetryPolicy",
    "UploadReport",
    "Uploader",
    "api_url",
    "enroll",
    "fetch_release",
    "fetch_round",
    "retract",
]


@dataclass(frozen=True)
class UploadReport:
    """What one :meth:`Uploader.run_once` did with the due deltas."""

    acknowledged: int = 0
    retried: int = 0  # answered but not accepted yet (5xx, 429, truncated): pending, later
    dropped: int = 0
    offline: int = 0  # not reached (connection failed): pending, later


@dataclass(frozen=True)
class Fetched:
    """A checked model release and the ETag to send next time."""

    release: ModelRelease
    etag: str | None


def _attempt(send: Callable[[], httpx.Response], clock: Clock) -> Reply:
    """One try: the answer as :func:`reply_of` reads it, or no answer at all."""
    try:
        response = send()
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return Reply(status=None, unreachable=True)
    except httpx.TransportError:  # read timeouts, dropped connections, truncated bodies
        return Reply(status=None)
    return reply_of(response.status_code, response.content, now=clock(),
                    retry_after=response.headers.get("Retry-After"),
                    etag=response.headers.get("ETag"))  # fmt: skip


def _call(
    send: Callable[[], httpx.Response], policy: RetryPolicy, sleep: Sleep, clock: Clock
) -> Reply:
    return with_retries(lambda: _attempt(send, clock), policy, sleep)


class Uploader:
    """Posts the outbox's due deltas to ``{base_url}/v1/rounds/{round_id}/deltas``.

    Raises :class:`BadEndpoint` at once for a ``base_url`` that is not a service's root."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        base_url: str,
        outbox: Outbox,
        clock: Clock = system_clock,
        retry: RetryPolicy = DEFAULT_RETRY,
        sleep: Sleep = time.sleep,
    ) -> None:
        self._client = client
        self._base_url = base_url
        api_url(base_url, "/v1/rounds")  # a wrong endpoint fails here, not on every upload
        self._outbox = outbox
        self._clock = clock
        self._retry = retry
        self._sleep = sleep

    def run_once(self, limit: int = 100) -> UploadReport:
        """Send up to ``limit`` due deltas and record every outcome in the outbox.

        The run stops early when the aggregator cannot be reached, or asks to wait longer than
        :attr:`RetryPolicy.max_retry_after`: the deltas not sent are put off as the one that
        was, instead of failing one by one.
        """
        items = self._outbox.due(now=self._clock(), limit=limit)
        counts = dict.fromkeys(("acknowledged", "retried", "dropped", "offline"), 0)
        for index, item in enumerate(items):
            reply = self._send(item)
            counts[self._record(item, reply, code=reply.code)] += 1
            if reply.unreachable or reply.waits_too_long(self._retry):
                for rest in items[index + 1 :]:
                    counts[self._record(rest, reply, code=None)] += 1
                break
        return UploadReport(**counts)

    def _send(self, item: OutboxItem) -> Reply:
        def send() -> httpx.Response:
            return self._client.post(
                api_url(self._base_url, f"/v1/rounds/{item.round_id}/deltas"),
                content=item.body,
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": item.idempotency_key,
                },
            )

        return _call(send, self._retry, self._sleep, self._clock)

    def _record(self, item: OutboxItem, reply: Reply, *, code: str | None) -> str:
        """Apply :func:`decide` to the outbox; returns the report field to count."""
        now = self._clock()
        outcome = decide(
            item, now=now, status=reply.status, code=code, retry_after=reply.retry_after
        )
        match outcome:
            case Acknowledged():
                self._outbox.acknowledge(item.idempotency_key, now=now)
                return "acknowledged"
            case Drop(reason=reason):
                self._outbox.drop(item.idempotency_key, reason=reason, now=now)
                return "dropped"
            case RetryAt(at=at):
                self._outbox.attempted(item.idempotency_key, now=now, retry_at=at)
                return "offline" if reply.unreachable else "retried"


def fetch_round(
    client: httpx.Client,
    *,
    base_url: str,
    verify_key: SigningPublicKey,
    retry: RetryPolicy = DEFAULT_RETRY,
    sleep: Sleep = time.sleep,
    clock: Clock = system_clock,
) -> RoundSpec | None:
    """The region's open round, its signature checked with the region's pinned ``verify_key``;
    ``None`` when no round is open (404 ``no_open_round``: poll again later).

    Raises ``BadSignature`` for a spec the region's key did not sign, ``Malformed`` or
    ``UnsupportedProtocol`` for an answer that is not a spec of this protocol, and
    :class:`AggregatorUnavailable` when there is no usable answer (a 404 without the service's
    code means the URL is not the service's). The spec is not yet checked against the device's
    own policy and privacy ledger: taking part does that (``check_spec``, ``check_budget``).
    """
    url = api_url(base_url, "/v1/round")
    headers = {"Accept": "application/json"}
    reply = _call(lambda: client.get(url, headers=headers), retry, sleep, clock)
    if reply.status == 404 and reply.code == "no_open_round":
        return None
    if reply.status != 200 or reply.body is None:
        raise unavailable("round", reply)
    return verify_round_spec(SignedRoundSpec.from_wire(reply.body), verify_key)


def fetch_release(
    client: httpx.Client,
    *,
    base_url: str,
    etag: str | None = None,
    verify_key: SigningPublicKey,
    model_id: str,
    current_version: int,
    retry: RetryPolicy = DEFAULT_RETRY,
    sleep: Sleep = time.sleep,
    clock: Clock = system_clock,
) -> Fetched | None:
    """The aggregator's newest release, checked; ``None`` if unchanged since ``etag``.

    Raises what :func:`verify_release` raises (``BadSignature``, ``NonFinite``, ...),
    :class:`WrongModel` for another model file, :class:`WrongModelVersion` for a release that
    is not newer than ``current_version`` (no downgrade, no replay), and
    :class:`AggregatorUnavailable` when there is no usable answer.
    """
    headers = {"Accept": "application/json"}
    if etag is not None:
        headers["If-None-Match"] = etag
    url = api_url(base_url, "/v1/model/release")
    reply = _call(lambda: client.get(url, headers=headers), retry, sleep, clock)
    if reply.status == 304:
        return None
    if reply.status != 200 or reply.body is None:
        raise unavailable("model release", reply)
    release = ModelRelease.from_wire(reply.body)
    verify_release(release, verify_key)
    if release.model_id != model_id:
        raise WrongModel(
            f"release {release.version} is for model {release.model_id[:12]}, not the local "
            f"model {model_id[:12]}"
        )
    if release.version <= current_version:
        raise WrongModelVersion(
            f"release {release.version} is not newer than the version in use ({current_version})"
        )
    return Fetched(release, reply.etag)


def enroll(
    client: httpx.Client,
    *,
    base_url: str,
    token: str,
    device_public_key: SigningPublicKey,
    period: str,
    retry: RetryPolicy = DEFAULT_RETRY,
    sleep: Sleep = time.sleep,
    clock: Clock = system_clock,
) -> None:
    """Register the device's Ed25519 key for ``period`` with its region's aggregator.

    ``token`` is the enrollment token the app obtained; enrolling the same key again is
    harmless, so the call is retried like an upload. Raises :class:`EnrollmentRefused` when the
    aggregator says no, :class:`AggregatorUnavailable` when it does not answer.
    """
    key = signing_public_key(device_public_key).public_bytes_raw()
    body = canonical_json({"protocol": PROTOCOL_VERSION, "device_key": b64encode(key),
                           "period": period})  # fmt: skip
    url = api_url(base_url, "/v1/enroll")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    reply = _call(lambda: client.post(url, content=body, headers=headers), retry, sleep, clock)
    if reply.status is not None and 200 <= reply.status < 300:
        return
    if reply.transient:
        raise unavailable("enrollment", reply)
    raise EnrollmentRefused(
        f"the aggregator refused to enroll the device key for period {period!r} "
        f"(HTTP {reply.status}{', ' + reply.code if reply.code else ''})",
        reason=reply.code,
    )


def retract(
    client: httpx.Client,
    *,
    base_url: str,
    sealed: SealedDelta,
    retry: RetryPolicy = DEFAULT_RETRY,
    sleep: Sleep = time.sleep,
    clock: Clock = system_clock,
) -> bool:
    """Take an uploaded delta back while its round is still open (erasure at the aggregator).

    The device presents the sealed delta it uploaded; the aggregator subtracts it from the
    round's running sum. Returns ``True`` when it was taken out, ``False`` when nothing was
    pending (never accepted, or the round closed: a published round's deltas are part of its
    release). Raises :class:`AggregatorUnavailable` when the aggregator does not answer.
    """
    url = api_url(base_url, f"/v1/pseudonyms/{sealed.pseudonym}/erasure")
    body, headers = sealed.to_wire(), {"Content-Type": "application/json"}
    reply = _call(lambda: client.post(url, content=body, headers=headers), retry, sleep, clock)
    if reply.status == 200:
        return True
    if reply.status == 404 and reply.code == "nothing_pending":
        return False
    if reply.transient:
        raise unavailable("erasure", reply)
    raise AggregatorUnavailable(
        f"erasure: the aggregator refused it (HTTP {reply.status}"
        f"{', ' + reply.code if reply.code else ''})"
    )
