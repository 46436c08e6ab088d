"""The root of ``sottovoce.sim``'s errors; the package docstring draws the whole tree.

:class:`SimulationError` is raised itself when a run cannot go ahead as configured; the
dataset adapters raise its subclass ``DatasetError`` (in ``_data.py``, next to the checks).
"""

from __future__ import annotations

from sottovoce._errors import SottovoceError


class SimulationError(SottovoceError):
    """The simulation cannot run as configured (the message says why); base class of the
    simulator's errors."""

    code = "simulation_invalid"
