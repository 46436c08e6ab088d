"""The simulated devices of ``bench/load.py``: each one's requests for a round, built and
sealed before the clock starts, and the asyncio code that plays them against the service
(each device on its own HTTP/1.1 connection, :mod:`_load_http`), recording every answer's
latency and status by phase."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from _load_http import Answer, DeviceConnection, TransportError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sottovoce.sync import (
    PROTOCOL_VERSION,
    RoundSpec,
    new_device_secret,
    period_label,
    seal_delta,
)
from sottovoce.sync._wire import b64encode

TOKEN = "bench-enrollment-token"
PHASES = ("enroll", "spec", "upload")


@dataclass(frozen=True)
class Device:
    """One simulated device's requests for one round, built before the clock starts."""

    enroll_body: bytes
    idempotency_key: str
    upload_body: bytes


def make_devices(
    n: int, *, spec: RoundSpec, hpke_key: bytes, dim: int, rng: np.random.Generator
) -> tuple[list[Device], float]:
    """``n`` devices with fresh keys and sealed deltas; returns them and ms per seal."""
    period = period_label(spec)
    devices, seal_s = [], 0.0
    for _ in range(n):
        key = Ed25519PrivateKey.generate()
        # A local round's delta: most within the clipping norm, some clipped by the seal.
        delta = rng.normal(size=dim)
        delta *= rng.uniform(0.2, 1.5) * spec.clipping_norm / np.linalg.norm(delta)
        t = time.perf_counter()
        sealed = seal_delta(
            delta=delta.astype(np.float32),
            spec=spec,
            device_secret=new_device_secret(),
            signing_key=key,
            aggregator_hpke_key=hpke_key,
            rng=rng,
        )
        body = sealed.to_wire()
        seal_s += time.perf_counter() - t
        raw_key = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        enroll = {"protocol": PROTOCOL_VERSION, "device_key": b64encode(raw_key), "period": period}
        devices.append(Device(json.dumps(enroll).encode(), sealed.idempotency_key, body))
    return devices, seal_s / n * 1000


@dataclass
class Stats:
    """Latencies by phase and failures by phase, status and code, over all waves."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    errors: Counter[str] = field(default_factory=Counter)
    accepted: int = 0


async def call(stats: Stats, phase: str, request: Awaitable[Answer]) -> Answer | None:
    """Send one request; ``None`` (and an error counted) unless it is answered 2xx."""
    t = time.perf_counter()
    try:
        response = await request
    except TransportError as error:
        stats.errors[f"{phase} transport {error.kind}"] += 1
        return None
    stats.latencies[phase].append((time.perf_counter() - t) * 1000)
    if 200 <= response.status < 300:
        return response
    try:
        code = json.loads(response.body).get("code", "?")
    except (ValueError, AttributeError):
        code = "not_json"
    stats.errors[f"{phase} {response.status} {code}"] += 1
    return None


async def run_device(
    conn: DeviceConnection, device: Device, round_id: str, stats: Stats, *, enroll: bool = True
) -> None:
    if enroll and not await enroll_device(conn, device, stats):
        return
    answer = await call(stats, "spec", conn.request("GET", "/v1/round"))
    if answer is None:
        return
    if json.loads(answer.body)["spec"]["round_id"] != round_id:
        stats.errors["spec 200 other_round"] += 1
        return
    headers = {"Idempotency-Key": device.idempotency_key, "Content-Type": "application/json"}
    path = f"/v1/rounds/{round_id}/deltas"
    if await call(stats, "upload", conn.request("POST", path, body=device.upload_body,
                                                headers=headers)):  # fmt: skip
        stats.accepted += 1


async def enroll_device(conn: DeviceConnection, device: Device, stats: Stats) -> bool:
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    enrolled = conn.request("POST", "/v1/enroll", body=device.enroll_body, headers=auth)
    return await call(stats, "enroll", enrolled) is not None


async def enroll_ahead(base: str, devices: list[Device]) -> None:
    """Enroll every device before the wave, 16 at a time (not measured): a device enrolls
    once per budget period, not once per round."""
    stats, gate = Stats(), asyncio.Semaphore(16)

    async def one(device: Device) -> None:
        async with gate:
            conn = connection_to(base)
            try:
                await enroll_device(conn, device, stats)
            finally:
                await conn.close()

    await asyncio.gather(*(one(d) for d in devices))
    if stats.errors:
        raise SystemExit(f"enrolling ahead failed: {dict(stats.errors)}")


def connection_to(base: str) -> DeviceConnection:
    """A device's connection to the service at ``base`` (``http://host:port``)."""
    url = urlsplit(base)
    if url.scheme != "http" or url.hostname is None or url.port is None:
        raise ValueError(f"the bench talks plain HTTP to host:port, not {base!r}")
    return DeviceConnection(url.hostname, url.port)


async def run_wave(
    base: str,
    devices: list[Device],
    round_id: str,
    *,
    concurrency: int,
    ramp: float,
    stats: Stats,
    enroll: bool = True,
) -> float:
    """All devices of one wave, at most ``concurrency`` at a time; returns the wall seconds.

    Device ``i`` of ``n`` starts ``ramp * i / n`` seconds after the first.
    """
    # One connection per device, as phones have; a light client (see _load_http) so that
    # the devices' CPU, on the same cores, takes as little from the service as it can.
    conns = [connection_to(base) for _ in devices]
    await conns[0].request("GET", "/v1/health")  # the service answers (not measured)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, device: Device) -> None:
        await asyncio.sleep(ramp * i / len(devices))
        async with gate:
            await run_device(conns[i], device, round_id, stats, enroll=enroll)

    try:
        t = time.perf_counter()
        await asyncio.gather(*(one(i, d) for i, d in enumerate(devices)))
        return time.perf_counter() - t
    finally:
        await asyncio.gather(*(c.close() for c in conns))
