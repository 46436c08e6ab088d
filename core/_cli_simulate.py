"""``sottovoce simulate`` and ``sottovoce demo``: many devices on real data, the comparison
table, the HTML report and the audit verification.

``demo`` is ``simulate`` on the README's defaults (a slice of Last.fm in the example policy's
two regions, a few minutes on two cores) with a short summary; ``simulate`` exposes every knob.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


class _Bar:
    """The simulator's progress, as rich progress bars (one per phase)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: Any = None

    def start(self, name: str, total: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[-1].total)
        self._task = self._progress.add_task(name, total=max(total, 1))

    def advance(self, steps: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, steps)

    def note(self, text: str) -> None:
        self._progress.console.print(f"  {text}")


class Split(StrEnum):
    RANDOM = "random"
    TIME = "time"


class _Notes(logging.Handler):
    """The simulator's warnings (such as the malformed rows a CSV load skipped), printed with
    its progress rather than as log records."""

    def emit(self, record: logging.LogRecord) -> None:
        out.print(f"  {record.getMessage()}", style="yellow", markup=False, soft_wrap=True)


@contextmanager
def _notes() -> Iterator[None]:
    logger, handler = logging.getLogger("sottovoce.sim"), _Notes(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def run_simulation(config: Any, *, title: str) -> dict[str, Any]:
    # Worker processes inherit this: two cores, two workers, one BLAS thread each (more
    # threads than cores made numpy and torch many times slower here).
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    from sottovoce.sim import simulate, write_report

    out.print(f"[bold]{title}[/bold]")
    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with _notes(), Progress(*columns, console=out, transient=not out.is_terminal) as progress:
        results = simulate(config, progress=_Bar(progress))
    report = write_report(results, config.workdir / "report.html")
    _summary(results)
    out.print(f"results: {config.workdir / 'results.json'}")
    out.print(f"report:  {report}")
    return results


def _summary(results: dict[str, Any]) -> None:
    table = Table(title=f"{results['dataset']}: {results['users']} devices, "
                        f"ε ≤ {results['epsilon']:.3g}, δ = {results['delta']:.2g}",
                  header_style="bold")  # fmt: skip
    for column in ("row (full ranking)", "NDCG@10", "95 % interval", "Recall@10", "HR@10",
                   "MRR", "coverage"):  # fmt: skip
        table.add_column(column, justify="left" if column.startswith("row") else "right")
    for row, values in results["metrics"].items():
        low, high = values["ci"].get("ndcg@10", (values["ndcg@10"],) * 2)
        others = (f"{values[m]:.4f}" for m in ("recall@10", "hr@10", "mrr", "coverage"))
        table.add_row(row, f"{values['ndcg@10']:.4f}", f"{low:.4f}–{high:.4f}", *others)
    out.print(table)
    sampled = results.get("metrics_sampled")
    if sampled:
        reranker = Table(title="the session reranker (sampled: held-out items among "
                               f"{results['config']['negatives']} never-touched ones)",
                         header_style="bold")  # fmt: skip
        for column in ("row (sampled)", "HR@10", "NDCG@10", "MRR"):
            reranker.add_column(column, justify="left" if column.startswith("row") else "right")
        for row, values in sampled.items():
            reranker.add_row(row, *(f"{values[m]:.4f}" for m in ("hr@10", "ndcg@10", "mrr")))
        out.print(reranker)
    for p in results["privacy"]:
        out.print(f"  {p['pipeline']:<18} {p['region']}: ε {p['epsilon']:.3f} of {p['budget']:g} "
                  f"(δ {p['delta']:.1g}; {p['mode']}, z {p['noise_multiplier']:.3f}, "
                  f"q {p['sampling_rate']:g}, sensitivity {p['sensitivity_factor']:.4f} C, "
                  f"{p['rounds']} rounds)")  # fmt: skip
    out.print(f"  noise: {results['noise'].split(':')[0]} (simulation only)")
    if results.get("item_vectors_note"):
        out.print(f"  item vectors: {results['item_vectors_note']}")
    audits = [(p, who, r) for p, logs in results["audit"].items() for who, r in logs.items()]
    failed = [f"{p}/{who}" for p, who, r in audits if not r["ok"]]
    entries = sum(r["entries"] for _, _, r in audits)
    if failed:
        out.print(f"[red]audit: verification FAILED for {', '.join(failed)}[/red]")
    else:
        out.print(f"audit: {len(audits)} decision logs ({entries} entries, aggregators and "
                  "devices) verified")  # fmt: skip


def register(app: typer.Typer) -> None:
    @app.command()
    def simulate(  # noqa: PLR0917 - typer maps parameters to options
        workdir: Annotated[Path, typer.Option(help="Where stores, results and report go.")] = Path(
            "out/sim"
        ),
        data: Annotated[
            Path | None, typer.Option(help="Last.fm HetRec 2K folder (default: ../shared).")
        ] = None,
        csv: Annotated[
            Path | None,
            typer.Option(help="Interactions CSV (user_id,item_id,timestamp,event_type|value)."),
        ] = None,
        item_features: Annotated[
            Path | None, typer.Option(help="Item features CSV (item_id,f1,...) for --csv.")
        ] = None,
        skip_bad_rows: Annotated[
            bool,
            typer.Option(help="Skip and count malformed rows of --csv instead of stopping."),
        ] = False,
        split: Annotated[
            Split, typer.Option(help="Held-out items: a seeded random 20 % or each user's latest.")
        ] = Split.RANDOM,
        users: Annotated[
            int,
            typer.Option(
                help="Users (devices) to simulate, a seeded sample; 0 (the default): "
                "every user of the data."
            ),
        ] = 0,
        rounds: Annotated[int, typer.Option(help="The session reranker's rounds.")] = 5,
        collaborative_rounds: Annotated[
            int, typer.Option(help="The collaborative model's rounds (one count round first).")
        ] = 5,
        reranker: Annotated[
            bool, typer.Option(help="Also train and measure the session reranker (sampled).")
        ] = True,
        sampling_rate: Annotated[
            float, typer.Option(help="Share of devices per round of the session reranker.")
        ] = 0.5,
        collaborative_sampling_rate: Annotated[
            float,
            typer.Option(
                help="Share of devices per round of the collaborative model (its few "
                "rounds need every device)."
            ),
        ] = 1.0,
        local_steps: Annotated[int, typer.Option(help="Training steps per device round.")] = 50,
        epsilon: Annotated[float, typer.Option(help="Cap on each region's ε.")] = 8.0,
        workers: Annotated[int, typer.Option(help="Worker processes for devices.")] = 2,
        region: Annotated[
            list[str] | None, typer.Option(help="A policy region to simulate (repeatable).")
        ] = None,
        server: Annotated[
            bool, typer.Option(help="Real uvicorn aggregators on 127.0.0.1 instead of ASGI.")
        ] = False,
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
        policy: Annotated[
            Path | None, typer.Option("--policy", "-p", help="Policy (default: the example).")
        ] = None,
    ) -> None:
        """Simulate devices on real data; write results.json and report.html."""
        from sottovoce.policy import example_policy, load_policy
        from sottovoce.sim import DatasetError, SimulationConfig

        config = SimulationConfig(
            workdir=workdir, lastfm=data, csv=csv, item_features=item_features,
            users=users or None, rounds=rounds, collaborative_rounds=collaborative_rounds,
            reranker=reranker, sampling_rate=sampling_rate,
            collaborative_sampling_rate=collaborative_sampling_rate, local_steps=local_steps,
            epsilon=epsilon, workers=workers, server=server, seed=seed, split=split.value,
            skip_bad_rows=skip_bad_rows, regions=tuple(region) if region else ("eu", "us"),
            policy=example_policy() if policy is None else load_policy(policy),
        )  # fmt: skip
        try:
            run_simulation(config, title="sottovoce simulate")
        except DatasetError as error:
            if csv is None or error.path != csv or (error.line or 0) < 2 or skip_bad_rows:
                raise
            raise DatasetError(f"{error.reason} (--skip-bad-rows skips and counts such rows)",
                               path=error.path, line=error.line, field=error.field,
                               code=error.code) from None  # fmt: skip

    @app.command()
    def demo(
        workdir: Annotated[Path, typer.Option(help="Where the demo writes.")] = Path("out/demo"),
        users: Annotated[int, typer.Option(help="Users (devices) to simulate.")] = 200,
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    ) -> None:
        """The main demo: Last.fm devices in the example policy's two regions, every baseline,
        the audit logs verified; prints a summary and the report's path."""
        from sottovoce.sim import SimulationConfig

        run_simulation(SimulationConfig(workdir=workdir, users=users, seed=seed),
                       title="sottovoce demo: federated personalization on Last.fm")  # fmt: skip
