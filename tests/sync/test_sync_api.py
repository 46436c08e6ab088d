"""The errors of ``sottovoce.sync`` are one documented tree of logged reason codes."""

from __future__ import annotations

import re

import pytest
from sync_helpers import PROTOCOL_DOC

import sottovoce.sync
from sottovoce import SottovoceError
from sottovoce.policy import REASONS
from sottovoce.sync import SpecRefused, SyncError

# The public names are pinned with every package's in tests/test_exported_members.py.
ERRORS = [
    getattr(sottovoce.sync, name)
    for name in sottovoce.sync.__all__
    if isinstance(getattr(sottovoce.sync, name), type)
    and issubclass(getattr(sottovoce.sync, name), Exception)
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.__name__)
def test_every_error_has_its_own_code_under_one_root(error: type[SyncError]) -> None:
    assert issubclass(error, SyncError) and issubclass(error, SottovoceError)
    assert re.fullmatch(r"[a-z_]+", error.code)
    assert [e.code for e in ERRORS].count(error.code) == 1
    assert error.__name__ in (sottovoce.sync.__doc__ or ""), "the package docstring's tree names it"


def test_refusal_codes_are_decision_log_reasons() -> None:
    codes = {e.code for e in ERRORS if e is not SyncError} | {"budget_exhausted"}
    codes -= {"wrong_model", "aggregator_unavailable"}  # met by the device's transport only
    assert codes <= set(REASONS), codes - set(REASONS)


def test_every_code_is_documented() -> None:
    text = PROTOCOL_DOC.read_text(encoding="utf-8").split("\n## Errors\n", 1)[1]
    text = text.split("\n## ", 1)[0]  # the section, not the answers table under "HTTP"
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))
    assert documented == {e.code for e in ERRORS if e is not SyncError} | {"budget_exhausted"}


def test_a_budget_refusal_keeps_the_class_but_not_the_code() -> None:
    refusal = SpecRefused("over budget", rule="epsilon", code="budget_exhausted")
    assert refusal.code == "budget_exhausted" and refusal.rule == "epsilon"
    assert SpecRefused("x", rule="mode").code == "spec_outside_policy"
