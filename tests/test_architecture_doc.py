"""docs/architecture.md names modules, classes and functions: every one it names exists."""

from __future__ import annotations

import re

from doc_references import ROOT, broken, citations

PAGE = ROOT / "docs" / "architecture.md"


def test_every_module_and_function_the_architecture_page_names_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    cited = list(citations(text))
    assert len({path for path, _ in cited}) > 60  # the parser found the page's modules
    assert sum(name is not None for _, name in cited) > 100  # and the names after them
    assert broken(text) == []


def test_the_page_names_every_package_and_every_store_component() -> None:
    text = PAGE.read_text(encoding="utf-8")
    cited = {path for path, _ in citations(text)}
    for package in ("core", "policy", "sync", "device", "aggregator", "sim"):
        assert f"`{package}/`" in text
    components = {f"device/{p.name}" for p in (ROOT / "device").glob("_store_*.py")}
    components -= {"device/_store_values.py"}  # values the façade passes, not a component
    assert components <= cited, sorted(components - cited)


def test_the_page_is_one_page() -> None:
    lines = PAGE.read_text(encoding="utf-8").splitlines()
    assert 150 <= len(lines) <= 250
    assert [line for line in lines if line.startswith("## ")] == [
        "## The parts",
        "## An event: from the app to a ranking",
        "## A delta: from local training to a release on every device",
        "## A policy decision: from the rule to the auditor",
        "## Where each fact lives",
        "## Where to make a change",
    ]


def test_the_checker_finds_what_does_not_hold() -> None:
    good = ("`device/_store.py` `EventStore.append_many`, `EventStore`; `PartialSum.merge`, "
            "`sottovoce.policy.REASON_CODES`, `sync.transport.api_url`, `device/_store_*.py`, "
            "`tests/device/`, `RegionSigner`")  # fmt: skip
    assert broken(good) == []
    bad = ("`device/_gone.py`; `device/_store.py` `EventStore.nothing`, `missing`; "
           "`PartialSum.nothing`; `sottovoce.policy.NOTHING`; `device/_nothing_*.py`; "
           "`tests/nowhere/`; `NoSuchClass`")  # fmt: skip
    problems = broken(bad)
    assert len(problems) == 8, problems
    for token in ("_gone.py", "EventStore.nothing", "missing", "PartialSum.nothing",
                  "policy.NOTHING", "_nothing_*", "tests/nowhere", "NoSuchClass"):  # fmt: skip
        assert any(token in problem for problem in problems), token


def test_the_readme_links_the_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1]
    assert re.search(r"\]\(docs/architecture\.md\)", layout)
