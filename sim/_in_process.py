"""An httpx transport to an ASGI app in this process: how the simulator's devices reach an
in-process aggregator (the service's own app, its routes and middleware, without a socket).

One event loop thread runs the app, started with its lifespan as a server starts it and shut
down the same way when the transport closes; callers on any thread hand a request to the loop
and wait for its answer (one hop there and back). An error the app raises reaches the caller.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import httpx

__all__ = ["InProcessTransport"]

Message = dict[str, Any]


class InProcessTransport(httpx.BaseTransport):
    """Calls the ASGI ``app`` for every request, on the transport's own event loop thread."""

    def __init__(self, app: Any, *, name: str = "in-process-app") -> None:
        self._app = app
        self._asgi = httpx.ASGITransport(app=app)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        try:
            self._lifespan: _Lifespan = self._call(_Lifespan.start(app))
        except BaseException:
            self._halt()
            raise

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        status, headers, content = self._call(self._send(request, request.read()))
        return httpx.Response(status, headers=headers, content=content, request=request)

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._lifespan.stop())
            finally:
                self._halt()

    def _call(self, work: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _halt(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _send(self, request: httpx.Request,
                    body: bytes) -> tuple[int, httpx.Headers, bytes]:  # fmt: skip
        fresh = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        response = await self._asgi.handle_async_request(fresh)
        return response.status_code, response.headers, await response.aread()


class _Lifespan:
    """The app's side of the ASGI lifespan protocol, driven as a server drives it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.started: asyncio.Future[None] = loop.create_future()
        self.stopped: asyncio.Future[None] = loop.create_future()

    @classmethod
    async def start(cls, app: Any) -> _Lifespan:
        lifespan = cls(asyncio.get_running_loop())
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": {}}  # fmt: skip
        task = asyncio.get_running_loop().create_task(
            app(scope, lifespan.messages.get, lifespan.send)
        )
        task.add_done_callback(lifespan.ended)
        await lifespan.messages.put({"type": "lifespan.startup"})
        await lifespan.started
        return lifespan

    async def stop(self) -> None:
        await self.messages.put({"type": "lifespan.shutdown"})
        await self.stopped

    async def send(self, message: Message) -> None:
        kind = str(message["type"])
        waiter = self.started if kind.startswith("lifespan.startup") else self.stopped
        if kind.endswith(".failed"):
            waiter.set_exception(RuntimeError(f"the app's {kind}: {message.get('message', '')}"))
        elif not waiter.done():
            waiter.set_result(None)

    def ended(self, task: asyncio.Task[Any]) -> None:
        """The app's lifespan returned or raised: nothing is left to wait for (a startup that
        never completed fails with the app's error)."""
        error = None if task.cancelled() else task.exception()
        if not self.started.done():
            if error is not None:
                self.started.set_exception(error)
            else:
                self.started.set_result(None)
        if not self.stopped.done():
            self.stopped.set_result(None)
