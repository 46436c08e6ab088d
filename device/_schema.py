"""The device store's SQLite schema, as sqlite-utils migrations.

A migration is never edited once released; a change of schema is a new function appended here.
``STORE_SCHEMA`` names the newest migration so that an older sottovoce refuses a newer file
instead of misreading it.
"""

from __future__ import annotations

import secrets

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from sottovoce.policy import CheckpointSigner, DataClass, DecisionLog

MIGRATIONS = Migrations("sottovoce.device")

COUNTER_COLUMNS = (
    "plays", "completions", "skips", "early_skips", "ms_played", "likes", "dislikes",
)  # fmt: skip


@MIGRATIONS()
def m001_initial(db: Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key", not_null={"value"})
    # Users are referred to by a small integer everywhere; only this table holds the salted
    # hash, so keys stay short (hot upserts are B-tree work) and erasure has one anchor.
    db.table("users").create(
        {"user_ref": int, "user_hash": str, "created_ts": int, "age": int},
        pk="user_ref",
        not_null={"user_hash", "created_ts"},
    )
    db.table("users").create_index(["user_hash"], unique=True)
    db.table("events").create(
        {
            "seq": int,  # arrival order
            "event_id": str,
            "user_ref": int,
            "type": str,
            "ts": int,  # epoch ms
            "track_id": str,
            "artist_id": str,
            "body": str,  # canonical JSON of the event, without the user id
        },
        pk="seq",
        not_null={"event_id", "user_ref", "type", "ts", "body"},
    )
    db.table("events").create_index(["event_id"], unique=True)
    db.table("events").create_index(["user_ref", "ts"])
    db.table("consent").create(
        {
            "id": int,
            "user_ref": int,
            "purpose": str,
            "granted": int,
            "ts": int,
            "policy_hash": str,
            "region": str,
        },
        pk="id",
        not_null={"user_ref", "purpose", "granted", "ts", "policy_hash", "region"},
    )
    db.table("consent").create_index(["user_ref", "purpose"])
    # Per-item statistics are clustered on their key (WITHOUT ROWID): one B-tree per upsert.
    for table, key, extra in (
        ("track_stats", "track_id", "artist_id TEXT, "),
        ("artist_stats", "artist_id", ""),
    ):
        db.execute(
            f"CREATE TABLE {table} (user_ref INTEGER NOT NULL, {key} TEXT NOT NULL, {extra}"
            + "".join(f"{c} INTEGER NOT NULL DEFAULT 0, " for c in COUNTER_COLUMNS)
            + "feedback INTEGER NOT NULL DEFAULT 0, feedback_ts INTEGER, feedback_seq INTEGER, "
            f"last_played_ts INTEGER, last_event_ts INTEGER, PRIMARY KEY (user_ref, {key})"
            ") WITHOUT ROWID"
        )
    db.table("sessions").create(
        {
            "id": int,
            "user_ref": int,
            "start_ts": int,
            "end_ts": int,
            "events": int,
            "plays": int,
            "completions": int,
            "skips": int,
            "ms_played": int,
        },
        pk="id",
        not_null={"user_ref", "start_ts", "end_ts"},
    )
    db.table("sessions").create_index(["user_ref", "end_ts"])
    db.table("taste").create(
        {"user_ref": int, "ref_ts": int, "weight": float, "total": bytes}, pk="user_ref"
    )
    db.table("context").create(
        {
            "user_ref": int,
            "ts": int,
            "seq": int,
            "device_type": str,
            "network": str,
            "local_time": str,
        },
        pk="user_ref",
    )
    db.table("catalog").create(
        {"track_id": str, "artist_id": str, "title": str, "vector": bytes},
        pk="track_id",
        not_null={"vector"},
    )


@MIGRATIONS()
def m002_decision_log(db: Database) -> None:
    """The device's own decision log, so an access request can show what was decided."""
    suffix = secrets.token_hex(8)
    DecisionLog.create(
        db.conn,
        origin=f"sottovoce.device/{suffix}",
        signer=CheckpointSigner.generate(f"sottovoce-device-{suffix}"),
        keep_key=True,
    )
    # Which decisions were about which user: a local index outside the Merkle log, so that
    # erasure can unlink them (the log keeps only keyed digests, never a user reference).
    db.table("decision_subjects").create(
        {"idx": int, "user_ref": int}, pk="idx", not_null={"user_ref"}
    )
    db.table("decision_subjects").create_index(["user_ref"])
    db.table("meta").insert({"key": "digest_key", "value": secrets.token_hex(32)})


@MIGRATIONS()
def m003_ranker_and_erasure(db: Database) -> None:
    """Ranker weights; per-user subject keys and objections that outlive erasure."""
    # 'global' holds the last release (user_ref NULL); 'local:<ref>' a user's own training,
    # which is derived from their events and goes with them on withdrawal or erasure.
    db.table("model_state").create(
        {
            "slot": str,
            "user_ref": int,
            "model_id": str,
            "version": int,
            "weights": bytes,
            "state": bytes,
            "updated_ts": int,
        },
        pk="slot",
        not_null={"model_id", "version", "weights", "updated_ts"},
    )
    # Decisions name their subject by a random key kept in the user's row, so erasing the
    # row unlinks the log for good (a digest of the salted user hash could be recomputed).
    db.execute("ALTER TABLE users ADD COLUMN subject TEXT")
    db.execute("UPDATE users SET subject = lower(hex(randomblob(16)))")
    # An objection (withdrawn consent) is the one thing erasure keeps, so that erasing an
    # opted-out user cannot opt them back in; it holds the salted hash and the purpose only.
    db.table("objections").create(
        {"user_hash": str, "purpose": str, "ts": int}, pk=("user_hash", "purpose")
    )


@MIGRATIONS()
def m004_outbox(db: Database) -> None:
    """Sealed deltas waiting to be sent; the device secret and per-period signing keys."""
    db.table("outbox").create(
        {
            "idempotency_key": str,
            "user_ref": int,  # whose training produced it: withdrawal purges it
            "region": str,
            "round_id": str,
            "deadline_ts": int,
            "body": bytes,
            "state": str,  # pending | acknowledged | dropped
            "attempts": int,
            "next_attempt_ts": int,
            "created_ts": int,
            "done_ts": int,
            "reason": str,
        },
        pk="idempotency_key",
        not_null={"region", "round_id", "deadline_ts", "body", "state", "attempts",
                  "next_attempt_ts", "created_ts"},
    )  # fmt: skip
    db.table("outbox").create_index(["state", "next_attempt_ts"])
    db.table("device_keys").create({"period": str, "signing_key": str}, pk="period")
    db.table("meta").insert({"key": "device_secret", "value": secrets.token_hex(32)})


@MIGRATIONS()
def m005_privacy_spend(db: Database) -> None:
    # The device's own privacy ledger: one row per round it was charged for (no personal data:
    # round ids and mechanism parameters). Erasing a user does not reset it: the budget is the
    # device's, and a reset would let a round spend it twice.
    db.table("privacy_spend").create(
        {
            "region": str,
            "round_id": str,
            "mode": str,
            "period_start_ts": int,  # epoch ms
            "noise_multiplier": float,
            "sampling_rate": float,
            "sensitivity": float,
            "charged_ts": int,
        },
        pk=("region", "round_id"),
        not_null={"mode", "period_start_ts", "noise_multiplier", "sampling_rate", "sensitivity",
                  "charged_ts"},
    )  # fmt: skip


@MIGRATIONS()
def m006_outbox_sizes(db: Database) -> None:
    # A finished upload (acknowledged or dropped) keeps its size, not its sealed body: the body
    # is encrypted to the aggregator, so the device can never read it again, and it is never
    # sent again. Kept, every round's body stayed until retention (about 265 KB a round for the
    # collaborative model's uploads, 110 KB for the ranker's).
    db.execute("ALTER TABLE outbox ADD COLUMN bytes INTEGER")
    db.execute("UPDATE outbox SET bytes = length(body)")
    db.execute("UPDATE outbox SET body = X'' WHERE state != 'pending'")


STORE_SCHEMA = "m006_outbox_sizes"

# Which tables hold each class of data, and the column that dates a row for retention.
DATA_TABLES: dict[DataClass, tuple[tuple[str, str], ...]] = {
    DataClass.RAW_EVENTS: (("events", "ts"),),
    DataClass.DERIVED_STATE: (
        ("track_stats", "last_event_ts"),
        ("artist_stats", "last_event_ts"),
        ("sessions", "end_ts"),
        ("taste", "ref_ts"),
        ("context", "ts"),
        ("model_state", "updated_ts"),
    ),
    DataClass.OUTBOX: (("outbox", "created_ts"),),
}
# Derived from events alone: what rebuild_derived() recomputes.
EVENT_DERIVED = ("track_stats", "artist_stats", "sessions", "taste", "context")
# Rows of these tables that retention may delete (the global model is nobody's data).
RETENTION_FILTER = {"model_state": "user_ref IS NOT NULL"}
USER_TABLES = ("events", *EVENT_DERIVED, "model_state", "decision_subjects", "outbox")
