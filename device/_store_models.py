"""Ranker weights kept in the store (``model_state``), one row per slot: the global model
(``global``), a user's personal model (``local:<user hash>``), the collaborative model.
A model trained on a user's history is their data: withdrawal, erasure and retention treat it
like the rest of their derived state."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce.device._rows import to_ms
from sottovoce.device._sqlite import guarded
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_users import Users
from sottovoce.device._store_values import ModelWeights

__all__ = ["Models"]


class Models:
    """The ``model_state`` table."""

    def __init__(self, file: StoreFile, *, users: Users) -> None:
        self._file, self._users = file, users

    def save(
        self, slot: str, *, model_id: str, version: int, weights: npt.NDArray[np.floating[Any]],
        state: npt.NDArray[np.floating[Any]] | None = None, user_id: str | None = None,
    ) -> None:  # fmt: skip
        """Store ranker weights (and optimizer state) in one write: readers see old or new."""
        kept = None if state is None else np.asarray(state, dtype=np.float32)
        model = ModelWeights(model_id, version, np.asarray(weights, dtype=np.float32), kept)
        with self._file.write():
            ref = None if user_id is None else self._users.ref(user_id, create=True)
            self.put(slot, ref, model, at_ms=to_ms(self._file.clock()))

    def put(self, slot: str, ref: int | None, model: ModelWeights, *, at_ms: int) -> None:
        """Write ``model`` to ``slot`` (inside the caller's write), as user ``ref``'s data."""
        state = None if model.state is None else model.state.astype(np.float32).tobytes()
        self._file.conn.execute(
            "INSERT OR REPLACE INTO model_state (slot, user_ref, model_id, version, weights, "
            "state, updated_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (slot, ref, model.model_id, model.version, model.weights.astype(np.float32).tobytes(),
             state, at_ms),
        )  # fmt: skip

    @guarded("reading model weights")
    def load(self, slot: str) -> ModelWeights | None:
        row = self._file.conn.execute(
            "SELECT model_id, version, weights, state FROM model_state WHERE slot = ?", (slot,)
        ).fetchone()
        if row is None:
            return None
        state = None if row[3] is None else np.frombuffer(row[3], dtype=np.float32)
        return ModelWeights(row[0], row[1], np.frombuffer(row[2], dtype=np.float32), state)
