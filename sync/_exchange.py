"""What the protocol makes of an HTTP exchange with the aggregator, without doing any I/O.

:mod:`sottovoce.sync.transport` sends the requests (the one module that imports httpx); this
module holds the rest, as values and pure functions: the service's URLs (:func:`api_url`), how
hard one call tries (:class:`RetryPolicy`), what an answer means (a :class:`Reply`: a JSON
object or no usable answer, its reason code, whether it is worth trying again, how long
``Retry-After`` asks to wait), the retry loop around one attempt (:func:`with_retries`,
exponential backoff with full jitter from tenacity) and the error for no usable answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

import tenacity

from sottovoce.sync._errors import AggregatorUnavailable, BadEndpoint

__all__ = [
    "API_PREFIX",
    "DEFAULT_RETRY",
    "Reply",
    "RetryPolicy",
    "Sleep",
    "api_url",
    "reply_of",
    "unavailable",
    "with_retries",
]

Sleep = Callable[[float], None]
API_PREFIX = "/v1"  # every path of the protocol's HTTP API starts with it


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


DEFAULT_RETRY: Final = RetryPolicy()


@dataclass(frozen=True)
class Reply:
    """One exchange as the protocol sees it: ``status`` is ``None`` for no usable answer."""

    status: int | None
    body: dict[str, Any] | None = None
    etag: str | None = None
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


def reply_of(
    status: int, content: bytes, *, retry_after: str | None, etag: str | None, now: datetime
) -> Reply:
    """What an answer means. Every answer with a body is a JSON object; anything else counts
    as no usable answer (a proxy's page, or garbage), keeping only its ``Retry-After``."""
    wait = _retry_after(status, retry_after or "", now)
    body: Any = None
    if content:
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):  # not JSON, or nested to exhaust the stack
            body = None
        if not isinstance(body, dict):
            return Reply(status=None, retry_after=wait)
    return Reply(status, body, etag, wait)


def _retry_after(status: int, value: str, now: datetime) -> timedelta | None:
    if status not in (429, 503):
        return None
    value = value.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        return max(parsedate_to_datetime(value) - now, timedelta(0))
    except (TypeError, ValueError):
        return None


def with_retries(attempt: Callable[[], Reply], policy: RetryPolicy, sleep: Sleep) -> Reply:
    """The last reply of ``attempt`` after retrying transient ones (waits honour a short
    Retry-After; a longer one ends the call at once)."""
    backoff = tenacity.wait_random_exponential(multiplier=policy.initial, max=policy.maximum)

    def wait(state: tenacity.RetryCallState) -> float:
        reply = state.outcome.result() if state.outcome is not None else None
        if isinstance(reply, Reply) and reply.retry_after is not None:
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
    reply: Reply = retrying(attempt)
    return reply


def unavailable(what: str, reply: Reply) -> AggregatorUnavailable:
    """The error for a call that got no usable answer, saying which kind it got."""
    if reply.unreachable:
        return AggregatorUnavailable(f"{what}: the aggregator cannot be reached")
    if reply.status is None:
        return AggregatorUnavailable(f"{what}: no usable answer from the aggregator")
    return AggregatorUnavailable(f"{what}: the aggregator answered HTTP {reply.status}")
