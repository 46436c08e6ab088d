"""sottovoce: privacy-first, on-device personalization with federated, private learning.

The parts install under this one import root:

- ``sottovoce.policy``: policy documents, decisions and the tamper-evident decision log;
- ``sottovoce.device``: the on-device event store, features, ranker and local training;
- ``sottovoce.sync``: the only path off a device (sealed deltas, outbox, model releases);
- ``sottovoce.aggregator``: the regional aggregation service;
- ``sottovoce.sim``: many-device simulation and evaluation.

This module imports none of them, so ``import sottovoce`` stays cheap.

Every error sottovoce raises on purpose is a :class:`SottovoceError`, through one root per
package; each package's docstring draws its own tree below that root::

    SottovoceError       error
    ├── ClockError       clock_invalid       SOTTOVOCE_NOW / --now is not an ISO 8601 time
    │                                        with a zone
    ├── PolicyError      policy_error        sottovoce.policy
    ├── DeviceError      device_error        sottovoce.device
    ├── SyncError        sync_error          sottovoce.sync
    ├── AggregatorError  aggregator_error    sottovoce.aggregator
    └── SimulationError  simulation_invalid  sottovoce.sim
"""

from sottovoce._clock import ClockError
from sottovoce._errors import SottovoceError

__all__ = ["ClockError", "SottovoceError", "__version__"]
__version__ = "0.1.0"
