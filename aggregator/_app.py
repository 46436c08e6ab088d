"""The regional aggregator's HTTP service: a thin FastAPI layer over :class:`RegionAggregator`.

Data flow step 6, at the network edge: devices enroll their per-period keys, fetch the open
round's signed spec, upload sealed deltas and download signed releases over the endpoints of
``docs/protocol.md`` ("HTTP"); every decision is the aggregator's, this module only maps it to
HTTP. Routes live under ``/v1``; every answer with a body is a JSON object, and a refusal is
``{"code": ..., "message": ...}`` with the status the aggregator picked (``STATUS``).

The aggregator and its database connection belong to one worker thread, made when the app starts
and ended when it stops: the factory runs on that thread, and requests wait their turn for it,
so the connection is never shared between threads; uploads and enrollments are decided in
groups, each in one durable transaction (group commit, see ``_edge.Worker``).
Metrics are per-process counters in the Prometheus text format (no client library).

A request is refused before any work it has not earned: a declared body above the limit before
anything is read, enrollment's bearer token before its body, a body not declared as
``application/json`` (415) before it is read, and a streamed body as soon as it passes the
limit. Refusals the aggregator logs are bounded per source (:mod:`._refusals`); slow clients
and the number of connections are bounded below the app (:mod:`._connections`). ``/docs`` and
``/redoc`` are served only when the operator turns them on (``docs=True``); ``/openapi.json``
always is, listing every status each operation gives (:mod:`._openapi`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._edge import (
    Gone,
    Metrics,
    Refusals,
    Worker,
    declared_length,
    problem,
)
from sottovoce.aggregator._openapi import without_validation_422
from sottovoce.aggregator._postgres import DatabaseUnavailable
from sottovoce.aggregator._refusals import RefusalLimit
from sottovoce.aggregator._routes import Edge, device_routes, operator_routes, upload_routes

__all__ = ["create_app"]

log = logging.getLogger("sottovoce.aggregator")


def create_app(
    aggregator_factory: Callable[[], RegionAggregator],
    *,
    enrollment_tokens: set[str],
    scheduler: Callable[[RegionAggregator], object] | None = None,
    tick_seconds: float = 60.0,
    max_body_bytes: int = 1 << 20,
    refusal_limit: RefusalLimit | None = None,
    docs: bool = False,
) -> FastAPI:
    """The service of one region's aggregator; ``aggregator_factory`` runs once per start.

    ``scheduler`` (e.g. :meth:`RoundScheduler.tick`) runs on the aggregator's thread when the
    app starts and every ``tick_seconds`` after; bodies above ``max_body_bytes`` are refused
    (413 ``too_large``) without being read. With ``refusal_limit``, refusals beyond it are
    counted into one logged decision per reason every tick and at stop, instead of one each.
    ``docs`` serves ``/docs`` and ``/redoc``.
    """
    worker = Worker(aggregator_factory)
    metrics = Metrics()
    tokens = frozenset(enrollment_tokens)
    refusals = Refusals(refusal_limit)

    def tick(agg: RegionAggregator, counts: dict[tuple[str, str], int]) -> int:
        """One pass: the counted refusals, then the scheduler; returns how many rounds it
        published (central rounds publish at their deadline, in the sweep)."""
        agg.log_refusal_counts(counts)
        if scheduler is None:
            return 0
        before = agg.latest_version()
        scheduler(agg)
        return agg.latest_version() - before

    async def schedule() -> None:
        while True:
            counts = refusals.tally.drain()  # on the event loop, where requests count
            try:
                metrics.count(accepted=0, published=await worker.run(partial(tick, counts=counts)))
            except Exception:  # a failed pass is logged and retried; the service stays up
                log.exception("schedule_failed")
            await asyncio.sleep(tick_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        ticking = scheduler is not None or refusal_limit is not None
        task = asyncio.create_task(schedule()) if ticking else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            counts = refusals.tally.drain()
            try:
                await worker.run(lambda agg: agg.log_refusal_counts(counts))
            except Exception:  # stopping goes on; the log says what was not written
                log.exception("refusal_counts_failed", extra={"fields": {"counts": len(counts)}})
            worker.stop()

    app = FastAPI(
        title="sottovoce regional aggregator",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    without_validation_422(app)
    _error_handlers(app)

    app.add_middleware(_DeclaredSize, max_body_bytes=max_body_bytes)
    app.add_middleware(_RequestLog)  # added last, so outermost: it logs the size refusals too

    edge = Edge(worker, metrics, tokens, refusals, max_body_bytes)
    device_routes(app, edge)
    upload_routes(app, edge)
    operator_routes(app, edge)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error answer is a ``{"code", "message"}`` object, FastAPI's own ones included."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "malformed")
        return problem(error.status_code, code, **(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return problem(400, "malformed")

    @app.exception_handler(Gone)
    async def gone(_: Request, error: Gone) -> JSONResponse:
        return problem(400, "malformed", "The request body was cut short.")

    @app.exception_handler(DatabaseUnavailable)
    @app.exception_handler(sqlite3.OperationalError)
    async def unavailable(_: Request, error: Exception) -> JSONResponse:
        # The write was rolled back whole (a full disk, a database restarting): retryable.
        if isinstance(error, sqlite3.OperationalError) and not _transient(error):
            log.error("internal_error", exc_info=error)
            return problem(500, "internal")
        log.warning("database_unavailable", extra={"fields": {"error": str(error)[:200]}})
        return problem(503, "unavailable", **{"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        log.error("internal_error", exc_info=error)
        return problem(500, "internal")


def _transient(error: sqlite3.OperationalError) -> bool:
    """A SQLite failure that passes: a full disk, a busy or unreadable file (not a bug)."""
    name = getattr(error, "sqlite_errorname", "")
    return name.startswith(("SQLITE_FULL", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR"))


class _DeclaredSize:
    """Every route: a body declared larger than the limit is refused before anything reads it
    (the upload routes also stop reading one that grows past it). Plain ASGI, like
    :class:`_RequestLog`: a middleware in starlette's ``BaseHTTPMiddleware`` costs every
    request two more tasks and a stream."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self._app = app
        self._max = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "/deltas" not in scope["path"]:
            size = declared_length(Request(scope))
            if size is not None and size > self._max:
                await problem(413, "too_large")(scope, receive, send)
                return
        await self._app(scope, receive, send)


class _RequestLog:
    """One JSON log line per request, with the route's template (never the raw path: a path
    can hold a pseudonym) and the answer's status."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:  # an unhandled error is answered 500 further out, and logged here as one
            fields = {
                "method": scope["method"],
                "route": getattr(scope.get("route"), "path", "unmatched"),
                "status": status,
                "ms": round((time.perf_counter() - start) * 1000, 2),
            }
            log.info("request", extra={"fields": fields})
