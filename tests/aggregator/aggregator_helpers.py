"""What the aggregator tests share: a settable clock, keys with a policy that publishes them, the
EU region's aggregator on those keys, and what a central round adds to the weights, computed from
first principles."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce.aggregator import PartialSum, RegionAggregator, RegionKeys
from sottovoce.aggregator._service import policy_with_keys
from sottovoce.policy import Policy, example_policy

T0 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
DIM = 8
COHORT = 3
EXPECTED = 5.0  # the fixed denominator of central rounds: sampling rate x population
MECHANISM = {"sampling_rate": 0.01, "population": 500}  # 0.01 x 500 = EXPECTED


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Keys:
    """The EU aggregator's keys, and the example policy changed to publish them."""

    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    hpke: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    def policy(self, **privacy: Any) -> Policy:
        """The example policy with the EU aggregator publishing these keys, its mechanism
        :data:`MECHANISM` with ``min_cohort`` :data:`COHORT`, then ``privacy``'s overrides."""
        return policy_with_keys(example_policy(), "eu", RegionKeys(self.signing, self.hpke), None,
                                privacy={"min_cohort": COHORT, **MECHANISM, **privacy})  # fmt: skip

    def aggregator(
        self,
        conn: sqlite3.Connection,
        *,
        clock: Callable[[], datetime],
        policy: Policy | None = None,
        model_id: str = "ab" * 32,
        dim: int = DIM,
        **options: Any,
    ) -> RegionAggregator:
        """The EU region's aggregator on ``conn`` with these keys, under ``policy`` (default:
        :meth:`policy`); ``options`` are the rest of :class:`RegionAggregator`'s (``base_weights``,
        ``rng``, ``accumulate``)."""
        return RegionAggregator(conn, policy=policy or self.policy(), region="eu",
                                signing_key=self.signing, hpke_key=self.hpke, model_id=model_id,
                                dim=dim, clock=clock, **options)  # fmt: skip


GRID_STEPS_PER_C = 2**20  # the fixed-point grid: C / 2**20 per step (docs/privacy.md)


def central_update(
    total: npt.ArrayLike,
    rng: np.random.Generator,
    *,
    clipping_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    expected_cohort: float = EXPECTED,
) -> npt.NDArray[np.float64]:
    """What a central round adds to the weights when the aggregator's noise comes from ``rng``
    (a seeded generator): the round's sum rounded to the grid of step gamma = C / 2**20, plus
    ``rint(normal(0, z * 2**20))`` grid steps per value, times gamma, over the fixed expected
    cohort. Independent of the product's code: the formula of docs/privacy.md."""
    values = np.asarray(total, dtype=np.float64)
    gamma = clipping_norm / GRID_STEPS_PER_C
    noise = np.rint(rng.normal(0.0, noise_multiplier * GRID_STEPS_PER_C, values.shape))
    update: npt.NDArray[np.float64] = (np.rint(values / gamma) + noise) * gamma / expected_cohort
    return update


def stored_sum(conn: Any, round_id: str | None = None) -> PartialSum | None:
    """A round's running sum as the database holds it: every worker's row of ``round_partials``
    merged (checksums checked), or ``None`` once no row is left (the round closed). Without
    ``round_id``: every round's rows."""
    where, args = ("WHERE round_id = ?", (round_id,)) if round_id else ("", ())
    rows = conn.execute(f"SELECT partial FROM round_partials {where}", args).fetchall()
    if not rows:
        return None
    parts = [PartialSum.from_bytes(blob) for (blob,) in rows]
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total
