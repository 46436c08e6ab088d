"""Who the store's rows belong to: a user id becomes a salted hash (the id itself is never
stored) and an integer reference that the user's rows carry."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal, overload

from sottovoce.device._rows import to_ms
from sottovoce.device._store_file import StoreFile

__all__ = ["Users"]


class Users:
    """The ``users`` table, and the salt that hides their ids."""

    def __init__(self, file: StoreFile) -> None:
        self._file = file
        self._salt = bytes.fromhex(file.meta("salt"))
        self._hashes: dict[str, str] = {}

    def hash(self, user_id: str) -> str:
        """The salted hash under which ``user_id`` is stored (the id itself never is)."""
        cached = self._hashes.get(user_id)
        if cached is None:
            digest = hmac.new(self._salt, user_id.encode(), hashlib.sha256).hexdigest()
            cached = self._hashes[user_id] = digest[:32]
        return cached

    @overload
    def ref(self, user_id: str, *, create: Literal[True]) -> int: ...

    @overload
    def ref(self, user_id: str, *, create: bool) -> int | None: ...

    def ref(self, user_id: str, *, create: bool) -> int | None:
        """The store's integer reference to a user (registering them when ``create``)."""
        user = self.hash(user_id)
        conn = self._file.conn
        found = conn.execute("SELECT user_ref FROM users WHERE user_hash = ?", (user,)).fetchone()
        if found is not None:
            return int(found[0])
        if not create:
            return None
        cursor = conn.execute(
            "INSERT INTO users (user_hash, created_ts, subject) VALUES (?, ?, ?)",
            (user, to_ms(self._file.clock()), secrets.token_hex(16)),
        )
        return int(cursor.lastrowid or 0)
