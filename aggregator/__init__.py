"""The regional aggregator: streaming FedAvg over sealed deltas, and the privacy ledger.

Built so far: :class:`PartialSum`, a mergeable running sum (memory O(model size), whatever the
number of devices) with DP-FedAvg's central noise; :class:`PrivacyLedger`, the per-region
accountant (opacus RDP or PRV, persisted in SQLite) that refuses rounds beyond the policy's
budget; and :class:`RegionAggregator`, the round logic over one SQLite file (enrollment, signed
round specs, accepting sealed deltas with a logged decision for every verdict, closing at the
minimum cohort into a signed release, abandoning at the deadline, erasure of pending deltas,
retention); ``create_app`` puts it behind a thin FastAPI layer (the paths
``sottovoce.sync.transport`` speaks); :func:`build_app` adds what a deployment needs (keys from
files, the round schedule and retention sweeps, JSON logs), run by ``sottovoce aggregator
serve``. Importing this package does not import torch; the ledger loads opacus when it first
computes an epsilon.
"""

from sottovoce.aggregator._app import create_app
from sottovoce.aggregator._ledger import (
    BudgetExceeded,
    LedgerEntry,
    PrivacyLedger,
    epsilon_of,
)
from sottovoce.aggregator._partial_sum import AggregationError, PartialSum, central_release
from sottovoce.aggregator._refusals import RefusalLimit
from sottovoce.aggregator._rounds import RegionAggregator, RoundInfo, RoundStillOpen
from sottovoce.aggregator._service import (
    RegionKeys,
    RoundScheduler,
    ServiceConfig,
    ServiceConfigError,
    build_app,
    generate_keys,
    load_keys,
)

__all__ = [
    "AggregationError",
    "BudgetExceeded",
    "LedgerEntry",
    "PartialSum",
    "PrivacyLedger",
    "RefusalLimit",
    "RegionAggregator",
    "RegionKeys",
    "RoundInfo",
    "RoundScheduler",
    "RoundStillOpen",
    "ServiceConfig",
    "ServiceConfigError",
    "build_app",
    "central_release",
    "create_app",
    "epsilon_of",
    "generate_keys",
    "load_keys",
]
