"""``sottovoce audit``: what compliance officers run against a decision log.

A log is any SQLite file that holds one: a device store, or an aggregator's database. Commands
that only read never write to it; ``audit checkpoint`` is the one that signs and stores.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sqlite3
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sottovoce.policy import (
    CheckpointSigner,
    Decision,
    DecisionLog,
    LogError,
    open_checkpoint,
    parse_verifier_key,
    verify_inclusion,
)

audit_app = typer.Typer(
    no_args_is_help=True, help="Verify, query, prove and report on a tamper-evident decision log."
)
# Piped output (files, other programs) gets wide lines rather than wrapped table cells.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)

LogArg = Annotated[Path, typer.Argument(help="A file holding a decision log, e.g. a device store.")]
KeyOption = Annotated[
    str | None,
    typer.Option("--key", help="The published verifier key to pin (default: the log's own)."),
]
KeptOption = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="A signed checkpoint you kept from an earlier audit."),
]


class Format(StrEnum):
    TABLE = "table"
    JSONL = "jsonl"
    CSV = "csv"


def _open(path: Path) -> DecisionLog:
    if not path.is_file():
        raise LogError(f"{path} does not exist")
    conn = sqlite3.connect(path, isolation_level=None)
    if not DecisionLog.exists(conn):
        conn.close()
        raise LogError(f"{path} holds no decision log")
    return DecisionLog(conn)


def _kept(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise LogError(f"cannot read the kept checkpoint {path}: {error.strerror}") from None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@audit_app.command("verify")
def verify(log: LogArg, key: KeyOption = None, checkpoint: KeptOption = None) -> None:
    """Re-derive the whole log from its entries and check every signed checkpoint.

    Exit status 0 when verified, 1 when anything is wrong (each problem is printed).
    """
    decisions = _open(log)
    report = decisions.verify(verifier_key=key, kept=_kept(checkpoint))
    verdict = "[green]verified[/green]" if report.ok else "[red]NOT verified[/red]"
    out.print(f"{verdict}  {escape(decisions.origin)}: {report.size} entries, "
              f"root {report.root.hex()}")  # fmt: skip
    if report.latest is not None:
        out.print(f"  latest signed checkpoint: size {report.latest.size}; "
                  f"{report.unsigned} entries after it are not yet signed")  # fmt: skip
    else:
        out.print("  no valid signed checkpoint yet")
    if report.pruned:
        out.print(f"  {report.pruned} oldest entries were emptied by retention (hashes kept)")
    if report.kept is not None and report.ok:
        out.print(f"  consistent with your kept checkpoint at size {report.kept.size}")
    if key is None:
        out.print("  [yellow]note[/yellow]: checked against the key the log records; pass --key "
                  "with the published key to rule out a replaced key")  # fmt: skip
    for problem in report.problems:
        out.print(f"  [red]problem[/red]: {escape(problem)}")
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("show")
def show(
    log: LogArg,
    indexes: Annotated[list[int], typer.Argument(help="Entry indexes (from 0).")],
) -> None:
    """Print entries as JSON, with their leaf hashes."""
    decisions = _open(log)
    for index in indexes:
        entry = decisions.entry(index)
        body = json.loads(entry) if entry else {"pruned": "text removed by retention"}
        data = {"index": index, "leaf_hash": decisions.leaf(index).hex(), **body}
        out.print(json.dumps(data, indent=2, ensure_ascii=False))


@audit_app.command("query")
def query(  # noqa: PLR0917 - typer maps parameters to options
    log: LogArg,
    since: Annotated[datetime | None, typer.Option(help="From this time (UTC if no zone).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Before this time.")] = None,
    region: Annotated[str | None, typer.Option(help="Region id.")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. store_events, accept_delta.")] = None,
    outcome: Annotated[str | None, typer.Option(help="allow or deny.")] = None,
    reason: Annotated[str | None, typer.Option(help="Reason code, e.g. consent_missing.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.TABLE,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 10_000,
) -> None:
    """List decisions matching every filter given."""
    rows: list[tuple[int, Decision]] = []
    for row in _open(log).query(
        since=_aware(since), until=_aware(until), region=region, action=action,
        outcome=outcome, reason=reason,
    ):  # fmt: skip
        rows.append(row)
        if len(rows) >= limit:
            break
    if fmt is Format.JSONL:
        for index, decision in rows:
            out.print(json.dumps({"index": index, **decision.model_dump(mode="json")}))
    elif fmt is Format.CSV:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["index", "at", "region", "action", "outcome", "reason", "sentence",
                         "policy_hash", "inputs_digest", "metrics"])  # fmt: skip
        for index, d in rows:
            writer.writerow([index, d.at.isoformat(), d.region, d.action.value, d.outcome.value,
                             d.reason, d.sentence, d.policy_hash, d.inputs_digest,
                             json.dumps(d.metrics, sort_keys=True)])  # fmt: skip
        out.print(buffer.getvalue(), end="")
    else:
        table = Table(header_style="bold")
        for column in ("#", "time", "region", "action", "outcome", "reason", "sentence"):
            table.add_column(column)
        for index, d in rows:
            colour = "green" if d.allowed else "red"
            table.add_row(str(index), d.at.strftime("%Y-%m-%d %H:%M:%S"), d.region,
                          d.action.value, f"[{colour}]{d.outcome.value}[/{colour}]", d.reason,
                          escape(d.sentence))  # fmt: skip
        out.print(table)
        out.print(f"{len(rows)} decisions")


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


@audit_app.command("prove")
def prove(
    log: LogArg,
    index: Annotated[int, typer.Argument(help="The entry to prove.")],
    size: Annotated[int | None, typer.Option(help="Tree size (default: the log's size).")] = None,
    checkpoint: KeptOption = None,
    key: KeyOption = None,
) -> None:
    """Print an inclusion proof (JSON, base64 hashes), checked before it is printed.

    With ``--checkpoint`` the proof is made for that checkpoint's size and checked against
    its signed root, so it can be verified by anyone holding the checkpoint.
    """
    decisions = _open(log)
    if checkpoint is not None:
        point = open_checkpoint(_kept(checkpoint) or b"", key or decisions.verifier_key,
                                origin=decisions.origin)  # fmt: skip
        size = point.size
    proof = decisions.prove(index, size=size)
    if checkpoint is not None and proof.root != point.root:
        raise LogError(f"the log's tree of size {point.size} does not match your checkpoint")
    verify_inclusion(proof.leaf_hash, proof.index, proof.size, list(proof.proof), proof.root)
    out.print(json.dumps({
        "origin": decisions.origin, "index": proof.index, "tree_size": proof.size,
        "leaf_hash": _b64(proof.leaf_hash), "proof": [_b64(p) for p in proof.proof],
        "root": _b64(proof.root), "entry": json.loads(decisions.entry(index) or "null"),
    }, indent=2, ensure_ascii=False))  # fmt: skip


@audit_app.command("checkpoint")
def checkpoint_cmd(
    log: LogArg,
    key_file: Annotated[
        Path | None,
        typer.Option(help="Hex Ed25519 private key (default: the key the log keeps, if any)."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also save here.")] = None,
) -> None:
    """Sign a checkpoint of the log as it is now, store it, and print it (keep a copy!)."""
    decisions = _open(log)
    if key_file is not None:
        name = parse_verifier_key(decisions.verifier_key)[0]
        try:
            raw = bytes.fromhex(key_file.read_text().strip())
        except ValueError:
            raise LogError(f"{key_file} does not hold a hex Ed25519 private key") from None
        decisions = decisions.with_signer(CheckpointSigner.from_private_bytes(name, raw))
    with decisions.transaction():
        note = decisions.checkpoint()
    if output is not None:
        output.write_bytes(note)
    out.print(note.decode(), end="")


@audit_app.command("report")
def report_cmd(
    log: LogArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")] = Path(
        "audit-report.html"
    ),
    checkpoint: KeptOption = None,
    key: KeyOption = None,
) -> None:
    """Write a self-contained HTML report: verdict, decisions over time, refusals, budgets."""
    from sottovoce._clock import clock_from_env
    from sottovoce.policy import render_report

    decisions = _open(log)
    verification = decisions.verify(verifier_key=key, kept=_kept(checkpoint))
    html = render_report(decisions=list(decisions.query()), verification=verification,
                         origin=decisions.origin, generated_at=clock_from_env()())  # fmt: skip
    output.write_text(html, encoding="utf-8")
    verdict = "verified" if verification.ok else "NOT verified"
    out.print(f"{verdict}; report written to {output}")
