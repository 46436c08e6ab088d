"""``sottovoce aggregator``: what an operator runs for one region.

``keygen`` makes the region's private keys and a policy that publishes their public halves;
``serve`` runs the service (uvicorn, JSON logs on stderr) on an embedded SQLite file, or on a
PostgreSQL database with several worker processes. Secrets
come from files and the environment here, at the process edge, never from library defaults.
The command layer is the one place that reads the model file: it gives the aggregator the
model's identity and initial weights (the aggregator itself never imports device code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

aggregator_app = typer.Typer(
    no_args_is_help=True, help="Run a region's aggregator (needs the 'aggregator' extra)."
)
out = Console(highlight=False, soft_wrap=True)

TOKENS_ENV = "SOTTOVOCE_ENROLLMENT_TOKENS"


def _read_policy(path: Path | None) -> Any:
    from sottovoce.policy import example_policy, load_policy

    return example_policy() if path is None else load_policy(path)


@aggregator_app.command()
def keygen(
    region: Annotated[str, typer.Option("--region", "-r", help="The region these keys serve.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the key files.")],
    policy: Annotated[
        Path | None, typer.Option("--policy", "-p", help="Policy to publish the keys in.")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="The region's aggregator URL to put in the policy.")
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            help="'prod', or 'dev': the written policy's region is sized for a few devices on "
            "one machine (population 3, every device in every round, noise multiplier 2, "
            "delta 0.01): for trying sottovoce out, not for users' data."
        ),
    ] = "prod",
) -> None:
    """Make a region's keys (signing.pem, hpke.pem; owner-only) and OUT/policy.json."""
    from sottovoce.aggregator._service import DEV_PRIVACY, generate_keys, policy_with_keys

    if profile not in ("prod", "dev"):
        raise typer.BadParameter(f"--profile is 'prod' or 'dev', not {profile!r}")
    base = _read_policy(policy)
    base.region(region)  # an unknown region fails before any key is written
    if endpoint is not None:  # and so does an endpoint no device could use
        from sottovoce.sync.transport import BadEndpoint, api_url

        try:
            api_url(endpoint, "/v1/round")
        except BadEndpoint as error:
            raise typer.BadParameter(str(error), param_hint="--endpoint") from None
    keys = generate_keys(out_dir)
    privacy = DEV_PRIVACY if profile == "dev" else None
    published = policy_with_keys(base, region, keys, endpoint, privacy=privacy)
    target = out_dir / "policy.json"
    target.write_text(published.model_dump_json(indent=2) + "\n")
    out.print(f"wrote {out_dir / 'signing.pem'} and {out_dir / 'hpke.pem'} (keep them secret)")
    out.print(f"wrote {target}: policy {published.hash[:16]}… publishing region {region}'s keys")
    if privacy is not None:
        out.print(f"  dev profile: region {region}'s privacy is sized for a few devices {privacy}")
    for use, key in keys.public().items():
        out.print(f"  {use:8} {key}")


@aggregator_app.command()
def serve(  # noqa: PLR0917 - typer maps parameters to options
    region: Annotated[str, typer.Option("--region", "-r", help="The region this service is.")],
    policy: Annotated[
        Path, typer.Option("--policy", "-p", help="The policy (publishing this region's keys).")
    ],
    keys: Annotated[
        Path,
        typer.Option(envvar="SOTTOVOCE_KEYS_DIR", help="Directory with signing.pem and hpke.pem."),
    ],
    db: Annotated[
        str | None,
        typer.Option(
            envvar="SOTTOVOCE_DB",
            help="The region's database: a SQLite file (default: aggregator-REGION.db) or a "
            "postgresql:// URL.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(help="Worker processes behind the port (more than 1 needs PostgreSQL)."),
    ] = 1,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token_file: Annotated[
        Path | None,
        typer.Option(help=f"Enrollment tokens, one per line (or ${TOKENS_ENV}, comma-separated)."),
    ] = None,
    noise_multiplier: Annotated[
        float | None,
        typer.Option(help="Rounds' noise multiplier z (default and minimum: the policy's)."),
    ] = None,
    round_minutes: Annotated[
        float | None, typer.Option(help="How long a round stays open (default 60; dev: 0.5).")
    ] = None,
    sweep_seconds: Annotated[
        float | None, typer.Option(help="Sweep and schedule interval (default 60; dev: 1).")
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            help="'prod', or 'dev' for a few devices on one machine: 30-second rounds, a "
            "sweep every second (the policy's mechanism and budget are the same)."
        ),
    ] = "prod",
    schedule: Annotated[bool, typer.Option(help="Open rounds automatically.")] = True,
    model: Annotated[
        Path | None, typer.Option(help="The .tflite model (default: the shipped ranker).")
    ] = None,
    collaborative: Annotated[
        Path | None,
        typer.Option(
            help="Serve the collaborative model instead of the ranker: its public "
            "catalog, one item id per line, in the layout's order."
        ),
    ] = None,
    rank: Annotated[int, typer.Option(help="The collaborative model's rank.")] = 16,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    docs: Annotated[
        bool, typer.Option(help="Serve the interactive API docs at /docs and /redoc.")
    ] = False,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a request's headers may take to arrive (then 408).")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request's body may take after its headers.")
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(help="Open connections at most; more are answered 503 and closed.")
    ] = 1000,
) -> None:
    """Serve the region's aggregator over HTTP (JSON logs on stderr); restart-safe."""
    try:
        from sottovoce.aggregator._connections import ConnectionLimits
        from sottovoce.aggregator._service import ServiceConfig, load_keys
        from sottovoce.aggregator._workers import serve as serve_workers
    except ImportError as error:
        raise typer.BadParameter(
            f"the aggregator needs its extra: pip install 'sottovoce[aggregator]' ({error})"
        ) from None
    from sottovoce._clock import clock_from_env

    profiles = {"prod": (60.0, 60.0), "dev": (0.5, 1.0)}  # round minutes, sweep seconds
    if profile not in profiles:
        raise typer.BadParameter(f"--profile is 'prod' or 'dev', not {profile!r}")
    defaults = profiles[profile]
    try:
        limits = ConnectionLimits(header_seconds=header_timeout, body_seconds=body_timeout,
                                  max_connections=max_connections)  # fmt: skip
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if collaborative is not None:
        import numpy as np

        from sottovoce.device._collaborative import Layout

        catalog = tuple(line.strip() for line in collaborative.read_text().splitlines()
                        if line.strip())  # fmt: skip
        layout = Layout(catalog, rank=rank)
        model_id, base, accumulate = layout.model_id, np.zeros(layout.dim, np.float32), False
    else:
        from sottovoce.device import Ranker

        ranker = Ranker.load(model)
        model_id, base, accumulate = ranker.model_id, ranker.get_weights(), True
    config = ServiceConfig(
        policy=_read_policy(policy),
        region=region,
        keys=load_keys(keys),
        database=db or f"aggregator-{region}.db",
        model_id=model_id,
        base_weights=base,
        accumulate=accumulate,
        enrollment_tokens=_tokens(token_file),
        noise_multiplier=noise_multiplier,
        round_seconds=60 * (round_minutes if round_minutes is not None else defaults[0]),
        sweep_seconds=sweep_seconds if sweep_seconds is not None else defaults[1],
        schedule_rounds=schedule,
        clock=clock_from_env(),
        docs=docs,
        connections=limits,
    )
    serve_workers(config, host=host, port=port, workers=workers, log_level=log_level)


@aggregator_app.command()
def migrate(
    db: Annotated[
        str,
        typer.Option(
            envvar="SOTTOVOCE_DB",
            help="The region's database: a SQLite file or a postgresql:// URL.",
        ),
    ],
    check: Annotated[
        bool, typer.Option(help="Only say which version the database is at; change nothing.")
    ] = False,
) -> None:
    """Bring a region's database to this version's schema (serve does it too, at start)."""
    from sottovoce.aggregator import SCHEMA_VERSION, migrate, open_database
    from sottovoce.aggregator._schema import schema_version

    conn = open_database(db)
    try:
        before = schema_version(conn)
        if check:
            state = "up to date" if before == SCHEMA_VERSION else "needs migrating"
            out.print(f"schema version {before}; this sottovoce: {SCHEMA_VERSION} ({state})")
            if before != SCHEMA_VERSION:
                raise typer.Exit(1)
            return
        applied = migrate(conn)
    finally:
        conn.close()
    done = ", ".join(applied) if applied else "nothing to apply"
    out.print(f"schema version {before} -> {SCHEMA_VERSION}: {done}")


def _tokens(path: Path | None) -> frozenset[str]:
    if path is not None:
        lines = path.read_text().splitlines()
    else:
        lines = os.environ.get(TOKENS_ENV, "").split(",")
    return frozenset(line.strip() for line in lines if line.strip())
