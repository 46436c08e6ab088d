"""In-process runs of ``bench/aggregator.py``: sealed deltas decided by ``RegionAggregator`` as
the service decides them, in groups, or one at a time; the parts of a decision timed alone; a
profile.

Each run is its own round on a fresh database of the backend, its devices enrolled and their
deltas sealed before the timed loop (see :func:`_region.prepare`). The modes:

- ``service``: the service's group commit, driven as the service drives it. The real
  ``Worker`` of ``sottovoce.aggregator._edge`` (its one aggregator thread; uploads that arrive
  while it decides wait for the next group, at most 64) is fed by ``clients`` asyncio tasks on
  this process's event loop, each a device client with one upload in flight: it submits its
  next sealed delta as soon as the previous one is answered (after its group's commit). No
  HTTP: that is the ``over HTTP`` run. ``group_size_mean`` is what the Worker actually grouped.
- ``group:G``: ``RegionAggregator.accept_many`` on consecutive groups of ``G`` uploads, one
  thread (``group:1`` is one durable transaction per upload, through ``accept_many``).
- ``single``: ``RegionAggregator.accept`` per upload, one durable transaction each (the figure
  before group commit).

``deltas_per_s`` is uploads over the wall time of the loop; ``cpu_s`` is this process's CPU
time over it (all threads), so ``deltas_per_cpu_s`` shows what a core would take when the
machine is shared.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import pstats
import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from _common import percentile
from _region import (
    Prepared,
    check_published,
    close_round,
    open_db,
    prepare,
    settings_of,
)

BREAKDOWN_SAMPLES = 300
MAX_GROUP = 64  # the service's Worker default


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


def percentile_ms(values: list[float], q: float) -> float:
    """The ``q`` quantile of durations in seconds, in ms to 0.001."""
    return round(percentile(values, q) * 1000, 3)


# -- the modes -------------------------------------------------------------------------------


def one_at_a_time(prepared: Prepared) -> list[float]:
    """Seconds of each ``accept``, in upload order."""
    times = []
    for key, body in prepared.uploads:
        start = time.perf_counter()
        answer = prepared.agg.accept(body, key)
        times.append(time.perf_counter() - start)
        if not answer.added:
            raise SystemExit(f"an upload was refused: {answer}")
    return times


def in_groups(prepared: Prepared, group: int) -> list[float]:
    """Seconds of each ``accept_many`` of ``group`` consecutive uploads."""
    times = []
    for i in range(0, len(prepared.uploads), group):
        uploads = [(body, key, True) for key, body in prepared.uploads[i : i + group]]
        start = time.perf_counter()
        answers = prepared.agg.accept_many(uploads)
        times.append(time.perf_counter() - start)
        refused = [a for a in answers if isinstance(a, Exception) or not a.added]
        if refused:
            raise SystemExit(f"uploads were refused: {refused[:3]}")
    return times


class _Recorded:
    """The aggregator as the Worker sees it, recording the size of each group it decides."""

    def __init__(self, prepared: Prepared) -> None:
        self._agg = prepared.agg
        self.sizes: list[int] = []

    def accept_many(self, uploads: Any, *, parsed: Any = ()) -> Any:
        self.sizes.append(len(uploads))
        return self._agg.accept_many(uploads, parsed=parsed)

    def close(self) -> None:
        """Not the aggregator's: the Worker closes what it decided with when it stops, and the
        bench goes on with the aggregator (it closes the round, then the aggregator, itself)."""


def as_service(prepared: Prepared, clients: int) -> tuple[float, list[float], list[int]]:
    """The Worker fed by ``clients`` concurrent device clients (see the module docstring):
    (wall seconds, each upload's seconds from submission to answer, the groups' sizes)."""
    from sottovoce.aggregator._edge import Worker

    recorded = _Recorded(prepared)
    latencies: list[float] = []
    pending = iter(prepared.uploads)

    async def client(worker: Worker) -> None:
        for key, body in pending:
            start = time.perf_counter()
            answer = await worker.accept(body, key, record=True)
            latencies.append(time.perf_counter() - start)
            if not answer.added:
                raise SystemExit(f"an upload was refused: {answer}")

    async def run() -> float:
        worker = Worker(lambda: recorded, max_group=MAX_GROUP)  # type: ignore[arg-type,return-value]
        await worker.start()
        try:
            start = time.perf_counter()
            await asyncio.gather(*(client(worker) for _ in range(clients)))
            return time.perf_counter() - start
        finally:
            worker.stop()

    return asyncio.run(run()), latencies, recorded.sizes


# -- the parts of a decision, and a profile ---------------------------------------------------


def breakdown(prepared: Prepared) -> dict[str, float]:
    """Medians of the parts of a decision, each timed alone on the same deltas."""
    from sottovoce.aggregator import PartialSum
    from sottovoce.sync import SealedDelta, device_noise_std, open_delta

    spec, hpke = prepared.spec, prepared.keys.hpke
    parse, opening, summing, deltas = [], [], [], []
    for _, body in prepared.uploads[:BREAKDOWN_SAMPLES]:
        start = time.perf_counter()
        sealed = SealedDelta.from_wire(body)
        parse.append(time.perf_counter() - start)
        start = time.perf_counter()
        opened = open_delta(
            sealed,
            region=spec.region,
            round_id=spec.round_id,
            model_version=spec.model_version,
            hpke_private_key=hpke,
            clipping_norm=spec.clipping_norm,
            noise_std=device_noise_std(spec),
            dim=prepared.dim,
        )
        opening.append(time.perf_counter() - start)
        deltas.append(opened.delta)
    blob = PartialSum.empty(prepared.dim).to_bytes()
    for delta in deltas:
        start = time.perf_counter()
        blob = PartialSum.from_bytes(blob).add(delta).to_bytes()
        summing.append(time.perf_counter() - start)
    return {
        "from_wire_p50": median_ms(parse),
        "open_delta_p50": median_ms(opening),
        "partial_sum_roundtrip_p50": median_ms(summing),
        "blob_rewrite_p50": blob_rewrite(prepared, len(blob)),
        "running_sum_blob_bytes": len(blob),
    }


def blob_rewrite(prepared: Prepared, size: int) -> float:
    """Median ms of a bare durable write transaction replacing one ``size``-byte blob, in a
    table of its own in the run's database (same connection settings)."""
    from sottovoce._sqlite import write_transaction

    conn = prepared.conn
    with write_transaction(conn):
        conn.execute("CREATE TABLE bench_blob (id INTEGER PRIMARY KEY, b BLOB)")
        conn.execute("INSERT INTO bench_blob VALUES (1, ?)", (os.urandom(size),))
    times = []
    for _ in range(BREAKDOWN_SAMPLES):
        blob = os.urandom(size)
        start = time.perf_counter()
        with write_transaction(conn):
            conn.execute("UPDATE bench_blob SET b = ? WHERE id = 1", (blob,))
        times.append(time.perf_counter() - start)
    return median_ms(times)


class TimedConnection:
    """A connection that adds up the wall time of each SQL statement (profile run only)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.backend = getattr(conn, "backend", "sqlite")
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    @property
    def in_transaction(self) -> bool:
        return bool(self._conn.in_transaction)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        start = time.perf_counter()
        try:
            return self._conn.execute(sql, parameters)
        finally:
            statement = " ".join(sql.split())[:60]
            self.seconds[statement] += time.perf_counter() - start
            self.calls[statement] += 1

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Any:
        return self._conn.executemany(sql, seq_of_parameters)

    def rollback(self) -> None:
        self._conn.rollback()

    def close(self) -> None:
        self._conn.close()


# The parts of a decision, found in the profile by (path fragment, function name): cumulative
# time; builtins ("~") by a fragment of their name, own time.
PROFILE_PARTS: tuple[tuple[str, str, str], ...] = (
    ("accept_many", "sottovoce/aggregator/_uploads.py", "accept_many"),
    ("prepare (outside the transaction)", "sottovoce/aggregator/_uploads.py", "_prepare"),
    ("apply (inside the transaction)", "sottovoce/aggregator/_uploads.py", "_apply"),
    ("from_wire (sealed delta, stored round spec)", "sottovoce/sync/_wire.py", "from_wire"),
    ("open_delta", "sottovoce/sync/_seal.py", "open_delta"),
    ("hpke_decrypt", "~", "hpke.Suite' objects"),
    ("ed25519_verify", "~", "Ed25519PublicKey' objects"),
    ("numpy_dot (L2 norms)", "~", "'dot' of 'numpy.ndarray'"),
    ("base64_decode", "~", "a2b_base64"),
    ("json_decode", "~", "raw_decode"),
    ("sha256", "~", "openssl_sha256"),
    ("pydantic_validate", "~", "SchemaValidator' objects"),
    ("partial_sum_add", "sottovoce/aggregator/_partial_sum.py", "add"),
    ("partial_sum_to_bytes", "sottovoce/aggregator/_partial_sum.py", "to_bytes"),
    ("decision_log_append", "sottovoce/policy/_log.py", "append"),
)


def profile(prepared: Prepared, timed: TimedConnection, group: int) -> dict[str, Any]:
    """``in_groups`` under cProfile, on a ``TimedConnection``: ms per upload of the parts."""
    n = len(prepared.uploads)
    timed.seconds.clear()
    timed.calls.clear()
    profiler = cProfile.Profile()
    profiler.enable()
    in_groups(prepared, group)
    profiler.disable()
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    raw = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    per_upload, calls = {}, {}
    for label, where, name in PROFILE_PARTS:
        builtin = where == "~"
        rows = [
            row for (file, _, func), row in raw.items()
            if (name in func if builtin else func == name and where in file.replace("\\", "/"))
        ]  # fmt: skip
        if rows:
            per_upload[label] = round(sum(r[2 if builtin else 3] for r in rows) / n * 1000, 3)
            calls[label] = round(sum(r[1] for r in rows) / n, 2)
    top = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:8]
    statements = sorted(timed.seconds.items(), key=lambda item: item[1], reverse=True)[:6]
    return {
        "n": n,
        "group": group,
        "note": "ms per upload under cProfile, accept_many in groups (cumulative; builtins: own "
        "time)",
        "per_upload_ms": per_upload,
        "calls_per_upload": calls,
        "top_own_time_ms_per_upload": {
            re.sub(r" at 0x[0-9a-f]+", "", f"{Path(file).name}:{line}({func})"): round(
                row[2] / n * 1000, 3
            )
            for (file, line, func), row in top
        },
        "sql_total_ms_per_upload": round(sum(timed.seconds.values()) / n * 1000, 3),
        "sql_ms_per_upload": {sql: round(s / n * 1000, 3) for sql, s in statements},
        "sql_statements_per_upload": round(sum(timed.calls.values()) / n, 2),
    }


# -- the child ---------------------------------------------------------------------------------


def run_mode(mode: str, target: str, config: dict[str, Any], *, detail: bool) -> dict[str, Any]:
    """One run of ``mode`` on the database ``target`` (``detail``: also the breakdown)."""
    n, base = config["n"], np.load(config["base"])
    conn = open_db(target, config["journal"])
    prepared = prepare(conn, Path(config["keys"]), n=n, model_id=config["model_id"], base=base)
    cpu = time.process_time()
    sizes: list[int] = []
    if mode == "service":
        wall, times, sizes = as_service(prepared, config["clients"])
    elif mode == "single":
        times = one_at_a_time(prepared)
        wall = sum(times)
    else:
        times = in_groups(prepared, int(mode.split(":")[1]))
        wall = sum(times)
    cpu = time.process_time() - cpu
    info = prepared.agg.round(prepared.spec.round_id)
    if info is None or info.state != "open" or info.count != n:
        raise SystemExit(f"the round does not hold the {n} deltas: {info}")
    result: dict[str, Any] = {
        "mode": mode,
        "deltas_per_s": round(n / wall, 1),
        "cpu_s": round(cpu, 2),
        "deltas_per_cpu_s": round(n / cpu, 1),
        "latency_p50_ms" if mode == "service" else "call_p50_ms": median_ms(times),
        "latency_p99_ms" if mode == "service" else "call_p99_ms": percentile_ms(times, 0.99),
        "settings": settings_of(target, config["journal"]),
    }
    if sizes:
        result |= {"clients": config["clients"], "groups": len(sizes),
                   "group_size_mean": round(n / len(sizes), 1),
                   "group_size_max": max(sizes)}  # fmt: skip
    if detail:
        closing = close_round(prepared.agg, prepared.spec, prepared.clock)
        result["close_ms"] = round(closing * 1000, 2)
        check_published(prepared.agg, prepared.spec, n)
        result["breakdown_ms"] = breakdown(prepared)
    conn.close()
    return result


def throughput_child(args: list[str]) -> None:
    """Child: the runs its JSON config names (``runs``: [mode, target] pairs, the first with
    the breakdown), then optionally a profile on ``profile_target``; prints JSON."""
    config = json.loads(args[0])
    runs = [run_mode(mode, target, config, detail=i == 0)
            for i, (mode, target) in enumerate(config["runs"])]  # fmt: skip
    result: dict[str, Any] = {"runs": runs}
    if config.get("profile_target"):
        timed = TimedConnection(open_db(config["profile_target"], config["journal"]))
        prepared = prepare(timed, Path(config["keys"]), n=config["n_profile"],  # type: ignore[arg-type]
                           model_id=config["model_id"], base=np.load(config["base"]))  # fmt: skip
        result["profile"] = profile(prepared, timed, config["profile_group"])
        timed.close()
    print(json.dumps(result))
