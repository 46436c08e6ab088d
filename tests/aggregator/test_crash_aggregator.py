"""Kill the aggregator, or a device uploading to it, with SIGKILL; nothing counts twice or never.

Three places, each a child process (``crash_child.py``) killed at a seeded random moment, one to
three times per file, and checked after every kill on a copy of the files left behind:

Delta aggregation (``accept``): a :class:`RegionAggregator` on a SQLite file takes pre-sealed
deltas (with replays, and deltas of devices that are not enrolled) and acknowledges each answer
after ``accept`` returns. After a kill: every acknowledged answer is kept as given; the round's
count, its running sum (the sum of exactly the accepted deltas) and the ``accept_delta``
decisions agree with the contribution rows; the decision log verifies against the region's
checkpoint key. Then the aggregator restarts in process and every delta is sent again, as
retrying devices would: the round counts each enrolled delta exactly once.

Round close (``close``): the same, then the child sweeps past the round's deadline, as the
service's schedule does, which publishes the central round; killed mostly during that sweep.
The round is then either published, with every enrolled delta, exactly one signed release
(base + the sum of the accepted deltas on the grid plus the seeded central noise, over the
expected cohort), one ledger entry, one ``deadline_reached`` decision, a signed checkpoint over
it and no running sum; or still open with its running sum intact and none of those, and then
the restarted aggregator's sweep publishes it. Never a release without a ledger entry or the
other way round.

Upload (``upload``): a device's :class:`~sottovoce.sync.transport.Uploader` sends its store's
outbox to the aggregator service on a real uvicorn on 127.0.0.1, started once here. After a
kill, every delta the device holds as acknowledged is counted by the aggregator, and nothing is
dropped or refused; an uploader restarted in process gets every delta acknowledged; in the end
the round counts each distinct delta once (count, rows, decisions and the service's metric).

The children fork from a warmed-up zygote (see ``crash_child.py``), so a trial costs
milliseconds rather than the seconds of importing torch for the privacy accountant. Kill timing
is not reproducible: a failure names its chain seed (which fixes the orders and the delays) and
keeps the files under pytest's ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from aggregator_helpers import DIM, EXPECTED, T0, Keys, central_update, stored_sum
from conftest import consenting
from crash_child import MARKERS, REGION, World, stream
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._partial_sum import PartialSum
from sottovoce.device import EventStore, ModelWeights
from sottovoce.policy import DecisionLog, Purpose
from sottovoce.sync import (
    RoundSpec,
    SealedDelta,
    new_device_secret,
    period_label,
    seal_delta,
    verify_release,
    verify_round_spec,
)
from sottovoce.sync._wire import b64encode
from sottovoce.sync.transport import RetryPolicy, Uploader

pytest.importorskip("opacus")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")

CHILD = Path(__file__).with_name("crash_child.py")
MODEL_ID = "ef" * 32
SIGMA, Q = 1.0, 0.01  # the policy's mechanism (Keys.policy): a round costs epsilon ~1.2 of 4
NOISE_SEED = 11
# The accept and upload rounds never end (the aggregator's clock stands at T0); the close round
# ends at the sweep an hour later, before the region's one-day retention of contribution rows.
OPEN_ROUND, CLOSE_ROUND = timedelta(days=7), timedelta(hours=1)
ACCEPT_DELTAS, CLOSE_DELTAS, STRANGERS = 24, 6, 2  # per file; strangers are not enrolled
UPLOAD_DELTAS = 8  # in each device's outbox
DEFAULT_TRIALS = 8  # per place
SLOW_BLOCKS, SLOW_TRIALS_PER_BLOCK = 4, 50  # 200 kills per place with -m slow
WORKERS = 2  # chains run side by side; each chain is sequential
CHAIN_LENGTHS = (1, 1, 2, 3)  # kills per file
START_TIMEOUT_S = 60.0
USER = "ann"
TOKEN = "crash-enrollment-token"


# pyproject's addopts does not deselect slow tests, so keep them out of a plain run here (a
# condition string, so the skip comes before the module's fixtures are built).
slow_only = pytest.mark.skipif(
    "'slow' not in (config.getoption('markexpr') or '')",
    reason=f"{SLOW_BLOCKS * SLOW_TRIALS_PER_BLOCK} kill trials per place: run with -m slow",
)


# -- children --------------------------------------------------------------------------------
class Zygote:
    """A ``crash_child.py zygote`` process: forks children that are ready to work at once.

    Shared by the worker threads (a fork request is a line out and a line back, under a lock);
    started early, so it warms up while the test builds its files.
    """

    def __init__(self, log: Path) -> None:
        with log.open("wb") as err:
            self._proc = subprocess.Popen([sys.executable, str(CHILD), "zygote"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err, text=True)  # fmt: skip
        self._log = log
        self._lock = threading.Lock()
        self._ready = False

    def _ask(self, line: str | None) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        if line is not None:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        assert answer, f"the zygote ended:\n{self._log.read_text(errors='replace')}"
        return answer.strip()

    def fork(self, args: list[str], *, log: Path) -> int:
        """Fork a child running ``crash_child.py ARGS`` (output to ``log``); its pid."""
        with self._lock:
            if not self._ready:
                assert self._ask(None) == "ready", self._log.read_text(errors="replace")
                self._ready = True
            answer = self._ask(json.dumps([*args, str(log)]))
        assert answer.isdigit(), f"the zygote answered {answer!r}"
        return int(answer)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    started = Zygote(tmp_path_factory.mktemp("zygote") / "zygote.log")
    yield started
    started.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # gone, and reaped: the zygote leaves that to the kernel
    return True


def kill_child(
    zygote: Zygote,
    args: list[str],
    ack: Path,
    trigger: Callable[[list[str]], bool],
    delay: float,
    *,
    log: Path,
    where: str,
) -> None:
    """Fork a child, wait for its ``ready`` and then for ``trigger`` on the lines after it (or
    for ``done``), sleep ``delay`` and kill it."""
    pid = zygote.fork(args, log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            lines = ack.read_text().split("\n")[:-1] if ack.exists() else []
            if lines[:1] == ["ready"] and ("done" in lines or trigger(lines[1:])):
                break
            if not alive(pid):
                raise AssertionError(f"{where}: the child exited by itself:\n"
                                     f"{log.read_text(errors='replace')}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"{where}: no trigger in {START_TIMEOUT_S} s")
            time.sleep(0.0005)
        time.sleep(delay)
        if not alive(pid):
            raise AssertionError(f"{where}: the child exited by itself before the kill:\n"
                                 f"{log.read_text(errors='replace')}")  # fmt: skip
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(pid):
            assert time.monotonic() < deadline, f"{where}: child {pid} outlived SIGKILL"
            time.sleep(0.0005)


def after(lines: int) -> Callable[[list[str]], bool]:
    return lambda seen: len(seen) >= lines


def ack_lines(acks: Sequence[Path]) -> list[list[str]]:
    """The fields of every complete line the children wrote (a line cut short is ignored)."""
    out: list[list[str]] = []
    for path in acks:
        if path.exists():
            out += [line.split(" ") for line in path.read_text().split("\n")[:-1]
                    if line not in MARKERS]  # fmt: skip
    return out


# -- trials ----------------------------------------------------------------------------------
def plan(seed: int, trials: int) -> list[tuple[int, int]]:
    """Chains as ``(chain seed, kills)`` whose kills add up to ``trials``."""
    rng = random.Random(seed)
    chains: list[tuple[int, int]] = []
    left = trials
    while left:
        kills = min(rng.choice(CHAIN_LENGTHS), left)
        chains.append((seed * 1000 + len(chains), kills))
        left -= kills
    return chains


Chain = Callable[[Any, Zygote, Path, int, int], list[str]]


def run_trials(
    chain: Chain, subject: Any, zygote: Zygote, root: Path, *, seed: int, trials: int
) -> None:
    chains = plan(seed, trials)
    assert sum(kills for _, kills in chains) == trials
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(chain, subject, zygote, root, s, k) for s, k in chains]
        failures = [str(f.exception()) for f in futures if f.exception() is not None]
    assert not failures, "\n\n".join(failures)
    landed = Counter(at for f in futures for at in f.result())
    print(f"\n{trials} kills, the files after them: {dict(sorted(landed.items()))}")


def fail_on(problems: list[str], where: str) -> None:
    if problems:
        raise AssertionError(f"{where}:\n  " + "\n  ".join(problems))


# -- the world: keys, policy, a round, enrolled devices, sealed deltas -----------------------
@dataclass
class Device:
    secret: bytes = field(default_factory=new_device_secret)
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public(self) -> str:
        return b64encode(self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


class Setup:
    """An aggregator file with one open round, and what the children need to work on it."""

    def __init__(self, root: Path, *, length: timedelta = OPEN_ROUND) -> None:
        self.root, self.keys = root, Keys()
        self.policy_path = root / "policy.json"
        policy = self.keys.policy()
        self.policy_path.write_text(json.dumps(policy.model_dump(mode="json")), encoding="utf-8")
        self.world_path = root / "world.json"
        self.db = root / "aggregator.db"
        self.close_at = T0 + length  # when a ``close`` child (and the refeed) sweeps
        self.world = self.write_world(deltas=None)
        conn = sqlite3.connect(self.db)
        agg = self.world.aggregator(conn)
        signed = agg.open_round(noise_multiplier=SIGMA, sampling_rate=Q, deadline=self.close_at)
        self.spec: RoundSpec = verify_round_spec(signed, self.keys.signing.public_key())
        assert self.spec.deadline == self.close_at
        self.verifier_key = agg.log.verifier_key  # the region's checkpoint key, as published
        conn.close()

    def write_world(self, *, deltas: Path | None) -> World:
        data = {
            "policy": str(self.policy_path),
            "signing_key": self.keys.signing.private_bytes_raw().hex(),
            "hpke_key": self.keys.hpke.private_bytes_raw().hex(),
            "model_id": MODEL_ID,
            "base": np.linspace(-1, 1, DIM).tolist(),
            "noise_seed": NOISE_SEED,
            "deltas": None if deltas is None else str(deltas),
            "close_at": self.close_at.isoformat(),
        }
        self.world_path.write_text(json.dumps(data), encoding="utf-8")
        self.world = World.load(self.world_path)
        return self.world

    def enroll(self, count: int) -> list[Device]:
        """``count`` new devices, enrolled in one transaction."""
        devices = [Device() for _ in range(count)]
        conn = sqlite3.connect(self.db)
        agg = self.world.aggregator(conn)
        with write_transaction(conn):
            for device in devices:
                agg.enroll(device.public, period_label(self.spec))
        conn.close()
        return devices

    def seal(self, device: Device, values: npt.NDArray[np.float32]) -> SealedDelta:
        return seal_delta(delta=values, spec=self.spec, device_secret=device.secret,
                          signing_key=device.key, aggregator_hpke_key=self.keys.hpke.public_key(),
                          rng=np.random.default_rng(0))  # fmt: skip


def small(rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """A delta well inside the clipping norm, so sealing does not change it."""
    values = rng.normal(size=DIM)
    return (values / np.linalg.norm(values) * 0.5).astype(np.float32)


# -- places 3 and 4: accept and close --------------------------------------------------------
@dataclass
class Feed:
    """A template aggregator file and the deltas every trial on a copy of it sends."""

    setup: Setup
    values: dict[str, npt.NDArray[np.float64]]  # enrolled deltas: key -> values
    strangers: set[str]  # keys of deltas from devices that are not enrolled
    closes: bool  # whether its children sweep past the deadline (``close``) or only accept
    accept_s: float = 0.0  # how long one accept takes here, to time the kills
    close_s: float = 0.0  # how long the sweep that publishes the round takes

    @property
    def count(self) -> int:
        return len(self.values) + len(self.strangers)


def make_feed(root: Path, *, closes: bool, enrolled: int) -> Feed:
    setup = Setup(root, length=CLOSE_ROUND if closes else OPEN_ROUND)
    rng = np.random.default_rng(enrolled)
    lines, values, strangers = [], {}, set()
    for device in setup.enroll(enrolled):
        delta = small(rng)
        sealed = setup.seal(device, delta)
        values[sealed.idempotency_key] = delta.astype(np.float64)
        lines.append({"key": sealed.idempotency_key, "body": sealed.to_wire().decode()})
    for _ in range(STRANGERS):
        sealed = setup.seal(Device(), small(rng))
        strangers.add(sealed.idempotency_key)
        lines.append({"key": sealed.idempotency_key, "body": sealed.to_wire().decode()})
    deltas = root / "deltas.jsonl"
    deltas.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    setup.write_world(deltas=deltas)
    feed = Feed(setup, values, strangers, closes)
    # One pass in process on a scratch copy, timed to spread the kills over a child's work.
    scratch = root / "scratch"
    copy_db(setup.db, scratch)
    conn = sqlite3.connect(scratch / setup.db.name)
    agg = setup.world.aggregator(conn)
    times = []
    for key, body in setup.world.deltas:
        started = time.perf_counter()
        agg.accept(body, key)
        times.append(time.perf_counter() - started)
    if closes:
        started = time.perf_counter()
        assert agg.sweep(setup.close_at) == [setup.spec.round_id]
        feed.close_s = time.perf_counter() - started
    conn.close()
    shutil.rmtree(scratch)
    feed.accept_s = float(np.median(times))
    return feed


@pytest.fixture(scope="module")
def accept_feed(tmp_path_factory: pytest.TempPathFactory) -> Feed:
    return make_feed(tmp_path_factory.mktemp("accept"), closes=False, enrolled=ACCEPT_DELTAS)


@pytest.fixture(scope="module")
def close_feed(tmp_path_factory: pytest.TempPathFactory) -> Feed:
    return make_feed(tmp_path_factory.mktemp("close"), closes=True, enrolled=CLOSE_DELTAS)


def test_sigkill_during_accept_counts_each_delta_once(
    zygote: Zygote, accept_feed: Feed, tmp_path: Path
) -> None:
    run_trials(accept_chain, accept_feed, zygote, tmp_path, seed=1, trials=DEFAULT_TRIALS)


def test_sigkill_while_a_round_closes_publishes_once_or_not_at_all(
    zygote: Zygote, close_feed: Feed, tmp_path: Path
) -> None:
    run_trials(accept_chain, close_feed, zygote, tmp_path, seed=2, trials=DEFAULT_TRIALS)


@pytest.mark.slow
@slow_only
@pytest.mark.parametrize("block", range(SLOW_BLOCKS))
def test_sigkill_during_accept_many_trials(
    block: int, zygote: Zygote, accept_feed: Feed, tmp_path: Path
) -> None:
    run_trials(accept_chain, accept_feed, zygote, tmp_path, seed=1000 + block,
               trials=SLOW_TRIALS_PER_BLOCK)  # fmt: skip


@pytest.mark.slow
@slow_only
@pytest.mark.parametrize("block", range(SLOW_BLOCKS))
def test_sigkill_while_a_round_closes_many_trials(
    block: int, zygote: Zygote, close_feed: Feed, tmp_path: Path
) -> None:
    run_trials(accept_chain, close_feed, zygote, tmp_path, seed=2000 + block,
               trials=SLOW_TRIALS_PER_BLOCK)  # fmt: skip


def accept_chain(feed: Feed, zygote: Zygote, root: Path, seed: int, kills: int) -> list[str]:
    """Kill ``accept`` children on one file, check after each kill, then send everything."""
    rng = random.Random(seed)
    work = root / f"chain-{seed}"
    copy_db(feed.setup.db, work)
    db = work / feed.setup.db.name
    acks: list[Path] = []
    landed: list[str] = []
    stored = 0  # the round's count at the last check
    for run in range(kills):
        order_seed = seed * 10 + run
        if feed.closes and rng.random() < 0.8:
            # During the close: from the moment the child starts its sweep.
            trigger = sweep_starts
            delay = rng.uniform(0.0, 1.5 * feed.close_s)
        else:
            trigger = after(rng.randrange(len(stream(feed.count, order_seed))))
            delay = rng.uniform(0.0, 2.0 * feed.accept_s)
        acks.append(work / f"ack-{run}.txt")
        where = (f"chain seed {seed}, kill {run + 1} of {kills} (order seed {order_seed}, "
                 f"{delay * 1000:.1f} ms after the trigger) in {work}")  # fmt: skip
        mode = "close" if feed.closes else "accept"
        args = [mode, str(feed.setup.world_path), str(db), str(acks[-1]), str(order_seed)]
        kill_child(zygote, args, acks[-1], trigger, delay, log=work / f"child-{run}.log",
                   where=where)  # fmt: skip
        scratch = work / f"check-{run}"
        copy_db(db, scratch / "crashed")  # stays untouched for a look after a failure
        copy_db(db, scratch / "checked")
        # A rollback journal left behind: the kill cut a write transaction short.
        cut = db.with_name(db.name + "-journal").exists()
        conn = sqlite3.connect(scratch / "checked" / db.name)
        try:
            problems, stored, state = aggregator_problems(feed, conn)
            problems += answer_problems(conn, acks)
        except Exception as error:
            problems, state = [f"checking the file raised {error!r}"], "?"
        finally:
            conn.close()
        fail_on(problems, where)
        shutil.rmtree(scratch)
        landed.append(f"{state} with {stored}{', a transaction cut' if cut else ''}")
    where = f"chain seed {seed}, every delta sent again after {kills} kills in {work}"
    try:
        problems = refeed(feed, db, seed)
    except Exception as error:
        problems = [f"sending again raised {error!r}"]
    fail_on(problems, where)
    shutil.rmtree(work)  # a failing chain keeps its files for a look
    return landed


def sweep_starts(seen: list[str]) -> bool:
    """A trigger: once the child is about to sweep (every delta sent and answered)."""
    return "sweep" in seen


def answer_problems(conn: sqlite3.Connection, acks: Sequence[Path]) -> list[str]:
    """Every answer a child gave is the one the file keeps for its key."""
    rows = {k: (s, c) for k, s, c in conn.execute(
        "SELECT idempotency_key, status, code FROM contributions")}  # fmt: skip
    return [f"the child answered {status} {code} to {key}; the file keeps {rows.get(key)}"
            for key, status, code, _ in ack_lines(acks)
            if rows.get(key) != (int(status), code)]  # fmt: skip


def refeed(feed: Feed, db: Path, seed: int) -> list[str]:
    """Restart the aggregator on the file and send every delta again (twice, in two orders);
    for a closing feed, then sweep past the deadline as the service's schedule would."""
    conn = sqlite3.connect(db)
    try:
        agg = feed.setup.world.aggregator(conn)
        deltas = feed.setup.world.deltas
        for index in stream(feed.count, seed * 10 + 9) + list(range(feed.count)):
            agg.accept(deltas[index][1], deltas[index][0])
        ended = agg.sweep(feed.setup.close_at) if feed.closes else []
        problems, count, state = aggregator_problems(feed, conn)
        if ended not in ([], [feed.setup.spec.round_id]):
            problems.append(f"the sweep past the deadline ended {ended}")
        want = "published" if feed.closes else "open"
        if (state, count) != (want, len(feed.values)):
            problems.append(f"after sending everything the round is {state} with {count} "
                            f"deltas, not {want} with all {len(feed.values)}")  # fmt: skip
        codes = Counter(code for (code,) in conn.execute("SELECT code FROM contributions"))
        expected = Counter({"within_policy": count, "not_enrolled": len(feed.strangers),
                            "round_closed": len(feed.values) - count})  # fmt: skip
        if codes != +expected:
            problems.append(f"answers kept: {dict(codes)}, not {dict(+expected)}")
    finally:
        conn.close()
    return problems


def aggregator_problems(feed: Feed, conn: sqlite3.Connection) -> tuple[list[str], int, str]:
    """The invariants of an aggregator file; returns the problems, the count and the state."""
    agg = feed.setup.world.aggregator(conn)  # its first read rolls a cut transaction back
    spec = feed.setup.spec
    problems: list[str] = []
    integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        problems.append(f"integrity_check: {integrity[:10]}")
    # NOT INDEXED: read the table itself, not the primary key that should prevent doubles.
    rows = conn.execute("SELECT idempotency_key, status FROM contributions NOT INDEXED").fetchall()
    twice = sorted(k for k, n in Counter(k for k, _ in rows).items() if n > 1)
    if twice:
        problems.append(f"keys answered more than once: {twice}")
    accepted = [k for k, status in rows if status == 200]
    unknown = sorted(set(accepted) - feed.values.keys())
    if unknown:
        problems.append(f"accepted deltas that are not enrolled deltas: {unknown}")
    known = [k for k in accepted if k in feed.values]
    state, count = conn.execute(
        "SELECT state, count FROM rounds WHERE round_id = ?", (spec.round_id,)
    ).fetchone()
    stored = stored_sum(conn, spec.round_id)
    if count != len(accepted):
        problems.append(f"the round counts {count} deltas; {len(accepted)} are accepted")
    decisions = [d for _, d in agg.log.query(action="accept_delta")]
    allowed = sum(d.allowed for d in decisions)
    if allowed != len(accepted) or len(decisions) - allowed != len(rows) - len(accepted):
        problems.append(f"{allowed} accepting and {len(decisions) - allowed} refusing "
                        f"decisions for {len(accepted)} accepted and "
                        f"{len(rows) - len(accepted)} refused uploads")  # fmt: skip
    if state == "open":
        problems += open_problems(feed, agg, conn, count=count, stored=stored, known=known)
    elif state == "published" and feed.closes:
        problems += published_problems(feed, agg, conn, count=count, stored=stored, known=known)
    else:
        problems.append(f"the round is {state}")
    report = agg.log.verify(verifier_key=feed.setup.verifier_key)
    if not report.ok:
        problems.append(f"the decision log does not verify: {report.problems[:5]}")
    return problems, count, state


def closing_records(agg: RegionAggregator, conn: sqlite3.Connection, spec: RoundSpec) -> str:
    """What publishing leaves behind, in one line: releases, ledger, publish decisions."""
    releases = [v for (v,) in conn.execute("SELECT version FROM releases")]
    ledger = [e.round_id for e in agg.ledger.entries(spec.period_start)]
    published = [d.reason for _, d in agg.log.query(action="publish_release")]
    return f"releases {releases}, ledger entries {ledger}, publish decisions {published}"


def open_problems(
    feed: Feed, agg: RegionAggregator, conn: sqlite3.Connection, *, count: int,
    stored: PartialSum | None, known: list[str],
) -> list[str]:  # fmt: skip
    spec = feed.setup.spec
    problems: list[str] = []
    records = closing_records(agg, conn, spec)
    if records != "releases [], ledger entries [], publish decisions []":
        problems.append(f"the round is open, but there are {records}")
    partial = PartialSum.empty(DIM) if stored is None else stored
    total = sum((feed.values[k] for k in known), np.zeros(DIM))
    if partial.count != count or partial.weight != count:
        problems.append(f"the running sum holds {partial.count} deltas (weight "
                        f"{partial.weight}); the round counts {count}")  # fmt: skip
    if not np.allclose(partial.total, total, rtol=0, atol=1e-9):
        problems.append(f"the running sum is not the sum of the accepted deltas: "
                        f"{partial.total} != {total}")  # fmt: skip
    return problems


def published_problems(
    feed: Feed, agg: RegionAggregator, conn: sqlite3.Connection, *, count: int,
    stored: PartialSum | None, known: list[str],
) -> list[str]:  # fmt: skip
    spec = feed.setup.spec
    problems: list[str] = []
    if count != len(feed.values):  # a child sweeps only once every delta has its answer
        problems.append(f"published with {count} deltas; {len(feed.values)} are enrolled")
    if stored is not None:
        problems.append("the running sum is still stored after publishing")
    records = closing_records(agg, conn, spec)
    one_each = (f"releases [1], ledger entries [{spec.round_id!r}], "
                "publish decisions ['deadline_reached']")  # fmt: skip
    if records != one_each:
        problems.append(f"published, with {records}: one of each is due")
    release = agg.latest_release()
    if release is not None:
        weights = verify_release(release, feed.setup.keys.signing.public_key())
        total = np.sum([feed.values[k] for k in known], axis=0)
        update = central_update(total, np.random.default_rng(NOISE_SEED),
                                clipping_norm=spec.clipping_norm,
                                noise_multiplier=spec.noise_multiplier,
                                expected_cohort=EXPECTED)  # fmt: skip
        expected = np.asarray(feed.setup.world.base) + update
        if not np.allclose(weights, expected, rtol=0, atol=1e-6):
            problems.append(f"the release holds {weights}, not base + (the accepted deltas' "
                            f"sum on the grid + noise) / {EXPECTED} = {expected}")  # fmt: skip
    report = agg.log.verify(verifier_key=feed.setup.verifier_key)
    last = max((i for i, _ in agg.log.query(action="publish_release")), default=-1)
    if report.latest is None or report.latest.size <= last:
        problems.append("no signed checkpoint covers the publish decision")
    return problems


# -- place 2: upload -------------------------------------------------------------------------
class Service:
    """The aggregator service on uvicorn, and a device store template to fill outboxes from."""

    def __init__(self, setup: Setup, url: str, device_db: Path, pool: list[Device]) -> None:
        self.setup, self.url, self.device_db = setup, url, device_db
        self._pool = iter(pool)  # enrolled devices not used yet
        self.used: set[str] = set()  # every key handed to an outbox so far
        self.lock = threading.Lock()
        self.upload_s = 0.0  # one delta sent and acknowledged, to time the kills

    def outbox(self, target: Path, rng: np.random.Generator) -> list[str]:
        """A copy of the device store with UPLOAD_DELTAS fresh deltas queued; their keys."""
        copy_store(self.device_db, target)
        db = target / self.device_db.name
        with self.lock:
            devices = [next(self._pool) for _ in range(UPLOAD_DELTAS)]
        keys = []
        with self.open_store(db) as store:
            for device in devices:
                sealed = self.setup.seal(device, small(rng))
                model = ModelWeights(MODEL_ID, 0, np.zeros(DIM, dtype=np.float32))
                decision = store.contribution(USER, sealed.round_id)
                store.queue_local_round(USER, sealed=sealed, deadline=self.setup.spec.deadline,
                                        model=model, state=np.zeros(1, dtype=np.float32),
                                        decision=decision)  # fmt: skip
                keys.append(sealed.idempotency_key)
        with self.lock:
            self.used.update(keys)
        return keys

    def open_store(self, db: Path) -> EventStore:
        return EventStore.open(db, policy=self.setup.world.policy, region=REGION,
                               clock=lambda: T0)  # fmt: skip


def upload_pool_size(request: pytest.FixtureRequest) -> int:
    """Devices for every chain the selected upload tests run, and for the timing."""
    runs = [(3, DEFAULT_TRIALS)]
    if "slow" in (request.config.getoption("markexpr") or ""):
        runs += [(3000 + block, SLOW_TRIALS_PER_BLOCK) for block in range(SLOW_BLOCKS)]
    return (sum(len(plan(seed, trials)) for seed, trials in runs) + 1) * UPLOAD_DELTAS


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Service]:
    uvicorn = pytest.importorskip("uvicorn")
    from sottovoce.aggregator._app import create_app

    root = tmp_path_factory.mktemp("upload")
    setup = Setup(root)  # the round stays open: nothing sweeps, and it is a week long
    devices = setup.enroll(upload_pool_size(request))
    # One device store whose user consented to training; each chain fills a copy's outbox with
    # deltas of distinct devices (the aggregator takes one per device and round).
    device_db = root / "device" / "device.db"
    device_db.parent.mkdir()
    with EventStore.open(device_db, policy=setup.world.policy, region=REGION,
                         clock=lambda: T0) as store:  # fmt: skip
        consenting(store, USER, Purpose.FEDERATED_TRAINING)
    app = create_app(lambda: setup.world.aggregator(sqlite3.connect(setup.db)),
                     enrollment_tokens={TOKEN})  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    svc = Service(setup, f"http://127.0.0.1:{port}", device_db, devices)
    calibration = root / "calibration"
    svc.outbox(calibration, np.random.default_rng(0))
    started = time.perf_counter()
    assert upload_all(svc, calibration / device_db.name) == []
    svc.upload_s = (time.perf_counter() - started) / UPLOAD_DELTAS
    yield svc
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_sigkill_during_upload_acknowledges_each_delta_once(
    zygote: Zygote, service: Service, tmp_path: Path
) -> None:
    run_trials(upload_chain, service, zygote, tmp_path, seed=3, trials=DEFAULT_TRIALS)
    assert service_problems(service) == []


@pytest.mark.slow
@slow_only
@pytest.mark.parametrize("block", range(SLOW_BLOCKS))
def test_sigkill_during_upload_many_trials(
    block: int, zygote: Zygote, service: Service, tmp_path: Path
) -> None:
    run_trials(upload_chain, service, zygote, tmp_path, seed=3000 + block,
               trials=SLOW_TRIALS_PER_BLOCK)  # fmt: skip
    assert service_problems(service) == []


def upload_chain(svc: Service, zygote: Zygote, root: Path, seed: int, kills: int) -> list[str]:
    """Kill uploaders of one device store, check after each kill, then upload the rest."""
    rng = random.Random(seed)
    work = root / f"chain-{seed}"
    keys = svc.outbox(work, np.random.default_rng(seed))
    db = work / svc.device_db.name
    acks: list[Path] = []
    landed: list[str] = []
    pending = len(keys)  # at the last check
    for run in range(kills):
        # From the k-th acknowledgement of this child on, of those still pending.
        trigger = after(rng.randrange(max(pending, 1)))
        delay = rng.uniform(0.0, 2.0 * svc.upload_s)
        acks.append(work / f"ack-{run}.txt")
        where = (f"chain seed {seed}, kill {run + 1} of {kills} ({delay * 1000:.1f} ms after "
                 f"the trigger) in {work}")  # fmt: skip
        args = ["upload", str(svc.setup.world_path), str(db), str(acks[-1]), svc.url]
        kill_child(zygote, args, acks[-1], trigger, delay, log=work / f"child-{run}.log",
                   where=where)  # fmt: skip
        scratch = work / f"check-{run}"
        copy_store(db, scratch / "crashed")  # stays untouched for a look after a failure
        copy_store(db, scratch / "checked")
        try:
            states = outbox_states(svc, scratch / "checked" / db.name)
            problems = upload_problems(svc, keys, states, acks)
        except Exception as error:
            problems, states = [f"checking the device store raised {error!r}"], []
        fail_on(problems, where)
        shutil.rmtree(scratch)
        pending = sum(s == "pending" for _, s in states)
        landed.append(f"{len(keys) - pending} acknowledged")
    where = f"chain seed {seed}, uploading the rest after {kills} kills in {work}"
    try:
        problems = upload_all(svc, db)
        states = outbox_states(svc, db)
        problems += upload_problems(svc, keys, states, acks)
        if [s for _, s in states] != ["acknowledged"] * len(keys):
            problems.append(f"after the last upload the outbox holds {states}")
    except Exception as error:
        problems = [f"uploading the rest raised {error!r}"]
    fail_on(problems, where)
    shutil.rmtree(work)
    return landed


def upload_all(svc: Service, db: Path) -> list[str]:
    """Restart the uploader in process and run it once over everything pending."""
    retry = RetryPolicy(attempts=3, initial=0.01, maximum=0.05)
    with svc.open_store(db) as store, httpx.Client(timeout=10.0) as client:
        uploader = Uploader(client, base_url=svc.url, outbox=store, clock=lambda: T0,
                            retry=retry)  # fmt: skip
        report = uploader.run_once()
        if report.retried or report.dropped or report.offline:
            return [f"the restarted uploader reports {report}"]
    return []


def outbox_states(svc: Service, db: Path) -> list[tuple[str, str]]:
    """(key, state) of a device store's outbox, in queue order, once the store opens and
    checks out (integrity, decision log)."""
    with svc.open_store(db) as store:
        report = store.decisions.verify()
        assert report.ok, f"the device's decision log does not verify: {report.problems[:5]}"
    with closing(sqlite3.connect(db)) as conn:  # the store hands out no connection
        integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        assert integrity == ["ok"], f"integrity_check of the device store: {integrity[:10]}"
        # NOT INDEXED: read the table itself, not the primary key that should prevent doubles.
        rows = conn.execute("SELECT idempotency_key, state FROM outbox NOT INDEXED "
                            "ORDER BY rowid").fetchall()  # fmt: skip
    return [(str(k), str(s)) for k, s in rows]


def upload_problems(
    svc: Service, keys: list[str], states: list[tuple[str, str]], acks: Sequence[Path]
) -> list[str]:
    problems: list[str] = []
    if sorted(k for k, _ in states) != sorted(keys):
        problems.append(f"the outbox holds {len(states)} deltas, not the {len(keys)} queued")
    dropped = [k for k, s in states if s == "dropped"]
    if dropped:
        problems.append(f"deltas dropped: {dropped}")
    held = {k for k, s in states if s == "acknowledged"}
    told = {line[0] for line in ack_lines(acks)}
    if told - held:
        problems.append(f"the child reported acknowledgements the store lost: {told - held}")
    answers = server_answers(svc, keys)
    for key in sorted(held):
        if answers.get(key) != (200, "within_policy"):
            problems.append(f"{key} is acknowledged on the device; the aggregator answered "
                            f"{answers.get(key)}")  # fmt: skip
    refused = {k: a for k, a in answers.items() if a != (200, "within_policy")}
    if refused:
        problems.append(f"the aggregator refused deltas of this device: {refused}")
    return problems


def server_answers(svc: Service, keys: list[str]) -> dict[str, tuple[int, str]]:
    conn = sqlite3.connect(f"file:{svc.setup.db}?mode=ro", uri=True, timeout=30.0)
    try:
        marks = ",".join("?" * len(keys))
        rows = conn.execute(f"SELECT idempotency_key, status, code FROM contributions "
                            f"WHERE idempotency_key IN ({marks})", keys)  # fmt: skip
        return {str(k): (int(s), str(c)) for k, s, c in rows}
    finally:
        conn.close()


def service_problems(svc: Service) -> list[str]:
    """The round's count, rows, decisions and metric agree with the deltas handed out."""
    metrics = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{svc.url}/v1/metrics").text.splitlines()
        if line and not line.startswith("#")
    }
    conn = sqlite3.connect(f"file:{svc.setup.db}?mode=ro", uri=True, timeout=30.0)
    try:
        conn.execute("BEGIN")  # one snapshot for every read below
        (count,) = conn.execute("SELECT count FROM rounds WHERE round_id = ?",
                                (svc.setup.spec.round_id,)).fetchone()  # fmt: skip
        rows = dict(conn.execute("SELECT idempotency_key, status FROM contributions"))
        log = DecisionLog(conn)
        decisions = Counter((d.allowed, d.reason) for _, d in log.query(action="accept_delta"))
        report = log.verify(verifier_key=svc.setup.verifier_key)
    finally:
        conn.close()
    problems: list[str] = []
    with svc.lock:
        used = set(svc.used)
    if rows.keys() != used or set(rows.values()) != {200}:
        problems.append(f"{len(used)} deltas handed out; the aggregator holds answers "
                        f"{Counter(rows.values())} for {len(rows)} keys")  # fmt: skip
    if count != len(used) or decisions != Counter({(True, "within_policy"): len(used)}):
        problems.append(f"{len(used)} distinct deltas; the round counts {count}, decisions "
                        f"{dict(decisions)}")  # fmt: skip
    if metrics.get("sottovoce_deltas_accepted_total") != len(used):
        problems.append(
            f"the service's metric counts "
            f"{metrics.get('sottovoce_deltas_accepted_total')} accepted deltas"
        )
    if not report.ok:
        problems.append(f"the decision log does not verify: {report.problems[:5]}")
    return problems


# -- files -----------------------------------------------------------------------------------
def copy_db(db: Path, target: Path) -> None:
    """Copy an aggregator file with its rollback journal (a hot journal after a kill)."""
    target.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-journal"):
        source = db.with_name(db.name + suffix)
        if source.exists():
            shutil.copyfile(source, target / source.name)


def copy_store(db: Path, target: Path) -> None:
    """Copy a device store with its write-ahead log (without -shm: the opener recovers)."""
    target.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        source = db.with_name(db.name + suffix)
        if source.exists():
            shutil.copyfile(source, target / source.name)
