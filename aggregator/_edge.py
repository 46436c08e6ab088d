"""What the aggregator service's routes share at the HTTP edge (no decisions here).

The refusal shape (``{"code", "message"}``, :func:`problem`, never quoting more than
``MESSAGE_CHARS`` of anything), the one place a verdict of the aggregator becomes an HTTP status
(:func:`status_of`, :func:`answer`: statuses and messages come from the registry of reason codes
in ``sottovoce.policy._reasons``), reading a request body within the limit and only when it is
declared JSON, the enrollment token check, the one thread that owns the aggregator
(:class:`Worker`), the Prometheus counters (:class:`Metrics`), and which refusals are logged one
by one (:class:`Refusals`, over :mod:`._refusals`). Routes are in :mod:`._routes`, the app in
:mod:`._app`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import MappingProxyType
from typing import Annotated, Any, Final, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._refusals import RefusalBudget, RefusalLimit, RefusalTally
from sottovoce.aggregator._round_state import Verdict
from sottovoce.aggregator._upload_group import Upload
from sottovoce.policy._reasons import REASON_CODES
from sottovoce.sync import SealedDelta, SyncError

T = TypeVar("T")

# The status and the sentence a person understands of every code an answer can carry, from the
# one registry of reason codes.
STATUS: Final[Mapping[str, int]] = MappingProxyType(
    {r.code: r.status for r in REASON_CODES if r.status is not None}
)
MESSAGES: Final[Mapping[str, str]] = MappingProxyType(
    {r.code: r.message for r in REASON_CODES if r.message is not None}
)

JSON: Final = "application/json"
PROMETHEUS: Final = "text/plain; version=0.0.4; charset=utf-8"


MESSAGE_CHARS: Final = 300  # an answer never quotes more than this, whatever it was sent


class EnrollRequest(BaseModel):
    """``POST /v1/enroll``: a device's Ed25519 key (standard base64) for one period."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    protocol: int
    device_key: Annotated[str, Field(max_length=64)]
    period: Annotated[str, Field(max_length=32)]


def status_of(verdict: Verdict) -> int:
    """The HTTP status of the aggregator's verdict: its code's, except ``409`` for other
    content under an idempotency key that was already accepted."""
    return 409 if verdict.key_taken else STATUS[verdict.code]


def answer(verdict: Verdict, message: str | None = None) -> JSONResponse:
    """The response to an upload or erasure verdict: a refusal in the problem shape, else
    ``{"status": ..., "code": ...}`` (``accepted`` or ``erased``)."""
    if not verdict.accepted:
        return problem(status_of(verdict), verdict.code, message)
    status = "erased" if verdict.code == "user_request" else "accepted"
    return JSONResponse({"status": status, "code": verdict.code}, status_code=status_of(verdict))


def problem(status: int, code: str, message: str | None = None, **headers: str) -> JSONResponse:
    text = message or MESSAGES.get(code, code)
    if len(text) > MESSAGE_CHARS:
        text = text[: MESSAGE_CHARS - 1] + "…"
    content = {"code": code, "message": text}
    return JSONResponse(content, status_code=status, headers=headers or None)


def invalid_body(error: ValidationError) -> str:
    """What is wrong with a request body, by field, without quoting any value sent (a field
    name the client made up is cut short too)."""
    wrong = []
    for item in error.errors(include_input=False, include_url=False)[:3]:
        field = ".".join(str(part)[:32] for part in item["loc"]) or "the body"
        wrong.append(f"{field}: {item['msg']}")
    return "The request body is not valid: " + "; ".join(wrong) + "."


class Worker:
    """The one thread that owns the aggregator (made by ``factory`` on that thread), and the
    group commit of writes.

    Uploads are decided in groups (:meth:`RegionAggregator.accept_many`: one durable
    transaction, one fsync, for every upload of a group), and so are other writes that come
    in numbers, such as enrollments (:meth:`write`, :meth:`RegionAggregator.write_many`): a
    request that arrives while the thread is busy waits for the next group, so groups are a
    single request when the service is idle (no added delay) and grow with the load, up to
    ``max_group`` uploads or ``max_writes`` other writes. A request is answered only once its
    group has committed.

    While both wait, each pass decides a group of uploads first, then a group of other writes:
    an upload has its round's deadline, an enrollment its whole period, and neither starves.
    Other writes go in smaller groups, because an upload that arrives meanwhile waits for the
    group under way (200 devices enrolling at once in groups of 64, decided before the
    uploads that followed: upload p99 250-340 ms on two cores; in this order and in groups of
    16, 44-79 ms).
    """

    def __init__(
        self,
        factory: Callable[[], RegionAggregator],
        *,
        max_group: int = 64,
        max_writes: int = 16,
    ) -> None:
        self._factory = factory
        self._executor: ThreadPoolExecutor | None = None
        self._aggregator: RegionAggregator | None = None
        self._max_group = max_group
        self._max_writes = max_writes
        self._uploads: list[tuple[tuple[Upload, SealedDelta | None], asyncio.Future[Any]]] = []
        self._writes: list[tuple[Callable[[RegionAggregator], Any], asyncio.Future[Any]]] = []
        self._deciding = False
        self._task: asyncio.Task[None] | None = None  # the running groups' task (kept alive)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aggregator")
        try:
            await self.run(lambda _: None)  # a factory that fails stops the start, not a request
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close the aggregator (its database connection or pool) on its thread, then end it."""
        if self._executor is not None:
            if self._aggregator is not None:
                self._executor.submit(self._aggregator.close).result()
            self._executor.shutdown(wait=True)
        self._executor = self._aggregator = None

    async def run(self, call: Callable[[RegionAggregator], T]) -> T:
        """Run ``call`` on the aggregator's thread, alone (reads, and rare writes)."""
        if self._executor is None:
            raise RuntimeError("the aggregator service is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, call)

    async def accept(
        self, body: bytes, key: str, *, record: bool, sealed: SealedDelta | None = None
    ) -> Verdict:
        """Decide on an upload in the next group of uploads (``sealed``: the body, if it was
        parsed already, so that it is not parsed twice)."""
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._uploads.append((((body, key, record), sealed), future))
        self._wake()
        return await future

    async def write(self, call: Callable[[RegionAggregator], T]) -> T:
        """Run the write ``call`` in the next group of writes (its own savepoint in the group's
        transaction: an exception it raises is its alone, and is raised here)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writes.append((call, future))
        self._wake()
        return await future

    def _wake(self) -> None:
        if not self._deciding:
            self._deciding = True
            self._task = asyncio.get_running_loop().create_task(self._decide_groups())

    async def _decide_groups(self) -> None:
        try:
            while self._uploads or self._writes:
                if self._uploads:
                    uploads = self._uploads[: self._max_group]
                    del self._uploads[: self._max_group]
                    batch = [upload for (upload, _), _ in uploads]
                    parsed = [sealed for (_, sealed), _ in uploads]
                    await self._settle(uploads, partial(_accept_many, uploads=batch,
                                                        parsed=parsed))  # fmt: skip
                if self._writes:
                    group = self._writes[: self._max_writes]
                    del self._writes[: self._max_writes]
                    calls = [call for call, _ in group]
                    await self._settle(group, partial(_write_many, calls=calls))
        finally:
            self._deciding = False

    async def _settle(
        self,
        group: Sequence[tuple[Any, asyncio.Future[Any]]],
        decide: Callable[[RegionAggregator], list[Any]],
    ) -> None:
        try:
            results = await self.run(decide)
        except Exception as error:  # the commit failed: nothing of the group counts
            results = [error] * len(group)
        except BaseException:  # cancelled (the service stopping): no request waits for ever
            for _, future in group:
                if not future.done():
                    future.cancel()
            raise
        for (_, future), result in zip(group, results, strict=True):
            if future.done():  # the client went away meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _call(self, call: Callable[[RegionAggregator], T]) -> T:
        if self._aggregator is None:
            self._aggregator = self._factory()
        return call(self._aggregator)


def _write_many(
    agg: RegionAggregator, *, calls: list[Callable[[RegionAggregator], Any]]
) -> list[Any]:
    return agg.write_many(calls)


def _accept_many(
    agg: RegionAggregator, *, uploads: list[Upload], parsed: list[SealedDelta | None]
) -> list[Verdict | Exception]:
    return agg.accept_many(uploads, parsed=parsed)


class Metrics:
    """Counters since the process started, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.published = 0
        self.enrolled = 0
        self.erased = 0

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def refuse(self, code: str) -> None:
        with self._lock:
            self.refused[code] += 1

    def render(self) -> str:
        with self._lock:
            families = [
                ("sottovoce_deltas_accepted_total",
                 "Sealed deltas added to a round (a replayed upload is counted once).",
                 [("", self.accepted)]),
                ("sottovoce_deltas_refused_total",
                 "Upload answers that refused a delta, by reason code.",
                 [(f'{{code="{code}"}}', n) for code, n in sorted(self.refused.items())]),
                ("sottovoce_rounds_published_total",
                 "Rounds closed into a signed model release.",
                 [("", self.published)]),
                ("sottovoce_deltas_erased_total",
                 "Pending deltas their devices took back before the round closed.",
                 [("", self.erased)]),
                ("sottovoce_enrollments_total",
                 "Device keys enrolled (again, for a repeated enrollment).",
                 [("", self.enrolled)]),
            ]  # fmt: skip
        lines: list[str] = []
        for name, help_text, samples in families:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines += [f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(lines) + "\n"


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


def token_ok(authorization: str | None, tokens: frozenset[str]) -> bool | None:
    """``None`` without a bearer token, else whether it is one of ``tokens``."""
    if authorization is None or not authorization.startswith("Bearer "):
        return None
    given = authorization.removeprefix("Bearer ").strip().encode()
    # Every token is compared, in constant time each, so the answer's timing says nothing.
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, token.encode())
    return found


class Refusals:
    """Which refusals the aggregator logs one by one, and the count of the rest (per source,
    see :mod:`._refusals`); without a limit, every refusal is logged."""

    def __init__(self, limit: RefusalLimit | None) -> None:
        self._budget = None if limit is None else RefusalBudget(limit, now=time.monotonic())
        self.tally = RefusalTally()

    def take(self, request: Request) -> bool:
        """Whether a refusal of ``request`` is to be logged on its own (spends the budget)."""
        if self._budget is None:
            return True
        return self._budget.take(source_of(request), now=time.monotonic())

    def settle(
        self, request: Request, logged: bool, action: str, accepted: bool, code: str
    ) -> None:
        """After the aggregator answered: a logged token comes back if nothing was refused; a
        refusal that was not logged is counted."""
        if accepted:
            if logged and self._budget is not None:
                self._budget.give_back(source_of(request))
        elif not logged:
            self.tally.count(action, code)


def source_of(request: Request) -> str:
    return request.client.host if request.client is not None else "-"


def is_json(request: Request) -> bool:
    """Whether the body is declared as JSON (``application/json``, UTF-8 if a charset is said)."""
    media, _, parameters = request.headers.get("content-type", "").partition(";")
    if media.strip().lower() != JSON:
        return False
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            return False
    return True


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request's body, or ``None`` (without reading further) once it exceeds ``limit``."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        return None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except ClientDisconnect:  # the device went away mid-body: nothing to decide, nobody to tell
        raise Gone from None
    return b"".join(chunks)


class Gone(Exception):
    """The client disconnected before its request body arrived."""


def declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def parsed_delta(body: bytes) -> SealedDelta | None:
    """``body`` parsed as a sealed delta, or ``None`` (the aggregator then decides how it is
    malformed)."""
    try:
        return SealedDelta.from_wire(body)
    except (SyncError, ValueError, RecursionError):
        return None


def pseudonym_of(body: bytes) -> str | None:
    sealed = parsed_delta(body)
    return None if sealed is None else sealed.pseudonym
