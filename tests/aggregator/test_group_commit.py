"""Group commit: uploads that arrive together are decided in one durable transaction
(``RegionAggregator.accept_many``), on both backends, with the same answers and the same state
as one transaction each; a failed upload costs only itself, a failed commit costs the whole
group and nothing of it is counted."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import test_rounds
from aggregator_helpers import COHORT, DIM, Keys, stored_sum
from test_rounds import Device, World, small

from sottovoce.aggregator import AggregationError, RegionAggregator
from sottovoce.sync import SealedDelta

pytest.importorskip("opacus")

# The round tests' fixtures: a world on each backend, and its keys.
world = test_rounds.world
keys = test_rounds.keys


def sealed_uploads(world: World, n: int, seed: int = 1) -> tuple[Any, list[SealedDelta]]:
    spec = world.open()
    rng = np.random.default_rng(seed)
    return spec, [world.device(spec).seal(small(rng), spec, world.keys.hpke) for _ in range(n)]


def group(*sealed: SealedDelta) -> list[tuple[bytes, str, bool]]:
    return [(s.to_wire(), s.idempotency_key, True) for s in sealed]


def test_a_group_gets_the_answers_and_state_of_one_transaction_each(world: World) -> None:
    spec, sealed = sealed_uploads(world, COHORT + 2)
    replay, twice = sealed[0], Device()
    world.agg.enroll(twice.public, _period(spec))
    rng = np.random.default_rng(9)
    first, second = (twice.seal(small(rng), spec, world.keys.hpke) for _ in range(2))
    uploads = [*sealed, replay, first, second]
    results = world.agg.accept_many(group(*uploads))
    codes = [r.code for r in results if not isinstance(r, Exception)]
    # The replay gets its first answer; the device's second delta for the round comes under
    # the same idempotency key (one per device and round) with other content: refused.
    assert codes == ["within_policy"] * (COHORT + 2) + ["within_policy"] + [
        "within_policy", "malformed"]  # fmt: skip
    assert [getattr(r, "added", None) for r in results[-3:]] == [False, True, False]
    accepted = [*sealed, first]
    info = world.agg.round(spec.round_id)
    assert info is not None and info.count == len(accepted)
    total = stored_sum(world.conn, spec.round_id)
    assert total is not None and total.count == len(accepted)
    expected = sum((np.asarray(s_delta(world, s), np.float64) for s in accepted), np.zeros(DIM))
    np.testing.assert_allclose(total.total, expected, rtol=0, atol=1e-9)
    # One decision per upload, in the order they came, in one log that verifies.
    assert world.reasons() == ["within_policy"] * (COHORT + 3) + ["malformed"]


def test_one_failing_upload_costs_only_itself(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, sealed = sealed_uploads(world, 3)
    log = world.agg.log
    real = log.append
    calls = {"n": 0}

    def second_fails(decision: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise AggregationError("the second upload's decision could not be written")
        return real(decision)

    monkeypatch.setattr(log, "append", second_fails)
    results = world.agg.accept_many(group(*sealed))
    monkeypatch.undo()
    assert isinstance(results[1], AggregationError)
    assert [getattr(r, "code", None) for r in (results[0], results[2])] == ["within_policy"] * 2
    info = world.agg.round(spec.round_id)
    assert info is not None and info.count == 2
    total = stored_sum(world.conn, spec.round_id)
    assert total is not None and total.count == 2
    # Its savepoint was rolled back whole: the same upload is decided again on retry.
    assert world.upload(sealed[1]).code == "within_policy"
    assert world.agg.round(spec.round_id).count == 3  # type: ignore[union-attr]


def test_a_failed_commit_counts_none_of_the_group(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, sealed = sealed_uploads(world, 3)
    assert world.upload(sealed[0]).code == "within_policy"
    before = stored_sum(world.conn, spec.round_id)

    def store_fails() -> None:
        raise RuntimeError("the disk went away at the commit")

    monkeypatch.setattr(
        "sottovoce.aggregator._upload_group.Group.store", lambda self: store_fails()
    )
    with pytest.raises(RuntimeError):
        world.agg.accept_many(group(*sealed[1:]))
    monkeypatch.undo()
    info = world.agg.round(spec.round_id)
    assert info is not None and info.count == 1
    after = stored_sum(world.conn, spec.round_id)
    assert after is not None and before is not None
    assert after.count == 1 and np.array_equal(after.total, before.total)
    assert world.reasons() == ["within_policy"]  # no decision of the failed group is left
    assert [r.code for r in world.agg.accept_many(group(*sealed[1:]))  # type: ignore[union-attr]
            ] == ["within_policy"] * 2  # fmt: skip


def test_a_full_sqlite_file_refuses_the_whole_group_and_keeps_what_it_had(
    tmp_path: Any, keys: Keys
) -> None:
    world = World(tmp_path / "full.db", keys, keys.policy())
    spec, sealed = sealed_uploads(world, 6)
    assert world.upload(sealed[0]).code == "within_policy"
    pages = world.conn.execute("PRAGMA page_count").fetchone()[0]
    world.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full now
    with pytest.raises(sqlite3.OperationalError) as failed:
        world.agg.accept_many(group(*sealed[1:]))
    assert failed.value.sqlite_errorname == "SQLITE_FULL", failed.value
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]
    world.conn.execute(f"PRAGMA max_page_count = {pages * 100}")  # space is freed
    results = world.agg.accept_many(group(*sealed[1:]))
    assert [getattr(r, "code", r) for r in results] == ["within_policy"] * 5
    total = stored_sum(world.conn, spec.round_id)
    assert total is not None and total.count == 6
    world.check_log()
    world.conn.close()


def _period(spec: Any) -> str:
    from sottovoce.sync import period_label

    return period_label(spec)


def s_delta(world: World, sealed: SealedDelta) -> Any:
    """What the aggregator adds for ``sealed``: the delta it opens (the tests' deltas are
    inside the clipping norm, so sealing does not change them beyond float32)."""
    from sottovoce.sync import open_delta
    from sottovoce.sync._seal import device_noise_std

    info = world.agg.round(sealed.round_id)
    assert info is not None
    spec = info.spec
    return open_delta(sealed, region=spec.region, round_id=spec.round_id,
                      model_version=spec.model_version, hpke_private_key=world.keys.hpke,
                      clipping_norm=spec.clipping_norm, noise_std=device_noise_std(spec),
                      dim=DIM).delta  # fmt: skip


def test_enrollments_share_a_transaction_and_a_refusal_is_its_own(world: World) -> None:
    spec = world.open()
    period = _period(spec)
    good, other = Device(), Device()

    def enroll(key: str) -> Callable[[RegionAggregator], str | None]:
        def call(agg: RegionAggregator) -> str | None:  # as the service's enroll route does
            try:
                agg.enroll(key, period)
            except ValueError as refused:  # its refusal decision is kept: not raised here
                return str(refused)
            return None

        return call

    def broken(agg: RegionAggregator) -> None:
        agg.enroll(Device().public, period)
        raise ValueError("this call fails after writing")  # its writes are rolled back

    results = world.agg.write_many([enroll(good.public), enroll("not-a-key"), broken,
                                    enroll(other.public)])  # fmt: skip
    assert results[0] is None and results[3] is None
    assert "base64" in str(results[1])
    assert isinstance(results[2], ValueError)
    enrolled = world.conn.execute("SELECT device_key FROM enrollments ORDER BY device_key")
    assert sorted(k for (k,) in enrolled.fetchall()) == sorted([good.public, other.public])
    # Each enrollment is a logged decision, the refusal included (its own savepoint kept it).
    decisions = world.decisions("enroll_device")[-3:]
    assert [d.outcome.value for d in decisions] == ["allow", "deny", "allow"]
    assert decisions[1].reason == "malformed"
