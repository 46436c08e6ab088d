"""The load bench's HTTP/1.1 client: one kept-alive connection per simulated device, on asyncio
streams.

A load generator shares the machine with the service it measures, so it should cost little:
an ``httpx.AsyncClient`` spends about 4 ms of CPU per device and round (three requests), as much
as the service that answers them. This client writes a request (``Host``, ``Content-Length``,
the given headers, the body) and reads its answer: the status line, the headers, then a body of
``Content-Length`` bytes or ``Transfer-Encoding: chunked`` (nothing for 1xx, 204 and 304). It
opens a new connection after an answer that closed it (``Connection: close``) and raises
:class:`TransportError` for anything it cannot read as an answer (the connection is then
closed, and the next request opens another). It is not a general client: no TLS, redirects,
proxies or pipelining, and no retry of a request on a kept-alive connection the server closed
meanwhile (a device's requests here follow one another at once, well within keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final

__all__ = ["Answer", "DeviceConnection", "TransportError"]

_NO_BODY: Final = {204, 304}
_MAX_HEAD: Final = 64 * 1024


class TransportError(Exception):
    """The request got no complete HTTP answer (connection refused, reset or cut; a malformed
    answer); ``kind`` names the failure (the exception's type)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class DeviceConnection:
    """One device's connection to ``host:port`` (opened at the first request)."""

    def __init__(self, host: str, port: int, *, timeout: float = 60.0) -> None:
        self._host, self._port, self._timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        try:
            return await asyncio.wait_for(self._exchange(method, path, body, headers or {}),
                                          self._timeout)  # fmt: skip
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, ValueError) as error:  # fmt: skip
            await self.close()
            kind = type(error).__name__
            raise TransportError(kind, f"{method} {path}: {kind}: {error}") from None

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Answer:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, limit=_MAX_HEAD
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}:{self._port}",
                 f"Content-Length: {len(body)}"]  # fmt: skip
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.writelines([("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body])
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        version, status_text, *_ = status_line.split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x answer: {status_line!r}")
        status = int(status_text)
        fields: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if status in _NO_BODY or 100 <= status < 200 or method == "HEAD":
            content = b""
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            content = await _chunked(reader)
        elif "content-length" in fields:
            content = await reader.readexactly(int(fields["content-length"]))
        else:  # the body runs to the end of the connection
            content = await reader.read()
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return Answer(status, content)


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
