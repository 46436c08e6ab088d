"""Fuzzing the event API: whatever an app hands ``append_many``, the store either takes the
whole batch or refuses it with a typed error, and a refusal changes nothing that was stored."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from conftest import NOW, Events
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sottovoce import SottovoceError
from sottovoce.device import EventStore
from sottovoce.policy import example_policy

TYPES = ("play_start", "play_end", "pause", "resume", "skip", "seek", "like", "dislike",
         "search", "navigate", "context")  # fmt: skip
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@st.composite
def fuzzed_event(draw: st.DrawFn) -> Any:
    """A valid event, then some of its fields dropped, replaced by junk, or junk added."""
    event = Events(draw(st.sampled_from(["user-1", "user-2"])))(draw(st.sampled_from(TYPES)))
    event["event_id"] = f"e{draw(st.integers(0, 40))}"
    for key in list(event):
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "junk"]))
        if action == "drop":
            del event[key]
        elif action == "junk":
            event[key] = draw(junk)
    if draw(st.booleans()):
        event[draw(st.text(min_size=1, max_size=12))] = draw(junk)
    return draw(st.sampled_from([event, event, event, draw(junk)]))  # sometimes not a dict


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(fuzzed_event(), min_size=1, max_size=4), min_size=1, max_size=4))
def test_any_batch_is_stored_whole_or_refused_with_a_typed_error(batches: list[list[Any]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = EventStore.open(Path(folder) / "device.db", policy=example_policy(),
                                region="us", clock=lambda: NOW)  # fmt: skip
        try:
            for batch in batches:
                before = store.count("events")
                try:
                    result = store.append_many(batch)
                except SottovoceError as error:
                    event(f"refused: {error.code}")
                    assert error.code and str(error)  # typed, with a sentence
                    assert store.count("events") == before  # nothing half-written
                    continue
                event("stored" if result.accepted else "nothing new")
                assert store.count("events") == before + result.accepted
            assert store.decisions.verify().ok
        finally:
            store.close()
