"""What the transport makes of an answer, without a network: sync/_exchange.py's pure core."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from sottovoce.sync._exchange import Reply, RetryPolicy, api_url, reply_of, with_retries
from sottovoce.sync.transport import BadEndpoint

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def test_a_json_object_is_an_answer_with_its_code_and_etag() -> None:
    reply = reply_of(404, b'{"code": "no_open_round"}', retry_after=None, etag='"v7"', now=NOW)
    assert reply == Reply(404, {"code": "no_open_round"}, '"v7"')
    assert reply.code == "no_open_round" and not reply.transient


@pytest.mark.parametrize(
    "content", [b"<html>proxy error</html>", b"[1, 2]", b'"text"', b"[" * 100_000 + b"]" * 100_000]
)
def test_a_body_that_is_no_json_object_is_no_answer(content: bytes) -> None:
    reply = reply_of(200, content, retry_after=None, etag='"v7"', now=NOW)
    assert reply.status is None and reply.body is None and reply.transient


def test_retry_after_in_seconds_or_as_a_date_only_on_429_and_503() -> None:
    later = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert reply_of(503, b"", retry_after="7", etag=None, now=NOW).retry_after == timedelta(
        seconds=7
    )
    assert reply_of(429, b"", retry_after=later, etag=None, now=NOW).retry_after == timedelta(
        seconds=90
    )
    assert reply_of(500, b"", retry_after="7", etag=None, now=NOW).retry_after is None
    assert reply_of(503, b"", retry_after="soon", etag=None, now=NOW).retry_after is None
    past = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert reply_of(503, b"", retry_after=past, etag=None, now=NOW).retry_after == timedelta(0)


def test_transient_replies_are_retried_until_the_attempts_run_out() -> None:
    replies = iter([Reply(None), Reply(503), Reply(200, {})])
    waits: list[float] = []
    last = with_retries(lambda: next(replies), RetryPolicy(attempts=4), waits.append)
    assert last == Reply(200, {}) and len(waits) == 2
    failing = iter([Reply(502)] * 5)
    waits.clear()
    assert with_retries(lambda: next(failing), RetryPolicy(attempts=3), waits.append).status == 502
    assert len(waits) == 2


def test_a_long_retry_after_ends_the_call_and_a_short_one_is_waited_for() -> None:
    long_wait = Reply(503, {}, retry_after=timedelta(seconds=60))
    waits: list[float] = []
    assert with_retries(lambda: long_wait, RetryPolicy(), waits.append) == long_wait
    assert waits == []
    replies = iter([Reply(429, {}, retry_after=timedelta(seconds=2)), Reply(200, {})])
    assert with_retries(lambda: next(replies), RetryPolicy(), waits.append).status == 200
    assert waits == [2.0]


def test_an_endpoint_is_a_services_root() -> None:
    assert api_url("https://example.org/sottovoce/eu/", "/v1/round") == (
        "https://example.org/sottovoce/eu/v1/round"
    )
    for wrong in ("https://eu.example.org/v1", "ftp://eu.example.org", "https://x.org/?a=1"):
        with pytest.raises(BadEndpoint):
            api_url(wrong, "/v1/round")
    with pytest.raises(ValueError, match="not a path of the API"):
        api_url("https://eu.example.org", "/round")
