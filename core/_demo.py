"""The end-to-end device demo behind ``sottovoce device-demo``.

Two devices under the example policy, one in the EU (opt-in, minimum age 16, 30-day raw-event
retention) and one in the US (opt-out, 180 days), listen to a synthetic catalog. The demo shows
what the policy changes: consent gating, derived state, retention, an access export and erasure.
(``sottovoce demo`` is the many-device simulation; this one shows a single device's side.)
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from sottovoce._errors import SottovoceError
from sottovoce.device import Eligibility, EventStore, Personalizer, RerankOptions
from sottovoce.policy import DataClass, Purpose, example_policy

GENRES = ("ambient", "jazz", "techno", "folk", "metal", "soul", "classical", "hiphop")
ARTISTS_PER_GENRE, TRACKS_PER_ARTIST, DIM = 5, 8, 16
START = datetime(2026, 10, 1, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Track:
    track_id: str
    artist_id: str
    genre: int
    duration_ms: int


def make_catalog(
    rng: random.Random,
    *,
    artists_per_genre: int = ARTISTS_PER_GENRE,
    tracks_per_artist: int = TRACKS_PER_ARTIST,
) -> tuple[list[Track], list[dict[str, Any]]]:
    """A public catalog: tracks of artists in genres; vectors cluster by genre."""
    nprng = np.random.default_rng(rng.randrange(2**32))
    centres = nprng.normal(size=(len(GENRES), DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    tracks, rows = [], []
    for g, genre in enumerate(GENRES):
        for a in range(artists_per_genre):
            artist = f"{genre}-{a}"
            for t in range(tracks_per_artist):
                track = Track(f"{artist}.{t}", artist, g, rng.randint(120_000, 360_000))
                vector = centres[g] + 0.3 * nprng.normal(size=DIM)
                tracks.append(track)
                rows.append({"track_id": track.track_id, "artist_id": artist,
                             "title": f"{genre.title()} {a}.{t}",
                             "vector": [float(x) for x in vector]})  # fmt: skip
    return tracks, rows


def listen(
    rng: random.Random, user: str, tracks: list[Track], likes: set[int], n: int
) -> list[dict[str, Any]]:
    """A user's listening: sessions of plays, skips and likes, mostly in favourite genres."""
    favourites = [t for t in tracks if t.genre in likes]
    events: list[dict[str, Any]] = []
    clock = START
    while len(events) < n:
        clock += timedelta(hours=rng.uniform(3, 20))  # a new session
        events.append({"type": "context", "device_type": rng.choice(["phone", "desktop"]),
                       "network": rng.choice(["wifi", "cellular"]),
                       "local_time": clock.strftime("%H:%M")})  # fmt: skip
        for _ in range(rng.randint(5, 25)):
            track = rng.choice(favourites if rng.random() < 0.75 else tracks)
            base = {"track_id": track.track_id, "artist_id": track.artist_id}
            events.append({**base, "type": "play_start", "duration_ms": track.duration_ms})
            loved = track.genre in likes
            roll = rng.random()
            if roll < (0.7 if loved else 0.15):
                played = track.duration_ms
            elif roll < 0.85:
                played = rng.randint(1_000, 15_000)  # an early skip: not a play
                events.append({**base, "type": "skip", "position_ms": played})
            else:
                played = rng.randint(30_000, track.duration_ms)
            events.append({**base, "type": "play_end", "ms_played": played,
                           "duration_ms": track.duration_ms})  # fmt: skip
            if loved and rng.random() < 0.1:
                events.append({**base, "type": "like"})
            clock += timedelta(milliseconds=played + rng.randint(500, 5_000))
            for event in events[-4:]:
                event.setdefault("ts", clock.isoformat())
    for i, event in enumerate(events):
        event.update(event_id=f"{user}-{i}", user_id=user, device_id=f"{user}-phone")
        event.setdefault("ts", clock.isoformat())
    return events[:n]


def run_demo(*, workdir: Path, events: int, seed: int, console: Console) -> None:
    rng = random.Random(seed)
    policy = example_policy()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    tracks, catalog = make_catalog(rng)
    console.print(f"[bold]sottovoce device demo[/bold] — policy {policy.name} {policy.version} "
                  f"(sha256:{policy.hash[:16]}…), {len(tracks)} catalog tracks\n")  # fmt: skip

    people = {"eu": ("alice", {0, 1}, 29), "us": ("bob", {2, 4}, 34)}
    stores: dict[str, EventStore] = {}
    summary = Table(title="derived state per device", header_style="bold")
    for column in ("device", "consent", "events", "sessions", "plays", "done",
                   "early skips", "top artist", "taste"):  # fmt: skip
        summary.add_column(column)
    with Progress(console=console, transient=True) as bar:
        for region_id, (user, likes, age) in people.items():
            store = stores[region_id] = EventStore.open(
                workdir / f"{region_id}-device.db", policy=policy, region=region_id,
                clock=lambda: START + timedelta(days=30),  # the demo's own calendar
            )  # fmt: skip
            store.upsert_catalog(catalog)
            stream = listen(rng, user, tracks, likes, events)
            _try_first(store, stream[0], console)
            store.set_age(user, age)
            if policy.region(region_id).consent[Purpose.PERSONALIZATION].value == "opt_in":
                _try_first(store, stream[0], console)
                store.grant(user, Purpose.PERSONALIZATION)
                console.print(f"  {region_id}: {user} opts in to personalization")
            task = bar.add_task(f"{region_id}: ingesting", total=len(stream))
            for i in range(0, len(stream), 100):
                store.append_many(stream[i : i + 100])
                bar.advance(task, 100)
            store.append_many(stream[:50])  # a replayed upload: not counted twice
            summary.add_row(*_row(store, user, region_id, tracks, catalog))
    console.print()
    console.print(summary)
    _personalize(stores["us"], people["us"][0], tracks, rng, console)

    alice = people["eu"][0]
    export = stores["eu"].export_user(alice)
    path = workdir / f"{alice}-access-export.json"
    path.write_text(json.dumps(export, indent=2), encoding="utf-8")
    counts = f"{len(export['events'])} events, {len(export['consent'])} consent records"
    console.print(f"\n[bold]access request[/bold]: {alice}'s data → {path} ({counts})\n")
    later = START + timedelta(days=75)
    console.print(f"[bold]retention[/bold] as of {later.date()} (events are from October):")
    for region_id, store in stores.items():
        report = store.purge_expired(now=later)
        days = policy.region(region_id).retention[DataClass.RAW_EVENTS].days
        purged = report.deleted.get("events", 0)
        console.print(f"  {region_id}: raw events kept {days} days → purged {purged} events, "
                      f"{store.count('events')} remain")  # fmt: skip

    erased = stores["eu"].erase_user(alice)
    console.print(f"[bold]erasure[/bold]: {erased.total} rows about {alice} deleted; "
                  f"events left on the EU device: {stores['eu'].count('events')}")  # fmt: skip
    _audit(stores["eu"], workdir, console)
    for store in stores.values():
        store.close()
    console.print(f"\nstores are in {workdir}/")


def _audit(store: EventStore, workdir: Path, console: Console) -> None:
    """Sign a checkpoint of the device's decision log, keep it, and verify against it."""
    eu_log = store.decisions
    with eu_log.transaction():
        kept = eu_log.checkpoint()
    (workdir / "eu-checkpoint.note").write_bytes(kept)
    report = eu_log.verify(kept=kept)
    verdict = "verified" if report.ok else "NOT verified: " + "; ".join(report.problems)
    console.print(f"\n[bold]decision log[/bold] of the EU device: {report.size} decisions, "
                  f"{verdict}; checkpoint kept in {workdir / 'eu-checkpoint.note'}")  # fmt: skip
    console.print(f"  check it yourself: sottovoce audit verify {workdir / 'eu-device.db'} "
                  f"--checkpoint {workdir / 'eu-checkpoint.note'}")  # fmt: skip


def _personalize(
    store: EventStore, user: str, tracks: list[Track], rng: random.Random, console: Console
) -> None:
    """Train on the user's history, rerank a playlist, react to skips with the next rerank."""
    personalizer = Personalizer(store)
    playlist = [t.track_id for t in rng.sample(tracks, 60)]
    now = START + timedelta(days=29, hours=23)
    options = RerankOptions(seed=1)
    store.grant(user, Purpose.FEDERATED_TRAINING)
    result = personalizer.local_round(user, eligibility=Eligibility(True, True, True))
    norm = float(np.linalg.norm(result.delta))
    console.print(f"\n[bold]local training[/bold] on {result.examples} examples, {result.steps} "
                  f"steps inside the TFLite model: loss {result.loss_before:.3f} → "
                  f"{result.loss_after:.3f}; delta to send: {result.delta.size} weights, "
                  f"L2 norm {norm:.2f} (sync will clip, noise and seal it)")  # fmt: skip
    ranking = personalizer.rerank(user, playlist, now=now, options=options)
    console.print(f"[bold]rerank[/bold] of a 60-track playlist for {user} (top 5):")
    for item in ranking.items[:5]:
        console.print(f"  {item.track_id:<14} {item.score:+.2f}  {item.reason}")
    artist = next(t.artist_id for t in tracks if t.track_id == ranking.items[0].track_id)
    skipped = [t for t in tracks if t.artist_id == artist][:3]
    store.append_many([
        {"type": "skip", "event_id": f"demo-skip-{i}", "user_id": user, "track_id": t.track_id,
         "artist_id": t.artist_id, "position_ms": 4_000,
         "ts": (now + timedelta(seconds=10 * i)).isoformat()}
        for i, t in enumerate(skipped)
    ])  # fmt: skip
    later = personalizer.rerank(user, playlist, now=now + timedelta(minutes=1), options=options)
    moved = [i for i, item in enumerate(later.items) if item.track_id in playlist
             and item.reason.startswith("lower")]  # fmt: skip
    console.print(f"  after {user} skips 3 tracks by {artist}: its tracks move to places "
                  f"{', '.join(str(i + 1) for i in moved) or '-'}")  # fmt: skip


def _try_first(store: EventStore, event: dict[str, Any], console: Console) -> None:
    try:
        store.append(event)
        console.print(f"  {store.region.id}: first event accepted (opt-out region)")
    except SottovoceError as refusal:
        console.print(f"  {store.region.id}: first event refused — {escape(f'[{refusal.code}]')} "
                      f"{refusal}")  # fmt: skip


def _row(
    store: EventStore, user: str, region_id: str, tracks: list[Track], catalog: list[dict[str, Any]]
) -> list[str]:
    state = store.derived_state(user)
    artists = state["artist_stats"]
    plays = sum(r["plays"] for r in artists)
    completions = sum(r["completions"] for r in artists)
    early = sum(r["early_skips"] for r in artists)
    top = max(artists, key=lambda r: r["plays"])["artist_id"] if artists else "-"
    taste = state["taste"][0]["vector"] if state["taste"] else None
    genre = "-"
    if taste is not None:
        vectors = np.array([row["vector"] for row in catalog])
        nearest = int(np.argmax(vectors @ np.array(taste)))
        genre = GENRES[tracks[nearest].genre]
    mode = store.region.consent[Purpose.PERSONALIZATION].value
    numbers = (store.count("events"), len(state["sessions"]), plays, completions, early)
    return [f"{region_id}/{user}", mode.replace("_", "-"), *map(str, numbers), top, genre]
