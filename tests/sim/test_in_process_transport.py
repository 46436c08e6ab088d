"""The simulator's in-process transport: an ASGI app reached without a socket, started and
stopped through its lifespan, from many threads at once, with the app's errors raised."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI, Request

from sottovoce.sim._in_process import InProcessTransport


def make_app(events: list[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.post("/echo/{name}")
    async def echo(name: str, request: Request) -> dict[str, object]:
        body = await request.body()
        return {"name": name, "size": len(body), "token": request.headers.get("x-token")}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the app failed")

    return app


def test_requests_reach_the_app_between_its_startup_and_shutdown() -> None:
    events: list[str] = []
    transport = InProcessTransport(make_app(events))
    assert events == ["startup"]
    with httpx.Client(transport=transport, base_url="http://eu.aggregator.invalid") as client:
        answer = client.post("/echo/ann", content=b"x" * 300_000, headers={"x-token": "t"})
        assert answer.status_code == 200
        assert answer.json() == {"name": "ann", "size": 300_000, "token": "t"}
        assert events == ["startup"]
    assert events == ["startup", "shutdown"]
    transport.close()  # closing again is harmless
    assert events == ["startup", "shutdown"]


def test_many_threads_share_one_app() -> None:
    events: list[str] = []
    with httpx.Client(transport=InProcessTransport(make_app(events)),
                      base_url="http://us.aggregator.invalid") as client:  # fmt: skip

        def call(n: int) -> object:
            return client.post(f"/echo/d{n}", content=bytes(n)).json()

        with ThreadPoolExecutor(8) as threads:
            answers = list(threads.map(call, range(200)))
    assert answers == [{"name": f"d{n}", "size": n, "token": None} for n in range(200)]
    assert events == ["startup", "shutdown"]


def test_an_error_in_the_app_reaches_the_caller() -> None:
    with httpx.Client(transport=InProcessTransport(make_app([])),
                      base_url="http://eu.aggregator.invalid") as client:  # fmt: skip
        with pytest.raises(RuntimeError, match="the app failed"):
            client.get("/boom")
        assert client.post("/echo/after", content=b"").status_code == 200  # still serving


def test_a_failed_startup_is_raised_and_leaves_no_thread() -> None:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        raise OSError("no database")
        yield  # pragma: no cover

    before = threading.active_count()
    with pytest.raises(RuntimeError, match=r"startup.failed(.|\n)*no database"):
        InProcessTransport(FastAPI(lifespan=lifespan))
    assert threading.active_count() == before
