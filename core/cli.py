"""The ``sottovoce`` command (also ``python -m sottovoce``).

Thin: each command parses its options, calls the library and prints. Errors sottovoce raises on
purpose are printed as one readable message with their reason code, exit status 2.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sottovoce import __version__
from sottovoce._cli_aggregator import aggregator_app
from sottovoce._cli_audit import audit_app
from sottovoce._cli_simulate import register as register_simulation
from sottovoce._clock import NOW_ENV, clock_from_env, parse_now
from sottovoce._errors import SottovoceError
from sottovoce.policy import Purpose

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Privacy-first, on-device personalization with federated, differentially-private "
    "learning and an auditable policy log.",
)
policy_app = typer.Typer(no_args_is_help=True, help="Check and inspect policy documents.")
device_app = typer.Typer(no_args_is_help=True, help="Work with a device's local event store.")
app.add_typer(policy_app, name="policy")
app.add_typer(device_app, name="device")
app.add_typer(audit_app, name="audit")
app.add_typer(aggregator_app, name="aggregator")
register_simulation(app)


@app.callback()
def _options(
    now: Annotated[
        str | None,
        typer.Option(
            "--now",
            envvar=NOW_ENV,
            help="Run on another calendar: the clock starts at this ISO 8601 time (with a zone) "
            "and advances in real time. For tests and replays; default: the system clock.",
        ),
    ] = None,
) -> None:
    if now is not None:
        parse_now(now)  # a bad value stops here, before any command runs
        os.environ[NOW_ENV] = now  # read by every command (and child process) via clock_from_env


out = Console(highlight=False, width=None if sys.stdout.isatty() else 110)
err = Console(stderr=True, highlight=False)

PolicyOption = Annotated[
    Path | None,
    typer.Option("--policy", "-p", help="Policy file (YAML or JSON). Default: the example policy."),
]
StoreArg = Annotated[Path, typer.Argument(help="The device store (SQLite file).")]
ExistingStoreArg = Annotated[
    Path, typer.Argument(help="The device store (SQLite file).", exists=True, dir_okay=False)
]
RegionOption = Annotated[str, typer.Option("--region", "-r", help="The device's region id.")]
UserOption = Annotated[str, typer.Option("--user", "-u", help="The app's user id.")]


def _policy(path: Path | None) -> Any:
    from sottovoce.policy import example_policy, load_policy

    return example_policy() if path is None else load_policy(path)


def _store(path: Path, policy: Path | None, region: str) -> Any:
    from sottovoce.device import EventStore

    return EventStore.open(path, policy=_policy(policy), region=region, clock=clock_from_env())


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command("device-demo")
def device_demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its device stores.")] = Path(
        "out/demo"
    ),
    events: Annotated[int, typer.Option(help="Listening events per device.")] = 2_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
) -> None:
    """A tour of one device's store on the example policy (EU and US devices)."""
    from sottovoce._demo import run_demo

    run_demo(workdir=workdir, events=events, seed=seed, console=out)


# -- policy ---------------------------------------------------------------------------------
@policy_app.command("check")
def policy_check(path: Annotated[Path, typer.Argument(help="Policy file.")]) -> None:
    """Validate a policy; print its hash, or every broken rule with its field."""
    policy = _policy(path)
    out.print(f"ok  {policy.name} {policy.version}  sha256:{policy.hash}")


@policy_app.command("hash")
def policy_hash(path: Annotated[Path, typer.Argument(help="Policy file.")]) -> None:
    """Print the policy's identity: SHA-256 of its canonical (RFC 8785) JSON."""
    out.print(_policy(path).hash)


@policy_app.command("show")
def policy_show(
    path: Annotated[Path | None, typer.Argument(help="Policy file (default: the example).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print canonical JSON.")] = False,
) -> None:
    """Show a policy region by region."""
    from sottovoce.policy import DataClass, Purpose, format_duration

    policy = _policy(path)
    if as_json:
        out.print(policy.canonical_json().decode(), soft_wrap=True)
        return
    out.print(f"[bold]{policy.name}[/bold] {policy.version}  sha256:{policy.hash}")
    table = Table(show_header=True, header_style="bold")
    table.add_column("")
    for region in policy.regions:
        table.add_column(f"{region.id} ({region.name})")
    regions = policy.regions
    table.add_row("jurisdictions", *[", ".join(r.jurisdictions) for r in regions])
    table.add_row("aggregator", *[r.aggregator.endpoint for r in regions])
    for purpose in Purpose:
        table.add_row(f"consent: {purpose.value}", *[r.consent[purpose].value for r in regions])
    for data_class in DataClass:
        table.add_row(
            f"retention: {data_class.value}",
            *[format_duration(r.retention[data_class]) for r in regions],
        )
    table.add_row("privacy mode", *[r.privacy.mode.value for r in regions])
    table.add_row(
        "budget",
        *[
            f"ε={r.privacy.epsilon:g}, δ={r.privacy.delta:g} per "
            f"{format_duration(r.privacy.period)}"
            for r in regions
        ],
    )
    table.add_row("clipping norm", *[f"{r.privacy.clipping_norm:g}" for r in regions])
    table.add_row("minimum cohort", *[str(r.privacy.min_cohort) for r in regions])
    table.add_row(
        "age gate", *[f">= {r.age.minimum_age} (unknown: {r.age.unknown_age})" for r in regions]
    )
    out.print(table)


@policy_app.command("diff")
def policy_diff(
    old: Annotated[Path, typer.Argument(help="The policy in force.")],
    new: Annotated[Path, typer.Argument(help="The proposed policy.")],
) -> None:
    """What changed between two policies, each change marked stricter, looser or neutral."""
    from sottovoce.policy import diff_policies, format_diff

    before, after = _policy(old), _policy(new)
    out.print(escape(format_diff(diff_policies(before, after), before, after)))


# -- device ---------------------------------------------------------------------------------
@device_app.command("ingest")
def device_ingest(
    store: StoreArg,
    events: Annotated[
        Path, typer.Argument(help="JSON Lines file of events ('-' for stdin).", allow_dash=True)
    ],
    region: RegionOption,
    policy: PolicyOption = None,
    batch: Annotated[int, typer.Option(min=1, help="Events per transaction.")] = 1_000,
) -> None:
    """Append events from a JSON Lines file; each batch is stored whole or refused whole."""
    from rich.progress import Progress

    stream = sys.stdin if str(events) == "-" else events.open(encoding="utf-8")
    counts = {"accepted": 0, "duplicates": 0, "expired": 0}
    cutoff = None
    with _store(store, policy, region) as db, Progress(console=err, transient=True) as bar:
        task = bar.add_task("ingesting", total=None)
        for pending in _batches(stream, batch, events, counts):
            result = db.append_many(pending)
            counts["accepted"] += result.accepted
            counts["duplicates"] += len(result.duplicate_ids)
            counts["expired"] += len(result.expired_ids)
            bar.advance(task, len(pending))
            if result.retention_cutoff is not None:
                cutoff = result.retention_cutoff
    out.print(f"stored {counts['accepted']} new events ({counts['duplicates']} replays ignored, "
              f"{counts['expired']} past retention not kept)")  # fmt: skip
    if counts["expired"]:
        err.print(f"[yellow]warning[/yellow] {counts['expired']} events were older than the "
                  f"region's raw-event retention (before {cutoff:%Y-%m-%d %H:%M} UTC) and were "
                  "dropped; check their timestamps and the clock (--now)")  # fmt: skip


def _batches(
    lines: Iterable[str], size: int, source: Path, counts: dict[str, int]
) -> Iterator[list[Any]]:
    """JSON Lines in batches; a line that is not JSON stops the run (earlier batches stay)."""
    pending: list[Any] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pending.append(json.loads(line))
        except json.JSONDecodeError as error:
            if pending:
                yield pending
            err.print(f"[red]error[/red] line {number} of {source} is not JSON: {error}; "
                      f"stored {counts['accepted']} events before it")  # fmt: skip
            raise typer.Exit(2) from None
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


@device_app.command("consent")
def device_consent(  # noqa: PLR0917 - typer maps parameters to options
    store: StoreArg,
    user: UserOption,
    region: RegionOption,
    purpose: Annotated[Purpose, typer.Argument(help="The consent purpose.")],
    withdraw: Annotated[bool, typer.Option(help="Withdraw instead of grant.")] = False,
    policy: PolicyOption = None,
) -> None:
    """Grant (or withdraw, purging what it covered) consent for a purpose."""
    chosen = purpose
    with _store(store, policy, region) as db:
        if withdraw:
            report = db.withdraw(user, chosen)
            out.print(f"withdrew {chosen.value}; purged {report.total} rows {dict(report.deleted)}")
        else:
            db.grant(user, chosen)
            out.print(f"granted {chosen.value}")


@device_app.command("age")
def device_age(
    store: StoreArg,
    user: UserOption,
    region: RegionOption,
    age: Annotated[int, typer.Argument(min=0, max=150, help="The user's declared age.")],
    policy: PolicyOption = None,
) -> None:
    """Record a user's declared age (age gating depends on it)."""
    with _store(store, policy, region) as db:
        db.set_age(user, age)
    out.print(f"recorded age {age}")


@device_app.command("export")
def device_export(
    store: ExistingStoreArg, user: UserOption, region: RegionOption, policy: PolicyOption = None
) -> None:
    """Print everything stored for a user as JSON (an access request)."""
    with _store(store, policy, region) as db:
        out.print(json.dumps(db.export_user(user), indent=2), soft_wrap=True)


@device_app.command("erase")
def device_erase(
    store: ExistingStoreArg, user: UserOption, region: RegionOption, policy: PolicyOption = None
) -> None:
    """Erase everything stored about a user."""
    with _store(store, policy, region) as db:
        report = db.erase_user(user)
    out.print(f"erased {report.total} rows {dict(report.deleted)}")


@device_app.command("purge")
def device_purge(
    store: ExistingStoreArg, region: RegionOption, policy: PolicyOption = None
) -> None:
    """Delete what the region's retention rules no longer allow to keep."""
    with _store(store, policy, region) as db:
        report = db.purge_expired()
    out.print(f"purged {report.total} rows {dict(report.deleted)}")


def main() -> None:
    """Entry point: run the app, turning sottovoce errors into one clear message (exit 2)."""
    try:
        app()  # standalone: usage errors print themselves and exit 2
    except SottovoceError as error:
        err.print(f"[red]error[/red] {escape(f'[{error.code}] {error}')}", soft_wrap=True)
        raise SystemExit(2) from None
    except (OSError, sqlite3.Error, UnicodeDecodeError) as error:
        err.print(f"[red]error[/red] {escape(f'[io_error] {error}')}", soft_wrap=True)
        raise SystemExit(2) from None
