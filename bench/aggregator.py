"""Aggregator benchmark: sealed deltas/s through the real decision path, on SQLite and on
PostgreSQL, and peak memory against the round's cohort.

Prints one JSON object (progress goes to stderr). Every delta is a real one: a float32 vector of
the shipped ranker's size (``dim``, read from ``device/ranker.json`` through
``sottovoce.device.Ranker``; the aggregator is given only that number, the model id and the
ranker's weights as its base), sealed by ``sottovoce.sync.seal_delta`` for the EU region of the
example policy with the aggregator's own fresh keys (``generate_keys``, published by
``policy_with_keys``), by a device with its own Ed25519 key (enrolled for the period) and its own
device secret (so its own pseudonym). Rounds are central mode, noise multiplier 1, sampling rate
0.01, and every delta of a run is one device of the round's cohort (the policy's population is
the run's number of deltas over the sampling rate; minimum cohort 2, delta
``min(example's, 0.1 / population)``). A central round publishes at its deadline: once every
delta is in, the bench moves the aggregator's clock (the service's: ``SOTTOVOCE_NOW`` if set,
else the system clock) past the deadline and ``sweep`` closes it (noised sum over the expected
cohort, ledger step, signed release); ``close_ms`` is that sweep.

``backend`` (``--backend``) is the database of every run below: ``sqlite`` (a file, the
service's settings: WAL, synchronous=FULL) or ``postgres`` (a throwaway PostgreSQL server the
bench starts on 127.0.0.1 and stops, fsync and synchronous_commit on; a fresh database per
run). Unless ``--no-other``, the in-process and HTTP headline runs are repeated on the other
backend, under its name (``"postgres": {...}`` beside a SQLite run).

In process (``deltas_per_s``, see ``bench/_accepting.py``): the group commit as the service runs
it. The service's own ``Worker`` (one aggregator thread; uploads that arrive while it decides
wait for the next group, up to 64, one durable transaction per group, each answered after its
commit) is fed by ``--clients`` concurrent device clients on an event loop, each with one
upload in flight; ``group_size_mean`` is the groups it formed, ``latency_*`` each upload's time
from submission to answer. ``deltas_per_s_one_at_a_time`` is ``RegionAggregator.accept`` per
upload (one durable transaction each: the figure before group commit) and
``deltas_per_s_by_group`` is ``accept_many`` on fixed groups of 1, 4, 16 and 64, one thread.
Every run's ``cpu_s`` (the process's CPU over the timed loop) gives ``deltas_per_cpu_s``: on a
shared machine, what one core would take. ``variants`` repeats the headline with OpenBLAS
limited to one thread (``OPENBLAS_NUM_THREADS=1``), on SQLite's rollback journal
(``sqlite3.connect`` defaults) and on WAL with synchronous=NORMAL (with one OpenBLAS thread).
``breakdown_ms`` holds medians of the parts timed alone on the same deltas (parsing, opening,
the running sum's round trip, a bare durable transaction rewriting a blob of its size) and
``profile`` a cProfile run of ``accept_many`` in groups of the headline's mean group size.

Over HTTP (``deltas_per_s_http``): ``create_app`` served by uvicorn on 127.0.0.1 in its own
process (the service's Worker, so the same group commit), driven from this one by ``--clients``
concurrent httpx clients, each POSTing to ``/v1/rounds/{round_id}/deltas`` with
``Idempotency-Key``. Devices are enrolled before the server starts. The server imports opacus
when it starts, as one that has closed a round before has. After the uploads the bench asks
the server to close the round (its clock past the deadline, a sweep on its scheduler tick) and
checks that ``/v1/model/release`` serves version 1.

Memory (``peak_rss_mb_1k``, ``peak_rss_mb_100k``, see ``bench/_memory.py``): fresh processes
decide ``--n-small`` and ``--n-large`` deltas sealed on the fly by a child process and streamed
through a pipe, in groups of ``--group``, on the backend; against ``naive_peak_rss_mb_100k``, a
server that keeps every delta in memory. Each measured process is started through a tiny
launcher: Linux carries ``ru_maxrss`` over ``execve`` from the process that spawned it.

Usage: ``python bench/aggregator.py [--backend sqlite|postgres] [--n-throughput 2000]
[--clients 16] [--n-large 100000] [--no-other]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _accepting import median_ms, percentile_ms, throughput_child
from _common import progress
from _memory import generate_child, naive_child, stream_child, summary
from _region import (
    BACKENDS,
    SQLITE_SETTINGS,
    Databases,
    make_keys,
    open_db,
    prepare,
    settings_of,
)
from _serving import post_all, serve_child, wait_for_release

TARGET_DELTAS_PER_S = 700  # issue 17: SQLite, synchronous=FULL
GROUPS = (1, 4, 16, 64)
# Runs its arguments as a child: a small process to spawn from, for a clean ru_maxrss.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
_START = time.perf_counter()
_LOAD: list[float] = []  # 1-minute load averages seen at each progress line (other work)


def log(message: str) -> None:
    _LOAD.append(os.getloadavg()[0])
    progress(f"[bench/aggregator {time.perf_counter() - _START:7.1f}s] {message}")


def spawn(command: list[str], *, blas1: bool = False, **popen: Any) -> subprocess.Popen[bytes]:
    """This script in ``command``'s role, in a fresh process started through the launcher."""
    env = dict(os.environ)
    if blas1:
        env["OPENBLAS_NUM_THREADS"] = "1"
    argv = [sys.executable, "-c", LAUNCHER, sys.executable, __file__, *command]
    return subprocess.Popen(argv, env=env, **popen)


def child_json(command: list[str], *, blas1: bool = False) -> dict[str, Any]:
    child = spawn(command, blas1=blas1, stdout=subprocess.PIPE)
    out, _ = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"{command[0]} failed with exit code {child.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


# -- in process -------------------------------------------------------------------------------


class Runs:
    """What every run of one backend shares: its databases, the model and a work folder."""

    def __init__(self, dbs: Databases, work: Path, *, n: int, n_http: int, clients: int,
                 model_id: str, base_path: Path) -> None:  # fmt: skip
        self.dbs, self.work, self.n, self.n_http, self.clients = dbs, work, n, n_http, clients
        self.model_id, self.base_path = model_id, base_path

    def throughput(self, name: str, modes: list[str], *, journal: str = "service",
                   blas1: bool = False, n_profile: int = 0, profile_group: int = 16,
                   ) -> dict[str, Any]:  # fmt: skip
        """The modes (``bench/_accepting.py``) in one fresh child, each on a fresh database."""
        targets = [self.dbs.new(name) for _ in modes]
        profile_target = self.dbs.new(f"{name}_profile") if n_profile else None
        config = {"runs": list(zip(modes, targets, strict=True)), "n": self.n,
                  "clients": self.clients, "journal": journal, "model_id": self.model_id,
                  "base": str(self.base_path), "keys": str(make_keys(self.work / f"keys-{name}")),
                  "profile_target": profile_target, "n_profile": n_profile,
                  "profile_group": profile_group}  # fmt: skip
        log(
            f"in process [{self.dbs.backend} {name}]: {self.n} deltas each, {', '.join(modes)}"
            + (f", then {n_profile} under cProfile" if n_profile else "")
        )
        result = child_json(["_throughput", json.dumps(config)], blas1=blas1)
        for target in [*targets, *([profile_target] if profile_target else [])]:
            self.dbs.drop(target)
        for run in result["runs"]:
            if blas1:
                run["env"] = "OPENBLAS_NUM_THREADS=1"
            log(f"in process [{self.dbs.backend} {name}] {run['mode']}: {run['deltas_per_s']} "
                f"deltas/s, {run['deltas_per_cpu_s']} per CPU second")  # fmt: skip
        return result


def in_process(runs: Runs, *, n_profile: int, journal: str, variants: bool) -> dict[str, Any]:
    head = runs.throughput("headline", ["service", "single"], journal=journal)
    service, single = head["runs"]
    result: dict[str, Any] = {
        "n_throughput": runs.n,
        "deltas_per_s": service["deltas_per_s"],
        "deltas_per_cpu_s": service["deltas_per_cpu_s"],
        "clients": runs.clients,
        "group_size_mean": service["group_size_mean"],
        "latency_p50_ms": service["latency_p50_ms"],
        "latency_p99_ms": service["latency_p99_ms"],
        "close_ms": service["close_ms"],
        "settings": service["settings"],
        "deltas_per_s_one_at_a_time": single["deltas_per_s"],
        "deltas_per_cpu_s_one_at_a_time": single["deltas_per_cpu_s"],
        "accept_p50_ms_one_at_a_time": single["call_p50_ms"],
        "breakdown_ms": service["breakdown_ms"],
        "headline": service,
        "one_at_a_time": single,
    }
    if runs.dbs.backend == "sqlite":
        result |= {"target_deltas_per_s": TARGET_DELTAS_PER_S,
                   "meets_target": service["deltas_per_s"] >= TARGET_DELTAS_PER_S}  # fmt: skip
    if not variants:
        return result
    group = max(1, round(service["group_size_mean"]))
    by_group = runs.throughput("groups", [f"group:{g}" for g in GROUPS], journal=journal,
                               n_profile=n_profile, profile_group=group)  # fmt: skip
    result["deltas_per_s_by_group"] = {
        str(g): run["deltas_per_s"] for g, run in zip(GROUPS, by_group["runs"], strict=True)
    }
    result["deltas_per_cpu_s_by_group"] = {
        str(g): run["deltas_per_cpu_s"] for g, run in zip(GROUPS, by_group["runs"], strict=True)
    }
    others = [("openblas1", journal, True)]
    if runs.dbs.backend == "sqlite":
        others += [("rollback", "default", False), ("openblas1_wal", "wal", True)]
    done = {}
    for name, settings, blas1 in others:
        done[name] = runs.throughput(name, ["service"], journal=settings, blas1=blas1)["runs"][0]
    result |= {f"deltas_per_s_{name}": run["deltas_per_s"] for name, run in done.items()}
    return result | {"variants": done, "profile": by_group["profile"]}


# -- over HTTP --------------------------------------------------------------------------------


def over_http(runs: Runs, *, name: str, journal: str, blas1: bool) -> dict[str, Any]:
    n = runs.n_http
    log(f"http [{runs.dbs.backend} {name}]: sealing {n} deltas and enrolling their devices")
    target, keys = runs.dbs.new(f"http_{name}"), make_keys(runs.work / f"keys-http-{name}")
    conn = open_db(target, journal)
    prepared = prepare(conn, keys, n=n, model_id=runs.model_id, base=np.load(runs.base_path))
    conn.close()
    config = {"target": target, "journal": journal, "keys": str(keys), "cohort": n,
              "model_id": runs.model_id, "base": str(runs.base_path)}  # fmt: skip
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    server = spawn(["_serve", json.dumps(config)], blas1=blas1, **pipes)
    assert server.stdout is not None and server.stdin is not None
    try:
        started = json.loads(server.stdout.readline())
        root = f"http://127.0.0.1:{started['port']}"
        url = f"{root}/v1/rounds/{prepared.spec.round_id}/deltas"
        log(f"http [{runs.dbs.backend} {name}]: {n} uploads from {runs.clients} clients")
        elapsed, latencies, answers = asyncio.run(post_all(url, prepared.uploads, runs.clients))
        if answers != Counter({(200, "within_policy"): n}):
            raise SystemExit(f"uploads over HTTP were refused: {dict(answers)}")
        server.stdin.write(b"close\n")
        server.stdin.flush()
        wait_for_release(root)
        server.stdin.close()
        stopped = json.loads(server.stdout.readline())
    finally:
        if not server.stdin.closed:
            server.stdin.close()  # the server stops when its stdin ends
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    runs.dbs.drop(target)
    result = {
        "deltas_per_s": round(n / elapsed, 1),
        "latency_p50_ms": median_ms(latencies),
        "latency_p99_ms": percentile_ms(latencies, 0.99),
        "server": f"uvicorn ({started['impl']}), one process; the service's Worker decides "
        "uploads in groups on its aggregator thread",
        "settings": settings_of(target, journal),
        "server_peak_rss_mb": stopped["peak_rss_mb"],
    }
    log(f"http [{runs.dbs.backend} {name}]: {result['deltas_per_s']} deltas/s")
    return result


def http_keys(http: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    return {f"deltas_per_s_http{suffix}": http["deltas_per_s"],
            f"http_latency_p50_ms{suffix}": http["latency_p50_ms"],
            f"http_latency_p99_ms{suffix}": http["latency_p99_ms"]}  # fmt: skip


# -- memory -----------------------------------------------------------------------------------


def available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory(runs: Runs, *, small: int, large: int, group: int, dim: int, journal: str,
           skip_naive: bool) -> dict[str, Any]:  # fmt: skip
    done = {}
    for n in (small, large):
        target = runs.dbs.new(f"stream_{n}")
        log(f"memory: {n} deltas streamed through a fresh process ({runs.dbs.backend})")
        config = {"n": n, "group": group, "target": target, "journal": journal,
                  "keys": str(make_keys(runs.work / f"keys-stream-{n}")),
                  "model_id": runs.model_id, "base": str(runs.base_path),
                  "workdir": str(runs.work)}  # fmt: skip
        done[n] = child_json(["_stream", json.dumps(config)], blas1=True)
        log(f"memory: {done[n]}")
        runs.dbs.drop(target)
    result = summary(done[small], done[large], settings_of(target, journal))
    need_mb = large * dim * 4 / 2**20
    avail = available_mb()
    if skip_naive or (avail is not None and need_mb > 0.8 * avail):
        reason = "--skip-naive" if skip_naive else f"needs ~{need_mb:.0f} MB, {avail:.0f} free"
        log(f"memory: naive run skipped ({reason})")
        return result | {"naive_peak_rss_mb_100k": None, "naive_skipped": reason}
    log(f"memory: naive in-memory baseline, {large} deltas (~{need_mb:.0f} MB of arrays)")
    naive = child_json(["_naive", str(large), str(dim)])
    large_run = done[large]
    return result | {
        "naive_peak_rss_mb_100k": naive["peak_rss_mb"],
        "naive_baseline_rss_mb": naive["baseline_rss_mb"],
        "naive_vmhwm_mb_100k": naive["vmhwm_mb"],
        "naive_run_s": naive["seconds"],
        "naive_vs_streaming_rss_100k": round(naive["peak_rss_mb"] / large_run["peak_rss_mb"], 1),
        "naive_includes": "a list of n float32 opened-delta arrays drawn with numpy, then "
        "reduce(np.add)/n; no parsing, decryption, verification, database or torch",
    }


# -- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite",
                        help="database of every run (postgres: a throwaway server)")  # fmt: skip
    parser.add_argument("--no-other", action="store_true",
                        help="skip the headline runs on the other backend")  # fmt: skip
    parser.add_argument("--n-throughput", type=int, default=2_000, help="deltas per in-process run")
    parser.add_argument("--n-profile", type=int, default=300, help="deltas in a cProfile run")
    parser.add_argument("--n-http", type=int, default=2_000, help="deltas uploaded over HTTP")
    parser.add_argument("--clients", type=int, default=16,
                        help="concurrent device clients (in process and over HTTP)")  # fmt: skip
    parser.add_argument("--group", type=int, default=16, help="group size of the memory runs")
    parser.add_argument("--n-small", type=int, default=1_000, help="deltas, small memory run")
    parser.add_argument("--n-large", type=int, default=100_000, help="deltas, large memory run")
    parser.add_argument(
        "--journal", choices=sorted(SQLITE_SETTINGS), default="service",
        help="SQLite settings of the headline and HTTP runs (default: the service's)",
    )  # fmt: skip
    parser.add_argument(
        "--rss-journal", choices=sorted(SQLITE_SETTINGS), default="wal",
        help="SQLite settings of the memory runs (wal: 100k deltas fit the time budget)",
    )  # fmt: skip
    parser.add_argument("--skip-variants", action="store_true",
                        help="only headline, one-at-a-time, HTTP and memory runs")  # fmt: skip
    parser.add_argument("--skip-naive", action="store_true", help="skip the in-memory baseline")
    args = parser.parse_args()
    if min(args.n_throughput, args.n_http, args.n_small, args.n_large) < 2:
        parser.error("every run needs at least 2 deltas (a policy's minimum cohort)")
    if args.n_profile < 2 or args.clients < 1 or args.group < 1:
        parser.error("--n-profile must be at least 2, --clients and --group at least 1")
    return args


def backend_runs(backend: str, work: Path, args: argparse.Namespace, *, full: bool,
                 model_id: str, base_path: Path, dim: int) -> dict[str, Any]:  # fmt: skip
    """Every run on ``backend`` (``full``: variants and memory too, else the headlines)."""
    (work / backend).mkdir()
    journal = args.journal if backend == "sqlite" else "service"
    with Databases(backend, work / backend) as dbs:
        runs = Runs(
            dbs,
            work / backend,
            n=args.n_throughput,
            n_http=args.n_http,
            clients=args.clients,
            model_id=model_id,
            base_path=base_path,
        )
        result = in_process(runs, n_profile=args.n_profile, journal=journal,
                            variants=full and not args.skip_variants)  # fmt: skip
        result |= http_keys(http := over_http(runs, name="headline", journal=journal,
                                              blas1=False))  # fmt: skip
        result |= {"n_http": args.n_http, "http_server": http["server"], "http_server_peak_rss_mb":
                   http["server_peak_rss_mb"]}  # fmt: skip
        if full and not args.skip_variants and backend == "sqlite":
            result |= http_keys(over_http(runs, name="openblas1_wal", journal="wal", blas1=True),
                                "_openblas1_wal")  # fmt: skip
        if full:
            result |= memory(runs, small=args.n_small, large=args.n_large, group=args.group,
                             dim=dim, journal=args.rss_journal if backend == "sqlite"
                             else "service", skip_naive=args.skip_naive)  # fmt: skip
    return result


def main() -> None:
    args = parse_args()
    from sottovoce.device import Ranker

    ranker = Ranker.load()
    base = ranker.get_weights()
    model_id, dim = ranker.model_id, ranker.parameter_count
    if base.shape != (dim,):
        raise SystemExit("the ranker's weights do not match its parameter count")
    del ranker
    load_start = os.getloadavg()[0]
    log(f"model {model_id[:12]}…, {dim} parameters; load average {load_start:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-aggregator-") as tmp:
        work = Path(tmp)
        base_path = work / "base.npy"
        np.save(base_path, base)
        model = {"model_id": model_id, "base_path": base_path, "dim": dim}
        result = {"backend": args.backend, "model_id": model_id, "dim": dim,
                  **backend_runs(args.backend, work, args, full=True, **model)}  # fmt: skip
        if not args.no_other:
            other = next(b for b in BACKENDS if b != args.backend)
            result[other] = backend_runs(other, work, args, full=False, **model)
    result |= {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "sqlite_version": sqlite3.sqlite_version,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": round(load_start, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "load_average_max_seen": round(max(_LOAD), 2),
        "total_s": round(time.perf_counter() - _START, 1),
    }
    print(json.dumps(result))


ROLES = {"_throughput": throughput_child, "_serve": serve_child, "_generate": generate_child,
         "_stream": stream_child, "_naive": naive_child}  # fmt: skip

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        ROLES[sys.argv[1]](sys.argv[2:])
    else:
        main()
