"""Several worker processes of one region behind one port (``serve --workers N``).

The parent builds the app once (so a bad configuration fails before anything listens), binds
the port, and forks N workers that each serve it on that socket with uvicorn (the kernel spreads
connections among them). Each worker opens its own aggregator, with its own connection pool
and its own running sums, on the region's PostgreSQL database: everything they must agree on
is in the database and decided under its lock (see :mod:`._postgres`):

- exactly-once acceptance: the idempotency key and the once-per-round pseudonym and device key
  are unique indexes, checked again under the region's write lock;
- each worker's running sum of a round is its own row, merged (checksums checked) by whichever
  worker closes the round; closing happens under the same lock, so a round closes once;
- the decision log is appended under that lock, so its entries form one sequence and one
  Merkle tree whatever worker wrote them.

A worker that dies (a crash, SIGKILL) loses only the requests it was answering: its committed
uploads are in the database, its uncommitted ones were never acknowledged and are retried by
their devices. The parent starts a new worker in its place. SIGTERM or SIGINT to the parent
stops every worker gracefully. SQLite has one writer process: more than one worker needs a
``postgresql://`` database.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import time
from types import FrameType

import uvicorn

from sottovoce.aggregator._postgres import is_postgres_url
from sottovoce.aggregator._service import ServiceConfig, ServiceConfigError, server_config

__all__ = ["serve"]

log = logging.getLogger("sottovoce.aggregator")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def serve(
    config: ServiceConfig, *, host: str, port: int, workers: int = 1, log_level: str = "info"
) -> None:
    """Serve the region on ``host:port`` with ``workers`` processes (see the module docstring)."""
    _check_workers(config, workers)
    uv = server_config(config, host=host, port=port, log_level=log_level)
    # What start-up made (modules, the app, pydantic's validators: about 78,000 objects) is
    # moved out of the collector's way: a full collection, every few hundred requests, then
    # walks only what requests made instead of pausing the service 20 ms. Workers inherit it.
    gc.collect()
    gc.freeze()
    if workers == 1:
        uvicorn.Server(uv).run()
        return
    sock = uv.bind_socket()
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def start(slot: int) -> None:
        # Signals wait while a worker is forked and registered: a SIGTERM then reaches every
        # worker, and never runs the parent's handler inside the new worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            code = 0
            try:
                uvicorn.Server(uv).run(sockets=[sock])
            except BaseException:
                log.exception("worker_failed", extra={"fields": {"slot": slot}})
                code = 1
            os._exit(code)
        children[pid] = slot
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        start(slot)
    log.info("workers", extra={"fields": {"workers": workers, "pids": sorted(children)}})
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        slot = children.pop(pid)
        if stopping:
            continue
        log.warning("worker_died", extra={"fields": {"slot": slot, "pid": pid,
                                                     "status": status}})  # fmt: skip
        time.sleep(0.2)  # a worker that dies at once must not spin the parent
        if not stopping:
            start(slot)
    sock.close()


def _check_workers(config: ServiceConfig, workers: int) -> None:
    if workers < 1:
        raise ServiceConfigError(f"--workers must be at least 1, not {workers}")
    if workers > 1 and not is_postgres_url(config.database):
        raise ServiceConfigError(
            "more than one worker needs a PostgreSQL database (--db postgresql://...): an "
            "SQLite file takes one writer process"
        )
