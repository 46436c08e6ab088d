"""What the service's OpenAPI document says each operation answers: every status it gives.

FastAPI documents a ``422`` "Validation Error" for any operation with parameters, but this
service answers a request it cannot validate with ``400 malformed``, in its own problem shape
(``{"code", "message"}``). :func:`documented_responses` lists, for one operation, each status
it can give and the codes behind it; :func:`without_validation_422` drops FastAPI's ``422`` (an
operation that really answers 422, the upload, declares its own) and the schemas only it used.
Statuses every operation can give come from the connection layer or the edge: ``408`` (the
request did not arrive in time, :mod:`._connections`), ``413`` (a declared body above the
limit), ``503`` (too many open connections) and ``500``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

__all__ = ["Problem", "documented_responses", "without_validation_422"]


class Problem(BaseModel):
    """A refusal: a stable machine-readable ``code`` and a sentence a person understands."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str


_COMMON: Final[dict[int, str]] = {
    408: "`too_slow`: the request's headers or body did not arrive in time; the connection is "
    "closed.",
    413: "`too_large`: the request body is larger than the service accepts.",
    500: "`internal`: the aggregator failed to process the request.",
    503: "`busy`: too many connections are open; the connection is closed.",
}
_BODY: Final[dict[int, str]] = {
    415: "`unsupported_media_type`: the body is not declared as `application/json`.",
}


def documented_responses(
    own: Mapping[int, str], *, body: bool = False
) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for an operation: ``own`` (status: what it means), the body
    routes' 415 when ``body``, and the statuses every operation can give. Refusals (4xx, 5xx)
    are :class:`Problem` objects."""
    listed = dict(own) | (_BODY if body else {}) | _COMMON
    return {
        status: {"description": text} | ({"model": Problem} if status >= 400 else {})
        for status, text in sorted(listed.items())
    }


def without_validation_422(app: FastAPI) -> None:
    """Make ``app.openapi()`` leave out FastAPI's generated 422 responses (see module docs),
    and give every refusal the JSON :class:`Problem` body (not the route's media type)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)  # fmt: skip
            ref = "#/components/schemas/HTTPValidationError"
            problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    content = responses.get("422", {}).get("content", {})
                    if content.get("application/json", {}).get("schema", {}).get("$ref") == ref:
                        del responses["422"]
                    for status, response in responses.items():
                        if int(status) >= 400:  # a refusal is JSON, whatever the route's type
                            response["content"] = problem
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
