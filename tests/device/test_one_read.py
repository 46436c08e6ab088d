"""``EventStore.one_read``: a rerank asks SQLite once whether the file changed, for every cache
it checks, and still sees another connection's write at the next read and its own writes at
once."""

from __future__ import annotations

import sqlite3
from contextlib import closing

from conftest import StoreFactory, fill_listening

from sottovoce.device._personalize import Personalizer
from sottovoce.device._rerank import RerankOptions
from sottovoce.policy import Purpose


def test_a_read_holds_the_generation_until_it_ends_or_writes(open_store: StoreFactory) -> None:
    store = open_store("us")
    fill_listening(store, events=50)
    with closing(sqlite3.connect(store.path)) as other:
        before = store.generation()
        with store.one_read():
            held = store.generation()
            other.execute("DELETE FROM track_stats")
            other.commit()
            assert store.generation() == held  # one check for the whole read
        assert store.generation() != before  # the other connection's write shows next
        with store.one_read():
            held = store.generation()
            store.grant("ann", Purpose.ANALYTICS)  # a write through this connection
            assert store.generation() != held
        assert store.generation() != held


def test_a_rerank_after_another_connections_write_reads_the_new_state(
    open_store: StoreFactory,
) -> None:
    store = open_store("us")
    tracks = fill_listening(store, events=300)
    personalizer = Personalizer(store)
    candidates = [t.track_id for t in tracks[:40]]
    options = RerankOptions(seed=3)  # the same exploration each time
    first = personalizer.rerank("ann", candidates, options=options)
    assert first.personalized
    with closing(sqlite3.connect(store.path)) as other:  # another process erases ann's stats
        other.execute("DELETE FROM track_stats")
        other.commit()
    after = personalizer.rerank("ann", candidates, options=options)
    again = Personalizer(store).rerank("ann", candidates, options=options)  # nothing cached
    assert after == again
    assert after != first
