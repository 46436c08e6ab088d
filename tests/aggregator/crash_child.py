"""An aggregator or an uploading device that works until it is killed, for the crash tests.

Usage::

    python tests/aggregator/crash_child.py accept WORLD_JSON DB_PATH ACK_PATH ORDER_SEED
    python tests/aggregator/crash_child.py close WORLD_JSON DB_PATH ACK_PATH ORDER_SEED
    python tests/aggregator/crash_child.py upload WORLD_JSON DEVICE_DB ACK_PATH BASE_URL
    python tests/aggregator/crash_child.py zygote

``tests/aggregator/test_crash_aggregator.py`` starts a child, waits for its ``ready`` line in
ACK_PATH and kills it with SIGKILL at a random moment; a restarted child does the same work
again on the same files. The test forks its children from a ``zygote``: a process that has
imported everything and loaded the privacy accountant (torch: seconds) once, then reads one
command per line on stdin (a JSON list: the arguments above, then a log path), forks a child
for it and answers the child's pid. A child is a process of its own all the same, and a kill
ends it as abruptly; run a command directly to reproduce a failure by hand.

``accept``: a :class:`RegionAggregator` on the SQLite file DB_PATH takes the world's pre-sealed
deltas in an order drawn from ORDER_SEED, with replays mixed in (a device that saw no answer
sends again), and after each ``accept`` returns adds ``KEY STATUS CODE COUNT`` to ACK_PATH and
flushes (COUNT: the round's count right after). The clock stands at T0: the round never
reaches its deadline, so it stays open however many deltas it takes.

``close``: ``accept``, then what the service's schedule does once the round's deadline has
passed: ``sweep`` at the world's ``close_at``, which publishes the (central) round. The child
writes ``sweep`` to ACK_PATH just before and ``swept`` just after.

``upload``: a device's :class:`~sottovoce.sync.transport.Uploader` sends the outbox of the
store DEVICE_DB to the aggregator at BASE_URL until nothing is pending; after the store records
an acknowledgement, the child adds ``KEY`` to ACK_PATH and flushes.

The world file (written by the test) holds the policy's path, the aggregator's keys, the model,
for ``accept`` and ``close`` the path of the deltas (JSON lines of ``key`` and wire ``body``), and
for ``close`` when to sweep (``close_at``, at or past the round's deadline).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import httpx
import numpy as np
from aggregator_helpers import T0, Keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._edge import status_of
from sottovoce.device import EventStore
from sottovoce.policy import Policy, load_policy
from sottovoce.sync.transport import RetryPolicy, Uploader

REGION = "eu"
LINGER_S = 120.0  # after the work is done: wait to be killed (the tests always kill)
REPLAY_SHARE = 0.25  # how often a delta already sent is sent again
MARKERS = frozenset({"ready", "done", "sweep", "swept"})  # ACK_PATH lines that are not answers


@dataclass(frozen=True)
class World:
    """What the test and its children share, read from the world file."""

    policy: Policy
    signing: Ed25519PrivateKey
    hpke: X25519PrivateKey
    model_id: str
    base: list[float]
    noise_seed: int
    deltas: list[tuple[str, bytes]]  # (idempotency key, wire body)
    close_at: datetime | None  # when ``close`` sweeps

    @classmethod
    def load(cls, path: Path) -> World:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        deltas: list[tuple[str, bytes]] = []
        if data.get("deltas"):
            for line in Path(data["deltas"]).read_text(encoding="utf-8").splitlines():
                item = json.loads(line)
                deltas.append((item["key"], item["body"].encode()))
        return cls(
            policy=load_policy(data["policy"]),
            signing=Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["signing_key"])),
            hpke=X25519PrivateKey.from_private_bytes(bytes.fromhex(data["hpke_key"])),
            model_id=data["model_id"],
            base=data["base"],
            noise_seed=data["noise_seed"],
            deltas=deltas,
            close_at=None if data.get("close_at") is None else datetime.fromisoformat(
                data["close_at"]),
        )  # fmt: skip

    def aggregator(self, conn: sqlite3.Connection) -> RegionAggregator:
        """The region's aggregator on ``conn``, as every process of a test builds it."""
        return Keys(signing=self.signing, hpke=self.hpke).aggregator(
            conn,
            policy=self.policy,
            model_id=self.model_id,
            dim=len(self.base),
            base_weights=self.base,
            clock=lambda: T0,  # rounds end only when a test sweeps at a later time
            rng=np.random.default_rng(self.noise_seed),  # a restart draws the same noise
        )


def stream(count: int, seed: int) -> list[int]:
    """Indices of the deltas in the order one child sends them, replays included."""
    rng = random.Random(seed)
    order = list(range(count))
    rng.shuffle(order)
    out: list[int] = []
    for index in order:
        out.append(index)
        if rng.random() < REPLAY_SHARE:
            out.append(rng.choice(out))
    return out


def warm_up() -> None:
    """Load the privacy accountant, so a round closes as fast as in a long-running service
    (not inside the closing transaction, where a first use would import torch)."""
    from sottovoce.aggregator._ledger import epsilon_of
    from sottovoce.policy import Accountant

    epsilon_of([(1.0, 0.01, 1)], delta=1e-5, accountant=Accountant.RDP)


def accept(world: World, db: Path, acks: TextIO, seed: int, *, close: bool = False) -> None:
    warm_up()
    conn = sqlite3.connect(db)
    agg = world.aggregator(conn)
    info = agg.current_round()
    round_id = None if info is None else info.spec.round_id
    acks.write("ready\n")  # the test times its kill from here
    acks.flush()
    for index in stream(len(world.deltas), seed):
        key, body = world.deltas[index]
        verdict = agg.accept(body, key)
        now = agg.round(round_id) if round_id is not None else None
        # The status the service would answer with (the one the file keeps for the key).
        status, code = status_of(verdict), verdict.code
        acks.write(f"{key} {status} {code} {0 if now is None else now.count}\n")
        acks.flush()
    if close:
        assert world.close_at is not None, "the world file has no close_at"
        acks.write("sweep\n")
        acks.flush()
        agg.sweep(world.close_at)
        acks.write("swept\n")
        acks.flush()


class _Clock:
    """The device's clock: it stands still, and jumps when only later retries are left."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class _AckedOutbox:
    """The store's outbox, telling ACK_PATH about each acknowledgement once it is stored."""

    def __init__(self, store: EventStore, acks: TextIO) -> None:
        self._store = store
        self._acks = acks
        self.due = store.due
        self.attempted = store.attempted
        self.drop = store.drop

    def acknowledge(self, key: str, *, now: datetime) -> None:
        self._store.acknowledge(key, now=now)
        self._acks.write(f"{key}\n")
        self._acks.flush()


def upload(world: World, db: Path, acks: TextIO, base_url: str) -> None:
    clock = _Clock()
    retry = RetryPolicy(attempts=3, initial=0.01, maximum=0.05)
    with (
        EventStore.open(db, policy=world.policy, region=REGION, clock=clock) as store,
        httpx.Client(timeout=10.0) as client,
    ):
        outbox = _AckedOutbox(store, acks)
        uploader = Uploader(client, base_url=base_url, outbox=outbox, clock=clock, retry=retry)
        acks.write("ready\n")
        acks.flush()
        while store.outbox_states().get("pending", 0):
            if not store.due(now=clock()):
                clock.now += timedelta(hours=1)  # backoff is capped well below the deadline
                continue
            uploader.run_once()


def zygote() -> None:
    """Fork a child per command read on stdin; answer its pid (see the module docstring)."""
    warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    print("ready", flush=True)
    for line in sys.stdin:
        *args, log = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = main([__file__, *args])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)


def main(argv: list[str]) -> int:
    if argv[1:] == ["zygote"]:
        zygote()
        return 0
    if len(argv) != 6 or argv[1] not in ("accept", "close", "upload"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, world_path, db, ack_path, last = argv[1:]
    world = World.load(Path(world_path))
    with Path(ack_path).open("a", encoding="utf-8") as acks:
        if mode in ("accept", "close"):
            accept(world, Path(db), acks, int(last), close=mode == "close")
        else:
            upload(world, Path(db), acks, last)
        acks.write("done\n")
        acks.flush()
        time.sleep(LINGER_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
