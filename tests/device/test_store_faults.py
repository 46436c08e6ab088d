"""A full disk and a damaged page: SQLite's failures reach the app as the store's typed errors,
with a sentence, and the store keeps what it had and keeps answering."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from conftest import NOW, Events
from store_peek import own_connection, peek

from sottovoce.device import EventStore, StoreCorrupt, StoreError, StoreFull
from sottovoce.policy import Purpose, example_policy


def _open(path: Path) -> EventStore:
    return EventStore.open(path, policy=example_policy(), region="us", clock=lambda: NOW)


def _listening(events: Events, n: int) -> list[dict[str, object]]:
    return [events("play_end", after=1, track_id=f"t{i % 40}", artist_id=f"a{i % 7}")
            for i in range(n)]  # fmt: skip


def test_a_full_disk_is_store_full_and_loses_nothing(tmp_path: Path) -> None:
    events = Events()
    with _open(tmp_path / "device.db") as store:
        store.append_many(_listening(events, 200))
        kept = (store.count(), store.derived_state(), store.decisions.size)
        # The disk is full: SQLite may not grow the file by more than two pages.
        conn = own_connection(store)  # the limit is the connection's
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        batch = _listening(events, 3_000)
        with pytest.raises(StoreFull) as caught:
            store.append_many(batch)
        assert caught.value.code == "store_full"
        assert "no space left while storing a batch of 3000 events" in str(caught.value)
        assert "nothing of it was written" in str(caught.value)
        # What was stored is intact, and the store is not wedged: a write that fits goes in.
        assert (store.count(), store.derived_state(), store.decisions.size) == kept
        assert store.decisions.verify().problems == []
        store.grant("user-1", Purpose.FEDERATED_TRAINING)
        assert store.allows("user-1", Purpose.FEDERATED_TRAINING)
        # Space comes back: the same batch goes in whole, its derived state with it.
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert store.append_many(batch).accepted == 3_000
        assert store.rebuild_derived() == 3_200
        assert len(store.export_user("user-1")["events"]) == 3_200


def test_a_damaged_page_is_store_corrupt_and_the_rest_answers(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    events = Events()
    with _open(path) as store:
        store.append_many(_listening(events, 200))
        ((page,),) = peek(store, "PRAGMA page_size")
        ((root,),) = peek(store, "SELECT rootpage FROM sqlite_master WHERE name = 'track_stats'")
        entries = store.decisions.size
    # closed: the write-ahead log is back in the file. Overwrite the per-track statistics'
    # root page, as a bad sector or a torn write would.
    with path.open("r+b") as file:
        file.seek((root - 1) * page)
        file.write(b"\xa5" * page)
    with _open(path) as store:
        with pytest.raises(StoreCorrupt) as caught:
            store.export_user("user-1")
        assert caught.value.code == "store_corrupt" and isinstance(caught.value, StoreError)
        assert "is damaged (database disk image is malformed)" in str(caught.value)
        assert "met while exporting the user's data" in str(caught.value)
        with pytest.raises(StoreCorrupt, match="while storing a batch of 1 events"):
            store.append(events("play_end", track_id="t1"))
        # The events, consent and the decision log live on other pages: they still answer,
        # and nothing was added by the failed calls.
        assert store.count() == 200
        assert store.decisions.size == entries
        assert store.decisions.verify().problems == []
        assert store.consent_state("user-1").choices == {}
        (rows,) = peek(store, "SELECT count(*), max(ts) FROM events")
        assert rows[0] == 200 and rows[1] < int((NOW + timedelta(minutes=5)).timestamp() * 1000)
