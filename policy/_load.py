"""Reading policy documents from YAML or JSON, with errors that name the field and the rule."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from sottovoce.policy._errors import InvalidPolicy, Problem
from sottovoce.policy._model import Policy

Format = Literal["yaml", "json"]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans only: ``NO`` (Norway) and ``on``/``off`` stay strings."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


def _problems(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        # Validators of a nested model report at the model's location; drop pydantic's
        # internal step names (e.g. "function-after[...]") that mean nothing to an author.
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and "[" in p))
        problems.append(Problem(field=_location(loc), rule=item["type"], message=item["msg"]))
    # When every item of a list fails, pydantic also reports the emptied list as too short;
    # that is an echo of the item errors, not a problem of its own.
    return [
        p
        for p in problems
        if not (
            p.rule == "too_short"
            and "after validation" in p.message
            and any(q.field.startswith(p.field + "[") for q in problems)
        )
    ]


def policy_from_data(data: Any, *, source: str | None = None) -> Policy:
    """Validate already-parsed data (a dict) as a policy."""
    if not isinstance(data, dict):
        raise InvalidPolicy(
            [Problem("(document)", "mapping", "a policy document must be a mapping")],
            source=source,
        )
    try:
        return Policy.model_validate(data)
    except ValidationError as error:
        raise InvalidPolicy(_problems(error), source=source) from None


def parse_policy(text: str, *, format: Format = "yaml", source: str | None = None) -> Policy:
    """Parse and validate a policy document given as text (YAML is a superset of JSON)."""
    try:
        data = json.loads(text) if format == "json" else yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise InvalidPolicy(
            [Problem("(document)", f"{format}_syntax", str(error).replace("\n", " "))],
            source=source,
        ) from None
    return policy_from_data(data, source=source)


def load_policy(path: str | Path) -> Policy:
    """Load a policy file; ``.json`` is read as JSON, anything else as YAML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidPolicy(
            [Problem("(document)", "readable", f"cannot read {path}: {error.strerror}")],
            source=str(path),
        ) from None
    fmt: Format = "json" if path.suffix.lower() == ".json" else "yaml"
    return parse_policy(text, format=fmt, source=str(path))


def example_policy_path() -> Path:
    """The example policy shipped with sottovoce (EU opt-in, US opt-out)."""
    return Path(__file__).with_name("examples") / "example.yaml"


def example_policy() -> Policy:
    return load_policy(example_policy_path())
