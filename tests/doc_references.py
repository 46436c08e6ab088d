"""What a page of the docs cites of the code, and which of its citations do not hold.

A page cites code in backticks, in these forms (the ones ``docs/architecture.md`` and
``docs/threat-model.md`` use):

- a path from the repository's root, ``device/_store.py`` or a folder ``tests/device/`` (a
  ``*`` is a glob, which must match): it must exist;
- a path followed by names, ``device/_store.py`` ``EventStore.open``, ``Other``: each name is
  defined in that file (a function, class or assignment at its top level, or ``Class.member``: a
  method, a class attribute, or an attribute its methods set on ``self``, of the class or of a
  base class in the packages);
- ``Class.member`` or a ``CamelCase`` name alone: some class of the packages has that member,
  some module of the packages defines that name;
- an import path, ``sottovoce.policy.REASON_CODES`` or ``sync.transport.api_url``: it imports.

:func:`broken` returns every citation that does not hold, so a test of a page is one assertion.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "policy", "sync", "device", "aggregator", "sim")

_NAME = r"[A-Za-z_][\w.]*"
# A path and the names right after it (``a.py`` ``f``, ``g`` and ``h``).
_CITED = re.compile(rf"`([\w./*-]+\.py)(?:::\w+)?`((?:(?:,| and| or)? `{_NAME}`)*)")
_TOKEN = re.compile(r"`([^`\s]+)`")
_FOLDER_PATH = re.compile(r"^\w[\w.-]*/[\w./*-]*$")
_MEMBER = re.compile(r"^[A-Z]\w*\.[A-Za-z_]\w*$")
_CLASS = re.compile(r"^[A-Z][a-z]\w*$")
_IMPORT = re.compile(rf"^(?:sottovoce|{'|'.join(PACKAGES)})\.[\w.]+$")


def citations(text: str) -> Iterator[tuple[str, str | None]]:
    """Every (path, name) the text cites after a path (name ``None``: the path alone)."""
    for match in _CITED.finditer(text):
        path, names = match.group(1), re.findall(rf"`({_NAME})`", match.group(2))
        yield path, None
        for name in names:
            yield path, name


def broken(text: str) -> list[str]:
    """The citations in ``text`` that do not hold, each said in a few words."""
    out: list[str] = []
    attached: set[tuple[int, int]] = set()
    for match in _CITED.finditer(text):
        attached.add(match.span())
    for path, name in citations(text):
        if not _exists(path):
            out.append(f"{path}: no such file")
        elif name is not None and "*" not in path and not defines(ROOT / path, name):
            out.append(f"{path} {name}: not defined there")
    for match in _TOKEN.finditer(text):
        if any(start <= match.start() < end for start, end in attached):
            continue
        token = match.group(1)
        if _FOLDER_PATH.match(token) and (ROOT / token.split("/", 1)[0]).exists():
            if not _exists(token):
                out.append(f"{token}: no such path")
        elif _IMPORT.match(token):
            if not _imports(token):
                out.append(f"{token}: does not import")
        elif _MEMBER.match(token):
            cls, member = token.split(".")
            if member not in _inherited(cls):
                out.append(f"{token}: no class of the packages has this member")
        elif _CLASS.match(token) and token not in _top_level_names():
            out.append(f"{token}: no module of the packages defines it")
    return out


def _exists(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def defines(path: Path, name: str) -> bool:
    """Whether the Python file ``path`` defines ``name`` (``f``, ``C`` or ``C.member``)."""
    head, _, member = name.partition(".")
    tree = _parse(path)
    for node in tree.body:
        if head not in _bound(node):
            continue
        if not member:
            return True
        if isinstance(node, ast.ClassDef) and member in _inherited(node.name):
            return True
    return False


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _bound(node: ast.stmt) -> set[str]:
    """The names a top-level statement (or one in a class body) binds."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _class_members(node: ast.ClassDef) -> set[str]:
    members = set().union(*(_bound(item) for item in node.body))
    for item in ast.walk(node):
        targets: list[ast.expr] = []
        if isinstance(item, ast.Assign):
            targets = item.targets
        elif isinstance(item, ast.AnnAssign):
            targets = [item.target]
        for target in targets:
            for part in ast.walk(target):
                if (isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name)
                        and part.value.id == "self"):  # fmt: skip
                    members.add(part.attr)
    return members


def _modules() -> list[Path]:
    return sorted(path for folder in PACKAGES for path in (ROOT / folder).glob("*.py"))


@cache
def _classes() -> dict[str, tuple[set[str], set[str]]]:
    """Every class of the packages by name: the members and the base classes' names of every
    class of that name."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    for path in _modules():
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ClassDef):
                members, bases = out.setdefault(node.name, (set(), set()))
                members.update(_class_members(node))
                bases.update(b.id for b in node.bases if isinstance(b, ast.Name))
    return out


def _inherited(cls: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The members of the packages' classes named ``cls``, with those of their bases."""
    members, bases = _classes().get(cls, (set(), set()))
    out = set(members)
    for base in bases - seen - {cls}:
        out |= _inherited(base, seen | {cls})
    return out


@cache
def _top_level_names() -> set[str]:
    return {name for path in _modules() for node in _parse(path).body for name in _bound(node)}


def _imports(dotted: str) -> bool:
    """Whether ``dotted`` (``sottovoce.``, or a package folder's name first) names something."""
    parts = dotted.split(".")
    if parts[0] != "sottovoce":
        parts.insert(0, "sottovoce")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(value, attr):
                return False
            value = getattr(value, attr)
        return True
    return False
