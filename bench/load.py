"""Load benchmark: simulated devices against one region's aggregator service on 127.0.0.1.

Prints one JSON object on stdout (progress on stderr). The server is what an operator runs,
in its own process: ``sottovoce aggregator keygen`` makes the region's keys and publishes them
in the example policy, its EU region sized so that a round's expected cohort is ``--devices``
(the example's sampling rate and noise multiplier, population ``--devices`` over the sampling
rate, minimum cohort 2, delta at most 0.1 / population), and ``sottovoce aggregator serve
--workers N`` serves ``create_app`` over ``RegionAggregator`` on uvicorn (N worker processes on
one socket when N > 1), deciding concurrent uploads in groups (one durable transaction each),
with its JSON request log (to a file here) and its round scheduler, which sweeps every
``--sweep-seconds``: a central round publishes at the first sweep after its deadline
(``--round-minutes`` after it opened, on the service's clock: ``SOTTOVOCE_NOW`` if set, else the
system clock), and the next round opens within ``--sweep-seconds`` of that publication. Its
database (``--backend``) is an embedded SQLite file (WAL, synchronous=FULL) or a PostgreSQL
server this bench starts on 127.0.0.1 (``sottovoce._pgserver``: fsync and synchronous_commit
on) and stops, given to serve as ``--db postgresql://...``.

This process plays ``--devices`` devices per wave (one wave = one round), at most
``--concurrency`` at a time, on asyncio, each device on its own kept-alive HTTP/1.1
connection, as phones have (``_load_http``: a light client, so that the devices, on the same
cores, take as little CPU from the service as they can; ``httpx`` took as much as the
service). Each device does what a phone does in a round: ``POST /v1/enroll`` (bearer token)
its fresh per-period key, ``GET /v1/round``, and ``POST /v1/rounds/{id}/deltas`` its sealed
delta with its ``Idempotency-Key``. The deltas are real:
the shipped ranker's parameter count, clipped, signed and HPKE-encrypted to the key in the
policy by ``sottovoce.sync.seal_delta`` before the clock starts (sealing is the device's work,
not load on the aggregator; ``seal_ms`` is its cost), for the spec the bench fetched first.

Latencies are per request, client-side, from sending to having the whole answer, over every
answered request (refusals included): ``p50_ms``/``p99_ms`` are the uploads', ``enroll_*`` and
``spec_*`` the other two calls'. ``uploads_per_s`` is accepted uploads over the waves' wall
time (first device's start to the last device's end; enrollments and spec fetches share the
server with the uploads). ``errors`` counts non-2xx answers and transport errors, by phase,
status and code in ``errors_by_code``; a device stops at its first failed call.
``round_closed`` says whether every wave's round was published and its release is served: a
central round takes every upload until its deadline, so after each wave the bench waits (up to
the round's length and two sweeps, plus a minute) for the release the server's sweep publishes.
The round must outlast the sealing and the wave: a late upload is refused (``upload 410
round_closed``). The wait and the close are outside the wave's wall and CPU time.

CPU seconds during the waves (Linux ``/proc``): ``server_cpu_s`` is the user + system time of
the server's processes (its workers and, with N > 1, their parent), split into
``server_loop_cpu_s`` (the workers' main threads: uvicorn's event loops, which parse HTTP and
run FastAPI, the middlewares and the request log) and ``server_other_threads_cpu_s`` (mostly
each worker's one aggregator thread, which decides its requests); a worker's threads share one
GIL. ``database_cpu_s`` is the PostgreSQL server's processes' (``null`` on SQLite, whose work is
in the server's). ``client_cpu_s`` is this process's; ``other_cpu_s`` is what the rest of the
machine used meanwhile (far from 0: a shared machine disturbed the numbers). ``--ramp`` spreads
the devices' starts over some seconds instead of starting them all at once.
``--enrolled-ahead`` enrolls every device before each wave, outside its time and CPU figures (a
phone enrolls once per budget period, not once per round): the wave is then fetching the round
and uploading, and ``enroll_*`` are ``null``.

Usage: ``python bench/load.py [--backend sqlite|postgres] [--workers N] [--devices N]
[--concurrency C] [--waves W] [--ramp S] [--round-minutes M] [--enrolled-ahead]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from _common import Service, keygen, percentile, progress
from _load_devices import PHASES, TOKEN, Stats, enroll_ahead, make_devices, run_wave
from _load_measures import CpuSample, Database

from sottovoce.device import Ranker
from sottovoce.policy import Policy, example_policy, load_policy
from sottovoce.sync import (
    RoundSpec,
    SignedRoundSpec,
    verify_round_spec,
)
from sottovoce.sync._wire import b64decode

REGION = "eu"
AIM_P99_MS = 250.0


# -- the server ------------------------------------------------------------------------------


@dataclass
class Server:
    """``sottovoce aggregator serve`` for one region, in its own process (with ``--workers``
    above 1: a parent process and its forked workers)."""

    service: Service
    base: str
    policy: Policy
    round_seconds: float
    sweep_seconds: float

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        db: str,
        workers: int,
        cohort: int,
        round_minutes: float,
        sweep_seconds: float,
    ) -> Server:
        data = example_policy().model_dump(mode="json")
        (region,) = (r for r in data["regions"] if r["id"] == REGION)
        privacy = region["privacy"]
        # The example's mechanism (sampling rate, noise multiplier), for a population whose
        # expected cohort is the wave: sampling_rate x population >= cohort.
        population = math.ceil(cohort / privacy["sampling_rate"])
        privacy.update({"population": population, "min_cohort": 2,
                        "delta": min(privacy["delta"], 0.1 / population)})  # fmt: skip
        (workdir / "policy.json").write_text(json.dumps(data))
        keys = workdir / "keys"
        policy = keygen(keys, region=REGION, policy=workdir / "policy.json")
        options = ["--round-minutes", str(round_minutes), "--sweep-seconds", str(sweep_seconds),
                   "--workers", str(workers)]  # fmt: skip
        service = Service.start(region=REGION, keys=keys, db=db, log=workdir / "server.log",  # type: ignore[arg-type]
                                options=options, env={"SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN},
                                timeout=120.0)  # fmt: skip
        return cls(service, service.base, load_policy(policy), round_seconds=60 * round_minutes,
                   sweep_seconds=sweep_seconds)  # fmt: skip

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.service.process

    def next_round(self, after: str | None, timeout: float = 120.0) -> RoundSpec:
        """The open round's checked spec, once the scheduler has opened one other than
        ``after``."""
        verify_key = self.policy.region(REGION).key("signing").key
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = httpx.get(f"{self.base}/v1/round", timeout=30)
            if answer.status_code == 200:
                spec = verify_round_spec(SignedRoundSpec.from_wire(answer.content), verify_key)
                if spec.round_id != after:
                    return spec
            time.sleep(0.1)
        raise RuntimeError(f"no new round was opened; the server's log:\n{self.tail()}")

    def published(self, *, version: int, round_id: str) -> bool:
        """Whether ``round_id`` is no longer open and release ``version`` is served."""
        release = httpx.get(f"{self.base}/v1/model/release", timeout=30)
        served = release.json().get("version") if release.status_code == 200 else None
        current = httpx.get(f"{self.base}/v1/round", timeout=30)
        still_open = current.status_code == 200 and round_id.encode() in current.content
        return served == version and not still_open

    def wait_published(self, *, version: int, round_id: str) -> bool:
        """Whether ``round_id`` gets published as release ``version``: the server's sweep does
        it at the round's deadline, at most a round's length (plus two sweeps) from now."""
        give_up = time.monotonic() + self.round_seconds + 2 * self.sweep_seconds + 60
        while not self.published(version=version, round_id=round_id):
            if time.monotonic() > give_up or self.process.poll() is not None:
                return False
            time.sleep(0.25)
        return True

    def tail(self, lines: int = 20) -> str:
        return self.service.tail(lines)

    def stop(self) -> None:
        self.service.stop(15)  # SIGTERM: uvicorn shuts down, the aggregator thread ends


# -- the run ---------------------------------------------------------------------------------


def p_ms(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of latencies in ms, to 0.01 ms (``None`` for none)."""
    return round(percentile(values, q), 2) if values else None


@dataclass
class Totals:
    """What the waves add up to: wall and CPU seconds, rounds published, sizes."""

    walls: list[float] = field(default_factory=list)
    seal_ms: list[float] = field(default_factory=list)
    published: int = 0
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CpuSample.NAMES, 0.0))
    dim: int = 0
    body_bytes: int = 0

    def add_cpu(self, before: CpuSample, after: CpuSample) -> None:
        for name in CpuSample.NAMES:
            start, end = getattr(before, name), getattr(after, name)
            if start is not None and end is not None:
                self.cpu[name] += end - start


def run_waves(args: argparse.Namespace, concurrency: int, stats: Stats) -> Totals:
    """Start the service and run every wave against it."""
    totals = Totals(dim=Ranker.load().parameter_count)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp, Database(args.backend, Path(tmp)) as db:
        server = Server.start(Path(tmp), db=db.target, workers=args.workers, cohort=args.devices,
                              round_minutes=args.round_minutes,
                              sweep_seconds=args.sweep_seconds)  # fmt: skip
        progress(f"aggregator pid {server.process.pid} ({args.workers} worker(s), "
                 f"{args.backend}) at {server.base}")  # fmt: skip
        hpke_key = b64decode(server.policy.region(REGION).key("hpke").key)
        round_id = None
        try:
            for wave in range(1, args.waves + 1):
                spec = server.next_round(after=round_id)
                round_id = spec.round_id
                devices, seal_ms = make_devices(args.devices, spec=spec, hpke_key=hpke_key,
                                                dim=totals.dim, rng=rng)  # fmt: skip
                totals.seal_ms.append(seal_ms)
                totals.body_bytes = len(devices[0].upload_body)
                if args.enrolled_ahead:
                    asyncio.run(enroll_ahead(server.base, devices))
                before = CpuSample.take(server.process.pid, db.pid())
                wall = asyncio.run(run_wave(server.base, devices, round_id, stats=stats,
                                            concurrency=concurrency, ramp=args.ramp,
                                            enroll=not args.enrolled_ahead))  # fmt: skip
                totals.add_cpu(before, CpuSample.take(server.process.pid, db.pid()))
                totals.walls.append(wall)
                print(f"wave {wave}: {wall:.2f} s; waiting for round {round_id} to publish at "
                      "its deadline", file=sys.stderr)  # fmt: skip
                published = server.wait_published(version=wave, round_id=round_id)
                totals.published += published
                recent = stats.latencies["upload"][-args.devices :]
                print(f"wave {wave}: {wall:.2f} s, round {round_id} "
                      f"{'published' if published else 'NOT published'}, upload p99 "
                      f"{p_ms(recent, 0.99)} ms, errors so far "
                      f"{sum(stats.errors.values())}", file=sys.stderr)  # fmt: skip
        finally:
            server.stop()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200, help="devices per wave (= cohort)")
    parser.add_argument("--concurrency", type=int, default=None, help="default: --devices")
    parser.add_argument("--waves", type=int, default=1, help="rounds, one after another")
    parser.add_argument("--ramp", type=float, default=0.0,
                        help="seconds over which a wave's device starts are spread (default 0: "
                             "all at once)")  # fmt: skip
    parser.add_argument(
        "--round-minutes",
        type=float,
        default=0.5,
        help="how long the server keeps a round open (it publishes at the deadline; each wave "
        "waits for it): long enough to seal --devices deltas and run the wave",
    )
    parser.add_argument(
        "--sweep-seconds",
        type=float,
        default=1.0,
        help="the server's schedule interval (the next wave waits for it)",
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the region's database (postgres: a throwaway server on loopback)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve's worker processes (more than 1 needs --backend postgres)",
    )
    parser.add_argument("--enrolled-ahead", action="store_true",
                        help="enroll the devices before each wave (not measured): the wave is "
                        "fetching the round and uploading")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    concurrency = args.devices if args.concurrency is None else args.concurrency
    if args.devices < 2:
        parser.error("--devices must be at least 2 (the policy's smallest cohort)")
    if not 1 <= concurrency <= args.devices:
        parser.error("--concurrency must be between 1 and --devices")
    if not 1 <= args.waves <= 50:
        parser.error("--waves must be between 1 and 50 (the period's privacy budget)")
    if args.workers < 1 or (args.workers > 1 and args.backend != "postgres"):
        parser.error("--workers must be at least 1, and more than 1 needs --backend postgres")
    if args.ramp < 0 or args.sweep_seconds <= 0 or args.round_minutes <= 0:
        parser.error("--ramp must be >= 0, --sweep-seconds and --round-minutes > 0")

    load_before = os.getloadavg()[0]
    stats = Stats()
    totals = run_waves(args, concurrency, stats)
    enrolls, specs, uploads = (stats.latencies[p] for p in PHASES)
    errors = sum(stats.errors.values())
    p99 = p_ms(uploads, 0.99)
    cpu = totals.cpu
    other_cpu = cpu["machine"] - cpu["server"] - cpu["database"] - cpu["client"]
    print(json.dumps({
        "backend": args.backend,
        "workers": args.workers,
        "devices": args.devices,
        "concurrency": concurrency,
        "waves": args.waves,
        "ramp_s": args.ramp,
        "enrolled_ahead": args.enrolled_ahead,
        "uploads_accepted": stats.accepted,
        "uploads_per_s": round(stats.accepted / sum(totals.walls), 1),
        "p50_ms": p_ms(uploads, 0.5),
        "p99_ms": p99,
        "max_ms": round(max(uploads), 2) if uploads else None,
        "mean_ms": round(statistics.fmean(uploads), 2) if uploads else None,
        "errors": errors,
        "errors_by_code": dict(sorted(stats.errors.items())),
        "enroll_p50_ms": p_ms(enrolls, 0.5),
        "enroll_p99_ms": p_ms(enrolls, 0.99),
        "spec_p50_ms": p_ms(specs, 0.5),
        "spec_p99_ms": p_ms(specs, 0.99),
        "round_closed": totals.published == args.waves,
        "rounds_published": totals.published,
        "wave_wall_s": [round(w, 3) for w in totals.walls],
        "server_cpu_s": round(cpu["server"], 2),
        "server_loop_cpu_s": round(cpu["server_loop"], 2),
        "server_other_threads_cpu_s": round(cpu["server"] - cpu["server_loop"], 2),
        "server_cpu_per_device_ms": round(cpu["server"] / max(stats.accepted, 1) * 1e3, 2),
        "database_cpu_s": round(cpu["database"], 2) if args.backend == "postgres" else None,
        "client_cpu_s": round(cpu["client"], 2),
        "other_cpu_s": round(max(other_cpu, 0.0), 2),
        "load_avg_1m_before": round(load_before, 2),
        "cpu_count": os.cpu_count(),
        "aim": {"p99_ms": AIM_P99_MS, "errors": 0,
                "met": errors == 0 and p99 is not None and p99 <= AIM_P99_MS},
        "dim": totals.dim,
        "upload_body_bytes": totals.body_bytes,
        "seal_ms": round(statistics.fmean(totals.seal_ms), 2),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
