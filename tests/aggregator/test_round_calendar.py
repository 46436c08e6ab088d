"""Rounds at calendar edges: a round opened just before a budget period turns over (at a month
end, a year end, a daylight-saving change, a leap day) ends with its period and is charged to it;
the next round belongs to the next period. Inside, every time is UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from aggregator_helpers import Keys
from test_rounds import World, small

from sottovoce.sync import check_spec
from sottovoce.sync._budget import period_start_for

pytest.importorskip("opacus")

EDGES = {
    "month-end": datetime(2026, 12, 1, tzinfo=UTC),
    "year-end": datetime(2027, 1, 1, tzinfo=UTC),
    "leap-day": datetime(2028, 2, 29, tzinfo=UTC),
    "dst": datetime(2026, 10, 25, 3, 0, tzinfo=timezone(timedelta(hours=2))),  # Berlin, 01:00Z
}


@pytest.mark.parametrize("edge", list(EDGES.values()), ids=list(EDGES))
def test_a_round_straddling_a_period_edge_ends_with_its_period(
    tmp_path: Path, keys: Keys, edge: datetime
) -> None:
    # One-day budget periods turn over at UTC midnight, whatever the local calendar says.
    policy = keys.policy(period="1d")
    world = World(tmp_path / "aggregator.db", keys, policy)
    midnight = edge.astimezone(UTC).replace(hour=0, minute=0)
    world.clock.now = midnight - timedelta(minutes=30)
    spec = world.open(deadline=world.clock.now + timedelta(hours=6))
    # The deadline is capped at the period's end, so the device's own check accepts the round.
    assert spec.period_start == midnight - timedelta(days=1) and spec.deadline == midnight
    check_spec(spec, policy.region("eu"))
    sealed = world.device(spec).seal(small(np.random.default_rng(1)), spec, world.keys.hpke)
    assert world.upload(sealed).code == "within_policy"
    world.end(spec)  # published a second after midnight, charged to the period it opened in
    assert world.agg.round(spec.round_id).state == "published"  # type: ignore[union-attr]
    assert [e.round_id for e in world.agg.ledger.entries(spec.period_start)] == [spec.round_id]
    following = world.open()
    assert following.period_start == midnight == period_start_for(midnight, policy.region("eu"))
    assert world.agg.ledger.entries(midnight) == []  # nothing spent in the new period yet
    world.check_log()
    world.conn.close()


@pytest.fixture
def keys() -> Keys:
    return Keys()
