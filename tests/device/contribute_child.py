"""A device that takes part in federated rounds until it is killed, for the contribute crash test.

Usage: ``python tests/device/contribute_child.py DB_PATH POLICY_JSON ACK_PATH ROUNDS STEPS``

``tests/device/test_crash_contribute.py`` starts this script on a store with listening history,
waits for its ``ready`` line in ACK_PATH, and kills it with SIGKILL at a random moment while it
runs :meth:`Personalizer.contribute` for rounds ``0 .. ROUNDS - 1`` in order (check the spec
and the device's privacy ledger, charge the round to the ledger (central mode, before the coin),
train, seal, then record the round, the outbox entry and the decision in one transaction).
After each contribute returns, the child adds ``ROUND_ID KEY`` to ACK_PATH and flushes, so the
file never claims more than the store acknowledged. A child restarted on the same file starts
again at round 0: rounds queued before the kill come back at once with their key, the others
are trained then.

POLICY_JSON must sample every device into every round (the test writes the example policy with
``conftest.policy_where_all_take_part``), so no device's coin keeps it out of a round.

Every round is a pure function of its index and the policy (spec, training seed), so the test
can tell what the store must hold without asking the child. The test module imports the
helpers below.
"""

from __future__ import annotations

import importlib
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sottovoce.device import Eligibility, EventStore, Personalizer
from sottovoce.policy import Policy, load_policy
from sottovoce.sync import RoundSpec

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # run as a script: the tests' shared helpers are one folder up
    sys.path.insert(0, _TESTS)
from conftest import round_spec as _aggregator_spec  # noqa: E402

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # the store's clock: never the wall clock
USER = "ann"
REGION = "us"
READY = Eligibility(charging=True, unmetered=True, idle=True)
LINGER_S = 120.0  # after the last round: wait to be killed (the test always kills)


def round_spec(index: int, policy: Policy, *, model_id: str, model_version: int) -> RoundSpec:
    """The spec of round ``index`` as the US aggregator would open it at ``NOW`` under
    ``policy``: its mechanism, its current budget period (the one that started 2026-10-04)."""
    spec: RoundSpec = _aggregator_spec(policy, REGION, model_id=model_id,
                                       model_version=model_version, now=NOW,
                                       round_id=f"us-crash-{index}", epsilon_spent=1.0,
                                       epsilon_after=1.5)  # fmt: skip
    return spec


def load_ledger() -> None:
    """Load what the device's privacy ledger needs in its first round (dp-accounting, about a
    second) ahead of the rounds, so that the test's timing of a round, and the kills it spreads
    over the rounds, are about the rounds."""
    importlib.import_module("dp_accounting.rdp")


def contribute(device: Personalizer, index: int, *, steps: int) -> str | None:
    """Take part in round ``index`` exactly as the child does (training seed = index)."""
    spec = round_spec(index, device.store.policy, model_id=device.ranker.model_id,
                      model_version=device.version)  # fmt: skip
    return device.contribute(USER, spec=spec, eligibility=READY, steps=steps, seed=index)


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    db_path, policy_path, ack_path = Path(argv[1]), Path(argv[2]), Path(argv[3])
    rounds, steps = int(argv[4]), int(argv[5])
    policy = load_policy(policy_path)
    with (
        ack_path.open("a", encoding="utf-8") as acks,
        EventStore.open(db_path, policy=policy, region=REGION, clock=lambda: NOW) as store,
    ):
        device = Personalizer(store)
        load_ledger()
        acks.write("ready\n")  # the test times its kill from here
        acks.flush()
        for index in range(rounds):
            key = contribute(device, index, steps=steps)
            acks.write(f"us-crash-{index} {key}\n")
            acks.flush()
        acks.write("done\n")
        acks.flush()
        time.sleep(LINGER_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
