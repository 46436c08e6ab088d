"""The regional aggregator's HTTP service: a thin FastAPI layer over :class:`RegionAggregator`.

Data flow step 6, at the network edge: devices enroll their per-period keys, fetch the open
round's signed spec, upload sealed deltas and download signed releases over the endpoints of
``docs/protocol.md`` ("HTTP"); every decision is the aggregator's, this module only maps it to
HTTP. Routes live under ``/v1``; every answer with a body is a JSON object, and a refusal is
``{"code": ..., "message": ...}`` with the status the aggregator picked (``STATUS``).

The aggregator and its SQLite connection belong to one worker thread, made when the app starts
and ended when it stops: the factory runs on that thread, and requests wait their turn for it,
so the connection is never shared between threads and uploads are decided one at a time.
Metrics are per-process counters in the Prometheus text format (no client library).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any, Final, TypeVar

from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sottovoce.aggregator._rounds import RegionAggregator
from sottovoce.sync import SealedDelta, SyncError
from sottovoce.sync._wire import PROTOCOL_VERSION

__all__ = ["create_app"]

T = TypeVar("T")
log = logging.getLogger("sottovoce.aggregator")

# A sentence a person understands, for every code an answer can carry.
MESSAGES: Final[dict[str, str]] = {
    "unsupported_protocol": "The request speaks a protocol version this aggregator does not.",
    "malformed": "The request is not a well-formed message for this endpoint.",
    "undecryptable": "The delta could not be decrypted with this region's key.",
    "bad_signature": "The delta's signature does not match the enrolled device key.",
    "not_enrolled": "The device key is not enrolled for this period, or the token is refused.",
    "wrong_region": "The delta is for another region; it is refused here by policy.",
    "duplicate_contribution": "This device already contributed to the round.",
    "round_closed": "The round is closed, unknown or past its deadline.",
    "wrong_model_version": "The delta was trained on another model version than the round's.",
    "non_finite": "The delta holds values that are not finite numbers.",
    "norm_exceeded": "The delta's norm is above the round's clipping bound.",
    "too_large": "The request body is larger than this service accepts.",
    "erased": "The device took this delta back (erasure); it is not counted.",
    "nothing_pending": "No pending delta matches: it was never accepted, or its round closed.",
    "no_open_round": "No round is open at the moment.",
    "no_release": "No model release has been published yet.",
    "not_found": "There is no such endpoint.",
    "method_not_allowed": "The endpoint does not take this method.",
    "internal": "The aggregator failed to process the request.",
}

_JSON: Final = "application/json"
_PROMETHEUS: Final = "text/plain; version=0.0.4; charset=utf-8"


class EnrollRequest(BaseModel):
    """``POST /v1/enroll``: a device's Ed25519 key (standard base64) for one period."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: int
    device_key: str
    period: str


def _problem(status: int, code: str, message: str | None = None, **headers: str) -> JSONResponse:
    content = {"code": code, "message": message or MESSAGES.get(code, code)}
    return JSONResponse(content, status_code=status, headers=headers or None)


class _Worker:
    """The one thread that owns the aggregator (made by ``factory`` on that thread)."""

    def __init__(self, factory: Callable[[], RegionAggregator]) -> None:
        self._factory = factory
        self._executor: ThreadPoolExecutor | None = None
        self._aggregator: RegionAggregator | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aggregator")
        await self.run(lambda _: None)  # a factory that fails stops the start, not a request

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._executor = self._aggregator = None

    async def run(self, call: Callable[[RegionAggregator], T]) -> T:
        if self._executor is None:
            raise RuntimeError("the aggregator service is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, call)

    def _call(self, call: Callable[[RegionAggregator], T]) -> T:
        if self._aggregator is None:
            self._aggregator = self._factory()
        return call(self._aggregator)


class _Metrics:
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


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


def _token_ok(authorization: str | None, tokens: frozenset[str]) -> bool | None:
    """``None`` without a bearer token, else whether it is one of ``tokens``."""
    if authorization is None or not authorization.startswith("Bearer "):
        return None
    given = authorization.removeprefix("Bearer ").strip().encode()
    # Every token is compared, in constant time each, so the answer's timing says nothing.
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, token.encode())
    return found


def create_app(
    aggregator_factory: Callable[[], RegionAggregator],
    *,
    enrollment_tokens: set[str],
    scheduler: Callable[[RegionAggregator], object] | None = None,
    tick_seconds: float = 60.0,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The service of one region's aggregator; ``aggregator_factory`` runs once per start.

    ``scheduler`` (e.g. :meth:`RoundScheduler.tick`) runs on the aggregator's thread when the
    app starts and every ``tick_seconds`` after; uploads above ``max_body_bytes`` are refused
    (413 ``too_large``) without being read.
    """
    worker = _Worker(aggregator_factory)
    metrics = _Metrics()
    tokens = frozenset(enrollment_tokens)

    def tick(agg: RegionAggregator) -> int:
        """One scheduler pass; returns how many rounds it published (central rounds publish
        at their deadline, in the sweep)."""
        assert scheduler is not None
        before = agg.latest_version()
        scheduler(agg)
        return agg.latest_version() - before

    async def schedule() -> None:
        while True:
            try:
                metrics.count(accepted=0, published=await worker.run(tick))
            except Exception:  # a failed pass is logged and retried; the service stays up
                log.exception("schedule_failed")
            await asyncio.sleep(tick_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        task = None if scheduler is None else asyncio.create_task(schedule())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            worker.stop()

    app = FastAPI(title="sottovoce regional aggregator", version="1", lifespan=lifespan)

    _error_handlers(app)

    @app.middleware("http")
    async def declared_size(request: Request, call_next: Callable[[Request], Any]) -> Any:
        # Every route: a body declared larger than the limit is refused before anything
        # reads it (the upload routes also stop reading one that grows past it).
        size = _declared_length(request)
        if size is not None and size > max_body_bytes and "/deltas" not in request.url.path:
            return _problem(413, "too_large")
        return await call_next(request)

    _request_log(app)  # added last, so outermost: it logs the size refusals too

    _device_routes(app, worker, metrics, tokens)
    _upload_routes(app, worker, metrics, max_body_bytes)
    _operator_routes(app, worker, metrics)
    return app


def _device_routes(
    app: FastAPI, worker: _Worker, metrics: _Metrics, tokens: frozenset[str]
) -> None:
    @app.get("/v1/round", summary="The open round's signed spec")
    async def current_round() -> Response:
        signed = await worker.run(lambda agg: agg.current_round())
        if signed is None:
            return _problem(404, "no_open_round")
        return Response(signed.to_wire(), media_type=_JSON)

    @app.post("/v1/enroll", summary="Enroll a device's per-period key")
    async def enroll(
        request: EnrollRequest, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        allowed = _token_ok(authorization, tokens)
        if not allowed:
            await worker.run(lambda agg: agg.refuse_enrollment("not_enrolled"))
        if allowed is None:
            return _problem(401, "not_enrolled", "An enrollment token (Bearer) is required.",
                            **{"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not allowed:
            return _problem(403, "not_enrolled", "The enrollment token is not valid here.")
        if request.protocol != PROTOCOL_VERSION:
            await worker.run(lambda agg: agg.refuse_enrollment("unsupported_protocol"))
            return _problem(400, "unsupported_protocol")
        try:
            await worker.run(lambda agg: agg.enroll(request.device_key, request.period))
        except ValueError as error:
            return _problem(400, "malformed", str(error))
        metrics.count(enrolled=1)
        return JSONResponse({"status": "enrolled"})

    @app.get("/v1/model/release", summary="The latest signed model release (ETag)")
    async def release(if_none_match: Annotated[str | None, Header()] = None) -> Response:
        latest = await worker.run(lambda agg: agg.latest_release())
        if latest is None:
            return _problem(404, "no_release")
        body = latest.to_wire()
        etag = _etag(body)
        if _matches(if_none_match, etag):
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type=_JSON, headers={"ETag": etag})


def _upload_routes(app: FastAPI, worker: _Worker, metrics: _Metrics, max_body_bytes: int) -> None:

    @app.post(
        "/v1/rounds/{round_id}/deltas",
        summary="Upload a sealed delta",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": SealedDelta.model_json_schema()}},
            }
        },
    )
    async def upload(
        round_id: str,
        request: Request,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        body = await _read_limited(request, max_body_bytes)
        if body is None:
            size = _declared_length(request)
            key = idempotency_key or ""
            status, code = await worker.run(lambda agg: agg.refuse_too_large(key, size))
            metrics.refuse(code)
            return _problem(status, code)
        if _other_round(body, round_id):
            key = idempotency_key or ""
            status, code = await worker.run(lambda agg: agg.refuse(body, key, "malformed"))
            metrics.refuse(code)
            return _problem(status, code, "The delta is for another round than the path's.")

        def accept(agg: RegionAggregator) -> tuple[int, str, int, bool]:
            before = agg.round(round_id)
            # A missing key is still the aggregator's decision (logged, refused as malformed).
            status, code = agg.accept(body, idempotency_key or "")
            after = agg.round(round_id)
            added = 0 if after is None else after.count - (0 if before is None else before.count)
            published = (
                before is not None and before.state == "open" and after is not None
                and after.state == "published"
            )  # fmt: skip
            return status, code, added, published

        status, code, added, published = await worker.run(accept)
        metrics.count(accepted=added, published=int(published))
        if 200 <= status < 300:
            return JSONResponse({"status": "accepted", "code": code}, status_code=status)
        metrics.refuse(code)
        if idempotency_key is None:
            return _problem(status, code, "The Idempotency-Key header is required.")
        return _problem(status, code)

    @app.post(
        "/v1/pseudonyms/{pseudonym}/erasure",
        summary="Erase a pseudonym's pending delta (the body is the sealed delta to take back)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": SealedDelta.model_json_schema()}},
            }
        },
    )
    async def erase(pseudonym: str, request: Request) -> Response:
        body = await _read_limited(request, max_body_bytes)
        if body is None:
            return _problem(413, "too_large")
        if _pseudonym_of(body) not in (None, pseudonym):
            return _problem(
                400, "malformed", "The delta belongs to another pseudonym than the path's."
            )
        status, code = await worker.run(lambda agg: agg.erase(body))
        if status == 200:
            metrics.count(erased=1)
            return JSONResponse({"status": "erased", "code": code})
        return _problem(status, code)


def _operator_routes(app: FastAPI, worker: _Worker, metrics: _Metrics) -> None:
    @app.get("/v1/health", summary="Whether the service and its database answer")
    async def health() -> dict[str, Any]:
        signed = await worker.run(lambda agg: agg.current_round())
        return {"status": "ok", "open_round": None if signed is None else signed.spec.round_id}

    @app.get("/v1/metrics", summary="Prometheus counters", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=_PROMETHEUS)


def _error_handlers(app: FastAPI) -> None:
    """Every error answer is a ``{"code", "message"}`` object, FastAPI's own ones included."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "malformed")
        return _problem(error.status_code, code, **(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _problem(400, "malformed")

    @app.exception_handler(_Gone)
    async def gone(_: Request, error: _Gone) -> JSONResponse:
        return _problem(400, "malformed", "The request body was cut short.")

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        log.error("internal_error", exc_info=error)
        return _problem(500, "internal")


def _request_log(app: FastAPI) -> None:
    """One JSON log line per request, with the route's template (never the raw path: a path
    can hold a pseudonym) and the answer's code."""

    @app.middleware("http")
    async def access(request: Request, call_next: Callable[[Request], Any]) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        fields = {
            "method": request.method,
            "route": getattr(route, "path", "unmatched"),
            "status": response.status_code,
            "ms": round((time.perf_counter() - start) * 1000, 2),
        }
        log.info("request", extra={"fields": fields})
        return response


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request's body, or ``None`` (without reading further) once it exceeds ``limit``."""
    declared = _declared_length(request)
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
        raise _Gone from None
    return b"".join(chunks)


class _Gone(Exception):
    """The client disconnected before its request body arrived."""


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _pseudonym_of(body: bytes) -> str | None:
    try:
        return SealedDelta.from_wire(body).pseudonym
    except (SyncError, ValueError, RecursionError):
        return None


def _other_round(body: bytes, round_id: str) -> bool:
    """Whether ``body`` is a sealed delta for another round than the path names.

    Anything else (including an unparsable body) is left to the aggregator to decide.
    """
    try:
        return SealedDelta.from_wire(body).round_id != round_id
    except (SyncError, ValueError, RecursionError):
        return False
