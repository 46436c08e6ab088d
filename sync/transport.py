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

The errors met here (all but the last are defined in :mod:`._errors`)::

    SyncError
    ├── WrongModel              wrong_model             a release for another model file
    ├── EnrollmentRefused       not_enrolled            the aggregator refused the enrollment
    ├── AggregatorUnavailable   aggregator_unavailable  no usable answer after the retries
    └── BadEndpoint             bad_endpoint            a base URL that is not a service's root
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import tenacity

from sottovoce._clock import Clock, system_clock
from sottovoce.policy._canonical import canonical_json
from sottovoce.sync._errors import (
    AggregatorUnavailable,
    EnrollmentRefused,
    SyncError,
    WrongModel,
    WrongModelVersion,
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

Sleep = Callable[[float], None]
API_PREFIX = "/v1"  # every path of the protocol's HTTP API starts with it


class BadEndpoint(SyncError, ValueError):
    """A base URL that is not the root of a service: not http(s), no host, a query or
    fragment, or a path that already ends in the API's ``/v1``."""

    code = "bad_endpoint"


def api_url(base_url: str, path: str) -> str:
    """The URL of the API ``path`` (``/v1/...``) on the service whose root is ``base_url``.

    ``base_url`` is a region's ``aggregator.endpoint``: ``https://eu.example.org`` or, behind a
    proxy, ``https://example.org/sottovoce/eu``; a trailing ``/`` is ignored. Raises
    :class:`BadEndpoint` for anything else, naming what is wrong with it.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadEndpoint(f"the endpoint {base_url!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment or "\x00" in base_url or any(c.isspace() for c in base_url):
        raise BadEndpoint(f"the endpoint {base_url!r} has a query, a fragment or spaces")
    root = base_url.rstrip("/")
    if root.endswith(API_PREFIX):
        raise BadEndpoint(
            f"the endpoint {base_url!r} ends in {API_PREFIX}, but an endpoint is the service's "
            f"root and the API's {API_PREFIX}/... paths are added to it: use "
            f"{root.removesuffix(API_PREFIX)!r}"
        )
    if not path.startswith(API_PREFIX + "/"):
        raise ValueError(f"{path!r} is not a path of the API (they start with {API_PREFIX}/)")
    return root + path


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries before it leaves the rest to the outbox (seconds)."""

    attempts: int = 4
    initial: float = 0.5  # backoff before the second try; doubled each try, full jitter
    maximum: float = 8.0
    max_retry_after: float = 5.0  # a longer Retry-After ends the call (and an upload run)


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


@dataclass(frozen=True)
class _Reply:
    """One exchange as the protocol sees it: ``status`` is ``None`` for no usable answer."""

    status: int | None
    body: dict[str, Any] | None = None
    headers: httpx.Headers | None = None
    retry_after: timedelta | None = None
    unreachable: bool = False  # the connection itself failed

    @property
    def code(self) -> str | None:
        code = (self.body or {}).get("code")
        return code if isinstance(code, str) else None

    @property
    def transient(self) -> bool:
        return self.status is None or self.status >= 500 or self.status == 429

    def waits_too_long(self, policy: RetryPolicy) -> bool:
        limit = timedelta(seconds=policy.max_retry_after)
        return self.retry_after is not None and self.retry_after > limit


def _retry_after(response: httpx.Response, now: datetime) -> timedelta | None:
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        return max(parsedate_to_datetime(value) - now, timedelta(0))
    except (TypeError, ValueError):
        return None


def _exchange(send: Callable[[], httpx.Response], clock: Clock) -> _Reply:
    """One try. Every answer with a body is a JSON object; anything else counts as none."""
    try:
        response = send()
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return _Reply(status=None, unreachable=True)
    except httpx.TransportError:  # read timeouts, dropped connections, truncated bodies
        return _Reply(status=None)
    retry_after = _retry_after(response, clock())
    body: Any = None
    if response.content:
        try:
            body = json.loads(response.content)
        except (ValueError, RecursionError):  # not JSON, or nested to exhaust the stack
            body = None
        if not isinstance(body, dict):  # a proxy's page, or garbage: no answer from us
            return _Reply(status=None, retry_after=retry_after)
    return _Reply(response.status_code, body, response.headers, retry_after)


def _with_retries(
    send: Callable[[], httpx.Response], policy: RetryPolicy, sleep: Sleep, clock: Clock
) -> _Reply:
    """The last reply after retrying transient ones (waits honour a short Retry-After)."""
    backoff = tenacity.wait_random_exponential(multiplier=policy.initial, max=policy.maximum)

    def wait(state: tenacity.RetryCallState) -> float:
        reply = state.outcome.result() if state.outcome is not None else None
        if isinstance(reply, _Reply) and reply.retry_after is not None:
            return reply.retry_after.total_seconds()
        return backoff(state)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=wait,
        retry=tenacity.retry_if_result(
            lambda reply: reply.transient and not reply.waits_too_long(policy)
        ),
        sleep=sleep,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    reply: _Reply = retrying(_exchange, send, clock)
    return reply


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
        retry: RetryPolicy = RetryPolicy(),
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

    def _send(self, item: OutboxItem) -> _Reply:
        def send() -> httpx.Response:
            return self._client.post(
                api_url(self._base_url, f"/v1/rounds/{item.round_id}/deltas"),
                content=item.body,
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": item.idempotency_key,
                },
            )

        return _with_retries(send, self._retry, self._sleep, self._clock)

    def _record(self, item: OutboxItem, reply: _Reply, *, code: str | None) -> str:
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


def _unavailable(what: str, reply: _Reply) -> AggregatorUnavailable:
    if reply.unreachable:
        return AggregatorUnavailable(f"{what}: the aggregator cannot be reached")
    if reply.status is None:
        return AggregatorUnavailable(f"{what}: no usable answer from the aggregator")
    return AggregatorUnavailable(f"{what}: the aggregator answered HTTP {reply.status}")


def fetch_round(
    client: httpx.Client,
    *,
    base_url: str,
    verify_key: SigningPublicKey,
    retry: RetryPolicy = RetryPolicy(),
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
    reply = _with_retries(lambda: client.get(url, headers=headers), retry, sleep, clock)
    if reply.status == 404 and reply.code == "no_open_round":
        return None
    if reply.status != 200 or reply.body is None:
        raise _unavailable("round", reply)
    return verify_round_spec(SignedRoundSpec.from_wire(reply.body), verify_key)


def fetch_release(
    client: httpx.Client,
    *,
    base_url: str,
    etag: str | None = None,
    verify_key: SigningPublicKey,
    model_id: str,
    current_version: int,
    retry: RetryPolicy = RetryPolicy(),
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
    reply = _with_retries(lambda: client.get(url, headers=headers), retry, sleep, clock)
    if reply.status == 304:
        return None
    if reply.status != 200 or reply.body is None:
        raise _unavailable("model release", reply)
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
    return Fetched(release, reply.headers.get("ETag") if reply.headers else None)


def enroll(
    client: httpx.Client,
    *,
    base_url: str,
    token: str,
    device_public_key: SigningPublicKey,
    period: str,
    retry: RetryPolicy = RetryPolicy(),
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
    reply = _with_retries(
        lambda: client.post(url, content=body, headers=headers), retry, sleep, clock
    )
    if reply.status is not None and 200 <= reply.status < 300:
        return
    if reply.transient:
        raise _unavailable("enrollment", reply)
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
    retry: RetryPolicy = RetryPolicy(),
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
    reply = _with_retries(
        lambda: client.post(url, content=body, headers=headers), retry, sleep, clock
    )
    if reply.status == 200:
        return True
    if reply.status == 404 and reply.code == "nothing_pending":
        return False
    if reply.transient:
        raise _unavailable("erasure", reply)
    raise AggregatorUnavailable(
        f"erasure: the aggregator refused it (HTTP {reply.status}"
        f"{', ' + reply.code if reply.code else ''})"
    )
