"""Hostile-input benchmark: a fixed corpus of hostile requests against one region's aggregator
service on 127.0.0.1, and what they cost it.

Prints one JSON object on stdout (progress on stderr). The server is what an operator runs, in
its own process: ``sottovoce aggregator keygen`` (the example policy's EU region) and
``sottovoce aggregator serve``, whose schedule opens a round at start, here with short read
deadlines (``--header-timeout``, ``--body-timeout``) so that its slow clients are cut within
the run, and its default connection cap and refusal budget. Before the corpus, one honest
device enrolls and uploads a real sealed delta (the shipped ranker's size), which the corpus
then replays.

The corpus is the same every run (``corpus`` gives the count of each kind):

- ``slow``: slowloris clients sending their headers one byte every half second, clients that
  send complete headers and then a body one byte every half second, and clients that connect
  and send nothing; all are opened first and held while the rest runs;
- ``oversized``: bodies declaring 64 MiB (Content-Length) on every body route, 64 KiB sent;
- ``streamed``: chunked bodies that never end (up to 64 MiB sent each, 8 at a time) to
  enrollment without a token, with a wrong one, with the right one, to uploads and erasure;
- ``malformed``: uploads that are not sealed deltas (broken JSON, deep nesting, wrong types,
  garbage fields), each under a fresh idempotency key;
- ``replayed``: the honest upload sent again (answered 200, counted once), other bodies under its
  key (409), the same body for another round's path or without a key (400);
- ``bad_keys``: enrollment with small-order and malformed Ed25519 keys, non-canonical base64;
- ``bad_periods``: enrollment for periods the policy does not open (``x``, ``9999-12-31``,
  not a period start, long past, two ahead, a field of nearly 1 MiB);
- ``wrong_types``: bodies declared as anything but ``application/json``, on every body route;
- ``bad_tokens``: enrollment without a token, with wrong ones, with another scheme.

Measured: ``requests`` (hostile requests and connections), ``answers`` by status (and by kind
of request; ``None``: no answer), ``five_xx`` (must be 0; the corpus never opens more
connections than the cap, so even a 503 is a failure), the server's resident memory from
``/proc/PID/status``: ``idle_rss_mb`` after the honest device, ``peak_rss_mb`` during the corpus
(VmRSS sampled every 20 ms, and VmHWM after resetting it through ``/proc/PID/clear_refs``;
``peak_over_idle`` must be at most 1.5), its open file descriptors idle, when the slowest
client's deadline has passed (``fds_at_slow_deadline``: every slow client cut by then) and
after the corpus (``fds_after``: back to idle), and its decision log, read after the server
stopped (refusals beyond the per-source budget are counted into one entry per reason at the
schedule's tick and at stop): ``log_entries_added`` (``one_by_one`` and ``counted``, with the
refusals the counted ones hold), ``refused`` (4xx answers) and ``log_entries_per_refusal``.
``checks`` says whether each bound held; junk must never be accepted (a 2xx only for the
replays of the honest upload).

How each kind of request is made is in ``bench/_hostile_corpus.py``; the service is started with
``bench/_common.py``. Usage: ``python bench/hostile.py [--header-timeout S] [--body-timeout S]
[--malformed N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import Service, keygen, proc_status_kb, progress
from _hostile_corpus import REGION, TOKEN, Request, SlowClients, corpus, honest_device

from sottovoce.aggregator import RefusalLimit
from sottovoce.policy import DecisionLog, Policy, load_policy
from sottovoce.policy._decision import Metric

# -- the server and what /proc says about it ---------------------------------------------------


@dataclass
class Server:
    """``sottovoce aggregator serve`` for the EU region, in its own process."""

    service: Service
    workdir: Path
    policy: Policy

    @property
    def base(self) -> str:
        return self.service.base

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def pid(self) -> int:
        return self.service.process.pid

    @classmethod
    def start(cls, workdir: Path, *, header_timeout: float, body_timeout: float) -> Server:
        policy = keygen(workdir / "keys", region=REGION)
        options = ["--sweep-seconds", "5", "--log-level", "warning",
                   "--header-timeout", str(header_timeout),
                   "--body-timeout", str(body_timeout)]  # fmt: skip
        service = Service.start(region=REGION, keys=workdir / "keys",
                                db=workdir / "aggregator.db", log=workdir / "server.log",
                                options=options, env={"SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN},
                                ready="/v1/round")  # fmt: skip
        return cls(service, workdir, load_policy(policy))

    def rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmRSS") / 1024

    def hwm_mb(self) -> float:
        return proc_status_kb(self.pid, "VmHWM") / 1024

    def reset_hwm(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def fds(self) -> int:
        return sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())

    def alive(self) -> bool:
        return self.service.process.poll() is None

    def stop(self) -> None:
        self.service.stop()  # SIGTERM: the app writes its counted refusals, then ends


class RssSampler(threading.Thread):
    """The server's highest VmRSS, sampled every 20 ms until stopped."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.peak_mb, self.done = server, server.rss_mb(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak_mb = max(self.peak_mb, self.server.rss_mb())


# -- the run ---------------------------------------------------------------------------------


def _answered(request: Request) -> int | None:
    try:
        return request()
    except httpx.TransportError:
        return None  # no answer: counted under "None"


def log_size(db: Path) -> tuple[int, list[dict[str, Metric]]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        log = DecisionLog(conn)
        counted = [d.metrics for _, d in log.query() if "refusals" in d.metrics]
        return log.size, counted


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    progress("starting the aggregator (keygen, serve)...")
    server = Server.start(workdir, header_timeout=args.header_timeout,
                          body_timeout=args.body_timeout)  # fmt: skip
    db = workdir / "aggregator.db"
    deadline_s = args.header_timeout + args.body_timeout + 2
    try:
        with httpx.Client(timeout=60) as client:
            honest = honest_device(client, server.base, server.policy)
            for path in ("/v1/round", "/v1/health", "/v1/metrics", "/v1/model/release"):
                client.get(server.base + path)
        time.sleep(1.0)
        idle_rss, fds_idle = server.rss_mb(), server.fds()
        entries_before, _ = log_size(db)
        hwm_reset = server.reset_hwm()
        sampler = RssSampler(server)
        sampler.start()
        progress(f"idle: {idle_rss:.0f} MB, {fds_idle} fds; running the corpus...")
        slow = SlowClients(server.port, headers=100, bodies=20, idle=20, check_at=deadline_s,
                           count_fds=server.fds)  # fmt: skip
        slow_thread = threading.Thread(target=slow.run, args=(deadline_s + 60,), daemon=True)
        slow_thread.start()
        by_kind: dict[str, Counter[int | None]] = {}
        started = time.monotonic()
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(max_workers=8) as pool:
            work = list(
                corpus(
                    server.base,
                    server.port,
                    server.policy,
                    honest,
                    client,
                    malformed=args.malformed,
                )
            )
            for (kind, _), status in zip(work, pool.map(lambda w: _answered(w[1]), work),
                                         strict=True):  # fmt: skip
                by_kind.setdefault(kind, Counter())[status] += 1
        slow_thread.join()
        by_kind["slow"] = Counter(slow.statuses)
        corpus_s = time.monotonic() - started
        sampler.done.set()
        sampler.join()
        peak = max(sampler.peak_mb, server.hwm_mb() if hwm_reset else 0.0)
        settle = time.monotonic() + 30
        while server.fds() > fds_idle and time.monotonic() < settle:
            time.sleep(0.2)
        fds_after = server.fds()
        alive = server.alive()
    finally:
        server.stop()
    entries_after, counted = log_size(db)
    answers: Counter[int | None] = sum(by_kind.values(), Counter())
    refused = sum(n for status, n in answers.items() if status is not None and 400 <= status < 500)
    five_xx = sum(n for status, n in answers.items() if status is not None and status >= 500)
    added = entries_after - entries_before
    one_by_one = added - len(counted)
    limit = RefusalLimit()  # serve's default; the whole corpus comes from one address
    budget = limit.per_source + math.ceil(limit.per_source_per_minute * corpus_s / 60)
    accepted = {kind: sum(n for st, n in c.items() if st is not None and 200 <= st < 300)
                for kind, c in by_kind.items()}  # fmt: skip
    return {
        "requests": sum(sum(c.values()) for c in by_kind.values()),
        "corpus": {kind: sum(c.values()) for kind, c in sorted(by_kind.items())},
        "answers": _statuses(answers),
        "answers_by_kind": {kind: _statuses(c) for kind, c in sorted(by_kind.items())},
        "five_xx": five_xx,
        "unanswered": answers[None],
        "slow_clients": {
            "cut_with_408": slow.statuses.count(408),
            "of": len(slow.statuses),
            "last_cut_s": round(max(slow.seconds), 2),
        },
        "idle_rss_mb": round(idle_rss, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_over_idle": round(peak / idle_rss, 3),
        "fds_idle": fds_idle,
        "fds_at_slow_deadline": slow.fds_at_check,
        "fds_after": fds_after,
        "refused": refused,
        "log_entries_added": added,
        "log_entries_one_by_one": one_by_one,
        "log_entries_counted": len(counted),
        "refusals_in_counted_entries": sum(int(str(m["refusals"])) for m in counted),
        "log_entries_per_refusal": round(added / max(refused, 1), 4),
        "corpus_s": round(corpus_s, 1),
        "server_alive_after": alive,
        "settings": {
            "header_timeout_s": args.header_timeout,
            "body_timeout_s": args.body_timeout,
            "max_connections": 1000,
            "refusals_logged_one_by_one_per_source": limit.per_source,
        },
        "checks": {
            "no_5xx": five_xx == 0,
            "every_request_answered": answers[None] == 0,
            "junk_never_accepted": all(
                n == 0 for kind, n in accepted.items() if kind != "replayed"
            ),
            "peak_rss_within_1_5x_idle": peak <= 1.5 * idle_rss,
            "slow_clients_cut_by_the_deadline": (slow.fds_at_check or 0) <= fds_idle + 8,
            "fds_back_to_idle": fds_after <= fds_idle,
            "log_one_by_one_within_budget": one_by_one <= budget,
        },
    }


def _statuses(counts: Counter[int | None]) -> dict[str, int]:
    return {str(status): n for status, n in sorted(counts.items(), key=lambda kv: str(kv[0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    parser.add_argument("--body-timeout", type=float, default=4.0)
    parser.add_argument("--malformed", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sottovoce-hostile-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
