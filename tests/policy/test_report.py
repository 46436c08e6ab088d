"""The offline HTML report: well formed, self-contained, escaped, and showing the right numbers.

Decisions come from a real ``DecisionEngine`` on the example policy with a clock the test moves,
so the report is checked against what the engine really logs; the verification is a
``VerifyReport`` built by hand, since its verdict is what the header must show.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sottovoce.policy import ConsentState, Policy, Purpose
from sottovoce.policy._checkpoint import Checkpoint
from sottovoce.policy._decision import Action, Decision, DecisionEngine, Outcome
from sottovoce.policy._log import VerifyReport
from sottovoce.policy._report import RECENT, render_report

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"
ROOT = bytes(range(32))
ORIGIN = "log.sottovoce.example/decisions"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
Decided = list[tuple[int, Decision]]


class Clock:
    """A clock the test moves by hand, so decisions land on chosen days."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _engine(policy: Policy, region: str, clock: Clock) -> DecisionEngine:
    return DecisionEngine(policy, region, digest_key=b"k" * 32, clock=clock)


@pytest.fixture
def decided(policy: Policy) -> Decided:
    """Five days of decisions in two regions: refusals, rounds, purges."""
    clock = Clock()
    eu, us = _engine(policy, "eu", clock), _engine(policy, "us", clock)
    adult, opted_in = ConsentState(age=30), ConsentState({Purpose.PERSONALIZATION: True}, 30)
    days: list[list[Callable[[], Decision]]] = [
        [lambda: eu.store_events(ConsentState(), inputs={"n": 1}),  # age_restricted
         lambda: eu.store_events(adult, inputs={"n": 2}),  # consent_missing
         lambda: eu.store_events(opted_in, inputs={"n": 3}),
         lambda: eu.open_round(inputs={"r": 1}, epsilon_spent=0.0, epsilon_after=1.0)],
        [lambda: us.accept_delta(inputs={"d": 1}, refusal="norm_exceeded"),
         lambda: us.accept_delta(inputs={"d": 2}, refusal="norm_exceeded"),
         lambda: us.accept_delta(inputs={"d": 3}, refusal="bad_signature"),
         lambda: us.accept_delta(inputs={"d": 4})],
        [lambda: eu.open_round(inputs={"r": 2}, epsilon_spent=1.0, epsilon_after=2.5),
         lambda: eu.open_round(inputs={"r": 3}, epsilon_spent=2.5, epsilon_after=5.0),
         lambda: eu.personalize(adult, inputs={"n": 4})],  # consent_missing
        [lambda: eu.purge(deleted={"raw_events": 10, "outbox": 2}, inputs={"p": 1}),
         lambda: us.purge(deleted={"raw_events": 5}, inputs={"p": 2})],
        [lambda: eu.publish_release(inputs={"r": 2}, cohort=30, epsilon_spent=2.5)],
    ]  # fmt: skip
    out: list[Decision] = []
    for day, calls in enumerate(days):
        for minute, call in enumerate(calls):
            clock.now = T0 + timedelta(days=day, minutes=minute)
            out.append(call())
    return list(enumerate(out))


def _verified(size: int) -> VerifyReport:
    latest = Checkpoint(origin=ORIGIN, size=max(size - 2, 0), root=ROOT)
    return VerifyReport(size=size, root=ROOT[::-1], checkpoints=1, latest=latest)


def _render(decided: Decided, report: VerifyReport | None = None, **kw: object) -> str:
    verification = report or _verified(len(decided))
    return render_report(decisions=decided, verification=verification, origin=ORIGIN,
                         generated_at=T0 + timedelta(days=9), **kw)  # type: ignore[arg-type]  # fmt: skip


def _section(doc: str, anchor: str) -> str:
    found = re.search(rf'<section id="{anchor}">(.*?)</section>', doc, re.DOTALL)
    assert found is not None, anchor
    return found.group(1)


def _svgs(fragment: str) -> list[ET.Element]:
    """Every inline SVG, parsed as XML: it must be well formed on its own."""
    return [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", fragment, re.DOTALL)]


def _titles(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{SVG}title")]


class _Elements(HTMLParser):
    """Records the elements and attributes, and whether every non-void element closes in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: Sequence[tuple[str, str | None]]) -> None:
        self.handle_startendtag(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: Sequence[tuple[str, str | None]]) -> None:
        self.tags.add(tag)  # <rect .../> in SVG: opened and closed at once
        self.attributes.update(name for name, _ in attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _elements(doc: str) -> _Elements:
    parser = _Elements()
    parser.feed(doc)
    parser.close()
    return parser


def _assert_well_formed(doc: str) -> None:
    assert doc.startswith("<!DOCTYPE html>")
    parser = _elements(doc)
    assert parser.errors == [] and parser.stack == []
    _svgs(doc)


def _assert_self_contained(doc: str, *, urls: bool = True) -> None:
    """Nothing to fetch or run: no scripts, links, images, frames, no URL but the SVG namespace.

    ``urls=False`` skips the URL check, for random text that may spell one (escaped, harmless).
    """
    if urls:
        assert set(re.findall(r"https?://[^\s\"'<>]*", doc)) <= {"http://www.w3.org/2000/svg"}
    parser = _elements(doc)
    assert not parser.tags & {"script", "link", "img", "iframe", "object", "embed", "image"}
    assert not {a for a in parser.attributes if a in {"src", "href"} or a.startswith("on")}
    style = doc[doc.index("<style>") : doc.index("</style>")]
    assert "url(" not in style and "@import" not in style


def test_report_is_well_formed_and_self_contained(decided: Decided) -> None:
    doc = _render(decided)
    _assert_well_formed(doc)
    _assert_self_contained(doc)
    for anchor in ("over-time", "refusals", "epsilon", "purges", "counts", "policies", "recent"):
        assert _svgs(_section(doc, anchor)) or anchor in {"counts", "policies", "recent"}


def test_header_shows_a_verified_log(decided: Decided) -> None:
    doc = _render(decided)
    header = doc[doc.index("<header>") : doc.index("</header>")]
    assert '<p class="verdict ok">verified</p>' in header and "NOT verified" not in doc
    assert ORIGIN in header and "2026-11-10 09:00:00Z" in header
    assert f"size {len(decided) - 2}, root {ROOT.hex()}" in header
    assert '<dt>Entries not yet covered by a signature</dt><dd class="hash">2</dd>' in header
    assert "none checked" in header


def test_header_shows_every_problem_and_the_kept_checkpoint(decided: Decided) -> None:
    problems = ["entry 3 does not match its stored leaf hash",
                "the kept checkpoint is for log 'a', not 'b' <sic>"]  # fmt: skip
    kept = Checkpoint(origin=ORIGIN, size=4, root=ROOT)
    report = VerifyReport(size=len(decided), root=ROOT, kept=kept, problems=problems)
    doc = _render(decided, report)
    assert '<p class="verdict bad">NOT verified</p>' in doc
    for problem in problems:
        assert f"<li>{html.escape(problem)}</li>" in doc
    assert f"checked: size 4, root {ROOT.hex()}" in doc
    assert "<sic>" not in doc


def test_refusals_chart_counts_each_reason(decided: Decided) -> None:
    (chart,) = _svgs(_section(_render(decided), "refusals"))
    shown = {}
    for bar in chart.iter(f"{SVG}g"):
        label, count = (t.text for t in bar.iter(f"{SVG}text"))
        shown[label] = int(count or "")
    assert shown == {"consent_missing": 2, "norm_exceeded": 2, "age_restricted": 1,
                     "bad_signature": 1, "budget_exhausted": 1}  # fmt: skip
    assert list(shown)[:2] == ["consent_missing", "norm_exceeded"]  # most frequent first
    denied = Counter(d.reason for _, d in decided if d.outcome is Outcome.DENY)
    assert shown == dict(denied)


def test_decisions_over_time_add_up_per_outcome(decided: Decided) -> None:
    (chart,) = _svgs(_section(_render(decided), "over-time"))
    texts = [t.text for t in chart.iter(f"{SVG}text")]
    assert "UTC, per day" in texts and "2026-11-01" in texts and "allow" in texts
    totals: Counter[str] = Counter()
    for title in _titles(chart)[1:]:
        outcome, count = title.split(": ")
        totals[outcome] += int(count)
    assert totals == Counter(d.outcome.value for _, d in decided)


def test_a_short_span_is_shown_per_hour(decided: Decided) -> None:
    first_day = [(i, d) for i, d in decided if d.at < T0 + timedelta(days=1)]
    (chart,) = _svgs(_section(_render(first_day), "over-time"))
    assert "UTC, per hour" in [t.text for t in chart.iter(f"{SVG}text")]


def test_epsilon_chart_shows_budget_and_refused_round(decided: Decided) -> None:
    (chart,) = _svgs(_section(_render(decided), "epsilon"))
    texts = [t.text for t in chart.iter(f"{SVG}text")]
    assert "budget ε 4" in texts and "eu: ε spent" in texts
    assert "refused round: would reach ε 5" in _titles(chart)
    dashed = [p for p in chart.iter(f"{SVG}path") if p.get("stroke-dasharray")]
    assert len(dashed) == 1


def test_no_rounds_yet_is_a_note_not_an_empty_chart(decided: Decided) -> None:
    rounds = {Action.OPEN_ROUND, Action.PUBLISH_RELEASE}
    no_rounds = [(i, d) for i, d in decided if d.action not in rounds]
    epsilon = _section(_render(no_rounds), "epsilon")
    assert "No rounds yet" in epsilon and "<svg" not in epsilon


def test_purges_sum_deleted_rows(decided: Decided) -> None:
    purges = _section(_render(decided), "purges")
    (chart,) = _svgs(purges)
    assert "rows deleted: 17" in _titles(chart)  # both purges fell on the same day
    assert "2 purges deleted 17 rows in all." in purges


def test_counts_and_policies_tables(decided: Decided, policy: Policy) -> None:
    doc = _render(decided, policies={policy.hash: f"{policy.name} {policy.version}"})
    counts = _section(doc, "counts")
    num = '<td class="num">{}</td>'
    assert "<tr><td>us</td><td>accept_delta</td>" + num.format(1) + num.format(3) + num.format(
        4
    ) in counts.replace("\n", "")
    policies = _section(doc, "policies")
    assert f"<td>{policy.name} {policy.version}</td><td>{policy.hash}</td>" in policies
    assert f'<td class="num">{len(decided)}</td>' in policies
    assert "not named in this log" in _section(_render(decided), "policies")


def test_recent_lists_the_last_decisions_newest_first(decided: Decided) -> None:
    many = [(i, decided[i % len(decided)][1]) for i in range(RECENT + 50)]
    recent = _section(_render(many), "recent")
    indices = [int(i) for i in re.findall(r'<tr><td class="num">(\d+)</td>', recent)]
    assert indices == list(range(RECENT + 49, 49, -1))


def test_text_from_the_log_is_escaped(decided: Decided) -> None:
    evil = decided[0][1].model_copy(
        update={"sentence": "<script>alert(1)</script>", "region": 'x"><img src=a>'}
    )
    doc = _render([*decided, (len(decided), evil)])
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    _assert_self_contained(doc)
    _assert_well_formed(doc)


def test_an_empty_log_renders() -> None:
    doc = render_report(decisions=[], verification=VerifyReport(), origin=ORIGIN)
    _assert_well_formed(doc)
    _assert_self_contained(doc)
    # Nothing signed, nothing verified: an empty log is not shown as a green "verified".
    assert '<p class="verdict bad">NOT verified</p>' in doc and "no signature was checked" in doc
    assert "No decisions in the log yet" in doc
    assert "No rounds yet" in doc and "No refusals." in doc and "<svg" not in doc


@given(
    st.lists(
        st.tuples(
            st.integers(0, 24 * 60 * 30),
            st.sampled_from(list(Action)),
            st.sampled_from(list(Outcome)),
            st.text(max_size=20),
            st.floats(0, 10),
        ),
        max_size=40,
    )
)
def test_any_log_renders_well_formed(rows: list[tuple[int, Action, Outcome, str, float]]) -> None:
    """Any text in any field (control characters too), any spread of times, any actions."""
    metrics = {"epsilon_after": 0.0, "epsilon_budget": 4.0, "deleted_raw_events": 3}
    decisions = [
        (i, Decision(action=action, outcome=outcome, reason="norm_exceeded", sentence=text,
                     region=text, policy_hash="a" * 64, inputs_digest="b" * 64,
                     at=T0 + timedelta(minutes=minutes), metrics={**metrics, "epsilon_after": eps}))
        for i, (minutes, action, outcome, text, eps) in enumerate(rows)
    ]  # fmt: skip
    doc = render_report(decisions=decisions, verification=VerifyReport(), origin="o")
    _assert_well_formed(doc)
    _assert_self_contained(doc, urls=False)
