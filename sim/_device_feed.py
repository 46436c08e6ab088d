"""Into a device store: a dataset user's training interactions as the events and catalog rows
an ``EventStore`` takes (plays fitted into a recent window, sessions, skips, devices), for the
simulator's devices (:mod:`._evaluate` re-exports it)."""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from sottovoce.sim._datasets import (
    POSITIVE_TYPES,
    Dataset,
    Interaction,
    Vector,
    id_key,
)

SESSION_PLAYS = (5, 15)  # plays per session when the data has no times
MAX_PLAYS = 16
"""The most completed plays one interaction becomes (a count of 4**15 listens or more)."""
MAX_INTERACTIONS = 2_000
"""The most a device replays of a user's interactions: the most recent ones (a device trains
on its recent history, ``SimulationConfig.examples`` examples)."""
_DEVICES = ("phone", "desktop", "speaker", "tablet")
_SKIP_MS = (2_000, 20_000)  # how long a skipped track plays


def device_events(
    user: str,
    interactions: Sequence[Interaction],
    *,
    artists: Mapping[str, str | None],
    end: datetime,
    days: float = 28.0,
    seed: int = 0,
    max_plays: int = MAX_PLAYS,
    device_id: str | None = None,
) -> list[dict[str, Any]]:
    """The user's training interactions as device events for ``EventStore.append_many``.

    A ``play`` worth ``value`` listens becomes min(``max_plays``, 1 + floor(log4(value)))
    completed plays (``play_start`` then ``play_end`` with the whole track played), so heavy
    listeners stay cheap and the order of how much the user listened to each item is kept
    (what weighs it in the collaborative model: :func:`listening` is what the device counts);
    ``complete`` is one completed play, ``skip`` a play skipped within
    seconds, ``like``/``dislike`` the event itself. Everything lands in the ``days`` before
    ``end`` (the store's clock; keep ``days`` inside the region's raw-event retention): when
    every interaction has a time, in that order and with proportional gaps; otherwise in
    sessions of 5 to 15 plays at seeded random times. Each session opens with a ``context``
    event. Track lengths are fixed per item (2.5 to 5 minutes).

    Any user fits, however heavy: only the :data:`MAX_INTERACTIONS` most recent interactions
    are replayed (by time, or the last rows when some have no time); if their plays back to
    back would still outlast ``days``, each interaction gets fewer plays (down to one), then
    the oldest are left out until the rest fit. An action is never placed so late that those
    after it could not finish by ``end``.
    """
    if days < 2:
        raise ValueError("days must be at least 2")
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    rng = random.Random(f"{seed}:events:{user}")
    timed, plays, rows = _replayed(interactions, days=days, max_plays=max_plays)
    actions = [(row.timestamp, row) for row in rows for _ in range(_plays(row, plays))]
    if not actions:
        return []
    start = end - timedelta(days=days)
    span_ms = (days - 1) * 86_400_000  # the last day stays free for sessions to finish
    if timed:
        first, last = actions[0][0] or 0, actions[-1][0] or 0
        scale = span_ms / max(last - first, 1)
        starts = [start + timedelta(milliseconds=((ts or 0) - first) * scale) for ts, _ in actions]
    else:
        rng.shuffle(actions)
        starts = _session_starts(len(actions), rng, start, span_ms)
    latest = _latest_starts([row for _, row in actions], end)
    device = rng.choice(_DEVICES)
    out: list[dict[str, Any]] = []
    clock = start
    for wanted, deadline, (_, row) in zip(starts, latest, actions, strict=True):
        when = min(wanted, deadline)
        if when - clock > timedelta(minutes=30) or not out:
            out.append(
                {
                    "type": "context",
                    "ts": when,
                    "device_type": device,
                    "network": rng.choice(("wifi", "wifi", "cellular")),
                    "local_time": when.strftime("%H:%M"),
                }
            )
        clock = max(clock, when) + timedelta(seconds=1)
        clock = _play(out, row, clock, artists.get(row.item), rng)
    for n, event in enumerate(out):
        event.update(event_id=f"{user}.{n}", user_id=user, ts=event["ts"].isoformat())
        if device_id is not None:
            event["device_id"] = device_id
    return out


def listening(
    interactions: Sequence[Interaction], *, days: float = 28.0, max_plays: int = MAX_PLAYS
) -> dict[str, int]:
    """What a device fed :func:`device_events` of ``interactions`` (with the same ``days`` and
    ``max_plays``) counts per item (``sottovoce.device._collaborator.listening``): its completed
    plays, one per ``complete`` and per ``like``; an item with a ``dislike`` is left out."""
    _, most, rows = _replayed(interactions, days=days, max_plays=max_plays)
    times: dict[str, int] = {}
    for row in rows:
        if row.event_type in POSITIVE_TYPES:
            times[row.item] = times.get(row.item, 0) + _plays(row, most)
    disliked = {row.item for row in rows if row.event_type == "dislike"}
    return {item: n for item, n in sorted(times.items()) if item not in disliked}


def _replayed(
    interactions: Sequence[Interaction], *, days: float, max_plays: int
) -> tuple[bool, int, list[Interaction]]:
    """Whether every interaction has a time, the most plays per interaction, and the rows that
    are replayed (in time order when timed)."""
    rows = list(interactions)
    timed = all(row.timestamp is not None for row in rows)
    if timed:
        rows.sort(key=lambda row: (row.timestamp or 0, id_key(row.item)))
    plays, rows = _fit(rows[-MAX_INTERACTIONS:], window_ms=days * 86_400_000, max_plays=max_plays)
    return timed, plays, rows


def _plays(row: Interaction, most: int) -> int:
    """How many actions an interaction becomes: a play's count, capped at ``most``; one for
    anything else."""
    if row.event_type != "play":
        return 1
    return min(most, 1 + int(math.log2(max(row.value, 1.0))) // 2)  # 1 + floor(log4(value))


def _action_ms(row: Interaction) -> int:
    """The most time one action of ``row`` takes on the device's clock: the second before it
    starts and the part of the track it plays."""
    if row.event_type in ("like", "dislike"):
        return 1_000
    return 1_000 + (_SKIP_MS[1] if row.event_type == "skip" else track_length(row.item))


def _fit(
    rows: list[Interaction], *, window_ms: float, max_plays: int
) -> tuple[int, list[Interaction]]:
    """The most plays per interaction (up to ``max_plays``) and the most recent rows whose
    actions fit back to back in ``window_ms``: fewer plays first, then fewer rows."""
    lengths = [_action_ms(row) for row in rows]
    for most in range(max(max_plays, 1), 0, -1):
        if sum(n * _plays(r, most) for n, r in zip(lengths, rows, strict=True)) <= window_ms:
            return most, rows
    total, keep = 0, 0
    for length in reversed(lengths):  # one play each: keep the newest rows that fit
        total += length
        if total > window_ms:
            break
        keep += 1
    return 1, rows[len(rows) - keep :]


def _latest_starts(rows: Sequence[Interaction], end: datetime) -> list[datetime]:
    """For each action, the latest start that still lets it and every action after it finish
    by ``end`` when played back to back."""
    latest: list[datetime] = []
    at = end
    for row in reversed(rows):
        at -= timedelta(milliseconds=_action_ms(row))
        latest.append(at)
    return latest[::-1]


def _session_starts(
    count: int, rng: random.Random, start: datetime, span_ms: float
) -> list[datetime]:
    """A start time per action: sessions at sorted random times, actions back to back."""
    sizes: list[int] = []
    while sum(sizes) < count:
        sizes.append(rng.randint(*SESSION_PLAYS))
    offsets = sorted(rng.uniform(0, span_ms) for _ in sizes)
    starts: list[datetime] = []
    for size, offset in zip(sizes, offsets, strict=True):
        starts += [start + timedelta(milliseconds=offset)] * size
    return starts[:count]


def _play(
    out: list[dict[str, Any]],
    row: Interaction,
    at: datetime,
    artist: str | None,
    rng: random.Random,
) -> datetime:
    """Append the events of one action at ``at``; returns when it ends."""
    base = {"track_id": row.item, "artist_id": artist} if artist else {"track_id": row.item}
    if row.event_type in ("like", "dislike"):
        out.append({**base, "type": row.event_type, "ts": at})
        return at
    duration = track_length(row.item)
    played = duration if row.event_type in POSITIVE_TYPES else rng.randint(*_SKIP_MS)
    out.append({**base, "type": "play_start", "ts": at, "duration_ms": duration})
    done = at + timedelta(milliseconds=played)
    if row.event_type == "skip":
        out.append(
            {**base, "type": "skip", "ts": done, "position_ms": played, "duration_ms": duration}
        )
    out.append(
        {**base, "type": "play_end", "ts": done, "ms_played": played, "duration_ms": duration}
    )
    return done


def track_length(item: str) -> int:
    """A fixed, made-up length in ms for an item (150 to 300 s), the same on every device."""
    return 150_000 + zlib.crc32(item.encode()) % 150_000


def catalog_items(
    dataset: Dataset, vectors: Mapping[str, Vector], *, items: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Catalog rows for ``EventStore.upsert_catalog`` (every item, or ``items``); an item
    without a vector gets zeros of the others' width."""
    width = len(next(iter(vectors.values()))) if vectors else 1
    rows = []
    for item in dataset.items if items is None else items:
        vector = vectors.get(item)
        row: dict[str, Any] = {
            "track_id": item,
            "artist_id": dataset.artists.get(item),
            "vector": [0.0] * width if vector is None else np.asarray(vector, float).tolist(),
        }
        if item in dataset.titles:
            row["title"] = dataset.titles[item]
        rows.append(row)
    return rows
