"""What the store does for the user's rights and the region's retention rules: purge what
retention no longer allows, erase a user, export everything stored about a user. Each is a
logged decision, in the same transaction as what it deleted or read.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sottovoce.device._rows import _MS, from_ms, to_ms
from sottovoce.device._schema import DATA_TABLES, RETENTION_FILTER, USER_TABLES
from sottovoce.device._store_decisions import DecisionTrail
from sottovoce.device._store_derived import DerivedState
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_users import Users
from sottovoce.device._store_values import PurgeReport
from sottovoce.policy import DataClass, Policy

__all__ = ["Rights"]


class Rights:
    """Retention, erasure and access over every table of the store."""

    def __init__(
        self, file: StoreFile, *, users: Users, trail: DecisionTrail, derived: DerivedState,
        policy: Policy, region_id: str,
    ) -> None:  # fmt: skip
        self._file, self._users, self._trail, self._derived = file, users, trail, derived
        self._policy = policy
        self._region = policy.region(region_id)

    def purge_expired(self, *, now: datetime | None = None) -> PurgeReport:
        """Delete what the region's retention rules no longer allow to keep."""
        moment = now or self._file.clock()
        now_ms = to_ms(moment)
        deleted: dict[str, int] = {}
        conn, log = self._file.conn, self._trail.log
        with self._file.write("purging by retention"):
            for data_class, tables in DATA_TABLES.items():
                cutoff = now_ms - self._region.ttl(data_class) // _MS
                for table, column in tables:
                    only = f" AND {RETENTION_FILTER[table]}" if table in RETENTION_FILTER else ""
                    sql = f"DELETE FROM {table} WHERE {column} < ?{only}"
                    deleted[table] = conn.execute(sql, (cutoff,)).rowcount
            audit_cutoff = moment - self._region.ttl(DataClass.AUDIT_LOG)
            deleted["decision_log"] = log.prune(audit_cutoff)
            pruned = log.pruned_total()
            conn.execute("DELETE FROM decision_subjects WHERE idx < ?", (pruned,))
            inputs = {"action": "purge_retention", "now": now_ms}
            decision = self._trail.engine.purge(deleted=deleted, inputs=inputs,
                                                log_pruned_total=pruned)  # fmt: skip
            self._trail.record(decision, None)
            log.checkpoint()  # routine maintenance is a good time to sign
        return PurgeReport(deleted)

    def erase_user(self, user_id: str) -> PurgeReport:
        """Erase everything stored about the user (see
        :meth:`sottovoce.device.EventStore.erase_user`)."""
        deleted: dict[str, int] = {}
        with self._file.write("erasing the user's data"):
            ref = self._users.ref(user_id, create=False)
            inputs = self._trail.inputs("erase", None)  # a one-off subject: nothing to link
            for table in (*USER_TABLES, "consent", "users"):
                sql = f"DELETE FROM {table} WHERE user_ref = ?"
                deleted[table] = self._file.conn.execute(sql, (ref,)).rowcount
            self._trail.record(self._trail.engine.erase(deleted=deleted, inputs=inputs), None)
        return PurgeReport(deleted)

    def export_user(self, user_id: str) -> dict[str, Any]:
        """Everything stored for the user, as JSON-ready data (an access request)."""
        rows = self._file.rows
        with self._file.write("exporting the user's data"):  # the export is a logged decision
            ref = self._users.ref(user_id, create=False)
            profile = next(rows("SELECT * FROM users WHERE user_ref = ?", [ref]), None)
            consent = [
                {**row, "granted": bool(row["granted"]), "at": from_ms(row["ts"]).isoformat()}
                for row in rows(
                    "SELECT purpose, granted, ts, policy_hash, region FROM consent "
                    "WHERE user_ref = ? ORDER BY id",
                    [ref],
                )
            ]
            events = [
                {"seq": row["seq"], **json.loads(row["body"])}
                for row in rows(
                    "SELECT seq, body FROM events WHERE user_ref = ? ORDER BY seq", [ref]
                )
            ]
            derived = self._derived.rows(user_id)
            models = [
                {"model_id": row["model_id"], "version": row["version"],
                 "updated_at": from_ms(row["updated_ts"]).isoformat(),
                 "parameters": len(row["weights"]) // 4}
                for row in rows(
                    "SELECT model_id, version, updated_ts, weights FROM model_state "
                    "WHERE user_ref = ?", [ref])
            ]  # fmt: skip
            uploads = [
                _upload(row)
                for row in rows(
                    "SELECT round_id, region, state, reason, attempts AS retries, "
                    "bytes, created_ts AS queued_ts, deadline_ts, done_ts "
                    "FROM outbox WHERE user_ref = ? ORDER BY created_ts", [ref])
            ]  # fmt: skip
            inputs = self._trail.inputs("export", ref)
            self._trail.record(self._trail.engine.export(inputs=inputs, count=len(events)), ref)
            decisions = [
                {"index": index, **json.loads(entry)}
                for index, entry in self._file.conn.execute(
                    "SELECT l.idx, l.entry FROM decision_log l JOIN decision_subjects s "
                    "ON s.idx = l.idx WHERE s.user_ref = ? AND l.entry != '' ORDER BY l.idx",
                    (ref,),
                )
            ]
        return {
            "format": "sottovoce.access-export/1",
            "exported_at": self._file.clock().isoformat(),
            "user_id": user_id,
            "user_hash": self._users.hash(user_id),
            "region": self._region.id,
            "policy_hash": self._policy.hash,
            "profile": profile,
            "consent": consent,
            "events": events,
            "derived": derived,
            "personal_models": models,  # trained on the user's events (weights not listed)
            # Model updates queued to leave the device, and what became of each (never the
            # update itself); the decisions below keep the trail after outbox retention.
            "uploads": uploads,
            "decisions": decisions,
        }


def _upload(row: dict[str, Any]) -> dict[str, Any]:
    """An outbox row as an access export shows it: times in ISO 8601; no delta, no key."""
    queued, deadline, done = row.pop("queued_ts"), row.pop("deadline_ts"), row.pop("done_ts")
    return {**row, "queued_at": from_ms(queued).isoformat(),
            "deadline": from_ms(deadline).isoformat(),
            "finished_at": None if done is None else from_ms(done).isoformat()}  # fmt: skip
