"""The root of every exception sottovoce raises on purpose.

Each package roots its own tree in a subclass (``PolicyError``, ``DeviceError``, ``SyncError``,
``AggregatorError``, ``SimulationError``), drawn in the package's docstring; ``sottovoce``'s own
docstring draws the roots. Every error a user can meet carries ``code``, a stable
machine-readable reason, and a sentence a person understands (``str(error)``).
"""

from __future__ import annotations


class SottovoceError(Exception):
    """Base class of all sottovoce errors."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""
