"""The root of ``sottovoce.aggregator``'s errors; the package docstring draws the whole tree.

The errors themselves live next to the code that raises them (``_partial_sum.py``,
``_round_state.py``, ``_ledger.py``, ``_service.py``). Refusals of an upload are not errors of
this package: they are ``sottovoce.sync`` errors, logged and answered with their ``code``.
"""

from __future__ import annotations

from sottovoce._errors import SottovoceError


class AggregatorError(SottovoceError):
    """Base class of aggregator errors."""

    code = "aggregator_error"
