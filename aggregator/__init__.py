"""The regional aggregator: streaming FedAvg over sealed deltas, and the privacy ledger.

Built so far: :class:`PartialSum`, a mergeable running sum (memory O(model size), whatever the
number of devices) with DP-FedAvg's central noise; :class:`PrivacyLedger`, the per-region
accountant (opacus RDP or PRV, persisted in the region's database) that refuses rounds beyond
the policy's budget; and :class:`RegionAggregator`, the round logic over one database
(enrollment, signed round specs, accepting sealed deltas with a logged decision for every
:class:`Verdict` (a reason code, not an HTTP status: the service maps it), closing at the
minimum cohort into a signed release, abandoning at the deadline, erasure of pending deltas,
retention); ``create_app`` puts it behind a thin FastAPI layer (the paths
``sottovoce.sync.transport`` speaks); :func:`build_app` adds what a deployment needs (keys from
files, the round schedule and retention sweeps, JSON logs), run by ``sottovoce aggregator
serve``. :func:`open_database` opens a region's database (an SQLite file or a PostgreSQL
URL) and :func:`migrate` brings its schema to this version's. Importing this package does not
import torch; the ledger loads opacus when it first computes an epsilon.

Errors (``code`` in the middle column)::

    AggregatorError         aggregator_error
    ├── AggregationError    aggregation_error  a delta, partial sum or stored sum the aggregation
    │                                          refuses (wrong shape, non-finite, not intact)
    ├── DatabaseUnavailable unavailable        the PostgreSQL database cannot take the write now
    │                                          (restarting, unreachable): nothing was kept, retry
    ├── RoundStillOpen      round_open         a round is already open; one round at a time
    ├── RoundOverBudget     budget_exhausted   the round would take the period's epsilon above the
    │                                          policy's budget (also a policy.BudgetExhausted)
    ├── SchemaTooNew        schema_too_new     the database was migrated by a newer sottovoce
    └── ServiceConfigError  config_invalid     the service cannot start with this configuration

``AggregatorError`` derives from :class:`sottovoce.SottovoceError`. A refused upload is not an
error of this package: it is answered and logged with a ``sottovoce.sync`` error's ``code``.
"""

from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._app import create_app
from sottovoce.aggregator._errors import AggregatorError
from sottovoce.aggregator._ledger import (
    LedgerEntry,
    PrivacyLedger,
    RoundOverBudget,
    epsilon_of,
)
from sottovoce.aggregator._partial_sum import AggregationError, PartialSum, central_release
from sottovoce.aggregator._postgres import DatabaseUnavailable, open_database
from sottovoce.aggregator._refusals import RefusalLimit
from sottovoce.aggregator._round_state import RoundInfo, RoundStillOpen, Verdict
from sottovoce.aggregator._schema import SCHEMA_VERSION, SchemaTooNew, migrate
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
    "SCHEMA_VERSION",
    "AggregationError",
    "AggregatorError",
    "DatabaseUnavailable",
    "LedgerEntry",
    "PartialSum",
    "PrivacyLedger",
    "RefusalLimit",
    "RegionAggregator",
    "RegionKeys",
    "RoundInfo",
    "RoundOverBudget",
    "RoundScheduler",
    "RoundStillOpen",
    "SchemaTooNew",
    "ServiceConfig",
    "ServiceConfigError",
    "Verdict",
    "build_app",
    "central_release",
    "create_app",
    "epsilon_of",
    "generate_keys",
    "load_keys",
    "migrate",
    "open_database",
]
