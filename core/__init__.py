"""sottovoce: privacy-first, on-device personalization with federated, private learning.

The parts install under this one import root:

- ``sottovoce.policy``: policy documents, decisions and the tamper-evident decision log;
- ``sottovoce.device``: the on-device event store, features, ranker and local training;
- ``sottovoce.sync``: the only path off a device (sealed deltas, outbox, model releases);
- ``sottovoce.aggregator``: the regional aggregation service;
- ``sottovoce.sim``: many-device simulation and evaluation.

This module imports none of them, so ``import sottovoce`` stays cheap.
"""

from sottovoce._errors import SottovoceError

__all__ = ["SottovoceError", "__version__"]
__version__ = "0.1.0"
