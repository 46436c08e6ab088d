"""The compliance guide documents every reason code and action, and its recipe really works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NOW, Events

from sottovoce.device import EventStore
from sottovoce.policy import REASONS, Action, Policy, Purpose

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "compliance.md"


def _table_codes(heading: str) -> set[str]:
    text = GUIDE.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


def test_every_reason_code_is_documented() -> None:
    assert _table_codes("### Reason codes") == set(REASONS)


def test_every_action_is_documented() -> None:
    assert _table_codes("### Actions") == {a.value for a in Action}


def test_the_independent_inclusion_recipe_verifies_a_real_proof(
    tmp_path: Path, policy: Policy
) -> None:
    store = EventStore.open(tmp_path / "d.db", policy=policy, region="us", clock=lambda: NOW)
    events = Events("ann")
    for purpose in Purpose:
        store.grant("ann", purpose)
    store.append(events("like"))
    store.close()
    recipe = GUIDE.read_text(encoding="utf-8").split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "recipe.py"
    script.write_text(recipe)
    for index in range(3):
        proof = subprocess.run(
            [sys.executable, "-m", "sottovoce", "audit", "prove", str(tmp_path / "d.db"),
             str(index)], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        (tmp_path / "proof.json").write_text(proof)
        ok = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, check=False)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        data = json.loads(proof)
        data["index"] = (index + 1) % 3  # the same proof for another entry must fail
        (tmp_path / "proof.json").write_text(json.dumps(data))
        bad = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                             text=True, check=False)  # fmt: skip
        assert bad.returncode != 0


@pytest.mark.parametrize("doc", ["README.md", "docs/compliance.md"])
def test_docs_name_no_missing_commands(doc: str) -> None:
    text = (Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    import typer.main

    from sottovoce.cli import app

    group = typer.main.get_command(app)
    known = set(group.commands)  # type: ignore[attr-defined]
    for match in re.findall(r"`sottovoce ([a-z]+)", text):
        assert match in known, f"{doc} mentions `sottovoce {match}`, which does not exist"
