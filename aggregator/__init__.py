"""The regional aggregator: streaming FedAvg over sealed deltas, and the privacy ledger.

Built so far: :class:`PartialSum`, a mergeable running sum (memory O(model size), whatever the
number of devices) with DP-FedAvg's central noise, and :class:`PrivacyLedger`, the per-region
accountant (opacus RDP or PRV, persisted in SQLite) that refuses rounds beyond the policy's
budget. The HTTP service, rounds and releases are still to come. Importing this package does not
import torch; the ledger loads opacus when it first computes an epsilon.
"""

from sottovoce.aggregator._ledger import (
    BudgetExceeded,
    LedgerEntry,
    PrivacyLedger,
    epsilon_of,
)
from sottovoce.aggregator._partial_sum import AggregationError, PartialSum, central_noise

__all__ = [
    "AggregationError",
    "BudgetExceeded",
    "LedgerEntry",
    "PartialSum",
    "PrivacyLedger",
    "central_noise",
    "epsilon_of",
]
