"""The threat model names the code and the tests that hold each defence: every one it names
exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from doc_references import broken, citations

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "threat-model.md"
# `tests/x/test_y.py::name` names a file and a test, `tests/x/test_y.py` a file; a following
# `::other` (in the same paragraph or table cell) names another test of the file named last.
_REF = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}  # fmt: skip


def _references() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n\s*\n|\n\|", DOC.read_text(encoding="utf-8")):
        current: str | None = None
        for cell in block.split("|"):
            for path, name in _REF.findall(cell):
                current = path or current
                if name:
                    out.append((current or "?", name))
    return out


def test_every_test_the_threat_model_names_exists() -> None:
    references = _references()
    assert len(references) > 40  # the parser found the document's references
    missing = [f"{path}::{name}" for path, name in references
               if path == "?" or not (ROOT / path).is_file()
               or name not in _tests_in(ROOT / path)]  # fmt: skip
    assert missing == []


def test_every_module_and_function_the_threat_model_cites_exists() -> None:
    # `device/_store_users.py` `Users.hash`: the file exists and defines the name
    text = DOC.read_text(encoding="utf-8")
    code = [(path, name) for path, name in citations(text) if not path.startswith("tests/")]
    assert len(code) > 60  # the parser found the document's modules and names
    assert broken(text) == []
