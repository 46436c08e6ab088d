"""Over HTTP, for ``bench/aggregator.py``: the region's service in a child process of its own
(:func:`serve_child`: ``create_app`` on uvicorn, on 127.0.0.1, with the service's Worker and
its group commit), the concurrent device clients that upload to it (:func:`post_all`), and the
wait for the release its sweep publishes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _common import progress
from _memory import peak_rss_mb
from _region import BenchClock, build_aggregator, close_round, open_db

if TYPE_CHECKING:
    from sottovoce.aggregator import RegionAggregator

# How often the server's scheduler looks whether the bench asked it to close the round.
SERVE_TICK_S = 0.5


def serve_child(args: list[str]) -> None:
    """Child: the aggregator service on a free loopback port until stdin closes; a ``close``
    line on stdin ends the open round (clock past its deadline, then a sweep)."""
    import importlib
    import importlib.util

    import uvicorn

    from sottovoce.aggregator import create_app, load_keys

    importlib.import_module("opacus")  # as a server that has closed a round before has it
    config = json.loads(args[0])
    keys = load_keys(Path(config["keys"]))
    base = np.load(config["base"])
    clock = BenchClock()
    close_asked = threading.Event()

    def factory() -> RegionAggregator:
        conn = open_db(config["target"], config["journal"])
        return build_aggregator(conn, keys, cohort=config["cohort"], model_id=config["model_id"],
                                base=base, clock=clock)  # fmt: skip

    def scheduler(agg: RegionAggregator) -> None:
        # On the aggregator's thread, as the service's own schedule: nothing until asked.
        signed = agg.current_round() if close_asked.is_set() else None
        if signed is not None:
            start = time.perf_counter()
            close_round(agg, signed.spec, clock)
            took = time.perf_counter() - start
            progress(f"[bench/aggregator] http server: round closed by a sweep in {took:.2f} s")

    app = create_app(factory, enrollment_tokens={"bench-token"}, scheduler=scheduler,
                     tick_seconds=SERVE_TICK_S)  # fmt: skip
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    print(json.dumps({"port": port, "impl": f"{http}+{loop}"}), flush=True)
    for line in sys.stdin:  # the parent closes stdin when it is done
        if line.strip() == "close":
            close_asked.set()
    server.should_exit = True
    thread.join(timeout=30)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


async def post_all(
    url: str, uploads: list[tuple[str, bytes]], clients: int
) -> tuple[float, list[float], Counter[tuple[int, str]]]:
    import httpx

    latencies: list[float] = []
    answers: Counter[tuple[int, str]] = Counter()
    pending = iter(uploads)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=300.0) as client:

        async def device_client() -> None:
            for key, body in pending:
                headers = {"Content-Type": "application/json", "Idempotency-Key": key}
                start = time.perf_counter()
                response = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                answers[response.status_code, response.json().get("code", "")] += 1

        start = time.perf_counter()
        await asyncio.gather(*(device_client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return elapsed, latencies, answers


def wait_for_release(root: str, timeout: float = 120.0) -> None:
    """Wait until the server publishes release 1 (its sweep closes the round)."""
    import httpx

    give_up = time.monotonic() + timeout
    with httpx.Client() as client:
        while True:
            release = client.get(f"{root}/v1/model/release")
            if release.status_code == 200 and release.json()["version"] == 1:
                return
            if time.monotonic() > give_up:
                raise SystemExit(f"no release after the round: {release.status_code}")
            time.sleep(0.1)
