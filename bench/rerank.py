"""Rerank benchmark: 500 candidates, features from a real store on disk, the TFLite ranker.

Prints one JSON object. ``rerank_*`` times the whole call (consent check, the store snapshot,
feature assembly, inference, guards and reasons, returning the ``Ranking``, whose order, scores
and reasons are decided); ``infer_*`` times the model alone on the same feature rows, measured
in the same run, so ``ratio_rerank_vs_infer`` (p50) is the cost of everything around the model.
A ``Ranking`` builds its 500 ``RankedItem``s when they are first read: ``rerank_items_*`` times
the call and reading every item (``ratio_rerank_items_vs_infer``), what an app that shows every
reason pays; an app that reorders its list reads ``track_ids``. The store keeps the user's
state in memory between writes; ``rerank_after_event_*`` times the first rerank after an
appended skip (a reload). ``train_step_ms`` is one batch-32 step inside the model;
``local_round_ms`` a whole local round on 1,000 examples (replaying the history into examples,
one epoch of batch-32 steps, storing the weights).

The full-catalog case (``catalog_*``) ranks every track of a 20,000-track catalog for the user
with ``Personalizer.rank_catalog`` (features for every item, the model on every item, the same
guards, exploration and reasons as ``rerank`` over the whole list): ``catalog_rank_*`` returns
the first 100 (a shelf), ``catalog_rank_all_items_*`` all 20,000 ``RankedItem``s, read (a tuple
subclass per item, which the garbage collector tracks: its p99 shows full collections);
``catalog_infer_*`` times the model alone on the same
20,000 feature rows (from ``store.snapshot`` and ``assemble``), invoked in the chunks
``rank_catalog`` uses, which is the fastest way to run this model over them (one 20,000-row
call is slower: its activations do not fit in cache). One thread. Usage: ``python bench/rerank.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from _common import percentile

from sottovoce._demo import START, listen, make_catalog
from sottovoce.device import EventStore
from sottovoce.device._features import assemble
from sottovoce.device._personalize import CHUNK_SIZE, Eligibility, Personalizer, RerankOptions
from sottovoce.policy import Purpose, example_policy

SHELF = 100  # items an app shows from a ranked catalog


def full_catalog(
    workdir: Path, *, now: datetime, tracks: int, history: int, repeats: int
) -> dict[str, float | int]:
    """Rank a whole catalog of ``tracks`` tracks for a user with ``history`` events."""
    store = EventStore.open(workdir / "catalog.db", policy=example_policy(), region="us",
                            clock=lambda: now)  # fmt: skip
    rng = random.Random(11)
    per_artist = 10
    catalog, rows = make_catalog(rng, artists_per_genre=tracks // (8 * per_artist),
                                 tracks_per_artist=per_artist)  # fmt: skip
    store.upsert_catalog(rows)
    store.append_many(listen(rng, "ann", catalog, {0, 3}, history))
    personalizer = Personalizer(store)
    options = RerankOptions(seed=1)
    for _ in range(3):  # warm the catalog cache, the user's arrays and the interpreter
        personalizer.rank_catalog("ann", now=now, options=options)
    ids = list(store.catalog())
    snapshot, artists, vectors = store.snapshot("ann", ids, now=now)
    x = assemble(snapshot, ids, artists, vectors)
    shelf, whole, infer = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        personalizer.rank_catalog("ann", now=now, options=options, limit=SHELF)
        shelf.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        _ = personalizer.rank_catalog("ann", now=now, options=options).items
        whole.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        for start in range(0, len(x), CHUNK_SIZE):
            personalizer.ranker.infer(x[start : start + CHUNK_SIZE])
        infer.append((time.perf_counter() - t) * 1000)
    store.close()
    return {
        "catalog_items": len(ids),
        "catalog_rank_p50_ms": round(statistics.median(shelf), 3),
        "catalog_rank_p99_ms": round(percentile(shelf, 0.99), 3),
        "catalog_rank_all_items_p50_ms": round(statistics.median(whole), 3),
        "catalog_rank_all_items_p99_ms": round(percentile(whole, 0.99), 3),
        "catalog_infer_p50_ms": round(statistics.median(infer), 3),
        "catalog_infer_p99_ms": round(percentile(infer, 0.99), 3),
        "ratio_catalog_vs_infer": round(statistics.median(shelf) / statistics.median(infer), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--history", type=int, default=4_000, help="events of listening")
    parser.add_argument("--catalog", type=int, default=20_000, help="tracks, full-catalog case")
    parser.add_argument("--catalog-repeats", type=int, default=100)
    args = parser.parse_args()
    now = START + timedelta(days=60)
    with tempfile.TemporaryDirectory() as tmp:
        store = EventStore.open(Path(tmp) / "device.db", policy=example_policy(), region="us",
                                clock=lambda: now)  # fmt: skip
        rng = random.Random(7)
        tracks, rows = make_catalog(rng, artists_per_genre=25, tracks_per_artist=8)
        store.upsert_catalog(rows)
        store.append_many(listen(rng, "ann", tracks, {0, 3}, args.history))
        store.grant("ann", Purpose.FEDERATED_TRAINING)
        personalizer = Personalizer(store)
        candidates = [t.track_id for t in rng.sample(tracks, args.candidates)]
        options = RerankOptions(seed=1)

        rerank, rerank_items, infer = [], [], []
        for _ in range(20):  # warm caches and the interpreter
            personalizer.rerank("ann", candidates, now=now, options=options)
        snapshot, artists, vectors = store.snapshot("ann", candidates, now=now)
        x = assemble(snapshot, candidates, artists, vectors)
        for _ in range(args.repeats):
            t = time.perf_counter()
            personalizer.rerank("ann", candidates, now=now, options=options)
            rerank.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            _ = personalizer.rerank("ann", candidates, now=now, options=options).items
            rerank_items.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            personalizer.ranker.infer(x)
            infer.append((time.perf_counter() - t) * 1000)

        # The store caches the user's state between writes; after an event (a skip) the next
        # rerank reloads it. Measured separately: the cost of reacting to a skip.
        after_event = []
        for i in range(100):
            event = {"type": "skip", "event_id": f"bench-skip-{i}", "user_id": "ann",
                     "ts": (now - timedelta(seconds=100 - i)).isoformat(),
                     "track_id": candidates[i], "position_ms": 3_000}  # fmt: skip
            store.append(event)
            t = time.perf_counter()
            personalizer.rerank("ann", candidates, now=now, options=options)
            after_event.append((time.perf_counter() - t) * 1000)

        batch = np.asarray(x[:32], dtype=np.float32)
        labels = np.asarray(np.arange(32) % 2, dtype=np.float32)
        steps = []
        for _ in range(200):
            t = time.perf_counter()
            personalizer.ranker.train_step(batch, labels)
            steps.append((time.perf_counter() - t) * 1000)

        t = time.perf_counter()
        result = personalizer.local_round("ann", eligibility=Eligibility(True, True, True),
                                          steps=1_000 // 32 + 1, examples=1_000)  # fmt: skip
        local_round = (time.perf_counter() - t) * 1000
        store.close()
        catalog = full_catalog(Path(tmp), now=now, tracks=args.catalog, history=args.history,
                               repeats=args.catalog_repeats)  # fmt: skip
    print(json.dumps({
        "candidates": args.candidates,
        "rerank_p50_ms": round(statistics.median(rerank), 3),
        "rerank_p99_ms": round(percentile(rerank, 0.99), 3),
        "infer_p50_ms": round(statistics.median(infer), 3),
        "infer_p99_ms": round(percentile(infer, 0.99), 3),
        "ratio_rerank_vs_infer": round(statistics.median(rerank) / statistics.median(infer), 2),
        "rerank_items_p50_ms": round(statistics.median(rerank_items), 3),
        "rerank_items_p99_ms": round(percentile(rerank_items, 0.99), 3),
        "ratio_rerank_items_vs_infer": round(
            statistics.median(rerank_items) / statistics.median(infer), 2),
        "rerank_after_event_p50_ms": round(statistics.median(after_event), 3),
        "rerank_after_event_p99_ms": round(percentile(after_event, 0.99), 3),
        "train_step_ms": round(statistics.median(steps), 4),
        "local_round_ms": round(local_round, 1),
        "local_round_examples": result.examples,
        "history_events": args.history,
        "catalog_tracks": len(tracks),
        **catalog,
        "threads": 1,
        "python": sys.version.split()[0],
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
