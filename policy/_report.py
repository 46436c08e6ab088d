"""An offline HTML report of the decision log, for a compliance officer.

It sits at the end of the audit flow: ``DecisionLog.query`` gives ``(index, Decision)`` pairs and
``DecisionLog.verify`` a ``VerifyReport``; :func:`render_report` turns both into one HTML string.
The document is self-contained (inline CSS and hand-written inline SVG from :mod:`._charts`,
no scripts, fonts or links) so it can be archived with an audit and opened years later on a
machine with no network.
Pure: no I/O, the caller writes the file. Every text from the log is escaped, because entries
are data and a report must never run or load anything an entry says.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from sottovoce.policy._charts import (
    ALLOW,
    DENY,
    PURGE,
    Timeline,
    budget_chart,
    esc,
    horizontal_bars,
    num,
    stacked_bars,
)
from sottovoce.policy._decision import Action, Decision, Outcome
from sottovoce.policy._verify import VerifyReport

__all__ = ["render_report"]

RECENT = 200  # decisions listed one by one; the plots and counts cover them all
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1000px;margin:2em auto;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.verdict{font-size:2.4em;font-weight:700;margin:.2em 0}.ok{color:#2e7d32}.bad{color:#c62828}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#666}dd{margin:0}
.hash{font-family:ui-monospace,monospace;font-size:.9em;word-break:break-all}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border-bottom:1px solid #eee;padding:.2em .6em;text-align:left;vertical-align:top}
td.num{text-align:right}td.allow{color:#2e7d32}td.deny{color:#c62828}.note{color:#666}
svg{max-width:100%;height:auto;display:block;margin:.5em 0}
svg text{font:11px sans-serif;fill:#333}svg .grid{stroke:#e5e5e5}svg .axis{stroke:#444}
"""


def render_report(
    *,
    decisions: Sequence[tuple[int, Decision]],
    verification: VerifyReport,
    origin: str,
    policies: Mapping[str, str] | None = None,
    generated_at: datetime | None = None,
) -> str:
    """One self-contained HTML document on ``decisions`` and the log's ``verification``.

    ``policies`` labels policy hashes (hash -> "name version"); ``generated_at`` defaults to now.
    """
    ordered = sorted(decisions, key=lambda pair: pair[0])
    plain = [d for _, d in ordered]
    timeline = Timeline.of([d.at for d in plain])
    body = [
        _header(verification, origin, generated_at or datetime.now(UTC), len(plain)),
        _section("over-time", "Decisions over time", _over_time(plain, timeline)),
        _section("refusals", "Refusals by reason", _refusals(plain)),
        _section("epsilon", "Privacy budget (ε) spent per region", _epsilon(plain, timeline)),
        _section("purges", "Retention purges", _purges(plain, timeline)),
        _section("uploads", "Model updates sent from the device", _uploads(plain)),
        _section("counts", "Decisions by region, action and outcome", _counts(plain)),
        _section(
            "policies", "Policies that governed these decisions", _policies(plain, policies or {})
        ),
        _section("recent", f"Last {RECENT} decisions (newest first)", _recent(ordered)),
    ]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>Decision log report: {esc(origin)}</title>", f"<style>{_CSS}</style>", "</head>",
        "<body>", *body, "</body>", "</html>", "",
    ])  # fmt: skip


# -- small text helpers ---------------------------------------------------------------------
def _time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _metric(decision: Decision, *keys: str) -> float | None:
    """The first of ``keys`` that holds a number (bools are flags, not quantities)."""
    for key in keys:
        value = decision.metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{content}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Numbers right-aligned; an allow/deny cell is coloured so refusals stand out."""

    def cell(value: object) -> str:
        if isinstance(value, int | float):
            return f'<td class="num">{num(value)}</td>'
        text = str(value)
        css = f' class="{text}"' if text in (Outcome.ALLOW, Outcome.DENY) else ""
        return f"<td{css}>{esc(text)}</td>"

    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "\n".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>\n{body}\n</tbody></table>"


# -- header ---------------------------------------------------------------------------------
def _header(report: VerifyReport, origin: str, generated_at: datetime, shown: int) -> str:
    # Green only when a signature vouched for entries that all agree: a log with no checkpoint
    # is consistent with itself, which a rewritten log is too.
    if report.verified:
        verdict = '<p class="verdict ok">verified</p>'
    else:
        found = report.problems or [dict(report.checks())["signatures"]]
        items = "".join(f"<li>{esc(p)}</li>" for p in found)
        verdict = f'<p class="verdict bad">NOT verified</p><ul class="problems">{items}</ul>'
    checked = "".join(f"<li><b>{esc(what)}</b>: {esc(text)}</li>" for what, text in report.checks())
    latest, kept = report.latest, report.kept
    facts: list[tuple[str, str]] = [
        ("Log origin", origin),
        ("Generated", _time(generated_at)),
        ("Entries in the log", str(report.size)),
        ("Decisions in this report", str(shown)),
        ("Tree root (recomputed)", report.root.hex() or "none"),
        ("Signed checkpoints verified", f"{report.checkpoints} of {report.stored_checkpoints}"),
        ("Checked with", f"{report.key_from}: {report.verifier_key}"),
        ("Latest signed checkpoint",
         f"size {latest.size}, root {latest.root.hex()}" if latest else "none"),
        ("Entries not yet covered by a signature", str(report.unsigned)),
        ("Kept checkpoint",
         f"checked: size {kept.size}, root {kept.root.hex()}" if kept else
         "none checked: a log rewritten and re-signed with its own key would go unnoticed"),
    ]  # fmt: skip
    rows = "".join(f'<dt>{esc(k)}</dt><dd class="hash">{esc(v)}</dd>' for k, v in facts)
    return (f"<header><h1>Decision log report</h1>{verdict}<p>What was checked:</p>"
            f'<ul class="checked">{checked}</ul><dl>{rows}</dl></header>')  # fmt: skip


# -- the sections ---------------------------------------------------------------------------
def _over_time(decisions: Sequence[Decision], timeline: Timeline | None) -> str:
    if timeline is None:
        return _note("No decisions in the log yet.")
    counts = {o: [0.0] * timeline.count for o in Outcome}
    for d in decisions:
        counts[d.outcome][timeline.slot(d.at)] += 1
    series = [("allow", ALLOW, counts[Outcome.ALLOW]), ("deny", DENY, counts[Outcome.DENY])]
    return stacked_bars(timeline, series, "Decisions over time by outcome")


def _refusals(decisions: Sequence[Decision]) -> str:
    counts = Counter(d.reason for d in decisions if d.outcome is Outcome.DENY)
    if not counts:
        return _note("No refusals.")
    items = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return horizontal_bars(items, "Refusals by reason code", DENY)


def _epsilon(decisions: Sequence[Decision], timeline: Timeline | None) -> str:
    rounds: dict[str, list[tuple[Decision, float]]] = defaultdict(list)
    for d in decisions:
        value = _metric(d, "epsilon_after", "epsilon_spent")
        if d.action in (Action.OPEN_ROUND, Action.PUBLISH_RELEASE) and value is not None:
            rounds[d.region].append((d, value))
    if not rounds or timeline is None:
        return _note("No rounds yet: no open_round or publish_release decision carries ε.")
    return "\n".join(_epsilon_chart(r, rounds[r], timeline) for r in sorted(rounds))


def _epsilon_chart(region: str, rounds: Sequence[tuple[Decision, float]], line: Timeline) -> str:
    # A refused open_round never ran: its epsilon_after is what it would have reached, so it is
    # marked, not drawn as spending.
    spent: list[tuple[datetime, float]] = []
    refused: list[tuple[datetime, float]] = []
    budget: list[tuple[datetime, float]] = []
    for d, value in sorted(rounds, key=lambda pair: pair[0].at):
        ran = d.action is not Action.OPEN_ROUND or d.allowed
        (spent if ran else refused).append((d.at, value))
        if (limit := _metric(d, "epsilon_budget")) is not None:
            budget.append((d.at, limit))
    return budget_chart(region, spent, refused, budget, line)


def _purges(decisions: Sequence[Decision], timeline: Timeline | None) -> str:
    purges = [d for d in decisions if d.action is Action.PURGE_RETENTION]
    if not purges or timeline is None:
        return _note("No retention purges yet.")
    rows = [0.0] * timeline.count
    for d in purges:
        rows[timeline.slot(d.at)] += sum(
            v for k in d.metrics if k.startswith("deleted_") and (v := _metric(d, k)) is not None
        )
    chart = stacked_bars(timeline, [("rows deleted", PURGE, rows)], "Rows deleted by purges")
    return chart + _note(f"{len(purges)} purges deleted {num(sum(rows))} rows in all.")


def _uploads(decisions: Sequence[Decision]) -> str:
    """Each model update a device queued (a ``contribute_delta`` allowance with its round) and
    what became of it (``delta_acknowledged`` or ``delta_dropped``), one row per round."""
    queued: dict[tuple[str, str], Decision] = {}
    outcome: dict[tuple[str, str], Decision] = {}
    for d in decisions:
        round_id = d.metrics.get("round")
        if d.action is Action.CONTRIBUTE_DELTA and isinstance(round_id, str):
            if d.reason in ("delta_acknowledged", "delta_dropped"):
                outcome[d.region, round_id] = d
            elif d.allowed:
                queued[d.region, round_id] = d
    if not queued and not outcome:
        return _note("No model update was queued to leave a device.")
    first_seen = {k: (queued.get(k) or outcome[k]).at for k in queued.keys() | outcome.keys()}
    keys = sorted(first_seen, key=lambda k: (first_seen[k], k))
    rows = []
    for key in keys:
        first, last = queued.get(key), outcome.get(key)
        size = next((d.metrics.get("bytes") for d in (first, last) if d), None)
        fate = ("pending: not acknowledged yet" if last is None else "acknowledged" if last.allowed
                else f"dropped ({last.metrics.get('cause', 'no cause logged')})")  # fmt: skip
        rows.append((*key, _time(first.at) if first else "not in this log",
                     size if isinstance(size, int) else "", fate,
                     _time(last.at) if last else ""))  # fmt: skip
    head = ["region", "round", "queued", "bytes", "outcome", "outcome at"]
    return _table(head, rows) + _note(
        "Only updates are listed, never their contents: a delta leaves a device sealed to the "
        "region's aggregator, and the log holds its round, size and outcome."
    )


def _counts(decisions: Sequence[Decision]) -> str:
    counts: dict[tuple[str, str], Counter[Outcome]] = defaultdict(Counter)
    for d in decisions:
        counts[d.region, d.action.value][d.outcome] += 1
    rows = [
        (region, action, c[Outcome.ALLOW], c[Outcome.DENY], c.total())
        for (region, action), c in sorted(counts.items())
    ]
    return _table(["region", "action", "allow", "deny", "total"], rows) if rows else _note("None.")


def _policies(decisions: Sequence[Decision], labels: Mapping[str, str]) -> str:
    """Each run of decisions made under one policy, in log order: the policy, named by its
    ``apply_policy`` entry (or ``labels``), from its first decision until the next policy's."""
    named = dict(labels)
    runs: list[list[Decision]] = []
    for d in decisions:
        if d.action is Action.APPLY_POLICY:
            name, version = d.metrics.get("policy_name"), d.metrics.get("policy_version")
            if isinstance(name, str) and isinstance(version, str):
                named.setdefault(d.policy_hash, f"{name} {version}")
        if runs and runs[-1][0].policy_hash == d.policy_hash:
            runs[-1].append(d)
        else:
            runs.append([d])
    if not runs:
        return _note("None.")
    rows = []
    for i, run in enumerate(runs):
        until = (f"until the next policy ({_time(runs[i + 1][0].at)})" if i + 1 < len(runs)
                 else f"the latest in this log (last decision {_time(run[-1].at)})")  # fmt: skip
        rows.append((named.get(run[0].policy_hash, "not named in this log"), run[0].policy_hash,
                     _time(run[0].at), until, len(run),
                     ", ".join(sorted({d.region for d in run}))))  # fmt: skip
    note = ""
    if any(r[0] == "not named in this log" for r in rows):
        note = _note("A policy is named by the apply_policy entry logged when it began to "
                     "apply; for one without, `sottovoce policy hash FILE` tells which file "
                     "it is, and `audit report --policy FILE` names it here.")  # fmt: skip
    return _table(["policy", "hash", "from", "until", "decisions", "regions"], rows) + note


def _recent(decisions: Sequence[tuple[int, Decision]]) -> str:
    rows = [
        (index, _time(d.at), d.region, d.action.value, d.outcome.value, d.reason, d.sentence)
        for index, d in reversed(decisions[-RECENT:])
    ]
    head = ["#", "time", "region", "action", "outcome", "reason", "sentence"]
    return _table(head, rows) if rows else _note("None.")
