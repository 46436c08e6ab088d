"""The regional aggregator: streaming FedAvg over sealed deltas, and the privacy ledger.

Built so far: :class:`PartialSum`, a mergeable running sum (memory O(model size), whatever the
number of devices) with DP-FedAvg's central noise; :class:`PrivacyLedger`, the per-region
accountant (opacus RDP or PRV, persisted in SQLite) that refuses rounds beyond the policy's
budget; and :class:`RegionAggregator`, the round logic over one SQLite file (enrollment, signed
round specs, accepting sealed deltas with a logged decision for every verdict, closing at the
minimum cohort into a signed release, abandoning at the deadline, retention); ``create_app``
puts it behind a thin FastAPI layer (the paths ``sottovoce.sync.transport`` speaks). The CLI,
erasure endpoint and sweeper schedule are still to come. Importing this package does not
import torch; the ledger loads opacus when it first computes an epsilon.
"""

from sottovoce.aggregator._app import create_app
from sottovoce.aggregator._ledger import (
    BudgetExceeded,
    LedgerEntry,
    PrivacyLedger,
    epsilon_of,
)
from sottovoce.aggregator._partial_sum import AggregationError, PartialSum, central_noise
from sottovoce.aggregator._rounds import RegionAggregator, RoundInfo, RoundStillOpen

__all__ = [
    "AggregationError",
    "BudgetExceeded",
    "LedgerEntry",
    "PartialSum",
    "PrivacyLedger",
    "RegionAggregator",
    "RoundInfo",
    "RoundStillOpen",
    "central_noise",
    "create_app",
    "epsilon_of",
]
