"""``sottovoce audit``: what compliance officers run against a decision log.

A log is any SQLite file that holds one: a device store, or an aggregator's database. Commands
that only read never write to it; ``audit checkpoint`` is the one that signs and stores.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
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
    CheckpointError,
    CheckpointSigner,
    Decision,
    DecisionLog,
    LogError,
    Policy,
    load_policy,
    open_checkpoint,
    parse_verifier_key,
    verify_inclusion,
)
from sottovoce.policy._checkpoint import verifier_key

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
PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="For an aggregator's log: pin the signing key this policy publishes for its region.",
    ),
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


_AGGREGATOR_ORIGIN = "sottovoce.aggregator/"  # + region id: an aggregator's log


def _pinned(decisions: DecisionLog, key: str | None, policy: Path | None) -> tuple[str | None, str]:
    """The verifier key to check with (``None``: the log's own) and where it came from."""
    if key is not None and policy is not None:
        raise LogError("pin the key with either --key or --policy, not both")
    if key is not None:
        if not key.strip():
            raise CheckpointError(
                "--key is empty: pass the log's published verifier key, or leave --key out to "
                "check with the key the log records"
            )
        return key, "the key you pinned"
    if policy is None:
        return None, "the key the log records"
    return _policy_key(decisions, load_policy(policy))


def _policy_key(decisions: DecisionLog, policy: Policy) -> tuple[str, str]:
    """An aggregator signs its log with its region's signing key, under the log's origin."""
    origin = decisions.origin
    if not origin.startswith(_AGGREGATOR_ORIGIN):
        raise LogError(f"--policy pins an aggregator's key, and {origin!r} is not an aggregator's "
                       "log (a device's log key is pinned with --key)")  # fmt: skip
    region = policy.region(origin.removeprefix(_AGGREGATOR_ORIGIN))
    published = [verifier_key(origin, base64.b64decode(k.key))
                 for k in region.aggregator.public_keys if k.use == "signing"]  # fmt: skip
    if not published:
        raise LogError(f"the policy publishes no signing key for region {region.id}")
    # A region may list a retired key too: check with the one the log says it uses if the
    # policy publishes it (a key the policy does not publish then fails on every signature).
    chosen = decisions.verifier_key if decisions.verifier_key in published else published[0]
    return chosen, f"the key region {region.id}'s policy publishes"


@audit_app.command("verify")
def verify(
    log: LogArg, key: KeyOption = None, policy: PolicyOption = None, checkpoint: KeptOption = None
) -> None:
    """Re-derive the whole log from its entries and check every signed checkpoint.

    Exit status 0 when verified: no problem found and at least one signature checked (a stored
    checkpoint or your kept one). 1 otherwise, with each problem printed; 2 for bad arguments
    (an empty or malformed --key, a missing file).
    """
    decisions = _open(log)
    pinned, key_from = _pinned(decisions, key, policy)
    report = decisions.verify(verifier_key=pinned, kept=_kept(checkpoint), key_from=key_from)
    verdict = "[green]verified[/green]" if report.verified else "[red]NOT verified[/red]"
    out.print(f"{verdict}  {escape(decisions.origin)}: {report.size} entries, "
              f"root {report.root.hex()}")  # fmt: skip
    for what, sentence in report.checks():
        out.print(f"  {what}: {escape(sentence)}")
    out.print(f"  verifier key: {escape(report.verifier_key)}")
    if report.latest is not None:
        out.print(f"  latest signed checkpoint: size {report.latest.size}; "
                  f"{report.unsigned} entries after it are not yet signed")  # fmt: skip
    if report.pruned:
        out.print(f"  {report.pruned} oldest entries were emptied by retention (hashes kept)")
    if pinned is None:
        out.print("  [yellow]note[/yellow]: checked with the key the log records; pin the "
                  "published one (--key, or --policy for an aggregator's log) to rule out a "
                  "replaced key")  # fmt: skip
    for problem in report.problems:
        out.print(f"  [red]problem[/red]: {escape(problem)}")
    if not report.verified:
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
    since: Annotated[
        str | None, typer.Option(help="From this time: YYYY-MM-DD[THH:MM[:SS]][zone], UTC if none.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (the same forms).")] = None,
    region: Annotated[str | None, typer.Option(help="Region id.")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. store_events, accept_delta.")] = None,
    outcome: Annotated[str | None, typer.Option(help="allow or deny.")] = None,
    reason: Annotated[str | None, typer.Option(help="Reason code, e.g. consent_missing.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.TABLE,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 10_000,
) -> None:
    """List decisions matching every filter given (a filter that cannot match is an error)."""
    rows: list[tuple[int, Decision]] = []
    for row in _open(log).query(
        since=_moment("--since", since), until=_moment("--until", until), region=region,
        action=action, outcome=outcome, reason=reason,
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


_ISO_MOMENT = re.compile(
    r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?"
)


def _moment(option: str, text: str | None) -> datetime | None:
    """An ISO 8601 date or time (UTC when it names no zone); anything else is an error, never
    read as something else (such as ``2026`` as seconds since 1970)."""
    if text is None:
        return None
    try:
        if not _ISO_MOMENT.fullmatch(text.strip()):
            raise ValueError
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{option}: {text!r} is not a date or time such as 2026-11-01 or "
            "2026-11-01T09:30:00+01:00"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@audit_app.command("prove")
def prove(  # noqa: PLR0917 - typer maps parameters to options
    log: LogArg,
    index: Annotated[int, typer.Argument(help="The entry to prove.")],
    size: Annotated[int | None, typer.Option(help="Tree size (default: the log's size).")] = None,
    checkpoint: KeptOption = None,
    key: KeyOption = None,
    policy: PolicyOption = None,
) -> None:
    """Print an inclusion proof (JSON, base64 hashes), checked before it is printed.

    With ``--checkpoint`` the proof is made for that checkpoint's size and checked against
    its signed root, so it can be verified by anyone holding the checkpoint.
    """
    decisions = _open(log)
    pinned = _pinned(decisions, key, policy)[0] or decisions.verifier_key
    if checkpoint is not None:
        point = open_checkpoint(_kept(checkpoint) or b"", pinned,
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
        typer.Option(
            help="The log's private key: for an aggregator's log the region's signing.pem (as "
            "`sottovoce aggregator keygen` wrote it), or an Ed25519 key in 64 hex digits "
            "(default: the key the log keeps, as a device's does)."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also save here.")] = None,
) -> None:
    """Sign a checkpoint of the log as it is now, store it, and print it (keep a copy!)."""
    decisions = _open(log)
    if key_file is not None:
        try:
            data = key_file.read_bytes()
        except OSError as error:
            raise LogError(f"cannot read the key file {key_file}: {error.strerror}") from None
        name = parse_verifier_key(decisions.verifier_key)[0]
        signer = CheckpointSigner.from_key_file(name, data, source=str(key_file))
        if signer.verifier_key != decisions.verifier_key:
            raise LogError(f"{key_file} is not the key this log is signed with (its verifier "
                           f"key is {decisions.verifier_key})")  # fmt: skip
        decisions = decisions.with_signer(signer)
    elif not decisions.can_sign:
        hint = ""
        if decisions.origin.startswith(_AGGREGATOR_ORIGIN):
            hint = " (an aggregator's log: its region's signing key, --key-file KEYS/signing.pem)"
        raise LogError(f"{log} keeps no signing key: pass the log's key with --key-file{hint}")
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
    policy: PolicyOption = None,
) -> None:
    """Write a self-contained HTML report: verdict, what was checked, decisions over time,
    refusals, budgets, and the policies that governed the decisions."""
    from sottovoce._clock import clock_from_env
    from sottovoce.policy import render_report

    decisions = _open(log)
    pinned, key_from = _pinned(decisions, key, policy)
    verification = decisions.verify(verifier_key=pinned, kept=_kept(checkpoint), key_from=key_from)
    labels = {} if policy is None else {(p := load_policy(policy)).hash: f"{p.name} {p.version}"}
    html = render_report(decisions=list(decisions.query()), verification=verification,
                         origin=decisions.origin, policies=labels,
                         generated_at=clock_from_env()())  # fmt: skip
    output.write_text(html, encoding="utf-8")
    verdict = "verified" if verification.verified else "NOT verified"
    out.print(f"{verdict}; report written to {output}")
