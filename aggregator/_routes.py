"""The aggregator service's routes: each maps one request to the aggregator and its answer
to HTTP (the paths of ``docs/protocol.md``, "HTTP"); :mod:`._edge` has what they share.

Every route does the cheap checks first and reads a body only once it has earned it: the
token (enrollment), the declared content type (415), then the body within the limit (413).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._edge import (
    JSON,
    PROMETHEUS,
    EnrollRequest,
    Metrics,
    Refusals,
    Worker,
    answer,
    declared_length,
    etag_of,
    invalid_body,
    is_json,
    matches,
    parsed_delta,
    problem,
    pseudonym_of,
    read_limited,
    token_ok,
)
from sottovoce.aggregator._openapi import documented_responses
from sottovoce.aggregator._rounds import device_key_problem
from sottovoce.sync import SealedDelta, SignedRoundSpec
from sottovoce.sync._wire import PROTOCOL_VERSION

__all__ = ["Edge", "device_routes", "operator_routes", "upload_routes"]


@dataclass(frozen=True)
class Edge:
    """What the routes of one app share."""

    worker: Worker
    metrics: Metrics
    tokens: frozenset[str]
    refusals: Refusals
    max_body_bytes: int


ENROLL_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {JSON: {"schema": EnrollRequest.model_json_schema()}},
    }
}
DELTA_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {JSON: {"schema": SealedDelta.model_json_schema()}},
    }
}


@functools.lru_cache(maxsize=8)
def spec_wire(signed: SignedRoundSpec) -> bytes:
    """A signed spec as sent, serialised once per round (a parsed spec is frozen and hashable;
    every device of a round fetches the same one)."""
    return signed.to_wire()


def device_routes(app: FastAPI, edge: Edge) -> None:
    worker, metrics, refusals = edge.worker, edge.metrics, edge.refusals

    @app.get(
        "/v1/round",
        summary="The open round's signed spec",
        responses=documented_responses({
            200: "The open round's signed spec (docs/protocol.md, \"Round spec\").",
            404: "`no_open_round`: no round is open at the moment.",
        }),
    )  # fmt: skip
    async def current_round() -> Response:
        signed = await worker.run(lambda agg: agg.current_round())
        if signed is None:
            return problem(404, "no_open_round")
        return Response(spec_wire(signed), media_type=JSON)

    @app.post(
        "/v1/enroll",
        summary="Enroll a device's per-period key",
        openapi_extra=ENROLL_BODY,
        responses=documented_responses({
            200: "`{\"status\": \"enrolled\"}`: the key is enrolled for the period.",
            400: "`malformed` (the body, the key or the period is not valid; the message says "
                 "which field) or `unsupported_protocol`.",
            401: "`not_enrolled`: no bearer token (`WWW-Authenticate: Bearer`).",
            403: "`not_enrolled`: the bearer token is not one of this service's.",
        }, body=True),
    )  # fmt: skip
    async def enroll(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        async def refuse(code: str) -> None:
            if refusals.take(request):
                await worker.run(lambda agg: agg.refuse_enrollment(code))
            else:
                refusals.tally.count("enroll_device", code)

        # The token first: nothing of a request without one is read.
        allowed = token_ok(authorization, edge.tokens)
        if not allowed:
            await refuse("not_enrolled")
        if allowed is None:
            return problem(401, "not_enrolled", "An enrollment token (Bearer) is required.",
                           **{"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not allowed:
            return problem(403, "not_enrolled", "The enrollment token is not valid here.")
        if not is_json(request):
            return problem(415, "unsupported_media_type")
        body = await read_limited(request, edge.max_body_bytes)
        if body is None:
            return problem(413, "too_large")
        try:
            asked = EnrollRequest.model_validate_json(body)
        except ValidationError as error:
            return problem(400, "malformed", invalid_body(error))
        if asked.protocol != PROTOCOL_VERSION:
            await refuse("unsupported_protocol")
            return problem(400, "unsupported_protocol")
        logged = refusals.take(request)
        # The key's check (half a millisecond) here, not under the region's write lock, where
        # enroll finds its verdict remembered.
        device_key_problem(asked.device_key)

        def decide(agg: RegionAggregator) -> str | None:
            try:
                agg.enroll(asked.device_key, asked.period, record=logged)
            except ValueError as error:
                return str(error)
            return None

        refused = await worker.write(decide)
        refusals.settle(request, logged, "enroll_device", refused is None, "malformed")
        if refused is not None:
            return problem(400, "malformed", refused[:1].upper() + refused[1:] + ".")
        metrics.count(enrolled=1)
        return JSONResponse({"status": "enrolled"})

    @app.get(
        "/v1/model/release",
        summary="The latest signed model release (ETag)",
        responses=documented_responses({
            200: "The latest signed model release, with its `ETag`.",
            304: "The release named by `If-None-Match` is still the latest.",
            404: "`no_release`: no release has been published yet.",
        }),
    )  # fmt: skip
    async def release(if_none_match: Annotated[str | None, Header()] = None) -> Response:
        latest = await worker.run(lambda agg: agg.latest_release())
        if latest is None:
            return problem(404, "no_release")
        body = latest.to_wire()
        etag = etag_of(body)
        if matches(if_none_match, etag):
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type=JSON, headers={"ETag": etag})


def upload_routes(app: FastAPI, edge: Edge) -> None:
    worker, metrics, refusals, max_body_bytes = (edge.worker, edge.metrics, edge.refusals,
                                                 edge.max_body_bytes)  # fmt: skip

    @app.post(
        "/v1/rounds/{round_id}/deltas",
        summary="Upload a sealed delta",
        openapi_extra=DELTA_BODY,
        responses=documented_responses({
            200: "`{\"status\": \"accepted\", \"code\": \"within_policy\"}` (also the answer to "
                 "a replay of an accepted upload).",
            400: "`malformed` (also: no `Idempotency-Key`, or a body for another round than "
                 "the path's), `unsupported_protocol`, `undecryptable` or `bad_signature`.",
            403: "`not_enrolled` or `wrong_region`.",
            409: "`duplicate_contribution`, or `malformed`: the idempotency key was accepted "
                 "with other content.",
            410: "`round_closed`, or `erased`: the device took this delta back.",
            422: "`wrong_model_version`, `non_finite` or `norm_exceeded`.",
        }, body=True),
    )  # fmt: skip
    async def upload(
        round_id: str,
        request: Request,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        key = idempotency_key or ""
        if not is_json(request):
            metrics.refuse("unsupported_media_type")
            return problem(415, "unsupported_media_type")
        body = await read_limited(request, max_body_bytes)
        logged = refusals.take(request)
        message = None
        if body is None:
            size = declared_length(request)
            verdict = await worker.run(lambda agg: agg.refuse_too_large(key, size, record=logged))
        elif (sealed := parsed_delta(body)) is not None and sealed.round_id != round_id:
            verdict = await worker.run(
                lambda agg: agg.refuse(body, key, "malformed", record=logged)
            )
            message = "The delta is for another round than the path's."
        else:
            # A missing key is still the aggregator's decision (logged, refused as malformed).
            verdict = await worker.accept(body, key, record=logged, sealed=sealed)
            if idempotency_key is None:
                message = "The Idempotency-Key header is required."
        refusals.settle(request, logged, "accept_delta", verdict.accepted, verdict.code)
        metrics.count(accepted=int(verdict.added), published=int(verdict.release is not None))
        if not verdict.accepted:
            metrics.refuse(verdict.code)
        return answer(verdict, message)

    @app.post(
        "/v1/pseudonyms/{pseudonym}/erasure",
        summary="Erase a pseudonym's pending delta (the body is the sealed delta to take back)",
        openapi_extra=DELTA_BODY,
        responses=documented_responses({
            200: "`{\"status\": \"erased\", \"code\": \"user_request\"}`.",
            400: "`malformed` (also: the delta belongs to another pseudonym than the path's), "
                 "or another code of a body that is not a sealed delta.",
            403: "`wrong_region`.",
            404: "`nothing_pending`: no pending delta matches.",
        }, body=True),
    )  # fmt: skip
    async def erase(pseudonym: str, request: Request) -> Response:
        if not is_json(request):
            return problem(415, "unsupported_media_type")
        body = await read_limited(request, max_body_bytes)
        if body is None:
            return problem(413, "too_large")
        if pseudonym_of(body) not in (None, pseudonym):
            return problem(
                400, "malformed", "The delta belongs to another pseudonym than the path's."
            )
        logged = refusals.take(request)
        verdict = await worker.run(lambda agg: agg.erase(body, record=logged))
        refusals.settle(request, logged, "erase", verdict.accepted, verdict.code)
        if verdict.accepted:
            metrics.count(erased=1)
        return answer(verdict)


def operator_routes(app: FastAPI, edge: Edge) -> None:
    worker, metrics = edge.worker, edge.metrics

    @app.get(
        "/v1/health",
        summary="Whether the service and its database answer",
        responses=documented_responses({200: '`{"status": "ok", "open_round": ...}`.'}),
    )
    async def health() -> dict[str, Any]:
        signed = await worker.run(lambda agg: agg.current_round())
        return {"status": "ok", "open_round": None if signed is None else signed.spec.round_id}

    @app.get(
        "/v1/metrics",
        summary="Prometheus counters",
        response_class=PlainTextResponse,
        responses=documented_responses({200: "Counters in the Prometheus text format."}),
    )
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=PROMETHEUS)
