"""One registry of reason codes: every other table is derived from it, and the docs show it.

``docs/protocol.md`` ("Answers and retries") must be the table :func:`answers_table` renders
from the registry, and ``docs/compliance.md`` ("Reason codes") must give every logged code the
registry's outcome. The aggregator's statuses and messages, the decision engine's reasons and
the outbox's final refusals are the registry's own rows.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sottovoce.aggregator._edge import MESSAGES, STATUS
from sottovoce.policy import REASON_CODES, REASONS, Reason, reason
from sottovoce.policy._decision import DENY_REASONS
from sottovoce.sync import Drop, OutboxItem, RetryAt, decide
from sottovoce.sync._outbox import FINAL_REFUSALS

DOCS = Path(__file__).resolve().parents[1] / "docs"
HEADING = "### Answers and retries"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def answers_table(rows: tuple[Reason, ...] = REASON_CODES) -> str:
    """The table docs/protocol.md shows: every code an answer carries or an upload is dropped
    for, in the registry's order."""
    lines = ["| code | HTTP status | final for the uploader | retry | message |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if row.status is None and not row.final:
            continue
        status = "—" if row.status is None else str(row.status)
        cells = [f"`{row.code}`", status, "yes" if row.final else "no",
                 row.retry or "—", row.message or "—"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def documented_table(doc: Path, heading: str) -> str:
    text = doc.read_text(encoding="utf-8").split("\n" + heading + "\n", 1)[1]
    blocks = (block.strip() for block in text.split("\n\n"))
    return next(block for block in blocks if block.startswith("| "))


def test_the_protocol_docs_table_is_the_registry() -> None:
    expected = answers_table()
    assert documented_table(DOCS / "protocol.md", HEADING) == expected, (
        f"docs/protocol.md, {HEADING!r}, should read:\n\n{expected}\n"
    )


def test_the_compliance_guide_gives_every_logged_code_its_outcome() -> None:
    table = documented_table(DOCS / "compliance.md", "### Reason codes")
    outcomes = dict(re.findall(r"^\| `([a-z_]+)` \| (allow|deny) \|", table, re.MULTILINE))
    assert outcomes == {code: reason(code).outcome for code in REASONS}


def test_every_code_has_one_row() -> None:
    codes = [row.code for row in REASON_CODES]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[a-z_]+", code) for code in codes)
    with pytest.raises(KeyError, match="no_such_code"):
        reason("no_such_code")


def test_the_other_tables_are_the_registrys_rows() -> None:
    logged = {r.code: r.sentence for r in REASON_CODES if r.sentence is not None}
    assert logged == REASONS
    assert {c for c in logged if reason(c).outcome == "deny"} == DENY_REASONS
    assert {r.code: r.status for r in REASON_CODES if r.status is not None} == STATUS
    assert {r.code: r.message for r in REASON_CODES if r.message is not None} == MESSAGES
    assert {r.code for r in REASON_CODES if r.final} == FINAL_REFUSALS


def test_a_refusal_for_the_clients_fault_is_final_unless_it_is_about_timing() -> None:
    # A 4xx says the request itself is wrong: sent again unchanged, it is refused again. 408
    # (too slow) is about the connection, not the request.
    for row in REASON_CODES:
        if row.status is not None and 400 <= row.status < 500 and row.status != 408:
            assert row.final, row.code
        if row.status is not None and (row.status >= 500 or row.status == 408):
            assert not row.final, row.code


def test_a_refusal_over_http_has_a_message_and_retry_advice() -> None:
    with pytest.raises(ValueError, match="needs a message"):
        Reason("made_up", "deny", None, status=400)
    for row in REASON_CODES:
        if row.status is not None and row.status >= 400:
            assert row.message and row.retry, row.code


@pytest.mark.parametrize("code", sorted(FINAL_REFUSALS))
def test_every_final_refusal_drops_the_delta_at_its_first_answer(code: str) -> None:
    item = OutboxItem("k" * 24, "eu", "eu-r1", NOW + timedelta(hours=6), b"{}", attempts=0)
    status = reason(code).status or 400
    assert decide(item, now=NOW, status=status, code=code) == Drop(code)


@pytest.mark.parametrize("code", ["too_slow", "busy", "internal"])
def test_a_passing_refusal_is_tried_again_before_the_deadline(code: str) -> None:
    item = OutboxItem("k" * 24, "eu", "eu-r1", NOW + timedelta(hours=6), b"{}", attempts=0)
    outcome = decide(item, now=NOW, status=reason(code).status, code=code)
    assert isinstance(outcome, RetryAt) and NOW < outcome.at <= item.deadline
